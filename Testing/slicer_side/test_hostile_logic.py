"""The batch API as a careless or hostile script author would call it, against real MRML.

Real MRML classes (slicer-core), the fake engine through the worker seam (the model is not the
point here). Each case checks that the user gets an :class:`InputError` that says what to do,
that every segment is unchanged unless the run legitimately wrote it, and that no node is left
behind (``nodes_unchanged`` counts them around each public call).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fakes import CopyEngine, ManualPump
from mrml_helpers import add_segmentation, add_volume, read_segments, require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

import vtk  # noqa: E402
from test_segmentation_safety import grid_image, grid_matrix, make_logic, nodes_unchanged, rotation, saved_adapter, stored_segments  # noqa: E402

from oflsam2.errors import InputError  # noqa: E402
from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402
from OFLSAM2SegmentLib.worker import Worker  # noqa: E402

FAST = {"randomWeights": True, "device": "cpu"}
SHAPE = (8, 10, 12)  # z, y, x; 3 mm slices


def painted_case(scene):
    """A volume and a segmentation with Liver painted on axial planes 2 and 5, and Other (a row
    through every plane) that no run may touch."""
    volume = add_volume(scene, np.random.default_rng(1).random(SHAPE).astype(np.float32), (1.0, 1.0, 3.0))
    liver = np.zeros(SHAPE, bool)
    liver[[2, 5], 2:5, 2:6] = True
    other = np.zeros(SHAPE, bool)
    other[:, 0, :] = True
    segmentation, ids = add_segmentation(scene, volume, {"Liver": liver, "Other": other})
    return volume, segmentation, ids


def assert_refused(scene, volume, segmentation, call, match):
    """``call()`` raises an InputError matching ``match``, adds or removes no node, changes no voxel."""
    before = read_segments(segmentation, volume)
    with nodes_unchanged(scene), pytest.raises(InputError, match=match):
        call()
    after = read_segments(segmentation, volume)
    for segment_id, mask in before.items():
        np.testing.assert_array_equal(after[segment_id], mask)


# ---------------------------------------------------------------------------------------------
# Arguments of the wrong kind


@pytest.mark.parametrize("segment_ids", [5, 3.5, object()], ids=["int", "float", "object"])
def test_segment_ids_that_are_not_a_list_are_refused_clearly(scene, segment_ids):
    volume, segmentation, ids = painted_case(scene)
    logic, worker = make_logic(CopyEngine)
    assert_refused(scene, volume, segmentation, lambda: logic.process(volume, segmentation, segment_ids, "sam2", **FAST),
                   "segmentIds must be a list of segment IDs")
    with pytest.raises(InputError, match="segmentIds must be a list"):
        logic.describeSupport(volume, segmentation, segment_ids)
    worker.shutdown()


@pytest.mark.parametrize("make_ids", [tuple, lambda ids: (s for s in ids), lambda ids: ids[0]],
                         ids=["tuple", "generator", "string"])
def test_a_tuple_a_generator_and_one_string_select_the_same_segment(scene, make_ids):
    volume, segmentation, ids = painted_case(scene)
    before = read_segments(segmentation, volume)
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene):
        summary = logic.process(volume, segmentation, make_ids(ids[:1]), "sam2", **FAST)
    worker.shutdown()
    after = read_segments(segmentation, volume)
    assert list(summary["segments"]) == [ids[0]] and summary["segments"][ids[0]]["written"] == 6
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]])
    assert after[ids[0]].sum() == 8 * 12


@pytest.mark.parametrize("which", ["volume", "segmentation"])
@pytest.mark.parametrize("value", ["Volume", 42], ids=["name", "number"])
def test_a_name_or_number_instead_of_a_node_is_refused_clearly(scene, which, value):
    volume, segmentation, ids = painted_case(scene)
    logic, worker = make_logic(CopyEngine)
    nodes = {"volume": volume, "segmentation": segmentation, which: value}
    match = "Select the CT or MR volume" if which == "volume" else "Select the segmentation"
    assert_refused(scene, volume, segmentation,
                   lambda: logic.process(nodes["volume"], nodes["segmentation"], ids[:1], "sam2", **FAST), match)
    assert_refused(scene, volume, segmentation,
                   lambda: logic.describeSupport(nodes["volume"], nodes["segmentation"], ids[:1]), match)
    worker.shutdown()


def test_a_progress_callback_that_is_not_a_function_is_refused(scene):
    volume, segmentation, ids = painted_case(scene)
    logic, worker = make_logic(CopyEngine)
    assert_refused(scene, volume, segmentation,
                   lambda: logic.process(volume, segmentation, ids[:1], "sam2", True, "print", **FAST),
                   "progressCallback must be a function")
    worker.shutdown()


@pytest.mark.parametrize("option,value,match", [
    ("imageSize", "abc", "image_size' must be of type int"),
    ("imageSize", 255.5, "image_size' must be of type int"),
    ("imageSize", -32, "Image size -32 is not supported"),
    ("imageSize", 10**9, "is not supported"),
    ("device", "gpu", "Unknown device"),
    ("epochs", "ten", "epochs' must be of type int"),
    ("lr", "nan", "lr must be"),
    ("lr", float("inf"), "lr must be"),
    ("gamma", -5, "gamma must be"),
    ("topK", -3, "top_k must be"),
    ("axis", None, "Unknown slice axis"),
    ("axis", 2, "Unknown slice axis"),
    ("preset", "bogus", "Unknown intensity preset"),
    ("model", "sam9", "Unknown model"),
    ("randomWeights", "maybe", "random_weights' must be of type bool"),
    ("bogusOption", 1, "Unknown option 'bogusOption'"),
])
def test_options_out_of_range_or_of_the_wrong_type_are_refused(scene, option, value, match):
    volume, segmentation, ids = painted_case(scene)
    logic, worker = make_logic(CopyEngine)
    assert_refused(scene, volume, segmentation,
                   lambda: logic.process(volume, segmentation, ids[:1], "ofl", **{**FAST, option: value}), match)
    worker.shutdown()


# ---------------------------------------------------------------------------------------------
# Volumes and segmentations of odd kinds


def test_a_colour_or_empty_volume_is_named_before_the_segments_are_read(scene, tmp_path):
    """With the default segments (None) and a colour volume, the message was "has no segment"."""
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "RGB")
    slicer.util.updateVolumeFromArray(colour, np.zeros(SHAPE + (3,), np.uint8))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene):
        with pytest.raises(InputError, match="several components per voxel"):
            logic.process(colour, segmentation, None, "sam2", **FAST)
        with pytest.raises(InputError, match="holds image data"):
            logic.process(empty, segmentation, None, "sam2", **FAST)
        with pytest.raises(InputError, match="several components per voxel"):
            logic.segmentVolumesWithAdapter([colour], str(saved_adapter(tmp_path)), **FAST)
    worker.shutdown()


def test_default_segments_of_a_closed_surface_segmentation_say_how_to_convert(scene):
    """``segmentIds=None`` read the masks before checking the source representation: "Could not
    read segment" instead of how to fix it."""
    volume, segmentation, ids = painted_case(scene)
    segmentation.CreateClosedSurfaceRepresentation()
    segmentation.GetSegmentation().SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene), pytest.raises(InputError, match="Open it once in the Segment Editor"):
        logic.process(volume, segmentation, None, "sam2", **FAST)
    worker.shutdown()


def grid_case(scene, directions, spacing, origin, extent):
    """A volume (8 x 20 x 20, 2 mm slices) and a segmentation stored on its own grid: Liver on
    the grid voxels nearest to volume planes 2 and 5 (a box), Border on those nearest to rows 0-2."""
    volume = add_volume(scene, np.random.default_rng(3).random((8, 20, 20)).astype(np.float32), (1.0, 1.0, 2.0))
    matrix = grid_matrix(directions, spacing, origin)
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    k, j, i = np.meshgrid(*(np.arange(extent[2 * a], extent[2 * a + 1] + 1) for a in (2, 1, 0)), indexing="ij")
    ras = matrix @ np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1)
    volume_ijk = np.floor(np.diag([1.0, 1.0, 0.5, 1.0]) @ ras + 0.5).astype(int)[:3].reshape((3,) + shape)
    inside = np.all((volume_ijk >= 0) & (volume_ijk < np.array([20, 20, 8])[:, None, None, None]), axis=0)
    vi, vj, vk = volume_ijk
    liver = inside & np.isin(vk, [2, 5]) & (vj >= 5) & (vj < 11) & (vi >= 5) & (vi < 11)
    border = inside & (vj < 3)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Grid")
    segmentation.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(grid_image(matrix, extent, np.zeros(shape))))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ids = []
    for name, voxels in (("Liver", liver), ("Border", border)):
        segment_id = segmentation.GetSegmentation().AddEmptySegment(name, name)
        ids.append(segment_id)
        assert logic.SetBinaryLabelmapToSegment(grid_image(matrix, extent, voxels), segmentation, segment_id, logic.MODE_MERGE_MASK)
    return volume, segmentation, ids, matrix, extent


ODD_GRIDS = {
    # name: (directions (columns i, j, k), spacing, origin, extent)
    "flipped": (np.diag([-1.0, 1.0, -1.0]), (1.0, 1.0, 2.0), (19.0, 0.0, 14.0), (0, 19, 0, 19, 0, 7)),
    "anisotropic": (np.eye(3), (0.5, 1.5, 4.0), (0.0, 0.0, 0.0), (0, 39, 0, 13, 0, 3)),
    "larger": (np.eye(3), (1.0, 1.0, 2.0), (-10.0, -10.0, -10.0), (0, 39, 0, 39, 0, 15)),
    "oblique-fine": (rotation(1, 30), (0.6, 0.6, 0.6), (0.0, 0.0, 0.0), (0, 35, 0, 35, -5, 25)),
}


@pytest.mark.parametrize("grid", list(ODD_GRIDS))
def test_runs_and_cancels_on_odd_segmentation_grids(scene, grid):
    volume, segmentation, ids, matrix, extent = grid_case(scene, *ODD_GRIDS[grid])
    before = stored_segments(segmentation, matrix, extent)
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene, added=0):
        summary = logic.process(volume, segmentation, ids[:1], "sam2", axis="axial", **FAST)
    worker.shutdown()
    after = stored_segments(segmentation, matrix, extent)
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]])
    assert not (before[ids[0]] & ~after[ids[0]]).any() and after[ids[0]].sum() > before[ids[0]].sum()
    written = summary["segments"][ids[0]]["written"]
    if grid == "anisotropic":  # 4 mm slices on 2 mm ones: odd volume planes have no voxel of their own
        assert written == 3 and "3 planes of segment 'Liver' have no voxel" in summary["warnings"][0]
    else:
        assert written == 6 and summary["warnings"] == []
    assert logic.canUndo()

    logic.undoLastRun()
    gate = threading.Event()
    pump = ManualPump()
    logic, worker = make_logic(lambda settings: CopyEngine(settings, block=gate, block_after=4), pump)
    with nodes_unchanged(scene):
        run = logic.process(volume, segmentation, ids[:1], "sam2", False, axis="axial", **FAST)
        deadline = time.monotonic() + 20
        while sum(run._written.values()) < 2:
            assert not pump.step() and time.monotonic() < deadline
            time.sleep(0.01)
        run.cancel()
        gate.set()
        pump.run_until_done()
    worker.shutdown()
    assert run.state == "cancelled" and run.restored
    restored = stored_segments(segmentation, matrix, extent)
    for segment_id in ids:
        np.testing.assert_array_equal(restored[segment_id], before[segment_id])


@pytest.mark.parametrize("oblique", [False, True], ids=["aligned", "rotated"])
def test_planes_outside_a_one_slice_segmentation_grid_are_reported_not_counted(scene, oblique):
    """A segmentation one slice thick (plane 2 only): the run could write none of the other
    planes, yet it said "7 slices written" and offered to undo a run that changed nothing."""
    directions = rotation(2, 20) if oblique else np.eye(3)
    extent = (-2, 23, -2, 23, 0, 0) if oblique else (0, 19, 0, 19, 0, 0)
    origin = (4.0, -4.0, 4.0) if oblique else (0.0, 0.0, 4.0)
    volume, segmentation, ids, matrix, extent = grid_case(scene, directions, (1.0, 1.0, 2.0), origin, extent)
    before = stored_segments(segmentation, matrix, extent)
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene):
        summary = logic.process(volume, segmentation, ids[:1], "sam2", axis="axial", **FAST)
    worker.shutdown()
    after = stored_segments(segmentation, matrix, extent)
    for segment_id in ids:
        np.testing.assert_array_equal(after[segment_id], before[segment_id])
    assert summary["segments"][ids[0]]["annotated"] == [2] and summary["segments"][ids[0]]["written"] == 0
    assert any("7 planes of segment 'Liver' have no voxel in the segmentation's geometry" in w for w in summary["warnings"])
    assert not logic.canUndo() and "changed nothing" in logic.undoUnavailableReason()


def test_a_segmentation_grid_outside_the_volume_is_refused(scene):
    volume, segmentation, ids, matrix, extent = grid_case(scene, np.eye(3), (1.0, 1.0, 2.0), (100.0, 100.0, 0.0),
                                                          (0, 9, 0, 9, 0, 7))
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene), pytest.raises(InputError, match="has no annotated slice"):
        logic.process(volume, segmentation, ids[:1], "sam2", **FAST)
    worker.shutdown()


# ---------------------------------------------------------------------------------------------
# Changes to the scene during a run


def test_removing_the_target_segment_during_a_run_fails_with_the_reason(scene):
    """It failed with "Could not write plane 3 (axis 0) of segment 'Liver'"."""
    volume, segmentation, ids = painted_case(scene)
    before = read_segments(segmentation, volume)
    gate = threading.Event()
    pump = ManualPump()
    logic, worker = make_logic(lambda settings: CopyEngine(settings, block=gate, block_after=2), pump)
    with nodes_unchanged(scene):
        run = logic.process(volume, segmentation, ids[:1], "sam2", False, **FAST)
        deadline = time.monotonic() + 20
        while sum(run._written.values()) < 2:
            assert not pump.step() and time.monotonic() < deadline
            time.sleep(0.01)
        segmentation.GetSegmentation().RemoveSegment(ids[0])
        gate.set()
        pump.run_until_done()
    worker.shutdown()
    assert run.state == "failed" and "was removed from 'Segmentation' during the run" in str(run.error)
    np.testing.assert_array_equal(read_segments(segmentation, volume, ids[1:])[ids[1]], before[ids[1]])
    assert not logic.canUndo()


@pytest.mark.parametrize("change", ["origin", "spacing"])
def test_update_after_the_volume_moved_is_refused_and_changes_nothing(scene, change):
    """The volume's origin or spacing changed after a run (a hardened transform): Update read the
    segment on the moved grid, found every plane different, took every plane as a correction and
    'succeeded' recomputing nothing. Only the shape was compared."""
    volume, segmentation, ids = painted_case(scene)
    logic, worker = make_logic(CopyEngine)
    try:
        logic.process(volume, segmentation, ids[:1], "sam2", **FAST)
        if change == "origin":
            volume.SetOrigin(5.0, 3.0, 2.0)
        else:
            volume.SetSpacing(2.0, 1.0, 3.0)
        assert_refused(scene, volume, segmentation, logic.update, r"grid \(size, spacing, origin or orientation\) changed")
    finally:
        worker.shutdown()


# ---------------------------------------------------------------------------------------------
# Adapters


def test_cohort_arguments_of_the_wrong_kind(scene, tmp_path):
    adapter = str(saved_adapter(tmp_path))
    volume = add_volume(scene, np.random.default_rng(0).random(SHAPE).astype(np.float32), (1.0, 1.0, 3.0), name="case")
    logic, worker = make_logic(lambda settings: CopyEngine(settings))
    with nodes_unchanged(scene):
        for names in ([], ["Liver", "liver"], [1], [""]):
            with pytest.raises(InputError, match="segmentNames must be distinct, non-empty names"):
                logic.segmentVolumesWithAdapter([volume], adapter, segmentNames=names, **FAST)
        with pytest.raises(InputError, match="Select the CT or MR volume"):
            logic.segmentVolumesWithAdapter([volume, "case"], adapter, **FAST)
    with nodes_unchanged(scene, added=2):  # one volume node, not in a list: its new segmentation and display
        (created,) = logic.segmentVolumesWithAdapter(volume, adapter, **FAST)
    worker.shutdown()
    assert created.GetName() == "case OFL-SAM2"


def test_save_adapter_with_a_method_is_refused(scene, tmp_path):
    volume, segmentation, ids = painted_case(scene)
    logic, worker = make_logic(CopyEngine)
    assert_refused(scene, volume, segmentation,
                   lambda: logic.saveAdapter(volume, segmentation, str(tmp_path / "out"), ids[:1], method="sam2", **FAST),
                   "saveAdapter always trains OFL-SAM2")
    worker.shutdown()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The README's console example


def test_the_readme_console_example(scene):
    """``logic.process(volumeNode, segmentationNode, segmentIds=["liver"], method="ofl",
    waitForCompletion=True)``, with a segment whose ID is "liver" (plus random weights: no
    checkpoint here), then a second run back to back and undo of the second."""
    volume = add_volume(scene, np.random.default_rng(1).random(SHAPE).astype(np.float32), (1.0, 1.0, 3.0))
    liver = np.zeros(SHAPE, bool)
    liver[[2, 5], 2:5, 2:6] = True
    segmentation, _ = add_segmentation(scene, volume, {"liver": liver})
    logic = OFLSAM2Logic(worker=Worker(CopyEngine), pump=ManualPump())
    volumeNode, segmentationNode = volume, segmentation
    with nodes_unchanged(scene):
        summary = logic.process(volumeNode, segmentationNode, segmentIds=["liver"], method="ofl",
                                waitForCompletion=True, **FAST)
    assert summary["segments"]["liver"]["written"] == 6
    after_first = read_segments(segmentation, volume)["liver"]
    with nodes_unchanged(scene):
        second = logic.process(volumeNode, segmentationNode, segmentIds=["liver"], method="ofl",
                               waitForCompletion=True, axis="axial", **FAST)
    assert second["segments"]["liver"]["annotated"] == list(range(8)) and second["segments"]["liver"]["written"] == 0
    assert not logic.canUndo()  # the second run changed nothing: nothing to undo
    logic.worker.shutdown()
    np.testing.assert_array_equal(read_segments(segmentation, volume)["liver"], after_first)



# ---------------------------------------------------------------------------------------------
# Options that the engine takes as optional numbers, booleans for numbers, missing files


def test_optional_whole_number_options_reach_the_engine_as_numbers(scene):
    """``numMaskmem`` (and ``learnerBackpropIters``), whose default is None, were turned into
    strings ('7') and then refused: "num_maskmem must be a whole number ...; got '7'"."""
    volume, segmentation, ids = painted_case(scene)
    engine = CopyEngine()
    logic, worker = make_logic(lambda settings: engine)
    with nodes_unchanged(scene):
        logic.process(volume, segmentation, ids[:1], "ofl", numMaskmem="7", learnerBackpropIters=2, **FAST)
    worker.shutdown()
    options = engine.calls[0]["options"]
    assert (options.num_maskmem, options.learner_backprop_iters) == (7, 2)


def test_a_boolean_is_not_a_number_of_epochs(scene):
    volume, segmentation, ids = painted_case(scene)
    logic, worker = make_logic(CopyEngine)
    assert_refused(scene, volume, segmentation,
                   lambda: logic.process(volume, segmentation, ids[:1], "ofl", epochs=True, **FAST),
                   "'epochs' must be of type int; got True")
    worker.shutdown()


@pytest.mark.parametrize("where", ["missing", "folder"])
def test_a_checkpoint_path_that_is_no_file_is_refused_before_the_worker_starts(scene, tmp_path, where):
    """It was accepted and failed only once the worker loaded the model."""
    volume, segmentation, ids = painted_case(scene)
    checkpoint = tmp_path / "missing.pt" if where == "missing" else tmp_path
    built = []
    logic, worker = make_logic(lambda settings: built.append(settings) or CopyEngine(settings))
    assert_refused(scene, volume, segmentation,
                   lambda: logic.process(volume, segmentation, ids[:1], "sam2", checkpoint=str(checkpoint), device="cpu"),
                   "does not exist or is not a file")
    worker.shutdown()
    assert built == []


# ---------------------------------------------------------------------------------------------
# Shared layers, label values other than 1, overlaps, runs back to back and undo


def imported_case(scene):
    """Four segments imported from a label map into one shared layer, label values 1, 2, 7, 9:
    Liver (1) on planes 2 and 5, Kidney (2) on planes 2 and 6, Wall (7) a row through every
    plane, Cyst (9) on plane 3 where a run on Kidney will write over it."""
    volume = add_volume(scene, np.random.default_rng(1).random(SHAPE).astype(np.float32), (1.0, 1.0, 3.0))
    labels = np.zeros(SHAPE, np.uint8)
    labels[[2, 5], 2:5, 2:6] = 1
    labels[[2, 6], 6:9, 7:10] = 2
    labels[:, 0, :] = 7
    labels[3, 5:8, 8:11] = 9
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(labelmap, labels)
    labelmap.SetSpacing(1.0, 1.0, 3.0)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Imported")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    data = segmentation.GetSegmentation()
    ids = list(data.GetSegmentIDs())
    assert [data.GetSegment(s).GetLabelValue() for s in ids] == [1, 2, 7, 9] and data.GetNumberOfLayers() == 1
    return volume, segmentation, ids, labels


def test_label_values_shared_layers_overlaps_and_undo_after_another_run(scene):
    volume, segmentation, ids, labels = imported_case(scene)
    liver, kidney, wall, cyst = ids
    before = read_segments(segmentation, volume)
    logic, worker = make_logic(CopyEngine)

    with nodes_unchanged(scene):
        first = logic.process(volume, segmentation, [kidney], "sam2", axis="axial", **FAST)
    after_kidney = read_segments(segmentation, volume)
    assert first["segments"][kidney] == {"name": "Label_2", "annotated": [2, 6], "written": 6, "ignoredStrokeAxes": []}
    expected = np.zeros(SHAPE, bool)
    expected[:, 6:9, 7:10] = True
    np.testing.assert_array_equal(after_kidney[kidney], expected)
    for other in (liver, wall, cyst):  # Cyst overlaps the new Kidney voxels on plane 3 and keeps them
        np.testing.assert_array_equal(after_kidney[other], before[other], err_msg=other)
    data = segmentation.GetSegmentation()
    assert [data.GetSegment(s).GetLabelValue() for s in (liver, wall, cyst)] == [1, 7, 9]

    with nodes_unchanged(scene):
        logic.process(volume, segmentation, [liver], "sam2", axis="axial", **FAST)
        logic.undoLastRun()  # undoes the Liver run only
    worker.shutdown()
    undone = read_segments(segmentation, volume)
    for segment_id in ids:
        np.testing.assert_array_equal(undone[segment_id], after_kidney[segment_id], err_msg=segment_id)
    with pytest.raises(InputError, match="no OFLSAM2 run to undo"):
        logic.undoLastRun()  # one undo per run: the Kidney run is not undone by a second call


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_voxels_are_refused_before_the_worker_builds_a_model(scene, bad):
    """The engine's validation (``validate_run``) ran only inside the worker, after the model
    was built; a run through the fake engine even completed."""
    image = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    image[3, 4, 5] = bad
    volume = add_volume(scene, image, (1.0, 1.0, 3.0))
    liver = np.zeros(SHAPE, bool)
    liver[[2, 5], 2:5, 2:6] = True
    segmentation, ids = add_segmentation(scene, volume, {"Liver": liver})
    built = []
    logic, worker = make_logic(lambda settings: built.append(settings) or CopyEngine(settings))
    assert_refused(scene, volume, segmentation, lambda: logic.process(volume, segmentation, ids, "sam2", **FAST),
                   "NaN or infinite voxels")
    worker.shutdown()
    assert built == []


def test_a_cohort_with_a_nan_volume_is_refused_before_any_volume_is_segmented(scene, tmp_path):
    """The NaN volume was found only when its turn came, after the volumes before it had run."""
    adapter = str(saved_adapter(tmp_path))
    images = [np.random.default_rng(i).random(SHAPE).astype(np.float32) for i in range(2)]
    images[1][0, 0, 0] = np.nan
    volumes = [add_volume(scene, image, (1.0, 1.0, 3.0), name=f"case{i}") for i, image in enumerate(images)]
    built = []
    logic, worker = make_logic(lambda settings: built.append(settings) or CopyEngine(settings))
    with nodes_unchanged(scene), pytest.raises(InputError, match="'case1' contains NaN or infinite voxels"):
        logic.segmentVolumesWithAdapter(volumes, adapter, **FAST)
    worker.shutdown()
    assert built == []


# ---------------------------------------------------------------------------------------------
# The real engine on an odd volume and an odd segmentation grid


def test_real_engine_on_a_flipped_int16_volume_and_a_rotated_segmentation_grid(scene, tiny_model):
    """Random-weight SAM2.1-tiny at 256 px: an int16 volume with flipped i and k axes and a
    segmentation stored on a grid rotated 20 degrees; the run adds to Liver only, on its grid."""
    from oflsam2.api import Engine

    shape = (4, 40, 40)
    image = (np.random.default_rng(5).random(shape) * 400 - 200).astype(np.int16)
    image[:, 12:28, 12:28] += 600  # a bright block for the model to follow
    volume = add_volume(scene, image, (1.0, 1.0, 2.0), origin=(39.0, 0.0, 6.0), directions_ras=np.diag([-1.0, 1.0, -1.0]),
                        name="flipped")
    matrix = grid_matrix(rotation(2, 20), (1.0, 1.0, 2.0), (5.0, -5.0, 0.0))
    extent = (0, 49, 0, 49, 0, 3)
    grid_shape = (4, 50, 50)
    liver = np.zeros(grid_shape, bool)
    liver[1, 18:30, 18:30] = True
    border = np.zeros(grid_shape, bool)
    border[:, 0:4, :] = True
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Rotated")
    segmentation.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(grid_image(matrix, extent, np.zeros(grid_shape))))
    mrml_logic = slicer.vtkSlicerSegmentationsModuleLogic
    ids = []
    for name, voxels in (("Liver", liver), ("Border", border)):
        ids.append(segmentation.GetSegmentation().AddEmptySegment(name, name))
        assert mrml_logic.SetBinaryLabelmapToSegment(grid_image(matrix, extent, voxels), segmentation, ids[-1],
                                                     mrml_logic.MODE_MERGE_MASK)
    assert read_segments(segmentation, volume, ids[:1])[ids[0]].any(), "the annotation must reach the volume"
    before = stored_segments(segmentation, matrix, extent)
    logic = OFLSAM2Logic(worker=Worker(lambda settings: Engine(settings, model=tiny_model)), pump=ManualPump())

    with nodes_unchanged(scene):
        summary = logic.process(volume, segmentation, ids[:1], "sam2", axis="axial", model="sam2.1-tiny", imageSize=256,
                                **FAST)
    logic.worker.shutdown()

    after = stored_segments(segmentation, matrix, extent)
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]])
    assert not (before[ids[0]] & ~after[ids[0]]).any()
    assert summary["segments"][ids[0]]["written"] + len(summary["segments"][ids[0]]["annotated"]) == 4
    assert summary["engine"]["random_weights"] is True


def test_an_option_given_twice_in_both_spellings_is_refused(scene):
    """``imageSize=512, image_size=256``: the last one silently won."""
    volume, segmentation, ids = painted_case(scene)
    logic, worker = make_logic(CopyEngine)
    assert_refused(scene, volume, segmentation,
                   lambda: logic.process(volume, segmentation, ids[:1], "sam2", imageSize=512, image_size=256, **FAST),
                   "'image_size' was given twice \\(also as 'imageSize'\\)")
    worker.shutdown()


def test_a_segment_name_given_as_an_id_is_explained(scene):
    """Segments made in the Segment Editor keep the ID "Segment_1" when renamed "liver"; the
    README's ``segmentIds=["liver"]`` then said only "has no segment(s) ['liver']"."""
    volume, segmentation, ids = painted_case(scene)
    segmentation.GetSegmentation().GetSegment(ids[0]).SetName("liver")
    logic, worker = make_logic(CopyEngine)
    assert_refused(scene, volume, segmentation,
                   lambda: logic.process(volume, segmentation, ["liver", "Nope"], "sam2", **FAST),
                   r"no segment with ID 'liver', 'Nope' \('liver' is the name of segment 'Liver'\)\. Give segment IDs; "
                   r"its segments are \(ID \(name\)\): 'Liver' \('liver'\), 'Other' \('Other'\)\.")
    worker.shutdown()


def test_a_volume_with_parallel_index_directions_is_refused_clearly(scene):
    """It failed with numpy's "LinAlgError: Singular matrix" from the first plane written."""
    volume, segmentation, ids = painted_case(scene)
    logic, worker = make_logic(CopyEngine)
    volume.SetIJKToRASDirections([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # i and j both along x
    with nodes_unchanged(scene), pytest.raises(InputError, match="two of its IJK directions are parallel"):
        logic.process(volume, segmentation, ids[:1], "sam2", **FAST)
    worker.shutdown()


def test_a_non_blocking_run_outside_slicer_without_a_pump_is_refused_before_it_starts(scene):
    """It raised "No module named 'qt'" after the run had started, which then stayed "running"
    for good: every later process() said a run was already in progress."""
    volume, segmentation, ids = painted_case(scene)
    logic = OFLSAM2Logic(worker=Worker(CopyEngine))  # no pump, no slicer.app
    assert_refused(scene, volume, segmentation, lambda: logic.process(volume, segmentation, ids[:1], "sam2", False, **FAST),
                   "waitForCompletion=False needs the Slicer application's event loop")
    assert not logic.isRunning()
    with nodes_unchanged(scene):
        assert logic.process(volume, segmentation, ids[:1], "sam2", True, **FAST)["segments"][ids[0]]["written"] == 6
    logic.worker.shutdown()


def test_a_volume_without_voxels_and_one_beyond_float32_get_their_own_messages(scene):
    """An image data with no voxels was told to "choose another slice axis" (0x0 slices); a float64
    volume of finite values beyond float32 was said to hold "NaN or infinite voxels"."""
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    empty.SetAndObserveImageData(vtk.vtkImageData())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("A", "A")
    huge = add_volume(scene, np.full(SHAPE, 1e300), (1.0, 1.0, 3.0), name="huge")
    liver = np.zeros(SHAPE, bool)
    liver[[2, 5], 2:5, 2:6] = True
    painted, ids = add_segmentation(scene, huge, {"Liver": liver})
    logic, worker = make_logic(CopyEngine)
    with nodes_unchanged(scene):
        with pytest.raises(InputError, match="'Empty' has no voxels"):
            logic.process(empty, segmentation, [segment_id], "sam2", **FAST)
        with pytest.raises(InputError, match="'huge' holds values beyond the float32 range"):
            logic.process(huge, painted, ids, "sam2", **FAST)
    worker.shutdown()


def test_the_readme_console_example_verbatim_without_a_checkpoint(scene, tmp_path, monkeypatch):
    """Exactly as the README writes it, on a computer without the checkpoint and outside the
    Slicer GUI: an error that says how to get the checkpoint, and nothing changed."""
    from oflsam2.checkpoints import ENV_CACHE_DIR, ENV_CHECKPOINT
    from oflsam2.errors import CheckpointError

    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    volumeNode = add_volume(scene, np.random.default_rng(1).random(SHAPE).astype(np.float32), (1.0, 1.0, 3.0))
    liver = np.zeros(SHAPE, bool)
    liver[[2, 5], 2:5, 2:6] = True
    segmentationNode, _ = add_segmentation(scene, volumeNode, {"liver": liver})
    before = read_segments(segmentationNode, volumeNode)
    built = []
    logic = OFLSAM2Logic(worker=Worker(lambda settings: built.append(settings) or CopyEngine(settings)), pump=ManualPump())
    with nodes_unchanged(scene), pytest.raises(CheckpointError, match="oflsam2 checkpoints download"):
        logic.process(volumeNode, segmentationNode, segmentIds=["liver"], method="ofl", waitForCompletion=True)
    logic.worker.shutdown()
    assert built == [] and not logic.isRunning()
    np.testing.assert_array_equal(read_segments(segmentationNode, volumeNode)["liver"], before["liver"])
