"""OFL-SAM2 Segment: segment a CT/MR volume from a few annotated slices with SAM2.

This file holds what Slicer looks up by name: the module class (which registers the Segment
Editor effect), the parameter node, the logic, and the names of the panel
(``OFLSAM2SegmentLib/widget.py``; ``qSlicerScriptedLoadableModuleWidget::setPythonSource`` takes
``OFLSAM2SegmentWidget`` from this module) and the self-test (``Testing/Python/OFLSAM2SegmentTest.py``).
The work is done by ``OFLSAM2SegmentLib`` (run logic, worker process, MRML bridge, installs) and
the Slicer-free engine ``oflsam2``. Batch use from the Python console::

    logic = slicer.util.getModuleLogic("OFLSAM2Segment")
    summary = logic.process(volumeNode, segmentationNode, ["Segment_1"], method="ofl")
"""

import enum
import importlib.util
import logging
import os
import sys
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic

from oflsam2.settings import DEFAULT_METHOD, DEVICES, MAX_IMAGE_SIZE, METHOD_TITLES, OFL_PRESETS, SLICER_METHODS, MethodOptions
from oflsam2.volume import PRESETS
from OFLSAM2SegmentLib.compatibility import unsupported_slicer_reason
from OFLSAM2SegmentLib.logic import OFLSAM2Logic
from OFLSAM2SegmentLib.options import AXES, METHOD_DEFAULT_MODEL
from OFLSAM2SegmentLib.widget import OFLSAM2SegmentWidget  # noqa: F401  (Slicer looks the panel up here)

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
        unsupported = unsupported_slicer_reason(slicer.app)
        if unsupported:  # the module loads and says what it needs; no effect, no worker
            self.parent.helpText = unsupported + "\n" + self.parent.helpText
            logging.warning(unsupported)
            return
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


class _RegisteredMethod(enum.Enum):
    def label(self) -> str:
        """The method selector's text (parameterNodeWrapper's combo box calls ``label``)."""
        return METHOD_TITLES[self.value]


# The engine's methods that the module offers (Method.OFL, Method.REVSAM2, Method.SAM2); scenes
# store the member names.
Method = _RegisteredMethod("Method", [(name.upper(), name) for name in SLICER_METHODS])
METHOD_DEFAULTS = MethodOptions()


@parameterNodeWrapper
class OFLSAM2SegmentParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentIds: list[str]
    referenceVolumes: list[vtkMRMLScalarVolumeNode]
    referenceSegmentations: list[vtkMRMLSegmentationNode]
    method: Method = Method(DEFAULT_METHOD)
    model: str = METHOD_DEFAULT_MODEL  # "": the method's own model (oflsam2.settings.default_model)
    checkpoint: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    imageSize: Annotated[int, WithinRange(0, MAX_IMAGE_SIZE)] = 0  # 0: the model's own size
    preset: Annotated[str, Choice(list(PRESETS))] = "auto"
    axis: Annotated[str, Choice(list(AXES))] = "auto"
    gamma: Annotated[float, WithinRange(0.0, 1.0)] = METHOD_DEFAULTS.gamma
    numRetrieved: Annotated[int, WithinRange(1, 16)] = METHOD_DEFAULTS.num_retrieved
    epochs: Annotated[int, WithinRange(0, 1000)] = METHOD_DEFAULTS.epochs
    topK: Annotated[int, WithinRange(1, 20)] = METHOD_DEFAULTS.top_k
    oflPreset: Annotated[str, Choice(list(OFL_PRESETS))] = OFL_PRESETS[0]  # paper | extended (README)
    saveAdapter: str = ""
    useAdapter: str = ""
    randomWeights: bool = False

    def runOptions(self) -> dict:
        """The options of ``OFLSAM2SegmentLogic.process`` these parameters stand for."""
        options = {
            "model": self.model, "checkpoint": self.checkpoint, "device": self.device, "imageSize": self.imageSize,
            "preset": self.preset, "axis": self.axis, "gamma": self.gamma, "numRetrieved": self.numRetrieved,
            "epochs": self.epochs, "topK": self.topK, "randomWeights": self.randomWeights, "oflPreset": self.oflPreset,
        }
        if self.saveAdapter:
            options["saveAdapter"] = self.saveAdapter
        if self.useAdapter:
            options["adapter"] = self.useAdapter
        return options


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


def _loadSelfTest():
    """The self-test class from ``Testing/Python/OFLSAM2SegmentTest.py`` (installed with the module,
    see CMakeLists.txt), loaded by path: ``Testing`` is no package, and a top-level ``Testing`` on
    ``sys.path`` could be another extension's. Executed afresh whenever this file is (Reload)."""
    path = os.path.join(os.path.dirname(__file__), "Testing", "Python", "OFLSAM2SegmentTest.py")
    spec = importlib.util.spec_from_file_location("OFLSAM2SegmentTest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.OFLSAM2SegmentTest


OFLSAM2SegmentTest = _loadSelfTest()
