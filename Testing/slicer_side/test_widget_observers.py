"""The module widget's segmentation observers exist only while the module is shown (issue 9 §3):
``SegmentationObserver`` with real MRML nodes (slicer-core), and the widget's use of it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from mrml_helpers import add_segmentation, add_volume, require_slicer, whole_image

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from OFLSAM2SegmentLib import mrml_geometry  # noqa: E402
from OFLSAM2SegmentLib.observers import SEGMENT_EVENTS, SegmentationObserver  # noqa: E402

WIDGET_FILE = Path(__file__).resolve().parents[2] / "OFLSAM2Segment" / "OFLSAM2SegmentLib" / "widget.py"


def segmentation_case(scene, name="Segmentation"):
    shape = (4, 6, 6)
    volume = add_volume(scene, np.zeros(shape, np.float32), name=name + " volume")
    mask = np.zeros(shape, bool)
    mask[1, 1:3, 1:3] = True
    segmentation, ids = add_segmentation(scene, volume, {"A": mask}, name=name)
    return volume, segmentation, ids


def stroke(segmentation, volume, segment_id, plane):
    """A voxel edit as the Segment Editor makes it."""
    geometry = mrml_geometry.volume_geometry(volume)
    mask = np.zeros(geometry.shape, bool)
    mask[plane, 3:5, 3:5] = True
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(whole_image(geometry, mask), segmentation, segment_id, logic.MODE_MERGE_MASK)


def observer_count(node):
    return sum(node.HasObserver(getattr(slicer.vtkSegmentation, event)) for event in SEGMENT_EVENTS)


def test_observers_follow_enter_and_exit(scene):
    volume, segmentation, ids = segmentation_case(scene)
    calls = []
    observer = SegmentationObserver(lambda caller, event: calls.append(caller))
    observer.setNode(segmentation)
    assert not observer.observing and observer_count(segmentation) == 0  # not shown yet

    observer.activate()  # enter()
    stroke(segmentation, volume, ids[0], 0)
    assert calls and observer_count(segmentation) == len(SEGMENT_EVENTS)

    observer.deactivate()  # exit()
    seen = len(calls)
    stroke(segmentation, volume, ids[0], 2)
    segmentation.GetSegmentation().AddEmptySegment("B", "B")
    assert len(calls) == seen and observer_count(segmentation) == 0

    observer.activate()  # enter() again
    stroke(segmentation, volume, ids[0], 3)
    assert len(calls) > seen
    observer.activate()  # twice: still one set of observers
    assert observer_count(segmentation) == len(SEGMENT_EVENTS)


def test_switching_segmentation_moves_the_observers(scene):
    volume, first, first_ids = segmentation_case(scene, "First")
    other_volume, second, second_ids = segmentation_case(scene, "Second")
    calls = []
    observer = SegmentationObserver(lambda caller, event: calls.append(caller))
    observer.setNode(first)
    observer.activate()
    observer.setNode(second)
    assert observer_count(first) == 0 and observer_count(second) == len(SEGMENT_EVENTS)
    stroke(first, volume, first_ids[0], 0)
    assert not calls
    stroke(second, other_volume, second_ids[0], 0)
    assert calls
    observer.deactivate()
    observer.setNode(first)  # chosen while hidden: observed only from the next enter()
    assert observer_count(first) == 0


def method_calls(class_name, method_name):
    """Attribute calls (``self.x.y(...)`` -> ``"x.y"``) inside a method of the module's widget."""
    tree = ast.parse(WIDGET_FILE.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method_name:
                    return {ast.unparse(call.func) for call in ast.walk(item) if isinstance(call, ast.Call)}
    raise AssertionError(f"{class_name}.{method_name} not found")


def test_the_widget_activates_on_enter_and_deactivates_on_exit():
    """The widget needs Qt and the Slicer application; its wiring of the observer is checked
    in its source (the observer itself is tested above with real nodes)."""
    assert "self._segmentationObserver.activate" in method_calls("OFLSAM2SegmentWidget", "enter")
    assert "self._segmentationObserver.deactivate" in method_calls("OFLSAM2SegmentWidget", "exit")
    assert "self._segmentationObserver.deactivate" in method_calls("OFLSAM2SegmentWidget", "cleanup")
    assert "self._segmentationObserver.setNode" in method_calls("OFLSAM2SegmentWidget", "onSegmentationChanged")
    calls = method_calls("OFLSAM2SegmentWidget", "onSegmentationChanged")
    assert not any(c.endswith("addObserver") for c in calls), "segment observers must go through SegmentationObserver"
