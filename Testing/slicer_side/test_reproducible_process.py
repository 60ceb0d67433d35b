"""Same input, same output through the Slicer logic: ``process(...)`` with OFL-SAM2 twice on a real
MR volume in real MRML gives the same segment, whatever the global random state in between
(issue 15). The worker is built as ``test_real_engine.py`` builds it: the real engine with the
session's random-weight SAM2.1-tiny at 256 px, on the worker's thread transport."""

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

    def engine(settings):
        assert (settings.model, settings.image_size, settings.random_weights) == ("sam2.1-tiny", 256, True)
        return Engine(settings, model=tiny_model)

    logic = OFLSAM2Logic(worker=Worker(engine), pump=ManualPump())
    yield logic
    logic.worker.shutdown()


def test_process_twice_gives_the_same_segment(scene, shared_data, logic):
    import torch

    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / "image_1.nii.gz"))
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / "label_1.nii.gz")))).astype(np.uint8)
    image, labels = image[:, :, 12:20], labels[12:20]  # 8 planes through the liver
    volume = add_volume_from_sitk(scene, image)
    annotation = np.zeros(labels.shape, bool)
    annotation[[1, 6]] = labels[[1, 6]] == 1

    results = []
    for global_seed in (11, 12):  # each run on its own copy of the user's annotation
        segmentation, ids = add_segmentation(scene, volume, {"Liver": annotation})
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        state = torch.random.get_rng_state()
        summary = logic.process(volume, segmentation, ids, method="ofl", axis="axial", epochs=2, **FAST)
        assert logic.lastRun.state == "completed"
        assert torch.equal(torch.random.get_rng_state(), state)  # the run left the global state alone
        results.append((summary["engine"]["labels"], read_segments(segmentation, volume)[ids[0]].copy()))
    (info0, seg0), (info1, seg1) = results
    label = next(iter(info0))
    assert info0[label]["loss_history"] == info1[label]["loss_history"]
    assert info0[label]["confidence"] == info1[label]["confidence"] and len(info0[label]["confidence"]) == 6
    np.testing.assert_array_equal(seg0, seg1)
    np.testing.assert_array_equal(seg0[[1, 6]], annotation[[1, 6]])  # annotated planes kept
