"""The run logic with real MRML classes (slicer-core) and a fake engine: blocking and pumped
runs, cancel, errors, scene changes during a run, references, adapters, downloads, installs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fakes import CopyEngine, ManualPump, RaisingEngine
from mrml_helpers import add_segmentation, add_volume, read_segments, require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from oflsam2.errors import Cancelled, InputError  # noqa: E402
from OFLSAM2SegmentLib import mrml_geometry, mrml_write  # noqa: E402
from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402
from OFLSAM2SegmentLib.worker import GpuOutOfMemory, Worker  # noqa: E402

SHAPE = (8, 10, 12)  # z, y, x; 3 mm slices make axial (array axis 0) the automatic axis
FAST = {"randomWeights": True, "device": "cpu"}


def planes(axis, indices, box):
    """A bool volume with ``box`` (slices in the other two axes) filled on the given planes."""
    mask = np.zeros(SHAPE, bool)
    for index in indices:
        selector = list(box)
        selector.insert(axis, index)
        mask[tuple(selector)] = True
    return mask


def annotated_case(scene, axis=0):
    """Liver annotated on planes 2 and 5, Kidney on plane 4 (along ``axis``), and an unrelated
    fully painted segment that no run may touch."""
    spacing = [1.0, 1.0, 1.0]
    spacing[2 - axis] = 3.0  # the annotated axis is also the thick one
    image = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    volume = add_volume(scene, image, spacing)
    other_shape = [n for a, n in enumerate(SHAPE) if a != axis]
    liver_box = (slice(1, other_shape[0] // 2), slice(1, other_shape[1] // 2))
    kidney_box = (slice(other_shape[0] // 2 + 1, other_shape[0] - 1), slice(other_shape[1] // 2 + 1, other_shape[1] - 1))
    liver = planes(axis, [2, 5], liver_box)
    kidney = planes(axis, [4], kidney_box)
    other = np.zeros(SHAPE, bool)
    other[:, 0, :] = True
    segmentation, ids = add_segmentation(scene, volume, {"Liver": liver, "Kidney": kidney, "Other": other})
    return volume, segmentation, ids


def expected_copy(masks, slices, axis):
    """What CopyEngine writes: every plane becomes its nearest annotated plane."""
    from fakes import nearest_annotation

    out = np.zeros(SHAPE, bool)
    for index in range(SHAPE[axis]):
        selector = [slice(None)] * 3
        selector[axis] = index
        out[tuple(selector)] = nearest_annotation(masks, slices, axis, index)
    return out


def make_logic(engine_factory, pump=None):
    worker = Worker(engine_factory)
    return OFLSAM2Logic(worker=worker, pump=pump or ManualPump()), worker


def status(segmentation, segment_id):
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    return logic.GetSegmentStatus(segmentation.GetSegmentation().GetSegment(segment_id))


# ---------------------------------------------------------------------------------------------
# Complete runs


def test_blocking_run_writes_every_plane_and_leaves_the_rest_alone(scene):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    logic, worker = make_logic(CopyEngine)
    stages = []

    summary = logic.process(volume, segmentation, ids[:2], method="sam2",
                            progressCallback=lambda *event: stages.append(event), **FAST)

    after = read_segments(segmentation, volume)
    np.testing.assert_array_equal(after[ids[0]], expected_copy(before[ids[0]], [2, 5], 0))
    np.testing.assert_array_equal(after[ids[1]], expected_copy(before[ids[1]], [4], 0))
    np.testing.assert_array_equal(after[ids[2]], before[ids[2]])
    assert summary["axis"] == 0 and summary["axisName"] == "axial" and summary["method"] == "sam2"
    assert summary["segments"][ids[0]] == {"name": "Liver", "annotated": [2, 5], "written": 6, "ignoredStrokeAxes": []}
    assert summary["warnings"] == []
    assert summary["segments"][ids[1]]["written"] == 7
    seen = [s[0] for s in stages]
    assert "loading" in seen and "propagating" in seen and seen[-1] == "completed"
    assert not logic.isRunning()
    assert status(segmentation, ids[0]) == slicer.vtkSlicerSegmentationsModuleLogic.NotStarted

    assert logic.undoLastRun()  # one undo step for the whole run
    undone = read_segments(segmentation, volume)
    for segment_id in before:
        np.testing.assert_array_equal(undone[segment_id], before[segment_id])
    worker.shutdown()


@pytest.mark.parametrize("axis,name", [(1, "coronal"), (2, "sagittal")])
def test_runs_along_the_annotated_axis(scene, axis, name):
    volume, segmentation, ids = annotated_case(scene, axis)
    before = read_segments(segmentation, volume)
    logic, worker = make_logic(CopyEngine)

    summary = logic.process(volume, segmentation, ids[:1], method="ofl", **FAST)  # axis "auto"

    assert summary["axis"] == axis and summary["axisName"] == name
    after = read_segments(segmentation, volume, ids[:1])
    np.testing.assert_array_equal(after[ids[0]], expected_copy(before[ids[0]], [2, 5], axis))
    worker.shutdown()


def test_default_segments_are_the_painted_ones(scene):
    volume, segmentation, ids = annotated_case(scene)
    empty = segmentation.GetSegmentation().AddEmptySegment("Empty", "Empty")
    engine = CopyEngine()
    logic, worker = make_logic(lambda s: engine)
    summary = logic.process(volume, segmentation, None, method="sam2", axis="axial", **FAST)
    worker.shutdown()
    # Other is one coronal plane: drawn on another axis, so not an axial annotation (issue 16.4)
    assert [s.name for s in engine.calls[0]["supports"]] == ["Liver", "Kidney"]
    assert summary["warnings"] == ["Segment 'Other' has strokes only on the coronal axis; it was left out of this axial run."]
    assert empty and logic.activeRun is None
    assert engine.calls[0]["axis"] == 0


def test_pumped_run_and_one_run_at_a_time(scene):
    volume, segmentation, ids = annotated_case(scene)
    pump = ManualPump()
    logic, worker = make_logic(CopyEngine, pump)

    run = logic.process(volume, segmentation, ids[:1], method="sam2", waitForCompletion=False, **FAST)

    assert run.state == "running" and logic.isRunning()
    with pytest.raises(RuntimeError, match="already in progress"):
        logic.process(volume, segmentation, ids[1:2], method="sam2", **FAST)
    pump.run_until_done()
    assert run.state == "completed" and not logic.isRunning()
    assert run.summary["segments"][ids[0]]["written"] == 6
    worker.shutdown()


def test_one_timer_tick_writes_planes_for_about_30_ms_at_most(scene):
    """A burst of queued planes (a fast worker, a slow main thread) must not hold Slicer's main
    thread: each tick stops once ``DRAIN_SECONDS`` have passed and leaves the rest to the next
    one (before: up to 64 planes per tick, however long they took). Time is a counted clock
    here: every plane write costs 12 ms of it, anything else none."""
    from OFLSAM2SegmentLib.run import DRAIN_SECONDS, drain

    volume, segmentation, ids = annotated_case(scene)
    clock = [0.0]

    class SlowWriter(mrml_write.SegmentSliceWriter):
        def write(self, segment_id, axis, index, plane):
            clock[0] += 0.012
            return super().write(segment_id, axis, index, plane)

    pump = ManualPump()
    logic, worker = make_logic(CopyEngine, pump)
    run = logic.process(volume, segmentation, ids[:2], method="sam2", waitForCompletion=False,
                        writer=SlowWriter(segmentation, mrml_geometry.volume_geometry(volume)), **FAST)
    assert run.job.finished.wait(30)  # every plane (6 + 7) is queued: one burst
    per_tick = []
    while not run.finished:
        written = sum(run._written.values())
        drain(run, clock=lambda: clock[0])
        per_tick.append(sum(run._written.values()) - written)
    assert DRAIN_SECONDS == pytest.approx(0.03)
    assert per_tick[:4] == [3, 3, 3, 3] and sum(per_tick) == 13, per_tick  # 3 x 12 ms reaches 30 ms
    assert run.state == "completed" and run.summary["segments"][ids[0]]["written"] == 6
    worker.shutdown()


def test_editor_writer_and_editor_undo_are_used_when_given(scene):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    editor.SetSegmentationNode(segmentation)
    calls = []

    def modify(segment_id, image, mode):
        calls.append(mode)
        editor.ModifySegmentByLabelmap(segmentation, segment_id, image, mode, True, True)

    E = slicer.vtkSlicerSegmentEditorLogic
    writer = mrml_write.EditorSliceWriter(modify, E.ModificationModeAdd, segmentation, mrml_geometry.volume_geometry(volume))
    undo_states = []
    logic, worker = make_logic(CopyEngine)

    logic.process(volume, segmentation, ids[:1], method="sam2", writer=writer,
                  saveUndoState=lambda: undo_states.append(editor.SaveStateForUndo()), **FAST)

    assert undo_states == [True]  # once per run, not per slice
    assert calls == [E.ModificationModeAdd] * 6  # one Add per written plane; a run never removes voxels
    np.testing.assert_array_equal(read_segments(segmentation, volume, ids[:1])[ids[0]], expected_copy(before[ids[0]], [2, 5], 0))
    editor.Undo()
    np.testing.assert_array_equal(read_segments(segmentation, volume, ids[:1])[ids[0]], before[ids[0]])
    worker.shutdown()


# ---------------------------------------------------------------------------------------------
# Cancel, errors, scene changes: the segmentation ends exactly as before


def assert_unchanged(segmentation, volume, before):
    after = read_segments(segmentation, volume)
    assert after.keys() == before.keys()
    for segment_id in before:
        np.testing.assert_array_equal(after[segment_id], before[segment_id], err_msg=segment_id)


def start_blocked(scene, slices_before_block=3):
    """A pumped run whose engine stops after a few slices until released; returns it once
    those slices are in the segmentation."""
    volume, segmentation, ids = annotated_case(scene)
    slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(segmentation.GetSegmentation().GetSegment(ids[0]),
                                                               slicer.vtkSlicerSegmentationsModuleLogic.Flagged)
    before = read_segments(segmentation, volume)
    gate = threading.Event()
    pump = ManualPump()
    logic, worker = make_logic(lambda s: CopyEngine(s, block=gate, block_after=slices_before_block), pump)
    run = logic.process(volume, segmentation, ids[:2], method="ofl", waitForCompletion=False, **FAST)
    deadline = time.monotonic() + 10
    while sum(run._written.values()) < slices_before_block:
        assert not pump.step() and time.monotonic() < deadline
        time.sleep(0.01)
    assert status(segmentation, ids[0]) == slicer.vtkSlicerSegmentationsModuleLogic.InProgress
    assert any(not np.array_equal(read_segments(segmentation, volume)[i], before[i]) for i in ids[:2])
    return volume, segmentation, ids, before, logic, worker, run, pump, gate


def test_cancel_restores_the_segments_exactly(scene):
    volume, segmentation, ids, before, logic, worker, run, pump, gate = start_blocked(scene)

    run.cancel()
    pump.run_until_done()

    assert run.state == "cancelled" and not logic.isRunning()
    assert_unchanged(segmentation, volume, before)
    assert status(segmentation, ids[0]) == slicer.vtkSlicerSegmentationsModuleLogic.Flagged
    gate.set()
    worker.shutdown()


def test_cancel_from_the_progress_callback_in_blocking_mode(scene):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    logic, worker = make_logic(CopyEngine)

    def progress(stage, done, total, text):
        if stage == "propagating" and done == 4:
            logic.cancel()

    with pytest.raises(Cancelled, match="restored"):
        logic.process(volume, segmentation, ids[:2], method="sam2", progressCallback=progress, **FAST)
    assert_unchanged(segmentation, volume, before)
    worker.shutdown()


def test_engine_error_restores_and_raises(scene):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    logic, worker = make_logic(lambda s: CopyEngine(s, fail_after=3, error=ValueError("engine broke")))

    with pytest.raises(ValueError, match="engine broke"):
        logic.process(volume, segmentation, ids[:2], method="sam2", **FAST)

    assert_unchanged(segmentation, volume, before)
    assert not logic.isRunning()
    worker.shutdown()


def test_gpu_out_of_memory_reaches_the_caller_as_its_own_error(scene):
    import torch

    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    logic, worker = make_logic(lambda s: RaisingEngine(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(GpuOutOfMemory, match="smaller image size"):
        logic.process(volume, segmentation, ids[:1], method="ofl", **FAST)
    assert_unchanged(segmentation, volume, before)
    worker.shutdown()


def test_removing_the_volume_cancels_and_restores(scene):
    volume, segmentation, ids, before, logic, worker, run, pump, gate = start_blocked(scene)
    reference_volume = add_volume(scene, slicer.util.arrayFromVolume(volume).copy(), volume.GetSpacing(), name="copy")

    scene.RemoveNode(volume)
    pump.run_until_done()

    assert run.state == "cancelled" and "removed" in run.cancel_reason
    assert_unchanged(segmentation, reference_volume, before)
    worker.shutdown()


def test_removing_the_segmentation_or_closing_the_scene_cancels_cleanly(scene):
    volume, segmentation, ids, before, logic, worker, run, pump, gate = start_blocked(scene)
    scene.RemoveNode(segmentation)
    pump.run_until_done()
    assert run.state == "cancelled" and not logic.isRunning()
    gate.set()

    volume, segmentation, ids, before, logic, worker, run, pump, gate = start_blocked(scene)
    scene.Clear(0)
    pump.run_until_done()
    assert run.state == "cancelled" and "closed" in run.cancel_reason
    worker.shutdown()


# ---------------------------------------------------------------------------------------------
# Inputs


def test_refusals_are_clear(scene):
    volume, segmentation, ids = annotated_case(scene)
    empty = segmentation.GetSegmentation().AddEmptySegment("Spleen", "Spleen")
    logic, worker = make_logic(CopyEngine)
    with pytest.raises(InputError, match="'Spleen' has no annotated slice.*axial"):
        logic.process(volume, segmentation, [ids[0], empty], **FAST)
    with pytest.raises(InputError, match="Unknown option 'gamma_value'"):
        logic.process(volume, segmentation, ids[:1], gamma_value=0.5, **FAST)
    with pytest.raises(InputError, match="gamma"):
        logic.process(volume, segmentation, ids[:1], gamma=1.5, **FAST)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="not a labelmap"):
        logic.process(labelmap, segmentation, ids[:1], **FAST)
    with pytest.raises(InputError, match="Image size"):
        logic.process(volume, segmentation, ids[:1], imageSize=300, **FAST)
    assert not logic.isRunning()
    worker.shutdown()


def test_reference_pairs_are_matched_by_segment_name(scene):
    volume, segmentation, ids = annotated_case(scene)
    reference_image = np.full(SHAPE, 7.0, np.float32)
    reference_volume = add_volume(scene, reference_image, (1.0, 1.0, 3.0), name="Reference")
    liver = np.zeros(SHAPE, bool)
    liver[3:6, 2:5, 2:5] = True
    reference_segmentation, _ = add_segmentation(scene, reference_volume, {"LIVER": liver, "Heart": ~liver})
    engine = CopyEngine()
    logic, worker = make_logic(lambda s: engine)

    logic.process(volume, segmentation, ids[:2], method="ofl", references=[(reference_volume, reference_segmentation)], **FAST)
    worker.shutdown()

    (reference,) = engine.calls[0]["references"]
    assert reference.name == "Reference"
    np.testing.assert_array_equal(reference.image, reference_image)
    np.testing.assert_array_equal(reference.labels, liver.astype(np.uint16))  # Liver is label 1, no Kidney there


def test_cohort_segmentation_with_an_adapter(scene, tmp_path):
    import torch

    from oflsam2.ofl.adapter import save_adapter

    adapter = tmp_path / "adapter"
    save_adapter(adapter, {"head": torch.nn.Linear(2, 2)}, {
        "model": "sam2.1-small", "config": "configs/sam2.1/sam2.1_hiera_s.yaml", "checkpoint_sha256": "random-weights:0",
        "image_size": 512, "preset": "mr", "axis": 0, "label": 1, "label_name": "Liver"})
    volumes = [add_volume(scene, np.random.default_rng(i).random(SHAPE).astype(np.float32), (1.0, 1.0, 3.0), name=f"case{i}")
               for i in range(2)]
    engine = CopyEngine()
    built = []
    logic, worker = make_logic(lambda settings: built.append(settings) or engine)

    created = logic.segmentVolumesWithAdapter(volumes, str(adapter), **FAST)
    worker.shutdown()

    assert [n.GetName() for n in created] == ["case0 OFL-SAM2", "case1 OFL-SAM2"]
    assert (built[0].model, built[0].image_size) == ("sam2.1-small", 512)  # the adapter's own settings
    for volume, segmentation, call in zip(volumes, created, engine.calls):
        assert call["options"].adapter == str(adapter) and call["supports"][0].slices == []
        assert call["preset"] == "mr" and call["axis"] == 0
        (segment_id,) = segmentation.GetSegmentation().GetSegmentIDs()
        assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "Liver"
        written = read_segments(segmentation, volume)[segment_id]
        np.testing.assert_array_equal(written, slicer.util.arrayFromVolume(volume) > 0.5)
    with pytest.raises(InputError, match="holds no OFL-SAM2 adapter"):
        logic.loadAdapter(str(tmp_path))
    assert [a["label_name"] for a in logic.loadAdapter(str(adapter))] == ["Liver"]
    assert logic.adapterPath == str(adapter)


# ---------------------------------------------------------------------------------------------
# Support list, synthetic self-test data, checkpoint download, installs, failed writes


def test_describe_support_and_the_self_test_volume(scene):
    from OFLSAM2SegmentLib.testing import make_annotated_volume, target_slices

    volume, segmentation, ids = make_annotated_volume(scene)
    logic, worker = make_logic(CopyEngine)
    axis_name, targets = logic.describeSupport(volume, segmentation, ids)
    worker.shutdown()
    assert axis_name == "axial"
    assert [(t.name, t.slices) for t in targets] == [("Target", list(target_slices(10))), ("Other", list(range(10)))]
    with pytest.raises(InputError, match="twice"):
        logic.describeSupport(volume, segmentation, [ids[0], ids[0]])


def test_missing_checkpoint_outside_the_gui_is_an_error_before_anything_changes(scene, tmp_path, monkeypatch):
    from oflsam2.checkpoints import ENV_CACHE_DIR, ENV_CHECKPOINT
    from oflsam2.errors import CheckpointError

    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    logic, worker = make_logic(CopyEngine)
    with pytest.raises(CheckpointError, match="not on this computer"):
        logic.process(volume, segmentation, ids[:1], model="sam2.1-tiny", device="cpu")
    worker.shutdown()
    assert_unchanged(segmentation, volume, before)
    assert not logic.isRunning() and logic.lastRun is None


def test_installer_runs_first_and_the_download_step_precedes_segmenting(scene, tmp_path, monkeypatch):
    from oflsam2 import checkpoints
    from OFLSAM2SegmentLib import logic as logic_module

    monkeypatch.setenv(checkpoints.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(checkpoints.ENV_CHECKPOINT, raising=False)
    confirmed = []
    monkeypatch.setattr(logic_module, "_confirm_download", lambda model: confirmed.append(model))

    def fake_download(name, progress, cancel):
        target = checkpoints.cached_path(name)
        for done in (0, 50, 100):
            progress(done << 20, 100 << 20)
        target.write_bytes(b"weights")
        return target

    monkeypatch.setattr(checkpoints, "download", fake_download)
    volume, segmentation, ids = annotated_case(scene)
    events = []
    engine = CopyEngine()
    worker = Worker(lambda settings: engine)
    logic = OFLSAM2Logic(worker=worker, pump=ManualPump(), installer=lambda: events.append(("installer",)))

    summary = logic.process(volume, segmentation, ids[:1], method="sam2", model="sam2.1-tiny", device="cpu",
                            progressCallback=lambda *e: events.append(e))
    worker.shutdown()

    stages = [e[0] for e in events]
    assert stages[:3] == ["installing", "installer", "installing"]
    assert confirmed == ["sam2.1-tiny"] and "downloading" in stages
    assert stages.index("downloading") < stages.index("loading") and stages[-1] == "completed"
    assert [e for e in events if e[0] == "downloading"][-1][1:3] == (100 << 20, 100 << 20)
    assert summary["segments"][ids[0]]["written"] == 6 and len(engine.calls) == 1


def test_a_failing_slice_write_fails_the_run_and_restores(scene):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)
    real = mrml_write.SegmentSliceWriter(segmentation, mrml_geometry.volume_geometry(volume))

    class BreaksOnThirdPlane:
        count = 0

        def write(self, segment_id, axis, index, plane):
            self.count += 1
            if self.count == 3:
                raise OSError("disk full")
            real.write(segment_id, axis, index, plane)

    logic, worker = make_logic(CopyEngine)
    with pytest.raises(OSError, match="disk full"):
        logic.process(volume, segmentation, ids[:2], method="sam2", writer=BreaksOnThirdPlane(), **FAST)
    worker.shutdown()
    assert_unchanged(segmentation, volume, before)
    assert logic.lastRun.state == "failed"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_dies_mid_job_fails_the_run_instead_of_hanging(scene):
    volume, segmentation, ids = annotated_case(scene)
    before = read_segments(segmentation, volume)

    class Dies:
        def segment(self, *args, **kwargs):
            raise SystemExit  # not an Exception: the worker thread ends without a final message

    logic, worker = make_logic(lambda settings: Dies())
    with pytest.raises(RuntimeError, match="stopped without finishing the run"):
        logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
    assert_unchanged(segmentation, volume, before)
    assert not worker.alive and not logic.isRunning()
    first = worker.transport
    # The next run starts a new worker (which dies the same way here) instead of hanging.
    with pytest.raises(RuntimeError, match="next run starts a new worker"):
        logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
    assert worker.transport is not first
    assert_unchanged(segmentation, volume, before)
    worker.shutdown()
