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
  an update of any other job is refused (``InputError``: run a fresh segmentation)
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

import dataclasses
import gc
import io
import json
import os
import queue
import shutil
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, TextIO

import numpy as np

PROTOCOL_VERSION = 2  # 2: segment requests may carry previous_job (a version-1 worker would ignore it)

EngineFactory = Callable[[object], object]  # ModelSettings -> an Engine-like object with segment()


def default_engine_factory(settings):
    from .api import Engine

    return Engine(settings)


class Server:
    """Runs the requests read from ``requests`` one at a time and writes events to ``events``.

    The calling thread runs the jobs; a reader thread takes the requests, so that ``cancel``
    reaches a job while it runs.
    """

    def __init__(self, events: TextIO, engine_factory: EngineFactory = default_engine_factory):
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
            if self._state is not None:
                shutil.rmtree(self._state, ignore_errors=True)

    def send(self, event: dict) -> None:
        line = json.dumps(event, default=_json_default)
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
        out_of_memory = is_out_of_memory(exc)
        hint = ""
        if out_of_memory:
            hint = _device_hint(self._engine_settings)
            self.release_engine()
        self.send({
            "event": "error", "job": job, "error_type": type(exc).__name__, "error_module": type(exc).__module__,
            "message": str(exc), "traceback": traceback.format_exc(), "out_of_memory": out_of_memory,
            "device_hint": hint,
        })

    def _segment(self, job, request: dict, token) -> dict:
        from .settings import LabelSupport, MethodOptions, ModelSettings, Reference

        folder = Path(request["folder"])
        settings = dataclass_from_dict(ModelSettings, request["settings"])
        options = dataclass_from_dict(MethodOptions, request["options"])
        image = load_array(folder, request["image"])
        supports = [
            LabelSupport(int(s["label"]), s["name"], load_array(folder, s["mask"]), [int(i) for i in s["slices"]])
            for s in request["supports"]
        ]
        references = [
            Reference(load_array(folder, r["image"]), load_array(folder, r["labels"]), name=r["name"])
            for r in request.get("references", [])
        ]
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
        result = engine.segment(image, supports, method=request["method"], axis=int(request["axis"]),
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


def load_array(folder: Path, name: str) -> np.ndarray:
    """``folder/name`` as an array; ``name`` must be a plain file name (no path), never a pickle."""
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise ValueError(f"Array file names must be plain names inside the request folder; got {name!r}.")
    return np.load(Path(folder) / name, allow_pickle=False)


def dataclass_from_dict(cls, values: dict):
    """``cls(**values)`` for a settings dataclass sent as JSON (lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}: the worker and the module are different versions.")
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
