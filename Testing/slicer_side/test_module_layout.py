"""The module file stays slim (issue 14): it defines the module class, the parameter node and the
logic, and exposes the panel (``OFLSAM2SegmentLib/widget.py``) and the self-test
(``Testing/Python/OFLSAM2SegmentTest.py``) under the names Slicer looks up. Loaded with Slicer's
rules (``loading_rules``); Reload is followed step by step as ``slicer.util.reloadScriptedModule``
does it (Slicer 583e9b37d5, ``Base/Python/slicer/util.py``). The method selectors and the
method defaults come from the engine's registry (``oflsam2.settings``)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import shutil
import subprocess
import sys
import unittest
from pathlib import Path
from unittest import mock

import pytest
from mrml_helpers import require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from loading_rules import load_like_slicer, load_source_as_module  # noqa: E402

from oflsam2.settings import DEFAULT_METHOD, METHOD_TITLES, SLICER_METHODS, MethodOptions  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[2] / "OFLSAM2Segment"


def editor_scene(slicer_core):
    scene = slicer_core.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    return scene


def flat_ids(suite) -> list[str]:
    return [i for item in suite for i in flat_ids(item)] if isinstance(suite, unittest.TestSuite) else [suite.id()]


def test_the_module_file_stays_under_200_lines():
    lines = (MODULE_DIR / "OFLSAM2Segment.py").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"OFLSAM2Segment.py has {len(lines)} lines: move code into OFLSAM2SegmentLib"


def test_slicer_finds_the_widget_logic_and_self_test_on_the_module(slicer_core):
    scene = editor_scene(slicer_core)
    with load_like_slicer(MODULE_DIR, scene) as session:
        module = sys.modules["OFLSAM2Segment"]
        assert module is session.module
        # qSlicerScriptedLoadableModuleWidget::setPythonSource: an attribute of sys.modules[name]
        assert module.OFLSAM2SegmentWidget is sys.modules["OFLSAM2SegmentLib.widget"].OFLSAM2SegmentWidget
        assert module.OFLSAM2SegmentLogic is sys.modules["OFLSAM2SegmentLib.module_logic"].OFLSAM2SegmentLogic
        # ScriptedLoadableModule.runTest (SelfTests, "Reload and Test"): <module>Test on the module
        # named by the module class's __module__
        test_class = getattr(importlib.import_module(type(session.instance).__module__), "OFLSAM2SegmentTest")
        assert Path(sys.modules[test_class.__module__].__file__) == MODULE_DIR / "Testing" / "Python" / "OFLSAM2SegmentTest.py"
        # slicer_add_python_unittest(SCRIPT OFLSAM2Segment.py): slicer.testing.runUnitTest loads the
        # module's tests by name
        names = {test_id.rsplit(".", 1)[1] for test_id in flat_ids(unittest.TestLoader().loadTestsFromName("OFLSAM2Segment"))}
        assert {"test_process_writes_slices_and_undo_restores", "test_widget_review_and_update"} <= names
    scene.Clear(1)


def test_reload_picks_up_a_changed_widget_and_self_test(slicer_core, tmp_path):
    """Edit the widget and the self-test while "Slicer" runs, press Reload: the panel Slicer
    builds next comes from the edited widget class, and the self-test is the edited one."""
    module_dir = tmp_path / "OFLSAM2Segment"
    shutil.copytree(MODULE_DIR, module_dir, ignore=shutil.ignore_patterns("__pycache__"))
    scene = editor_scene(slicer_core)
    with load_like_slicer(module_dir, scene) as session:
        old_widget_class = session.module.OFLSAM2SegmentWidget
        old_test_class = session.module.OFLSAM2SegmentTest
        old_logic_module = sys.modules["OFLSAM2SegmentLib.logic"]
        with open(module_dir / "OFLSAM2SegmentLib" / "widget.py", "a", encoding="utf-8") as widget_file:
            widget_file.write('\nOFLSAM2SegmentWidget.editedAfterStartUp = "widget"\n')
        with open(module_dir / "Testing" / "Python" / "OFLSAM2SegmentTest.py", "a", encoding="utf-8") as test_file:
            test_file.write('\nOFLSAM2SegmentTest.editedAfterStartUp = "self-test"\n')

        object.__new__(old_widget_class).onReload()  # the Reload button
        assert session.reloaded
        # reloadScriptedModule: the module file executed afresh as sys.modules["OFLSAM2Segment"],
        # then the widget class looked up there (qSlicerScriptedLoadableModuleWidget::reload)
        load_source_as_module("OFLSAM2Segment", str(module_dir / "OFLSAM2Segment.py"))
        new_widget_class = getattr(sys.modules["OFLSAM2Segment"], "OFLSAM2SegmentWidget")

        assert new_widget_class is not old_widget_class
        assert new_widget_class.editedAfterStartUp == "widget"
        assert not hasattr(old_widget_class, "editedAfterStartUp")
        assert sys.modules["OFLSAM2Segment"].OFLSAM2SegmentTest.editedAfterStartUp == "self-test"
        assert not hasattr(old_test_class, "editedAfterStartUp")
        assert sys.modules["OFLSAM2SegmentLib.logic"] is not old_logic_module  # the rest of the Lib too
    scene.Clear(1)


@pytest.fixture
def session(slicer_core):
    scene = editor_scene(slicer_core)
    with load_like_slicer(MODULE_DIR, scene) as session:
        yield session
    scene.Clear(1)


def test_the_module_offers_the_registry_methods_with_their_titles(session):
    Method = session.module.Method
    assert [m.value for m in Method] == list(SLICER_METHODS)
    assert [m.label() for m in Method] == [METHOD_TITLES[name] for name in SLICER_METHODS]
    assert [m.name for m in Method] == ["OFL", "REVSAM2", "SAM2"]  # what saved scenes hold
    assert session.module.OFLSAM2SegmentParameterNode.method is Method(DEFAULT_METHOD)


def test_the_parameter_node_takes_the_method_defaults_from_method_options(session):
    defaults = MethodOptions()
    parameters = session.module.OFLSAM2SegmentParameterNode
    fields = {"gamma": "gamma", "numRetrieved": "num_retrieved", "epochs": "epochs", "topK": "top_k"}
    assert {name: getattr(parameters, name) for name in fields} == {name: getattr(defaults, option) for name, option in fields.items()}
    tree = ast.parse((MODULE_DIR / "OFLSAM2SegmentLib" / "module_logic.py").read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OFLSAM2SegmentParameterNode")
    typed = [item.target.id for item in node.body if isinstance(item, ast.AnnAssign) and item.target.id in fields
             and isinstance(item.value, ast.Constant)]
    assert not typed, f"defaults typed again instead of read from MethodOptions(): {typed}"


def test_the_ofl_preset_is_an_advanced_choice_of_the_module_and_the_effect(session, monkeypatch):
    from OFLSAM2SegmentLib.options import parse_options

    parameters = session.module.OFLSAM2SegmentParameterNode()
    assert parameters.oflPreset == "paper" and parameters.runOptions()["oflPreset"] == "paper"
    parameters.oflPreset = "extended"
    chosen = parse_options("ofl", parameters.runOptions()).options  # (the session loads its own copy of the classes)
    assert dataclasses.asdict(chosen) == dataclasses.asdict(MethodOptions.extended())
    ui = (MODULE_DIR / "Resources" / "UI" / "OFLSAM2Segment.ui").read_text(encoding="utf-8")
    assert "<string>oflPreset</string>" in ui  # the advanced section's combo box is bound to it
    monkeypatch.setattr(sys.modules["qt"], "QComboBox", mock.MagicMock(side_effect=lambda *args: mock.MagicMock()))
    (effect,) = session.registered_effects
    effect.setMRMLDefaults()
    effect.setupOptionsFrame()
    assert [call.args for call in effect.oflPresetComboBox.addItem.call_args_list] == [("paper", "paper"), ("extended", "extended")]
    assert effect.scriptedEffect.parameter("OFLPreset") == "paper"


def test_the_effect_offers_the_registry_methods(session, monkeypatch):
    monkeypatch.setattr(sys.modules["qt"], "QComboBox", mock.MagicMock(side_effect=lambda *args: mock.MagicMock()))
    (effect,) = session.registered_effects
    effect.setMRMLDefaults()
    effect.setupOptionsFrame()
    items = [call.args for call in effect.methodComboBox.addItem.call_args_list]
    assert items == [(METHOD_TITLES[name], name) for name in SLICER_METHODS]
    assert effect.scriptedEffect.parameter("Method") == DEFAULT_METHOD


def test_importing_slicer_beside_the_tests_imports_no_test_module():
    """slicer-core's ``slicer/__init__`` extends its ``__path__`` with every ``slicer/`` folder on
    ``sys.path`` and imports each module it finds there. These tests lived in ``Testing/slicer/``:
    with ``Testing/`` on ``sys.path`` (as pytest puts it), ``import slicer`` imported every test
    module, and a test file run on its own failed at collection with a circular import."""
    testing = Path(__file__).resolve().parents[1]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import slicer; "
        "print(sorted(m for m, v in list(sys.modules.items()) "
        "if getattr(v, '__file__', None) and v.__file__.startswith(sys.argv[1])))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(testing)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
