"""The engine in a worker process: ``python -m oflsam2.worker``.

Slicer (or any client) starts this once per session and keeps it: the process owns one
:class:`~oflsam2.api.Engine`, so the model and the features of the last volumes stay loaded
across runs. It imports no ``slicer``, ``qt`` or ``vtk``.

Protocol (``PROTOCOL_VERSION``): one JSON object per line, requests on stdin, events on stdout.
Arrays never travel in the JSON: they are ``.npy`` files in a folder the client created for the
request (private to the user), loaded with ``allow_pickle=False``.

Requests (``type``):

- ``segment``: ``job``, ``folder``, ``settings`` (:class:`ModelSettings` fields), ``options``
  (:class:`MethodOptions` fields), ``method``, ``axis``, ``preset``, ``image`` (file name),
  ``supports`` [{``label``, ``name``, ``slices``, ``mask`` (file name)}], ``references``
  [{``name``, ``image``, ``labels``}], optional ``previous_job``: update the result of that
  earlier ``segment`` job of this process after corrections (``Engine.segment(previous=...)``);
  only the slices it recomputes are sent. The process keeps the result of its latest segment
  job (for ``ofl`` also its trained head, in a private folder, which an update warm-starts);
  an update of any other job is refused (``InputError``: run a fresh segmentation). The job
  itself is run by :class:`~oflsam2.engine_session.EngineSession`, shared with the server
- ``download``: ``job``, ``model`` -- fetch a checkpoint into the user cache
- ``cancel``: ``job`` -- checked between encode batches, training epochs and slices
- ``shutdown`` (or end of stdin): stop after cancelling the current job; at the end of stdin
  without ``shutdown`` (the client died) also remove the ``job-*`` folders it was given

Events (``event``), each with the ``job`` it belongs to except ``hello``:

- ``hello``: ``protocol``, ``pid``, ``python`` -- sent once at start
- ``progress``: ``stage``, ``done``, ``total``, ``text``
- ``slice``: ``label``, ``axis``, ``index``, ``file`` -- a final 0/1 uint8 plane written into
  the request's folder; every non-annotated plane is sent exactly once
- ``done``: ``summary`` ({``method``, ``axis``, ``info``} for ``segment``, ``info`` with the
  per-slice ``quality`` and, for an update, ``edited`` and ``recomputed``; {``model``, ``path``}
  for ``download``)
- ``cancelled``
- ``error``: ``error_type``, ``error_module``, ``message``, ``traceback``, ``out_of_memory``
  (the GPU ran out of memory; the engine was released, a run on the CPU or at a smaller image
  size can follow), ``device_hint``
"""

from __future__ import annotations

import io
import json
import os
import queue
import shutil
import sys
import threading
from pathlib import Path
from typing import TextIO

import numpy as np

from .engine_session import (  # noqa: F401  (the Slicer client and tests import these from here)
    EngineFactory,
    EngineSession,
    PlaneEvents,
    dataclass_from_dict,
    default_engine_factory,
    is_out_of_memory,
    json_default,
)

PROTOCOL_VERSION = 2  # 2: segment requests may carry previous_job (a version-1 worker would ignore it)


class Server:
    """Runs the requests read from ``requests`` one at a time and writes events to ``events``.

    The calling thread runs the jobs; a reader thread takes the requests, so that ``cancel``
    reaches a job while it runs.
    """

    def __init__(self, events: TextIO, engine_factory: EngineFactory = default_engine_factory):
        self._out = events
        self._out_lock = threading.Lock()
        self.session = EngineSession(engine_factory)  # the engine, and the latest result an update starts from
        self._jobs: queue.Queue = queue.Queue()
        self._state_lock = threading.Lock()
        self._current_job = None
        self._current_cancel = None
        self._cancelled_early: set = set()  # jobs cancelled before they started
        self.client_gone = False  # requests ended without a shutdown: the client died or was killed
        self._request_folders: set = set()

    # ------------------------------------------------------------------------------------------

    def serve(self, requests: TextIO) -> None:
        """Say hello, then run jobs until ``shutdown`` or the end of ``requests``."""
        self.send({"event": "hello", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "python": sys.version.split()[0]})
        reader = threading.Thread(target=self._read, args=(requests,), name="oflsam2-worker-requests", daemon=True)
        reader.start()
        try:
            while True:
                request = self._jobs.get()
                if request is None:
                    return
                self._run(request)
        finally:  # also when the client is gone mid-run (BrokenPipeError)
            self.session.close()

    def send(self, event: dict) -> None:
        line = json.dumps(event, default=json_default)
        with self._out_lock:
            self._out.write(line + "\n")
            self._out.flush()

    # ------------------------------------------------------------------------------------------

    def _read(self, requests: TextIO) -> None:
        try:
            for line in requests:
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except ValueError:
                    request = None
                if not isinstance(request, dict):  # no job to answer: a client waiting on one is a bug there
                    print(f"oflsam2.worker: ignoring a malformed request: {line[:200]!r}", file=sys.stderr)
                    continue
                kind = request.get("type")  # a job of an unknown or missing type is answered with an error
                if kind == "cancel":
                    self._cancel(request.get("job"))
                elif kind == "shutdown":
                    break
                else:
                    if isinstance(request.get("folder"), str):
                        self._request_folders.add(request["folder"])
                    self._jobs.put(request)
            else:
                self.client_gone = True
        except (OSError, ValueError):  # the client's end was closed
            self.client_gone = True
        # End of input (the client quit, crashed or asked us to stop): stop the current job too.
        self._cancel(None)
        self._jobs.put(None)

    def remove_request_folders(self) -> None:
        """After the client died: remove the arrays it left for this worker (its ``job-*``
        folders, and their parent once empty), since no one else will."""
        for folder in map(Path, self._request_folders):
            if folder.name.startswith("job-"):
                shutil.rmtree(folder, ignore_errors=True)
                try:
                    folder.parent.rmdir()
                except OSError:  # not empty (another job's folder), or already gone
                    pass

    def _cancel(self, job) -> None:
        """Cancel ``job`` (``None``: whatever runs now)."""
        with self._state_lock:
            if job is None or job == self._current_job:
                if self._current_cancel is not None:
                    self._current_cancel.cancel()
            else:
                self._cancelled_early.add(job)

    def _run(self, request: dict) -> None:
        from .errors import Cancelled
        from .events import CancelToken

        job = request.get("job")
        token = CancelToken()
        with self._state_lock:
            self._current_job, self._current_cancel = job, token
            if job in self._cancelled_early:
                self._cancelled_early.discard(job)
                token.cancel()
        try:
            if token.is_cancelled():
                raise Cancelled()
            kind = request.get("type")
            if kind == "segment":
                summary = self._segment(job, request, token)
            elif kind == "download":
                summary = self._download(job, request, token)
            else:
                raise ValueError(f"Unknown request type {kind!r}: the worker (protocol {PROTOCOL_VERSION}) and the "
                                 "module are different versions.")
            self.send({"event": "done", "job": job, "summary": summary})
        except Cancelled:
            self.send({"event": "cancelled", "job": job})
        except Exception as exc:  # every failure goes back to the client; the worker lives on
            self._send_error(job, exc)
        finally:
            with self._state_lock:
                self._current_job = self._current_cancel = None

    def _send_error(self, job, exc: Exception) -> None:
        self.send(self.session.error_event(job, exc))

    def _segment(self, job, request: dict, token) -> dict:
        folder = Path(request["folder"])
        events = _FileEvents(self.send, job, token, folder)
        return self.session.segment(job, request, lambda name: load_array(folder, name), events)

    def _download(self, job, request: dict, token) -> dict:
        from . import checkpoints

        model = request["model"]

        def progress(done: int, total: int) -> None:
            mib = 1 << 20
            self.send({"event": "progress", "job": job, "stage": "downloading", "done": int(done), "total": int(total),
                       "text": f"{model}: {done / mib:.0f} of {total / mib:.0f} MiB"})

        path = checkpoints.download(model, progress, token)
        return {"model": model, "path": str(path)}


class _FileEvents(PlaneEvents):
    """Each finished plane as a ``.npy`` file in the request's folder, named in its event."""

    def __init__(self, send, job, token, folder: Path):
        super().__init__(send, job, token)
        self._folder = folder
        self._count = 0

    def deliver(self, plane: np.ndarray) -> dict:
        self._count += 1
        name = f"plane-{self._count:06d}.npy"
        try:
            np.save(self._folder / name, plane, allow_pickle=False)
        except OSError as exc:  # e.g. the temp disk filled up during the run
            raise OSError(exc.errno, f"Could not write a result plane into the temp folder {str(self._folder)!r}: "
                          f"{exc.strerror or exc}. Free space there, or set TMPDIR to a folder on a disk with room "
                          "and restart Slicer.") from exc
        return {"file": name}


def load_array(folder: Path, name: str) -> np.ndarray:
    """``folder/name`` as an array; ``name`` must be a plain file name (no path), never a pickle."""
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise ValueError(f"Array file names must be plain names inside the request folder; got {name!r}.")
    return np.load(Path(folder) / name, allow_pickle=False)


def main() -> int:
    from .worker_state import remove_stale_state_folders

    # The protocol owns the real stdout; anything else printed (libraries, C code) goes to stderr.
    events = io.TextIOWrapper(os.fdopen(os.dup(sys.stdout.fileno()), "wb"), encoding="utf-8", newline="\n")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    requests = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="\n")
    remove_stale_state_folders()  # left by workers that were killed
    server = Server(events)
    try:
        server.serve(requests)
    except BrokenPipeError:  # the client is gone
        server.client_gone = True
    if server.client_gone:
        server.remove_request_folders()
    return 0


if __name__ == "__main__":
    sys.exit(main())
