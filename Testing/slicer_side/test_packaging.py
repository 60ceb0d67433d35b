"""Extension packaging: every shipped file is listed in CMake, the .ui matches the code, the
extension metadata agree with each other. (Slicer's build cannot run here; these are the
checks that catch a file missing from the installed extension.)"""

from __future__ import annotations

import ast
import fnmatch
import json
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "OFLSAM2Segment"
SHIPPED_SUFFIXES = (".py", ".ui", ".json", ".png")
UI_WIDGETS = {
    "inputVolumeSelector", "segmentationSelector", "segmentsTableView", "supportLabel", "referenceVolumeSelector",
    "referenceSegmentationSelector", "addReferenceButton", "removeReferenceButton", "referencesListWidget",
    "methodComboBox", "modelComboBox", "checkpointPathLineEdit", "deviceComboBox", "deviceInfoLabel",
    "imageSizeSpinBox", "presetComboBox", "axisComboBox", "gammaSpinBox", "numRetrievedSpinBox", "epochsSpinBox",
    "topKSpinBox", "saveAdapterPathLineEdit", "useAdapterPathLineEdit", "randomWeightsCheckBox",
    "advancedCollapsibleButton", "applyButton", "progressBar", "statusLabel", "undoButton",
}


def cmake_text(path: Path) -> str:
    """CMake source without comments."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())


def module_cmake_entries():
    """(explicit file paths, glob patterns) of the module's CMakeLists.txt."""
    text = cmake_text(MODULE / "CMakeLists.txt")
    name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    text = text.replace("${MODULE_NAME}", name)
    listed = set()
    for block in re.findall(r"set\((?:MODULE_PYTHON_SCRIPTS|MODULE_PYTHON_RESOURCES)\s+(.*?)\)", text, re.S):
        listed.update(token for token in block.split() if not token.startswith("$"))
    pattern = r"file\(GLOB_RECURSE\s+\w+.*?(\$\{CMAKE_CURRENT_SOURCE_DIR\}/\S+)\)"
    globs = [g.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "") for g in re.findall(pattern, text, re.S)]
    return listed, globs


def shipped_files():
    for path in MODULE.rglob("*"):
        relative = path.relative_to(MODULE).as_posix()
        if not path.is_file() or "__pycache__" in relative or relative.startswith("Testing/"):
            continue
        if path.suffix in SHIPPED_SUFFIXES or path.name == "requirements.txt":
            yield relative


def glob_matches(relative: str, pattern: str) -> bool:
    """CMake GLOB_RECURSE ``dir/*.py``: any depth below ``dir``."""
    folder, _, leaf = pattern.rpartition("/")
    return relative.startswith(folder + "/") and fnmatch.fnmatch(relative.rpartition("/")[2], leaf)


def test_every_shipped_file_is_listed_or_globbed_in_cmake():
    listed, globs = module_cmake_entries()
    assert globs == ["oflsam2/*.py", "oflsam2/*.json"]
    missing = [f for f in shipped_files() if f not in listed and not any(glob_matches(f, g) for g in globs)]
    assert not missing, f"not in OFLSAM2Segment/CMakeLists.txt: {missing}"
    stale = [f for f in listed if not (MODULE / f).is_file()]
    assert not stale, f"listed in CMake but absent: {stale}"
    own = {f for f in shipped_files() if not f.startswith("oflsam2/")}
    assert own <= listed, "the Slicer-side files must be listed explicitly, not globbed"
    assert any(f == "oflsam2/models.json" for f in shipped_files())


def test_module_cmake_registers_the_tests_with_known_keywords_only():
    text = cmake_text(MODULE / "CMakeLists.txt")
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    keywords = {t for t in call.split() if re.fullmatch(r"[A-Z_]+", t)}
    assert keywords <= {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"}
    assert "WITH_GENERIC_TESTS" in keywords
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    testing = cmake_text(MODULE / "Testing" / "Python" / "CMakeLists.txt")
    direct = re.findall(r"slicer_add_python_unittest\(\s*SCRIPT\s+(\S+?)\s*\)", testing)
    for script in direct:
        assert (MODULE / "Testing" / "Python" / script).is_file(), script
    # A module file registered in the module's CMakeLists.txt runs the test files it loads.
    name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    module_scripts = re.findall(r"slicer_add_python_unittest\(\s*SCRIPT\s+(\S+?)\s*\)", text.replace("${MODULE_NAME}", name))
    through_module = [loaded for script in module_scripts for loaded in self_test_files_of(MODULE / script)]
    assert "OFLSAM2SegmentTest.py" in through_module
    for script in (MODULE / "Testing" / "Python").glob("*.py"):
        registrations = direct.count(script.name) + through_module.count(script.name)
        assert registrations == 1, f"{script.name} is registered as a test {registrations} times; register it once"


def self_test_files_of(module_file: Path) -> list[str]:
    """The files of Testing/Python that ``module_file`` names (and so loads, e.g. its self-test)."""
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.endswith(".py") and (MODULE / "Testing" / "Python" / node.value).is_file()]


def parameter_fields() -> set[str]:
    tree = ast.parse((MODULE / "OFLSAM2SegmentLib" / "module_logic.py").read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OFLSAM2SegmentParameterNode")
    return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}


def test_ui_parses_and_binds_existing_parameters():
    root = ET.parse(MODULE / "Resources" / "UI" / "OFLSAM2Segment.ui").getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    assert widgets["OFLSAM2Segment"].get("class") == "qMRMLWidget"
    assert UI_WIDGETS <= widgets.keys(), f"missing widgets: {UI_WIDGETS - widgets.keys()}"
    bound = {}
    for name, widget in widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert set(bound.values()) <= parameter_fields(), set(bound.values()) - parameter_fields()
    assert bound["inputVolumeSelector"] == "inputVolume" and bound["methodComboBox"] == "method"
    # every MRML widget gets the scene from the top-level widget
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {n for n, w in widgets.items() if w.get("class", "").startswith("qMRML") and n != "OFLSAM2Segment"}
    assert mrml == receivers


def test_module_and_effect_compile_and_have_the_template_shape():
    effect_path = MODULE / "SegmentEditorOFLSAM2Lib" / "SegmentEditorEffect.py"
    for path in [MODULE / "OFLSAM2Segment.py", effect_path, *(MODULE / "OFLSAM2SegmentLib").glob("*.py"),
                 *(MODULE / "Testing" / "Python").glob("*.py")]:
        py_compile.compile(str(path), doraise=True)
    # The module file defines the module class and imports the logic, the widget and the self-test
    # (test_slicer_loading checks that Slicer finds them on the module).
    classes = {}
    for path in (MODULE / "OFLSAM2Segment.py", MODULE / "OFLSAM2SegmentLib" / "module_logic.py", MODULE / "OFLSAM2SegmentLib" / "widget.py",
                 MODULE / "Testing" / "Python" / "OFLSAM2SegmentTest.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        classes.update({n.name: [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in n.bases]
                        for n in tree.body if isinstance(n, ast.ClassDef)})
    assert "ScriptedLoadableModule" in classes["OFLSAM2Segment"]
    assert "ScriptedLoadableModuleWidget" in classes["OFLSAM2SegmentWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["OFLSAM2SegmentLogic"]
    assert "ScriptedLoadableModuleTest" in classes["OFLSAM2SegmentTest"]
    source = (MODULE / "OFLSAM2Segment.py").read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", self.registerEditorEffect)' in source
    effect = effect_path.read_text(encoding="utf-8")
    assert 'scriptedEffect.name = "OFL-SAM2"' in effect and "saveStateForUndo" in effect
    # Slicer loads the effect as a module named after its folder: a folder of its own, never
    # the module's Lib package, re-exported by the folder's __init__ (test_slicer_loading.py
    # runs the real loading rules).
    assert not (MODULE / "OFLSAM2SegmentLib" / "SegmentEditorEffect.py").exists()
    assert '"SegmentEditorOFLSAM2Lib", "SegmentEditorEffect.py"' in source
    assert "from .SegmentEditorEffect import *" in (effect_path.parent / "__init__.py").read_text(encoding="utf-8")
    assert "from ." not in effect.replace("from .SegmentEditorEffect", "")  # no relative import in a non-package


def s4ext_fields() -> dict[str, str]:
    fields = {}
    for line in (REPO / "OFLSAM2.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def extension_cmake() -> dict[str, str]:
    return dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', cmake_text(REPO / "CMakeLists.txt")))


def test_extension_metadata_agree():
    cmake = extension_cmake()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert cmake.get(f"EXTENSION_{key}"), f"EXTENSION_{key} is not set"
    assert cmake["EXTENSION_CATEGORY"] == "Segmentation" and cmake["EXTENSION_DEPENDS"] == "PyTorch"
    assert "add_subdirectory(OFLSAM2Segment)" in cmake_text(REPO / "CMakeLists.txt")

    s4ext = s4ext_fields()
    expected = {"scm", "scmurl", "scmrevision", "depends", "recommends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "tier", "description", "screenshoturls", "enabled", "dicom_support_rule", "keywords"}
    assert expected <= s4ext.keys(), expected - s4ext.keys()
    assert s4ext["homepage"] == cmake["EXTENSION_HOMEPAGE"] and s4ext["category"] == cmake["EXTENSION_CATEGORY"]
    assert s4ext["depends"] == cmake["EXTENSION_DEPENDS"] and s4ext["iconurl"] == cmake["EXTENSION_ICONURL"]
    assert s4ext["description"] == cmake["EXTENSION_DESCRIPTION"]

    catalog = json.loads((REPO / "OFLSAM2.json").read_text(encoding="utf-8"))
    assert catalog["scm_url"] == s4ext["scmurl"] and catalog["category"] == s4ext["category"]
    assert catalog["build_dependencies"] == [cmake["EXTENSION_DEPENDS"]] and catalog["tier"] == int(s4ext["tier"])


# The ExtensionsIndex catalog entry schema v1.0.1 (Slicer/Slicer Schemas/): field -> accepted
# type, no other field allowed; $schema, category and scm_url required; tier one of 1, 3, 5.
CATALOG_FIELDS = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                  "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}


def test_extension_index_entry_follows_schema_1_0_1():
    catalog = json.loads((REPO / "OFLSAM2.json").read_text(encoding="utf-8"))
    assert catalog["$schema"] == (
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert {"$schema", "category", "scm_url"} <= catalog.keys() <= CATALOG_FIELDS.keys(), catalog.keys() - CATALOG_FIELDS.keys()
    for field, kind in CATALOG_FIELDS.items():
        if field in catalog:
            assert isinstance(catalog[field], kind) and not (kind is int and isinstance(catalog[field], bool)), field
    assert catalog["tier"] in (1, 3, 5) and catalog["scm_type"] in ("git", "local")
    assert all(isinstance(d, str) for d in catalog["build_dependencies"])


def test_license_is_apache_2_at_the_root_and_packaged():
    """The Extensions Index's check_description_files.py requires a LICENSE at the repository
    root; the package metadata says Apache-2.0; the extension package ships this file."""
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    sections = re.findall(r"^   (\d)\. ([A-Z][^.]+)\.", text, flags=re.MULTILINE)
    assert [int(n) for n, _ in sections] == list(range(1, 10)), sections
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"set\(EXTENSION_LICENSE_FILE \$\{CMAKE_CURRENT_SOURCE_DIR\}/LICENSE\)", cmake_text(REPO / "CMakeLists.txt"))


@pytest.mark.parametrize("relative,size", [("Resources/OFLSAM2.png", (128, 128)),
                                           ("OFLSAM2Segment/Resources/Icons/OFLSAM2Segment.png", (128, 128))])
def test_icons_are_real_pngs_of_the_expected_size(relative, size):
    from PIL import Image

    with Image.open(REPO / relative) as image:
        assert image.format == "PNG" and image.size == size
    for url_key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        shipped = extension_cmake()[url_key].rsplit("/main/", 1)[1]
        assert (REPO / shipped).is_file(), shipped
