"""A run in progress on the main thread: the worker's messages applied to the scene.

:class:`Run` writes each finished plane into its segment and puts the segments back on cancel or
failure; :func:`drain` applies the queued messages within a time budget (called by a
:class:`Pump`, by the blocking wait, or by tests); :class:`SceneWatch` cancels the run when its
nodes leave the scene.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Protocol

import numpy as np
import slicer
import vtk

from . import mrml_read, mrml_undo
from .run_plan import RunPlan, ignored_stroke_warnings
from .worker import MessageKind, Worker

log = logging.getLogger(__name__)

POLL_SECONDS = 0.03  # blocking mode: worker wait between two rounds of Slicer event processing
DRAIN_SECONDS = 0.03  # one timer tick applies messages for about this long at most: bursts never stall the GUI

ProgressCallback = Callable[[str, int, int, str], None]  # (stage, done, total, text)


class Pump(Protocol):
    """Calls ``step`` repeatedly on the main thread until it returns True."""

    def start(self, step: Callable[[], bool]) -> None:
        ...


class QtTimerPump:
    """The Slicer pump: a ``qt.QTimer`` created lazily on the main thread, firing every 100 ms."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self._timer = None
        self._step = None

    def start(self, step: Callable[[], bool]) -> None:
        if self._timer is None:
            import qt

            self._timer = qt.QTimer()
            self._timer.setInterval(self.interval_ms)
            self._timer.timeout.connect(self._tick)
        self._step = step
        self._timer.start()

    def _tick(self) -> None:
        # Stopped while the step runs: a step may open a modal dialog (an error message), whose
        # event loop would otherwise re-enter this tick.
        step = self._step
        self._timer.stop()
        if step is None:
            return
        finished = step()
        if self._step is step:  # not replaced by a run started meanwhile
            if finished:
                self._step = None
            else:
                self._timer.start()


class SliceWriter(Protocol):
    def write(self, segment_id: str, axis: int, index: int, plane: np.ndarray) -> None:
        ...



class Run:
    """A run in progress (returned by ``process(..., waitForCompletion=False)``).

    ``state`` goes ``running`` -> ``completed`` | ``cancelled`` | ``failed``; ``summary`` and
    ``error`` hold the outcome. Call :meth:`cancel` to stop: the target segments are restored.
    """

    def __init__(self, plan: RunPlan, steps: list, worker: Worker, writer: SliceWriter,
                 snapshot: mrml_undo.SegmentSnapshot, progress: ProgressCallback | None, on_end: Callable,
                 edits: mrml_undo.EditWatch | None = None):
        self.plan = plan
        self.edits = edits  # the user's edits since the run started (the run's own writes excluded)
        self.state = "running"
        self.summary: dict | None = None
        self.error: BaseException | None = None
        self.traceback_text = ""
        self.cancel_reason = ""
        self._steps = list(steps)
        self._worker = worker
        self._writer = writer
        self._snapshot = snapshot
        self._progress = progress
        self._on_end = on_end
        self._segment_of_label = {t.label: t.segment_id for t in plan.targets}
        self._written = {t.segment_id: 0 for t in plan.targets}
        self._outside = {t.segment_id: 0 for t in plan.targets}  # planes outside the segment's grid, not written
        self._accepting = True  # False once the target nodes are gone: queued slices are dropped
        self._segmentation_alive = True
        self._started = time.perf_counter()
        self.result_job: int | None = None  # the worker job whose result an update can start from
        self.result_masks: dict | None = None  # segment id -> bool (z, y, x): the targets right after the run
        self.job = worker.submit(self._steps.pop(0))

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def restored(self) -> bool:
        """After a cancel or failure: whether the target segments were put back (False when
        the segmentation left the scene)."""
        return self.state in ("cancelled", "failed") and self._segmentation_alive

    def cancel(self, reason: str = "Cancelled by the user.") -> None:
        if not self.finished:
            self.cancel_reason = self.cancel_reason or reason
            self.job.cancel()

    def abandon(self, reason: str, segmentation_gone: bool) -> None:
        """The volume or segmentation is leaving the scene: stop writing and cancel."""
        self._accepting = False
        self._segmentation_alive = self._segmentation_alive and not segmentation_gone
        self.cancel(reason)

    def handle(self, message: tuple) -> None:
        """Apply one worker message on the main thread."""
        kind = message[0]
        if kind == MessageKind.PROGRESS:
            self._report(*message[1:])
        elif kind == MessageKind.SLICE:
            self._write(*message[1:])
        elif kind == MessageKind.DONE:
            self._step_done(message[1])
        elif kind == MessageKind.CANCELLED:
            self._end("cancelled", restore=True)
        elif kind == MessageKind.ERROR:
            self.error, self.traceback_text = message[1], message[2]
            self._end("failed", restore=True)

    def _write(self, label: int, axis: int, index: int, plane: np.ndarray) -> None:
        segment_id = self._segment_of_label.get(label)
        if not self._accepting or segment_id is None or self.job.cancel_requested:
            return
        try:
            with self._own_changes():
                self._snapshot.record_plane(segment_id, axis, index, plane)  # before writing: a half-done write is undone too
                wrote = self._writer.write(segment_id, axis, index, plane)
        except Exception as exc:  # a failed write ends the run; the snapshot puts things back
            self.error, self.traceback_text = exc, ""
            self.job.cancel()
            self._accepting = False
            return
        if wrote is False:  # the plane lies outside the segmentation's grid
            self._outside[segment_id] += 1
        else:
            self._written[segment_id] += 1

    def _step_done(self, summary: dict) -> None:
        if self.error is not None:  # a slice write failed after the engine finished
            self._end("failed", restore=True)
            return
        if self.job.cancel_requested:  # cancelled while the last slices were being written
            self._end("cancelled", restore=True)
            return
        if self._steps:  # the checkpoint is in the cache now: start segmenting
            self.job = self._worker.submit(self._steps.pop(0))
            return
        plan = self.plan
        engine_info = summary.get("info", {})
        self.summary = {
            "method": plan.config.method,
            "model": engine_info.get("model", plan.config.settings.model),  # the engine's word for what it ran
            "axis": plan.axis,
            "axisName": plan.axis_name,
            "seconds": time.perf_counter() - self._started,
            "segments": {
                t.segment_id: {"name": t.name, "annotated": list(t.slices), "written": self._written[t.segment_id],
                               "ignoredStrokeAxes": list(t.ignored_axes)}
                for t in plan.targets
            },
            "warnings": plan.warnings + ignored_stroke_warnings(plan.targets) + self._outside_warnings(),
            "engine": engine_info,
        }
        recomputed = self.summary["engine"].get("recomputed")
        if recomputed is not None:  # an update: JSON made the label keys strings
            for t in plan.targets:
                self.summary["segments"][t.segment_id]["recomputed"] = list(recomputed.get(str(t.label), recomputed.get(t.label, [])))
        self.result_job = self.job.id
        try:  # what the run left, so that the next Update can tell the user's corrections from it
            self.result_masks = mrml_read.segment_masks(plan.segmentation_node, [t.segment_id for t in plan.targets],
                                                      plan.volume_node)
        except Exception:
            log.exception("OFLSAM2: could not read the segments after the run; Update will not be offered")
        self._end("completed", restore=False)

    def _end(self, state: str, restore: bool) -> None:
        if self.finished:
            return
        if state == "cancelled" and self.error is not None:
            state = "failed"  # cancelled by us after a failed write
        if restore and self._segmentation_alive:
            try:
                with self._own_changes():
                    self._snapshot.restore()
            except Exception:
                log.exception("OFLSAM2: could not restore the segments after the run ended")
        elif self._segmentation_alive:
            self._snapshot.restore_statuses()
        self.state = state
        if state == "cancelled" and not self.cancel_reason:
            self.cancel_reason = "Cancelled by the user."
        # The run stays reachable (logic.lastRun) after it ends: let go of the volume copies.
        self.plan.request = self.job.request = self._snapshot = None
        self._steps = []
        self._on_end(self)
        restored = " The segments were restored." if self._segmentation_alive else ""
        if state == "completed":
            text = (f"Done: {sum(self._written.values())} slices written along the {self.plan.axis_name} axis "
                    f"with {self.summary['model']}.")
        else:
            text = self.cancel_reason + restored if state == "cancelled" else f"Failed: {self.error}{restored}"
        self._report(state, 1, 1, text)

    def _outside_warnings(self) -> list[str]:
        return [f"{count} planes of segment {self.plan.targets[n].name!r} have no voxel in the segmentation's geometry "
                "(it does not cover them, or its slices are thicker than the volume's) and were not written. To keep "
                "every plane, set the segmentation's geometry from the volume (Segment Editor: Specify geometry) and "
                "run again." for n, count in enumerate(self._outside.values()) if count]

    @property
    def changed_segmentation(self) -> bool:
        """Whether the run left the segmentation changed (completed with at least one plane written)."""
        return self.state == "completed" and any(self._written.values())

    def _own_changes(self):
        return self.edits.own_changes() if self.edits is not None else contextlib.nullcontext()

    def _report(self, stage: str, done: int, total: int, text: str = "") -> None:
        if self._progress is not None:
            try:
                self._progress(stage, done, total, text)
            except Exception:
                log.exception("OFLSAM2: the progress callback failed")


def drain(run: Run, budget_seconds: float = DRAIN_SECONDS, clock: Callable[[], float] = time.monotonic) -> bool:
    """Apply the worker's queued messages to the scene; True once the run has ended.

    Plain function (no Qt): the Slicer timer calls it every 100 ms, blocking mode after each
    wait, tests directly. Slice writes are grouped under one render pause. At least one message
    is applied, then more until ``budget_seconds`` have passed (by ``clock``): the rest waits
    for the next tick, so a burst of planes (a plane costs milliseconds to write on a large
    volume) never holds Slicer's main thread for long.
    """
    deadline = clock() + budget_seconds
    with _render_blocker():
        for message in run.job.messages():
            run.handle(message)
            if run.finished or clock() >= deadline:
                break
    job = run.job
    if not run.finished and job.finished.is_set() and job.results.empty():  # ended without a final message
        run.handle((MessageKind.ERROR, RuntimeError("The OFLSAM2 worker stopped without reporting an outcome; "
                                                    "the next run starts a new worker."), ""))
    return run.finished


def _render_blocker():
    """``slicer.util.RenderBlocker`` inside the Slicer application; nothing elsewhere."""
    if hasattr(slicer, "app") and hasattr(slicer.util, "RenderBlocker"):
        return slicer.util.RenderBlocker()
    return contextlib.nullcontext()



class SceneWatch:
    """Cancels a run when its volume or segmentation is removed or the scene is closed."""

    def __init__(self, run: Run, scene):
        self.scene = scene
        self.run = run
        self._volume = run.plan.volume_node
        self._segmentation = run.plan.segmentation_node

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_removed(caller, event, node):
            if node is self._segmentation or node is self._volume:
                gone = node is self._segmentation
                self.run.abandon(f"{node.GetName()!r} was removed from the scene during the run.", segmentation_gone=gone)

        def on_close(caller, event):
            self.run.abandon("The scene was closed during the run.", segmentation_gone=True)

        self._callbacks = (on_node_removed, on_close)  # keep the wrapped callables alive
        self._tags = [
            scene.AddObserver(slicer.vtkMRMLScene.NodeAboutToBeRemovedEvent, on_node_removed),
            scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, on_close),
        ]

    def stop(self) -> None:
        for tag in self._tags:
            self.scene.RemoveObserver(tag)
        self._tags = []

