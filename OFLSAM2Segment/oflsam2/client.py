"""Client of ``oflsam2 serve`` (:mod:`oflsam2.server`), with the standard library and numpy only.

Slicer's Python runs it with nothing installed, through
``OFLSAM2SegmentLib.server_transport.HttpTransport``; the CLI through
:class:`oflsam2.remote_engine.RemoteEngine`. Connections are kept alive and reused; a request
that fails because the server went away raises :class:`ServerUnreachable`, one the server
refused raises :class:`ServerError` with the server's reason. Nothing here ever logs or
prints the token.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterError, OFLSAM2Error
from .transfer import ADAPTER_FILE, protocol_mismatch, sha256_of
from .version import __version__

ENV_SERVER = "OFLSAM2_SERVER"
ENV_TOKEN_FILE = "OFLSAM2_TOKEN_FILE"
ENV_CA_FILE = "OFLSAM2_SERVER_CA"
CONNECT_SECONDS = 15.0
REQUEST_SECONDS = 120.0  # one request (an upload of a large volume takes long on a slow network)
LONG_POLL_SECONDS = 20.0  # the server answers a poll at once when an event comes, else after this long
RECONNECT_SECONDS = 20.0  # how long a run keeps trying to reach a server that stopped answering
IDLE_CONNECTION_SECONDS = 20.0  # below the server's keep-alive (30 s): an older connection is not reused
TERMINAL_EVENTS = ("done", "cancelled", "error")


class ServerError(OFLSAM2Error):
    """The server refused a request or failed it; the message says why and what to do."""


class ServerUnreachable(ServerError):
    """The server could not be reached, or stopped answering."""


class ServerRefused(ServerError):
    """The server refused the token (401)."""


class SessionLost(ServerError):
    """The server no longer has this client's session (restarted, or closed after idling)."""


@dataclass(frozen=True)
class ServerTarget:
    """Where the server is and how to prove who we are. The token never appears in ``repr``."""

    url: str
    token: str = field(repr=False)
    ca_file: str | None = None  # a CA certificate to trust (a self-signed server); default: the system's

    def __post_init__(self):
        try:
            parts = urllib.parse.urlsplit(self.url)
            if parts.port == 0:  # reading the port raises for one outside 0..65535
                raise ValueError("port 0 is no server's")
        except ValueError as exc:  # an unclosed "[" of an IPv6 address, a port out of range
            raise ServerError(f"The server URL {self.url!r} is malformed ({exc}); it must look like https://host:8765.") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServerError(f"The server URL must look like https://host:8765 (or http://127.0.0.1:8765); got {self.url!r}.")
        if parts.username is not None or parts.password is not None:
            raise ServerError("The server URL takes no user name or password (the token is the only credential): "
                              "remove the 'name:password@' part.")
        if parts.query or parts.fragment:
            raise ServerError(f"The server URL takes no query or fragment; got {self.url!r}.")
        if not self.token or any(c.isspace() for c in self.token):
            raise ServerError("The server's token is empty or holds spaces: paste the token the server stored (only it).")
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise ServerError(f"The CA certificate file {self.ca_file} does not exist.")

    @property
    def base_path(self) -> str:
        """A path prefix (a reverse proxy may serve the API under one), without the final slash."""
        return urllib.parse.urlsplit(self.url).path.rstrip("/")


def target_from_options(url: str | None, token_file: str | None, ca_file: str | None = None) -> ServerTarget | None:
    """The CLI's ``--server URL --token-file FILE [--server-ca FILE]``, each defaulting to its
    environment variable; None when no server is named."""
    url = url or os.environ.get(ENV_SERVER) or None
    token_file = token_file or os.environ.get(ENV_TOKEN_FILE) or None
    ca_file = ca_file or os.environ.get(ENV_CA_FILE) or None
    if url is None:
        if token_file is not None and not os.environ.get(ENV_TOKEN_FILE):
            raise ServerError("--token-file is for a server: give --server URL too (or set OFLSAM2_SERVER).")
        return None
    if token_file is None:
        raise ServerError(f"--server {url} needs the server's token: --token-file FILE (or set {ENV_TOKEN_FILE}).")
    return ServerTarget(url, read_token_file(token_file), ca_file)


class ServerClient:
    """One client session on a server. Thread-safe: each request takes a kept-alive connection
    of its own from a small pool."""

    def __init__(self, target: ServerTarget, reconnect_seconds: float = RECONNECT_SECONDS):
        self.target = target
        self.reconnect_seconds = reconnect_seconds
        self.session: str | None = None
        self._parts = urllib.parse.urlsplit(target.url)
        self._ssl = ssl.create_default_context(cafile=target.ca_file) if self._parts.scheme == "https" else None
        self._idle: list = []  # (connection, last used)
        self._lock = threading.Lock()

    # The API -------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._call("GET", "/v1/health", auth=False)

    def open_session(self) -> str:
        """Start a session (checking first that the server speaks this client's protocol)."""
        from .worker import PROTOCOL_VERSION

        health = self.health()
        if health.get("service") != "oflsam2":
            raise ServerError(f"{self.target.url} is not an OFLSAM2 server (its /v1/health does not say so); check the URL.")
        if health.get("protocol") != PROTOCOL_VERSION:
            raise ServerError(protocol_mismatch(PROTOCOL_VERSION, health.get("protocol"), __version__, health.get("version", "?")))
        answer = self._call("POST", "/v1/sessions", {"protocol": PROTOCOL_VERSION, "version": __version__})
        self.session = answer["session"]
        return self.session

    def close_session(self, timeout: float = 5.0) -> None:
        """End the session on the server (its data goes at once); quiet when the server is gone."""
        session, self.session = self.session, None
        if session is not None:
            try:
                self._call("DELETE", f"/v1/sessions/{session}", timeout=timeout)
            except ServerError:
                pass
        self.close()

    def upload(self, source) -> str:
        """Send ``source`` (bytes, or the path of a file) unless the session has it; returns its name (SHA-256)."""
        digest = sha256_of(source)
        path = f"{self._session_path()}/blobs/{digest}"
        if self._call("HEAD", path, expect=(200, 404)) == 200:
            return digest
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._call("PUT", path, bytes(source), content_type="application/octet-stream")
        else:
            with open(source, "rb") as body:
                self._call("PUT", path, body, content_type="application/octet-stream", length=os.fstat(body.fileno()).st_size)
        return digest

    def submit(self, request: dict) -> tuple[int, int]:
        """Queue a job; returns (job, jobs ahead of it)."""
        answer = self._call("POST", f"{self._session_path()}/jobs", request, retry=False)
        return int(answer["job"]), int(answer.get("ahead", 0))

    def events(self, job: int, after: int, wait: float) -> list[dict]:
        answer = self._call("GET", f"{self._session_path()}/jobs/{int(job)}/events?after={int(after)}&wait={wait:g}",
                            timeout=wait + REQUEST_SECONDS)
        return answer["events"]

    def follow(self, job: int, wait: float = LONG_POLL_SECONDS, stop=None):
        """The job's events as they come, up to its last; a server that stops answering is tried
        again for ``reconnect_seconds`` before :class:`ServerUnreachable` is raised. ``stop()``
        true: return early (the caller is shutting down)."""
        after, lost_since = 0, None
        while stop is None or not stop():
            try:
                found = self.events(job, after, wait)
                lost_since = None
            except ServerUnreachable as exc:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > self.reconnect_seconds:
                    raise ServerUnreachable(f"The OFLSAM2 server at {self.target.url} stopped answering during the run "
                                            f"and did not come back within {self.reconnect_seconds:.0f} s: {exc}") from None
                time.sleep(0.5)
                continue
            for event in found:
                after = event["seq"]
                yield event
                if event.get("event") in TERMINAL_EVENTS:
                    return

    def upload_adapter(self, adapter) -> dict:
        """An adapter's files sent: {file name: upload}. ``adapter``: its folder (every label's
        adapter in it), or one of its files (that label's), or None (no adapter: {})."""
        if not adapter:
            return {}
        path = Path(adapter)
        if path.is_file():
            files = [path.with_suffix(".json"), path.with_suffix(".safetensors")]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and ADAPTER_FILE.fullmatch(p.name))
        else:
            files = []
        if not any(p.suffix == ".json" and p.is_file() for p in files):
            raise AdapterError(f"{adapter} holds no OFL-SAM2 adapter (<label>.json with its .safetensors file).")
        return {p.name: self.upload(p) for p in files if p.is_file()}

    def fetch_adapter(self, job: int, names, folder, staged=None) -> None:
        """The adapter a job trained into ``folder``: its tensors first, then the JSON that names
        them (an adapter's commit record), each moved into place whole; by ``staged`` (a
        :class:`~oflsam2.outputs.StagedOutputs`) when it commits, if given, as local runs do."""
        folder = Path(folder)
        if staged is not None:  # folders made for the adapter go again if it is discarded
            from .outputs import missing_folders  # SimpleITK: only the CLI stages

            for created in reversed(missing_folders(folder)):
                staged.remove_if_empty(created)
        folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(names, key=lambda n: n.endswith(".json")):
            if not ADAPTER_FILE.fullmatch(str(name)):
                raise ServerError(f"The server named an adapter file {str(name)[:80]!r}, which is not one.")
            data = self.job_file(job, name)
            handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
                os.chmod(temporary, 0o644)  # as the engine writes adapters: meant to be shared
                if staged is not None:
                    staged.adopt(Path(temporary), folder / name)
                else:
                    os.replace(temporary, folder / name)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise

    def cancel(self, job: int, timeout: float = 10.0) -> None:
        self._call("POST", f"{self._session_path()}/jobs/{int(job)}/cancel", timeout=timeout)

    def job_file(self, job: int, name: str) -> bytes:
        return self._call("GET", f"{self._session_path()}/jobs/{int(job)}/files/{urllib.parse.quote(name)}", raw=True)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()

    # HTTP ----------------------------------------------------------------------------------

    def _session_path(self) -> str:
        if self.session is None:
            raise ServerError("No session is open on the server.")
        return f"/v1/sessions/{self.session}"

    def _call(self, method: str, path: str, body=None, *, auth: bool = True, expect=(200, 201, 202), retry: bool = True,
              timeout: float = REQUEST_SECONDS, raw: bool = False, content_type: str = "application/json", length=None):
        """One request; returns the JSON answer (``raw``: the bytes; HEAD: the status)."""
        headers = {"User-Agent": f"oflsam2-client/{__version__}"}
        if auth:
            headers["Authorization"] = f"Bearer {self.target.token}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
        if body is not None:
            headers["Content-Type"] = content_type
            headers["Content-Length"] = str(length if length is not None else len(body))
        for attempt in (1, 2):
            connection, reused = self._connection(timeout)
            try:
                connection.request(method, self.target.base_path + path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                seekable = body is None or isinstance(body, bytes)
                if reused and retry and seekable and attempt == 1:  # a kept-alive connection the server had closed
                    continue
                raise self._unreachable(exc) from None
            if response.will_close:
                connection.close()
            else:
                self._release(connection)
            break
        if response.status in expect:
            if method == "HEAD":
                return response.status
            return data if raw else (json.loads(data) if data else {})
        raise self._refusal(response, data, path)

    def _connection(self, timeout: float):
        now = time.monotonic()
        with self._lock:
            while self._idle:
                connection, used = self._idle.pop()
                if now - used < IDLE_CONNECTION_SECONDS:
                    connection.timeout = timeout
                    if connection.sock is not None:
                        connection.sock.settimeout(timeout)
                    return connection, True
                connection.close()
        host, port = self._parts.hostname, self._parts.port
        if self._ssl is not None:
            connection = http.client.HTTPSConnection(host, port or 443, timeout=timeout, context=self._ssl)
        else:
            connection = http.client.HTTPConnection(host, port or 80, timeout=timeout)
        return connection, False

    def _release(self, connection) -> None:
        with self._lock:
            self._idle.append((connection, time.monotonic()))

    def _unreachable(self, exc: BaseException) -> ServerUnreachable:
        url = self.target.url
        if isinstance(exc, ssl.SSLCertVerificationError):
            return ServerUnreachable(
                f"The certificate of the server at {url} is not trusted ({exc.verify_message}). Give the certificate of "
                f"the authority that signed it (CLI: --server-ca FILE or {ENV_CA_FILE}; Slicer: 'CA certificate'), or "
                "give the server a certificate from a trusted authority.")
        if isinstance(exc, ssl.SSLError):
            return ServerUnreachable(
                f"TLS with the server at {url} failed ({exc.reason or exc}): a server started without --tls-cert speaks "
                "http://, one with it https:// -- check the URL's scheme.")
        if isinstance(exc, ConnectionRefusedError):
            return ServerUnreachable(
                f"Nothing answers at {url} (connection refused): is 'oflsam2 serve' running there, on that port, and "
                "does the firewall let the port through?")
        if isinstance(exc, socket.gaierror):
            return ServerUnreachable(f"The server name {self._parts.hostname!r} cannot be found ({exc.strerror}); check the URL.")
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return ServerUnreachable(f"The server at {url} did not answer in time (the network is down, or a firewall "
                                     "drops the connection).")
        if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            hint = " If the server uses TLS, the URL must start with https://." if self._ssl is None else ""
            return ServerUnreachable(f"The server at {url} closed the connection (it stopped, or a proxy cut it).{hint}")
        return ServerUnreachable(f"Cannot talk to the server at {url}: {type(exc).__name__}: {exc}")

    def _refusal(self, response, data: bytes, path: str) -> ServerError:
        url = self.target.url
        try:
            detail = json.loads(data).get("detail") if data else None
        except ValueError:
            detail = None
        if response.status == 401 and path == "/v1/health":  # open on an OFLSAM2 server: the path is not its API
            return ServerError(
                f"{url.rstrip('/')}/v1/health asks for a token, which an OFLSAM2 server never does: the URL's path is wrong. Give the "
                "server's address alone (e.g. https://host:8765, without /v1), or the prefix a reverse proxy serves it under.")
        if response.status == 401:
            return ServerRefused(
                f"The server at {url} refused the token (401 Unauthorized): use the token the server keeps in the file it "
                "named when it started (CLI: --token-file FILE; Slicer: paste its text into the token field).")
        if response.status in (502, 503, 504) and not isinstance(detail, str):
            return ServerUnreachable(
                f"The server at {url} answered {response.status} {response.reason}: a reverse proxy in front of it "
                "could not reach 'oflsam2 serve' (is it running?).")
        if not isinstance(detail, str):
            return ServerError(f"The server at {url} did not answer as an OFLSAM2 server (HTTP {response.status} "
                               f"{response.reason} for {path.split('?')[0]}); check the URL.")
        if response.status == 404 and path.startswith("/v1/sessions/") and "no such session" in detail.lower():
            return SessionLost(detail)
        return ServerError(f"The server refused the request: {detail}")


def test_connection(target: ServerTarget) -> str:
    """Reach the server, check its protocol and the token (a session is opened and closed).
    Returns what to tell the user; raises :class:`ServerError` saying what is wrong."""
    client = ServerClient(target)
    try:
        health = client.health()
        client.open_session()
    finally:
        client.close_session()
    models = ", ".join(health.get("models") or []) or "none downloaded there yet (random weights only)"
    return (f"Connected to OFLSAM2 {health.get('version')} at {target.url}: device {health.get('device')}; "
            f"models: {models}. The token was accepted.")


def read_token_file(path) -> str:
    """The token in a token file (what ``oflsam2 serve`` wrote), for the CLI's ``--token-file``."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ServerError(f"Cannot read the token file {path}: {exc.strerror or exc}.") from None
    if not text or any(c.isspace() for c in text):
        raise ServerError(f"The token file {path} must hold the server's token alone, on one line.")
    return text


__all__ = ["ServerClient", "ServerError", "ServerRefused", "ServerTarget", "ServerUnreachable", "SessionLost",
           "read_token_file", "target_from_options", "test_connection"]
