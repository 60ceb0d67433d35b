"""The engine in a worker process: ``python -m oflsam2.worker [--root FOLDER]``.

Slicer (or any client) starts this once per session and keeps it: the process owns one
:class:`~oflsam2.api.Engine`, so the model and the features of the last volumes stay loaded
across runs. It imports no ``slicer``, ``qt`` or ``vtk``.

Protocol (``PROTOCOL_VERSION``): one JSON object per line, requests on stdin, events on stdout.
Arrays never travel in the JSON: they are ``.npy`` files in a folder the client created for the
request, loaded with ``allow_pickle=False``. That folder must lie inside the worker's *root*:
the private folder the client names with ``--root`` (Slicer's client makes one, mode 0700, per
worker), or else a temporary folder the worker makes itself (removed when it exits); ``hello``
says which. Every request is checked against the schema of :mod:`oflsam2.protocol` before it is
used; a request that fails (malformed, too long or too deep, not UTF-8, a folder or file outside
the root) gets an ``error`` event (for its job when its id could be read, else ``job: null``)
and the worker goes on serving.

Requests (``type``):

- ``segment``: ``job``, ``folder``, ``settings`` (:class:`ModelSettings` fields), ``options``
  (:class:`MethodOptions` fields), ``method``, ``axis``, ``preset``, ``image`` (file name),
  ``supports`` [{``label``, ``name``, ``slices``, ``mask`` (file name)}], ``references``
  [{``name``, ``image``, ``labels``}], optional ``previous_job``: update the result of that
  earlier ``segment`` job of this process after corrections (``Engine.segment(previous=...)``);
  only the slices it recomputes are sent. The process keeps the result of its latest segment
  job (for ``ofl`` also its trained head, in a private folder, which an update warm-starts);
  an update of any other job is refused (``InputError``: run a fresh segmentation). The job
  itself is run by :class:`~oflsam2.engine_session.EngineSession`, shared with the server.
  ``options.adapter``, ``options.save_adapter`` and ``settings.checkpoint`` are the user's own
  files, chosen in the client, and are not confined to the root
- ``download``: ``job``, ``model`` -- fetch a checkpoint into the user cache
- ``cancel``: ``job`` -- checked between encode batches, training epochs and slices
- ``shutdown`` (or end of stdin): stop after cancelling the current job; at the end of stdin
  without ``shutdown`` (the client died) also remove the request folders it was given inside
  the root (and the root once empty). SIGTERM stops it the same way, keeping the client's files.
  Nothing outside the root, and nothing it was not given, is ever removed, except the worker's
  own private folder

Events (``event``), each with the ``job`` it belongs to except ``hello``:

- ``hello``: ``protocol``, ``pid``, ``python``, ``root`` -- sent once at start
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

import argparse
import io
import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from . import protocol
from .engine_session import (  # noqa: F401  (the Slicer client and tests import these from here)
    EngineFactory,
    EngineSession,
    PlaneEvents,
    dataclass_from_dict,
    default_engine_factory,
    is_out_of_memory,
    json_default,
)
from .errors import ProtocolError

PROTOCOL_VERSION = 3  # 3: request folders must lie inside the worker's root (--root, or its own; hello names it)

EARLY_CANCELS_KEPT = 1024  # cancels of jobs not started yet that are remembered (a flood cannot grow memory)


class Server:
    """Runs the requests read from ``requests`` one at a time and writes events to ``events``.

    The calling thread runs the jobs; a reader thread takes the requests, so that ``cancel``
    reaches a job while it runs. ``root``: the folder every request folder must lie in (it
    must exist); ``None``: a private temporary folder made by :meth:`serve` and removed after.
    """

    def __init__(self, events: TextIO, engine_factory: EngineFactory = default_engine_factory, root=None):
        self._out = events
        self._out_lock = threading.Lock()
        self.session = EngineSession(engine_factory)  # the engine, and the latest result an update starts from
        self._jobs: queue.Queue = queue.Queue()
        self._state_lock = threading.Lock()
        self._current_job = None
        self._current_cancel = None
        self._cancelled_early: dict = {}  # jobs cancelled before they started (an ordered set)
        self.client_gone = False  # requests ended without a shutdown: the client died or was killed
        self._request_folders: set = set()  # resolved folders inside the root that accepted requests named
        self._stopping = False  # a shutdown request was read
        self._given_root = root is not None
        self.root: Path | None = Path(os.path.realpath(root)) if root is not None else None

    # ------------------------------------------------------------------------------------------

    def serve(self, requests: BinaryIO) -> None:
        """Say hello, then run jobs until ``shutdown`` or the end of ``requests`` (bytes)."""
        if self.root is None:
            self.root = Path(os.path.realpath(tempfile.mkdtemp(prefix="oflsam2-worker-root-")))
        try:
            self.send({"event": "hello", "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                       "python": sys.version.split()[0], "root": str(self.root)})
            reader = threading.Thread(target=self._read, args=(requests,), name="oflsam2-worker-requests", daemon=True)
            reader.start()
            while True:
                request = self._jobs.get()
                if request is None:
                    return
                self._run(request)
        finally:  # also when the client is gone mid-run (BrokenPipeError) or on SIGTERM
            self.remove_private_folders()

    def send(self, event: dict) -> None:
        line = json.dumps(event, default=json_default)
        with self._out_lock:
            self._out.write(line + "\n")
            self._out.flush()

    # ------------------------------------------------------------------------------------------

    def _read(self, requests: BinaryIO) -> None:
        try:
            for line in request_lines(requests):
                if line.strip():
                    self._accept(line)
                    if self._stopping:
                        break
            else:
                self.client_gone = True
        except (OSError, ValueError):  # the client's end was closed
            self.client_gone = True
        # End of input (the client quit, crashed or asked us to stop): stop the current job too.
        self._cancel(None)
        self._jobs.put(None)

    def _accept(self, line: bytes) -> None:
        """Check one request line and act on it; a bad one is answered with an error event."""
        try:
            request = protocol.parse_request(line, PROTOCOL_VERSION)
            kind = request["type"]
            if kind == "cancel":
                self._cancel(request["job"])
            elif kind == "shutdown":
                self._stopping = True
            else:
                if kind == "segment":
                    request["folder"] = str(self.request_folder(request["folder"], request["job"]))
                    self._request_folders.add(request["folder"])
                self._jobs.put(request)
        except ProtocolError as exc:
            print(f"oflsam2.worker: refused a request: {exc}", file=sys.stderr)
            self._send_error(exc.job, exc, with_traceback=False)
        except Exception as exc:  # a bug here must not stop the reader: the worker would never hear from the client again
            self._send_error(None, exc)

    def request_folder(self, folder: str, job=None) -> Path:
        """``folder`` resolved (links and ``..``), refused unless it is a folder strictly inside the root."""
        resolved = os.path.realpath(folder)
        if not protocol.inside_root(resolved, str(self.root)):
            raise ProtocolError(f"The request folder {folder!r} is not inside the worker's folder {str(self.root)!r}; "
                                "it was refused.", job=job)
        if not os.path.isdir(resolved):
            raise ProtocolError(f"The request folder {folder!r} does not exist (or is not a folder).", job=job)
        return Path(resolved)

    def remove_request_folders(self) -> None:
        """After the client died: remove the arrays it left for this worker (the request folders
        inside the root that accepted requests named, and a root it was given once empty),
        since no one else will."""
        for folder in self._request_folders:
            if protocol.inside_root(os.path.realpath(folder), str(self.root)):  # still the folder it was
                shutil.rmtree(folder, ignore_errors=True)
        if self._given_root:
            try:
                self.root.rmdir()
            except OSError:  # not empty (files of the client's), or already gone
                pass

    def remove_private_folders(self) -> None:
        """The folders this worker made itself: its state (the trained head) and its own root."""
        self.session.close()
        if not self._given_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cancel(self, job) -> None:
        """Cancel ``job`` (``None``: whatever runs now)."""
        with self._state_lock:
            if job is None or job == self._current_job:
                if self._current_cancel is not None:
                    self._current_cancel.cancel()
            else:
                self._cancelled_early[job] = None
                while len(self._cancelled_early) > EARLY_CANCELS_KEPT:
                    del self._cancelled_early[next(iter(self._cancelled_early))]

    def _run(self, request: dict) -> None:
        from .errors import Cancelled
        from .events import CancelToken

        job = request["job"]
        token = CancelToken()
        with self._state_lock:
            self._current_job, self._current_cancel = job, token
            if job in self._cancelled_early:
                del self._cancelled_early[job]
                token.cancel()
        try:
            if token.is_cancelled():
                raise Cancelled()
            if request["type"] == "segment":
                summary = self._segment(job, request, token)
            else:
                summary = self._download(job, request, token)
            self.send({"event": "done", "job": job, "summary": summary})
        except Cancelled:
            self.send({"event": "cancelled", "job": job})
        except Exception as exc:  # every failure goes back to the client; the worker lives on
            self._send_error(job, exc)
        finally:
            with self._state_lock:
                self._current_job = self._current_cancel = None

    def _send_error(self, job, exc: Exception, with_traceback: bool = True) -> None:
        self.send(self.session.error_event(job, exc, with_traceback))

    def _segment(self, job, request: dict, token) -> dict:
        folder = self.request_folder(request["folder"], job)  # again: it may have been replaced since it was read
        events = _FileEvents(self.send, job, token, folder)
        return self.session.segment(job, request, lambda name: load_array(folder, name, root=self.root), events)

    def _download(self, job, request: dict, token) -> dict:
        from . import checkpoints

        model = request["model"]

        def progress(done: int, total: int) -> None:
            mib = 1 << 20
            self.send({"event": "progress", "job": job, "stage": "downloading", "done": int(done), "total": int(total),
                       "text": f"{model}: {done / mib:.0f} of {total / mib:.0f} MiB"})

        path = checkpoints.download(model, progress, token)
        return {"model": model, "path": str(path)}


def request_lines(stream: BinaryIO):
    """The lines of ``stream`` as bytes, each read with a bound: a line longer than
    :data:`protocol.MAX_LINE_BYTES` is consumed to its end and given as ``b"\\0" * (MAX + 1)``
    (too long, whatever it held), so no line can fill the worker's memory."""
    stream = getattr(stream, "buffer", stream)  # a text stream: read its bytes (bad UTF-8 is a bad request, not the end)
    limit = protocol.MAX_LINE_BYTES
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit:
            while not line.endswith(b"\n"):
                line = stream.readline(limit)
                if not line:
                    break
            yield b"\0" * (limit + 1)
        else:
            yield line


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


def load_array(folder: Path, name: str, root=None) -> np.ndarray:
    """``folder/name`` as an array; ``name`` must be a plain file name (no path), never a pickle.
    With ``root``, the file (links resolved) must lie inside it."""
    if not protocol.is_file_name(name):
        raise ValueError(f"Array file names must be plain names inside the request folder; got {name!r}.")
    path = Path(folder) / name
    if root is not None and not protocol.inside_root(os.path.realpath(path), os.path.realpath(root)):
        raise ProtocolError(f"The array file {str(path)!r} leads outside the worker's folder {str(root)!r}; it was refused.")
    return np.load(path, allow_pickle=False)


class _Terminated(SystemExit):
    """SIGTERM (a supervisor stopping the worker): unwinds like an exit, so the worker's private
    folders are removed on the way out."""


def _terminate(signum, frame):
    raise _Terminated(128 + signum)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oflsam2.worker", description="The OFLSAM2 engine worker (JSON lines on stdin/stdout).")
    parser.add_argument("--root", help="the folder every request folder must lie in (default: a private temporary folder)")
    args = parser.parse_args(argv)
    if args.root is not None and not os.path.isdir(args.root):
        print(f"oflsam2.worker: the root folder {args.root!r} does not exist or is not a folder.", file=sys.stderr)
        return 2
    from .worker_state import remove_stale_state_folders

    # The protocol owns the real stdout; anything else printed (libraries, C code) goes to stderr.
    events = io.TextIOWrapper(os.fdopen(os.dup(sys.stdout.fileno()), "wb"), encoding="utf-8", newline="\n")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    remove_stale_state_folders()  # left by workers that were killed
    server = Server(events, root=args.root)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)
    try:
        server.serve(sys.stdin.buffer)
    except BrokenPipeError:  # the client is gone
        server.client_gone = True
    except BaseException as exc:  # SIGTERM, Ctrl+C or a bug; serve removed the private folders on its way out
        if not isinstance(exc, (_Terminated, KeyboardInterrupt)):
            traceback.print_exc()
        sys.stderr.flush()
        # Not a normal exit: the request reader still blocks in stdin, and the interpreter's
        # shutdown would abort on its lock.
        os._exit(exc.code if isinstance(exc, _Terminated) else 130 if isinstance(exc, KeyboardInterrupt) else 1)
    if server.client_gone:
        server.remove_request_folders()
    return 0


if __name__ == "__main__":
    sys.exit(main())
