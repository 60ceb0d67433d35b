"""The Segment Editor effect's review of its last run (issue 11): the per-slice quality table of
the selected segment (a click centres the slice views on that slice) and "Next slice to check".

The effect is loaded as Slicer loads it (``loading_rules``), with the Qt widgets the review uses
replaced by small fakes that keep their rows and signal connections (the rest of Qt stays
mocked); the run (random-weight SAM2.1-tiny in the worker process), the segmentation, the editor
and the slice views are real MRML.
"""

from __future__ import annotations

import os
import sys

import pytest
from mrml_helpers import require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from loading_rules import load_like_slicer  # noqa: E402

MODULE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "OFLSAM2Segment")


class FakeSignals:
    """Qt's string-signal ``connect``/``disconnect``, and ``emit`` for the test to play the user."""

    def __init__(self, *args):
        self.slots: dict[str, list] = {}
        self.visible = True
        self.enabled = True

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal, slot):
        self.slots[signal].remove(slot)

    def emit(self, signal, *args):
        for slot in list(self.slots.get(signal, [])):
            slot(*args)

    def hide(self):
        self.visible = False

    def setVisible(self, visible):
        self.visible = bool(visible)

    def __getattr__(self, name):  # configuration calls (headers, tooltips, sizes) are not checked here
        return lambda *args, **kwargs: FakeSignals()


class FakeItem:
    def __init__(self, text):
        self._text = text

    def text(self):
        return self._text


class FakeTable(FakeSignals):
    def __init__(self, *args):
        super().__init__()
        self.rows: list[dict] = []

    def setRowCount(self, count):
        self.rows = (self.rows + [{} for _ in range(count)])[:count]

    @property
    def rowCount(self):
        return len(self.rows)

    def setItem(self, row, column, item):
        self.rows[row][column] = item

    def item(self, row, column):
        return self.rows[row].get(column)

    def cells(self):
        return [(row[0].text(), row[1].text()) for row in self.rows]


@pytest.fixture(scope="module")
def session(slicer_core):
    scene = slicer_core.vtkMRMLScene()
    scene.RegisterNodeClass(slicer_core.vtkMRMLSegmentEditorNode())
    with load_like_slicer(MODULE_DIR, scene) as session:
        qt = sys.modules["qt"]  # the mocked Qt the effect imported
        qt.QTableWidget, qt.QTableWidgetItem, qt.QPushButton = FakeTable, FakeItem, FakeSignals
        qt.QComboBox.return_value.findData.return_value = 0  # updateGUIFromMRML picks an item by its data
        yield session
    scene.Clear(1)


def test_after_apply_the_effect_shows_the_selected_segments_quality_and_jumps_to_slices(session):
    from OFLSAM2SegmentLib.testing import make_annotated_volume, target_slices

    scene = session.scene
    depth = 6
    volume, segmentation, ids = make_annotated_volume(scene, shape=(depth, 48, 48))
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSegmentEditorNode(editor_node)
    editor.SetSegmentationNode(segmentation)
    editor.SetSourceVolumeNode(volume)
    editor_node.SetSelectedSegmentID(ids[0])
    session.editor = editor
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    effect = session.registered_effects[0]
    effect.setMRMLDefaults()
    effect.setupOptionsFrame()
    for name, value in (("Method", "sam2"), ("Device", "cpu"), ("ImageSize", "256"), ("RandomWeights", "true")):
        effect.scriptedEffect.setParameter(name, value)
    effect.runBlocking = True
    review_module = sys.modules["OFLSAM2SegmentLib.review_view"]
    assert type(effect.review) is review_module.QualityReview  # the module panel's code, not a copy
    table, button = effect.qualityTable, effect.nextSliceButton
    effect.updateGUIFromMRML()
    assert not table.visible and not button.enabled and table.rowCount == 0  # nothing to review before a run

    effect.onApply()

    logic = effect.logic()
    assert logic.lastRun.state == "completed"
    assert table.visible and button.enabled
    cells = table.cells()
    assert [int(index) for index, _ in cells] == list(range(depth))
    assert all(0.0 <= float(quality) <= 1.0 for _, quality in cells)
    for index in target_slices(depth):
        assert cells[index][1] == "1.00"  # annotated slices
    assert cells == review_module.quality_rows(logic, ids[0])

    table.emit("cellClicked(int,int)", 1, 1)  # the row of slice 1
    expected = logic.reviewedPlaneCenterRas(1)
    assert red.GetSliceOffset() == pytest.approx(expected[2])
    center = red.GetSliceToRAS()
    assert [center.GetElement(r, 3) for r in range(3)] == pytest.approx(list(expected))

    suggestion = logic.nextSliceToCheck(ids[0])
    button.emit("clicked()")
    if suggestion is None:
        assert effect.statusLabel.text.startswith("No slice to suggest")
    else:
        assert effect.statusLabel.text == f"Check slice {suggestion[0]}."
        assert red.GetSliceOffset() == pytest.approx(suggestion[1][2])

    editor_node.SetSelectedSegmentID(ids[1])  # a segment the run did not touch: nothing to review
    effect.updateGUIFromMRML()
    assert not table.visible and not button.enabled and table.rowCount == 0
    editor_node.SetSelectedSegmentID(ids[0])
    effect.updateGUIFromMRML()
    assert table.visible and table.cells() == cells

    effect.cleanup()
    assert not any(table.slots.values()) and not any(button.slots.values())
