"""Hostile pass of 12-07, Slicer side: a server URL typed wrong in *Compute on*, against real
MRML (slicer-core). Before, ``http://[::1`` or a port above 65535 escaped as urllib's raw
``ValueError`` from ``useServer``, *Test connection* and every Apply (the settings keep the
URL); now each is the module's ``ServerError`` with the reason, and the segmentation is
untouched."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import ManualPump
from mrml_helpers import add_segmentation, add_volume, read_segments, require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from oflsam2.client import ServerError  # noqa: E402
from OFLSAM2SegmentLib import compute  # noqa: E402
from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402

MALFORMED = ["http://[::1", "http://127.0.0.1:99999", "https://gpu-box:0"]


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_server_url_is_refused_with_the_reason(url, scene):
    volume = add_volume(scene, np.random.default_rng(0).normal(size=(6, 32, 32)).astype(np.float32))
    annotation = np.zeros((6, 32, 32), bool)
    annotation[[1, 4], 8:20, 8:20] = True
    segmentation, ids = add_segmentation(scene, volume, {"Liver": annotation})
    before = read_segments(segmentation, volume)
    logic = OFLSAM2Logic(pump=ManualPump(), installer=lambda: pytest.fail("nothing may be installed"))
    with pytest.raises(ServerError, match="malformed"):
        logic.useServer(url, "a-token")
    with pytest.raises(ServerError, match="malformed"):
        logic.testServerConnection(url, "a-token")
    compute.save(compute.ComputeSettings(compute.SERVER, url, "a-token"))  # what the Compute section keeps
    try:
        with pytest.raises(ServerError, match="malformed"):
            logic.process(volume, segmentation, ids, method="sam2", randomWeights=True, device="cpu")
    finally:
        compute.save(compute.ComputeSettings())
    after = read_segments(segmentation, volume)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
