"""Load the scripted module and its Segment Editor effect with Slicer's own ``sys.path`` /
``sys.modules`` rules, outside the Slicer application.

Reproduced from Slicer's source (Slicer/Slicer, 5.10 to main, checked at 583e9b37d5):

0. ``Base/QTCore/qSlicerCoreApplication.cxx`` (``handleCommandLineArguments``): ``sys.executable``
   is set to ``PythonSlicer`` (``QStandardPaths::findExecutable``), the CTKAppLauncher that starts
   the real interpreter as its child; here a stand-in written from its source (``app_launcher``).
1. ``Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx`` (``ctkFactoryScriptedItem::load``):
   a module that is not built into Slicer gets its folder *appended* to ``sys.path``
   (``qSlicerCorePythonManager::appendPythonPath``: ``os.path.abspath``, only if absent).
2. ``Base/QTGUI/qSlicerScriptedLoadableModule.cxx`` (``setPythonSource``): the module name is
   the file's base name; if ``sys.modules[name]`` lacks a class of that name, the file is
   loaded with ``qSlicerScriptedUtils::loadSourceAsModule``; the class is instantiated with
   the module's C++ object as ``parent`` and stored as ``slicer.modules.<name>Instance``.
3. ``Base/QTCore/qSlicerScriptedUtils.cxx`` (``loadSourceAsModule``):
   ``spec_from_file_location(name, path)``, ``module_from_spec``, ``sys.modules[name] = module``
   *before* ``spec.loader.exec_module(module)``: a plain module, never a package.
4. The module's ``__init__`` connects ``startupCompleted()``; Slicer emits it once every module
   is loaded, and ``registerEditorEffect`` runs then.
5. ``Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.cxx``
   (``setPythonSource``): the Python module name is the effect file's *parent folder* name, the
   class name its base name (``Effect`` appended if missing); if ``sys.modules[folder]`` lacks
   that class, rule 3 loads the file as ``sys.modules[folder]`` (replacing whatever was there);
   the class is instantiated with the C++ effect as ``scriptedEffect`` and stored as
   ``slicer.<folder>`` (``qSlicerScriptedUtils::setModuleAttribute``).

Mocked, because they cannot exist without the application: ``qt``, ``ctk``, ``slicer.app``
(signal connections, ``processEvents``, testing mode), ``slicer.modules``, the C++ effect object
(its parameters and ``modifySegmentByLabelmap`` go to a real ``vtkSlicerSegmentEditorLogic`` and
``vtkMRMLSegmentEditorNode``), and the pure-Python Slicer helpers that ``slicer-core`` does not
ship (``slicer.ScriptedLoadableModule``, ``slicer.i18n``, ``slicer.parameterNodeWrapper``,
``SegmentEditorEffects``), reduced to what the module uses. MRML is real (``slicer-core``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import slicer
from app_launcher import install as install_python_launcher

OWN_MODULES = ("OFLSAM2Segment", "OFLSAM2SegmentLib", "OFLSAM2SegmentTest", "SegmentEditorOFLSAM2Lib", "oflsam2")


def load_source_as_module(module_name: str, file_path: str):
    """``qSlicerScriptedUtils::loadSourceAsModule`` (rule 3)."""
    spec = importlib.util.spec_from_file_location(module_name, file_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def append_python_path(path) -> None:
    """``qSlicerCorePythonManager::appendPythonPath`` (rule 1)."""
    path = os.path.abspath(path)
    if path not in sys.path:
        sys.path.append(path)


class FakeApp:
    """``slicer.app``: Qt-style string signals, event processing, testing mode."""

    def __init__(self, version=(5, 10)):
        self.connections: dict[str, list] = {}
        self.processed_events = 0
        self.majorVersion, self.minorVersion = version  # qSlicerCoreApplication's properties

    def connect(self, signal, slot):
        self.connections.setdefault(signal, []).append(slot)

    def emit(self, signal):
        for slot in list(self.connections.get(signal, [])):
            slot()

    def processEvents(self):
        self.processed_events += 1

    def testingEnabled(self):
        return True

    def pauseRender(self):
        pass

    def resumeRender(self):
        pass

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass


class ScriptedEffect:
    """The C++ ``qSlicerSegmentEditorScriptedEffect``: ``setPythonSource`` follows rule 5; the
    editor calls go to a real ``vtkSlicerSegmentEditorLogic`` when ``session.editor`` is set."""

    def __init__(self, parent, session: "SlicerSession"):
        self._session = session
        self._self = None
        self.name = ""
        self.perSegment = False
        self.requireSegments = False
        self.parameters: dict[str, str] = {}

    def setPythonSource(self, path: str) -> bool:
        module_name = Path(path).parent.name
        class_name = Path(path).stem
        if not class_name.endswith("Effect"):
            class_name += "Effect"
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is None:
            module = load_source_as_module(module_name, path)
            cls = getattr(module, class_name, None)
        if cls is None:
            raise RuntimeError(f"class {class_name} was not found in {path}")
        self._self = cls(self)
        setattr(slicer, module_name, self._self)
        self._session.effect_modules.append(module_name)
        return True

    def self(self):
        return self._self

    # Parameters (stored on the editor node in Slicer; a dict is enough here)
    def setParameterDefault(self, name, value):
        self.parameters.setdefault(name, str(value))

    def setParameter(self, name, value):
        self.parameters[name] = str(value)

    def parameter(self, name):
        return self.parameters.get(name, "")

    def integerParameter(self, name):
        return int(self.parameters.get(name, "0") or 0)

    def addLabeledOptionsWidget(self, label, widget):
        pass

    def addOptionsWidget(self, widget):
        pass

    # Editor operations, delegated to the real C++ logic as Slicer >= 5.10 does
    def parameterSetNode(self):
        return self._session.editor.GetSegmentEditorNode()

    def confirmCurrentSegmentVisible(self):
        return True

    def saveStateForUndo(self):
        self._session.editor.SaveStateForUndo()

    def modifySegmentByLabelmap(self, segmentation, segment_id, labelmap, mode, bypass_masking=False):
        self._session.editor.ModifySegmentByLabelmap(segmentation, segment_id, labelmap, mode, self.perSegment, bypass_masking)


class SlicerSession:
    """What a started Slicer holds after loading the module (see :func:`load_like_slicer`)."""

    def __init__(self, module_dir: Path, scene, version=(5, 10)):
        self.module_dir = Path(module_dir)
        self.scene = scene
        self.app = FakeApp(version)
        self.effect_modules: list[str] = []
        self.registered_effects: list = []
        self.editor = None  # a vtkSlicerSegmentEditorLogic, once set up
        self.module = None
        self.instance = None


def _python_helpers(session: SlicerSession) -> dict[str, types.ModuleType]:
    """The pure-Python Slicer modules slicer-core lacks, reduced to what the module uses."""
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = type(self).__name__

        def resourcePath(self, filename):
            return os.path.join(session.module_dir, "Resources", filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):  # the real one adds the Reload & Test box to the panel's layout
            self.layout = mock.MagicMock(name="layout")

        def onReload(self):
            session.reloaded = True

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=100):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget, ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: ("Choice", tuple(choices))
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)

    effects = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

        def register(self):
            session.registered_effects.append(self)

    effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect

    pythonqt_effects = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    pythonqt_effects.qSlicerSegmentEditorScriptedEffect = lambda parent: ScriptedEffect(parent, session)
    return {
        "slicer.ScriptedLoadableModule": scripted, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
        "SegmentEditorEffects": effects, "qSlicerSegmentationsEditorEffectsPythonQt": pythonqt_effects,
        "qt": mock.MagicMock(name="qt"), "ctk": mock.MagicMock(name="ctk"),
    }


@contextlib.contextmanager
def load_like_slicer(module_dir, scene, version=(5, 10)):
    """Start a "Slicer" (``version``: its major and minor version) whose ``sys.executable`` is a
    ``PythonSlicer`` launcher (rule 0), that loads the module in ``module_dir`` (rules 1-4), emit
    ``startupCompleted()`` (which registers the effect, rule 5), and yield the
    :class:`SlicerSession`. ``sys.path``, ``sys.modules``, ``sys.executable`` and ``slicer`` are
    put back afterwards."""
    session = SlicerSession(module_dir, scene, version)
    saved_path = list(sys.path)
    saved_modules = {n: m for n, m in sys.modules.items() if n.split(".")[0] in OWN_MODULES}
    repo_module_dirs = {os.path.abspath(p) for p in sys.path if os.path.isdir(os.path.join(p or ".", "OFLSAM2SegmentLib"))}
    mocked = set()
    with contextlib.ExitStack() as stack:
        slicer_home = tempfile.mkdtemp(prefix="Slicer home ")
        stack.callback(shutil.rmtree, slicer_home, True)
        stack.enter_context(mock.patch.object(sys, "executable", install_python_launcher(Path(slicer_home), sys.executable)))
        stack.callback(_restore_modules, mocked, saved_modules)
        for name in saved_modules:
            del sys.modules[name]
        # The test run put the repository's module folder first on sys.path; Slicer does not.
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in repo_module_dirs]
        helpers = _python_helpers(session)
        mocked.update(n for n in helpers if n not in sys.modules)
        sys.modules.update(helpers)
        for name in ("ScriptedLoadableModule", "i18n", "parameterNodeWrapper"):
            stack.enter_context(mock.patch.object(slicer, name, helpers[f"slicer.{name}"], create=True))
        modifications = slicer.vtkSlicerSegmentEditorLogic
        abstract_effect = types.SimpleNamespace(ModificationModeRemove=modifications.ModificationModeRemove,
                                                ModificationModeAdd=modifications.ModificationModeAdd,
                                                ModificationModeSet=modifications.ModificationModeSet)
        for name, value in (("app", session.app), ("mrmlScene", scene), ("modules", types.SimpleNamespace()),
                            ("qSlicerSegmentEditorAbstractEffect", abstract_effect)):
            stack.enter_context(mock.patch.object(slicer, name, value, create=True))
        stack.enter_context(mock.patch.object(slicer.util, "mainWindow", lambda: mock.MagicMock(name="mainWindow"), create=True))
        stack.enter_context(mock.patch.object(slicer.util, "errorDisplay", lambda *a, **k: None, create=True))
        try:
            append_python_path(session.module_dir)  # rule 1
            module_file = str(session.module_dir / "OFLSAM2Segment.py")
            session.module = load_source_as_module("OFLSAM2Segment", module_file)  # rules 2-3
            session.instance = session.module.OFLSAM2Segment(mock.MagicMock(name="qSlicerScriptedLoadableModule"))
            slicer.modules.OFLSAM2SegmentInstance = session.instance
            session.app.emit("startupCompleted()")  # rule 4, then rule 5
            yield session
        finally:
            session.app.emit("aboutToQuit()")
            sys.path[:] = saved_path


def _restore_modules(mocked: set, saved: dict) -> None:
    """Drop what the session imported (its own copies of the project's modules, the mocks) and
    put the test run's modules back, without ever emptying ``sys.modules``."""
    for name in [n for n in sys.modules if n in mocked or n.split(".")[0] in OWN_MODULES]:
        sys.modules.pop(name, None)
    sys.modules.update(saved)
