"""The Slicer side of the review loop and adapters under a hostile user (issue 24, sections 3, 4
and 6), against real MRML (slicer-core): cleared or shared empty annotated planes and later
Updates, Undo then review or Update, paint during a cancelled Update, the state folder of a
killed worker, an MR adapter on a CT volume, a cohort checked whole, a plane outside the volume.

The review loop runs the real engine (random-weight SAM2.1-tiny, 256 px, CPU) on real CHAOS T2
planes in a worker thread; the killed worker is a real process. An engine that blocks mid-update
(to cancel it) and one that copies annotations (where the model is not the point) stand in
elsewhere, as in the neighbouring tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import vtk
from fakes import CopyEngine, ManualPump
from mrml_helpers import add_segmentation, add_volume, add_volume_from_sitk, read_segments, require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from oflsam2.api import LabelSupport, MethodOptions, ModelSettings  # noqa: E402
from oflsam2.errors import InputError  # noqa: E402
from OFLSAM2SegmentLib import mrml_geometry, mrml_write  # noqa: E402
from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402
from OFLSAM2SegmentLib.testing import make_annotated_volume  # noqa: E402
from OFLSAM2SegmentLib.worker import MessageKind, SegmentRequest, Worker  # noqa: E402

FAST = {"randomWeights": True, "device": "cpu"}
REAL = {"randomWeights": True, "device": "cpu", "model": "sam2.1-tiny", "imageSize": 256}
LIVER, RIGHT_KIDNEY = 1, 2


@pytest.fixture
def chaos(scene, shared_data):
    """12 axial planes of CHAOS case 1 through the liver (cropped in-plane around it): Liver
    painted on planes 2 and 9, the right kidney on one plane where it shows."""
    sitk = pytest.importorskip("SimpleITK")
    folder = shared_data / "chaos_t2_fewshot"
    image = sitk.ReadImage(str(folder / "image_1.nii.gz"))
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_1.nii.gz")))).astype(np.uint8)
    liver = np.flatnonzero((labels == LIVER).any(axis=(1, 2)))
    z0 = int(liver[len(liver) // 2]) - 6
    rows = np.flatnonzero((labels == LIVER).any(axis=(0, 2)))
    columns = np.flatnonzero((labels == LIVER).any(axis=(0, 1)))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
    image = image[x0:x1, y0:y1, z0:z0 + 12]
    labels = labels[z0:z0 + 12, y0:y1, x0:x1]
    volume = add_volume_from_sitk(scene, image)
    liver_planes = np.zeros(labels.shape, bool)
    liver_planes[[2, 9]] = labels[[2, 9]] == LIVER
    kidney_plane = int(np.flatnonzero((labels == RIGHT_KIDNEY).any(axis=(1, 2)))[0]) + 1
    kidney = np.zeros(labels.shape, bool)
    kidney[kidney_plane] = labels[kidney_plane] == RIGHT_KIDNEY
    segmentation, ids = add_segmentation(scene, volume, {"Liver": liver_planes, "Right kidney": kidney})
    return {"volume": volume, "segmentation": segmentation, "ids": ids, "labels": labels, "kidney_plane": kidney_plane}


@pytest.fixture
def real_logic(tiny_model):
    from oflsam2.api import Engine

    logic = OFLSAM2Logic(worker=Worker(lambda settings: Engine(settings, model=tiny_model)), pump=ManualPump())
    yield logic
    logic.worker.shutdown()


def replace_plane(chaos, segment_id, index, plane):
    geometry = mrml_geometry.volume_geometry(chaos["volume"])
    mrml_write.SegmentPlaneReplacer(chaos["segmentation"], geometry).write(segment_id, 0, index, plane)


# --- empty annotated planes ------------------------------------------------------------------------


def test_a_cleared_false_positive_does_not_block_the_next_updates(chaos, real_logic):
    """Clearing a plane the run filled made it an annotated, empty plane; every later Update was
    then refused as "annotated slice erased"."""
    liver = chaos["ids"][0]
    real_logic.process(chaos["volume"], chaos["segmentation"], [liver], method="sam2", axis="axial", **REAL)
    after_run = read_segments(chaos["segmentation"], chaos["volume"])[liver]
    assert after_run[6].any(), "the untrained model left plane 6 empty: nothing to clear"
    replace_plane(chaos, liver, 6, np.zeros(after_run.shape[1:], bool))
    summary = real_logic.update()
    assert summary["engine"]["edited"] == [6]
    assert not read_segments(chaos["segmentation"], chaos["volume"])[liver][6].any()

    replace_plane(chaos, liver, 4, chaos["labels"][4] == LIVER)
    summary = real_logic.update()
    assert summary["engine"]["edited"] == [4]
    after = read_segments(chaos["segmentation"], chaos["volume"])[liver]
    assert not after[6].any() and np.array_equal(after[4], chaos["labels"][4] == LIVER)


def test_targets_that_share_annotated_planes_can_be_updated_again_and_again(chaos, real_logic):
    """Liver painted on 2 and 9, the kidney on another plane: after one Update each target's
    planes are the union, empty for the other target, and the next Update said "erased"."""
    liver, kidney = chaos["ids"]
    real_logic.process(chaos["volume"], chaos["segmentation"], [liver, kidney], method="sam2", axis="axial", **REAL)
    for plane in (5, 7):
        replace_plane(chaos, liver, plane, chaos["labels"][plane] == LIVER)
        summary = real_logic.update()
        assert summary["engine"]["edited"] == [plane]


def test_erasing_an_annotated_plane_is_still_refused(chaos, real_logic):
    liver = chaos["ids"][0]
    real_logic.process(chaos["volume"], chaos["segmentation"], [liver], method="sam2", axis="axial", **REAL)
    replace_plane(chaos, liver, 2, np.zeros(chaos["labels"].shape[1:], bool))
    with pytest.raises(InputError, match="cannot remove an annotation"):
        real_logic.update()


# --- Undo last run ---------------------------------------------------------------------------------


def test_after_undo_review_and_update_refuse_the_undone_run(chaos, real_logic):
    """The quality table, suggestions and Update kept pointing at the undone run: an Update after
    undo reported success and propagated nothing."""
    liver = chaos["ids"][0]
    real_logic.process(chaos["volume"], chaos["segmentation"], [liver], method="sam2", axis="axial", **REAL)
    replace_plane(chaos, liver, 5, chaos["labels"][5] == LIVER)
    real_logic.update()
    assert real_logic.undoLastRun()  # the Update is undone
    before = read_segments(chaos["segmentation"], chaos["volume"])
    assert real_logic.reviewedSegmentIds() == []
    for call in (lambda: real_logic.lastRunQuality(liver), lambda: real_logic.suggestNextSlices(liver, 2),
                 lambda: real_logic.nextSliceToCheck(liver), real_logic.update):
        with pytest.raises(InputError, match="last run was undone"):
            call()
    after = read_segments(chaos["segmentation"], chaos["volume"])
    for segment_id in chaos["ids"]:
        np.testing.assert_array_equal(after[segment_id], before[segment_id])
    real_logic.process(chaos["volume"], chaos["segmentation"], [liver], method="sam2", axis="axial", **REAL)
    assert real_logic.reviewedSegmentIds() == [liver]  # a new run is reviewed again


# --- a cancelled Update keeps the user's paint -----------------------------------------------------


class BlockingUpdateEngine(CopyEngine):
    """First run: :class:`CopyEngine`. Update: empties the planes between the first and last
    annotated ones one by one, waiting on ``release`` after the first (so a test can paint and
    cancel mid-update)."""

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
            result = np.array(previous.masks[support.label], dtype=bool)
            for count, index in enumerate(recomputed):
                if count == 1:
                    while not self.release.wait(0.01):
                        check_cancel(events)
                result[index] = False
                events.slice_done(support.label, axis, index, result[index])
            masks[support.label] = result
        return SegmentResult(masks, axis, previous.method, {"annotated": slices, "quality": {}, "edited": [],
                                                             "recomputed": {s.label: recomputed for s in supports}})


def test_paint_made_during_an_update_survives_its_cancel(scene):
    """A cancelled Update put the whole segments back: strokes made meanwhile were lost (they
    survive a first run's cancel)."""
    volume, segmentation, ids = make_annotated_volume(scene, shape=(12, 32, 32))
    target = ids[0]
    release = threading.Event()
    pump = ManualPump()
    logic = OFLSAM2Logic(worker=Worker(lambda settings: BlockingUpdateEngine(release)), pump=pump)
    try:
        logic.process(volume, segmentation, [target], method="sam2", **FAST)
        geometry = mrml_geometry.volume_geometry(volume)
        corrected = np.zeros((32, 32), bool)
        corrected[10:22, 10:22] = True
        mrml_write.SegmentPlaneReplacer(segmentation, geometry).write(target, 0, 5, corrected)  # annotated: 4 and 8
        before = read_segments(segmentation, volume)

        run = logic.update(waitForCompletion=False)
        deadline = time.monotonic() + 30
        while read_segments(segmentation, volume)[target][6].sum() >= before[target][6].sum():
            pump.step()  # until plane 6 was emptied by the update
            assert time.monotonic() < deadline, "the update wrote nothing"
        stroke = np.zeros((32, 32), bool)
        stroke[2:6, 24:30] = True
        painter = mrml_write.SegmentSliceWriter(segmentation, geometry)  # the user's brush, outside the run's writes
        painter.write(target, 0, 10, stroke)  # a plane the update does not touch
        painter.write(target, 0, 6, stroke)  # and one it already replaced
        run.cancel()
        release.set()
        pump.run_until_done(30)
        assert run.state == "cancelled"
        after = read_segments(segmentation, volume)
        np.testing.assert_array_equal(after[target][10], before[target][10] | stroke)
        np.testing.assert_array_equal(after[target][6], before[target][6] | stroke)
        kept = [i for i in range(12) if i not in (6, 10)]
        np.testing.assert_array_equal(after[target][kept], before[target][kept])
        np.testing.assert_array_equal(after[ids[1]], before[ids[1]])
    finally:
        logic.worker.shutdown()


# --- a killed worker's state folder ----------------------------------------------------------------

SETTINGS = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256)


def request(method: str) -> SegmentRequest:
    image = np.random.default_rng(0).random((4, 48, 48)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[1, 10:30, 12:34] = True
    return SegmentRequest(SETTINGS, image, [LabelSupport(1, "organ", mask, [1])], method, 0, "auto", MethodOptions(epochs=1))


def finish(job, timeout=300.0):
    assert job.finished.wait(timeout), "the worker did not answer"
    messages = list(job.messages())
    assert messages[-1][0] == MessageKind.DONE, messages[-1]
    return messages


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_the_state_folder_of_a_killed_worker_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A SIGKILLed worker left its private state folder, with the trained head, in the temp folder."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    first = Worker()
    try:
        finish(first.submit(request("ofl")))
        states = [p for p in temp.iterdir() if p.name.startswith("oflsam2-worker-state-")]
        assert len(states) == 1 and (states[0] / "adapter").is_dir()
        killed = first.pid
        os.kill(killed, signal.SIGKILL)
    finally:
        first.shutdown()  # reaps the killed process
    assert not os.path.exists(f"/proc/{killed}") or sys.platform != "linux"
    assert states[0].is_dir()

    # What must stay: a live worker's folder, another user's, a link to a folder elsewhere.
    live = temp / f"oflsam2-worker-state-{os.getpid()}-live"
    live.mkdir()
    gone = dead_pid()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep")
    (temp / f"oflsam2-worker-state-{gone}-link").symlink_to(precious, target_is_directory=True)
    others = temp / f"oflsam2-worker-state-{gone}-others"
    others.mkdir()
    if os.geteuid() == 0:
        os.chown(others, 65534, 65534)
    second = Worker()
    try:
        finish(second.submit(request("sam2")))
    finally:
        second.shutdown()
    assert not states[0].exists()
    assert live.is_dir() and (precious / "data").read_text() == "keep"
    assert (temp / f"oflsam2-worker-state-{gone}-link").is_symlink()
    assert others.is_dir() == (os.geteuid() == 0)  # not ours: left alone (without root it is ours)


# --- adapters ---------------------------------------------------------------------------------------


def save_mr_adapter(folder, name="Liver"):
    import torch

    from oflsam2.ofl.adapter import save_adapter

    save_adapter(folder, {"head": torch.nn.Linear(2, 2)}, {
        "model": "sam2.1-tiny", "config": "configs/sam2.1/sam2.1_hiera_t.yaml", "checkpoint_sha256": "random-weights:0",
        "image_size": 256, "preset": "mr", "axis": 0, "label": 1, "label_name": name,
        "intensity": {"modality": "mr", "low": 12.0, "high": 880.0}})
    return folder


def test_an_mr_adapter_on_a_ct_volume_is_warned(scene, shared_data, tmp_path):
    """The CLI warned; Slicer said nothing."""
    sitk = pytest.importorskip("SimpleITK")
    ct = sitk.ReadImage(str(shared_data / "totalsegmentator_ct_mr" / "example_ct.nii.gz"))[20:100, 20:90, 40:52]
    volume = add_volume_from_sitk(scene, sitk.Cast(ct, sitk.sitkFloat32), name="CT")
    segmentation, ids = add_segmentation(scene, volume, {"Liver": np.zeros(ct.GetSize()[::-1], bool)})
    logic = OFLSAM2Logic(worker=Worker(lambda settings: CopyEngine()), pump=ManualPump())
    try:
        summary = logic.process(volume, segmentation, ids, method="ofl", adapter=str(save_mr_adapter(tmp_path / "a")),
                                model="sam2.1-tiny", imageSize=256, **FAST)
    finally:
        logic.worker.shutdown()
    warned = [w for w in summary["warnings"] if "mr-like intensities" in w]
    assert len(warned) == 1 and "looks like ct" in warned[0] and "'Liver'" in warned[0], summary["warnings"]


def cohort_logic():
    engine = CopyEngine()
    return OFLSAM2Logic(worker=Worker(lambda settings: engine), pump=ManualPump()), engine


def test_a_cohort_with_a_thin_volume_is_refused_before_any_volume_is_segmented(scene, tmp_path):
    """The first volume was segmented (and thrown away) before the thin one was refused."""
    adapter = save_mr_adapter(tmp_path / "a")
    good = add_volume(scene, np.random.default_rng(0).random((6, 32, 32)).astype(np.float32), (1.0, 1.0, 3.0), name="good")
    thin = add_volume(scene, np.random.default_rng(1).random((6, 32, 5)).astype(np.float32), (1.0, 1.0, 3.0), name="thin")
    logic, engine = cohort_logic()
    nodes = scene.GetNumberOfNodes()
    try:
        with pytest.raises(InputError, match="'thin'.*at least 8x8"):
            logic.segmentVolumesWithAdapter([good, thin], str(adapter), **FAST)
    finally:
        logic.worker.shutdown()
    assert engine.calls == [] and scene.GetNumberOfNodes() == nodes


def test_a_cohort_volume_under_a_transform_gets_its_segmentation_under_it(scene, tmp_path):
    """A volume under a transform was refused (after the others were segmented): its new
    segmentation was made outside the transform."""
    adapter = save_mr_adapter(tmp_path / "a")
    volumes = [add_volume(scene, np.random.default_rng(i).random((6, 32, 32)).astype(np.float32), (1.0, 1.0, 3.0),
                          name=f"case{i}") for i in range(2)]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(matrix)
    volumes[1].SetAndObserveTransformNodeID(transform.GetID())
    logic, engine = cohort_logic()
    try:
        created = logic.segmentVolumesWithAdapter(volumes, str(adapter), **FAST)
    finally:
        logic.worker.shutdown()
    assert len(created) == 2 and len(engine.calls) == 2
    assert created[1].GetTransformNodeID() == transform.GetID() and created[0].GetTransformNodeID() is None


# --- a plane outside the volume ----------------------------------------------------------------------


def test_the_centre_of_a_plane_outside_the_volume_is_refused(scene):
    """reviewedPlaneCenterRas(99) on a 12-plane volume returned a point outside it."""
    volume, segmentation, ids = make_annotated_volume(scene, shape=(12, 32, 32))
    logic = OFLSAM2Logic(worker=Worker(lambda settings: CopyEngine()), pump=ManualPump())
    try:
        logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
        for index in (99, 12, -1):
            with pytest.raises(InputError, match=r"planes 0\.\.11"):
                logic.reviewedPlaneCenterRas(index)
        assert len(logic.reviewedPlaneCenterRas(11)) == 3
    finally:
        logic.worker.shutdown()
