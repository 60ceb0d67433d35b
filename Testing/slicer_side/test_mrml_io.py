"""mrml_io with real MRML classes (slicer-core): node <-> array, geometry, per-slice writes,
snapshot/restore and undo."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_helpers import add_segmentation, add_volume, add_volume_from_sitk, read_segments, require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from oflsam2.errors import InputError  # noqa: E402
from oflsam2.volume import resolve_axis  # noqa: E402
from OFLSAM2SegmentLib import mrml_geometry, mrml_read, mrml_undo, mrml_write  # noqa: E402

SHAPE = (6, 7, 8)  # z, y, x


def two_segments(scene, spacing=(1.0, 1.0, 2.0)):
    """Segments A (label value 1) and B (label value 2) on one shared layer, not overlapping."""
    volume = add_volume(scene, np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE), spacing)
    a = np.zeros(SHAPE, bool)
    a[1:5, 1:3, 1:6] = True
    b = np.zeros(SHAPE, bool)
    b[1:5, 4:7, 2:7] = True
    segmentation, ids = add_segmentation(scene, volume, {"A": a, "B": b})
    segmentation_data = segmentation.GetSegmentation()
    assert segmentation_data.GetNumberOfLayers() == 1
    assert segmentation_data.GetSegment(ids[1]).GetLabelValue() == 2
    return volume, segmentation, ids, {"A": a, "B": b}


def editor_writer(scene, segmentation, geometry):
    """The Segment Editor recipe through vtkSlicerSegmentEditorLogic (what the effect calls)."""
    if not scene.IsNodeClassRegistered("vtkMRMLSegmentEditorNode"):
        scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    editor.SetSegmentationNode(segmentation)

    def modify(segment_id, image, mode):  # isPerSegment, bypassMasking; no extent, as the effect calls it
        editor.ModifySegmentByLabelmap(segmentation, segment_id, image, mode, True, True)

    logic = slicer.vtkSlicerSegmentEditorLogic
    writer = mrml_write.EditorSliceWriter(modify, logic.ModificationModeAdd, segmentation, geometry)
    writer._editor = editor  # keep the logic alive as long as the writer
    return writer


# ---------------------------------------------------------------------------------------------
# Volumes and geometry


def test_oblique_chaos_volume_round_trip(scene, shared_data):
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / "image_2.nii.gz"))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert abs(direction[0, 2]) > 1e-3, "case 2 is expected to be slightly oblique"
    node = add_volume_from_sitk(scene, image)

    array, geometry = mrml_read.volume_array(node)

    expected = sitk.GetArrayFromImage(image).astype(np.float32)
    assert array.shape == expected.shape == geometry.shape
    np.testing.assert_array_equal(array, expected)
    np.testing.assert_allclose(geometry.direction_lps, direction, atol=1e-9)
    np.testing.assert_allclose(geometry.spacing_xyz, image.GetSpacing(), rtol=1e-9)
    for index in [(0, 0, 0), (200, 17, 30), (255, 255, 30)]:  # (i, j, k)
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        ras = geometry.ijk_to_ras @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)
    # 7.7 mm slices: the thick axis is axial, array axis 0, whether named or automatic
    assert resolve_axis("axial", geometry.direction_lps, geometry.spacing_xyz) == 0
    assert resolve_axis("auto", geometry.direction_lps, geometry.spacing_xyz) == 0
    # a copy, never a view of the node's voxels
    array[0, 0, 0] += 1000
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == expected[0, 0, 0]


def test_oblique_chaos_labels_read_back_on_the_volume_grid(scene, shared_data):
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / "image_2.nii.gz"))
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / "label_2.nii.gz")))).astype(np.uint8)
    volume = add_volume_from_sitk(scene, image)
    organs = {"liver": labels == 1, "right kidney": labels == 2, "left kidney": labels == 3, "spleen": labels == 4}
    segmentation, ids = add_segmentation(scene, volume, organs)

    masks = mrml_read.segment_masks(segmentation, ids, volume)

    for segment_id, (name, expected) in zip(ids, organs.items()):
        np.testing.assert_array_equal(masks[segment_id], expected, err_msg=name)
    liver_slices = mrml_read.drawn_support(masks[ids[0]], 0).planes
    assert liver_slices == [int(k) for k in np.flatnonzero(organs["liver"].any(axis=(1, 2)))]
    assert len(liver_slices) == 22  # README: case 2 has liver on 22 slices


def test_flipped_volume_reads_and_writes_a_segmentation_made_on_another_grid(scene):
    """Volume B is volume A mirrored along i (direction -1, origin at A's last column): the same
    voxels, indexed backwards. A segmentation made on A must read back mirrored on B, and a plane
    written through B lands on A's mirrored plane."""
    spacing = (1.0, 1.5, 2.0)
    data = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    volume_a = add_volume(scene, data, spacing, origin=(10.0, -5.0, 3.0), name="A")
    x_last = 10.0 + (SHAPE[2] - 1) * spacing[0]
    volume_b = add_volume(scene, data[:, :, ::-1], spacing, origin=(x_last, -5.0, 3.0),
                          directions_ras=np.diag([-1.0, 1.0, 1.0]), name="B")
    mask = np.zeros(SHAPE, bool)
    mask[2:4, 1:5, 0:3] = True  # touches column 0 so a wrong flip cannot pass
    segmentation, (segment_id,) = add_segmentation(scene, volume_a, {"S": mask})

    on_b = mrml_read.segment_masks(segmentation, [segment_id], volume_b)[segment_id]
    np.testing.assert_array_equal(on_b, mask[:, :, ::-1])

    geometry_b = mrml_geometry.volume_geometry(volume_b)
    plane = np.zeros(geometry_b.plane_shape(2), np.uint8)  # (z, y)
    plane[0:2, 0:3] = 1
    mrml_write.SegmentSliceWriter(segmentation, geometry_b).write(segment_id, 2, 1, plane)

    expected = mask.copy()
    expected[:, :, SHAPE[2] - 2] = plane > 0  # B's column 1 is A's column X-2
    np.testing.assert_array_equal(read_segments(segmentation, volume_a, [segment_id])[segment_id], expected)


def test_segmentation_on_a_cropped_grid_reads_on_the_full_volume_grid(scene):
    spacing = (0.8, 0.8, 2.5)
    volume = add_volume(scene, np.zeros(SHAPE, np.float32), spacing, origin=(0.0, 0.0, 0.0))
    small = add_volume(scene, np.zeros((3, 4, 5), np.float32), spacing, origin=(2 * 0.8, 1 * 0.8, 1 * 2.5), name="crop")
    crop_mask = np.zeros((3, 4, 5), bool)
    crop_mask[1:3, 0:2, 2:5] = True
    segmentation, (segment_id,) = add_segmentation(scene, small, {"S": crop_mask})

    mask = mrml_read.segment_masks(segmentation, [segment_id], volume)[segment_id]

    expected = np.zeros(SHAPE, bool)
    expected[1:4, 1:5, 2:7] = crop_mask
    assert mask.shape == SHAPE
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_drawn_support_along_each_axis(axis):
    """A plane is annotated where the segment covers an area (a 2 x 2 block); a lone voxel or a
    one-voxel line does not annotate it and is reported as a stroke on the other axes."""
    mask = np.zeros(SHAPE, bool)
    for plane in (1, 4):
        block = [slice(1, 3)] * 3
        block[axis] = plane
        mask[tuple(block)] = True
    lone = [1, 1, 1]
    lone[axis] = 3
    mask[tuple(lone)] = True
    drawn = mrml_read.drawn_support(mask, axis)
    assert drawn.planes == [1, 4] and sorted(drawn.ignored_axes) == sorted({0, 1, 2} - {axis})
    assert not drawn.mask[tuple(lone)] and drawn.mask.sum() == 8
    across = mrml_read.drawn_support(mask, (axis + 1) % 3)  # the blocks are lines across the other axis
    assert across.planes == [] and axis in across.ignored_axes


# ---------------------------------------------------------------------------------------------
# Per-slice writes


@pytest.mark.parametrize("kind", ["module", "editor"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_plane_write_changes_one_plane_of_one_segment(scene, axis, kind):
    """Both writers add the plane's voxels (a run never removes the user's strokes)."""
    volume, segmentation, ids, masks = two_segments(scene)
    geometry = mrml_geometry.volume_geometry(volume)
    writer = mrml_write.SegmentSliceWriter(segmentation, geometry) if kind == "module" else editor_writer(scene, segmentation, geometry)
    index = {0: 2, 1: 4, 2: 3}[axis]  # planes where B has voxels
    # New mask for B on this plane: part of B's old voxels kept, some dropped, some new ones
    # outside A; label value 2 must not leak into A (label value 1).
    plane = np.take(masks["B"], index, axis=axis).astype(np.uint8)
    plane_b = np.take(masks["B"], index, axis=axis)
    rows, cols = np.nonzero(plane_b)
    plane[rows[0], cols[0]] = 0
    free = ~np.take(masks["A"] | masks["B"], index, axis=axis)
    free_rows, free_cols = np.nonzero(free)
    plane[free_rows[-1], free_cols[-1]] = 1

    writer.write(ids[1], axis, index, plane)

    after = read_segments(segmentation, volume, ids)
    expected_b = masks["B"].copy()
    selector = [slice(None)] * 3
    selector[axis] = index
    expected_b[tuple(selector)] = plane > 0
    expected_b |= masks["B"]
    np.testing.assert_array_equal(after[ids[1]], expected_b)
    np.testing.assert_array_equal(after[ids[0]], masks["A"])


@pytest.mark.parametrize("kind", ["module", "editor"])
def test_plane_write_over_another_segment_keeps_that_segment(scene, kind):
    volume, segmentation, ids, masks = two_segments(scene)
    geometry = mrml_geometry.volume_geometry(volume)
    writer = mrml_write.SegmentSliceWriter(segmentation, geometry) if kind == "module" else editor_writer(scene, segmentation, geometry)
    plane = np.ones(geometry.plane_shape(0), np.uint8)  # covers A on plane 3 too

    writer.write(ids[1], 0, 3, plane)

    after = read_segments(segmentation, volume, ids)
    np.testing.assert_array_equal(after[ids[0]], masks["A"])
    expected_b = masks["B"].copy()
    expected_b[3] = True
    np.testing.assert_array_equal(after[ids[1]], expected_b)


def test_an_empty_plane_changes_nothing(scene):
    volume, segmentation, ids, masks = two_segments(scene)
    geometry = mrml_geometry.volume_geometry(volume)

    mrml_write.SegmentSliceWriter(segmentation, geometry).write(ids[0], 0, 2, np.zeros(geometry.plane_shape(0), np.uint8))

    after = read_segments(segmentation, volume, ids)
    np.testing.assert_array_equal(after[ids[0]], masks["A"])
    np.testing.assert_array_equal(after[ids[1]], masks["B"])


def test_plane_write_checks_shape_and_index(scene):
    volume, segmentation, ids, _ = two_segments(scene)
    writer = mrml_write.SegmentSliceWriter(segmentation, mrml_geometry.volume_geometry(volume))
    with pytest.raises(ValueError, match="shape"):
        writer.write(ids[0], 1, 0, np.zeros((7, 8), np.uint8))  # axis 1 planes are (z, x) = (6, 8)
    with pytest.raises(ValueError, match="outside"):
        writer.write(ids[0], 0, SHAPE[0], np.zeros((7, 8), np.uint8))


# ---------------------------------------------------------------------------------------------
# Snapshot, status, undo


def test_snapshot_restores_segments_and_status_exactly(scene):
    volume, segmentation, ids, masks = two_segments(scene)
    empty_id = segmentation.GetSegmentation().AddEmptySegment("C", "C")
    assert empty_id
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    logic.SetSegmentStatus(segmentation.GetSegmentation().GetSegment(ids[1]), logic.Completed)
    geometry = mrml_geometry.volume_geometry(volume)
    before = read_segments(segmentation, volume)

    snapshot = mrml_undo.SegmentSnapshot(segmentation, [ids[1], empty_id])
    snapshot.mark_in_progress()
    assert logic.GetSegmentStatus(segmentation.GetSegmentation().GetSegment(ids[1])) == logic.InProgress
    writer = mrml_write.SegmentSliceWriter(segmentation, geometry)
    for axis in range(3):
        writer.write(ids[1], axis, 1, np.ones(geometry.plane_shape(axis), np.uint8))
        writer.write(empty_id, axis, 2, np.ones(geometry.plane_shape(axis), np.uint8))
    changed = read_segments(segmentation, volume)
    assert not np.array_equal(changed[ids[1]], before[ids[1]]) and changed[empty_id].any()

    snapshot.restore()

    after = read_segments(segmentation, volume)
    for segment_id in before:
        np.testing.assert_array_equal(after[segment_id], before[segment_id], err_msg=segment_id)
    assert logic.GetSegmentStatus(segmentation.GetSegmentation().GetSegment(ids[1])) == logic.Completed
    assert logic.GetSegmentStatus(segmentation.GetSegmentation().GetSegment(empty_id)) == logic.NotStarted


def test_undo_recorder_reverts_a_whole_run(scene):
    volume, segmentation, ids, masks = two_segments(scene)
    geometry = mrml_geometry.volume_geometry(volume)
    recorder = mrml_undo.UndoRecorder(scene)
    assert not recorder.can_undo()

    assert recorder.save(segmentation, volume)
    writer = mrml_write.SegmentSliceWriter(segmentation, geometry)
    for index in range(SHAPE[0]):
        writer.write(ids[0], 0, index, np.ones(geometry.plane_shape(0), np.uint8))
    assert read_segments(segmentation, volume, ids[:1])[ids[0]].all()

    assert recorder.undo()

    after = read_segments(segmentation, volume, ids)
    np.testing.assert_array_equal(after[ids[0]], masks["A"])
    np.testing.assert_array_equal(after[ids[1]], masks["B"])
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode")
    editor_nodes = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentEditorNode") for i in range(count)]
    assert len(editor_nodes) == 1 and not editor_nodes[0].GetSaveWithScene()


# ---------------------------------------------------------------------------------------------
# Refusals


def test_transform_mismatch_is_refused(scene):
    volume, segmentation, ids, _ = two_segments(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match="different transforms"):
        mrml_read.segment_masks(segmentation, ids, volume)


def test_missing_segment_and_vector_volume_are_refused(scene):
    volume, segmentation, ids, _ = two_segments(scene)
    with pytest.raises(InputError, match="no segment"):
        mrml_read.check_segments(segmentation, [ids[0], "nope"])
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((2, 3, 4, 3), np.uint8))
    with pytest.raises(InputError, match="components"):
        mrml_read.volume_array(rgb)
    with pytest.raises(InputError, match="image data"):
        mrml_read.volume_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))


def test_snapshot_of_a_brand_new_segment_restores_it_empty(scene):
    volume = add_volume(scene, np.zeros(SHAPE, np.float32))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "New")
    assert segment_id
    snapshot = mrml_undo.SegmentSnapshot(segmentation, [segment_id])
    geometry = mrml_geometry.volume_geometry(volume)
    mrml_write.SegmentSliceWriter(segmentation, geometry).write(segment_id, 1, 3, np.ones(geometry.plane_shape(1), np.uint8))
    assert read_segments(segmentation, volume)[segment_id].sum() == SHAPE[0] * SHAPE[2]

    snapshot.restore()

    assert not read_segments(segmentation, volume)[segment_id].any()


@pytest.mark.parametrize("extent", [(0, 7, 0, 6, 0, 5), (2, 6, 1, 5, -1, 3)])
def test_plane_mapping_on_a_whole_voxel_shift_matches_the_general_mapping(scene, extent):
    """The fast path (grid = the volume's lattice, possibly cropped) maps a plane to the same
    voxels as the general nearest-voxel mapping does on an almost identical grid."""
    volume = add_volume(scene, np.zeros(SHAPE, np.float32), (1.0, 1.0, 2.0))
    geometry = mrml_geometry.volume_geometry(volume)
    nudged = geometry.ijk_to_ras.copy()
    nudged[:3, :3] = nudged[:3, :3] @ np.array([[1.0, -1e-5, 0.0], [1e-5, 1.0, 0.0], [0.0, 0.0, 1.0]])  # general path
    rng = np.random.default_rng(0)
    for axis in range(3):
        for index in range(SHAPE[axis]):
            plane = rng.random(geometry.plane_shape(axis)) > 0.5
            results = []
            for matrix in (geometry.ijk_to_ras, nudged):
                grid = mrml_geometry.SegmentGrid(extent, matrix)
                found = grid.plane_voxels(geometry, axis, index, plane)
                full = np.zeros(grid.shape, bool)
                if found is not None:
                    box, _, value = found
                    full[box[4] - extent[4]:box[5] - extent[4] + 1, box[2] - extent[2]:box[3] - extent[2] + 1,
                         box[0] - extent[0]:box[1] - extent[0] + 1] = value
                results.append(full)
            np.testing.assert_array_equal(results[0], results[1], err_msg=f"axis {axis}, plane {index}")


def rotation_about(axis, degrees):
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


@pytest.mark.parametrize("rotation_axis,degrees,spacing", [(2, 20, (1.0, 1.0, 2.0)), (0, 20, (0.7, 0.9, 1.5)),
                                                           (1, 35, (1.3, 1.0, 0.8))])
def test_plane_mapping_on_an_oblique_grid_is_the_nearest_volume_voxel(scene, rotation_axis, degrees, spacing):
    """Each grid voxel belongs to the volume plane of its nearest volume voxel: checked against a
    brute-force mapping of every grid voxel."""
    volume = add_volume(scene, np.zeros(SHAPE, np.float32), (1.0, 1.0, 2.0))
    geometry = mrml_geometry.volume_geometry(volume)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_about(rotation_axis, degrees) * np.asarray(spacing)
    matrix[:3, 3] = (0.3, -1.2, 0.7)
    extent = (-3, 10, -3, 10, -2, 9)
    grid = mrml_geometry.SegmentGrid(extent, matrix)
    k, j, i = np.meshgrid(*(np.arange(extent[2 * a], extent[2 * a + 1] + 1) for a in (2, 1, 0)), indexing="ij")
    ras = np.stack([i, j, k, np.ones_like(i)], -1) @ matrix.T
    nearest = np.floor(ras @ np.linalg.inv(geometry.ijk_to_ras).T + 0.5).astype(int)[..., :3]  # volume i, j, k
    inside = np.all((nearest >= 0) & (nearest < np.asarray(SHAPE[::-1])), axis=-1)
    rng = np.random.default_rng(1)
    for axis in range(3):
        for index in range(SHAPE[axis]):
            plane = rng.random(geometry.plane_shape(axis)) > 0.5
            expected_hit = inside & (nearest[..., 2 - axis] == index)
            rows_cols = [nearest[..., 2 - a] for a in range(3) if a != axis]
            expected_value = expected_hit & plane[np.clip(rows_cols[0], 0, plane.shape[0] - 1),
                                                  np.clip(rows_cols[1], 0, plane.shape[1] - 1)]
            hit = np.zeros(grid.shape, bool)
            value = np.zeros(grid.shape, bool)
            found = grid.plane_voxels(geometry, axis, index, plane)
            if found is not None:
                box, box_hit, box_value = found
                where = (slice(box[4] - extent[4], box[5] - extent[4] + 1), slice(box[2] - extent[2], box[3] - extent[2] + 1),
                         slice(box[0] - extent[0], box[1] - extent[0] + 1))
                hit[where], value[where] = box_hit, box_value
            np.testing.assert_array_equal(hit, expected_hit, err_msg=f"axis {axis}, plane {index}")
            np.testing.assert_array_equal(value, expected_value, err_msg=f"axis {axis}, plane {index}")


def test_drawing_axis_counts_planes_drawn_on_each_axis_only():
    shape = (8, 10, 12)
    axial = np.zeros(shape, bool)
    axial[[1, 4, 6], 2:6, 2:6] = True  # three separate axial annotations
    sagittal = np.zeros(shape, bool)
    sagittal[:, 1:9, 10] = True  # one large sagittal stroke
    assert mrml_read.drawing_axis([axial | sagittal]) == 0
    assert mrml_read.drawing_axis([sagittal]) == 2
    blob = np.zeros(shape, bool)
    blob[2:6, 2:8, 2:8] = True  # 3-D: drawn on no axis in particular
    assert mrml_read.drawing_axis([blob]) is None and mrml_read.drawing_axis([]) is None
    adjacent = np.zeros(shape, bool)
    adjacent[[3, 4], 2:6, 2:6] = True  # two adjacent slices form a 3-D piece
    assert mrml_read.drawing_axis([adjacent]) is None
    assert mrml_read.drawing_axis([adjacent, sagittal]) == 2
