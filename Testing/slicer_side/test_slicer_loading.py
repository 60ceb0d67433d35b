"""The module and its Segment Editor effect loaded the way Slicer loads them (``loading_rules``
reproduces Slicer's sys.path / sys.modules rules), then run with the real engine in its worker
process (random-weight SAM2.1-tiny, 256 px, CPU) against real MRML.

With the effect inside ``OFLSAM2SegmentLib`` (the layout before issue 9), registering it
replaced that package in ``sys.modules`` and every later lazy import inside it failed:
``test_the_effect_inside_the_lib_package_breaks_process`` keeps that failure reproduced, so the
fixture cannot silently stop modelling it.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from mrml_helpers import add_segmentation, add_volume_from_sitk, read_segments, require_slicer

slicer = require_slicer()  # before loading_rules, which imports slicer at its top
pytestmark = pytest.mark.slicer

from loading_rules import load_like_slicer  # noqa: E402

from oflsam2.settings import default_model  # noqa: E402

FAST = {"randomWeights": True, "device": "cpu", "model": "sam2.1-tiny", "imageSize": 256}
# OFLSAM2_LOADING_MODULE_DIR: load another copy of the module folder (e.g. an older commit's,
# exported with git archive) to see how it fares under Slicer's rules.
MODULE_DIR = os.environ.get("OFLSAM2_LOADING_MODULE_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "OFLSAM2Segment")


def editor_scene(scene):
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    return scene


@pytest.fixture(scope="module")
def session(slicer_core):
    """One "Slicer" for this file: the module loaded, its effect registered, one worker."""
    scene = editor_scene(slicer_core.vtkMRMLScene())
    with load_like_slicer(MODULE_DIR, scene) as session:
        yield session
    scene.Clear(1)


def process_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") if os.path.isdir("/proc") else _signal_zero(pid)


def _signal_zero(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def chaos_crop(scene, shared_data, planes=3):
    """``planes`` axial planes of CHAOS case 1 around the liver's middle, the middle one annotated."""
    sitk = pytest.importorskip("SimpleITK")
    folder = shared_data / "chaos_t2_fewshot"
    image = sitk.ReadImage(str(folder / "image_1.nii.gz"))
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_1.nii.gz")))).astype(np.uint8)
    liver = np.flatnonzero((labels == 1).any(axis=(1, 2)))
    first = int(liver[len(liver) // 2]) - planes // 2
    volume = add_volume_from_sitk(scene, image[:, :, first:first + planes])
    annotation = np.zeros((planes, *labels.shape[1:]), bool)
    annotation[planes // 2] = labels[first + planes // 2] == 1
    segmentation, ids = add_segmentation(scene, volume, {"Liver": annotation, "Spleen": labels[first:first + planes] == 4})
    return volume, segmentation, ids


def test_the_module_and_effect_register_without_replacing_the_lib_package(session):
    lib = sys.modules["OFLSAM2SegmentLib"]
    assert hasattr(lib, "__path__"), "OFLSAM2SegmentLib is no longer a package"
    assert session.effect_modules == ["SegmentEditorOFLSAM2Lib"]
    (effect,) = session.registered_effects
    assert effect.scriptedEffect.name == "OFL-SAM2" and effect.scriptedEffect.perSegment
    assert sys.modules["SegmentEditorOFLSAM2Lib"].SegmentEditorEffect is type(effect)
    assert os.path.abspath(MODULE_DIR) in sys.path  # appended, as Slicer does for a non-built-in module
    # What the effect and process() import lazily still resolves inside the package.
    from OFLSAM2SegmentLib.install import ensure_dependencies  # noqa: F401
    from OFLSAM2SegmentLib.testing import make_annotated_volume  # noqa: F401


def test_process_runs_the_real_engine_in_the_worker_process(session, shared_data):
    scene = session.scene
    volume, segmentation, ids = chaos_crop(scene, shared_data)
    before = read_segments(segmentation, volume)
    logic = session.module.OFLSAM2SegmentLogic()

    summary = logic.process(volume, segmentation, ids[:1], method="sam2", axis="axial", **FAST)

    assert summary["segments"][ids[0]]["written"] == 2
    assert summary["engine"]["random_weights"] is True
    assert summary["model"] == summary["engine"]["model"] == "sam2.1-tiny"  # the engine's word for the model it ran
    assert logic.worker.pid is not None and logic.worker.pid != os.getpid()  # the engine ran in the worker process
    # started as Slicer starts it: PythonSlicer (loading rule 0), whose child python-real ran the engine
    assert logic.worker.transport.command[0] == sys.executable and os.path.basename(sys.executable) == "PythonSlicer"
    assert logic.worker.interpreter_pid not in (None, logic.worker.pid)
    assert session.app.processed_events > 0  # the blocking wait let Slicer process its events
    after = read_segments(segmentation, volume)
    np.testing.assert_array_equal(after[ids[0]][1], before[ids[0]][1])
    np.testing.assert_array_equal(after[ids[1]], before[ids[1]])
    assert after[ids[0]][[0, 2]].any() or not before[ids[0]][1].any()


def test_the_module_self_tests_pass(session):
    """The module's own ScriptedLoadableModuleTest methods that need no widget."""
    tests = session.module.OFLSAM2SegmentTest()
    for name in ("test_process_writes_slices_and_undo_restores", "test_cancel_restores_segments"):
        tests.setUp()
        getattr(tests, name)()


def test_the_effect_writes_whole_planes_with_the_editable_intensity_range_on(session):
    """Editor masking (an intensity range that excludes every voxel) must not clip the
    effect's writes; the user's setting is back after the run; editor undo restores."""
    from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

    scene = session.scene
    volume, segmentation, ids = make_annotated_volume(scene, shape=(6, 48, 48))
    before = segment_arrays(segmentation, volume)
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSegmentEditorNode(editor_node)
    editor.SetSegmentationNode(segmentation)
    editor.SetSourceVolumeNode(volume)
    editor_node.SetSelectedSegmentID(ids[0])
    editor_node.SetSourceVolumeIntensityMask(True)
    editor_node.SetSourceVolumeIntensityMaskRange(1e6, 2e6)  # no voxel is "editable"
    session.editor = editor
    effect = session.registered_effects[0]
    effect.setMRMLDefaults()
    effect.setupOptionsFrame()
    for name, value in (("Method", "sam2"), ("Device", "cpu"), ("ImageSize", "256"), ("RandomWeights", "true")):
        effect.scriptedEffect.setParameter(name, value)
    effect.runBlocking = True

    effect.onApply()

    after = segment_arrays(segmentation, volume)
    run = effect.logic().lastRun
    assert run.state == "completed" and run.summary["segments"][ids[0]]["written"] == 4
    # no model chosen in the effect: the method's own, named in the effect's status
    assert run.summary["model"] == run.summary["engine"]["model"] == default_model("sam2")
    assert effect.statusLabel.text.endswith(f" with {default_model('sam2')}."), effect.statusLabel.text
    changed = [i for i in range(6) if not np.array_equal(after[ids[0]][i], before[ids[0]][i])]
    assert changed, "the effect wrote nothing"
    assert (after[ids[1]] == before[ids[1]]).all(), "the effect changed another segment"
    assert editor_node.GetSourceVolumeIntensityMask(), "the user's intensity-range setting was not restored"
    editor.Undo()
    undone = segment_arrays(segmentation, volume)
    assert (undone[ids[0]] == before[ids[0]]).all(), "editor undo did not restore the segment"


def test_the_editor_clips_writes_when_the_intensity_range_is_on(session):
    """Why the effect switches the range off: through the same editor call, with it on, a
    plane is not written (Slicer applies it even with bypassMasking=True)."""
    from OFLSAM2SegmentLib import mrml_geometry, mrml_write
    from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

    scene = session.scene
    volume, segmentation, ids = make_annotated_volume(scene, shape=(6, 48, 48))
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSegmentEditorNode(editor_node)
    editor.SetSegmentationNode(segmentation)
    editor.SetSourceVolumeNode(volume)
    editor_node.SetSourceVolumeIntensityMask(True)
    editor_node.SetSourceVolumeIntensityMaskRange(1e6, 2e6)
    E = slicer.vtkSlicerSegmentEditorLogic
    writer = mrml_write.EditorSliceWriter(lambda s, image, mode: editor.ModifySegmentByLabelmap(segmentation, s, image, mode, True, True),
                                       E.ModificationModeAdd, segmentation, mrml_geometry.volume_geometry(volume))
    plane = np.ones((48, 48), bool)

    writer.write(ids[0], 0, 0, plane)
    assert not segment_arrays(segmentation, volume)[ids[0]][0].any()  # clipped to nothing

    restore = sys.modules["SegmentEditorOFLSAM2Lib"].suspendIntensityMask(editor_node)
    writer.write(ids[0], 0, 0, plane)
    restore()
    assert segment_arrays(segmentation, volume)[ids[0]][0].all()
    assert editor_node.GetSourceVolumeIntensityMask()


def test_quitting_slicer_stops_the_worker_process(session):
    from process_helpers import wait_for_interpreter, wait_gone

    from OFLSAM2SegmentLib.shared_worker import shared_worker

    worker = shared_worker()
    worker.start()
    pid, interpreter = worker.pid, wait_for_interpreter(worker)
    assert process_alive(pid) and process_alive(interpreter) and pid != interpreter
    session.app.emit("aboutToQuit()")
    assert wait_gone(pid, interpreter), "the worker process outlived Slicer"
    assert not worker.alive


def test_the_effect_inside_the_lib_package_breaks_process(slicer_core, tmp_path):
    """The layout before issue 9 (effect file in OFLSAM2SegmentLib/), built from today's files:
    Slicer's effect registration replaces the package and process() fails on its first lazy
    import. This keeps the fixture honest: it must reproduce the failure Slicer shows."""
    old = tmp_path / "OFLSAM2Segment"
    shutil.copytree(MODULE_DIR, old, ignore=shutil.ignore_patterns("__pycache__"))  # Testing/ too: the self-test ships
    shutil.move(str(old / "SegmentEditorOFLSAM2Lib" / "SegmentEditorEffect.py"), old / "OFLSAM2SegmentLib" / "SegmentEditorEffect.py")
    shutil.rmtree(old / "SegmentEditorOFLSAM2Lib")
    module_file = old / "OFLSAM2Segment.py"
    source = module_file.read_text(encoding="utf-8")
    assert '"SegmentEditorOFLSAM2Lib", "SegmentEditorEffect.py"' in source
    module_file.write_text(source.replace('"SegmentEditorOFLSAM2Lib", "SegmentEditorEffect.py"',
                                          '"OFLSAM2SegmentLib", "SegmentEditorEffect.py"'), encoding="utf-8")
    scene = editor_scene(slicer_core.vtkMRMLScene())
    from OFLSAM2SegmentLib.testing import make_annotated_volume  # the test run's copy, for the data only

    volume, segmentation, ids = make_annotated_volume(scene, shape=(4, 32, 32))
    with load_like_slicer(old, scene) as session:
        assert session.effect_modules == ["OFLSAM2SegmentLib"]
        assert not hasattr(sys.modules["OFLSAM2SegmentLib"], "__path__")  # replaced by the effect file
        logic = session.module.OFLSAM2SegmentLogic()
        with pytest.raises(ModuleNotFoundError, match="'OFLSAM2SegmentLib' is not a package"):
            logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
    scene.Clear(1)
