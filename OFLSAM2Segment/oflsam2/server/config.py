"""What ``oflsam2 serve`` is started with: where it listens, its token, its limits.

The token is a random string that every client sends as ``Authorization: Bearer <token>``. It
lives in a file only its owner may read (mode 0600); without ``--token-file`` the server makes
one in the user's config folder (or reuses the one made there before) and prints where it is,
never the token itself.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_FILE_NAME = "server-token"
ENV_CONFIG_DIR = "OFLSAM2_CONFIG_DIR"  # overrides the user's config folder (tests, shared accounts)
MODELS_PER_DEVICE = 2  # models kept loaded per device, least recently used dropped first


@dataclass
class Limits:
    """What one server accepts; each refusal says which limit and how to raise it."""

    max_sessions: int = 16
    max_upload_bytes: int = 2 << 30  # one array or adapter file
    max_voxels: int = 400_000_000  # voxels of one array (a 512 x 512 x 1500 CT fits)
    max_queued_jobs: int = 32  # waiting for the device, all sessions together
    max_session_bytes: int = 8 << 30  # the uploads one session keeps at once
    session_idle_seconds: int = 30 * 60  # a session unused this long is closed and its memory freed
    max_cache_megabytes: int = 8192  # a session's encoded slices (ModelSettings.cache_megabytes is capped to it)

    def describe(self) -> dict:
        return {
            "max_sessions": self.max_sessions, "max_upload_mb": self.max_upload_bytes >> 20, "max_voxels": self.max_voxels,
            "max_queued_jobs": self.max_queued_jobs, "session_idle_minutes": self.session_idle_seconds / 60,
        }


@dataclass
class ServerConfig:
    token: str
    device: str = "auto"
    limits: Limits = field(default_factory=Limits)
    state_dir: str | None = None  # sessions' files go in a private folder made here (default: the temp folder)
    device_label: str = ""  # the device as /v1/health describes it, e.g. "cuda (NVIDIA H100 80GB HBM3)"
    models: list = field(default_factory=list)  # the models whose checkpoints the server has


def user_config_dir() -> Path:
    """The user's config folder for OFLSAM2 (``$OFLSAM2_CONFIG_DIR`` if set)."""
    if os.environ.get(ENV_CONFIG_DIR):
        return Path(os.environ[ENV_CONFIG_DIR])
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "oflsam2"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "oflsam2"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "oflsam2"


def server_token(token_file: str | None) -> tuple[str, Path, bool]:
    """(token, its file, whether it was made now): ``token_file``'s token, or the one in the user's
    config folder, made there (mode 0600) if absent."""
    if token_file is not None:
        return read_token_file(token_file, private=True), Path(token_file), False
    path = user_config_dir() / TOKEN_FILE_NAME
    if path.is_file():
        return read_token_file(path, private=True), path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(token + "\n")
    return token, path, True


def read_token_file(path, private: bool = False) -> str:
    """The token in ``path`` (surrounding white space dropped). ``private``: refuse a file that
    other users may read (on POSIX), as ssh refuses an open key file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise InputError(f"The token file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"The token file {path} cannot be read: {exc}.") from None
    if not text or any(c.isspace() for c in text):
        raise InputError(f"The token file {path} must hold the token alone, on one line.")
    if private and os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise InputError(f"The token file {path} may be read by other users; make it private: chmod 600 {path}")
    return text


def check_listen_address(host: str, tls: bool, allow_insecure_http: bool) -> None:
    """Refuse to serve plain HTTP beyond this computer unless the user said so."""
    if tls or allow_insecure_http or is_loopback(host):
        return
    raise InputError(
        f"Listening on {host} without TLS would send the token and the patients' images unencrypted over the "
        "network. Give --tls-cert and --tls-key, or keep --host 127.0.0.1 behind a TLS reverse proxy, or pass "
        "--allow-insecure-http if this network is private and trusted."
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
