"""Imports run one way: no module of the engine ``oflsam2`` nor of the Slicer side (the module file
``OFLSAM2Segment``, ``OFLSAM2SegmentLib``, ``SegmentEditorOFLSAM2Lib``) imports itself again through
others, and no Slicer-side file loads torch, sam2 or safetensors when Slicer imports it.

Every ``import``/``from`` statement counts, also those inside functions: a function-local import
that closes a circle only moves the partly initialised module error from import time to run time.
An edge goes to the module a statement names; importing a package counts as importing its
``__init__``. The implicit import of a module's parent packages is not an edge (Python finishes
initialising a parent before any of its submodules runs).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "OFLSAM2Segment"
PACKAGE = "oflsam2"
PACKAGE_DIR = MODULE_DIR / PACKAGE
SLICER_PACKAGES = ("OFLSAM2SegmentLib", "SegmentEditorOFLSAM2Lib")
ENGINE_ONLY = {"torch", "sam2", "safetensors"}  # the worker process's, never Slicer's (README: the worker process)


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (``__init__`` = the package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve_from(module: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    """The module a ``from X import ...`` statement of ``module`` names, relative dots resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, modules):
        base.pop()  # a plain module's dots count from its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _statements(tree: ast.Module, module_level: bool):
    """Every node of ``tree``, or with ``module_level`` those Python runs when it imports the
    module: not the bodies of functions (class bodies, ``if`` and ``try`` blocks run)."""
    if not module_level:
        yield from ast.walk(tree)
        return
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            pending.extend(ast.iter_child_nodes(node))


def imported_names(module: str, modules: dict[str, Path], module_level: bool = False) -> set[str]:
    """Every module name that ``module``'s import statements name (relative dots resolved; for
    ``from X import name``: ``X.name`` where that is a module of ``modules``, else ``X``)."""
    tree = ast.parse(modules[module].read_text(encoding="utf-8"), filename=str(modules[module]))
    found = set()
    for node in _statements(tree, module_level):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node, modules)
            for alias in node.names:
                # ``from package import name``: the submodule ``name`` if there is one, else the package
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return found


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``module``'s import statements name, anywhere in its source."""
    return {name for name in imported_names(module, modules) if name in modules and name != module}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {module: imports_of(module, modules) for module in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None; depth-first, deterministic order."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_finds_a_cycle_in_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_resolves_relative_and_function_local_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "leaf.py").write_text("import os\n")
    (package / "sub" / "__init__.py").write_text("from .. import leaf\n")
    (package / "sub" / "inner.py").write_text("def late():\n    from ..top import thing\n")
    (package / "top.py").write_text("from .sub import inner\nimport pkg.leaf\nfrom . import sub\n")
    graph = import_graph(module_files(package))
    assert graph == {
        "pkg": set(),
        "pkg.leaf": set(),
        "pkg.sub": {"pkg.leaf"},
        "pkg.sub.inner": {"pkg.top"},
        "pkg.top": {"pkg.sub", "pkg.sub.inner", "pkg.leaf"},
    }
    assert find_cycle(graph) == ["pkg.sub.inner", "pkg.top", "pkg.sub.inner"]


def oflsam2_graph() -> dict[str, set[str]]:
    """The package's import graph, with the method registry's imports (``importlib``, by name)."""
    from oflsam2.methods import RUNNERS

    modules = module_files()
    graph = import_graph(modules)
    graph[f"{PACKAGE}.methods"] |= {f"{PACKAGE}.methods.{module}" for module, _ in RUNNERS.values()}
    return graph


def test_oflsam2_has_no_import_cycle():
    graph = oflsam2_graph()
    assert f"{PACKAGE}.api" in graph and f"{PACKAGE}.methods.base" in graph  # the walk found the package
    assert f"{PACKAGE}.settings" in graph[f"{PACKAGE}.api"]  # and read its imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_import_loads_no_torch():
    """``import oflsam2`` (and its public names but Engine's use) stays light: the Slicer module and
    ``oflsam2 --help`` import it before any model is wanted."""
    code = (
        "import sys, oflsam2\n"
        "from oflsam2 import Engine, LabelSupport, MethodOptions, ModelSettings, Reference, SegmentResult\n"
        "from oflsam2.settings import METHODS\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "assert Engine.__module__ == 'oflsam2.api', Engine\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---------------------------------------------------------------------------------------------
# The Slicer side


def slicer_side_files() -> dict[str, Path]:
    """The module file (Slicer loads it as the module ``OFLSAM2Segment``) and the Slicer-side packages."""
    modules = {"OFLSAM2Segment": MODULE_DIR / "OFLSAM2Segment.py"}
    for package in SLICER_PACKAGES:
        modules.update(module_files(MODULE_DIR / package))
    return modules


def test_the_slicer_side_has_no_import_cycle():
    """Before, the panel (``OFLSAM2SegmentLib.widget``) imported the logic back from the module file."""
    modules = slicer_side_files()
    graph = import_graph(modules)
    assert "OFLSAM2SegmentLib.widget" in graph["OFLSAM2Segment"]  # the walk read the module file's imports
    assert "OFLSAM2SegmentLib.logic" in graph["SegmentEditorOFLSAM2Lib.SegmentEditorEffect"]  # and function-local ones
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def loaded_on_import(start: str, modules: dict[str, Path]) -> dict[str, list[str]]:
    """Each top-level package outside ``modules`` that importing ``start`` loads, with the chain of
    module-level imports that leads to it (a module's parent packages are loaded first: followed too)."""
    chains = {start: [start]}
    outside: dict[str, list[str]] = {}
    pending = [start]
    while pending:
        module = pending.pop()
        for name in sorted(imported_names(module, modules, module_level=True)):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                target = ".".join(parts[:depth])
                if target in modules:
                    if target not in chains:
                        chains[target] = chains[module] + [target]
                        pending.append(target)
                elif depth == 1:
                    outside.setdefault(target, chains[module] + [name])
    return outside


def test_loading_finds_a_module_level_import_through_a_chain_and_skips_function_bodies(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "top.py").write_text("from . import middle\n\ndef late():\n    import lazy_heavy\n")
    (package / "middle.py").write_text("try:\n    import torch.nn\nexcept ImportError:\n    pass\n")
    loaded = loaded_on_import("pkg.top", module_files(package))
    assert loaded == {"torch": ["pkg.top", "pkg.middle", "torch.nn"]}


def test_importing_a_slicer_side_file_loads_no_torch_sam2_or_safetensors():
    """Slicer imports the module file, the Lib and the effect at start-up and on every run; the
    engine packages load only in the worker process (function-local imports are the runtime
    test's: slicer_side/test_slicer_never_imports_torch.py)."""
    modules = {**slicer_side_files(), **module_files()}
    found = {}
    for start in slicer_side_files():
        for package, chain in loaded_on_import(start, modules).items():
            if package in ENGINE_ONLY:
                found.setdefault(package, " -> ".join(chain))
    assert "numpy" in loaded_on_import("OFLSAM2SegmentLib.run_plan", modules)  # the walk reaches the packages
    assert not found, f"Slicer-side imports load engine-only packages: {found}"
