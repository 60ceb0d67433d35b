"""The module's self-test (``OFLSAM2SegmentTest``): the whole pipeline inside Slicer on a small
synthetic volume with a random-weight SAM2 at 256 px (no download).

The module file loads this file and exposes the class as ``OFLSAM2Segment.OFLSAM2SegmentTest``,
where Slicer's SelfTests module and "Reload and Test" look for it. Nothing here imports torch
at import time: without it (Slicer's extension build machines) every test skips in ``setUp``.
"""

import time

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class OFLSAM2SegmentTest(ScriptedLoadableModuleTest):
    """The whole pipeline inside Slicer on a small synthetic volume, with a random-weight SAM2
    at 256 px (no download): segments written, annotated slices untouched, undo, cancel, the
    editor effect, and the module GUI."""

    def setUp(self):
        from OFLSAM2SegmentLib.testing import engine_missing_reason

        reason = engine_missing_reason()  # e.g. on the extension build machines
        if reason:
            self.skipTest(reason)
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_process_writes_slices_and_undo_restores()
        self.setUp()
        self.test_cancel_restores_segments()
        self.setUp()
        self.test_editor_effect()
        self.setUp()
        self.test_widget_apply_and_cancel()
        self.setUp()
        self.test_widget_review_and_update()

    def test_process_writes_slices_and_undo_restores(self):
        from oflsam2.settings import default_model
        from OFLSAM2Segment import OFLSAM2SegmentLogic
        from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

        self.delayDisplay("Full pipeline with a random-weight SAM2")
        volume, segmentation, ids = make_annotated_volume(slicer.mrmlScene)
        before = segment_arrays(segmentation, volume)
        logic = OFLSAM2SegmentLogic()

        summary = logic.process(volume, segmentation, ids[:1], method="sam2", randomWeights=True, imageSize=256, device="cpu")

        self.assertEqual(summary["model"], default_model("sam2"))  # no model named: the method's own
        after = segment_arrays(segmentation, volume)
        annotated = summary["segments"][ids[0]]["annotated"]
        self.assertEqual(summary["segments"][ids[0]]["written"], before[ids[0]].shape[0] - len(annotated))
        for index in annotated:
            self.assertTrue((after[ids[0]][index] == before[ids[0]][index]).all(), f"annotated slice {index} changed")
        self.assertTrue((after[ids[1]] == before[ids[1]]).all(), "another segment changed")
        self.assertTrue(logic.undoLastRun())
        undone = segment_arrays(segmentation, volume)
        for segment_id in before:
            self.assertTrue((undone[segment_id] == before[segment_id]).all(), "undo did not restore the segmentation")
        self.delayDisplay("Pipeline and undo passed")

    def test_cancel_restores_segments(self):
        from oflsam2.errors import Cancelled
        from OFLSAM2Segment import OFLSAM2SegmentLogic
        from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

        self.delayDisplay("Cancel during a run")
        volume, segmentation, ids = make_annotated_volume(slicer.mrmlScene)
        before = segment_arrays(segmentation, volume)
        logic = OFLSAM2SegmentLogic()

        def cancelAfterFirstSlice(stage, done, total, text):
            if stage == "propagating" and done >= 1:
                logic.cancel()

        with self.assertRaises(Cancelled):
            logic.process(volume, segmentation, ids[:1], method="sam2", progressCallback=cancelAfterFirstSlice,
                          randomWeights=True, imageSize=256, device="cpu")
        after = segment_arrays(segmentation, volume)
        for segment_id in before:
            self.assertTrue((after[segment_id] == before[segment_id]).all(), "cancel did not restore the segments")
        self.assertFalse(logic.isRunning())
        self.delayDisplay("Cancel passed")

    def test_editor_effect(self):
        from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

        self.delayDisplay("Segment Editor effect")
        volume, segmentation, ids = make_annotated_volume(slicer.mrmlScene)
        before = segment_arrays(segmentation, volume)
        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentation)
        editorWidget.setSourceVolumeNode(volume)
        editorWidget.setCurrentSegmentID(ids[0])
        editorWidget.setActiveEffectByName("OFL-SAM2")
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect, "the OFL-SAM2 effect is not registered")
        effect.setParameter("Method", "sam2")
        effect.setParameter("RandomWeights", "true")
        effect.setParameter("ImageSize", "256")
        effect.setParameter("Device", "cpu")
        effect.self().runBlocking = True
        effect.self().onApply()

        after = segment_arrays(segmentation, volume)
        self.assertFalse((after[ids[0]] == before[ids[0]]).all(), "the effect wrote nothing")
        self.assertTrue((after[ids[1]] == before[ids[1]]).all(), "the effect changed another segment")
        editorWidget.undo()
        undone = segment_arrays(segmentation, volume)
        self.assertTrue((undone[ids[0]] == before[ids[0]]).all(), "editor undo did not restore the segment")
        editorWidget.setActiveEffect(None)
        self.delayDisplay("Effect passed")

    def _moduleWidgetFor(self, volume, segmentation, segmentIds):
        """The module's widget, set up for a quick random-weight ``sam2`` run on the CPU."""
        from OFLSAM2Segment import Method

        slicer.util.selectModule("OFLSAM2Segment")
        widget = slicer.modules.oflsam2segment.widgetRepresentation().self()
        parameters = widget._parameterNode
        parameters.inputVolume = volume
        parameters.segmentation = segmentation
        parameters.segmentIds = segmentIds
        parameters.method = Method.SAM2
        parameters.randomWeights = True
        parameters.imageSize = 256
        parameters.device = "cpu"
        return widget

    def _waitUntilDone(self, widget, seconds):
        """Event rounds until the widget's run ends (the Qt timer drains the run between them)."""
        deadline = time.monotonic() + seconds
        while widget.logic.isRunning():
            self.assertLess(time.monotonic(), deadline, f"the run did not end within {seconds} s")
            slicer.app.processEvents()
            time.sleep(0.03)
        slicer.app.processEvents()

    def test_widget_apply_and_cancel(self):
        from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

        self.delayDisplay("Module GUI: Apply turns into Cancel")
        volume, segmentation, ids = make_annotated_volume(slicer.mrmlScene)
        before = segment_arrays(segmentation, volume)
        widget = self._moduleWidgetFor(volume, segmentation, ids[:1])
        widget._parameterNode.epochs = 1
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        widget.ui.applyButton.click()  # cancel at once
        self._waitUntilDone(widget, 120)
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        after = segment_arrays(segmentation, volume)
        for segment_id in before:
            self.assertTrue((after[segment_id] == before[segment_id]).all(), "cancel from the GUI did not restore")
        self.delayDisplay("GUI passed")

    def test_widget_review_and_update(self):
        from oflsam2.settings import default_model
        from OFLSAM2SegmentLib import mrml_geometry, mrml_write
        from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

        self.delayDisplay("Module GUI: quality table, Next slice to check, Update")
        volume, segmentation, ids = make_annotated_volume(slicer.mrmlScene, shape=(12, 64, 64))
        widget = self._moduleWidgetFor(volume, segmentation, ids[:1])

        widget.ui.applyButton.click()
        self._waitUntilDone(widget, 600)
        self.assertEqual(widget.logic.lastRun.state, "completed", widget.ui.statusLabel.text)
        self.assertIn(f"with {default_model('sam2')}.", widget.ui.statusLabel.text)  # the model the run used
        self.assertEqual(widget.ui.modelComboBox.itemText(0), f"Method's default ({default_model('sam2')})")
        self.assertEqual(widget.ui.qualityTableWidget.rowCount, 12)
        self.assertTrue(widget.ui.nextSliceButton.enabled and widget.ui.updateButton.enabled)
        suggestion = widget.logic.nextSliceToCheck(ids[0])
        if suggestion is not None:
            widget.ui.nextSliceButton.click()
            red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            self.assertAlmostEqual(red.GetSliceOffset(), suggestion[1][2], delta=2.0)  # axial: S; 4 mm slices

        corrected = segment_arrays(segmentation, volume)[ids[0]][6].copy()
        corrected[20:40, 20:40] = ~corrected[20:40, 20:40]
        mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume)).write(ids[0], 0, 6, corrected)
        widget.ui.updateButton.click()
        self._waitUntilDone(widget, 600)
        run = widget.logic.lastRun
        self.assertEqual(run.state, "completed", widget.ui.statusLabel.text)
        self.assertIn("recomputed", run.summary["segments"][ids[0]])
        self.assertTrue((segment_arrays(segmentation, volume)[ids[0]][6] == corrected).all(), "Update overwrote the correction")
        self.delayDisplay("Review passed")
