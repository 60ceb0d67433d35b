"""The OFL-SAM2 Segment module's panel: inputs, the support list, model and method options,
Apply/Cancel with progress, undo, and the review of the last run (quality table, "Next slice to
check", Update).

Slicer finds the class through the module file, which imports it (``qSlicerScriptedLoadableModuleWidget``
looks ``OFLSAM2SegmentWidget`` up on ``sys.modules["OFLSAM2Segment"]``); its name gives
``moduleName``, hence the resource paths and the Reload button's target.
"""

import logging
import sys

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from . import device as devices
from .compatibility import unsupported_slicer_reason
from .compute_view import ComputePanel
from .module_logic import OFLSAM2SegmentLogic
from .observers import SegmentationObserver
from .options import LOCAL_MODEL, METHOD_DEFAULT_MODEL, default_model_entry, model_choices
from .progress import progress_text, support_line
from .review_view import QualityReview
from .shared_worker import RELOAD_REASON, shutdown_shared_worker
from .worker import GpuOutOfMemory


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
        unsupported = unsupported_slicer_reason(slicer.app)
        if unsupported:  # Slicer too old: say so instead of a panel that cannot run
            label = qt.QLabel(unsupported)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OFLSAM2Segment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.compute = self._addComputeSection()
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
        self.ui.updateButton.connect("clicked(bool)", self.onUpdateButton)
        self.review = QualityReview(self.ui.qualityTableWidget, self.ui.nextSliceButton, lambda: self.logic,
                                    self._firstSelectedSegment, self._showStatus, volume=self._inputVolume)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.logic is not None and self.logic.isRunning():
            self.logic.cancel()
        if getattr(self, "compute", None) is not None:
            self.compute.disconnect()
        self.removeObservers()
        self._segmentationObserver.deactivate()
        if self._supportTimer is not None:
            self._supportTimer.stop()

    def onReload(self) -> None:
        """Stop the worker process and drop every ``OFLSAM2SegmentLib`` module (this widget's
        included), then let Slicer re-execute the module file (``slicer.util.reloadScriptedModule``
        re-executes only that file): its imports load the Lib afresh, in dependency order, and
        Slicer builds the new panel from the new widget class. Dropped rather than
        ``importlib.reload``-ed: a reload keeps names a change removed and needs a hand-kept order.
        The next run starts a new worker with the new code; a run in progress is cancelled and
        its segments restored first."""
        shutdown_shared_worker(RELOAD_REASON)
        for name in [n for n in sys.modules if n == "OFLSAM2SegmentLib" or n.startswith("OFLSAM2SegmentLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        if self.logic is None:  # the panel only says which Slicer it needs
            return
        self.compute.refresh()  # the effect may have changed where runs compute
        self._segmentationObserver.activate()
        self.initializeParameterNode()
        self.scheduleSupportUpdate()  # strokes made while the module was hidden

    def exit(self) -> None:
        if self.logic is None:
            return
        # Hidden module: Segment Editor strokes must not trigger support-list reads.
        self._segmentationObserver.deactivate()
        if self._supportTimer is not None:
            self._supportTimer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)

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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # .ui widgets with the dynamic property "SlicerParameterName" are bound here; the
            # model list, paths, segment selection and references are synchronized by hand.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)
            self._updateManualWidgets()
            self.onSegmentationChanged(self._parameterNode.segmentation)
        self._onParametersModified()

    def _onParametersModified(self, caller=None, event=None) -> None:
        self._showMethodDefaultModel()
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
        self.review.refresh_table()
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
        self.ui.modelComboBox.addItem(_("Method's default"), METHOD_DEFAULT_MODEL)  # named per method, see below
        try:
            choices = model_choices()
        except Exception as exc:  # a broken manifest must not break the module
            logging.error(f"OFLSAM2: cannot read the model manifest: {exc}")
            choices = []
        for name, description in choices:
            self.ui.modelComboBox.addItem(name, name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, description, qt.Qt.ToolTipRole)
        self.ui.modelComboBox.addItem(_("Local file..."), LOCAL_MODEL)

    def _addComputeSection(self) -> ComputePanel:
        """"Compute on: this computer | a server", below the panel (built here: the .ui stays the run's own)."""
        import ctk

        section = ctk.ctkCollapsibleButton()
        section.text = _("Compute")
        self.layout.addWidget(section)
        return ComputePanel(qt.QFormLayout(section).addRow)

    def _showDeviceProbe(self) -> None:
        if devices.no_local_pytorch_reason():  # macOS x86_64: Apply says it all, with what to do
            self.ui.deviceInfoLabel.text = _("none: PyTorch cannot run in this Slicer on this Mac; compute on an "
                                             "OFLSAM2 server (README: Compute on a server)")
            return
        found = [d for d in devices.available_devices() if d != "cpu"]
        names = {"cuda": "NVIDIA (CUDA)", "mps": "Apple (MPS)"}
        self.ui.deviceInfoLabel.text = (
            _("{gpus} found").format(gpus=", ".join(names[d] for d in found)) if found
            else _("none found: runs on the CPU (slow; use a small model and image size)")
        )

    def _showMethodDefaultModel(self) -> None:
        """Name the chosen method's model on the model selector's "Method's default" entry."""
        if self._parameterNode:
            text, tooltip = default_model_entry(self._parameterNode.method.value)
            self.ui.modelComboBox.setItemText(0, text)
            self.ui.modelComboBox.setItemData(0, tooltip, qt.Qt.ToolTipRole)

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
        self.review.update_button(running)
        self.ui.updateButton.enabled = not running and self.review.reviewed_segment() is not None

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
        self.review.refresh_table()
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
    # Review and correct (the logic does the work: lastRunQuality, nextSliceToCheck, update; the
    # quality table and "Next slice to check" are review_view.QualityReview, shared with the effect)

    def _firstSelectedSegment(self):
        parameters = self._parameterNode
        return parameters.segmentIds[0] if parameters is not None and parameters.segmentIds else None

    def _inputVolume(self):
        return self._parameterNode.inputVolume if self._parameterNode is not None else None

    def _showStatus(self, text) -> None:
        self.ui.statusLabel.text = text

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
        self.review.refresh_table()  # an undone run is no longer reviewed
        self._updateButtons()
        self.scheduleSupportUpdate()
