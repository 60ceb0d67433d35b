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
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import slicer
import vtk

from oflsam2.api import LabelSupport, Reference
from oflsam2.errors import Cancelled, CheckpointError, InputError

from . import mrml_io
from .options import RunConfig, needs_download, parse_options, snake_case
from .worker import DownloadRequest, GpuOutOfMemory, MessageKind, SegmentRequest, Worker

log = logging.getLogger(__name__)

POLL_SECONDS = 0.03  # blocking mode: worker wait between two rounds of Slicer event processing
MESSAGES_PER_DRAIN = 64  # bound one timer tick so the GUI stays responsive during bursts
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


class Run:
    """A run in progress (returned by ``process(..., waitForCompletion=False)``).

    ``state`` goes ``running`` -> ``completed`` | ``cancelled`` | ``failed``; ``summary`` and
    ``error`` hold the outcome. Call :meth:`cancel` to stop: the target segments are restored.
    """

    def __init__(self, plan: RunPlan, steps: list, worker: Worker, writer: SliceWriter,
                 snapshot: mrml_io.SegmentSnapshot, progress: ProgressCallback | None, on_end: Callable):
        self.plan = plan
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
        self._accepting = True  # False once the target nodes are gone: queued slices are dropped
        self._segmentation_alive = True
        self._started = time.perf_counter()
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
            self._writer.write(segment_id, axis, index, plane)
        except Exception as exc:  # a failed write ends the run; the snapshot puts things back
            self.error, self.traceback_text = exc, ""
            self.job.cancel()
            self._accepting = False
            return
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
        self.summary = {
            "method": plan.config.method,
            "axis": plan.axis,
            "axisName": plan.axis_name,
            "seconds": time.perf_counter() - self._started,
            "segments": {
                t.segment_id: {"name": t.name, "annotated": list(t.slices), "written": self._written[t.segment_id]}
                for t in plan.targets
            },
            "engine": summary.get("info", {}),
        }
        self._end("completed", restore=False)

    def _end(self, state: str, restore: bool) -> None:
        if self.finished:
            return
        if state == "cancelled" and self.error is not None:
            state = "failed"  # cancelled by us after a failed write
        if restore and self._segmentation_alive:
            try:
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
        text = {
            "completed": f"Done: {sum(self._written.values())} slices written along the {self.plan.axis_name} axis.",
            "cancelled": self.cancel_reason + restored,
            "failed": f"Failed: {self.error}{restored}",
        }[state]
        self._report(state, 1, 1, text)

    def _report(self, stage: str, done: int, total: int, text: str = "") -> None:
        if self._progress is not None:
            try:
                self._progress(stage, done, total, text)
            except Exception:
                log.exception("OFLSAM2: the progress callback failed")


def drain(run: Run, max_messages: int = MESSAGES_PER_DRAIN) -> bool:
    """Apply the worker's queued messages to the scene; True once the run has ended.

    Plain function (no Qt): the Slicer timer calls it every 100 ms, blocking mode after each
    wait, tests directly. Slice writes are grouped under one render pause.
    """
    with _render_blocker():
        for count, message in enumerate(run.job.messages()):
            run.handle(message)
            if run.finished or count + 1 >= max_messages:
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


def shared_worker() -> Worker:
    """The one worker (and so the one SAM2 model) of this Slicer session. Its process starts
    on the first run and is started again by the next run if it died."""
    global _shared_worker
    if _shared_worker is None:
        _shared_worker = Worker()
    return _shared_worker


def shutdown_shared_worker() -> None:
    """Stop the session's worker process (Slicer quits, the module is reloaded): a run in
    progress is cancelled and its segments restored by the next drain."""
    global _shared_worker
    worker, _shared_worker = _shared_worker, None
    if worker is not None:
        if worker.active_run is not None:
            worker.active_run.cancel("The OFLSAM2 worker was shut down (Slicer quit or the module was reloaded).")
        worker.shutdown()


class OFLSAM2Logic:
    """Segment volumes from a few annotated slices; usable without the GUI.

    ``worker``: a :class:`~OFLSAM2SegmentLib.worker.Worker` (default: the session's shared one,
    which builds the real ``oflsam2`` engine). ``pump``: how non-blocking runs are drained
    (default: a Qt timer). ``installer``: called before a run with the real engine to make sure
    torch, sam2 and the rest are installed (default: :func:`install.ensure_dependencies` inside
    Slicer, nothing outside).
    """

    def __init__(self, worker: Worker | None = None, pump: Pump | None = None, installer: Callable[[], None] | None = None):
        self._worker = worker
        self._pump = pump
        # Packages matter only for the real engine: an injected worker (tests) brings its own.
        self._installer = installer if installer is not None else (_default_installer if worker is None else None)
        self._watch: _SceneWatch | None = None
        self._undo: mrml_io.UndoRecorder | None = None
        self.adapterPath: str | None = None
        self.lastRun: Run | None = None  # the latest run started by this logic, kept after it ends

    @property
    def worker(self) -> Worker:
        """The injected worker, else the session's shared one (its process restarts if it died)."""
        return self._worker if self._worker is not None else shared_worker()

    @property
    def activeRun(self) -> Run | None:
        """The run in progress in this session (started by this logic or another one)."""
        return self.worker.active_run

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

        - ``segmentIds``: default all segments with at least one painted voxel (all segments when
          an adapter is used).
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

        Blocking: returns the summary dict, raises the run's error, or :class:`Cancelled`.
        Non-blocking: returns the :class:`Run`.
        """
        if self.isRunning():
            raise RuntimeError("An OFLSAM2 run is already in progress; cancel it or wait until it ends.")
        if self.adapterPath and "adapter" not in options:
            options["adapter"] = self.adapterPath
        config = parse_options(method, options)
        plan = self.prepare(volumeNode, segmentationNode, segmentIds, config, references)
        steps = self._steps_before(plan.config, progressCallback) + [plan.request]

        segmentation = plan.segmentation_node
        snapshot = mrml_io.SegmentSnapshot(segmentation, [t.segment_id for t in plan.targets])
        if saveUndoState is not None:
            saveUndoState()
        else:
            self._undo_recorder(segmentation.GetScene()).save(segmentation, plan.volume_node)
        writer = writer or mrml_io.SegmentSliceWriter(segmentation, plan.geometry)
        snapshot.mark_in_progress()
        try:
            run = Run(plan, steps, self.worker, writer, snapshot, progressCallback, self._run_ended)
        except Exception:
            snapshot.restore_statuses()
            raise
        self.worker.active_run = run
        self.lastRun = run
        self._watch = _SceneWatch(run, segmentation.GetScene())
        if not waitForCompletion:
            (self._pump or self._default_pump()).start(lambda: drain(run))
            return run
        return self._wait(run)

    def prepare(self, volumeNode, segmentationNode, segmentIds, config: RunConfig, references=()) -> RunPlan:
        """Read the image and the annotated slices from the scene (main thread, no writes)."""
        with_adapter = bool(config.options.adapter)
        _check_input_nodes(volumeNode, segmentationNode)
        ids = list(segmentIds) if segmentIds else self._default_segments(segmentationNode, volumeNode, with_adapter)
        support = _read_support(volumeNode, segmentationNode, ids, config.axis)
        image, geometry = mrml_io.volume_array(volumeNode)
        reference_pairs = [self._reference(pair, support.names) for pair in references]
        targets, supports = [], []
        for label, segment_id in enumerate(ids, start=1):
            name, slices = support.names[segment_id], support.slices[segment_id]
            if not slices and not with_adapter and not reference_pairs:
                raise InputError(
                    f"Segment {name!r} has no annotated slice. Paint it on at least one {support.axis_name} "
                    "slice (or add a reference volume, or use a trained adapter)."
                )
            targets.append(SegmentTarget(segment_id, name, label, slices))
            supports.append(LabelSupport(label, name, support.masks[segment_id], slices))
        request = SegmentRequest(config.settings, image, supports, config.method, support.axis, config.preset,
                                 config.options, reference_pairs)
        return RunPlan(volumeNode, segmentationNode, geometry, support.axis, support.axis_name, targets, request, config)

    def describeSupport(self, volumeNode, segmentationNode, segmentIds: Sequence[str],
                        axis: str = "auto") -> tuple[str, list[SegmentTarget]]:
        """The slice axis a run would use and each segment's annotated planes along it, for the
        GUI's support list (``label`` is the engine's label number)."""
        _check_input_nodes(volumeNode, segmentationNode)
        support = _read_support(volumeNode, segmentationNode, list(segmentIds), axis)
        return support.axis_name, [
            SegmentTarget(s, support.names[s], label, support.slices[s]) for label, s in enumerate(segmentIds, start=1)
        ]

    def undoLastRun(self) -> bool:
        """Put the segmentation of the last module run back as it was before that run."""
        return self._undo is not None and self._undo.undo()

    def canUndo(self) -> bool:
        return self._undo is not None and self._undo.can_undo()

    # -----------------------------------------------------------------------------------------
    # Adapters

    def loadAdapter(self, adapterPath: str | None) -> list[dict]:
        """Use a saved OFL-SAM2 adapter folder in the following runs (``None``: stop using one).
        Returns each label's adapter metadata (``label_name``, ``model``, ``image_size``, ``axis``...)."""
        if not adapterPath:
            self.adapterPath = None
            return []
        adapters = _read_adapters(adapterPath)
        self.adapterPath = str(adapterPath)
        return adapters

    def saveAdapter(self, volumeNode, segmentationNode, adapterPath: str, segmentIds=None, progressCallback=None,
                    **options) -> dict:
        """Train OFL-SAM2 on the annotated slices, segment the volume, and save the trained
        adapter to ``adapterPath`` (written only if the whole run succeeds). Blocking."""
        return self.process(volumeNode, segmentationNode, segmentIds, "ofl", True, progressCallback,
                            saveAdapter=str(adapterPath), **options)

    def segmentVolumesWithAdapter(self, volumeNodes, adapterPath: str, segmentNames: Sequence[str] | None = None,
                                  progressCallback=None, **options) -> list:
        """Segment a cohort without any annotation: one new segmentation per volume with one
        segment per adapter label (or per name in ``segmentNames``). The model, image size,
        intensity preset and slice axis default to the adapter's. Blocking; returns the new
        segmentation nodes."""
        from oflsam2.volume import axis_name

        adapters = _read_adapters(adapterPath)
        names = list(segmentNames) if segmentNames else [a.get("label_name") or str(a["label"]) for a in adapters]
        trained = adapters[0]
        options = {snake_case(k): v for k, v in options.items()}
        for key in ("model", "image_size", "preset"):
            options.setdefault(key, trained[key])
        created = []
        for volumeNode in volumeNodes:
            scene = volumeNode.GetScene()
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} OFL-SAM2")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            ids = [segmentation.GetSegmentation().AddEmptySegment("", name) for name in names]
            if not all(ids):
                raise RuntimeError("Could not create segments: the segmentation converter rules are not registered.")
            axis = options.get("axis") or axis_name(int(trained["axis"]), mrml_io.volume_geometry(volumeNode).direction_lps)
            self.process(volumeNode, segmentation, ids, "ofl", True, progressCallback,
                         **{**options, "adapter": str(adapterPath), "axis": axis})
            created.append(segmentation)
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
        if self.worker.active_run is run:
            self.worker.active_run = None

    def _steps_before(self, config: RunConfig, progress: ProgressCallback | None) -> list:
        """Install packages now (main thread, asks first); return a download step if needed."""
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


@dataclass
class _Support:
    masks: dict  # segment id -> bool (z, y, x) on the volume grid
    names: dict  # segment id -> name
    slices: dict  # segment id -> annotated plane indices along ``axis``
    axis: int
    axis_name: str


def _read_support(volumeNode, segmentationNode, ids: list[str], axis_choice: str) -> _Support:
    """Each segment on the volume grid, the slice axis (``auto``: the one the annotations lie
    along) and the annotated planes along it."""
    from oflsam2.volume import axis_name, check_plane_size, resolve_axis

    if len(set(ids)) != len(ids):
        raise InputError("A segment was selected twice; select each segment once.")
    mrml_io.check_same_space(volumeNode, segmentationNode)
    mrml_io.check_segments(segmentationNode, ids)
    geometry = mrml_io.volume_geometry(volumeNode)
    masks = mrml_io.segment_masks(segmentationNode, ids, volumeNode)
    union = np.zeros(geometry.shape, dtype=np.uint16)
    for label, segment_id in enumerate(ids, start=1):
        union[masks[segment_id]] = label
    axis = resolve_axis(axis_choice, geometry.direction_lps, geometry.spacing_xyz, support=union)
    check_plane_size(geometry.shape, axis)
    slices = {s: mrml_io.annotated_planes(masks[s], axis) for s in ids}
    return _Support(masks, mrml_io.segment_names(segmentationNode, ids), slices, axis, axis_name(axis, geometry.direction_lps))


def _read_adapters(path) -> list[dict]:
    """Metadata of the labels saved in an adapter folder (only the JSON files are read)."""
    from oflsam2.ofl.adapter import list_adapters

    if not path or not os.path.isdir(path):
        raise InputError(f"The adapter folder {path} does not exist; give the folder written by 'Save adapter'.")
    adapters = list_adapters(path)
    if not adapters:
        raise InputError(f"{path} holds no OFL-SAM2 adapter; give the folder written by 'Save adapter'.")
    return adapters


def _check_input_nodes(volumeNode, segmentationNode) -> None:
    if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError("Select the CT or MR volume to segment (a scalar volume, not a labelmap).")
    if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise InputError("Select the segmentation that holds the annotated slices.")
    if volumeNode.GetScene() is None or volumeNode.GetScene() is not segmentationNode.GetScene():
        raise InputError("The volume and the segmentation must be in the same scene.")


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
