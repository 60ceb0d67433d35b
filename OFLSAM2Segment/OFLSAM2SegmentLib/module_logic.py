"""The module's Slicer logic (:class:`OFLSAM2SegmentLogic`: :class:`.logic.OFLSAM2Logic` with the
module's parameter node) and that parameter node, which the panel binds its widgets to.

Here rather than in the module file so that the panel takes them from ``OFLSAM2SegmentLib``; the
module file imports them under the names Slicer and the self-test look up.
"""

import enum
from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from oflsam2.settings import DEFAULT_METHOD, DEVICES, MAX_IMAGE_SIZE, METHOD_TITLES, OFL_PRESETS, SLICER_METHODS, MethodOptions
from oflsam2.volume import PRESETS

from .logic import OFLSAM2Logic
from .options import AXES, METHOD_DEFAULT_MODEL


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


class OFLSAM2SegmentLogic(ScriptedLoadableModuleLogic, OFLSAM2Logic):
    """Slicer logic: the parameter node plus :class:`.logic.OFLSAM2Logic`
    (``process``, ``cancel``, ``undoLastRun``, ``saveAdapter``, ``loadAdapter``,
    ``segmentVolumesWithAdapter``, ``describeSupport``)."""

    def __init__(self, worker=None, pump=None, installer=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        OFLSAM2Logic.__init__(self, worker=worker, pump=pump, installer=installer)

    def getParameterNode(self):
        return OFLSAM2SegmentParameterNode(super().getParameterNode())
