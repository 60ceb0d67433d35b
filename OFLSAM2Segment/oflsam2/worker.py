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
  an update of any other job is refused (``InputError``: run a fresh segmentation).
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
import dataclasses
import gc
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
from typing import BinaryIO, Callable, TextIO

import numpy as np

from . import protocol
from .errors import ProtocolError

PROTOCOL_VERSION = 3  # 3: request folders must lie inside the worker's root (--root, or its own; hello names it)

EngineFactory = Callable[[object], object]  # ModelSettings -> an Engine-like object with segment()
EARLY_CANCELS_KEPT = 1024  # cancels of jobs not started yet that are remembered (a flood cannot grow memory)


def default_engine_factory(settings):
    from .api import Engine

    return Engine(settings)


class Server:
    """Runs the requests read from ``requests`` one at a time and writes events to ``events``.

    The calling thread runs the jobs; a reader thread takes the requests, so that ``cancel``
    reaches a job while it runs. ``root``: the folder every request folder must lie in (it
    must exist); ``None``: a private temporary folder made by :meth:`serve` and removed after.
    """

    def __init__(self, events: TextIO, engine_factory: EngineFactory = default_engine_factory, root=None):
        self._out = events
        self._out_lock = threading.Lock()
        self._engine_factory = engine_factory
        self._engine = None
        self._engine_settings = None
        self._kept: tuple | None = None  # (job, SegmentResult, OFL-SAM2 adapter folder or None) of the latest segment job, for an update
        self._state: Path | None = None  # private folder of this process: the OFL-SAM2 head an update warm-starts
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
        line = json.dumps(event, default=_json_default)
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
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)
            self._state = None
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
        out_of_memory = is_out_of_memory(exc)
        hint = ""
        if out_of_memory:
            hint = _device_hint(self._engine_settings)
            self.release_engine()
        self.send({
            "event": "error", "job": job, "error_type": type(exc).__name__, "error_module": type(exc).__module__,
            "message": str(exc), "traceback": traceback.format_exc() if with_traceback else "",
            "out_of_memory": out_of_memory, "device_hint": hint,
        })

    def _segment(self, job, request: dict, token) -> dict:
        from .settings import LabelSupport, MethodOptions, ModelSettings, Reference

        folder = self.request_folder(request["folder"], job)  # again: it may have been replaced since it was read

        def array(name):
            return load_array(folder, name, root=self.root)

        settings = dataclass_from_dict(ModelSettings, request["settings"])
        options = dataclass_from_dict(MethodOptions, request["options"])
        image = array(request["image"])
        supports = [LabelSupport(s["label"], s["name"], array(s["mask"]), s["slices"]) for s in request["supports"]]
        references = [Reference(array(r["image"]), array(r["labels"]), name=r["name"]) for r in request["references"]]
        update = {}
        if request.get("previous_job") is not None:
            from .errors import InputError

            if self._kept is None or self._kept[0] != request["previous_job"]:
                raise InputError("The worker no longer holds the result of that run (it was restarted, or another run "
                                 "came after it); run a fresh segmentation instead of an update.")
            update["previous"] = self._kept[1]
        ofl = request["method"] == "ofl"
        if ofl and update and self._kept[2]:  # warm-start the head the previous run trained, not a new one
            options = dataclasses.replace(options, adapter=self._kept[2])
        if ofl and options.save_adapter is None:  # keep this run's head for the next update
            if self._state is None:
                from .worker_state import new_state_folder

                self._state = new_state_folder()
            options = dataclasses.replace(options, save_adapter=str(self._state / "adapter"))
        events = _StreamEvents(self, job, folder, token)
        engine = self.engine_for(settings)
        result = engine.segment(image, supports, method=request["method"], axis=request["axis"],
                                preset=request["preset"], options=options, references=references, events=events,
                                **update)
        self._kept = (job, result, options.save_adapter if ofl else None)
        # Every plane the method did not stream (e.g. the ones it finished together at the end),
        # so that the client's copy ends complete.
        for support in supports:
            masks = result.masks.get(support.label)
            if masks is None:
                continue
            annotated = set(support.slices)
            planes = range(masks.shape[result.axis])
            if update:  # the rest keeps the previous result, which the client already has
                planes = result.info.get("recomputed", {}).get(support.label, [])
            for index in planes:
                if index not in annotated and index not in events.sent.get(support.label, ()):
                    events.slice_done(support.label, result.axis, index, np.take(masks, index, axis=result.axis))
        return {"method": result.method, "axis": result.axis, "info": result.info}

    def _download(self, job, request: dict, token) -> dict:
        from . import checkpoints

        model = request["model"]

        def progress(done: int, total: int) -> None:
            mib = 1 << 20
            self.send({"event": "progress", "job": job, "stage": "downloading", "done": int(done), "total": int(total),
                       "text": f"{model}: {done / mib:.0f} of {total / mib:.0f} MiB"})

        path = checkpoints.download(model, progress, token)
        return {"model": model, "path": str(path)}

    # ------------------------------------------------------------------------------------------

    def engine_for(self, settings):
        """The engine of ``settings``: kept while the settings stay the same, so a second run on
        the same volume reuses the model and its encoded slices."""
        if self._engine is None or settings != self._engine_settings:
            self.release_engine()
            self._engine = self._engine_factory(settings)
            self._engine_settings = settings
        return self._engine

    def release_engine(self) -> None:
        """Drop the model and its feature caches (after an out-of-memory error)."""
        self._engine = None
        self._engine_settings = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


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


class _StreamEvents:
    """:class:`oflsam2.events.RunEvents` that sends each event at once (planes as files)."""

    def __init__(self, server: Server, job, folder: Path, token):
        self._server = server
        self._job = job
        self._folder = folder
        self._token = token
        self._count = 0
        self.sent: dict[int, set[int]] = {}

    def progress(self, stage, done, total, message=""):
        self._server.send({"event": "progress", "job": self._job, "stage": stage, "done": int(done), "total": int(total),
                           "text": message})

    def slice_done(self, label, axis, index, mask):
        self._count += 1
        name = f"plane-{self._count:06d}.npy"
        try:
            np.save(self._folder / name, np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8), allow_pickle=False)
        except OSError as exc:  # e.g. the temp disk filled up during the run
            raise OSError(exc.errno, f"Could not write a result plane into the temp folder {str(self._folder)!r}: "
                          f"{exc.strerror or exc}. Free space there, or set TMPDIR to a folder on a disk with room "
                          "and restart Slicer.") from exc
        self.sent.setdefault(int(label), set()).add(int(index))
        self._server.send({"event": "slice", "job": self._job, "label": int(label), "axis": int(axis), "index": int(index),
                           "file": name})

    def is_cancelled(self):
        return self._token.is_cancelled()


def load_array(folder: Path, name: str, root=None) -> np.ndarray:
    """``folder/name`` as an array; ``name`` must be a plain file name (no path), never a pickle.
    With ``root``, the file (links resolved) must lie inside it."""
    if not protocol.is_file_name(name):
        raise ValueError(f"Array file names must be plain names inside the request folder; got {name!r}.")
    path = Path(folder) / name
    if root is not None and not protocol.inside_root(os.path.realpath(path), os.path.realpath(root)):
        raise ProtocolError(f"The array file {str(path)!r} leads outside the worker's folder {str(root)!r}; it was refused.")
    return np.load(path, allow_pickle=False)


def dataclass_from_dict(cls, values: dict):
    """``cls(**values)`` for a settings dataclass sent as JSON (lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ProtocolError(f"{cls.__name__} has no field(s) {unknown}: the worker and the module are different versions.")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (and its CUDA alias) and "out of memory" runtime errors."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def _device_hint(settings) -> str:
    device = getattr(settings, "device", "")
    size = getattr(settings, "image_size", "")
    return f"device {device}, image size {size}" if device else ""


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


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
