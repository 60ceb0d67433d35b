"""Installs inside Slicer: order (torch via PyTorchUtils, then sam2, then the rest), flags,
pins, refusals. The Slicer application cannot run here, so ``slicer`` and ``PyTorchUtils``
are stand-ins that record the calls; the requirement parsing is real."""

from __future__ import annotations

import os
import sys
import types

import pytest

from OFLSAM2SegmentLib import install
from OFLSAM2SegmentLib.install import InstallError


class FakeSlicer:
    """Records what the installer asks of Slicer, in order."""

    def __init__(self, testing=False, confirm=True, with_packaging=True, unsatisfied=("scipy",)):
        self.calls = []
        self.app = types.SimpleNamespace(testingEnabled=lambda: testing)
        self.util = types.SimpleNamespace(
            confirmOkCancelDisplay=lambda text, title="": self.calls.append(("confirm", text)) or confirm,
            pip_install=lambda args: self.calls.append(("pip_install", list(args), os.environ.get("SAM2_BUILD_CUDA"))),
            showStatusMessage=lambda text, *a: None,
        )
        # Slicer >= 5.12 has the submodule slicer.packaging, which slicer/__init__ does not
        # import: it is not an attribute of ``slicer`` until imported (the fixture registers it).
        self.packaging_module = types.SimpleNamespace(
            pip_check=lambda requirement: install.requirement_name(requirement) not in unsatisfied,
            pip_ensure=lambda requirements, **kw: self.calls.append(("pip_ensure", list(requirements), kw)),
        ) if with_packaging else None


class FakePyTorchUtils:
    def __init__(self, calls, installs=True):
        outer = self

        class PyTorchUtilsLogic:
            def installTorch(self, **kwargs):
                calls.append(("installTorch", kwargs))
                return types.SimpleNamespace(__version__="2.6.0") if outer.installs else None

        self.installs = installs
        self.PyTorchUtilsLogic = PyTorchUtilsLogic


@pytest.fixture
def environment(monkeypatch):
    """Torch and sam2 absent, everything else importable."""
    monkeypatch.delenv("SAM2_BUILD_CUDA", raising=False)
    monkeypatch.setattr(install, "_installed_version", lambda name: None)
    real_find_spec = install.importlib.util.find_spec
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: None if name == "sam2" else real_find_spec(name))

    def use(fake_slicer, pytorch_utils="default"):
        monkeypatch.setitem(sys.modules, "slicer", fake_slicer)
        if fake_slicer.packaging_module is not None:
            monkeypatch.setitem(sys.modules, "slicer.packaging", fake_slicer.packaging_module)
        else:
            monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
        module = FakePyTorchUtils(fake_slicer.calls) if pytorch_utils == "default" else pytorch_utils
        monkeypatch.setitem(sys.modules, "PyTorchUtils", module)  # None: "not installed"
        return fake_slicer

    return use


def test_torch_first_then_sam2_without_deps_then_the_rest(environment):
    slicer = environment(FakeSlicer())

    install.ensure_dependencies()

    kinds = [c[0] for c in slicer.calls]
    assert kinds == ["installTorch", "confirm", "pip_install", "pip_ensure"]
    assert slicer.calls[0][1] == {"askConfirmation": True, "torchVersionRequirement": ">=2.5.1"}
    assert "sam2>=1.1.0,<1.2" in slicer.calls[1][1] and "scipy" in slicer.calls[1][1]
    _, args, build_cuda = slicer.calls[2]
    assert args == ["--no-deps", "--no-build-isolation", "sam2>=1.1.0,<1.2"] and build_cuda == "0"
    _, requirements, options = slicer.calls[3]
    assert requirements == ["scipy>=1.10,<2"]  # only what is missing, never sam2 again
    assert options["skip_packages"] == ["torch", "torchvision", "SimpleITK"] and options["prompt_install"] is False


def test_nothing_is_installed_in_testing_mode(environment):
    slicer = environment(FakeSlicer(testing=True))
    install.ensure_dependencies()
    assert slicer.calls == []


def test_missing_pytorch_extension_is_a_clear_error(environment):
    slicer = environment(FakeSlicer(), pytorch_utils=None)
    with pytest.raises(InstallError, match="Extensions Manager"):
        install.ensure_dependencies()
    assert slicer.calls == []


def test_declined_torch_or_packages_install_nothing_more(environment):
    slicer = environment(FakeSlicer())
    sys.modules["PyTorchUtils"].installs = False
    with pytest.raises(InstallError, match="PyTorch was not installed"):
        install.ensure_dependencies()
    assert [c[0] for c in slicer.calls] == ["installTorch"]

    slicer = environment(FakeSlicer(confirm=False))
    with pytest.raises(InstallError, match="declined"):
        install.ensure_dependencies()
    assert [c[0] for c in slicer.calls] == ["installTorch", "confirm"]


def test_old_torch_is_refused(environment, monkeypatch):
    slicer = environment(FakeSlicer())
    monkeypatch.setattr(install, "_installed_version", lambda name: "2.4.1+cu121")
    with pytest.raises(InstallError, match=r"2\.4\.1.*>=2\.5\.1"):
        install.ensure_dependencies()
    assert slicer.calls == []


def test_slicer_5_10_falls_back_to_pip_install(environment, monkeypatch):
    slicer = environment(FakeSlicer(with_packaging=False))
    real_find_spec = install.importlib.util.find_spec
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: None if name in ("sam2", "scipy") else real_find_spec(name))
    install.ensure_dependencies()
    assert [c[0] for c in slicer.calls] == ["installTorch", "confirm", "pip_install", "pip_install"]
    assert slicer.calls[3][1] == ["scipy>=1.10,<2"]


def test_requirements_have_floor_and_ceiling_and_leave_slicer_packages_alone():
    requirements = install.read_requirements()
    names = [install.requirement_name(r).lower() for r in requirements]
    assert "sam2" in names
    assert not {"torch", "torchvision", "simpleitk", "numpy"} & set(names)
    for requirement in requirements:
        assert "==" not in requirement, requirement
        assert ">=" in requirement and "<" in requirement.replace("<=", ""), f"{requirement} needs a floor and a ceiling"


def test_slicer_packaging_is_imported_as_a_submodule(environment):
    """On 5.12 ``slicer.packaging`` is not an attribute of ``slicer`` until imported."""
    slicer = environment(FakeSlicer())
    assert not hasattr(slicer, "packaging")
    assert install.slicer_packaging() is sys.modules["slicer.packaging"]
    install.ensure_dependencies()
    assert [c[0] for c in slicer.calls][-1] == "pip_ensure"


def test_without_slicer_packaging_versions_outside_the_pins_are_installed(environment):
    """Slicer 5.8/5.10: an installed package whose version is below the floor or above the
    ceiling counts as unsatisfied, like pip_check would say on 5.12."""
    import importlib.metadata

    environment(FakeSlicer(with_packaging=False))
    numpy_version = importlib.metadata.version("numpy")
    major = int(numpy_version.split(".")[0])
    requirements = [f"numpy>={major + 1}", f"numpy<{major}", f"numpy>={major},<{major + 1}", "not-a-real-package-xyz>=1"]
    assert install._unsatisfied(requirements) == [requirements[0], requirements[1], requirements[3]]
    assert install._unsatisfied(['numpy>=1; python_version < "3"']) == []  # marker does not apply


@pytest.mark.parametrize("translated,where", [(True, "Slicer runs here as an Intel (x86_64) program under Rosetta 2"),
                                              (False, "this is an Intel (x86_64) Mac")])
def test_macos_x86_64_is_refused_before_any_install_with_what_to_do(environment, monkeypatch, translated, where):
    """Slicer's macOS package runs as x86_64 (Rosetta 2 on Apple silicon): no PyTorch >= 2.5.1
    exists there. One message says so and what to do; nothing is asked or installed (before:
    PyTorch and sam2 installs were attempted and failed with a pip error)."""
    from OFLSAM2SegmentLib import device

    fake = environment(FakeSlicer())
    monkeypatch.setattr(device.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(device, "runs_under_rosetta", lambda: translated)
    with pytest.raises(InstallError) as raised:
        install.ensure_dependencies()
    text = str(raised.value)
    assert text.startswith(f"OFLSAM2 cannot compute on this Mac: {where}, and PyTorch publishes no builds")
    assert "2.5.1" in text and "Compute on an OFLSAM2 server" in text and 'README section "Compute on a server"' in text
    assert "Traceback" not in text and fake.calls == []  # nothing asked, nothing installed
    assert device.available_devices() == ["cpu"]  # and no MPS on offer


def test_other_platforms_are_not_refused(monkeypatch):
    from OFLSAM2SegmentLib import device

    for system, machine in (("Linux", "x86_64"), ("Windows", "AMD64"), ("Darwin", "arm64")):
        monkeypatch.setattr(device.platform, "system", lambda system=system: system)
        monkeypatch.setattr(device.platform, "machine", lambda machine=machine: machine)
        assert device.no_local_pytorch_reason() is None, (system, machine)


@pytest.mark.parametrize("output,translated", [("1\n", True), ("0\n", False), ("", False)])
def test_rosetta_is_read_from_sysctl(monkeypatch, tmp_path, output, translated):
    """``sysctl -in sysctl.proc_translated``: 1 under Rosetta 2, 0 native, nothing on an Intel Mac."""
    from OFLSAM2SegmentLib import device

    sysctl = tmp_path / "sysctl"
    sysctl.write_text(f"#!/bin/sh\nprintf '{output}'\n")
    sysctl.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert device.runs_under_rosetta() is translated


@pytest.mark.parametrize("machine,release,mps", [("arm64", "14.5", True), ("arm64", "12.3", True),
                                                 ("arm64", "12.2.1", False), ("x86_64", "14.5", False)])
def test_mps_is_offered_only_where_torch_has_it(monkeypatch, machine, release, mps):
    from OFLSAM2SegmentLib import device

    monkeypatch.setattr(device.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(device.platform, "machine", lambda: machine)
    monkeypatch.setattr(device.platform, "mac_ver", lambda: (release, ("", "", ""), machine))
    assert device.has_apple_gpu() is mps
