"""The engine's imports run one way: no module of ``oflsam2`` imports itself again through others.

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
PACKAGE = "oflsam2"
PACKAGE_DIR = REPO / "OFLSAM2Segment" / PACKAGE


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


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module``'s import statements name, anywhere in its source."""
    tree = ast.parse(modules[module].read_text(encoding="utf-8"), filename=str(modules[module]))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node, modules)
            for alias in node.names:
                # ``from package import name``: the submodule ``name`` if there is one, else the package
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return {name for name in found if name in modules and name != module}


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
