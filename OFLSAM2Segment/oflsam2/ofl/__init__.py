"""OFL-SAM2's trainable parts, pure torch: the few-shot learner (τ by unrolled steepest
descent, learnable ridge scale λ), the channel lift and adaptive fusion module, and the
adapter files that carry them from one run to the next.

The names below are imported on first use: importing the package (e.g. for the torch-free
:mod:`.adapter_metadata`, which Slicer's process uses) loads no torch.
"""

import importlib

_EXPORTS = {
    "AdaptiveFusion": "fusion",
    "ChannelLift": "fusion",
    "FewShotLearner": "learner",
    "list_adapters": "adapter_metadata",
    "load_adapter": "adapter",
    "save_adapter": "adapter",
    "sum_fusion": "fusion",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
