"""Which compute devices this machine offers, probed without importing torch.

Importing torch takes seconds (and fails before it is installed), so the module's GUI asks the
operating system instead; ``torch.cuda.is_available()`` confirms the choice when a run starts.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess

LOW_VRAM_BYTES = 7_000_000_000  # below this SAM2 + training at 1024 px often runs out of memory


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
    """Apple silicon (MPS backend)."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


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
