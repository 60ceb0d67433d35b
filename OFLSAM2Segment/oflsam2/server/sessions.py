"""Client sessions: each one's uploads, jobs and engine state, apart from every other session's.

A session owns a private folder (mode 0700) under the server's state folder, named by the
server, never by a client: ``blobs/<sha256>`` (its uploads) and ``jobs/job-<n>`` (an adapter sent
with a job, the adapter a job trained). Its :class:`~oflsam2.engine_session.EngineSession` holds
its encoded slices, the result an Update starts from and the head OFL-SAM2 trained; the SAM2
model itself is the device's, shared. A session unused for ``Limits.session_idle_seconds`` is
closed: its folder, caches and results are gone.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..engine_session import EngineSession, PlaneEvents
from ..transfer import ADAPTER_FILE, DIGEST, TransferError, load_npy, pack_plane
from ..worker_state import remove_stale_state_folders
from .config import Limits

ROOT_PREFIX = "oflsam2-server-"


class SessionError(Exception):
    """A request that names something the session does not have (answered 404 or 429)."""


class Session:
    def __init__(self, session_id: str, folder: Path, limits: Limits, engine_factory: Callable, device: str):
        self.id = session_id
        self.folder = folder
        self.blobs = folder / "blobs"
        self.blobs.mkdir(mode=0o700)
        self.limits = limits
        self.device = device
        self.engine = EngineSession(engine_factory, state_parent=str(folder))
        self.jobs: dict[int, object] = {}  # job id -> jobs.ServerJob
        self.job_ids = itertools.count(1)
        self.last_used = time.monotonic()
        self.closed = False
        self.lock = threading.Lock()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    # Uploads ----------------------------------------------------------------------------------

    def blob(self, digest: str) -> Path:
        """The upload named ``digest`` (a SHA-256 in hex; nothing else names a file here)."""
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise TransferError(f"an upload is named by the SHA-256 of its bytes (64 hex digits); got {str(digest)[:80]!r}")
        path = self.blobs / digest
        if not path.is_file():
            raise TransferError(f"nothing was uploaded as {digest} in this session; upload it first")
        return path

    def blob_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.blobs.iterdir() if p.is_file())

    def load_array(self, digest: str) -> np.ndarray:
        return load_npy(self.blob(digest), self.limits.max_voxels)

    def keep_only(self, digests: set[str]) -> None:
        """Drop the uploads no waiting or running job needs (one client's next job re-sends what
        it needs; one already here is not sent again)."""
        for path in self.blobs.iterdir():
            if path.is_file() and DIGEST.fullmatch(path.name) and path.name not in digests:
                path.unlink(missing_ok=True)

    # Jobs -------------------------------------------------------------------------------------

    def run(self, job) -> dict:
        """Run a checked ``segment`` request (:mod:`.requests`) on this session's engine: the
        worker's job, with the server's device and the adapters as files of this session."""
        request = dict(job.request)
        settings = dict(request["settings"], device=self.device)
        settings["cache_megabytes"] = min(int(settings.get("cache_megabytes", 4096)), self.limits.max_cache_megabytes)
        options = dict(request["options"])
        out = self.folder / "jobs" / f"job-{job.id}"
        if request.get("adapter_files"):
            given = out / "adapter-in"
            given.mkdir(parents=True)
            for name, digest in request["adapter_files"].items():
                shutil.copyfile(self.blob(digest), given / name)
            options["adapter"] = str(given)
        if request.get("save_adapter"):
            options["save_adapter"] = str(out / "adapter")
        request.update(settings=settings, options=options)
        summary = self.engine.segment(job.id, request, self.load_array, StreamedPlanes(job.log.append, job.id, job.token))
        if request.get("save_adapter"):
            summary["adapter_files"] = sorted(p.name for p in (out / "adapter").iterdir() if ADAPTER_FILE.fullmatch(p.name))
        return summary

    def job_file(self, job_id: int, name: str) -> Path:
        """A file a job wrote for the client (the adapter it trained)."""
        if not isinstance(name, str) or not ADAPTER_FILE.fullmatch(name):
            raise SessionError(f"no such file: {name[:80]!r}")
        path = self.folder / "jobs" / f"job-{int(job_id)}" / "adapter" / name
        if not path.is_file():
            raise SessionError(f"job {job_id} wrote no file {name!r}")
        return path

    def remove(self) -> None:
        self.engine.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class StreamedPlanes(PlaneEvents):
    """Each finished plane inside its ``slice`` event, as packed bits."""

    def deliver(self, plane: np.ndarray) -> dict:
        return {"plane": pack_plane(plane)}


class SessionStore:
    """The open sessions; ``busy(session)`` says whether a job of it waits or runs (never expired then)."""

    def __init__(self, limits: Limits, engine_factory: Callable, device: str, state_dir: str | None,
                 busy: Callable[[Session], bool]):
        self.limits = limits
        self._engine_factory = engine_factory
        self._device = device
        self._busy = busy
        remove_stale_state_folders(state_dir, ROOT_PREFIX)  # what servers that were killed left
        self.root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=state_dir))  # mode 0700
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self) -> Session:
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise SessionError(f"The server holds its maximum of {self.limits.max_sessions} sessions; try again when "
                                   "one ends (idle ones close after "
                                   f"{self.limits.session_idle_seconds // 60} minutes) or ask for a higher --max-sessions.")
            session_id = secrets.token_urlsafe(18)
            folder = self.root / f"session-{secrets.token_hex(8)}"  # never a name a client chose
            folder.mkdir(mode=0o700)
            session = Session(session_id, folder, self.limits, self._engine_factory, self._device)
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionError("This server has no such session: it was restarted, or the session was closed after "
                               f"{self.limits.session_idle_seconds // 60} idle minutes. Its results are gone; "
                               "run a fresh segmentation.")
        session.touch()
        return session

    def close(self, session_id: str) -> Session | None:
        """Forget a session; its folder goes at once unless a job of it still runs (then after it)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.closed = True
            if not self._busy(session):
                session.remove()
        return session

    def expire(self, now: float | None = None) -> list[str]:
        """Close the sessions idle for longer than the limit; returns their ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [s.id for s in self._sessions.values()
                    if now - s.last_used > self.limits.session_idle_seconds and not self._busy(s)]
        for session_id in idle:
            self.close(session_id)
        return idle

    def release_engines(self) -> None:
        """Every session lets go of its engine (the device's model was replaced by another)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.engine.release_engine()

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.closed = True
            session.remove()
        shutil.rmtree(self.root, ignore_errors=True)
