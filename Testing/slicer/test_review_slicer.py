"""The Slicer side of the review loop (issue 11) against real MRML (slicer-core): a run that
cannot start its pump, per-slice quality, suggested slices and Update through the worker."""

from __future__ import annotations

import threading

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
