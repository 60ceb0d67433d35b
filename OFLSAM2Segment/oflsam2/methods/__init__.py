"""Segmentation methods. Each module's runner takes a RunContext and one label's SupportSet and
returns the label's masks as (N, H, W) bool along the run's axis."""

from __future__ import annotations

import importlib

_RUNNERS = {
    "sam2": ("sam2_propagation", "run"),
    "ofl": ("ofl", "run"),
    "revsam2": ("revsam2", "run"),
    "forward": ("revsam2", "run_forward"),
}


def runner(method: str):
    module, name = _RUNNERS[method]
    return getattr(importlib.import_module(f".{module}", __name__), name)
