"""Run logic shared by the module GUI, the Segment Editor effect, the Python console and tests.

One entry point, :meth:`OFLSAM2Logic.process`, reads the volume and the annotated slices of the
selected segments on the main thread, hands numpy copies to the persistent worker process
(:mod:`.worker`: ``python -m oflsam2.worker``, started on the first run and kept for the
session), and writes every finished slice into the user's segments as it arrives:

- ``waitForCompletion=True`` (console, batch, tests): waits with ``event.wait(0.03)`` and lets
  Slicer process its events in between, then returns a summary or raises;
- ``waitForCompletion=False`` (GUI): returns a :class:`Run` at once; a pump (a ``qt.QTimer`` in
  Slicer) calls :func:`drain` every 100 ms on the main thread.

Console example::

    logic = slicer.util.getModuleLogic("OFLSAM2Segment")
    summary = logic.process(volumeNode, segmentationNode, ["Segment_1"], method="ofl", device="cuda")
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import slicer
import vtk

from oflsam2.api import LabelSupport, Reference, validate_run
from oflsam2.errors import Cancelled, CheckpointError, InputError

from . import compute, mrml_io
from .options import RunConfig, check_outputs, needs_download, parse_options, read_adapters, snake_case
from .worker import DownloadRequest, GpuOutOfMemory, MessageKind, SegmentRequest, Worker

log = logging.getLogger(__name__)

POLL_SECONDS = 0.03  # blocking mode: worker wait between two rounds of Slicer event processing
SHUTDOWN_WAIT_SECONDS = 5.0  # a run stopped by a shutdown: how long past the cancel's grace kill it may take to end
DRAIN_SECONDS = 0.03  # one timer tick applies messages for about this long at most: bursts never stall the GUI
TERMINAL_STAGES = ("completed", "cancelled", "failed")

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


@dataclass
class SegmentTarget:
    """One segment of a run: the engine's label number and its annotated planes."""

    segment_id: str
    name: str
    label: int
    slices: list[int]
    ignored_axes: list[str] = dataclasses.field(default_factory=list)  # strokes drawn on other axes, left out


@dataclass
class RunPlan:
    """What was read from the scene for one run, ready for the worker."""

    volume_node: object
    segmentation_node: object
    geometry: mrml_io.VolumeGeometry
    axis: int
    axis_name: str
    targets: list[SegmentTarget]
    request: SegmentRequest | None  # released (None) when the run ends
    config: RunConfig
    warnings: list[str] = dataclasses.field(default_factory=list)  # for the user: what was left out and why


class Run:
    """A run in progress (returned by ``process(..., waitForCompletion=False)``).

    ``state`` goes ``running`` -> ``completed`` | ``cancelled`` | ``failed``; ``summary`` and
    ``error`` hold the outcome. Call :meth:`cancel` to stop: the target segments are restored.
    """

    def __init__(self, plan: RunPlan, steps: list, worker: Worker, writer: SliceWriter,
                 snapshot: mrml_io.SegmentSnapshot, progress: ProgressCallback | None, on_end: Callable,
                 edits: mrml_io.EditWatch | None = None):
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
            self.result_masks = mrml_io.segment_masks(plan.segmentation_node, [t.segment_id for t in plan.targets],
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


def _process_events() -> None:
    if hasattr(slicer, "app"):
        slicer.app.processEvents()


class _SceneWatch:
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


_shared_worker: Worker | None = None
_shared_target = None  # the server the shared worker talks to (None: this computer)
QUIT_REASON = "The OFLSAM2 worker was stopped because Slicer is quitting."
RELOAD_REASON = "The OFLSAM2 worker was stopped for a reload of the module."


def shared_worker(target=None) -> Worker:
    """The one worker (and so the one SAM2 model) of this Slicer session: a local process, or a
    session on the server ``target`` (an :class:`oflsam2.client.ServerTarget`). It starts on the
    first run and again on the next run if it died; another target replaces it once no run is
    active. After a Reload, logic objects of the old code (the effect's, the console's) get the
    reloaded module's worker: one worker per Slicer process."""
    current = sys.modules.get(__name__)
    if current is not None and current.shared_worker is not shared_worker:  # this module was replaced by a Reload
        return current.shared_worker(target)
    global _shared_worker, _shared_target
    if _shared_worker is not None and target != _shared_target and _shared_worker.active_run is None:
        _shared_worker.shutdown()
        _shared_worker = None
    if _shared_worker is None:
        if target is None:
            _shared_worker = Worker()
        else:
            from .server_transport import HttpTransport

            _shared_worker = Worker(transport_factory=lambda on_event: HttpTransport(on_event, target))
        _shared_target = target
    return _shared_worker


def shutdown_shared_worker(reason: str = QUIT_REASON) -> None:
    """Stop the session's worker process (Slicer quits, the module is reloaded). A run in
    progress is cancelled and finished here, its segments restored, before the worker stops:
    nothing may be left for a timer that a Reload is about to drop."""
    global _shared_worker
    worker, _shared_worker = _shared_worker, None
    if worker is None:
        return
    run = worker.active_run
    if run is not None and not run.finished:
        run.cancel(reason)
        deadline = time.monotonic() + worker.grace_seconds + SHUTDOWN_WAIT_SECONDS  # the grace kill comes first
        while not drain(run) and time.monotonic() < deadline:
            run.job.finished.wait(POLL_SECONDS)
        if not run.finished:  # the worker never answered, even to its kill: put the segments back now
            run.handle((MessageKind.CANCELLED,))
    worker.shutdown(reason=reason)


class OFLSAM2Logic:
    """Segment volumes from a few annotated slices; usable without the GUI.

    ``worker``: a :class:`~OFLSAM2SegmentLib.worker.Worker` (default: the session's shared one,
    which builds the real ``oflsam2`` engine). ``pump``: how non-blocking runs are drained
    (default: a Qt timer). ``installer``: called before a run with the real engine to make sure
    torch, sam2 and the rest are installed (default: :func:`install.ensure_dependencies` inside
    Slicer, nothing outside; never when computing on a server).

    ``computeSettings``: where the shared worker computes (:class:`.compute.ComputeSettings`;
    default None: as saved under "Compute on", :func:`.compute.load`). :meth:`useServer` and
    :meth:`useThisComputer` set it from the Python console.
    """

    def __init__(self, worker: Worker | None = None, pump: Pump | None = None, installer: Callable[[], None] | None = None):
        self._worker = worker
        self._pump = pump
        # Packages matter only for the real engine: an injected worker (tests) brings its own.
        self._installer = installer if installer is not None else (_default_installer if worker is None else None)
        self._watch: _SceneWatch | None = None
        self._undo: mrml_io.UndoRecorder | None = None
        self._undo_run: Run | None = None  # the run the undo recorder saved the state before
        self.adapterPath: str | None = None
        self.lastRun: Run | None = None  # the latest run started by this logic, kept after it ends
        self._reviewed: Run | None = None  # the latest completed run: its quality, suggestions and Update
        self._review_gone: str | None = None  # why there is none (the run was undone)
        self.computeSettings: compute.ComputeSettings | None = None

    @property
    def worker(self) -> Worker:
        """The injected worker, else the session's shared one (its process restarts if it died)."""
        return self._worker if self._worker is not None else shared_worker(self.computeTarget())

    @property
    def activeRun(self) -> Run | None:
        """The run in progress in this session (started by this logic or another one)."""
        worker = self._worker if self._worker is not None else _shared_worker
        return worker.active_run if worker is not None else None

    def computeTarget(self):
        """The server the next run computes on (an :class:`oflsam2.client.ServerTarget`), or None for this computer."""
        settings = self.computeSettings if self.computeSettings is not None else compute.load()
        return settings.target()

    def useServer(self, url: str, token: str, caFile: str = "") -> None:
        """Compute this logic's runs on the ``oflsam2 serve`` server at ``url`` (not saved in the settings)."""
        self.computeSettings = compute.ComputeSettings(compute.SERVER, url, token, caFile)
        self.computeTarget()  # an incomplete or malformed choice is refused now

    def useThisComputer(self) -> None:
        self.computeSettings = compute.ComputeSettings(compute.LOCAL)

    def testServerConnection(self, url: str, token: str, caFile: str = "") -> str:
        """Reach the server, check its version and the token; returns what to tell the user, or
        raises :class:`oflsam2.client.ServerError` saying what is wrong."""
        return compute.check_connection(compute.ComputeSettings(compute.SERVER, url, token, caFile))

    def isRunning(self) -> bool:
        return self.activeRun is not None

    def cancel(self) -> None:
        if self.activeRun is not None:
            self.activeRun.cancel()

    # -----------------------------------------------------------------------------------------

    def process(self, volumeNode, segmentationNode, segmentIds: Sequence[str] | None = None, method: str = "ofl",
                waitForCompletion: bool = True, progressCallback: ProgressCallback | None = None, *,
                references: Sequence[tuple] = (), writer: SliceWriter | None = None,
                saveUndoState: Callable[[], object] | None = None, **options):
        """Segment ``segmentIds`` of ``segmentationNode`` in ``volumeNode`` from their annotated slices.

        - ``segmentIds``: a list of segment IDs, or one ID as a string. ``None`` (the default)
          means every segment drawn on the run's slice axis (every segment when an adapter is
          used); an empty list is an error (no segment selected).
        - Annotated slices: the planes of the run's axis that the user drew on. Strokes drawn on
          another axis are left out and reported (``summary["warnings"]``), never counted as
          annotations (see :func:`mrml_io.drawn_support`).
        - The run only adds voxels to the target segments, on the segmentation's own grid; other
          segments are never changed. Cancel or failure removes what the run added and keeps
          the user's edits made meanwhile.
        - ``method``: ``ofl`` (OFL-SAM2), ``revsam2``, ``sam2`` (plain SAM2 propagation) or ``forward``.
        - ``progressCallback(stage, done, total, text)``: stages ``installing``, ``downloading``,
          ``loading``, ``encoding``, ``training``, ``propagating``... and finally one of
          ``completed``, ``cancelled``, ``failed``.
        - ``references``: ``[(volumeNode, segmentationNode), ...]`` extra support; segments are
          matched to the targets by name.
        - ``writer`` / ``saveUndoState``: used by the Segment Editor effect (editor writes and undo).
        - ``options``: model and method options (``model``, ``checkpoint``, ``device``,
          ``imageSize``, ``randomWeights``, ``axis``, ``preset``, ``gamma``, ``numRetrieved``,
          ``epochs``, ``topK``, ``adapter``, ``saveAdapter``...; see ``options.option_names()``).
          No ``model`` (or ``""``) runs the method's own (``oflsam2.settings.default_model``) or an
          adapter's; ``summary["model"]`` and the final progress text name the model used.

        Blocking: returns the summary dict, raises the run's error, or :class:`Cancelled`.
        Non-blocking: returns the :class:`Run`.
        """
        _check_slicer_version()
        if self.isRunning():
            raise RuntimeError("An OFLSAM2 run is already in progress; cancel it or wait until it ends.")
        if not waitForCompletion and self._pump is None and not hasattr(slicer, "app"):  # the Qt timer needs Slicer
            raise InputError("waitForCompletion=False needs the Slicer application's event loop to write the slices; "
                             "outside Slicer, use waitForCompletion=True or give OFLSAM2Logic a pump.")
        if progressCallback is not None and not callable(progressCallback):
            raise InputError(f"progressCallback must be a function (stage, done, total, text); got {progressCallback!r}.")
        if self.adapterPath and "adapter" not in options and method == "ofl":  # only OFL-SAM2 uses adapters
            options["adapter"] = self.adapterPath
        config = parse_options(method, options)
        if config.settings.checkpoint and self._worker is None and self.computeTarget() is not None:
            raise InputError("A local checkpoint file cannot be used when computing on a server: the server runs the "
                             "models it has. Clear the local checkpoint and choose the model by name.")
        plan = self.prepare(volumeNode, segmentationNode, segmentIds, config, references)
        check_outputs(config, [t.name for t in plan.targets])  # before installing, downloading or any model work
        plan.warnings += _adapter_warnings(config, plan)
        steps = self._steps_before(plan.config, progressCallback) + [plan.request]
        return self._start(plan, steps, waitForCompletion, progressCallback, writer, saveUndoState)

    def update(self, waitForCompletion: bool = True, progressCallback: ProgressCallback | None = None):
        """Re-propagate the last completed run after the user corrected some of its planes.

        Every plane of the run's axis whose content differs from what that run left (in any of
        its segments) is an edited plane; edited and annotated planes become the annotated
        planes of this run and are never written. The worker re-propagates outward from the
        edits only (its model, features and the previous result stay in the worker process) and
        only the planes it recomputes are replaced (``summary["segments"][id]["recomputed"]``).
        Same method and options as that run; one undo step. Returns as :meth:`process` does.
        """
        if self.isRunning():
            raise RuntimeError("An OFLSAM2 run is already in progress; cancel it or wait until it ends.")
        if not waitForCompletion and self._pump is None and not hasattr(slicer, "app"):
            raise InputError("waitForCompletion=False needs the Slicer application's event loop; use waitForCompletion=True.")
        plan = self._update_plan(self._reviewable_run())
        kept = (plan.axis, {i for t in plan.targets for i in t.slices})  # annotated and corrected: never written
        writer = mrml_io.SegmentPlaneReplacer(plan.segmentation_node, plan.geometry, protected=kept)
        return self._start(plan, [plan.request], waitForCompletion, progressCallback, writer, None, replaces=True)

    def _start(self, plan: RunPlan, steps: list, waitForCompletion: bool, progressCallback, writer, saveUndoState,
               replaces: bool = False):
        segmentation = plan.segmentation_node
        # An update replaces planes (not only adds voxels): a cancel puts back what each plane held.
        snapshot = mrml_io.SegmentSnapshot(segmentation, [t.segment_id for t in plan.targets], plan.geometry,
                                           replaces=replaces)
        if saveUndoState is not None:
            saveUndoState()
        else:
            self._undo_recorder(segmentation.GetScene()).save(segmentation, plan.volume_node)
        writer = writer or mrml_io.SegmentSliceWriter(segmentation, plan.geometry)
        edits = mrml_io.EditWatch(segmentation)
        with edits.own_changes():
            snapshot.mark_in_progress()
        try:
            run = Run(plan, steps, self.worker, writer, snapshot, progressCallback, self._run_ended, edits=edits)
        except Exception:
            with edits.own_changes():
                snapshot.restore_statuses()
            edits.stop()
            raise
        self._stop_watching_edits()
        self._undo_run = run if saveUndoState is None else None
        self.worker.active_run = run
        self.lastRun = run
        self._watch = _SceneWatch(run, segmentation.GetScene())
        if not waitForCompletion:
            try:
                (self._pump or self._default_pump()).start(lambda: drain(run))
            except BaseException:  # nothing would ever drain the run: stop it and put the segments back now
                run.cancel("The run could not be started: its progress timer failed to start.")
                run.handle((MessageKind.CANCELLED,))
                raise
            return run
        return self._wait(run)

    def prepare(self, volumeNode, segmentationNode, segmentIds, config: RunConfig, references=()) -> RunPlan:
        """Read the image and the annotated slices from the scene (main thread, no writes)."""
        with_adapter = bool(config.options.adapter)
        _check_input_nodes(volumeNode, segmentationNode)
        segmentIds = segment_id_list(segmentIds)
        references = reference_pairs_list(references)
        chosen = segmentIds is None and not with_adapter  # the default: the segments drawn on the run's axis
        ids = segmentIds if segmentIds is not None else self._default_segments(segmentationNode, volumeNode, with_adapter)
        support = _read_support(volumeNode, segmentationNode, ids, config.axis)
        warnings = []
        if chosen:
            left_out = [s for s in ids if not support.slices[s]]
            ids = [s for s in ids if support.slices[s]] or ids  # none drawn on the axis: the error below says so
            warnings = [f"Segment {support.names[s]!r} has strokes only on the {' and '.join(support.ignored[s])} axis; "
                        f"it was left out of this {support.axis_name} run." for s in left_out if s not in ids]
        image, geometry = mrml_io.volume_array(volumeNode)
        reference_pairs = [self._reference(pair, support.names) for pair in references]
        targets, supports = [], []
        for label, segment_id in enumerate(ids, start=1):
            name, slices = support.names[segment_id], support.slices[segment_id]
            if not slices and not with_adapter and not reference_pairs:
                ignored = support.ignored[segment_id]
                raise InputError(
                    f"Segment {name!r} has no annotated slice. Paint it on at least one {support.axis_name} "
                    "slice (or add a reference volume, or use a trained adapter)."
                    + (f" Its strokes on the {' and '.join(ignored)} axis were ignored: a run along the "
                       f"{support.axis_name} axis uses only what was drawn on {support.axis_name} slices." if ignored else "")
                )
            targets.append(SegmentTarget(segment_id, name, label, slices, support.ignored[segment_id]))
            supports.append(LabelSupport(label, name, support.masks[segment_id], slices))
        # The engine's own checks (NaN voxels, supports...) here, before the worker starts any model work.
        image = validate_run(image, supports, method=config.method, axis=support.axis, preset=config.preset,
                             options=config.options, references=reference_pairs, settings=config.settings)
        request = SegmentRequest(config.settings, image, supports, config.method, support.axis, config.preset,
                                 config.options, reference_pairs)
        return RunPlan(volumeNode, segmentationNode, geometry, support.axis, support.axis_name, targets, request, config,
                       warnings)

    def describeSupport(self, volumeNode, segmentationNode, segmentIds: Sequence[str],
                        axis: str = "auto") -> tuple[str, list[SegmentTarget]]:
        """The slice axis a run would use and each segment's annotated planes along it, for the
        GUI's support list (``label`` is the engine's label number)."""
        _check_input_nodes(volumeNode, segmentationNode)
        segmentIds = segment_id_list(segmentIds)
        if segmentIds is None:
            raise InputError("No segment selected; select the segments to describe.")
        support = _read_support(volumeNode, segmentationNode, segmentIds, axis)
        return support.axis_name, [
            SegmentTarget(s, support.names[s], label, support.slices[s], support.ignored[s])
            for label, s in enumerate(segmentIds, start=1)
        ]

    # -----------------------------------------------------------------------------------------
    # Review and correct

    def lastRunQuality(self, segmentId: str) -> list[tuple[int, float]]:
        """``(slice, quality)`` of every plane along the last completed run's axis that the run
        scored for ``segmentId`` (annotated planes score 1), in slice order; quality in [0, 1]."""
        run, target = self._reviewed_target(segmentId)
        from oflsam2.review import _label_entries

        entries = _label_entries(run.summary["engine"].get("quality", {}), target.label)
        return [(index, float(entry["quality"])) for index, entry in sorted(entries.items())]

    def suggestNextSlices(self, segmentId: str, n: int = 3) -> list[int]:
        """The ``n`` planes of the last completed run's axis whose annotation would most likely
        help ``segmentId``, best first (:func:`oflsam2.review.suggest`: inside the object, spread
        out, away from annotated planes, lowest quality first)."""
        from oflsam2.api import SegmentResult
        from oflsam2.review import suggest

        run, target = self._reviewed_target(segmentId)
        engine = run.summary["engine"]
        result = SegmentResult({target.label: run.result_masks[segmentId]}, run.plan.axis, run.plan.config.method,
                               {"annotated": engine.get("annotated", target.slices), "quality": engine.get("quality", {})})
        return suggest(result, n)[target.label]

    def nextSliceToCheck(self, segmentId: str) -> tuple[int, tuple[float, float, float]] | None:
        """The best suggested plane for ``segmentId`` and the RAS position of its centre (for
        ``sliceNode.JumpSliceByCentering``), or None when there is nothing to suggest."""
        suggested = self.suggestNextSlices(segmentId, 1)
        if not suggested:
            return None
        return suggested[0], self.planeCenterRas(self._reviewed.plan.volume_node, self._reviewed.plan.axis, suggested[0])

    @staticmethod
    def planeCenterRas(volumeNode, axis: int, index: int) -> tuple[float, float, float]:
        """RAS position of the centre of plane ``index`` along array ``axis`` (0: k, 1: j, 2: i)."""
        dims = volumeNode.GetImageData().GetDimensions()  # (i, j, k)
        if isinstance(axis, bool) or axis not in (0, 1, 2):
            raise InputError(f"The plane axis must be 0, 1 or 2 (array order); got {axis!r}.")
        count = dims[2 - axis]
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
            raise InputError(f"Plane {index!r} does not exist: volume {volumeNode.GetName()!r} has planes 0..{count - 1} "
                             "along this axis.")
        ijk = [(d - 1) / 2.0 for d in dims]
        ijk[2 - axis] = float(index)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        ras = matrix.MultiplyPoint([*ijk, 1.0])
        return float(ras[0]), float(ras[1]), float(ras[2])

    def reviewedSegmentIds(self) -> list[str]:
        """The segments of the last completed run (those quality, suggestions and Update apply to)."""
        return [t.segment_id for t in self._reviewed.plan.targets] if self._reviewed is not None else []

    def reviewedPlaneCenterRas(self, index: int) -> tuple[float, float, float]:
        """RAS centre of plane ``index`` along the last completed run's axis."""
        run = self._reviewable_run()
        return self.planeCenterRas(run.plan.volume_node, run.plan.axis, index)

    def _reviewable_run(self) -> Run:
        run = self._reviewed
        if run is None:
            raise InputError(self._review_gone or "No completed OFLSAM2 run to review; run a segmentation first.")
        return run

    def _reviewed_target(self, segmentId: str) -> tuple[Run, SegmentTarget]:
        run = self._reviewable_run()
        for target in run.plan.targets:
            if target.segment_id == segmentId:
                return run, target
        raise InputError(f"Segment {segmentId!r} was not part of the last run (it segmented "
                         f"{', '.join(t.segment_id for t in run.plan.targets)}); run it first.")

    def _update_plan(self, base: Run) -> RunPlan:
        """The request of an update of ``base``: the annotated planes of ``base`` and the planes
        edited since (any target differs there from what ``base`` left), read from the scene."""
        volume, segmentation = base.plan.volume_node, base.plan.segmentation_node
        if volume.GetScene() is None or segmentation.GetScene() is None:
            raise InputError("The volume or segmentation of the last run left the scene; run a fresh segmentation.")
        ids = [t.segment_id for t in base.plan.targets]
        mrml_io.check_segments(segmentation, ids)
        masks = mrml_io.segment_masks(segmentation, ids, volume)
        axis = base.plan.axis
        now = mrml_io.volume_geometry(volume)
        if (now.shape != base.plan.geometry.shape or not np.allclose(now.ijk_to_ras, base.plan.geometry.ijk_to_ras, atol=1e-4)
                or any(masks[s].shape != base.result_masks[s].shape for s in ids)):
            # read on a moved grid, every plane would differ from the result and count as corrected
            raise InputError("The volume's grid (size, spacing, origin or orientation) changed since the last run, "
                             "e.g. a transform was hardened; run a fresh segmentation.")
        edited = set()
        for segment_id in ids:
            changed = np.moveaxis(masks[segment_id] != base.result_masks[segment_id], axis, 0).any(axis=(1, 2))
            edited.update(int(i) for i in np.flatnonzero(changed))
        if not edited:
            raise InputError(f"No {base.plan.axis_name} slice was corrected since the last run; paint or erase on a "
                             "slice first, then Update.")
        drawn_on = mrml_io.drawing_axis([masks[s] ^ base.result_masks[s] for s in ids])
        if drawn_on is not None and drawn_on != axis:
            from oflsam2.volume import axis_name

            other = axis_name(drawn_on, base.plan.geometry.direction_lps)
            raise InputError(f"The corrections since the last run were drawn on {other} slices; Update takes corrections "
                             f"on {base.plan.axis_name} slices (the run's axis). Undo them and correct on "
                             f"{base.plan.axis_name} slices, or run a fresh segmentation along the {other} axis.")
        # An annotated plane may be empty (a cleared false positive, or a target absent from another
        # target's plane): only one that held voxels after the run and holds none now was erased.
        def holds(where: dict, index: int) -> bool:
            return any(np.take(where[s], index, axis=axis).any() for s in ids)

        erased = sorted(i for i in {i for t in base.plan.targets for i in t.slices}
                        if holds(base.result_masks, i) and not holds(masks, i))
        if erased:
            raise InputError(f"Annotated slice(s) {erased} were erased: an update cannot remove an annotation. Undo the "
                             "erase, or run a fresh segmentation. Nothing was changed.")
        annotated = {int(i) for i in base.summary["engine"].get("annotated", [])} | {i for t in base.plan.targets for i in t.slices}
        slices = sorted(annotated | edited)
        image, geometry = mrml_io.volume_array(volume)
        config = base.plan.config
        options = dataclasses.replace(config.options, save_adapter=None)  # the update never rewrites an adapter
        supports = [LabelSupport(t.label, t.name, masks[t.segment_id], slices) for t in base.plan.targets]
        image = validate_run(image, supports, method=config.method, axis=axis, preset=config.preset, options=options,
                             settings=config.settings)
        request = SegmentRequest(config.settings, image, supports, config.method, axis, config.preset, options,
                                 previous_job=base.result_job)
        targets = [SegmentTarget(t.segment_id, t.name, t.label, slices) for t in base.plan.targets]
        return RunPlan(volume, segmentation, geometry, axis, base.plan.axis_name, targets, request,
                       dataclasses.replace(config, options=options))

    def undoLastRun(self) -> bool:
        """Put the segmentation of the last module run back as it was before that run.

        Refused (:class:`InputError` saying why) when there is nothing to undo, when that run
        changed nothing, or when the segmentation was edited since the run started: undoing
        would discard those edits."""
        reason = self.undoUnavailableReason()
        if reason is not None:
            raise InputError(reason)
        undone = self._undo.undo()
        self._stop_watching_edits()
        self._undo_run = None
        if undone and self._reviewed is self.lastRun:  # its quality, suggestions and Update no longer apply
            self._reviewed = None
            self._review_gone = ("The last run was undone, so there is no result to review or update; run a "
                                 "segmentation first.")
        return undone

    def canUndo(self) -> bool:
        return self.undoUnavailableReason() is None

    def undoUnavailableReason(self) -> str | None:
        """Why "Undo last run" is not offered now, or None when it is."""
        run = self._undo_run
        if run is None or run is not self.lastRun or self._undo is None or not self._undo.can_undo():
            return "There is no OFLSAM2 run to undo."
        if not run.finished:
            return "A run is in progress; cancel it to put the segments back."
        if not run.changed_segmentation:
            return "The last run changed nothing (it was cancelled, failed or wrote no slice); there is nothing to undo."
        if run.edits is None or run.edits.edited:
            return ("The segmentation was edited after the last run started; undoing the run would discard "
                    "those edits too. Use the Segment Editor's undo, or erase the run's slices by hand.")
        return None

    def _stop_watching_edits(self) -> None:
        run = self.lastRun
        if run is not None and run.edits is not None:
            run.edits.stop()
    # -----------------------------------------------------------------------------------------
    # Adapters

    def loadAdapter(self, adapterPath: str | None) -> list[dict]:
        """Use a saved OFL-SAM2 adapter folder in the following runs (``None``: stop using one).
        Returns each label's adapter metadata (``label_name``, ``model``, ``image_size``, ``axis``...)."""
        if not adapterPath:
            self.adapterPath = None
            return []
        adapters = read_adapters(adapterPath)
        self.adapterPath = str(adapterPath)
        return adapters

    def saveAdapter(self, volumeNode, segmentationNode, adapterPath: str, segmentIds=None, progressCallback=None,
                    **options) -> dict:
        """Train OFL-SAM2 on the annotated slices, segment the volume, and save the trained
        adapter to ``adapterPath`` (written only if the whole run succeeds). Blocking."""
        if "method" in options:
            raise InputError("saveAdapter always trains OFL-SAM2 (method 'ofl'); leave out the method option.")
        return self.process(volumeNode, segmentationNode, segmentIds, "ofl", True, progressCallback,
                            saveAdapter=str(adapterPath), **options)

    def segmentVolumesWithAdapter(self, volumeNodes, adapterPath: str, segmentNames: Sequence[str] | None = None,
                                  progressCallback=None, **options) -> list:
        """Segment a cohort without any annotation: one new segmentation per volume with one
        segment per adapter label (or per name in ``segmentNames``). The model, image size,
        intensity preset and slice axis default to the adapter's. Blocking; returns the new
        segmentation nodes. If any volume fails, every segmentation this call created is
        removed again and the error is raised: the scene is left as it was."""
        from oflsam2.adapter_labels import adapter_stem
        from oflsam2.volume import axis_name

        adapters = read_adapters(adapterPath)
        if isinstance(segmentNames, str):
            segmentNames = [segmentNames]
        names = (list(segmentNames) if segmentNames is not None
                 else [a.get("label_name") or adapter_stem("", a["label"]) for a in adapters])
        if not names or not all(isinstance(n, str) and n for n in names) or len({n.casefold() for n in names}) != len(names):
            raise InputError(f"segmentNames must be distinct, non-empty names of the adapter's labels (or None for all "
                             f"of them); got {segmentNames!r}.")
        trained = adapters[0]
        options = {snake_case(k): v for k, v in options.items()}
        for key in ("model", "image_size", "preset"):
            options.setdefault(key, trained[key])
        options["adapter"] = str(adapterPath)
        volumeNodes = [volumeNodes] if _is_node(volumeNodes, "vtkMRMLNode") else list(volumeNodes or ())
        config = parse_options("ofl", {**options, "axis": options.get("axis") or "auto"})
        for volumeNode in volumeNodes:  # every volume and option checked before any node is made
            _check_cohort_volume(volumeNode, options.get("axis") or None, int(trained["axis"]))
        check_outputs(config, names)
        created = []
        try:
            for volumeNode in volumeNodes:
                scene = volumeNode.GetScene()
                segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} OFL-SAM2")
                created.append(segmentation)
                segmentation.CreateDefaultDisplayNodes()
                segmentation.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())  # lies where its volume does
                segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
                ids = [segmentation.GetSegmentation().AddEmptySegment("", name) for name in names]
                if not all(ids):
                    raise RuntimeError("Could not create segments: the segmentation converter rules are not registered.")
                axis = options.get("axis") or axis_name(int(trained["axis"]), mrml_io.volume_geometry(volumeNode).direction_lps)
                self.process(volumeNode, segmentation, ids, "ofl", True, progressCallback, **{**options, "axis": axis})
        except BaseException:
            for segmentation in created:
                _remove_with_display_nodes(segmentation)
            raise
        return created

    # -----------------------------------------------------------------------------------------

    def _wait(self, run: Run) -> dict:
        while not drain(run):
            run.job.finished.wait(POLL_SECONDS)
            if not run.job.finished.is_set():
                _process_events()
        if run.state == "failed":
            raise run.error
        if run.state == "cancelled":
            raise Cancelled(run.cancel_reason + (" The segments were restored." if run.restored else ""))
        return run.summary

    def _run_ended(self, run: Run) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if run._worker.active_run is run:
            run._worker.active_run = None
        if run.state == "completed" and run.result_masks is not None:
            self._reviewed, self._review_gone = run, None

    def _steps_before(self, config: RunConfig, progress: ProgressCallback | None) -> list:
        """Install packages now (main thread, asks first); return a download step if needed.
        A server has its own packages and checkpoints: nothing is installed or downloaded here."""
        if self._worker is None and self.computeTarget() is not None:
            return []
        if self._installer is not None:
            if progress is not None:
                progress("installing", 0, 1, "checking Python packages")
            self._installer()
            if progress is not None:
                progress("installing", 1, 1, "Python packages ready")
        if not needs_download(config.settings):
            return []
        _confirm_download(config.settings.model)
        return [DownloadRequest(config.settings.model)]

    def _default_segments(self, segmentationNode, volumeNode, with_adapter: bool) -> list[str]:
        ids = list(segmentationNode.GetSegmentation().GetSegmentIDs())
        if with_adapter or not ids:
            if not ids:
                raise InputError(f"Segmentation {segmentationNode.GetName()!r} has no segment; add one and paint a few slices.")
            return ids
        mrml_io.check_segments(segmentationNode, ids)  # the source representation, before reading
        masks = mrml_io.segment_masks(segmentationNode, ids, volumeNode)
        painted = [s for s in ids if masks[s].any()]
        if not painted:
            raise InputError("No segment has any painted voxel. Paint the structure on a few slices first.")
        return painted

    def _reference(self, pair, names: dict[str, str]) -> Reference:
        volume, segmentation = pair
        _check_input_nodes(volume, segmentation)
        image, _ = mrml_io.volume_array(volume)
        by_name = {n.lower(): s for s, n in mrml_io.segment_names(segmentation).items()}
        matched = {label: by_name[name.lower()] for label, name in enumerate(names.values(), start=1) if name.lower() in by_name}
        if not matched:
            raise InputError(
                f"Reference segmentation {segmentation.GetName()!r} has no segment named like the targets "
                f"({', '.join(names.values())}); rename its segments to match."
            )
        masks = mrml_io.segment_masks(segmentation, list(matched.values()), volume)
        labels = np.zeros(image.shape, dtype=np.uint16)
        for label, segment_id in matched.items():
            labels[masks[segment_id]] = label
        return Reference(image, labels, name=volume.GetName())

    def _undo_recorder(self, scene) -> mrml_io.UndoRecorder:
        if self._undo is None or self._undo.scene is not scene:
            self._undo = mrml_io.UndoRecorder(scene)
        return self._undo

    def _default_pump(self) -> Pump:
        self._pump = QtTimerPump()
        return self._pump


def _adapter_warnings(config: RunConfig, plan: RunPlan) -> list[str]:
    """The CLI's warning when the volume does not look like the adapter's training volumes
    (an MR adapter on a CT volume, or the reverse)."""
    from oflsam2.adapter_labels import find_adapter, intensity_warning
    from oflsam2.volume import intensity_summary

    folder = config.options.adapter
    if not folder or plan.request is None or os.path.isfile(folder):
        return []
    adapters = read_adapters(folder)
    target = intensity_summary(plan.request.image)
    found = [(t, find_adapter(adapters, None, t.name, folder)) for t in plan.targets]
    return [w for w in (intensity_warning(a, f"segment {t.name!r}", target) for t, a in found if a) if w]


def _check_cohort_volume(volumeNode, axis_choice: str | None, adapter_axis: int) -> None:
    """What :meth:`OFLSAM2Logic.process` would refuse about a volume of a cohort (before any
    volume is segmented): not a scalar volume, NaN voxels, slices too small along the axis."""
    from oflsam2.volume import check_plane_size, resolve_axis

    _check_input_nodes(volumeNode, None, need_segmentation=False)
    name = volumeNode.GetName()
    if not np.isfinite(slicer.util.arrayFromVolume(volumeNode)).all():
        raise InputError(f"Volume {name!r} contains NaN or infinite voxels; fix or mask them before segmenting. "
                         "No volume was segmented.")
    geometry = mrml_io.volume_geometry(volumeNode)
    axis = resolve_axis(axis_choice, geometry.direction_lps, geometry.spacing_xyz) if axis_choice else adapter_axis
    try:
        check_plane_size(geometry.shape, axis)
    except InputError as error:
        raise InputError(f"Volume {name!r}: {error} No volume was segmented.") from None


@dataclass
class _Support:
    masks: dict  # segment id -> bool (z, y, x) on the volume grid
    names: dict  # segment id -> name
    slices: dict  # segment id -> annotated plane indices along ``axis``
    axis: int
    axis_name: str
    ignored: dict  # segment id -> names of the other axes it has strokes on (left out of ``masks``)


def _read_support(volumeNode, segmentationNode, ids: list[str], axis_choice: str) -> _Support:
    """Each segment on the volume grid, the slice axis (``auto``: the axis the strokes were drawn
    on, :func:`mrml_io.drawing_axis`, else the one the annotations lie along) and the annotated
    planes along it."""
    from oflsam2.volume import axis_name, check_plane_size, resolve_axis

    if not ids:
        raise InputError("No segment selected; select the segments to segment.")
    if len(set(ids)) != len(ids):
        raise InputError("A segment was selected twice; select each segment once.")
    mrml_io.check_same_space(volumeNode, segmentationNode)
    mrml_io.check_segments(segmentationNode, ids)
    geometry = mrml_io.volume_geometry(volumeNode)
    masks = mrml_io.segment_masks(segmentationNode, ids, volumeNode)
    union = np.zeros(geometry.shape, dtype=np.uint16)
    for label, segment_id in enumerate(ids, start=1):
        union[masks[segment_id]] = label
    axis = mrml_io.drawing_axis(masks.values()) if axis_choice == "auto" else None
    if axis is None:  # a named axis, or strokes that do not tell
        axis = resolve_axis(axis_choice, geometry.direction_lps, geometry.spacing_xyz, support=union)
    check_plane_size(geometry.shape, axis)
    drawn = {s: mrml_io.drawn_support(masks[s], axis) for s in ids}
    ignored = {s: [axis_name(a, geometry.direction_lps) for a in drawn[s].ignored_axes] for s in ids}
    return _Support({s: drawn[s].mask for s in ids}, mrml_io.segment_names(segmentationNode, ids),
                    {s: drawn[s].planes for s in ids}, axis, axis_name(axis, geometry.direction_lps), ignored)


def segment_id_list(segmentIds) -> list[str] | None:
    """``segmentIds`` as a list: None stays None (the default segments), one string is one ID."""
    if segmentIds is None:
        return None
    if isinstance(segmentIds, str):
        ids = [segmentIds]
    else:
        try:
            ids = list(segmentIds)
        except TypeError:
            raise InputError(f"segmentIds must be a list of segment IDs (e.g. ['Segment_1']); got {segmentIds!r}.") from None
    if not ids:
        raise InputError("No segment selected: give at least one segment ID, or None for the default segments.")
    bad = [s for s in ids if not isinstance(s, str) or not s]
    if bad:
        raise InputError(f"Segment IDs must be non-empty strings (e.g. 'Segment_1'); got {bad!r}.")
    return ids


def reference_pairs_list(references) -> list[tuple]:
    """``references`` as a list of (volumeNode, segmentationNode) pairs, or a clear error."""
    pairs = list(references or ())
    for number, pair in enumerate(pairs, start=1):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(
                f"Reference {number} must be a pair (volumeNode, segmentationNode); got {pair!r}. "
                "Pass references=[(volumeNode, segmentationNode), ...]."
            )
    return [tuple(pair) for pair in pairs]


def ignored_stroke_warnings(targets: Sequence[SegmentTarget]) -> list[str]:
    return [f"Segment {t.name!r} also has strokes on the {' and '.join(t.ignored_axes)} axis, which were ignored."
            for t in targets if t.ignored_axes]


def _remove_with_display_nodes(node) -> None:
    scene = node.GetScene()
    if scene is None:
        return
    display_nodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    for display_node in display_nodes:
        if display_node is not None and display_node.GetScene() is scene:
            scene.RemoveNode(display_node)
    scene.RemoveNode(node)


def _is_node(node, class_name: str) -> bool:
    return callable(getattr(node, "IsA", None)) and bool(node.IsA(class_name))


def _check_input_nodes(volumeNode, segmentationNode, need_segmentation: bool = True) -> None:
    if not _is_node(volumeNode, "vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError("Select the CT or MR volume to segment (a scalar volume node, not a labelmap or a name).")
    if volumeNode.GetScene() is None:
        raise InputError(f"Volume {volumeNode.GetName()!r} is not in a scene.")
    mrml_io.check_scalar_volume(volumeNode)  # image data, spacing, one component: before reading any segment
    if not need_segmentation:
        return
    if not _is_node(segmentationNode, "vtkMRMLSegmentationNode"):
        raise InputError("Select the segmentation that holds the annotated slices.")
    if volumeNode.GetScene() is None or volumeNode.GetScene() is not segmentationNode.GetScene():
        raise InputError("The volume and the segmentation must be in the same scene.")


def _check_slicer_version() -> None:
    from .compatibility import unsupported_slicer_reason

    unsupported = unsupported_slicer_reason(getattr(slicer, "app", None))
    if unsupported:
        raise InputError(unsupported)


def _default_installer() -> None:
    if hasattr(slicer, "app"):
        from .install import ensure_dependencies

        ensure_dependencies()


def _confirm_download(model: str) -> None:
    """Ask before downloading (stating the size); never download in testing mode or without a GUI."""
    from oflsam2.checkpoints import missing_message, model_entry

    app = getattr(slicer, "app", None)
    if app is None or app.testingEnabled() or not hasattr(slicer.util, "confirmOkCancelDisplay"):
        raise CheckpointError(missing_message(model))
    entry = model_entry(model)
    size = f"{entry['size_bytes'] / 1e6:.0f} MB" if entry.get("size_bytes") else "size unknown"
    question = (
        f"The SAM2 checkpoint for '{model}' ({size}) is not on this computer yet. Download it now from\n"
        f"{entry['url']}?\n\nIt is verified (SHA256) and kept in your user cache. Offline? Cancel, and give "
        "a local checkpoint file in the Model section instead."
    )
    if not slicer.util.confirmOkCancelDisplay(question, "OFLSAM2: download checkpoint"):
        raise Cancelled("The checkpoint download was declined; nothing was changed.")


__all__ = ["OFLSAM2Logic", "Run", "RunPlan", "drain", "GpuOutOfMemory", "QtTimerPump", "Pump", "shared_worker",
           "shutdown_shared_worker"]
