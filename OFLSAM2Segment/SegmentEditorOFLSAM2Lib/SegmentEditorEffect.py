"""The "OFL-SAM2" Segment Editor effect: propagate the selected segment's painted slices
through the source volume with SAM2, writing each slice as it is computed.

Registered by the OFLSAM2Segment module at start-up. It shares the module's run logic and its
worker process (so one SAM2 model per session) and writes through the editor
(``modifySegmentByLabelmap``), with one ``saveStateForUndo()`` per run.

Slicer executes this file as the module ``SegmentEditorOFLSAM2Lib`` (its folder's name), not as
part of a package: imports here must be absolute.
"""

import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from oflsam2.settings import DEFAULT_METHOD, MAX_IMAGE_SIZE, METHOD_TITLES, OFL_PRESETS, SLICER_METHODS
from OFLSAM2SegmentLib.device import available_devices
from OFLSAM2SegmentLib.options import METHOD_DEFAULT_MODEL, default_model_entry, model_choices
from OFLSAM2SegmentLib.progress import progress_text
from OFLSAM2SegmentLib.review_view import QualityReview, new_quality_table

__all__ = ["SegmentEditorEffect"]


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Few-shot segmentation of the selected segment from its annotated slices."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "OFL-SAM2"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.runBlocking = False  # the module's self-test runs the effect to completion
        self._logic = None
        self._restoreIntensityMask = None
        self.review = None  # the last run's quality table and "Next slice to check", once the frame is set up
        self.compute = None  # "Compute on", shared with the module through Slicer's settings

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Segment the selected segment in the whole source volume from a few painted slices.<br>
Paint the structure on a few slices (e.g. every 5-10 slices), then click Apply: SAM2 fills the other
slices one by one. <b>Cancel</b> puts the segment back as it was; <b>Undo</b> reverts a finished run.<br>
After a run, the table lists each slice's quality for the selected segment (click a row to show that slice), and
<b>Next slice to check</b> shows the slice whose correction would most likely help.
More options (several segments at once, extra support volumes, adapters) are in the OFL-SAM2 Segment module.</html>"""

    def setupOptionsFrame(self):
        self.methodComboBox = qt.QComboBox()
        for name in SLICER_METHODS:  # the module's methods, from the engine's registry
            self.methodComboBox.addItem(METHOD_TITLES[name], name)
        self.methodComboBox.setToolTip("OFL-SAM2 trains a small adapter on your slices; SAM2 propagation is plain SAM2.")
        self.scriptedEffect.addLabeledOptionsWidget("Method:", self.methodComboBox)

        self.modelComboBox = qt.QComboBox()
        self.modelComboBox.addItem(default_model_entry(DEFAULT_METHOD)[0], METHOD_DEFAULT_MODEL)  # named per method
        for name, description in _safe_model_choices():
            self.modelComboBox.addItem(name, name)
            self.modelComboBox.setItemData(self.modelComboBox.count - 1, description, qt.Qt.ToolTipRole)
        self.modelComboBox.setToolTip(
            "SAM2 weights, downloaded once after asking. \"Method's default\" is the model of the method's paper. "
            "A local file is set in the OFL-SAM2 Segment module.")
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelComboBox)

        self.deviceComboBox = qt.QComboBox()
        for name in ["auto", *available_devices()]:  # what this machine has (no MPS under Rosetta 2)
            self.deviceComboBox.addItem(name, name)
        self.scriptedEffect.addLabeledOptionsWidget("Device:", self.deviceComboBox)

        self.imageSizeSpinBox = qt.QSpinBox()
        self.imageSizeSpinBox.setRange(0, MAX_IMAGE_SIZE)
        self.imageSizeSpinBox.setSingleStep(32)
        self.imageSizeSpinBox.setSpecialValueText("model default")
        self.imageSizeSpinBox.setToolTip(
            "SAM2 input size (multiple of 32, at least 256); smaller is faster and needs less memory.")
        self.scriptedEffect.addLabeledOptionsWidget("Image size:", self.imageSizeSpinBox)

        self.oflPresetComboBox = qt.QComboBox()
        for name in OFL_PRESETS:
            self.oflPresetComboBox.addItem(name, name)
        self.oflPresetComboBox.setToolTip(
            "OFL-SAM2: paper = the method as its paper states it; extended = with the project's additions (see the README).")
        self.scriptedEffect.addLabeledOptionsWidget("OFL-SAM2 preset:", self.oflPresetComboBox)

        from OFLSAM2SegmentLib.compute_view import ComputePanel

        self.compute = ComputePanel(lambda label, widget: self.scriptedEffect.addLabeledOptionsWidget(label, widget)
                                    if label else self.scriptedEffect.addOptionsWidget(widget))

        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip("Propagate the selected segment; becomes Cancel while running.")
        self.scriptedEffect.addOptionsWidget(self.applyButton)
        self.progressBar = qt.QProgressBar()
        self.progressBar.hide()
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        # The review of the last run, as in the module panel (OFLSAM2SegmentLib.review_view).
        self.qualityTable = new_quality_table()
        self.qualityTable.hide()  # until a run of the selected segment has ended
        self.scriptedEffect.addOptionsWidget(self.qualityTable)
        self.nextSliceButton = qt.QPushButton("Next slice to check")
        self.nextSliceButton.objectName = self.__class__.__name__ + "NextSlice"
        self.nextSliceButton.setToolTip(
            "Show the slice whose annotation would most likely help: low quality, inside the object, away from annotated slices.")
        self.scriptedEffect.addOptionsWidget(self.nextSliceButton)
        self.review = QualityReview(self.qualityTable, self.nextSliceButton, lambda: self._logic, self._selectedSegmentId,
                                    self._showStatus)

        for combo in (self.methodComboBox, self.modelComboBox, self.deviceComboBox, self.oflPresetComboBox):
            combo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.imageSizeSpinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)
        self.applyButton.connect("clicked()", self.onApply)

    def cleanup(self):
        # Stop a run of this effect and drop signal connections so the effect can be deleted
        # (Slicer#7392).
        if self._logic is not None and self._logic.lastRun is not None:
            self._logic.lastRun.cancel()
        if hasattr(self, "applyButton"):
            self.applyButton.disconnect("clicked()", self.onApply)
            for combo in (self.methodComboBox, self.modelComboBox, self.deviceComboBox, self.oflPresetComboBox):
                combo.disconnect("currentIndexChanged(int)", self.updateMRMLFromGUI)
            self.imageSizeSpinBox.disconnect("valueChanged(int)", self.updateMRMLFromGUI)
        if self.review is not None:
            self.review.disconnect()
        if self.compute is not None:
            self.compute.disconnect()

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Method", DEFAULT_METHOD)
        self.scriptedEffect.setParameterDefault("Model", METHOD_DEFAULT_MODEL)  # an explicit choice is kept
        self.scriptedEffect.setParameterDefault("Device", "auto")
        self.scriptedEffect.setParameterDefault("ImageSize", 0)
        self.scriptedEffect.setParameterDefault("OFLPreset", OFL_PRESETS[0])
        self.scriptedEffect.setParameterDefault("RandomWeights", "false")  # tests only; no GUI

    def _combos(self):
        return ((self.methodComboBox, "Method"), (self.modelComboBox, "Model"), (self.deviceComboBox, "Device"),
                (self.oflPresetComboBox, "OFLPreset"))

    def updateGUIFromMRML(self):
        for combo, name in self._combos():
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = max(combo.findData(self.scriptedEffect.parameter(name)), 0)
            combo.blockSignals(wasBlocked)
        wasBlocked = self.imageSizeSpinBox.blockSignals(True)
        self.imageSizeSpinBox.value = self.scriptedEffect.integerParameter("ImageSize")
        self.imageSizeSpinBox.blockSignals(wasBlocked)
        self._showMethodDefaultModel()
        self._updateApplyButton()
        self._refreshReview()  # the selected segment may have changed
        if self.compute is not None:
            self.compute.refresh()  # the module may have changed where runs compute

    def updateMRMLFromGUI(self):
        for combo, name in self._combos():
            self.scriptedEffect.setParameter(name, combo.itemData(combo.currentIndex))
        self.scriptedEffect.setParameter("ImageSize", self.imageSizeSpinBox.value)
        self._showMethodDefaultModel()  # the method may have changed

    def _showMethodDefaultModel(self):
        """Name the chosen method's model on the model selector's "Method's default" entry."""
        text, tooltip = default_model_entry(self.scriptedEffect.parameter("Method") or DEFAULT_METHOD)
        self.modelComboBox.setItemText(0, text)
        self.modelComboBox.setItemData(0, tooltip, qt.Qt.ToolTipRole)

    def logic(self):
        """The run logic; its worker (and SAM2 model) is the one the module uses. Made again
        after the module's Reload replaced the Lib (this effect object stays registered)."""
        from OFLSAM2SegmentLib.logic import OFLSAM2Logic

        if not isinstance(self._logic, OFLSAM2Logic):
            self._logic = OFLSAM2Logic()
        return self._logic

    def onApply(self):
        logic = self.logic()
        if logic.isRunning():
            logic.cancel()
            self.statusLabel.text = "Cancelling..."
            return
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        segmentId = parameterSetNode.GetSelectedSegmentID()
        with slicer.util.tryWithErrorDisplay("OFL-SAM2 failed.", waitCursor=True):
            from OFLSAM2SegmentLib.mrml_geometry import volume_geometry
            from OFLSAM2SegmentLib.mrml_write import EditorSliceWriter

            if volumeNode is None or not segmentId:
                raise ValueError("Select a source volume and a segment first.")
            effect = self.scriptedEffect

            def modify(segment_id, image, mode):
                # Explicit segment ID (not the selection, which the user may change meanwhile);
                # the one-plane modifier limits the change to that plane.
                if parameterSetNode.GetSourceVolumeIntensityMask():
                    raise RuntimeError(
                        "The Segment Editor's 'Editable intensity range' was switched on during the run; it would "
                        "clip the computed slices. Switch it off (OFL-SAM2 does so while it runs) and apply again.")
                effect.modifySegmentByLabelmap(segmentationNode, segment_id, image, mode, True)

            modes = slicer.qSlicerSegmentEditorAbstractEffect
            writer = EditorSliceWriter(modify, modes.ModificationModeAdd, segmentationNode, volume_geometry(volumeNode))
            self.progressBar.value = 0
            self.progressBar.show()
            # The editor applies its intensity range to every write, bypassMasking or not
            # (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap): off while the run writes.
            self._restoreIntensityMask = suspendIntensityMask(parameterSetNode)
            try:
                logic.process(
                    volumeNode, segmentationNode, [segmentId], self.scriptedEffect.parameter("Method"),
                    waitForCompletion=self.runBlocking, progressCallback=self.onProgress, writer=writer,
                    saveUndoState=self.scriptedEffect.saveStateForUndo,
                    model=self.scriptedEffect.parameter("Model"),
                    device=self.scriptedEffect.parameter("Device"),
                    imageSize=self.scriptedEffect.integerParameter("ImageSize"),
                    oflPreset=self.scriptedEffect.parameter("OFLPreset") or OFL_PRESETS[0],
                    randomWeights=self.scriptedEffect.parameter("RandomWeights"),
                )
            except Exception:
                self.progressBar.hide()
                self._runEnded()
                raise
        self._updateApplyButton()
        self._refreshReview()

    def _runEnded(self):
        restore, self._restoreIntensityMask = self._restoreIntensityMask, None
        if restore is not None:
            restore()

    def onProgress(self, stage, done, total, text):
        if stage in ("completed", "cancelled", "failed"):
            self._runEnded()
            self.progressBar.hide()
            self.statusLabel.text = text
            self._updateApplyButton()
            self._refreshReview()
            if stage == "failed" and not self.runBlocking:  # blocking runs raise into onApply's error display
                slicer.util.errorDisplay(text, detailedText=self._logic.lastRun.traceback_text)
            return
        percent, label = progress_text(stage, done, total, text)
        self.progressBar.value = percent
        self.progressBar.setFormat(f"{label}  %p%")

    def _updateApplyButton(self):
        running = self._logic is not None and self._logic.isRunning()
        self.applyButton.text = "Cancel" if running else "Apply"

    def _selectedSegmentId(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        return parameterSetNode.GetSelectedSegmentID() if parameterSetNode is not None else None

    def _showStatus(self, text):
        self.statusLabel.text = text

    def _refreshReview(self):
        """Show the selected segment's quality after this effect's last run (hidden when that run did not segment it)."""
        if self.review is None:
            return
        self.qualityTable.setVisible(self.review.refresh_table() > 0)
        self.review.update_button(self._logic is not None and self._logic.isRunning())


def suspendIntensityMask(editorNode):
    """Switch the editor's "Editable intensity range" off; return the function that puts the
    user's setting back (a no-op when it was off)."""
    if editorNode is None or not editorNode.GetSourceVolumeIntensityMask():
        return lambda: None
    editorNode.SetSourceVolumeIntensityMask(False)

    def restore():
        editorNode.SetSourceVolumeIntensityMask(True)

    return restore


def _safe_model_choices():
    try:
        return model_choices()
    except Exception as exc:  # a broken manifest must not break the Segment Editor
        import logging

        logging.error(f"OFL-SAM2 effect: cannot read the model manifest: {exc}")
        return []  # "Method's default" stays

