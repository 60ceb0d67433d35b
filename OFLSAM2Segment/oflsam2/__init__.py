"""OFLSAM2 engine: few-shot volume segmentation with SAM2 (OFL-SAM2, RevSAM2, SAM2 propagation).

Slicer-free: nothing in this package imports ``slicer``, ``qt`` or ``vtk``. The CLI, the Slicer
module's worker thread and the tests all drive it through :mod:`oflsam2.api`.
"""

__version__ = "0.1.0"
