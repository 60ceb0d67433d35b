"""The Slicer logic with the real oflsam2 engine (random-weight SAM2.1-tiny at 256 px on the CPU,
built once per session) and real MRML classes (slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import ManualPump
from mrml_helpers import add_segmentation, add_volume_from_sitk, read_segments, require_slicer

slicer = require_slicer()
pytestmark = [pytest.mark.slicer, pytest.mark.slow]

from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402
from OFLSAM2SegmentLib.worker import Worker  # noqa: E402

FAST = {"randomWeights": True, "device": "cpu", "model": "sam2.1-tiny", "imageSize": 256}


@pytest.fixture
def logic(tiny_model):
    from oflsam2.api import Engine

    def engine(settings):  # the session's random-weight SAM2.1-tiny
        assert (settings.model, settings.image_size, settings.random_weights) == ("sam2.1-tiny", 256, True)
        return Engine(settings, model=tiny_model)

    logic = OFLSAM2Logic(worker=Worker(engine), pump=ManualPump())
    yield logic
    logic.worker.shutdown()


def test_sam2_propagation_on_a_real_volume(scene, shared_data, logic):
    """Three slices of a real MR volume: every non-annotated slice is written, the annotated
    one is not touched, neither is the other segment."""
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / "image_1.nii.gz"))
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / "label_1.nii.gz")))).astype(np.uint8)
    liver_planes = np.flatnonzero((labels == 1).any(axis=(1, 2)))
    middle = int(liver_planes[len(liver_planes) // 2])
    image = image[:, :, middle - 1:middle + 2]
    labels = labels[middle - 1:middle + 2]
    volume = add_volume_from_sitk(scene, image)
    annotation = np.zeros(labels.shape, bool)
    annotation[1] = labels[1] == 1
    segmentation, ids = add_segmentation(scene, volume, {"Liver": annotation, "Spleen": labels == 4})
    before = read_segments(segmentation, volume)

    summary = logic.process(volume, segmentation, ids[:1], method="sam2", axis="axial", **FAST)

    assert summary["segments"][ids[0]]["written"] == 2
    assert summary["engine"]["random_weights"] is True
    after = read_segments(segmentation, volume)
    np.testing.assert_array_equal(after[ids[0]][1], before[ids[0]][1])
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]])


def test_ofl_adapter_is_saved_and_segments_a_cohort(scene, logic, tmp_path):
    """OFL-SAM2 trains on the annotated slices and saves its adapter; a second volume is then
    segmented from the adapter alone."""
    from OFLSAM2SegmentLib.testing import make_annotated_volume

    volume, segmentation, ids = make_annotated_volume(scene, shape=(6, 48, 48))
    before = read_segments(segmentation, volume)
    adapter = tmp_path / "adapter"

    summary = logic.saveAdapter(volume, segmentation, str(adapter), ids[:1], epochs=1, **FAST)

    assert summary["method"] == "ofl" and summary["segments"][ids[0]]["written"] == 4
    assert (adapter / "Target.json").is_file()
    np.testing.assert_array_equal(read_segments(segmentation, volume)[ids[1]], before[ids[1]])
    cohort, _, _ = make_annotated_volume(scene, shape=(6, 48, 48))
    (created,) = logic.segmentVolumesWithAdapter([cohort], str(adapter), **FAST)
    names = [created.GetSegmentation().GetNthSegment(i).GetName() for i in range(created.GetSegmentation().GetNumberOfSegments())]
    assert names == ["Target"]
    assert logic.lastRun.state == "completed"
    assert logic.lastRun.summary["segments"][created.GetSegmentation().GetNthSegmentID(0)]["written"] == 6
