"""OFL-SAM2 Segment: segment a CT/MR volume from a few annotated slices with SAM2.

This file holds what Slicer looks up by name: the module class (which registers the Segment
Editor effect), and the names of the logic and its parameter node (``OFLSAM2SegmentLib/module_logic.py``),
the panel (``OFLSAM2SegmentLib/widget.py``; ``qSlicerScriptedLoadableModuleWidget::setPythonSource`` takes
``OFLSAM2SegmentWidget`` from this module) and the self-test (``Testing/Python/OFLSAM2SegmentTest.py``).
The work is done by ``OFLSAM2SegmentLib`` (run logic, worker process, MRML bridge, installs) and
the Slicer-free engine ``oflsam2``. Batch use from the Python console::

    logic = slicer.util.getModuleLogic("OFLSAM2Segment")
    summary = logic.process(volumeNode, segmentationNode, ["Segment_1"], method="ofl")
"""

import importlib.util
import logging
import os
import sys

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule

from OFLSAM2SegmentLib.compatibility import unsupported_slicer_reason
from OFLSAM2SegmentLib.module_logic import Method, OFLSAM2SegmentLogic, OFLSAM2SegmentParameterNode  # noqa: F401  (looked up here)
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
    from OFLSAM2SegmentLib.shared_worker import shutdown_shared_worker

    shutdown_shared_worker()


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
