"""Each method's default model in Slicer (issue 10, item 9): the module's and the effect's model
selectors start on "Method's default" (stored as ``""``), which names the chosen method's model
and resolves to :func:`oflsam2.settings.default_model` (OFL-SAM2: SAM2.1 base-plus, as in its
paper; RevSAM2 and SAM2 propagation: tiny), or to an adapter's model; an explicit model, from a
saved scene or effect parameter, is kept; a run says which model it used.

Real MRML (slicer-core): scenes saved and read back, runs through the logic and its worker (with
a fake engine); the module and effect are loaded as Slicer loads them, with Qt's combo box
replaced by a small fake that keeps its items.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from fakes import CopyEngine, ManualPump
from mrml_helpers import require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from loading_rules import load_like_slicer  # noqa: E402

from oflsam2.checkpoints import load_manifest, model_entry  # noqa: E402
from oflsam2.errors import AdapterError  # noqa: E402
from oflsam2.settings import METHODS, SLICER_METHODS, default_model  # noqa: E402
from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402
from OFLSAM2SegmentLib.options import LOCAL_MODEL, METHOD_DEFAULT_MODEL, check_outputs, parse_options  # noqa: E402
from OFLSAM2SegmentLib.worker import Worker  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[2] / "OFLSAM2Segment"
EXPLICIT = "sam2.1-small"  # no method's default


class FakeComboBox:
    """The parts of QComboBox the selectors use: items with text, data and tooltip, the current index."""

    def __init__(self, *args):
        self.items: list[dict] = []
        self.currentIndex = -1
        self.slots: dict[str, list] = {}

    @property
    def count(self):
        return len(self.items)

    def addItem(self, text, data=None):
        self.items.append({"text": text, "data": data, "tooltip": None})
        if self.currentIndex < 0:
            self.currentIndex = 0

    def clear(self):
        self.items, self.currentIndex = [], -1

    def setItemText(self, index, text):
        self.items[index]["text"] = text

    def setItemData(self, index, value, role):
        assert role is sys.modules["qt"].Qt.ToolTipRole  # the selectors set tooltips only
        self.items[index]["tooltip"] = value

    def itemData(self, index):
        return self.items[index]["data"]

    def findData(self, data):
        return next((n for n, item in enumerate(self.items) if item["data"] == data), -1)

    def blockSignals(self, blocked):
        return False

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal, slot):
        self.slots[signal].remove(slot)

    def setToolTip(self, text):
        pass


def editor_scene(slicer_core):
    scene = slicer_core.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    return scene


@pytest.fixture
def session(slicer_core):
    scene = editor_scene(slicer_core)
    with load_like_slicer(MODULE_DIR, scene) as session:
        sys.modules["qt"].QComboBox = FakeComboBox
        yield session
    scene.Clear(1)


def test_the_papers_backbones_are_the_defaults():
    assert [default_model(m) for m in ("ofl", "revsam2", "sam2")] == ["sam2.1-base-plus", "sam2.1-tiny", "sam2.1-tiny"]


@pytest.mark.parametrize("method", METHODS)
def test_options_resolve_the_methods_model_and_keep_an_explicit_one(method):
    for unnamed in ({}, {"model": METHOD_DEFAULT_MODEL}, {"model": None}):
        settings = parse_options(method, {**unnamed, "imageSize": 0}).settings
        assert settings.model == default_model(method), unnamed
        assert settings.image_size == model_entry(default_model(method))["image_size"]
    assert parse_options(method, {"model": EXPLICIT}).settings.model == EXPLICIT


def test_with_an_adapter_the_default_is_the_adapters_model_and_a_chosen_model_is_checked(tmp_path):
    # Imported on use: slicer-core's "import slicer" imports every module of this folder (it is named
    # slicer/), so a module-level import of another test module here can meet it half-initialised.
    from test_segmentation_safety import saved_adapter

    adapter = str(saved_adapter(tmp_path))  # trained with sam2.1-small at 512 px
    config = parse_options("ofl", {"model": METHOD_DEFAULT_MODEL, "imageSize": 0, "adapter": adapter})
    assert (config.settings.model, config.settings.image_size) == ("sam2.1-small", 512)
    check_outputs(config, ["Liver"])  # fits the adapter
    chosen = parse_options("ofl", {"model": "sam2.1-base-plus", "adapter": adapter})
    with pytest.raises(AdapterError, match=r"model 'sam2.1-small' \(this run: 'sam2.1-base-plus'\)"):
        check_outputs(chosen, ["Liver"])


@pytest.mark.parametrize("method,model", [*((m, METHOD_DEFAULT_MODEL) for m in SLICER_METHODS), ("ofl", EXPLICIT)])
def test_a_run_uses_the_resolved_model_and_names_it(scene, method, model):
    from test_logic import FAST, annotated_case  # on use: see above

    volume, segmentation, ids = annotated_case(scene)
    built, ends = [], []
    worker = Worker(lambda settings: built.append(settings) or CopyEngine(settings))
    logic = OFLSAM2Logic(worker=worker, pump=ManualPump())
    try:
        summary = logic.process(volume, segmentation, ids[:1], method, model=model, epochs=1,
                                progressCallback=lambda stage, done, total, text: ends.append((stage, text)), **FAST)
    finally:
        worker.shutdown()
    used = model or default_model(method)
    assert [settings.model for settings in built] == [used]
    assert summary["model"] == used
    assert ends[-1][0] == "completed" and ends[-1][1].endswith(f" with {used}."), ends[-1]


def test_the_parameter_node_round_trips_the_default_and_an_explicit_model(session, tmp_path):
    Parameters, Method = session.module.OFLSAM2SegmentParameterNode, session.module.Method
    assert Parameters.model == METHOD_DEFAULT_MODEL
    scene = session.scene
    # parameterNodeWrapper keeps a str field as one parameter of the module's vtkMRMLScriptedModuleNode
    for name, model in (("new", Parameters.model), ("saved before", "sam2.1-tiny")):
        node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", name)
        node.SetParameter("model", model)
    path = tmp_path / "scene.mrml"
    scene.SetURL(str(path))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(path))
    assert loaded.Connect()
    stored = {node.GetName(): node.GetParameter("model")
              for node in (loaded.GetNthNodeByClass(n, "vtkMRMLScriptedModuleNode")
                           for n in range(loaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")))}
    assert stored == {"new": "", "saved before": "sam2.1-tiny"}
    for method in Method:
        for name, expected in (("new", default_model(method.value)), ("saved before", "sam2.1-tiny")):
            parameters = Parameters()
            parameters.method, parameters.model = method, stored[name]
            assert parse_options(method.value, parameters.runOptions()).settings.model == expected, (method, name)
    loaded.Clear(1)


def test_the_effect_defaults_to_the_methods_model_names_it_and_keeps_a_choice(session):
    session.editor = slicer.vtkSlicerSegmentEditorLogic()  # what the effect reads its segment from
    session.editor.SetMRMLScene(session.scene)
    session.editor.SetSegmentEditorNode(session.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    (effect,) = session.registered_effects
    parameters = effect.scriptedEffect
    effect.setMRMLDefaults()
    assert parameters.parameter("Model") == METHOD_DEFAULT_MODEL
    effect.setupOptionsFrame()
    combo = effect.modelComboBox
    assert [item["data"] for item in combo.items] == [METHOD_DEFAULT_MODEL, *load_manifest()]

    effect.updateGUIFromMRML()
    assert combo.currentIndex == 0 and combo.items[0]["text"] == "Method's default (sam2.1-base-plus)"
    assert "OFL-SAM2 runs sam2.1-base-plus" in combo.items[0]["tooltip"]
    parameters.setParameter("Method", "sam2")  # Slicer then calls updateGUIFromMRML
    effect.updateGUIFromMRML()
    assert combo.items[0]["text"] == "Method's default (sam2.1-tiny)"
    assert "SAM2 propagation runs sam2.1-tiny" in combo.items[0]["tooltip"]

    combo.currentIndex = combo.findData(EXPLICIT)  # the user picks a model
    effect.updateMRMLFromGUI()
    assert parameters.parameter("Model") == EXPLICIT
    effect.setMRMLDefaults()  # e.g. the effect activated again: the choice stays
    effect.updateGUIFromMRML()
    assert parameters.parameter("Model") == EXPLICIT and combo.currentIndex == combo.findData(EXPLICIT)
    combo.currentIndex = 0
    effect.updateMRMLFromGUI()
    assert parameters.parameter("Model") == METHOD_DEFAULT_MODEL
    effect.cleanup()


def test_the_module_selector_offers_the_methods_default_first_and_names_it(session):
    Parameters, Method = session.module.OFLSAM2SegmentParameterNode, session.module.Method
    widget = object.__new__(session.module.OFLSAM2SegmentWidget)  # no Qt panel here: the selector's logic only
    paths = [SimpleNamespace(currentPath="") for _ in range(3)]
    widget.ui = SimpleNamespace(modelComboBox=FakeComboBox(), checkpointPathLineEdit=paths[0],
                                saveAdapterPathLineEdit=paths[1], useAdapterPathLineEdit=paths[2],
                                referencesListWidget=mock.MagicMock())
    parameters = Parameters()
    parameters.referenceVolumes, parameters.referenceSegmentations = [], []
    parameters.checkpoint = parameters.saveAdapter = parameters.useAdapter = ""
    widget._parameterNode, widget._updatingGui = parameters, False
    combo = widget.ui.modelComboBox

    widget._fillModelSelector()
    widget._updateManualWidgets()
    widget._showMethodDefaultModel()
    assert [item["data"] for item in combo.items] == [METHOD_DEFAULT_MODEL, *load_manifest(), LOCAL_MODEL]
    assert combo.currentIndex == 0 and combo.items[0]["text"] == "Method's default (sam2.1-base-plus)"
    parameters.method = Method.REVSAM2
    widget._showMethodDefaultModel()
    assert combo.items[0]["text"] == "Method's default (sam2.1-tiny)" and "RevSAM2 runs sam2.1-tiny" in combo.items[0]["tooltip"]

    widget.onModelChanged(combo.findData(EXPLICIT))
    assert parameters.model == EXPLICIT
    widget._updateManualWidgets()
    assert combo.currentIndex == combo.findData(EXPLICIT)
    widget.onModelChanged(0)
    assert parameters.model == METHOD_DEFAULT_MODEL
