"""The Slicer side of the review loop (issue 11) against real MRML (slicer-core): a run that
cannot start its pump, per-slice quality, suggested slices and Update through the worker."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fakes import CopyEngine, ManualPump
from mrml_helpers import read_segments, require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402
from OFLSAM2SegmentLib.testing import make_annotated_volume  # noqa: E402
from OFLSAM2SegmentLib.worker import Worker  # noqa: E402

FAST = {"randomWeights": True, "device": "cpu"}


class FailingPump:
    def start(self, step):
        raise RuntimeError("no event loop")


def test_a_pump_that_fails_to_start_ends_the_run_restores_and_frees_the_worker(scene):
    volume, segmentation, ids = make_annotated_volume(scene, shape=(6, 32, 32))
    before = read_segments(segmentation, volume)
    release = threading.Event()
    engine = CopyEngine(block=release)  # the first run never gets past its first slice
    logic = OFLSAM2Logic(worker=Worker(lambda settings: engine), pump=FailingPump())
    try:
        with pytest.raises(RuntimeError, match="no event loop"):
            logic.process(volume, segmentation, ids[:1], method="sam2", waitForCompletion=False, **FAST)
        assert logic.activeRun is None, "the run that never started still blocks every later run"
        assert logic.lastRun.state == "cancelled" and logic.lastRun.restored
        after = read_segments(segmentation, volume)
        for segment_id in ids:
            np.testing.assert_array_equal(after[segment_id], before[segment_id])

        release.set()
        pump = ManualPump()
        logic._pump = pump
        run = logic.process(volume, segmentation, ids[:1], method="sam2", waitForCompletion=False, **FAST)
        pump.run_until_done(60)
        assert run.state == "completed", run.error
    finally:
        logic.worker.shutdown()


REAL = {"randomWeights": True, "device": "cpu", "model": "sam2.1-tiny", "imageSize": 256}


@pytest.fixture
def chaos_crop(scene, shared_data):
    """16 axial planes of a real CHAOS MR volume through the liver, cropped around it in-plane,
    with Liver annotated on planes 3 and 12 only and Spleen as a segment no run may touch."""
    sitk = pytest.importorskip("SimpleITK")
    folder = shared_data / "chaos_t2_fewshot"
    image = sitk.ReadImage(str(folder / "image_1.nii.gz"))
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_1.nii.gz")))).astype(np.uint8)
    liver = np.flatnonzero((labels == 1).any(axis=(1, 2)))
    middle = int(liver[len(liver) // 2])
    rows = np.flatnonzero((labels == 1).any(axis=(0, 2)))
    columns = np.flatnonzero((labels == 1).any(axis=(0, 1)))
    y0, y1 = max(rows[0] - 6, 0), rows[-1] + 7
    x0, x1 = max(columns[0] - 6, 0), columns[-1] + 7
    z0 = middle - 8
    image = image[int(x0):int(x1), int(y0):int(y1), z0:z0 + 16]
    labels = labels[z0:z0 + 16, y0:y1, x0:x1]
    from mrml_helpers import add_segmentation, add_volume_from_sitk

    volume = add_volume_from_sitk(scene, image)
    annotation = np.zeros(labels.shape, bool)
    for index in (3, 12):
        annotation[index] = labels[index] == 1
    segmentation, ids = add_segmentation(scene, volume, {"Liver": annotation, "Spleen": labels == 4})
    return image, labels, volume, segmentation, ids


def test_quality_suggestions_and_update_through_the_worker_process(chaos_crop):
    from OFLSAM2SegmentLib import mrml_geometry, mrml_write

    image, labels, volume, segmentation, ids = chaos_crop
    liver, spleen = ids
    logic = OFLSAM2Logic(worker=Worker(), pump=ManualPump())  # the real engine in its own process
    try:
        summary = logic.process(volume, segmentation, [liver], method="sam2", axis="axial", **REAL)
        depth = labels.shape[0]
        assert summary["segments"][liver]["written"] == depth - 2

        quality = dict(logic.lastRunQuality(liver))
        assert sorted(quality) == list(range(depth))  # every propagated plane scored, annotated ones too
        assert quality[3] == quality[12] == 1.0
        assert all(0.0 <= q <= 1.0 for q in quality.values())

        after_run = read_segments(segmentation, volume)
        present = np.flatnonzero(after_run[liver].any(axis=(1, 2)))
        suggested = logic.suggestNextSlices(liver, 3)
        assert suggested, "no suggestion inside a 16-plane object"
        for index in suggested:
            assert present[0] <= index <= present[-1]  # inside the object
            assert min(abs(index - 3), abs(index - 12)) >= 3  # away from annotated planes
        assert all(abs(a - b) >= 3 for n, a in enumerate(suggested) for b in suggested[n + 1:])  # spread out

        index, ras = logic.nextSliceToCheck(liver)
        assert index == suggested[0]
        size = image.GetSize()
        lps = image.TransformContinuousIndexToPhysicalPoint(((size[0] - 1) / 2, (size[1] - 1) / 2, float(index)))
        np.testing.assert_allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-4)

        # The user corrects plane 8 to the true liver outline, then updates.
        truth = labels[8] == 1
        assert not np.array_equal(after_run[liver][8], truth)
        mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume)).write(liver, 0, 8, truth)
        before_update = read_segments(segmentation, volume)
        np.testing.assert_array_equal(before_update[liver][8], truth)

        summary = logic.update()
        after = read_segments(segmentation, volume)
        recomputed = summary["segments"][liver]["recomputed"]
        assert summary["engine"]["edited"] == [8]
        assert recomputed and not {3, 8, 12} & set(recomputed)
        for plane in (3, 8, 12):  # annotated and edited planes exactly as drawn
            np.testing.assert_array_equal(after[liver][plane], before_update[liver][plane])
        kept = [i for i in range(depth) if i not in recomputed]
        np.testing.assert_array_equal(after[liver][kept], before_update[liver][kept])
        np.testing.assert_array_equal(after[spleen], before_update[spleen])
        assert sorted(dict(logic.lastRunQuality(liver))) == list(range(depth))
        print(f"update recomputed {len(recomputed)} of {depth - 3} planes: {recomputed}")

        assert logic.undoLastRun()  # the whole update is one undo step
        undone = read_segments(segmentation, volume)
        for segment_id in ids:
            np.testing.assert_array_equal(undone[segment_id], before_update[segment_id])
    finally:
        logic.worker.shutdown()


def test_update_refuses_what_it_cannot_do_and_changes_nothing(scene):
    """No correction yet, an erased annotated plane, a correction on another axis, a worker that lost the previous result
    (restarted): each refused with what to do, the segmentation left as it was."""
    from oflsam2.errors import InputError
    from OFLSAM2SegmentLib import mrml_geometry, mrml_write

    volume, segmentation, ids = make_annotated_volume(scene, shape=(9, 32, 32))
    logic = OFLSAM2Logic(worker=Worker(lambda settings: CopyEngine()), pump=ManualPump())
    try:
        with pytest.raises(InputError, match="run a segmentation first"):
            logic.update()
        logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
        after_run = read_segments(segmentation, volume)
        with pytest.raises(InputError, match="No axial slice was corrected"):
            logic.update()

        writer = mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume))
        annotated = logic.lastRun.plan.targets[0].slices[0]
        writer.write(ids[0], 0, annotated, np.zeros((32, 32), bool))
        erased = read_segments(segmentation, volume)
        with pytest.raises(InputError, match="cannot remove an annotation"):
            logic.update()
        for segment_id in ids:
            np.testing.assert_array_equal(read_segments(segmentation, volume)[segment_id], erased[segment_id])
        writer.write(ids[0], 0, annotated, after_run[ids[0]][annotated])  # put it back

        coronal = np.zeros((9, 32), bool)  # a correction painted on a coronal slice crosses many axial ones
        coronal[2:7, 8:20] = True
        writer.write(ids[0], 1, 16, coronal | np.take(after_run[ids[0]], 16, axis=1))
        painted = read_segments(segmentation, volume)
        with pytest.raises(InputError, match="drawn on coronal slices"):
            logic.update()
        np.testing.assert_array_equal(read_segments(segmentation, volume)[ids[0]], painted[ids[0]])
        writer.write(ids[0], 1, 16, np.take(after_run[ids[0]], 16, axis=1))  # undo it
        np.testing.assert_array_equal(read_segments(segmentation, volume)[ids[0]], after_run[ids[0]])

        corrected = np.zeros((32, 32), bool)
        corrected[8:20, 8:20] = True
        writer.write(ids[0], 0, 5, corrected)
        before = read_segments(segmentation, volume)
        logic.worker.shutdown()  # the next run starts a new worker, which never saw the first run
        with pytest.raises(InputError, match="no longer holds the result"):
            logic.update()
        after = read_segments(segmentation, volume)
        for segment_id in ids:
            np.testing.assert_array_equal(after[segment_id], before[segment_id])
        assert logic.activeRun is None
    finally:
        logic.worker.shutdown()


class EmptyingUpdateEngine(CopyEngine):
    """First run: :class:`CopyEngine`. Update: recomputes the planes between the first and last
    annotated ones as empty (visible replacements), sending them one by one; blocks on
    ``release`` after the first one so that a test can cancel mid-update."""

    def __init__(self, release: threading.Event):
        super().__init__()
        self.release = release

    def segment(self, image, supports, *, previous=None, **run):
        from oflsam2.api import SegmentResult
        from oflsam2.events import check_cancel

        if previous is None:
            result = super().segment(image, supports, **run)
            result.info.update({"annotated": sorted({i for s in supports for i in s.slices}), "quality": {}})
            return result
        events, axis = run["events"], run["axis"]
        slices = sorted({i for s in supports for i in s.slices})
        recomputed = [i for i in range(slices[0] + 1, slices[-1]) if i not in slices]
        masks = {}
        for support in supports:
            result = np.moveaxis(np.array(previous.masks[support.label], dtype=bool), axis, 0)
            for count, index in enumerate(recomputed):
                if count == 1:
                    while not self.release.wait(0.01):
                        check_cancel(events)
                result[index] = False
                events.slice_done(support.label, axis, index, result[index])
            masks[support.label] = np.moveaxis(result, 0, axis)
        return SegmentResult(masks, axis, previous.method, {"annotated": slices, "quality": {},
                                                             "edited": [], "recomputed": {s.label: recomputed for s in supports}})


def test_a_cancelled_update_puts_back_every_replaced_plane(scene):
    from OFLSAM2SegmentLib import mrml_geometry, mrml_write

    volume, segmentation, ids = make_annotated_volume(scene, shape=(12, 32, 32))
    release = threading.Event()
    pump = ManualPump()
    logic = OFLSAM2Logic(worker=Worker(lambda settings: EmptyingUpdateEngine(release)), pump=pump)
    try:
        logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
        corrected = np.zeros((32, 32), bool)
        corrected[10:22, 10:22] = True
        geometry = mrml_geometry.volume_geometry(volume)
        mrml_write.SegmentPlaneReplacer(segmentation, geometry).write(ids[0], 0, 5, corrected)  # annotated: 4 and 8
        before = read_segments(segmentation, volume)

        run = logic.update(waitForCompletion=False)
        deadline = time.monotonic() + 30
        while not read_segments(segmentation, volume)[ids[0]][6].sum() < before[ids[0]][6].sum():
            pump.step()  # until the first recomputed plane (6, emptied) was written
            assert time.monotonic() < deadline, "the update wrote nothing"
        run.cancel()
        release.set()
        pump.run_until_done(30)
        assert run.state == "cancelled"
        after = read_segments(segmentation, volume)
        for segment_id in ids:
            np.testing.assert_array_equal(after[segment_id], before[segment_id])
    finally:
        logic.worker.shutdown()


class OverwritingUpdateEngine(CopyEngine):
    """First run: :class:`CopyEngine`. Update: sends an empty plane for every slice, the annotated
    and corrected ones included (what an engine must never do)."""

    def segment(self, image, supports, *, previous=None, **run):
        if previous is None:
            result = super().segment(image, supports, **run)
            result.info.update({"annotated": sorted({i for s in supports for i in s.slices}), "quality": {}})
            return result
        from oflsam2.api import SegmentResult

        events, axis = run["events"], run["axis"]
        for support in supports:
            for index in range(image.shape[axis]):
                events.slice_done(support.label, axis, index, np.zeros(np.delete(image.shape, axis), bool))
        every = list(range(image.shape[axis]))
        return SegmentResult({s.label: np.zeros(image.shape, bool) for s in supports}, axis, previous.method,
                             {"annotated": every, "quality": {}, "edited": [], "recomputed": {s.label: every for s in supports}})


def test_an_update_that_would_overwrite_an_annotated_or_corrected_plane_is_stopped_and_undone(scene):
    from OFLSAM2SegmentLib import mrml_geometry, mrml_write

    volume, segmentation, ids = make_annotated_volume(scene, shape=(9, 32, 32))
    logic = OFLSAM2Logic(worker=Worker(lambda settings: OverwritingUpdateEngine()), pump=ManualPump())
    try:
        logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
        corrected = np.zeros((32, 32), bool)
        corrected[8:20, 8:20] = True
        mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume)).write(ids[0], 0, 5, corrected)
        before = read_segments(segmentation, volume)

        with pytest.raises(RuntimeError, match="annotated or corrected plane"):
            logic.update()

        assert logic.lastRun.state == "failed" and logic.lastRun.restored
        after = read_segments(segmentation, volume)
        for segment_id in ids:
            np.testing.assert_array_equal(after[segment_id], before[segment_id])
    finally:
        logic.worker.shutdown()


def test_an_ofl_update_warm_starts_the_head_the_worker_kept(scene, tiny_model):
    """OFL-SAM2 through the worker loop with the real engine (random-weight SAM2.1-tiny): the
    update trains only the warm-start epochs, from the head the first run left in the worker."""
    from oflsam2.api import Engine
    from OFLSAM2SegmentLib import mrml_geometry, mrml_write

    volume, segmentation, ids = make_annotated_volume(scene, shape=(10, 48, 48))
    logic = OFLSAM2Logic(worker=Worker(lambda settings: Engine(settings, model=tiny_model)), pump=ManualPump())
    try:
        first = logic.process(volume, segmentation, ids[:1], method="ofl", epochs=3, warmStartEpochs=1, **REAL)
        assert len(first["engine"]["labels"]["1"]["loss_history"]) == 3
        corrected = read_segments(segmentation, volume)[ids[0]][5].copy()
        corrected[10:30, 10:30] = ~corrected[10:30, 10:30]
        mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume)).write(ids[0], 0, 5, corrected)

        summary = logic.update()
        assert len(summary["engine"]["labels"]["1"]["loss_history"]) == 1  # warm start, not a fresh training
        assert summary["engine"]["edited"] == [5]
        np.testing.assert_array_equal(read_segments(segmentation, volume)[ids[0]][5], corrected)
    finally:
        logic.worker.shutdown()
