"""Installing torch, sam2 and the engine's other packages inside Slicer.

Main thread only, on first use (never at import time, never from the worker), after asking.
Order matters: torch through the PyTorch extension first (so pip never pulls a CPU wheel from
PyPI), then ``sam2`` built against that torch, then the rest from ``Resources/requirements.txt``.
Nothing is installed while Slicer runs its tests (``--testing``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
from pathlib import Path

from oflsam2.errors import OFLSAM2Error

log = logging.getLogger(__name__)

REQUIREMENTS_PATH = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.5.1"
TORCH_FLOOR = (2, 5, 1)
SKIP_PACKAGES = ["torch", "torchvision", "SimpleITK"]  # provided by PyTorchUtils and by Slicer itself
SAM2_PIP_ARGS = ["--no-deps", "--no-build-isolation"]
# distribution name -> module it provides (to notice a missing package without pip)
IMPORT_NAMES = {"sam2": "sam2", "hydra-core": "hydra", "iopath": "iopath", "tqdm": "tqdm",
                "safetensors": "safetensors", "scipy": "scipy", "pillow": "PIL"}


class InstallError(OFLSAM2Error):
    """A package could not be installed, or the user declined the installation."""


def read_requirements(path: Path = REQUIREMENTS_PATH) -> list[str]:
    """The requirement lines of ``requirements.txt`` (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[\s]", requirement, maxsplit=1)[0].strip()


def missing_requirements(requirements: list[str]) -> list[str]:
    """Requirements whose module cannot be imported (a quick check that needs no pip)."""
    missing = []
    for requirement in requirements:
        module = IMPORT_NAMES.get(requirement_name(requirement).lower(), requirement_name(requirement))
        if importlib.util.find_spec(module) is None:
            missing.append(requirement)
    return missing


def ensure_dependencies(requirements_path: Path = REQUIREMENTS_PATH) -> None:
    """Make sure torch, sam2 and the rest are installed, asking the user first.

    Raises :class:`InstallError` when no PyTorch for SAM2 exists for this Slicer (macOS x86_64),
    the PyTorch extension is missing, torch is too old, or the user declines.
    """
    import slicer

    from .device import no_local_pytorch_reason

    impossible = no_local_pytorch_reason()  # before any install: pip would only fail after a long download
    if impossible:
        raise InstallError(impossible)
    if slicer.app.testingEnabled():
        log.info("OFLSAM2: testing mode, no package is installed")
        return
    ensure_torch()
    requirements = read_requirements(requirements_path)
    sam2 = [r for r in requirements if requirement_name(r).lower() == "sam2"]
    rest = [r for r in requirements if requirement_name(r).lower() != "sam2"]
    missing = missing_requirements(sam2) + _unsatisfied(rest)
    if not missing:
        return
    question = (
        "OFLSAM2 needs these Python packages in Slicer's Python environment:\n\n"
        + "\n".join(f"- {r}" for r in missing)
        + "\n\nInstall them now? This takes a few minutes; Slicer may not respond meanwhile."
    )
    if not slicer.util.confirmOkCancelDisplay(question, "OFLSAM2: install Python packages"):
        raise InstallError("Installation of the Python packages was declined; OFLSAM2 cannot run without them.")
    for requirement in missing_requirements(sam2):
        install_sam2(requirement)
    rest_missing = [r for r in missing if r in rest]
    if rest_missing:
        _install_rest(rest_missing)


def ensure_torch() -> None:
    """torch >= 2.5.1, installed by the PyTorch extension for this machine's CUDA or CPU."""
    import slicer

    version = _installed_version("torch")
    if version is not None:
        if _version_tuple(version) < TORCH_FLOOR:
            raise InstallError(
                f"PyTorch {version} is installed, but SAM2 needs {TORCH_REQUIREMENT}. Open the 'PyTorch Utils' "
                "module, uninstall PyTorch, restart Slicer, and run OFLSAM2 again to install a current version."
            )
        return
    try:
        import PyTorchUtils
    except ImportError:
        raise InstallError(
            "The PyTorch extension is not installed. Install 'PyTorch' from the Extensions Manager "
            "(View > Extensions Manager), restart Slicer, and run OFLSAM2 again."
        ) from None
    slicer.util.showStatusMessage("OFLSAM2: installing PyTorch (a large download; Slicer may not respond for minutes)...")
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise InstallError("PyTorch was not installed (declined or failed); OFLSAM2 cannot run without it.")


def install_sam2(requirement: str) -> None:
    """Build ``sam2`` against the installed torch: no isolated build env (it would download a
    second torch), no dependencies (torchvision and torch come from PyTorchUtils), no CUDA
    extension (Slicer has no compiler toolchain; the extension only fills small holes)."""
    import slicer

    os.environ["SAM2_BUILD_CUDA"] = "0"
    slicer.util.pip_install([*SAM2_PIP_ARGS, requirement])  # a list: each item is one argument


def slicer_packaging():
    """``slicer.packaging`` (Slicer >= 5.12), or None on older Slicer.

    It is a submodule that ``slicer/__init__`` does not import, so ``slicer.packaging`` is
    absent until something imports it: ``getattr(slicer, "packaging")`` alone would miss it.
    """
    try:
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:
        return None
    return packaging if hasattr(packaging, "pip_ensure") and hasattr(packaging, "pip_check") else None


def _install_rest(requirements: list[str]) -> None:
    import slicer

    packaging = slicer_packaging()
    if packaging is not None:  # Slicer >= 5.12
        packaging.pip_ensure(requirements, skip_packages=SKIP_PACKAGES, prompt_install=False, requester="OFLSAM2")
    else:  # Slicer 5.8 / 5.10: pip installs a version inside each requirement's floor and ceiling
        slicer.util.pip_install(list(requirements))


def _unsatisfied(requirements: list[str]) -> list[str]:
    """Requirements not met by what is installed, versions included."""
    packaging = slicer_packaging()
    if packaging is not None:
        return [r for r in requirements if not packaging.pip_check(r)]
    return [r for r in requirements if not _satisfied_without_pip(r)]


def _satisfied_without_pip(requirement: str) -> bool:
    """Slicer < 5.12: the requirement's module imports and its installed version lies within the
    requirement's floor and ceiling (a requirement whose environment marker does not apply is met)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always ships it
        from pip._vendor.packaging.requirements import Requirement

    parsed = Requirement(requirement)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return True
    if missing_requirements([requirement]):
        return False
    try:
        version = importlib.metadata.version(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return not parsed.specifier  # importable but not installed by pip: only a bare name is met
    return parsed.specifier.contains(version, prereleases=True)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", version.split("+", 1)[0])[:3]
    return tuple(int(n) for n in numbers)
