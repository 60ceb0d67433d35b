"""The worker protocol to an ``oflsam2 serve`` server: :class:`HttpTransport`, beside the
local :class:`~.worker.ProcessTransport`, so that the run logic (streamed writes, Cancel,
restore, undo, Update, review) is the same whichever computer segments.

It takes the request lines :class:`~.worker.Worker` writes and gives back the events a local
worker would: the arrays the worker wrote into the job's folder are uploaded (each once per
session: an Update does not send the volume again), each result plane the server streams is
written into that folder as the local worker does, an adapter to use is sent as files and one
the run trains comes back into the folder asked for. A server that stops answering (or a network
that drops) for longer than ``reconnect_seconds`` ends the connection: the run fails with the
reason and its segments are restored; the next run opens a new session. Needs the standard
library and numpy only (:mod:`oflsam2.client`); never logs the token.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import numpy as np

from oflsam2.client import RECONNECT_SECONDS, ServerClient, ServerError, ServerTarget, ServerUnreachable, SessionLost
from oflsam2.transfer import NPY_HEADER_BYTES, TransferError, npy_header, unpack_plane
from oflsam2.worker import PROTOCOL_VERSION

from .worker import Transport

log = logging.getLogger(__name__)


class HttpTransport(Transport):
    def __init__(self, on_event, target: ServerTarget, reconnect_seconds: float = RECONNECT_SECONDS):
        super().__init__(on_event)
        self.target = target
        self.pid = None
        self.command = [target.url]
        self._client = ServerClient(target, reconnect_seconds)
        self._messages: queue.Queue = queue.Queue()
        self._cancelled: set = set()  # client job ids
        self._running: dict = {}  # client job id -> server job id
        self._results: dict = {}  # client job id -> server job id, of finished segment jobs (an Update names one)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._failure: str | None = None
        self._ended = threading.Event()
        self._threads: list[threading.Thread] = []
        self._dispatcher = threading.Thread(target=self._dispatch, name="OFLSAM2ServerTransport", daemon=True)
        self._dispatcher.start()

    # Transport -------------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        if self._ended.is_set():
            raise BrokenPipeError("the server connection is closed")
        if message.get("type") == "cancel":
            self._cancel(message.get("job"))
        else:
            self._messages.put(message)

    def close_input(self) -> None:
        self._messages.put({"type": "shutdown"})

    @property
    def alive(self) -> bool:
        return not self._ended.is_set()

    def kill(self, reason: str = "") -> None:
        """Stop now: the server is told to close the session (its jobs stop), the jobs here end."""
        self.kill_reason = self.kill_reason or reason
        self._stopping.set()
        self._end(None if self.said_hello else f"The OFLSAM2 server at {self.target.url} did not answer in time: check "
                  "the URL, that 'oflsam2 serve' runs there, and that the firewall lets its port through.")

    def wait(self, timeout: float) -> bool:
        return self._ended.wait(timeout)

    def exit_description(self) -> str:
        return self._failure or "the connection to the server was closed"

    def failure_reason(self) -> str | None:
        return self._failure

    # Threads ---------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Open the session, say hello, then start each job on a thread of its own."""
        try:
            self._client.open_session()
        except ServerError as exc:
            self._failure = f"The OFLSAM2 server could not be used: {exc}"
            self._end(self._failure)
            return
        self.said_hello = True
        self._emit({"event": "hello", "protocol": PROTOCOL_VERSION, "server": self.target.url})
        while True:
            message = self._messages.get()
            if message.get("type") == "shutdown":
                break
            thread = threading.Thread(target=self._run_job, args=(message,), name="OFLSAM2ServerJob", daemon=True)
            self._threads.append(thread)
            thread.start()
        self._stopping.set()
        with self._lock:
            running = list(self._running.values())
        for server_job in running:  # stopped with the session anyway; this is quicker
            self._quietly(self._client.cancel, server_job, 3.0)
        self._client.close_session()
        self._end(None)

    def _run_job(self, message: dict) -> None:
        job = message.get("job")
        try:
            if message.get("type") != "segment":
                raise ServerError("Checkpoints are downloaded on the server by its administrator (oflsam2 checkpoints "
                                  "download NAME); choose a model the server has.")
            self._segment(job, message)
        except ServerUnreachable as exc:  # the server is gone: every job of this connection ends
            self._end(str(exc))
        except Exception as exc:  # this job fails; the connection and the other jobs go on
            if self._stopping.is_set():
                return
            self._emit({"event": "error", "job": job, "error_type": "OFLSAM2Error", "error_module": "oflsam2.errors",
                        "message": str(exc), "traceback": "", "out_of_memory": False, "device_hint": ""})
            if isinstance(exc, SessionLost):  # the next run opens a new session
                self._end(str(exc))
        finally:
            with self._lock:
                self._running.pop(job, None)

    def _segment(self, job, message: dict) -> None:
        folder = Path(message["folder"])
        with open(folder / message["image"], "rb") as handle:
            shape = npy_header(handle.read(NPY_HEADER_BYTES)).shape
        with self._lock:
            if job in self._cancelled:  # before anything was sent
                self._emit({"event": "cancelled", "job": job})
                return
        save_adapter = (message.get("options") or {}).get("save_adapter")
        for attempt in (1, 2):
            try:
                request = self._request(message, folder)
                server_job, ahead = self._client.submit(request)
                break
            except SessionLost:  # the server restarted or closed the idle session: a fresh run starts a new one
                if attempt == 2 or message.get("previous_job") is not None:
                    raise
                self._client.open_session()
                with self._lock:
                    self._results.clear()
        with self._lock:
            self._running[job] = server_job
            cancelled = job in self._cancelled
        if cancelled:
            self._client.cancel(server_job)
        if ahead:
            self._emit(_waiting(job, ahead))
        planes = 0
        for event in self._client.follow(server_job, stop=self._stopping.is_set):
            kind = event.get("event")
            if kind == "queued":
                self._emit(_waiting(job, event["position"]))
            elif kind == "slice":
                planes += 1
                name = f"plane-{planes:06d}.npy"
                try:
                    plane = unpack_plane(event["plane"], int(np.prod(shape)))
                except TransferError as exc:
                    raise ServerError(f"The server sent a result plane that cannot be read: {exc}.") from None
                np.save(folder / name, plane, allow_pickle=False)
                self._emit({"event": "slice", "job": job, "label": event["label"], "axis": event["axis"],
                            "index": event["index"], "file": name})
            elif kind == "done":
                summary = dict(event["summary"])
                files = summary.pop("adapter_files", [])
                if save_adapter:
                    self._client.fetch_adapter(server_job, files, save_adapter)
                with self._lock:
                    self._results[job] = server_job
                self._emit({"event": "done", "job": job, "summary": summary})
            elif kind in ("progress", "cancelled", "error"):
                self._emit({**{k: v for k, v in event.items() if k != "seq"}, "job": job})

    def _request(self, message: dict, folder: Path) -> dict:
        """The server's form of a worker request: arrays as uploads, adapters as files."""
        upload = self._client.upload
        options = dict(message["options"])
        request = {
            "type": "segment", "settings": message["settings"], "method": message["method"], "axis": message["axis"],
            "preset": message["preset"], "image": upload(folder / message["image"]),
            "options": {**options, "adapter": None, "save_adapter": None},
            "supports": [{**s, "mask": upload(folder / s["mask"])} for s in message["supports"]],
            "references": [{**r, "image": upload(folder / r["image"]), "labels": upload(folder / r["labels"])}
                           for r in message.get("references", [])],
            "adapter_files": self._client.upload_adapter(options.get("adapter")),
            "save_adapter": bool(options.get("save_adapter")),
        }
        if message.get("previous_job") is not None:
            with self._lock:  # 0: no job of this session, which the server refuses with the reason
                request["previous_job"] = self._results.get(message["previous_job"], 0)
        return request

    def _cancel(self, job) -> None:
        with self._lock:
            self._cancelled.add(job)
            server_job = self._running.get(job)
        if server_job is not None:
            threading.Thread(target=self._quietly, args=(self._client.cancel, server_job), daemon=True).start()

    def _emit(self, event: dict) -> None:
        try:
            self._on_event(self, event)
        except Exception:  # one bad event must not end the connection to a live server
            log.exception("OFLSAM2 server: an event could not be handled: %r", {k: event.get(k) for k in ("event", "job")})

    def _end(self, failure: str | None) -> None:
        """The connection is over (``failure``: why, for the runs it ends); the dispatcher closes the session."""
        if self._ended.is_set():
            return
        self._failure = self._failure or failure
        self._ended.set()
        self.connection_ended = True
        self._messages.put({"type": "shutdown"})
        self._on_event(self, None)

    @staticmethod
    def _quietly(function, *args) -> None:
        try:
            function(*args)
        except ServerError:
            pass


def _waiting(job, ahead: int) -> dict:
    text = f"{ahead} job(s) ahead of this one" if ahead else "starting"
    return {"event": "progress", "job": job, "stage": "queued", "done": 0, "total": 1, "text": text}
