"""Segmentation methods. Each module's runner takes a RunContext and one label's SupportSet and
returns the label's masks as (N, H, W) bool along the run's axis."""

from __future__ import annotations

import importlib

# Each method of settings.METHODS -> (its module in this package, the runner function there).
# Imported on first use: the modules load torch and sam2.
RUNNERS = {
    "ofl": ("ofl", "run"),
    "revsam2": ("revsam2", "run"),
    "forward": ("revsam2", "run_forward"),
    "sam2": ("sam2_propagation", "run"),
}


def runner(method: str):
    module, name = RUNNERS[method]
    return getattr(importlib.import_module(f".{module}", __name__), name)
