"""Run logic shared by the module GUI, the Segment Editor effect, the Python console and tests.

One entry point, :meth:`OFLSAM2Logic.process`, reads the volume and the annotated slices of the
selected segments on the main thread, hands numpy copies to the persistent worker process
(:mod:`.worker`: ``python -m oflsam2.worker``, started on the first run and kept for the
session), and writes every finished slice into the user's segments as it arrives:

- ``waitForCompletion=True`` (console, batch, tests): waits with ``event.wait(0.03)`` and lets
  Slicer process its events in between, then returns a summary or raises;
- ``waitForCompletion=False`` (GUI): returns a :class:`~.run.Run` at once; a pump (a ``qt.QTimer``
  in Slicer) calls :func:`~.run.drain` every 100 ms on the main thread.

The run itself is in :mod:`.run`, what it reads from the scene in :mod:`.run_plan`, the session's
worker in :mod:`.shared_worker`; review, Update and Undo in :mod:`.logic_review`, adapters and
cohorts in :mod:`.logic_adapters`.

Console example::

    logic = slicer.util.getModuleLogic("OFLSAM2Segment")
    summary = logic.process(volumeNode, segmentationNode, ["Segment_1"], method="ofl", device="cuda")
"""

from __future__ import annotations

from typing import Callable, Sequence

import slicer

from oflsam2.errors import Cancelled, CheckpointError, InputError

from . import compute, mrml_undo, mrml_write
from .logic_adapters import AdapterMixin
from .logic_review import ReviewMixin
from .options import RunConfig, check_outputs, needs_download, parse_options
from .run import POLL_SECONDS, ProgressCallback, Pump, QtTimerPump, Run, SceneWatch, SliceWriter, drain
from .run_plan import RunPlan, SegmentTarget, adapter_warnings, check_input_nodes, read_plan, read_support, segment_id_list
from .shared_worker import shared_worker, started_shared_worker
from .worker import DownloadRequest, MessageKind, Worker


def _process_events() -> None:
    if hasattr(slicer, "app"):
        slicer.app.processEvents()


class OFLSAM2Logic(ReviewMixin, AdapterMixin):
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
        self._watch: SceneWatch | None = None
        self._undo: mrml_undo.UndoRecorder | None = None
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
        worker = self._worker if self._worker is not None else started_shared_worker()
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
          annotations (see :func:`mrml_read.drawn_support`).
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
        plan.warnings += adapter_warnings(config, plan)
        steps = self._steps_before(plan.config, progressCallback) + [plan.request]
        return self._start(plan, steps, waitForCompletion, progressCallback, writer, saveUndoState)


    def _start(self, plan: RunPlan, steps: list, waitForCompletion: bool, progressCallback, writer, saveUndoState,
               replaces: bool = False):
        segmentation = plan.segmentation_node
        # An update replaces planes (not only adds voxels): a cancel puts back what each plane held.
        snapshot = mrml_undo.SegmentSnapshot(segmentation, [t.segment_id for t in plan.targets], plan.geometry,
                                           replaces=replaces)
        if saveUndoState is not None:
            saveUndoState()
        else:
            self._undo_recorder(segmentation.GetScene()).save(segmentation, plan.volume_node)
        writer = writer or mrml_write.SegmentSliceWriter(segmentation, plan.geometry)
        edits = mrml_undo.EditWatch(segmentation)
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
        self._watch = SceneWatch(run, segmentation.GetScene())
        if not waitForCompletion:
            try:
                (self._pump or self._default_pump()).start(lambda: drain(run))
            except BaseException:  # nothing would ever drain the run: stop it and put the segments back now
                run.cancel("The run could not be started: its progress timer failed to start.")
                run.handle((MessageKind.CANCELLED,))
                raise
            return run
        return self._wait(run)


    # -----------------------------------------------------------------------------------------

    def prepare(self, volumeNode, segmentationNode, segmentIds, config: RunConfig, references=()) -> RunPlan:
        """Read the image and the annotated slices from the scene (main thread, no writes)."""
        return read_plan(volumeNode, segmentationNode, segmentIds, config, references)

    def describeSupport(self, volumeNode, segmentationNode, segmentIds: Sequence[str],
                        axis: str = "auto") -> tuple[str, list[SegmentTarget]]:
        """The slice axis a run would use and each segment's annotated planes along it, for the
        GUI's support list (``label`` is the engine's label number)."""
        check_input_nodes(volumeNode, segmentationNode)
        segmentIds = segment_id_list(segmentIds)
        if segmentIds is None:
            raise InputError("No segment selected; select the segments to describe.")
        support = read_support(volumeNode, segmentationNode, segmentIds, axis)
        return support.axis_name, [
            SegmentTarget(s, support.names[s], label, support.slices[s], support.ignored[s])
            for label, s in enumerate(segmentIds, start=1)
        ]

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


    def _undo_recorder(self, scene) -> mrml_undo.UndoRecorder:
        if self._undo is None or self._undo.scene is not scene:
            self._undo = mrml_undo.UndoRecorder(scene)
        return self._undo

    def _default_pump(self) -> Pump:
        self._pump = QtTimerPump()
        return self._pump


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
