"""One persistent background thread that owns the SAM2 engine for the whole Slicer session.

The main thread submits jobs and drains each job's result queue (from a Qt timer, or by polling
in blocking mode). Nothing here imports ``slicer``, ``qt`` or ``vtk``: the thread only does numpy
and torch work on copies, and every scene change stays on the main thread.

Messages on ``Job.results``:

- ``("progress", stage, done, total, text)``
- ``("slice", label, axis, index, mask_uint8)`` -- a final 2-D mask, 0/1
- ``("done", summary)`` -- ``summary`` is a dict (see the job's ``execute``)
- ``("error", exc, traceback_text)`` -- :class:`GpuOutOfMemory` marks a recoverable OOM
- ``("cancelled",)``
"""

from __future__ import annotations

import gc
import logging
import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from oflsam2.errors import Cancelled, OFLSAM2Error

log = logging.getLogger(__name__)


class GpuOutOfMemory(OFLSAM2Error):
    """The GPU ran out of memory; the worker freed its caches and can run again."""

    def __init__(self, device_hint: str = ""):
        super().__init__(
            "The GPU ran out of memory"
            + (f" ({device_hint})" if device_hint else "")
            + ". The model and its caches were released. Run again on the CPU (Device: cpu), "
            "with a smaller image size (Advanced > Image size, e.g. 512), or with fewer segments at once."
        )


class SegmentEngine(Protocol):
    """What the worker needs from :class:`oflsam2.api.Engine` (tests pass a fake)."""

    def segment(self, image, supports, *, method, axis, preset, options, references, events):
        ...


EngineFactory = Callable[[object], SegmentEngine]  # ModelSettings -> engine


def default_engine_factory(settings) -> SegmentEngine:
    from oflsam2.api import Engine

    return Engine(settings)


def _owned(array: np.ndarray) -> np.ndarray:
    """The array itself if it owns its memory, else a copy: never hand the thread a view of a
    Slicer volume that the main thread may modify."""
    array = np.asarray(array)
    return array if array.flags.owndata and array.flags.c_contiguous else np.array(array, copy=True, order="C")


@dataclass
class SegmentRequest:
    """One ``Engine.segment`` call. Arrays are (z, y, x); the request takes ownership of them."""

    settings: object  # oflsam2.api.ModelSettings
    image: np.ndarray
    supports: list  # [oflsam2.api.LabelSupport]
    method: str = "ofl"
    axis: int = 0
    preset: str = "auto"
    options: object = None  # oflsam2.api.MethodOptions
    references: list = field(default_factory=list)  # [oflsam2.api.Reference]

    def __post_init__(self):
        self.image = _owned(self.image)
        for support in self.supports:
            support.mask = _owned(support.mask)
        for reference in self.references:
            reference.image = _owned(reference.image)
            reference.labels = _owned(reference.labels)

    def execute(self, worker: "Worker", job: "Job") -> dict:
        engine = worker.engine_for(self.settings)
        reported: dict[int, set[int]] = {s.label: set() for s in self.supports}
        events = _JobEvents(job, reported)
        result = engine.segment(
            self.image,
            self.supports,
            method=self.method,
            axis=self.axis,
            preset=self.preset,
            options=self.options,
            references=self.references,
            events=events,
        )
        self._report_missing(result, job, reported)
        return {"method": result.method, "axis": result.axis, "info": result.info}

    def _report_missing(self, result, job: "Job", reported: dict[int, set[int]]) -> None:
        """Send every final plane the method did not stream, so the caller's copy ends complete."""
        for support in self.supports:
            masks = result.masks.get(support.label)
            if masks is None:
                continue
            annotated = set(support.slices)
            for index in range(masks.shape[result.axis]):
                if index not in annotated and index not in reported[support.label]:
                    plane = np.take(masks, index, axis=result.axis)
                    job.put("slice", support.label, result.axis, index, _as_mask(plane))


@dataclass
class DownloadRequest:
    """Fetch a checkpoint of the manifest into the user cache (SHA256-verified by ``oflsam2.checkpoints``)."""

    model: str

    def execute(self, worker: "Worker", job: "Job") -> dict:
        from oflsam2 import checkpoints

        def progress(done: int, total: int) -> None:
            mib = 1 << 20
            job.put("progress", "downloading", int(done), int(total), f"{self.model}: {done / mib:.0f} of {total / mib:.0f} MiB")

        path = checkpoints.download(self.model, progress, job)
        return {"model": self.model, "path": str(path)}


def _as_mask(plane) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(plane) > 0, dtype=np.uint8)


class Job:
    """A handle on one submitted request: its result queue, cancel flag and completion."""

    def __init__(self, request):
        self.request = request
        self.results: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.finished = threading.Event()  # set after the final message was queued

    def put(self, *message) -> None:
        self.results.put(message)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def is_cancelled(self) -> bool:
        """The cancel flag in the shape ``oflsam2`` expects (a ``CancelToken``)."""
        return self._cancel.is_set()

    def messages(self):
        """Messages queued so far, without waiting."""
        while True:
            try:
                yield self.results.get_nowait()
            except queue.Empty:
                return


class _JobEvents:
    """:class:`oflsam2.events.RunEvents` that forwards to a job's queue."""

    def __init__(self, job: Job, reported: dict[int, set[int]]):
        self._job = job
        self._reported = reported

    def progress(self, stage, done, total, message=""):
        self._job.put("progress", stage, int(done), int(total), message)

    def slice_done(self, label, axis, index, mask):
        self._reported.setdefault(label, set()).add(int(index))
        self._job.put("slice", int(label), int(axis), int(index), _as_mask(mask))

    def is_cancelled(self):
        return self._job.is_cancelled()


class Worker:
    """A daemon thread running one job at a time; it keeps the last engine (and model) alive.

    ``engine_factory(settings)`` builds an engine; a new one is built only when the model
    settings change, so re-running on the same volume reuses the model and encoded slices.
    """

    def __init__(self, engine_factory: EngineFactory = default_engine_factory):
        self._engine_factory = engine_factory
        self._engine = None
        self._engine_settings = None
        self._jobs: queue.Queue = queue.Queue()
        # The run (of whichever logic: module, effect, console) this worker serves; one at a
        # time per session, since they share the model and may write to the same segmentation.
        self.active_run = None
        self._thread = threading.Thread(target=self._loop, name="OFLSAM2Worker", daemon=True)
        self._thread.start()

    def submit(self, request) -> Job:
        if not self._thread.is_alive():
            raise RuntimeError("The OFLSAM2 worker thread has stopped; reload the module or restart Slicer.")
        job = Job(request)
        self._jobs.put(job)
        return job

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the thread after the current job (cancel it first to stop sooner)."""
        self._jobs.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def engine_for(self, settings) -> SegmentEngine:
        if self._engine is None or settings != self._engine_settings:
            self.release_engine()
            self._engine = self._engine_factory(settings)
            self._engine_settings = settings
        return self._engine

    def release_engine(self) -> None:
        """Drop the model and its feature caches (after an OOM, or to free GPU memory)."""
        self._engine = None
        self._engine_settings = None
        gc.collect()
        _empty_cuda_cache()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run(job)

    def _run(self, job: Job) -> None:
        try:
            if job.cancel_requested:
                raise Cancelled()
            summary = job.request.execute(self, job)
            job.put("done", summary)
        except Cancelled:
            job.put("cancelled")
        except Exception as exc:  # every failure goes back to the main thread, never kills the thread
            if is_out_of_memory(exc):
                hint = _device_hint(self._engine_settings)
                self.release_engine()
                error = GpuOutOfMemory(hint)
                error.__cause__ = exc
                job.put("error", error, traceback.format_exc())
            else:
                log.debug("OFLSAM2 job failed", exc_info=True)
                job.put("error", exc, traceback.format_exc())
        finally:
            job.finished.set()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (and its CUDA alias) and "out of memory" runtime errors."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_hint(settings) -> str:
    device = getattr(settings, "device", "")
    size = getattr(settings, "image_size", "")
    return f"device {device}, image size {size}" if device else ""

