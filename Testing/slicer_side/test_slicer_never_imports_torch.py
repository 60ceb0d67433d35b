"""Slicer's own process never imports torch, sam2 or safetensors: the engine runs in the worker
process. Before, the first quality table after a run imported torch into Slicer
(``logic.lastRunQuality`` -> ``oflsam2.review`` -> ``methods.sweep``), freezing it for seconds
(and failing where torch cannot exist, e.g. macOS x86_64), and so did the adapters list
(``options.read_adapters`` -> ``oflsam2.ofl.adapter``).

``slicer_without_torch.py`` blocks the three packages with a meta-path finder in a fresh
process, loads the module with Slicer's rules and drives every Slicer-side path with the real
engine (random-weight SAM2.1-tiny, 256 px, CPU) against real MRML."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mrml_helpers import require_slicer

require_slicer()
pytestmark = pytest.mark.slicer

FLOW = Path(__file__).with_name("slicer_without_torch.py")


def test_every_slicer_side_path_runs_with_torch_sam2_and_safetensors_unimportable(tmp_path):
    done = subprocess.run([sys.executable, str(FLOW), str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["attempts"] == [] and found["loaded"] == [], found["attempts"]
    assert found["ofl_written"] == 7 and found["with_adapter"] == [["Target"]]  # 9 planes, 2 annotated
    assert found["review_rows"] == 9 and found["effect_review_rows"] == 9  # every plane scored
    assert found["update_edited"] == [1] and found["adapters"] == ["Target"]
    assert found["suggested"] and found["next_slice"] == found["suggested"][0]
    assert found["effect_state"] == "completed" and found["worker_pid"]
