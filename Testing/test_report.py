"""Montage and box-plot pictures: sizes, colours where outlines and frames must be, statistics."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from oflsam2 import report
from oflsam2.errors import InputError


def colour_mask(image: Image.Image, colour) -> np.ndarray:
    return (np.asarray(image.convert("RGB")) == np.array(colour, dtype=np.uint8)).all(axis=-1)


def volume():
    """(8, 32, 32): reference square on planes 2..5, prediction shifted 4 px to the right."""
    image = np.random.default_rng(0).uniform(0, 100, size=(8, 32, 32)).astype(np.float32)
    reference = np.zeros((8, 32, 32), dtype=np.uint8)
    reference[2:6, 8:20, 8:20] = 1
    prediction = np.zeros_like(reference)
    prediction[2:6, 8:20, 12:24] = 1
    return image, reference, prediction


def test_montage_size_and_outline_colours(tmp_path):
    image, reference, prediction = volume()
    path = report.write_case_montage(
        tmp_path / "m.png", image, reference, prediction, num_slices=4, columns=2, tile_size=64, marked_slices=[0]
    )
    picture = Image.open(path)
    # Planes 2..5 hold objects (4 evenly spaced) plus the marked plane 0: 5 tiles in 2 columns.
    assert report.montage_slices(8, 4, masks=[reference, prediction], marked=[0]) == [0, 2, 3, 4, 5]
    assert picture.size == report.montage_size(5, 2, 64) == (2 * 64 + 3 * report.GAP, report.HEADER + 3 * 64 + 4 * report.GAP)
    # Tile 2 (plane 3) is the first tile of the second row; the 32 px plane is scaled x2.
    left, top = report.GAP, report.HEADER + 2 * report.GAP + 64
    tile = picture.crop((left, top, left + 64, top + 64))
    green, red = colour_mask(tile, report.REFERENCE_COLOR), colour_mask(tile, report.PREDICTION_COLOR)
    # Reference square spans x 16..39 at display scale, prediction 24..47 (drawn last, on top).
    assert green[30, 16] and not green[30, 30]
    assert red[30, 47] and red[30, 24] and not red[30, 35]
    assert not green[:, :14].any() and not red[:, :22].any()
    # The marked plane (first tile) is framed in the support colour; the others are not.
    first = picture.crop((report.GAP, report.HEADER + report.GAP, report.GAP + 64, report.HEADER + report.GAP + 64))
    assert colour_mask(first, report.SUPPORT_COLOR)[:, 0].all()
    assert not colour_mask(tile, report.SUPPORT_COLOR)[:, 0].any()


def test_montage_keeps_physical_aspect_and_orients_planes(tmp_path):
    image, _, _ = volume()
    superior = np.zeros((8, 32, 32), dtype=np.uint8)
    superior[5:8, 8:20, 8:20] = 1  # the top 3 of 8 planes along z
    # Coronal planes (axis 1) are 8 x 32 voxels of 4 x 1 mm: 32 mm tall, 32 mm wide -> square.
    path = report.write_case_montage(tmp_path / "c.png", image, superior, axis=1, spacing=(4.0, 1.0, 1.0), num_slices=1, tile_size=64)
    tile = np.asarray(Image.open(path))[report.HEADER + report.GAP : report.HEADER + report.GAP + 64, report.GAP : report.GAP + 64]
    assert (tile.sum(axis=-1) > 0).any(axis=1).sum() >= 62  # the plane fills the tile's height
    # Superior (high z, LPS +z) is drawn at the top: z 5..7 covers display rows 0..23.
    rows = np.flatnonzero(colour_mask(Image.fromarray(tile), report.REFERENCE_COLOR).any(axis=1))
    assert rows.min() == 0 and rows.max() == 23


def test_montage_with_marked_planes_only(tmp_path):
    image, reference, _ = volume()
    assert report.montage_slices(8, 0, masks=[reference], marked={6: "(1)"}) == [6]
    with pytest.raises(InputError, match="Nothing to show"):
        report.montage_slices(8, 0)
    with pytest.raises(InputError, match="shape"):
        report.write_case_montage(tmp_path / "x.png", image, reference[:4])


def test_outline_marks_borders_between_labels():
    labels = np.zeros((6, 6), dtype=int)
    labels[1:5, 1:3] = 1
    labels[1:5, 3:5] = 2
    edge = report.outline(labels)
    assert edge[1, 1] and edge[2, 2] and edge[2, 3]  # outer border and the 1|2 boundary
    assert not edge[0, 0] and not edge.any(where=labels == 0)


def test_box_stats():
    stats = report.box_stats([1, 2, 3, 4, 5, 6, 7, 8, 100, float("nan")])
    assert (stats["q1"], stats["median"], stats["q3"]) == (3.0, 5.0, 7.0)
    assert stats["high"] == 8.0 and stats["outliers"] == [100.0] and stats["count"] == 9


def test_boxplot_draws_one_box_per_method(tmp_path):
    values = {"sam2": [0.2, 0.3, 0.4, 0.5], "revsam2": [0.7, 0.8, 0.85, 0.9], "ofl": [0.55, 0.65, float("nan")]}
    picture = Image.open(report.write_dice_boxplot(tmp_path / "b.png", values))
    assert picture.size == (480, 420)  # the minimum width (3 slots of 120 px need 444)
    fill = colour_mask(picture, (150, 190, 235))
    columns = np.flatnonzero(fill.any(axis=0))
    # Three separate boxes, centred in their 120 px slots.
    groups = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    assert [int(np.mean(g)) for g in groups] == pytest.approx([64 + 60, 64 + 180, 64 + 300], abs=2)
    # The revsam2 box (Dice 0.76..0.86) sits higher than the sam2 one (0.27..0.43).
    rows_sam2 = np.flatnonzero(fill[:, groups[0]].any(axis=1))
    rows_rev = np.flatnonzero(fill[:, groups[1]].any(axis=1))
    assert rows_rev.max() < rows_sam2.min()
    with pytest.raises(InputError):
        report.write_dice_boxplot(tmp_path / "e.png", {"x": [float("nan")]})
