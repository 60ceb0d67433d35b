"""Which compute devices this machine offers, probed without importing torch.

Importing torch takes seconds (and fails before it is installed), so the module's GUI asks the
operating system instead; the worker's torch confirms the choice when a run starts (``auto``
takes what it finds there, an unavailable device is refused with a message).

Slicer's macOS package is an x86_64 program (under Rosetta 2 on Apple silicon), and PyTorch
publishes no macOS x86_64 builds after 2.2.2 while SAM2 needs 2.5.1: such a Slicer cannot
compute locally at all (:func:`no_local_pytorch_reason`), and offers no MPS.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess

LOW_VRAM_BYTES = 7_000_000_000  # below this SAM2 + training at 1024 px often runs out of memory
MPS_MINIMUM_MACOS = (12, 3)  # PyTorch's MPS backend
NO_LOCAL_PYTORCH = (
    "OFLSAM2 cannot compute on this Mac: {where}, and PyTorch publishes no builds for Intel (x86_64) macOS of the "
    "version SAM2 needs (2.5.1 or later; the last one is 2.2.2). Nothing was installed. Compute on an OFLSAM2 server "
    "instead (the engine on a Linux or Windows computer, ideally with an NVIDIA GPU), and choose that server under "
    "\"Compute on\" in the module: see the README section \"Compute on a server\"."
)


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver with at least one GPU: ``/proc/driver/nvidia/gpus`` (Linux), a
    ``/dev/nvidia<N>`` device node, or ``nvidia-smi`` on PATH (Windows, and Linux containers)."""
    gpus = "/proc/driver/nvidia/gpus"
    if os.path.isdir(gpus) and os.listdir(gpus):
        return True
    if glob.glob("/dev/nvidia[0-9]*"):
        return True
    return shutil.which("nvidia-smi") is not None


def has_apple_gpu() -> bool:
    """Apple silicon with a macOS that PyTorch's MPS backend supports, seen by a native arm64
    Python (an x86_64 Python under Rosetta 2 reports ``x86_64``: its torch has no MPS)."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return False
    release = tuple(int(n) for n in platform.mac_ver()[0].split(".")[:2] if n.isdigit())
    return release >= MPS_MINIMUM_MACOS


def runs_under_rosetta() -> bool:
    """This process is an x86_64 program translated by Rosetta 2 (``sysctl.proc_translated`` is
    1; the key is absent on Intel Macs)."""
    try:
        value = subprocess.run(["sysctl", "-in", "sysctl.proc_translated"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return value.strip() == "1"


def no_local_pytorch_reason() -> str | None:
    """Why no PyTorch that SAM2 can use exists for this Python (macOS on x86_64: Slicer's
    package under Rosetta 2, or an Intel Mac), with what to do instead; None elsewhere."""
    if platform.system() != "Darwin" or platform.machine() != "x86_64":
        return None
    where = ("Slicer runs here as an Intel (x86_64) program under Rosetta 2" if runs_under_rosetta()
             else "this is an Intel (x86_64) Mac")
    return NO_LOCAL_PYTORCH.format(where=where)


def available_devices() -> list[str]:
    """Devices to offer, best first, always ending in ``cpu``."""
    devices = []
    if has_nvidia_gpu():
        devices.append("cuda")
    if has_apple_gpu():
        devices.append("mps")
    return devices + ["cpu"]


def gpu_memory_bytes() -> int | None:
    """Total memory of the first NVIDIA GPU from ``nvidia-smi`` (None when unknown)."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        output = subprocess.run(
            [executable, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout
        return int(float(output.split()[0])) * (1 << 20)  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def low_memory_warning(device: str) -> str | None:
    """A warning when the run will use a GPU with less than about 7 GB."""
    if device not in ("auto", "cuda"):
        return None
    memory = gpu_memory_bytes()
    if memory is None or memory >= LOW_VRAM_BYTES:
        return None
    return (
        f"The GPU has {memory / 1e9:.1f} GB of memory; SAM2 with OFL-SAM2 training may run out of it. "
        "If it does, use a smaller image size (e.g. 512) or the CPU."
    )
