"""Processes of the worker tests, read from Linux's ``/proc``: liveness (a zombie is dead),
descendants, and the interpreter behind a launcher."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces


def process_alive(pid: int) -> bool:
    """Running, stopped or sleeping; not gone and not a zombie (ended, not yet reaped)."""
    if os.path.isdir("/proc"):
        fields = _stat(pid)
        return fields is not None and fields[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(*pids: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(process_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return sorted(found)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children(current))
    return tree


def wait_for_interpreter(worker, seconds: float = 120.0) -> int:
    """The worker's interpreter once it said hello, checked against the process tree: the
    started process itself (plain Python) or its one child (a launcher)."""
    deadline = time.monotonic() + seconds
    while worker.protocol is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.protocol is not None, "the worker never said hello"
    below = children(worker.pid)
    expected = below[0] if len(below) == 1 else worker.pid
    assert worker.interpreter_pid == expected, (worker.interpreter_pid, worker.pid, below)
    return expected

