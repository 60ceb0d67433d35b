"""OFLSAM2 engine: few-shot volume segmentation with SAM2 (OFL-SAM2, RevSAM2, SAM2 propagation).

Slicer-free: nothing in this package imports ``slicer``, ``qt`` or ``vtk``. The CLI, the Slicer
module's worker and the tests all drive it through :class:`Engine` (:mod:`oflsam2.api`), given
the settings types of :mod:`oflsam2.settings`. Importing the package loads no torch.
"""

from .settings import (
    DEFAULT_METHOD,
    METHOD_TITLES,
    METHODS,
    LabelSupport,
    MethodOptions,
    ModelSettings,
    Reference,
    SegmentResult,
)
from .version import __version__

__all__ = [
    "__version__",
    "DEFAULT_METHOD",
    "METHOD_TITLES",
    "METHODS",
    "Engine",
    "LabelSupport",
    "MethodOptions",
    "ModelSettings",
    "Reference",
    "SegmentResult",
]


def __getattr__(name: str):
    # Engine on first use: api.py is the model-running side, not needed to describe a run
    if name == "Engine":
        from .api import Engine

        return Engine
    if name == "review":  # oflsam2.review.suggest(result, n) after a plain `import oflsam2`, as the README shows
        import importlib

        return importlib.import_module(f"{__name__}.review")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
