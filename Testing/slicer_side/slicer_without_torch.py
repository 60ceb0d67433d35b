"""A Slicer session in which torch, sam2 and safetensors cannot be imported, driving every
Slicer-side path with the real engine in its worker process: a run that saves an OFL-SAM2
adapter, the review table, suggestions, an Update after a correction, the adapters list, a run
with the adapter, and the Segment Editor effect.

Run as ``python slicer_without_torch.py OUT_FOLDER`` (by ``test_slicer_never_imports_torch``):
the blocker must be in place before anything of the project is imported, so it needs a fresh
process. The worker process is a different interpreter (started through the ``PythonSlicer``
stand-in of ``loading_rules``) and imports torch as it must. Prints one JSON object: what was
found, and every blocked import with the project lines that asked for it.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
import traceback
from pathlib import Path

BLOCKED = ("torch", "sam2", "safetensors")
attempts = []


class Blocker(importlib.abc.MetaPathFinder):
    """Refuses the blocked packages to the import system. ``importlib.util.find_spec`` (how the
    installer checks what is installed) loads nothing and is let through."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        caller = sys._getframe(2)
        if caller.f_code.co_name == "find_spec" and caller.f_globals.get("__name__") == "importlib.util":
            return None
        where = [f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in traceback.extract_stack()
                 if "OFLSAM2Segment" in f.filename or "slicer_side" in f.filename][-4:]
        attempts.append({"module": name, "from": where})
        raise ImportError(f"{name} may not be imported in Slicer's process")


def main(out: Path) -> dict:
    import slicer
    from loading_rules import load_like_slicer
    from mrml_helpers import read_segments

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    scene = slicer.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    fast = {"randomWeights": True, "device": "cpu", "model": "sam2.1-tiny", "imageSize": 256}
    found = {}
    module_dir = Path(__file__).resolve().parents[2] / "OFLSAM2Segment"
    with load_like_slicer(module_dir, scene) as session:
        from OFLSAM2SegmentLib import mrml_geometry, mrml_read, mrml_write, review_view
        from OFLSAM2SegmentLib.testing import make_annotated_volume

        volume, segmentation, ids = make_annotated_volume(scene, shape=(9, 48, 48))
        target = ids[0]
        logic = session.module.OFLSAM2SegmentLogic()
        adapter = out / "adapter"
        summary = logic.saveAdapter(volume, segmentation, str(adapter), [target], epochs=2, **fast)
        found["ofl_written"] = summary["segments"][target]["written"]
        found["review_rows"] = len(review_view.quality_rows(logic, target))
        found["suggested"] = logic.suggestNextSlices(target, 2)
        found["next_slice"] = (logic.nextSliceToCheck(target) or [None])[0]

        corrected = ~read_segments(segmentation, volume)[target][1]  # the user redraws plane 1
        mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume)).write(target, 0, 1, corrected)
        found["update_edited"] = logic.update()["engine"]["edited"]

        found["adapters"] = [a["label_name"] for a in logic.loadAdapter(str(adapter))]
        logic.loadAdapter(None)
        created = logic.segmentVolumesWithAdapter([volume], str(adapter), randomWeights=True, device="cpu")
        found["with_adapter"] = [list(mrml_read.segment_names(node).values()) for node in created]

        # The effect on a fresh annotated volume: on the one above, the random-weight results and
        # the inverted plane leave strokes whose drawing axis depends on those results.
        volume, segmentation, ids = make_annotated_volume(scene, shape=(9, 48, 48))
        target = ids[0]
        editor = slicer.vtkSlicerSegmentEditorLogic()
        editor.SetMRMLScene(scene)
        editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.SetSegmentEditorNode(editor_node)
        editor.SetSegmentationNode(segmentation)
        editor.SetSourceVolumeNode(volume)
        editor_node.SetSelectedSegmentID(target)
        session.editor = editor
        effect = session.registered_effects[0]
        effect.setMRMLDefaults()
        effect.setupOptionsFrame()
        for name, value in (("Method", "sam2"), ("Device", "cpu"), ("ImageSize", "256"), ("RandomWeights", "true")):
            effect.scriptedEffect.setParameter(name, value)
        effect.runBlocking = True
        effect.onApply()
        found["effect_state"] = effect.logic().lastRun.state
        found["effect_review_rows"] = len(review_view.quality_rows(effect.logic(), target))
        found["worker_pid"] = logic.worker.interpreter_pid
    scene.Clear(1)
    found["attempts"] = attempts
    found["loaded"] = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    return found


if __name__ == "__main__":
    sys.meta_path.insert(0, Blocker())
    print(json.dumps(main(Path(sys.argv[1]))))
