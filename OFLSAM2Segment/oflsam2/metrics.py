"""Segmentation metrics on 3-D binary volumes.

Masks are ``(z, y, x)`` arrays (anything non-zero is foreground) and ``spacing`` is the voxel
size in mm in the same ``(z, y, x)`` order (``image.GetSpacing()[::-1]`` for SimpleITK).
Every function returns a plain ``float``.

Libraries (record them with results, HD95 variants differ, see method guide §6):

- Dice, HD95 and ASSD: ``medpy.metric.binary`` 0.5.2 (``dc``, ``hd95``, ``assd``). Surfaces are
  the foreground voxels removed by one erosion with 6-connectivity (voxels on the array border
  count as surface); HD95 is the 95th percentile of the pooled distances of both directions;
  ASSD is the mean of those pooled distances (both directions together).
- NSD: DeepMind's ``surface-distance`` 0.1 (``compute_surface_dice_at_tolerance``), which
  weights surface elements by their area: the fraction of both surfaces lying within
  ``tolerance_mm`` of the other surface.

Empty masks (the SAMed/TransUNet protocol that OFL-SAM2 reports, kept for the headline):

============================  ======  ==========  ================  ======
prediction / reference         dice   hd95_voxel  hd95_mm, assd_mm   nsd
============================  ======  ==========  ================  ======
both non-empty                 value  value       value             value
pred non-empty, ref empty      1      0           NaN               0
pred empty, ref non-empty      0      0           NaN               0
both empty                     1 *    0 *         NaN               1 *
============================  ======  ==========  ================  ======

The first three rows are SAMed's ``calculate_metric_percase`` (its "pred non-empty, ref empty
-> (1, 0)" and "pred empty -> (0, 0)" are kept as they are, so numbers compare with the
papers). Both-empty (*) is a project convention: SAMed's code gives 0 there, which would
punish a correct "organ absent"; ``both_empty="exclude"`` returns NaN instead so the case drops
out of means. Distances in mm are undefined with an empty side: NaN, flagged by ``pred_empty``
/ ``ref_empty`` in :func:`case_metrics`.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

from .errors import InputError

BOTH_EMPTY_CHOICES = ("one", "exclude")
METRIC_LIBRARIES = "medpy 0.5.2 (dice, hd95, assd); surface-distance 0.1 (nsd)"
METRIC_NAMES = ("dice", "hd95_voxel", "hd95_mm", "assd_mm", "nsd")


def dice(pred, ref, *, both_empty: str = "one") -> float:
    """Dice coefficient of two binary ``(z, y, x)`` volumes, SAMed conventions for empty masks."""
    from medpy.metric import binary

    pred, ref = _binary_pair(pred, ref)
    empty = _empty_value(pred, ref, both_empty, both=1.0, pred_only=0.0, ref_only=1.0)
    if empty is not None:
        return empty
    return float(binary.dc(pred, ref))


def hd95_voxel(pred, ref, *, both_empty: str = "one") -> float:
    """HD95 in voxel units (no spacing): OFL-SAM2's headline "HD", SAMed conventions."""
    from medpy.metric import binary

    pred, ref = _binary_pair(pred, ref)
    empty = _empty_value(pred, ref, both_empty, both=0.0, pred_only=0.0, ref_only=0.0)
    if empty is not None:
        return empty
    pred, ref = _crop_to_objects(pred, ref)
    return float(binary.hd95(pred, ref))


def hd95_mm(pred, ref, spacing: Sequence[float]) -> float:
    """HD95 in mm with ``spacing`` ``(z, y, x)``; NaN when either mask is empty."""
    from medpy.metric import binary

    pred, ref = _binary_pair(pred, ref)
    spacing = _check_spacing(spacing)
    if not pred.any() or not ref.any():
        return math.nan
    pred, ref = _crop_to_objects(pred, ref)
    return float(binary.hd95(pred, ref, voxelspacing=spacing))


def assd_mm(pred, ref, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm; NaN when either mask is empty."""
    from medpy.metric import binary

    pred, ref = _binary_pair(pred, ref)
    spacing = _check_spacing(spacing)
    if not pred.any() or not ref.any():
        return math.nan
    pred, ref = _crop_to_objects(pred, ref)
    return float(binary.assd(pred, ref, voxelspacing=spacing))


def nsd(pred, ref, spacing: Sequence[float], tolerance_mm: float = 1.0, *, both_empty: str = "one") -> float:
    """Normalised surface Dice at ``tolerance_mm`` (RevSAM2's mNSD); 0 with one empty side."""
    import surface_distance

    pred, ref = _binary_pair(pred, ref)
    spacing = _check_spacing(spacing)
    if not (isinstance(tolerance_mm, (int, float)) and math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise InputError(f"The NSD tolerance must be a number of mm >= 0; got {tolerance_mm!r}.")
    empty = _empty_value(pred, ref, both_empty, both=1.0, pred_only=0.0, ref_only=0.0)
    if empty is not None:
        return empty
    with warnings.catch_warnings():
        # surface-distance 0.1 imports scipy.ndimage.morphology (deprecated, gone in SciPy 2).
        warnings.simplefilter("ignore", DeprecationWarning)
        distances = surface_distance.compute_surface_distances(ref, pred, spacing)
    return float(surface_distance.compute_surface_dice_at_tolerance(distances, float(tolerance_mm)))


def case_metrics(pred, ref, spacing: Sequence[float], *, nsd_tolerance_mm: float = 1.0, both_empty: str = "one") -> dict:
    """Every metric of one binary pair, plus the counts that pooled Dice and the tables need.

    Returns ``dice``, ``hd95_voxel``, ``hd95_mm``, ``assd_mm``, ``nsd`` (floats, see the module
    docstring for empty masks), ``pred_empty`` / ``ref_empty`` (bools) and ``tp``,
    ``pred_voxels``, ``ref_voxels`` (ints).
    """
    pred, ref = _binary_pair(pred, ref)
    return {
        "dice": dice(pred, ref, both_empty=both_empty),
        "hd95_voxel": hd95_voxel(pred, ref, both_empty=both_empty),
        "hd95_mm": hd95_mm(pred, ref, spacing),
        "assd_mm": assd_mm(pred, ref, spacing),
        "nsd": nsd(pred, ref, spacing, nsd_tolerance_mm, both_empty=both_empty),
        "pred_empty": not pred.any(),
        "ref_empty": not ref.any(),
        "tp": int(np.count_nonzero(pred & ref)),
        "pred_voxels": int(np.count_nonzero(pred)),
        "ref_voxels": int(np.count_nonzero(ref)),
    }


def pooled_dice(tp: int, pred_voxels: int, ref_voxels: int) -> float:
    """Dice of voxel counts summed over cases (FS-MedSAM2's "pooled" Dice); NaN if both are 0."""
    total = pred_voxels + ref_voxels
    return 2.0 * tp / total if total else math.nan


def _binary_pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred) != 0
    ref = np.asarray(ref) != 0
    if pred.ndim != 3 or ref.ndim != 3:
        raise InputError(f"Metrics need 3-D (z, y, x) masks; got shapes {pred.shape} and {ref.shape}.")
    if pred.shape != ref.shape:
        raise InputError(f"The prediction {pred.shape} and the reference {ref.shape} differ in shape (z, y, x).")
    return pred, ref


def _check_spacing(spacing) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise InputError(f"The spacing must be three positive numbers (z, y, x) in mm; got {tuple(spacing)!r}.")
    return values


def _empty_value(pred, ref, both_empty: str, *, both: float, pred_only: float, ref_only: float) -> float | None:
    """The conventional value when a mask is empty, or None when both hold an object."""
    if both_empty not in BOTH_EMPTY_CHOICES:
        raise InputError(f"both_empty must be one of {BOTH_EMPTY_CHOICES}; got {both_empty!r}.")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if has_pred and has_ref:
        return None
    if has_pred:
        return ref_only
    if has_ref:
        return pred_only
    return both if both_empty == "one" else math.nan


def _crop_to_objects(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box plus one voxel (clipped to the array).

    Surface voxels and their nearest-surface distances are unchanged (every surface voxel stays
    inside, and the array border stays where it was), while the distance transforms get small.
    """
    occupied = np.argwhere(pred | ref)
    low = np.maximum(occupied.min(axis=0) - 1, 0)
    high = np.minimum(occupied.max(axis=0) + 2, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    return pred[box], ref[box]
