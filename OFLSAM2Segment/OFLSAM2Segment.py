"""OFL-SAM2 Segment: segment a CT/MR volume from a few annotated slices with SAM2.

The module is a thin GUI over ``OFLSAM2SegmentLib`` (run logic, worker process, MRML bridge,
installs) and the Slicer-free engine ``oflsam2``. Batch use from the Python console::

    logic = slicer.util.getModuleLogic("OFLSAM2Segment")
    summary = logic.process(volumeNode, segmentationNode, ["Segment_1"], method="ofl")
"""

import enum
import logging
import os
import sys
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from oflsam2.volume import PRESETS
from OFLSAM2SegmentLib import device as devices
from OFLSAM2SegmentLib.logic import OFLSAM2Logic
from OFLSAM2SegmentLib.observers import SegmentationObserver
from OFLSAM2SegmentLib.options import AXES, DEVICES, LOCAL_MODEL, model_choices
from OFLSAM2SegmentLib.progress import progress_text, support_line
from OFLSAM2SegmentLib.worker import GpuOutOfMemory

# The effect lives in a folder that nothing imports: Slicer loads it as a module named after that
# folder (qSlicerSegmentEditorScriptedEffect::setPythonSource), which must not be this module's Lib.
EFFECT_SOURCE = os.path.join(os.path.dirname(__file__), "SegmentEditorOFLSAM2Lib", "SegmentEditorEffect.py")

#
# OFLSAM2Segment
#


class OFLSAM2Segment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("OFL-SAM2 Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["OFLSAM2 contributors"]
        self.parent.helpText = _("""
Segments a CT or MR volume from a few annotated slices with Meta's SAM2: paint the structure on
a handful of slices of a segment, select it, and click Apply. Methods: OFL-SAM2 (online few-shot
learner, arXiv 2512.24861), RevSAM2 (arXiv 2409.04298) and plain SAM2 propagation. Slices appear
as they are computed; Cancel puts the segments back as they were, and "Undo last run" reverts a
finished run. Also available as the "OFL-SAM2" effect of the Segment Editor.
""")
        self.parent.acknowledgementText = _("""
Built on SAM2 (Meta, Apache-2.0). OFL-SAM2 and RevSAM2 are implemented from their papers.
""")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)
        slicer.app.connect("aboutToQuit()", shutdownWorker)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        instance = effects.qSlicerSegmentEditorScriptedEffect(None)
        instance.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
        instance.self().register()


def shutdownWorker():
    """Stop the session's engine worker process (Slicer quits, or the module is reloaded).
    Looked up at call time: after a reload the Lib modules are new objects."""
    from OFLSAM2SegmentLib.logic import shutdown_shared_worker

    shutdown_shared_worker()


#
# Parameters
#


class Method(enum.Enum):
    OFL = "ofl"
    REVSAM2 = "revsam2"
    SAM2 = "sam2"

    def label(self):
        return {"ofl": "OFL-SAM2", "revsam2": "RevSAM2", "sam2": "SAM2 propagation"}[self.value]


@parameterNodeWrapper
class OFLSAM2SegmentParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentIds: list[str]
    referenceVolumes: list[vtkMRMLScalarVolumeNode]
    referenceSegmentations: list[vtkMRMLSegmentationNode]
    method: Method = Method.OFL
    model: str = "sam2.1-tiny"
    checkpoint: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    imageSize: Annotated[int, WithinRange(0, 2048)] = 0  # 0: the model's own size
    preset: Annotated[str, Choice(list(PRESETS))] = "auto"
    axis: Annotated[str, Choice(list(AXES))] = "auto"
    gamma: Annotated[float, WithinRange(0.0, 1.0)] = 0.8
    numRetrieved: Annotated[int, WithinRange(1, 16)] = 2
    epochs: Annotated[int, WithinRange(0, 1000)] = 40
    topK: Annotated[int, WithinRange(1, 20)] = 3
    saveAdapter: str = ""
    useAdapter: str = ""
    randomWeights: bool = False

    def runOptions(self) -> dict:
        """The options of ``OFLSAM2SegmentLogic.process`` these parameters stand for."""
        options = {
            "model": self.model, "checkpoint": self.checkpoint, "device": self.device, "imageSize": self.imageSize,
            "preset": self.preset, "axis": self.axis, "gamma": self.gamma, "numRetrieved": self.numRetrieved,
            "epochs": self.epochs, "topK": self.topK, "randomWeights": self.randomWeights,
        }
        if self.saveAdapter:
            options["saveAdapter"] = self.saveAdapter
        if self.useAdapter:
            options["adapter"] = self.useAdapter
        return options


#
# OFLSAM2SegmentWidget
#


class OFLSAM2SegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        # Segment changes refresh the support list, only while the module is shown (enter/exit).
        self._segmentationObserver = SegmentationObserver(self.scheduleSupportUpdate)
        self._updatingGui = False
        self._supportTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OFLSAM2Segment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = OFLSAM2SegmentLogic()

        # Recomputing the support list exports every selected segment: wait until edits pause.
        self._supportTimer = qt.QTimer()
        self._supportTimer.setSingleShot(True)
        self._supportTimer.setInterval(500)
        self._supportTimer.timeout.connect(self.updateSupportSummary)

        self._fillModelSelector()
        self._showDeviceProbe()
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self.scheduleSupportUpdate())
        self.ui.segmentsTableView.connect("selectionChanged(QItemSelection,QItemSelection)", self.onSegmentSelectionChanged)
        self.ui.axisComboBox.connect("currentIndexChanged(int)", lambda index: self.scheduleSupportUpdate())
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.saveAdapterPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.useAdapterPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.addReferenceButton.connect("clicked(bool)", self.onAddReference)
        self.ui.removeReferenceButton.connect("clicked(bool)", self.onRemoveReference)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.undoButton.connect("clicked(bool)", self.onUndoButton)
        self.ui.nextSliceButton.connect("clicked(bool)", self.onNextSliceButton)
        self.ui.updateButton.connect("clicked(bool)", self.onUpdateButton)
        self.ui.qualityTableWidget.connect("cellClicked(int,int)", self.onQualityRowClicked)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.logic is not None and self.logic.isRunning():
            self.logic.cancel()
        self.removeObservers()
        self._segmentationObserver.deactivate()
        if self._supportTimer is not None:
            self._supportTimer.stop()

    def onReload(self) -> None:
        """Stop the worker process and drop the Lib modules, then let Slicer re-execute this file
        (``slicer.util.reloadScriptedModule`` re-executes only the module file), which imports
        them afresh; the next run starts a new worker with the new code."""
        shutdownWorker()
        for name in [n for n in sys.modules if n == "OFLSAM2SegmentLib" or n.startswith("OFLSAM2SegmentLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self._segmentationObserver.activate()
        self.initializeParameterNode()
        self.scheduleSupportUpdate()  # strokes made while the module was hidden

    def exit(self) -> None:
        # Hidden module: Segment Editor strokes must not trigger support-list reads.
        self._segmentationObserver.deactivate()
        if self._supportTimer is not None:
            self._supportTimer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.segmentation:
            self._parameterNode.segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # .ui widgets with the dynamic property "SlicerParameterName" are bound here; the
            # model list, paths, segment selection and references are synchronized by hand.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateManualWidgets()
            self.onSegmentationChanged(self._parameterNode.segmentation)
        self._updateButtons()

    # -----------------------------------------------------------------------------------------
    # Inputs and support list

    def onSegmentationChanged(self, node) -> None:
        self._segmentationObserver.setNode(node)
        self.ui.segmentsTableView.setSegmentationNode(node)
        if self._parameterNode:
            # keep the selected segments that exist in this segmentation
            kept = [s for s in self._parameterNode.segmentIds if node is not None and node.GetSegmentation().GetSegment(s)]
            self._updatingGui = True
            self.ui.segmentsTableView.setSelectedSegmentIDs(kept)
            self._updatingGui = False
            if kept != list(self._parameterNode.segmentIds):
                self._parameterNode.segmentIds = kept
        self.scheduleSupportUpdate()

    def onSegmentSelectionChanged(self, selected=None, deselected=None) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.segmentIds = list(self.ui.segmentsTableView.selectedSegmentIDs())
        self._fillQualityTable()
        self.scheduleSupportUpdate()

    def scheduleSupportUpdate(self, caller=None, event=None) -> None:
        if self._supportTimer is not None:
            self._supportTimer.start()

    def updateSupportSummary(self) -> None:
        """List each selected segment's annotated slices (axis, count, indices)."""
        parameters = self._parameterNode
        if not parameters or not parameters.inputVolume or not parameters.segmentation or not parameters.segmentIds:
            self.ui.supportLabel.text = _("Select a volume, a segmentation and segments.")
            return
        if self.logic.isRunning():
            return  # the run's own writes would be listed as annotations
        try:
            axisName, targets = self.logic.describeSupport(parameters.inputVolume, parameters.segmentation,
                                                           list(parameters.segmentIds), parameters.axis)
        except Exception as exc:
            self.ui.supportLabel.text = str(exc)
            return
        self.ui.supportLabel.text = "\n".join(support_line(t.name, axisName, t.slices, t.ignored_axes) for t in targets)
        self._updateButtons()  # an edit since the last run withdraws "Undo last run"

    def onAddReference(self) -> None:
        volume = self.ui.referenceVolumeSelector.currentNode()
        segmentation = self.ui.referenceSegmentationSelector.currentNode()
        if volume is None or segmentation is None:
            slicer.util.warningDisplay(_("Select a reference volume and its segmentation first."))
            return
        self._parameterNode.referenceVolumes.append(volume)
        self._parameterNode.referenceSegmentations.append(segmentation)
        self._updateManualWidgets()

    def onRemoveReference(self) -> None:
        row = self.ui.referencesListWidget.currentRow
        if row < 0:
            return
        del self._parameterNode.referenceVolumes[row]
        del self._parameterNode.referenceSegmentations[row]
        self._updateManualWidgets()

    # -----------------------------------------------------------------------------------------
    # Model, device, paths

    def _fillModelSelector(self) -> None:
        self.ui.modelComboBox.clear()
        try:
            choices = model_choices()
        except Exception as exc:  # a broken manifest must not break the module
            logging.error(f"OFLSAM2: cannot read the model manifest: {exc}")
            choices = []
        for name, description in choices:
            self.ui.modelComboBox.addItem(name, name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, description, qt.Qt.ToolTipRole)
        self.ui.modelComboBox.addItem(_("Local file..."), LOCAL_MODEL)

    def _showDeviceProbe(self) -> None:
        found = [d for d in devices.available_devices() if d != "cpu"]
        names = {"cuda": "NVIDIA (CUDA)", "mps": "Apple (MPS)"}
        self.ui.deviceInfoLabel.text = (
            _("{gpus} found").format(gpus=", ".join(names[d] for d in found)) if found
            else _("none found: runs on the CPU (slow; use a small model and image size)")
        )

    def onModelChanged(self, index) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""

    def onPathsChanged(self, path=None) -> None:
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.checkpoint = self.ui.checkpointPathLineEdit.currentPath
            self._parameterNode.saveAdapter = self.ui.saveAdapterPathLineEdit.currentPath
            self._parameterNode.useAdapter = self.ui.useAdapterPathLineEdit.currentPath

    def _updateManualWidgets(self) -> None:
        parameters = self._parameterNode
        self._updatingGui = True
        try:
            index = self.ui.modelComboBox.findData(parameters.model)
            self.ui.modelComboBox.currentIndex = max(index, 0)
            self.ui.checkpointPathLineEdit.currentPath = parameters.checkpoint
            self.ui.saveAdapterPathLineEdit.currentPath = parameters.saveAdapter
            self.ui.useAdapterPathLineEdit.currentPath = parameters.useAdapter
            self.ui.referencesListWidget.clear()
            for volume, segmentation in zip(parameters.referenceVolumes, parameters.referenceSegmentations):
                if volume is not None and segmentation is not None:
                    self.ui.referencesListWidget.addItem(f"{volume.GetName()} + {segmentation.GetName()}")
        finally:
            self._updatingGui = False

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self.logic is not None and self.logic.isRunning()
        parameters = self._parameterNode
        ready = bool(parameters and parameters.inputVolume and parameters.segmentation and parameters.segmentIds)
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.toolTip = (
            _("Stop the run and put the segments back as they were.") if running
            else _("Segment the selected segments.") if ready
            else _("Select a volume, a segmentation and at least one segment with annotated slices.")
        )
        undoBlocked = self.logic.undoUnavailableReason() if self.logic is not None else ""
        self.ui.undoButton.enabled = not running and undoBlocked is None
        self.ui.undoButton.toolTip = _("Put the segments back as they were before the last run.") if undoBlocked is None else undoBlocked
        reviewable = not running and self._reviewedSegment() is not None
        self.ui.nextSliceButton.enabled = reviewable
        self.ui.updateButton.enabled = reviewable

    # -----------------------------------------------------------------------------------------
    # Run

    def onApplyButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("OFLSAM2 could not start."), waitCursor=True):
            warning = devices.low_memory_warning(parameters.device)
            if warning:
                slicer.util.showStatusMessage(warning, 8000)
                logging.warning(warning)
            references = [(v, s) for v, s in zip(parameters.referenceVolumes, parameters.referenceSegmentations) if v and s]
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Starting...")
            try:
                self.logic.process(parameters.inputVolume, parameters.segmentation, list(parameters.segmentIds),
                                   parameters.method.value, waitForCompletion=False, progressCallback=self.onProgress,
                                   references=references, **parameters.runOptions())
            except Exception:
                self.ui.progressBar.hide()
                self.ui.statusLabel.text = ""
                raise
        self._updateButtons()

    def onProgress(self, stage, done, total, text) -> None:
        if stage in ("completed", "cancelled", "failed"):
            self._runEnded(stage, text)
            return
        percent, label = progress_text(stage, done, total, text)
        self.ui.progressBar.value = percent
        self.ui.progressBar.setFormat(f"{label}  %p%")
        self.ui.statusLabel.text = label

    def _runEnded(self, stage, text) -> None:
        self.ui.progressBar.hide()
        run = self.logic.lastRun
        warnings = (run.summary or {}).get("warnings", []) if run is not None else []
        self.ui.statusLabel.text = "\n".join([text, *warnings])
        self._updateButtons()
        self._fillQualityTable()
        self.scheduleSupportUpdate()
        if stage != "failed":
            return
        run = self.logic.lastRun
        error = run.error if run is not None else None
        if isinstance(error, GpuOutOfMemory):
            self._offerOutOfMemoryFallback(str(error))
        else:
            slicer.util.errorDisplay(_("OFLSAM2 failed: {error}").format(error=error),
                                     detailedText=run.traceback_text if run is not None else "")

    def _offerOutOfMemoryFallback(self, message) -> None:
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setIcon(qt.QMessageBox.Warning)
        box.setWindowTitle(_("OFLSAM2: out of GPU memory"))
        box.setText(message)
        cpu = box.addButton(_("Use the CPU"), qt.QMessageBox.AcceptRole)
        smaller = box.addButton(_("Use image size 512"), qt.QMessageBox.AcceptRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        if box.clickedButton() == cpu:
            self._parameterNode.device = "cpu"
        elif box.clickedButton() == smaller:
            self._parameterNode.imageSize = 512

    # -----------------------------------------------------------------------------------------
    # Review and correct (the logic does the work: lastRunQuality, nextSliceToCheck, update)

    def _reviewedSegment(self):
        """The first selected segment if the last completed run segmented it, else None."""
        parameters = self._parameterNode
        if self.logic is None or parameters is None or not parameters.segmentIds:
            return None
        segmentId = parameters.segmentIds[0]
        return segmentId if segmentId in self.logic.reviewedSegmentIds() else None

    def _fillQualityTable(self) -> None:
        table = self.ui.qualityTableWidget
        table.setRowCount(0)
        segmentId = self._reviewedSegment()
        if segmentId is None:
            return
        rows = self.logic.lastRunQuality(segmentId)
        table.setRowCount(len(rows))
        for row, (index, quality) in enumerate(rows):
            table.setItem(row, 0, qt.QTableWidgetItem(str(index)))
            table.setItem(row, 1, qt.QTableWidgetItem(f"{quality:.2f}"))

    def onQualityRowClicked(self, row, column) -> None:
        segmentId = self._reviewedSegment()
        if segmentId is not None:
            index = int(self.ui.qualityTableWidget.item(row, 0).text())
            self._jumpTo(self.logic.reviewedPlaneCenterRas(index))

    def onNextSliceButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("No slice to suggest."), waitCursor=True):
            suggestion = self.logic.nextSliceToCheck(self._reviewedSegment())
            if suggestion is None:
                self.ui.statusLabel.text = _("No slice to suggest: every slice of the object is annotated or near one.")
                return
            index, ras = suggestion
            self.ui.statusLabel.text = _("Check slice {index}.").format(index=index)
            self._jumpTo(ras)

    def _jumpTo(self, ras) -> None:
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume)
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            sliceNode.JumpSliceByCentering(*ras)

    def onUpdateButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("OFLSAM2 could not update."), waitCursor=True):
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            try:
                self.logic.update(waitForCompletion=False, progressCallback=self.onProgress)
            except Exception:
                self.ui.progressBar.hide()
                raise
        self._updateButtons()

    def onUndoButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            if self.logic.undoLastRun():
                self.ui.statusLabel.text = _("The last run was undone.")
        self._updateButtons()
        self.scheduleSupportUpdate()


#
# OFLSAM2SegmentLogic
#


class OFLSAM2SegmentLogic(ScriptedLoadableModuleLogic, OFLSAM2Logic):
    """Slicer logic: the parameter node plus :class:`OFLSAM2SegmentLib.logic.OFLSAM2Logic`
    (``process``, ``cancel``, ``undoLastRun``, ``saveAdapter``, ``loadAdapter``,
    ``segmentVolumesWithAdapter``, ``describeSupport``)."""

    def __init__(self, worker=None, pump=None, installer=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        OFLSAM2Logic.__init__(self, worker=worker, pump=pump, installer=installer)

    def getParameterNode(self):
        return OFLSAM2SegmentParameterNode(super().getParameterNode())


#
# OFLSAM2SegmentTest
#


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
        from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

        self.delayDisplay("Full pipeline with a random-weight SAM2")
        volume, segmentation, ids = make_annotated_volume(slicer.mrmlScene)
        before = segment_arrays(segmentation, volume)
        logic = OFLSAM2SegmentLogic()

        summary = logic.process(volume, segmentation, ids[:1], method="sam2", randomWeights=True, imageSize=256, device="cpu")

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
        from OFLSAM2SegmentLib import mrml_io
        from OFLSAM2SegmentLib.logic import _ReplacingSliceWriter
        from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

        self.delayDisplay("Module GUI: quality table, Next slice to check, Update")
        volume, segmentation, ids = make_annotated_volume(slicer.mrmlScene, shape=(12, 64, 64))
        widget = self._moduleWidgetFor(volume, segmentation, ids[:1])

        widget.ui.applyButton.click()
        self._waitUntilDone(widget, 600)
        self.assertEqual(widget.logic.lastRun.state, "completed", widget.ui.statusLabel.text)
        self.assertEqual(widget.ui.qualityTableWidget.rowCount, 12)
        self.assertTrue(widget.ui.nextSliceButton.enabled and widget.ui.updateButton.enabled)
        suggestion = widget.logic.nextSliceToCheck(ids[0])
        if suggestion is not None:
            widget.ui.nextSliceButton.click()
            red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            self.assertAlmostEqual(red.GetSliceOffset(), suggestion[1][2], delta=2.0)  # axial: S; 4 mm slices

        corrected = segment_arrays(segmentation, volume)[ids[0]][6].copy()
        corrected[20:40, 20:40] = ~corrected[20:40, 20:40]
        _ReplacingSliceWriter(segmentation, mrml_io.volume_geometry(volume)).write(ids[0], 0, 6, corrected)
        widget.ui.updateButton.click()
        self._waitUntilDone(widget, 600)
        run = widget.logic.lastRun
        self.assertEqual(run.state, "completed", widget.ui.statusLabel.text)
        self.assertIn("recomputed", run.summary["segments"][ids[0]])
        self.assertTrue((segment_arrays(segmentation, volume)[ids[0]][6] == corrected).all(), "Update overwrote the correction")
        self.delayDisplay("Review passed")
