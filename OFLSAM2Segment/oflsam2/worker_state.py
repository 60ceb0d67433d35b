"""The worker process's private state folder (the ``ofl`` head an update warm-starts), and the
removal of those that dead workers left behind.

A worker removes its state folder when it exits, but a worker that is killed (SIGKILL, the
out-of-memory killer, a power cut) cannot: its folder, with a trained adapter of a few MiB to a
few hundred, stays in the temp folder. Each folder is named after its process
(``oflsam2-worker-state-<pid>-<random>``), so a starting worker removes those of processes that
no longer exist. Only this user's real folders (not links) are touched; a folder whose process
is alive, or whose owner or process cannot be told, is left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

PREFIX = "oflsam2-worker-state-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-[A-Za-z0-9_]+")


def new_state_folder() -> Path:
    """A private (0700) state folder for this process, in the temp folder."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))


def remove_stale_state_folders(root=None, prefix: str = PREFIX) -> list[Path]:
    """Remove the state folders of this user's worker processes that no longer exist (in
    ``root``, default the temp folder); return them. ``prefix``: whose folders (``oflsam2 serve``
    names its own ``oflsam2-server-<pid>-<random>``)."""
    root = Path(root or tempfile.gettempdir())
    pattern = _NAME if prefix == PREFIX else re.compile(re.escape(prefix) + r"(\d+)-[A-Za-z0-9_]+")
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or not _own(info) or _process_exists(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _own(info: os.stat_result) -> bool:
    getuid = getattr(os, "getuid", None)
    return getuid is None or info.st_uid == getuid()  # Windows: the temp folder is the user's own


def _process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists (True when it cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return _windows_process_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's process
        return True
    return True


def _windows_process_exists(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() != 87  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)
