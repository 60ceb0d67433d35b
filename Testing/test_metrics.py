"""Metrics on hand-computed shapes, every empty-mask convention, and a brute-force cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from oflsam2 import metrics
from oflsam2.errors import InputError


def cube(shape=(10, 10, 10), low=(2, 2, 2), size=4) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, a + size) for a in low)] = True
    return mask


# A 4^3 cube and the same cube one voxel further along z (array axis 0). Hand counts: each
# has 56 surface voxels (64 - 2^3 inside); the bottom face (16) and the 4 inner voxels of the
# top face are 1 voxel step from the other's surface, the rest lie on it.
A = cube()
B = cube(low=(3, 2, 2))


def test_shifted_cube_isotropic():
    assert metrics.dice(A, B) == 0.75  # 48 shared voxels of 64 + 64
    assert metrics.hd95_voxel(A, B) == 1.0
    assert metrics.hd95_mm(A, B, (1, 1, 1)) == 1.0
    assert metrics.assd_mm(A, B, (1, 1, 1)) == pytest.approx(20 / 56)


def test_shifted_cube_anisotropic_spacing_is_z_y_x():
    # Along z a step is 2 mm; the 4 inner top-face voxels reach the other surface in-plane (0.5 mm).
    spacing = (2.0, 0.5, 0.5)
    assert metrics.hd95_mm(A, B, spacing) == 2.0
    assert metrics.assd_mm(A, B, spacing) == pytest.approx((16 * 2.0 + 4 * 0.5) / 56)
    assert metrics.hd95_voxel(A, B) == 1.0  # the headline HD ignores spacing
    # The same shift along x (last axis) is measured with the x spacing.
    shifted_x = cube(low=(2, 2, 3))
    assert metrics.hd95_mm(A, shifted_x, spacing) == 0.5


def test_identical_masks():
    values = metrics.case_metrics(A, A, (3.0, 1.0, 1.0))
    assert values["dice"] == 1.0 and values["hd95_voxel"] == 0.0 and values["hd95_mm"] == 0.0
    assert values["assd_mm"] == 0.0 and values["nsd"] == 1.0
    assert (values["tp"], values["pred_voxels"], values["ref_voxels"]) == (64, 64, 64)
    assert all(type(values[k]) is float for k in metrics.METRIC_NAMES)


def test_nsd_tolerance_against_the_z_step():
    # Shifted by one 3 mm step along z: the bottom face lies exactly 3 mm from the other surface.
    spacing = (3.0, 1.0, 1.0)
    assert metrics.nsd(A, B, spacing, tolerance_mm=3.0) == pytest.approx(1.0)
    assert 0.5 < metrics.nsd(A, B, spacing, tolerance_mm=2.9) < 1.0
    # With the spacing order reversed the z step would be 1 mm and everything within 2.9 mm.
    assert metrics.nsd(A, B, (1.0, 1.0, 3.0), tolerance_mm=2.9) == pytest.approx(1.0)


def test_nsd_of_distant_and_partly_overlapping_cubes():
    far = cube(shape=(10, 10, 30), low=(2, 2, 20))
    near = cube(shape=(10, 10, 30), low=(2, 2, 2))
    assert metrics.nsd(near, far, (1, 1, 1), tolerance_mm=1.0) == 0.0
    # Cubes of side 10 shifted by 3 along z, tolerance 0.5 mm: the 7/10 of each cube's side walls
    # that coincide (280 of its 600 surface area) and, on the face that lies inside the other
    # cube, the one-voxel rim along the other's walls (4 x 10): (280 + 40) / 600 on both sides.
    big = cube(shape=(20, 16, 16), low=(2, 3, 3), size=10)
    moved = cube(shape=(20, 16, 16), low=(5, 3, 3), size=10)
    assert metrics.nsd(big, moved, (1, 1, 1), tolerance_mm=0.5) == pytest.approx(320 / 600, abs=0.02)


EMPTY = np.zeros((10, 10, 10), dtype=bool)


@pytest.mark.parametrize(
    "pred, ref, dice, hd95, nsd",
    [
        (A, EMPTY, 1.0, 0.0, 0.0),  # SAMed: prediction without reference -> (1, 0)
        (EMPTY, A, 0.0, 0.0, 0.0),  # SAMed: empty prediction -> (0, 0)
        (EMPTY, EMPTY, 1.0, 0.0, 1.0),  # project convention
    ],
    ids=["pred-only", "ref-only", "both-empty"],
)
def test_empty_conventions(pred, ref, dice, hd95, nsd):
    values = metrics.case_metrics(pred, ref, (1, 1, 1))
    assert (values["dice"], values["hd95_voxel"], values["nsd"]) == (dice, hd95, nsd)
    assert math.isnan(values["hd95_mm"]) and math.isnan(values["assd_mm"])
    assert values["pred_empty"] == (not pred.any()) and values["ref_empty"] == (not ref.any())


def test_both_empty_can_be_excluded():
    values = metrics.case_metrics(EMPTY, EMPTY, (1, 1, 1), both_empty="exclude")
    assert all(math.isnan(values[k]) for k in metrics.METRIC_NAMES)
    # Exclusion only concerns the both-empty case.
    assert metrics.dice(EMPTY, A, both_empty="exclude") == 0.0
    assert metrics.dice(A, A, both_empty="exclude") == 1.0


def test_pooled_dice():
    assert metrics.pooled_dice(48, 64, 64) == 0.75
    assert math.isnan(metrics.pooled_dice(0, 0, 0))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: metrics.dice(A, A[:5]), "differ in shape"),
        (lambda: metrics.dice(A[0], A[0]), "3-D"),
        (lambda: metrics.hd95_mm(A, B, (1, 0, 1)), "spacing"),
        (lambda: metrics.assd_mm(A, B, (1, 1)), "spacing"),
        (lambda: metrics.nsd(A, B, (1, 1, 1), tolerance_mm=-1), "tolerance"),
        (lambda: metrics.dice(A, B, both_empty="zero"), "both_empty"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(InputError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# Independent brute force: surface voxels by explicit 6-neighbour look-ups (outside the array is
# background), all pairwise distances between the two surfaces.


def brute_surface(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    neighbours_all_in = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            neighbours_all_in &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(inner & ~neighbours_all_in)


def brute_distances(pred, ref, spacing):
    a = brute_surface(pred) * np.asarray(spacing)
    b = brute_surface(ref) * np.asarray(spacing)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return pairwise.min(axis=1), pairwise.min(axis=0)


def random_mask(rng, shape) -> np.ndarray:
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 1.2)
    return smooth > np.quantile(smooth, 0.7)


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 12, 14)  # objects touch the array border: checks that cropping keeps it
    pred, ref = random_mask(rng, shape), random_mask(rng, shape)
    spacing = (2.5, 0.7, 1.1)
    d_pred, d_ref = brute_distances(pred, ref, spacing)
    pooled = np.concatenate([d_pred, d_ref])
    assert metrics.hd95_mm(pred, ref, spacing) == pytest.approx(np.percentile(pooled, 95))
    assert metrics.assd_mm(pred, ref, spacing) == pytest.approx(pooled.mean())
    v_pred, v_ref = brute_distances(pred, ref, (1, 1, 1))
    assert metrics.hd95_voxel(pred, ref) == pytest.approx(np.percentile(np.concatenate([v_pred, v_ref]), 95))
    overlap = np.count_nonzero(pred & ref)
    assert metrics.dice(pred, ref) == pytest.approx(2 * overlap / (pred.sum() + ref.sum()))


def test_small_object_far_from_the_border_is_cropped_consistently():
    pred = cube(shape=(40, 60, 60), low=(10, 20, 30), size=3)
    ref = cube(shape=(40, 60, 60), low=(12, 24, 30), size=3)
    spacing = (3.0, 0.8, 0.8)
    pooled = np.concatenate(brute_distances(pred, ref, spacing))
    assert metrics.hd95_mm(pred, ref, spacing) == pytest.approx(np.percentile(pooled, 95))
    assert metrics.assd_mm(pred, ref, spacing) == pytest.approx(pooled.mean())
