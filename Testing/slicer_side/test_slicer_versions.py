"""Slicer versions: 5.10 is the minimum (declared in the extension metadata); an older Slicer
(5.8: Python 3.9) still loads the module, which says which version it needs, instead of failing
at start-up. Every file Slicer's process loads stays loadable by Python 3.9 (``python39``):
before, ``OFLSAM2SegmentLib/worker.py`` evaluated ``dict | None`` at import and the module and
its effect failed to load on Slicer 5.8."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
from mrml_helpers import require_slicer
from python39 import problems

slicer = require_slicer()
pytestmark = pytest.mark.slicer

from loading_rules import OWN_MODULES, load_like_slicer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "OFLSAM2Segment"


def editor_scene():
    scene = slicer.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    return scene


def slicer_side_files() -> set[Path]:
    """The module file, its Lib, the effect and the self-tests, and every other file of the
    extension that Slicer's process imports when it loads the module and registers the effect."""
    files = {MODULE_DIR / "OFLSAM2Segment.py", *(MODULE_DIR / "OFLSAM2SegmentLib").glob("*.py"),
             *(MODULE_DIR / "SegmentEditorOFLSAM2Lib").glob("*.py"), *(MODULE_DIR / "Testing" / "Python").glob("*.py")}
    scene = editor_scene()
    with load_like_slicer(MODULE_DIR, scene):
        loaded = {Path(m.__file__) for n, m in sys.modules.items() if n.split(".")[0] in OWN_MODULES and getattr(m, "__file__", None)}
    scene.Clear(1)
    assert loaded, "the module loaded nothing"
    return files | {path for path in loaded if MODULE_DIR in path.parents}


def test_every_file_slicer_loads_is_loadable_by_python_3_9():
    files = {path.relative_to(REPO).as_posix(): path for path in slicer_side_files()}
    assert {"OFLSAM2Segment/oflsam2/settings.py", "OFLSAM2Segment/oflsam2/worker.py"} <= files.keys(), \
        "the engine modules the module imports at load are checked too"
    found = {name: problems(path.read_text(encoding="utf-8"), str(path)) for name, path in sorted(files.items())}
    found = {name: issues for name, issues in found.items() if issues}
    assert not found, found


@pytest.mark.parametrize("source", [
    "Factory = Callable[[dict | None], None]\n",  # main's worker.py before the fix
    "def f(x: int | None): pass\n",  # evaluated: no postponed annotations
    "class P:\n    value: list[str] | None = None\n",
    "from __future__ import annotations\nA = str | None\n",
    "ok = isinstance(x, int | float)\n",
    "match value:\n    case 1:\n        pass\n",
    "pairs = zip(a, b, strict=True)\n",
    "from dataclasses import dataclass\n@dataclass(slots=True)\nclass D:\n    x: int = 0\n",
    "from itertools import pairwise\n",
    "import typing\nA: typing.TypeAlias = int\n",
    "import tomllib\n",
    "raise ExceptionGroup('x', [])\n",
])
def test_the_python_3_9_check_finds_what_3_9_cannot_load(source):
    assert problems(source), source


@pytest.mark.parametrize("source", [
    "from __future__ import annotations\ndef f(x: int | None) -> dict | None: pass\n",
    "def f():\n    x: int | None = None\n",
    "FLAGS = A_FLAG | B_FLAG\nalign = qt.Qt.AlignLeft | qt.Qt.AlignTop\nmask = a | b\n",
    "from typing import Optional\nA = Optional[int]\nB = list[str]\n",
])
def test_what_python_3_9_loads_is_not_flagged(source):
    assert problems(source) == []


def test_the_minimum_slicer_version_is_declared_in_the_extension_metadata():
    from OFLSAM2SegmentLib.compatibility import MINIMUM_SLICER_VERSION

    cmake = "\n".join(line.split("#", 1)[0] for line in (REPO / "CMakeLists.txt").read_text(encoding="utf-8").splitlines())
    declared = re.search(r'set\(EXTENSION_MINIMUM_SLICER_VERSION\s+"([\d.]+)"\)', cmake)
    assert declared and tuple(int(n) for n in declared.group(1).split(".")) == MINIMUM_SLICER_VERSION == (5, 10)
    # SlicerConfigVersion.cmake refuses to configure against an older Slicer
    assert re.search(r"find_package\(Slicer \$\{EXTENSION_MINIMUM_SLICER_VERSION\} REQUIRED\)", cmake)
    assert "5.10" in (REPO / "OFLSAM2.s4ext").read_text(encoding="utf-8")


def test_an_older_slicer_loads_the_module_which_says_which_version_it_needs():
    scene = editor_scene()
    with load_like_slicer(MODULE_DIR, scene, version=(5, 8)) as session:
        from OFLSAM2SegmentLib.compatibility import unsupported_slicer_reason

        reason = unsupported_slicer_reason(session.app, (3, 9))
        assert "needs 3D Slicer 5.10 or later" in reason and "Slicer 5.8" in reason
        assert session.instance.parent.helpText.startswith("OFLSAM2 needs 3D Slicer 5.10 or later; this is Slicer 5.8")
        assert session.registered_effects == [] and "startupCompleted()" not in session.app.connections

        widget = session.module.OFLSAM2SegmentWidget(mock.MagicMock(name="parent"))
        qt = sys.modules["qt"]
        with mock.patch.object(slicer.util, "loadUI", side_effect=AssertionError("the panel needs Slicer 5.10"), create=True):
            widget.setup()
            widget.enter()
        assert any("needs 3D Slicer 5.10" in str(call.args[0]) for call in qt.QLabel.call_args_list if call.args)

        logic = session.module.OFLSAM2SegmentLogic()
        with pytest.raises(Exception, match=r"needs 3D Slicer 5\.10 or later; this is Slicer 5\.8"):
            logic.process(None, None, ["Segment_1"])
    scene.Clear(1)


def test_slicer_5_10_gets_the_module_and_its_effect():
    scene = editor_scene()
    with load_like_slicer(MODULE_DIR, scene, version=(5, 10)) as session:
        from OFLSAM2SegmentLib.compatibility import unsupported_slicer_reason

        assert unsupported_slicer_reason(session.app) is None
        assert len(session.registered_effects) == 1
        assert "needs 3D Slicer" not in session.instance.parent.helpText
    scene.Clear(1)


# The module file imported by a real Python 3.9, with Slicer's Python API stubbed (slicer-core
# has no build for 3.9): the import chain and the guard as Slicer 5.8 would run them.
PYTHON39_LOADER = textwrap.dedent("""\
    import importlib.util, sys, types
    from unittest import mock
    module_dir = sys.argv[1]
    app = mock.MagicMock(name="slicer.app", majorVersion=5, minorVersion=8)
    slicer = types.ModuleType("slicer")
    slicer.app, slicer.util = app, mock.MagicMock(name="slicer.util")
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.vtkMRMLSegmentationNode = type("vtkMRMLSegmentationNode", (), {})
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = i18n.translate = lambda *text: text[-1]
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *a: a
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleLogic = scripted.ScriptedLoadableModuleWidget = type("Base", (), {})
    scripted.ScriptedLoadableModuleTest = __import__("unittest").TestCase
    for name, module in (("slicer", slicer), ("slicer.i18n", i18n), ("slicer.parameterNodeWrapper", wrapper),
                         ("slicer.ScriptedLoadableModule", scripted)):
        sys.modules[name] = module
        if "." in name:
            setattr(slicer, name.split(".")[1], module)
    slicer.util.VTKObservationMixin = type("VTKObservationMixin", (), {})
    sys.modules["slicer.util"] = slicer.util
    for name in ("qt", "ctk", "vtk", "vtk.util", "vtk.util.numpy_support"):
        sys.modules[name] = mock.MagicMock(name=name)
    sys.path.append(module_dir)
    spec = importlib.util.spec_from_file_location("OFLSAM2Segment", module_dir + "/OFLSAM2Segment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["OFLSAM2Segment"] = module
    spec.loader.exec_module(module)
    parent = mock.MagicMock(name="parent")
    module.OFLSAM2Segment(parent)
    print(parent.helpText.splitlines()[0])
""")


def python39() -> str | None:
    """A Python 3.9 with numpy and SimpleITK (``OFLSAM2_PYTHON39``, else ``python3.9`` on PATH)."""
    candidate = os.environ.get("OFLSAM2_PYTHON39") or shutil.which("python3.9")
    if candidate is None:
        return None
    probe = subprocess.run([candidate, "-c", "import sys, numpy, SimpleITK; assert sys.version_info[:2] == (3, 9)"],
                           capture_output=True)
    return candidate if probe.returncode == 0 else None


@pytest.mark.skipif(python39() is None, reason="needs a Python 3.9 with numpy and SimpleITK (OFLSAM2_PYTHON39)")
def test_a_real_python_3_9_loads_the_module_and_gets_the_version_message():
    done = subprocess.run([python39(), "-c", PYTHON39_LOADER, str(MODULE_DIR)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OFLSAM2 needs 3D Slicer 5.10 or later; this is Slicer 5.8 (Python 3.9)"), done.stdout
