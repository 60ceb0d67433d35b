"""Issue 16: what the Slicer logic does to segments it was not asked to touch.

Real MRML classes (slicer-core), the fake engine through the worker seam. Every test counts the
scene's nodes around each public logic call (``nodes_unchanged``), and segments are compared
voxel for voxel on the grid they are stored on, read with Slicer's own calls only.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import numpy as np
import pytest
from fakes import CopyEngine, ManualPump, RaisingEngine
from mrml_helpers import add_segmentation, add_volume, read_segments, require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from oflsam2.errors import AdapterError, InputError  # noqa: E402
from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402
from OFLSAM2SegmentLib.worker import Worker  # noqa: E402

FAST = {"randomWeights": True, "device": "cpu"}
SHAPE = (8, 20, 20)  # volume (z, y, x); 2 mm slices


@contextlib.contextmanager
def nodes_unchanged(scene, added=0):
    """The block leaves the scene with the same nodes (plus ``added`` new ones), by class.

    The one node the logic keeps on purpose is not counted: the hidden, unsaved Segment Editor
    node that holds the undo state of runs (created once per scene)."""
    def census():
        nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        undo = [n for n in nodes if n.GetSingletonTag() == "OFLSAM2Undo"]
        assert all(n.GetHideFromEditors() and not n.GetSaveWithScene() for n in undo)
        nodes = [n for n in nodes if n not in undo]
        return sorted(n.GetClassName() for n in nodes), {n.GetID() for n in nodes}

    classes, ids = census()
    yield
    after_classes, after_ids = census()
    assert ids - after_ids == set(), "nodes disappeared"
    assert len(after_ids) == len(ids) + added, f"nodes added: {sorted(set(after_classes) - set(classes)) or after_classes}"


def make_logic(engine_factory, pump=None):
    worker = Worker(engine_factory)
    return OFLSAM2Logic(worker=worker, pump=pump or ManualPump()), worker


# ---------------------------------------------------------------------------------------------
# Segmentations on their own grids


def rotation(axis, degrees):
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


GRIDS = {
    # name: (directions (columns i, j, k), spacing (i, j, k), origin, extent)
    "rotated": (rotation(2, 20), (1.0, 1.0, 2.0), (4.0, -4.0, 0.0), (-2, 23, -2, 23, 0, 7)),
    "tilted": (rotation(0, 20), (1.0, 1.0, 2.0), (0.0, 0.0, -3.0), (0, 19, -2, 21, 0, 9)),
    "shifted": (np.eye(3), (1.0, 1.0, 2.0), (0.4, -0.3, 0.0), (0, 19, 0, 19, 0, 7)),
    "spacing": (np.eye(3), (0.75, 0.75, 2.0), (0.0, 0.0, 0.0), (0, 26, 0, 26, 0, 7)),
    "cropped": (np.eye(3), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (2, 17, 1, 16, 0, 7)),
}


def grid_matrix(directions, spacing, origin):
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(directions) * np.asarray(spacing)
    matrix[:3, 3] = origin
    return matrix


def vtk_matrix(array):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def grid_image(matrix, extent, voxels):
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ascontiguousarray(voxels, dtype=np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(vtk_matrix(matrix))
    return image


def stored_segments(segmentation, matrix, extent):
    """Every segment as a bool (k, j, i) array on the grid (``matrix``, ``extent``), with Slicer's
    own nearest-neighbour resampling when a layer is on another lattice."""
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(*extent)
    reference.SetImageToWorldMatrix(vtk_matrix(matrix))
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    out = {}
    for segment_id in segmentation.GetSegmentation().GetSegmentIDs():
        image = slicer.vtkOrientedImageData()
        segmentation.GetBinaryLabelmapRepresentation(segment_id, image)
        array = np.zeros(shape, bool)
        e = image.GetExtent()
        if e[0] <= e[1] and e[2] <= e[3] and e[4] <= e[5]:
            resampled = slicer.vtkOrientedImageData()
            resample = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage
            assert resample(image, reference, resampled, False, True)
            r = resampled.GetExtent()
            values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
            values = values.reshape(r[5] - r[4] + 1, r[3] - r[2] + 1, r[1] - r[0] + 1) > 0
            lo = [max(r[2 * a], extent[2 * a]) for a in range(3)]
            hi = [min(r[2 * a + 1], extent[2 * a + 1]) for a in range(3)]
            src = tuple(slice(lo[a] - r[2 * a], hi[a] - r[2 * a] + 1) for a in (2, 1, 0))
            dst = tuple(slice(lo[a] - extent[2 * a], hi[a] - extent[2 * a] + 1) for a in (2, 1, 0))
            array[dst] = values[src]
        out[segment_id] = array
    return out


def layer_matrices(segmentation):
    segmentation_data = segmentation.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    matrices = []
    for segment_id in segmentation_data.GetSegmentIDs():
        layer = segmentation_data.GetSegment(segment_id).GetRepresentation(binary)
        matrix = vtk.vtkMatrix4x4()
        layer.GetImageToWorldMatrix(matrix)
        matrices.append(np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]))
    return matrices


def oblique_case(scene, grid):
    """A volume, and a segmentation stored on ``grid`` (see GRIDS) with three segments on one
    shared layer: Liver (painted on grid planes k = 2 and 5), Kidney (plane k = 4) and Border
    (a thick strip through every plane)."""
    directions, spacing, origin, extent = GRIDS[grid]
    image = np.random.default_rng(3).random(SHAPE).astype(np.float32)
    volume = add_volume(scene, image, (1.0, 1.0, 2.0))
    matrix = grid_matrix(directions, spacing, origin)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Oblique")
    geometry = grid_image(matrix, extent, np.zeros((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)))
    segmentation.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry))
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    k0 = -extent[4]
    liver = np.zeros(shape, bool)
    kidney = np.zeros(shape, bool)
    border = np.zeros(shape, bool)
    for k in (2, 5):
        liver[k0 + k, 5:11, 5:11] = True
    kidney[k0 + 4, 12:15, 11:15] = True
    border[:, 0:3, :] = True
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ids = []
    for name, voxels in (("Liver", liver), ("Kidney", kidney), ("Border", border)):
        segment_id = segmentation.GetSegmentation().AddEmptySegment(name, name)
        assert segment_id
        assert logic.SetBinaryLabelmapToSegment(grid_image(matrix, extent, voxels), segmentation, segment_id, logic.MODE_MERGE_MASK)
        ids.append(segment_id)
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1
    return volume, segmentation, ids, matrix, extent


def editor_writing(scene, segmentation, volume, kind):
    """``process`` keyword arguments for the module path ("module") or the Segment Editor
    effect's path ("editor": writes through vtkSlicerSegmentEditorLogic, the editor's undo)."""
    if kind == "module":
        return {}
    from OFLSAM2SegmentLib import mrml_geometry, mrml_write

    if not scene.IsNodeClassRegistered("vtkMRMLSegmentEditorNode"):
        scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    editor.SetSegmentationNode(segmentation)

    def modify(segment_id, image, mode):  # as the effect calls it: bypassMasking
        editor.ModifySegmentByLabelmap(segmentation, segment_id, image, mode, True, True)

    writer = mrml_write.EditorSliceWriter(modify, slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd, segmentation,
                                       mrml_geometry.volume_geometry(volume))
    return {"writer": writer, "saveUndoState": editor.SaveStateForUndo}


@pytest.mark.parametrize("kind", ["module", "editor"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_a_run_on_another_grid_changes_only_the_target_on_its_own_grid(scene, grid, kind):
    volume, segmentation, ids, matrix, extent = oblique_case(scene, grid)
    writing = editor_writing(scene, segmentation, volume, kind)
    before = stored_segments(segmentation, matrix, extent)
    logic, worker = make_logic(CopyEngine)

    with nodes_unchanged(scene):
        summary = logic.process(volume, segmentation, ids[:1], method="sam2", axis="axial", **writing, **FAST)
    worker.shutdown()

    after = stored_segments(segmentation, matrix, extent)
    for other in ids[1:]:
        np.testing.assert_array_equal(after[other], before[other], err_msg=f"{other} changed ({grid} grid)")
    assert not (before[ids[0]] & ~after[ids[0]]).any(), "the user's Liver voxels were removed"
    assert after[ids[0]].sum() > before[ids[0]].sum() and summary["segments"][ids[0]]["written"] > 0
    for layer in layer_matrices(segmentation):  # no layer was resampled onto the volume's grid
        np.testing.assert_allclose(layer, matrix, atol=1e-6)


@pytest.mark.parametrize("kind", ["module", "editor"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_cancel_on_another_grid_restores_every_segment_exactly(scene, grid, kind):
    volume, segmentation, ids, matrix, extent = oblique_case(scene, grid)
    writing = editor_writing(scene, segmentation, volume, kind)
    before = stored_segments(segmentation, matrix, extent)
    gate = threading.Event()
    pump = ManualPump()
    logic, worker = make_logic(lambda s: CopyEngine(s, block=gate, block_after=3), pump)

    with nodes_unchanged(scene):
        run = logic.process(volume, segmentation, ids[:1], method="sam2", axis="axial", waitForCompletion=False,
                            **writing, **FAST)
        wait_for_writes(run, pump, 3)
        assert stored_segments(segmentation, matrix, extent)[ids[0]].sum() > before[ids[0]].sum()
        run.cancel()
        pump.run_until_done()
    gate.set()
    worker.shutdown()

    assert run.state == "cancelled" and run.restored
    after = stored_segments(segmentation, matrix, extent)
    for segment_id in ids:
        np.testing.assert_array_equal(after[segment_id], before[segment_id], err_msg=f"{segment_id} ({grid} grid)")


def wait_for_writes(run, pump, count, timeout=20.0):
    deadline = time.monotonic() + timeout
    while sum(run._written.values()) < count:
        assert not pump.step() and time.monotonic() < deadline, "the run did not write the expected slices"
        time.sleep(0.01)


def test_chaos_case_on_a_rotated_segmentation_grid(scene, chaos_case):
    """The issue's CHAOS report (397 of 10,144 voxels of other segments changed): a crop of a real
    MR volume, the segmentation on a grid rotated 20 degrees, the liver (on two slices) and the
    largest other organ from the ground truth; a run on the liver changes no voxel of the other."""
    image, labels = chaos_crop(chaos_case)
    volume = add_volume(scene, image, (1.5, 1.5, 6.0))
    matrix = grid_matrix(rotation(2, 20), (1.5, 1.5, 6.0), (20.0, -25.0, 0.0))
    z, y, x = image.shape
    extent = (-10, x + 10, -10, y + 10, 0, z - 1)
    shape = (z, y + 21, x + 21)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CHAOS")
    segmentation.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(grid_image(matrix, extent, np.zeros(shape))))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    # the labels on the rotated grid: sample the volume-grid labels at each grid voxel's centre
    k, j, i = np.meshgrid(*(np.arange(extent[2 * a], extent[2 * a + 1] + 1) for a in (2, 1, 0)), indexing="ij")
    ras = np.stack([i, j, k, np.ones_like(i)], -1) @ matrix.T
    volume_ijk = np.floor(ras @ np.linalg.inv(grid_matrix(np.eye(3), (1.5, 1.5, 6.0), (0, 0, 0))).T + 0.5).astype(int)
    inside = np.all((volume_ijk[..., :3] >= 0) & (volume_ijk[..., :3] < [x, y, z]), -1)
    sampled = np.zeros(shape, np.uint8)
    vi = np.clip(volume_ijk, 0, None)
    sampled[inside] = labels[np.minimum(vi[..., 2], z - 1), np.minimum(vi[..., 1], y - 1), np.minimum(vi[..., 0], x - 1)][inside]
    liver = sampled == 1
    keep = np.zeros(z, bool)
    keep[[z // 3, 2 * z // 3]] = True
    liver &= keep[:, None, None]
    other_label = max((2, 3, 4), key=lambda value: int((sampled == value).sum()))  # the largest organ beside the liver
    ids = []
    for name, voxels in (("Liver", liver), ("Other organ", sampled == other_label)):
        segment_id = segmentation.GetSegmentation().AddEmptySegment(name, name)
        ids.append(segment_id)
        if voxels.any():
            assert logic.SetBinaryLabelmapToSegment(grid_image(matrix, extent, voxels), segmentation, segment_id, logic.MODE_MERGE_MASK)
    before = stored_segments(segmentation, matrix, extent)
    assert before[ids[1]].sum() > 1000

    engine_logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene):
        engine_logic.process(volume, segmentation, ids[:1], method="sam2", axis="axial", **FAST)
    after = stored_segments(segmentation, matrix, extent)
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]])
    assert not (before[ids[0]] & ~after[ids[0]]).any()
    worker.shutdown()


def chaos_crop(chaos_case):
    """A small crop (z, y, x) of CHAOS case 2 and its labels (1 liver, 2/3 kidneys, 4 spleen)."""
    image, labels = chaos_case(2)
    z = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))
    zs = slice(z[0], min(z[-1] + 1, z[0] + 12))
    return np.ascontiguousarray(image[zs, ::2, ::2]), np.ascontiguousarray(labels[zs, ::2, ::2])


# ---------------------------------------------------------------------------------------------
# Segment selection (16.2, 16.8)


def annotated_case(scene):
    """Volume 8 x 12 x 12 (2 mm slices). Liver: axial planes 2 and 5. Manual: a segment painted
    on axial planes 1 and 6 that nobody selected."""
    shape = (8, 12, 12)
    volume = add_volume(scene, np.random.default_rng(0).random(shape).astype(np.float32), (1.0, 1.0, 2.0))
    liver = np.zeros(shape, bool)
    liver[[2, 5], 1:5, 1:5] = True
    manual = np.zeros(shape, bool)
    manual[[1, 6], 7:10, 7:10] = True
    segmentation, ids = add_segmentation(scene, volume, {"Liver": liver, "Manual": manual})
    return volume, segmentation, ids


def test_an_empty_segment_list_is_an_error_and_changes_nothing(scene):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    logic, worker = make_logic(CopyEngine)

    with nodes_unchanged(scene), pytest.raises(InputError, match="No segment selected"):
        logic.process(volume, segmentation, [], method="sam2", **FAST)
    worker.shutdown()

    after = read_segments(segmentation, volume)
    for segment_id in ids:
        np.testing.assert_array_equal(after[segment_id], before[segment_id])


def test_one_string_is_one_segment_id(scene):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    engine = CopyEngine()
    logic, worker = make_logic(lambda s: engine)

    with nodes_unchanged(scene):
        summary = logic.process(volume, segmentation, "Liver", method="sam2", **FAST)
    worker.shutdown()

    assert list(summary["segments"]) == ["Liver"] and [s.name for s in engine.calls[0]["supports"]] == ["Liver"]
    np.testing.assert_array_equal(read_segments(segmentation, volume)["Manual"], before["Manual"])


def test_the_default_segments_are_documented():
    assert "``None`` (the default)" in OFLSAM2Logic.process.__doc__ and "empty list is an error" in OFLSAM2Logic.process.__doc__


def test_misleading_inputs_get_clear_messages(scene, tmp_path):
    volume, segmentation, ids = annotated_case(scene)
    logic, worker = make_logic(CopyEngine)
    flat = add_volume(scene, np.zeros((4, 5, 6), np.float32), (1.0, 1.0, 0.0), name="Flat")
    with nodes_unchanged(scene):
        with pytest.raises(InputError, match=r"Reference 1 must be a pair \(volumeNode, segmentationNode\)"):
            logic.process(volume, segmentation, ids[:1], references=[(volume,)], **FAST)
        with pytest.raises(InputError, match="zero or invalid voxel spacing"):
            logic.process(flat, segmentation, ids[:1], **FAST)
        from oflsam2.ofl.adapter import KIND, METADATA_SUFFIX

        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / ("label_1_Liver" + METADATA_SUFFIX)).write_text(json.dumps({"kind": KIND, "label": 1}))
    with nodes_unchanged(scene):
        with pytest.raises(InputError, match="lacks the field.*model"):
            logic.segmentVolumesWithAdapter([volume], str(adapter), **FAST)
        with pytest.raises(InputError, match="lacks the field.*model"):
            logic.loadAdapter(str(adapter))
    worker.shutdown()


# ---------------------------------------------------------------------------------------------
# Reads leave the scene as they found it (16.3)


def test_segment_reads_add_no_node(scene):
    volume, segmentation, ids = annotated_case(scene)
    segmentation.CreateDefaultDisplayNodes()
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene):
        for _ in range(10):
            axis_name, targets = logic.describeSupport(volume, segmentation, ids)
    worker.shutdown()
    assert axis_name == "axial" and [t.slices for t in targets] == [[2, 5], [1, 6]]


# ---------------------------------------------------------------------------------------------
# Strokes on another axis (16.4)


def sagittal_stroke_case(scene):
    """Liver painted on axial planes 2 and 5, plus one sagittal stroke (plane x = 8) across
    every axial plane, crossing the axial annotations."""
    volume, segmentation, ids = annotated_case(scene)
    stroke = np.zeros((8, 12, 12), bool)
    stroke[0:8, 2:9, 8] = True
    liver = read_segments(segmentation, volume, ids[:1])[ids[0]]
    paint_segment(segmentation, volume, ids[0], stroke)
    return volume, segmentation, ids, liver, stroke


def test_a_stroke_on_another_axis_annotates_no_plane_and_is_reported(scene):
    volume, segmentation, ids, liver, stroke = sagittal_stroke_case(scene)
    engine = CopyEngine()
    logic, worker = make_logic(lambda s: engine)

    with nodes_unchanged(scene):
        axis_name, (target,) = logic.describeSupport(volume, segmentation, ids[:1], "axial")
    assert axis_name == "axial" and target.slices == [2, 5] and target.ignored_axes == ["sagittal"]

    with nodes_unchanged(scene):
        summary = logic.process(volume, segmentation, ids[:1], method="sam2", axis="axial", **FAST)
    worker.shutdown()

    assert summary["segments"]["Liver"]["annotated"] == [2, 5]
    assert summary["warnings"] == ["Segment 'Liver' also has strokes on the sagittal axis, which were ignored."]
    support = engine.calls[0]["supports"][0]
    assert support.slices == [2, 5] and not support.mask[[0, 1, 3, 4, 6, 7]].any()
    after = read_segments(segmentation, volume, ids[:1])[ids[0]]
    assert after[stroke].all(), "the sagittal stroke was erased"


def test_the_automatic_axis_is_the_one_the_annotations_were_drawn_on(scene):
    """The sagittal stroke holds more voxels than the two axial annotations, and the old rule
    (planes with gaps between them) picked sagittal; the strokes' own planes decide."""
    volume, segmentation, ids, liver, stroke = sagittal_stroke_case(scene)
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene):
        axis_name, (target,) = logic.describeSupport(volume, segmentation, ids[:1])  # axis "auto"
    worker.shutdown()
    assert stroke.sum() > liver.sum()
    assert axis_name == "axial" and target.slices == [2, 5] and target.ignored_axes == ["sagittal"]


def test_an_axis_without_strokes_is_refused_with_the_reason(scene):
    volume, segmentation, ids = annotated_case(scene)
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene), pytest.raises(InputError, match="no annotated slice.*strokes on the axial axis were ignored"):
        logic.process(volume, segmentation, ids[:1], method="sam2", axis="sagittal", **FAST)
    worker.shutdown()


# ---------------------------------------------------------------------------------------------
# Edits during and after a run (16.5)


def test_paint_during_a_run_survives_cancel(scene):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    gate = threading.Event()
    pump = ManualPump()
    logic, worker = make_logic(lambda s: CopyEngine(s, block=gate, block_after=2), pump)

    with nodes_unchanged(scene):
        run = logic.process(volume, segmentation, ids[:1], method="sam2", waitForCompletion=False, **FAST)
        wait_for_writes(run, pump, 2)
        # The user paints the target on plane 7 (not written yet) and on plane 0 (written by the run
        # already, outside what it added), and the other segment on plane 3.
        assert read_segments(segmentation, volume, ids[:1])[ids[0]][0].any()  # plane 0 was written
        paint = np.zeros((8, 12, 12), bool)
        paint[7, 9:11, 1:3] = True
        paint[0, 9:11, 9:11] = True
        other_paint = np.zeros((8, 12, 12), bool)
        other_paint[3, 10:12, 10:12] = True
        paint_segment(segmentation, volume, ids[0], paint)
        paint_segment(segmentation, volume, ids[1], other_paint)
        run.cancel()
        pump.run_until_done()
    gate.set()
    worker.shutdown()

    after = read_segments(segmentation, volume)
    np.testing.assert_array_equal(after[ids[0]], before[ids[0]] | paint)
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]] | other_paint)
    assert not logic.canUndo()
    with pytest.raises(InputError, match="changed nothing"):
        logic.undoLastRun()


def paint_segment(segmentation, volume, segment_id, mask):
    """A user's stroke: the Segment Editor adds voxels the same way (merge with the label value)."""
    from mrml_helpers import whole_image

    from OFLSAM2SegmentLib import mrml_geometry

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(whole_image(mrml_geometry.volume_geometry(volume), mask), segmentation,
                                            segment_id, logic.MODE_MERGE_MASK)


def test_undo_is_refused_after_later_strokes(scene):
    volume, segmentation, ids = annotated_case(scene)
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene):
        logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
    worker.shutdown()
    assert logic.canUndo()
    stroke = np.zeros((8, 12, 12), bool)
    stroke[0, 10:12, 0:2] = True
    paint_segment(segmentation, volume, ids[1], stroke)
    painted = read_segments(segmentation, volume)

    with nodes_unchanged(scene), pytest.raises(InputError, match="edited after the last run"):
        assert not logic.canUndo()
        logic.undoLastRun()
    after = read_segments(segmentation, volume)
    for segment_id in ids:
        np.testing.assert_array_equal(after[segment_id], painted[segment_id])


def test_undo_is_offered_only_for_a_run_that_changed_something(scene):
    volume, segmentation, ids = annotated_case(scene)
    logic, worker = make_logic(lambda s: RaisingEngine(RuntimeError("engine broke")))
    with nodes_unchanged(scene):
        with pytest.raises(RuntimeError, match="engine broke"):
            logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
        assert not logic.canUndo()
        with pytest.raises(InputError, match="changed nothing"):
            logic.undoLastRun()
    worker.shutdown()

    before = read_segments(segmentation, volume)
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene):
        logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
        assert logic.canUndo()
        assert logic.undoLastRun()
    worker.shutdown()
    after = read_segments(segmentation, volume)
    for segment_id in ids:
        np.testing.assert_array_equal(after[segment_id], before[segment_id])
    assert not logic.canUndo()


# ---------------------------------------------------------------------------------------------
# Cohorts (16.6) and validation before work (16.7)


def saved_adapter(tmp_path, label_name="Liver"):
    import torch

    from oflsam2.ofl.adapter import save_adapter

    adapter = tmp_path / "adapter"
    save_adapter(adapter, {"head": torch.nn.Linear(2, 2)}, {
        "model": "sam2.1-small", "config": "configs/sam2.1/sam2.1_hiera_s.yaml", "checkpoint_sha256": "random-weights:0",
        "image_size": 512, "preset": "mr", "axis": 0, "label": 1, "label_name": label_name})
    return adapter


def test_a_failing_cohort_leaves_no_segmentation_behind(scene, tmp_path):
    adapter = saved_adapter(tmp_path)
    volumes = [add_volume(scene, np.random.default_rng(i).random((6, 8, 8)).astype(np.float32), (1.0, 1.0, 3.0), name=f"case{i}")
               for i in range(3)]
    class FailsOnTheSecondVolume(CopyEngine):
        def segment(self, image, supports, **kwargs):
            if self.calls:
                raise RuntimeError("out of luck")
            return super().segment(image, supports, **kwargs)

    engine = FailsOnTheSecondVolume()
    logic, worker = make_logic(lambda s: engine)

    with nodes_unchanged(scene), pytest.raises(RuntimeError, match="out of luck"):
        logic.segmentVolumesWithAdapter(volumes, str(adapter), **FAST)
    worker.shutdown()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


class CountingFactory:
    """An engine factory that records whether any model work was started."""

    def __init__(self):
        self.built = 0

    def __call__(self, settings):
        self.built += 1
        return CopyEngine(settings)


@pytest.mark.parametrize("option,value,message", [
    ("lr", 0.0, "lr must be"),
    ("learnerItersTrain", -1, "learner_iters_train must be"),
    ("maxSupports", 0, "max_supports must be"),
    ("epochs", -2, "epochs must be"),
    ("gamma", 1.5, "gamma"),
    ("imageSize", 300, "Image size"),
])
def test_options_are_checked_before_any_model_work(scene, option, value, message):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    factory = CountingFactory()
    logic, worker = make_logic(factory)
    with nodes_unchanged(scene), pytest.raises(InputError, match=message):
        logic.process(volume, segmentation, ids[:1], method="ofl", **{option: value}, **FAST)
    worker.shutdown()
    assert factory.built == 0 and not logic.isRunning() and logic.lastRun is None
    np.testing.assert_array_equal(read_segments(segmentation, volume)[ids[0]], before[ids[0]])


def test_the_option_messages_are_the_engines(scene):
    from oflsam2.api import MethodOptions

    volume, segmentation, ids = annotated_case(scene)
    logic, worker = make_logic(CountingFactory())
    with pytest.raises(InputError) as from_engine:
        MethodOptions(max_supports=0)
    with nodes_unchanged(scene), pytest.raises(InputError) as from_logic:
        logic.process(volume, segmentation, ids[:1], method="ofl", maxSupports=0, **FAST)
    worker.shutdown()
    assert str(from_logic.value) == str(from_engine.value)


def test_adapter_labels_and_the_save_folder_are_checked_before_any_model_work(scene, tmp_path):
    volume, segmentation, ids = annotated_case(scene)
    adapter = saved_adapter(tmp_path, label_name="Spleen")
    factory = CountingFactory()
    logic, worker = make_logic(factory)
    with nodes_unchanged(scene):
        with pytest.raises(InputError, match="No adapter for label 'Liver'.*it holds: Spleen"):
            logic.process(volume, segmentation, ids[:1], method="ofl", adapter=str(adapter), model="sam2.1-small",
                          imageSize=512, **FAST)
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o500)
        try:
            if not os.access(read_only, os.W_OK):  # root can write anyway
                with pytest.raises(InputError, match="cannot be written.*permission denied"):
                    logic.saveAdapter(volume, segmentation, str(read_only / "adapter"), ids[:1], **FAST)
        finally:
            read_only.chmod(0o700)
        a_file = tmp_path / "a-file"
        a_file.write_text("")
        with pytest.raises(InputError, match="is a file; give a folder"):
            logic.saveAdapter(volume, segmentation, str(a_file), ids[:1], **FAST)
        with pytest.raises(InputError, match="adapter is for OFL-SAM2.*method 'sam2' cannot use one"):
            logic.process(volume, segmentation, ids[:1], method="sam2", adapter=str(adapter), **FAST)
        with pytest.raises(AdapterError, match="trained with model 'sam2.1-small'.*this run: 'sam2.1-tiny'"):
            logic.process(volume, segmentation, ids[:1], method="ofl", adapter=str(adapter), model="sam2.1-tiny", **FAST)
    worker.shutdown()
    assert factory.built == 0


def test_a_loaded_adapter_is_used_by_ofl_runs_only(scene, tmp_path):
    volume, segmentation, ids = annotated_case(scene)
    adapter = saved_adapter(tmp_path)
    engine = CopyEngine()
    logic, worker = make_logic(lambda s: engine)
    with nodes_unchanged(scene):
        logic.loadAdapter(str(adapter))
        logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
    worker.shutdown()
    assert engine.calls[0]["options"].adapter is None
