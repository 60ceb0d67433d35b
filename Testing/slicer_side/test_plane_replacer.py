"""Update's plane writes (``mrml_write.SegmentPlaneReplacer``) against real MRML (slicer-core).

A replaced plane holds exactly the new mask; every other plane of the segment and every other
segment stay bit-identical, on the grid each segment is stored on; annotated planes are refused;
one undo state puts everything back. Checked on shared layers (label values 1 and 2), on
segmentation grids other than the volume's and on a real CHAOS volume.
"""

from __future__ import annotations

import numpy as np
import pytest
from mrml_helpers import add_segmentation, add_volume, add_volume_from_sitk, read_segments, require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from test_segmentation_safety import GRIDS, grid_image, grid_matrix, layer_matrices, stored_segments  # noqa: E402

from OFLSAM2SegmentLib import mrml_geometry, mrml_undo, mrml_write  # noqa: E402

SHAPE = (6, 9, 10)  # z, y, x


def shared_layer_case(scene):
    """A (label value 1) and B (label value 2) on one layer, both on every plane, not overlapping."""
    volume = add_volume(scene, np.zeros(SHAPE, np.float32), (1.0, 1.0, 2.0))
    a = np.zeros(SHAPE, bool)
    a[:, 1:4, 1:8] = True
    b = np.zeros(SHAPE, bool)
    b[:, 5:8, 2:9] = True
    segmentation, ids = add_segmentation(scene, volume, {"A": a, "B": b})
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1
    assert segmentation.GetSegmentation().GetSegment(ids[1]).GetLabelValue() == 2
    return volume, segmentation, ids


def replaced(mask: np.ndarray, axis: int, index: int, plane: np.ndarray) -> np.ndarray:
    out = mask.copy()
    selector = [slice(None)] * 3
    selector[axis] = index
    out[tuple(selector)] = plane
    return out


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_replaced_plane_holds_the_new_mask_and_nothing_else_changes(scene, axis):
    volume, segmentation, ids = shared_layer_case(scene)
    before = read_segments(segmentation, volume)
    geometry = mrml_geometry.volume_geometry(volume)
    index = {0: 3, 1: 6, 2: 4}[axis]  # a plane where B has voxels
    old = np.take(before[ids[1]], index, axis=axis)
    new = np.zeros(geometry.plane_shape(axis), bool)
    rows, columns = np.nonzero(old)
    new[rows[: len(rows) // 2], columns[: len(rows) // 2]] = True  # half of B's voxels kept, the rest cleared
    free = ~np.take(before[ids[0]] | before[ids[1]], index, axis=axis)
    new[np.nonzero(free)[0][-3:], np.nonzero(free)[1][-3:]] = True  # and new ones where no segment is
    assert (old & ~new).any() and (new & ~old).any()

    assert mrml_write.SegmentPlaneReplacer(segmentation, geometry).write(ids[1], axis, index, new)

    after = read_segments(segmentation, volume)
    np.testing.assert_array_equal(np.take(after[ids[1]], index, axis=axis), new)
    np.testing.assert_array_equal(after[ids[1]], replaced(before[ids[1]], axis, index, new))  # other planes as they were
    np.testing.assert_array_equal(after[ids[0]], before[ids[0]])


def test_a_mask_over_another_segment_moves_the_target_to_its_own_layer_and_keeps_the_other(scene):
    volume, segmentation, ids = shared_layer_case(scene)
    before = read_segments(segmentation, volume)
    geometry = mrml_geometry.volume_geometry(volume)
    new = np.zeros(geometry.plane_shape(0), bool)
    new[2:7, 3:6] = True  # covers part of A and part of B on plane 2

    mrml_write.SegmentPlaneReplacer(segmentation, geometry).write(ids[1], 0, 2, new)

    after = read_segments(segmentation, volume)
    np.testing.assert_array_equal(after[ids[1]], replaced(before[ids[1]], 0, 2, new))
    np.testing.assert_array_equal(after[ids[0]], before[ids[0]])


def test_an_empty_plane_clears_the_segment_there_only_and_an_empty_segment_gets_its_first_plane(scene):
    volume, segmentation, ids = shared_layer_case(scene)
    empty = segmentation.GetSegmentation().AddEmptySegment("C", "C")
    assert empty
    before = read_segments(segmentation, volume)
    geometry = mrml_geometry.volume_geometry(volume)
    writer = mrml_write.SegmentPlaneReplacer(segmentation, geometry)
    first = np.zeros(geometry.plane_shape(0), bool)
    first[4, 4] = True

    writer.write(ids[0], 0, 1, np.zeros(geometry.plane_shape(0), bool))
    writer.write(empty, 0, 5, first)

    after = read_segments(segmentation, volume)
    np.testing.assert_array_equal(after[ids[0]], replaced(before[ids[0]], 0, 1, np.zeros(geometry.plane_shape(0), bool)))
    np.testing.assert_array_equal(after[empty], replaced(before[empty], 0, 5, first))
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]])


def test_protected_planes_are_refused_and_left_as_drawn(scene):
    volume, segmentation, ids = shared_layer_case(scene)
    before = read_segments(segmentation, volume)
    geometry = mrml_geometry.volume_geometry(volume)
    writer = mrml_write.SegmentPlaneReplacer(segmentation, geometry, protected=(0, [1, 4]))

    with pytest.raises(RuntimeError, match="annotated or corrected plane"):
        writer.write(ids[0], 0, 4, np.zeros(geometry.plane_shape(0), bool))
    writer.write(ids[0], 1, 4, np.zeros(geometry.plane_shape(1), bool))  # plane 4 of another axis is not protected

    after = read_segments(segmentation, volume)
    np.testing.assert_array_equal(after[ids[0]], replaced(before[ids[0]], 1, 4, np.zeros(geometry.plane_shape(1), bool)))


@pytest.mark.parametrize("grid", list(GRIDS))
def test_on_another_grid_exactly_the_voxels_nearest_the_plane_change(scene, grid):
    """The segmentation stored on its own grid (rotated, tilted, shifted, finer, cropped): the
    segment voxels whose nearest volume voxel lies on the plane take the new mask's value there,
    every other voxel of every segment stays as it was, and no layer is resampled."""
    directions, spacing, origin, extent = GRIDS[grid]
    shape = (8, 20, 20)
    volume = add_volume(scene, np.zeros(shape, np.float32), (1.0, 1.0, 2.0))
    geometry = mrml_geometry.volume_geometry(volume)
    matrix = grid_matrix(directions, spacing, origin)
    grid_shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Other grid")
    segmentation.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(grid_image(matrix, extent, np.zeros(grid_shape))))
    rng = np.random.default_rng(7)
    target = rng.random(grid_shape) > 0.5
    other = ~target & (rng.random(grid_shape) > 0.5)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ids = []
    for name, voxels in (("Target", target), ("Other", other)):
        ids.append(segmentation.GetSegmentation().AddEmptySegment(name, name))
        assert logic.SetBinaryLabelmapToSegment(grid_image(matrix, extent, voxels), segmentation, ids[-1], logic.MODE_MERGE_MASK)
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1
    before = stored_segments(segmentation, matrix, extent)
    # Brute force: each grid voxel's nearest volume voxel.
    k, j, i = np.meshgrid(*(np.arange(extent[2 * a], extent[2 * a + 1] + 1) for a in (2, 1, 0)), indexing="ij")
    ras = np.stack([i, j, k, np.ones_like(i)], -1) @ matrix.T
    nearest = np.floor(ras @ np.linalg.inv(geometry.ijk_to_ras).T + 0.5).astype(int)[..., :3]  # volume i, j, k
    inside = np.all((nearest >= 0) & (nearest < np.asarray(shape[::-1])), axis=-1)
    index = 3
    new = rng.random(geometry.plane_shape(0)) > 0.5
    on_plane = inside & (nearest[..., 2] == index)
    assert on_plane.any()
    expected = before[ids[0]].copy()
    expected[on_plane] = new[np.clip(nearest[..., 1], 0, shape[1] - 1), np.clip(nearest[..., 0], 0, shape[2] - 1)][on_plane]
    assert not np.array_equal(expected, before[ids[0]])

    mrml_write.SegmentPlaneReplacer(segmentation, geometry).write(ids[0], 0, index, new)

    after = stored_segments(segmentation, matrix, extent)
    np.testing.assert_array_equal(after[ids[0]], expected)
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]])
    for layer in layer_matrices(segmentation):
        np.testing.assert_allclose(layer, matrix, atol=1e-6)


def test_replacing_planes_of_a_real_volume_and_undo(scene, shared_data):
    """CHAOS T2 case 1 (256 x 256 x 37, oblique-free but flipped in y): Liver and Spleen from the
    ground truth. Liver planes are replaced by other planes' masks (some emptied), under one undo
    state: exactly those planes change, Spleen and every other Liver plane stay bit-identical, and
    one undo restores both segments."""
    sitk = pytest.importorskip("SimpleITK")
    folder = shared_data / "chaos_t2_fewshot"
    image = sitk.ReadImage(str(folder / "image_1.nii.gz"))
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_1.nii.gz")))).astype(np.uint8)
    volume = add_volume_from_sitk(scene, image)
    segmentation, ids = add_segmentation(scene, volume, {"Liver": labels == 1, "Spleen": labels == 4})
    before = read_segments(segmentation, volume)
    present = np.flatnonzero(before[ids[0]].any(axis=(1, 2)))
    planes = [int(i) for i in present[1:-1:4]]
    recorder = mrml_undo.UndoRecorder(scene)
    assert recorder.save(segmentation, volume)
    writer = mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume))
    expected = before[ids[0]].copy()
    for n, index in enumerate(planes):
        new = before[ids[0]][index + 1] if n % 3 else np.zeros(labels.shape[1:], bool)
        new = new | (labels[index] == 4) if n % 3 == 2 else new  # over the spleen too
        writer.write(ids[0], 0, index, new)
        expected[index] = new

    after = read_segments(segmentation, volume)
    np.testing.assert_array_equal(after[ids[0]], expected)
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]])
    assert not np.array_equal(after[ids[0]], before[ids[0]])

    assert recorder.undo()

    undone = read_segments(segmentation, volume)
    for segment_id in ids:
        np.testing.assert_array_equal(undone[segment_id], before[segment_id])
