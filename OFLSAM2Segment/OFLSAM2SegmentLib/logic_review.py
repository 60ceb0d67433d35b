"""Review, Update and Undo of the last run: the :class:`~.logic.OFLSAM2Logic` methods that work on a
finished run (its per-plane quality, the slices suggested to check next, re-propagation from the
user's corrections, and putting the segmentation back as it was before the run).
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from oflsam2.errors import InputError

from . import mrml_write
from .run import ProgressCallback, Run
from .run_plan import SegmentTarget, update_plan


class ReviewMixin:
    """Needs the façade's run state: ``lastRun``, ``_reviewed`` (the latest completed run),
    ``_review_gone`` (why there is none), ``_undo`` / ``_undo_run`` (the undo recorder and the run
    it saved the state before), and its ``_start``, ``isRunning`` and ``_pump``."""

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
        plan = update_plan(self._reviewable_run())
        kept = (plan.axis, {i for t in plan.targets for i in t.slices})  # annotated and corrected: never written
        writer = mrml_write.SegmentPlaneReplacer(plan.segmentation_node, plan.geometry, protected=kept)
        return self._start(plan, [plan.request], waitForCompletion, progressCallback, writer, None, replaces=True)

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
