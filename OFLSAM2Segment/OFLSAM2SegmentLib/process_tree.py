"""Ending the worker process *and everything it started*, on Linux, macOS and Windows.

In Slicer the worker is started with ``sys.executable``, which is ``PythonSlicer``: a
CTKAppLauncher binary that starts the real interpreter, ``python-real``, as its child and
forwards stdin/stdout/stderr to it (``ctkAppLauncher::runProcess``). Nothing ties that child's
life to the launcher, so killing the started process leaves the interpreter running with the
model, the feature caches and any GPU memory. Whatever the worker starts (e.g. compiler or
data-loader processes) must go too.

- POSIX (Linux, macOS): the launcher starts in a new session (``start_new_session``), so the
  launcher, ``python-real`` and their descendants share one process group whose id is the
  launcher's pid; ``killpg`` ends them all, also after the launcher itself has gone. (A new
  session also keeps a terminal's Ctrl-C, meant for Slicer, away from the worker; the worker
  ends when its stdin closes.)
- Windows: a job object with ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE``. The launcher is assigned
  to it as soon as it starts; a process started by a process of a job belongs to that job, so
  ``python-real`` and what it starts follow. ``python-real`` is assigned again when it reports
  its pid (its ``hello``), in case the launcher started it before its own assignment: the
  worker starts nothing before its hello. ``TerminateJobObject`` ends them all, and if Slicer
  itself dies, Windows closes the job handle and ends them too. Where no job can be made,
  the launcher and the reported interpreter are terminated one by one.

Not ``psutil``: Slicer's Python does not ship it, and Slicer's process should not need an
extra binary package to stop its own worker; both mechanisms above are part of the OS and
reachable from the standard library.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading

# Windows constants (winnt.h, processthreadsapi.h)
CREATE_NO_WINDOW = 0x08000000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9  # JobObjectExtendedLimitInformation
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
PROCESS_TERMINATE = 0x0001
PROCESS_SET_QUOTA = 0x0100
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
KILLED_EXIT_CODE = 1


class ProcessGroup:
    """POSIX: the started process leads a new session and process group."""

    def __init__(self):
        self._group = None

    def popen_options(self) -> dict:
        return {"start_new_session": True}

    def started(self, process: subprocess.Popen) -> None:
        self._group = process.pid  # the session leader's pid is the group's id

    def adopt(self, pid: int) -> None:
        """The interpreter reported its pid: it is in the group already."""

    def kill(self) -> None:
        if self._group is None:
            return
        try:
            os.killpg(self._group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the whole group has ended already
            pass

    def close(self) -> None:
        pass


class _BasicLimits(ctypes.Structure):  # JOBOBJECT_BASIC_LIMIT_INFORMATION
    _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                ("LimitFlags", ctypes.c_uint32), ("MinimumWorkingSetSize", ctypes.c_size_t),
                ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", ctypes.c_uint32),
                ("Affinity", ctypes.c_size_t), ("PriorityClass", ctypes.c_uint32), ("SchedulingClass", ctypes.c_uint32)]


class _IoCounters(ctypes.Structure):  # IO_COUNTERS
    _fields_ = [(name, ctypes.c_uint64) for name in ("ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
                                                     "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]


class ExtendedLimits(ctypes.Structure):  # JOBOBJECT_EXTENDED_LIMIT_INFORMATION
    _fields_ = [("BasicLimitInformation", _BasicLimits), ("IoInfo", _IoCounters), ("ProcessMemoryLimit", ctypes.c_size_t),
                ("JobMemoryLimit", ctypes.c_size_t), ("PeakProcessMemoryUsed", ctypes.c_size_t),
                ("PeakJobMemoryUsed", ctypes.c_size_t)]


def _kernel32():
    """kernel32 with the signatures used here (handles are pointers: never truncated to int)."""
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle, boolean, dword = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    for name, restype, argtypes in (
        ("CreateJobObjectW", handle, [ctypes.c_void_p, ctypes.c_wchar_p]),
        ("SetInformationJobObject", boolean, [handle, ctypes.c_int, ctypes.c_void_p, dword]),
        ("AssignProcessToJobObject", boolean, [handle, handle]),
        ("IsProcessInJob", boolean, [handle, handle, ctypes.POINTER(boolean)]),
        ("TerminateJobObject", boolean, [handle, ctypes.c_uint]),
        ("OpenProcess", handle, [dword, boolean, dword]),
        ("TerminateProcess", boolean, [handle, ctypes.c_uint]),
        ("CloseHandle", boolean, [handle]),
    ):
        function = getattr(kernel32, name)
        function.restype, function.argtypes = restype, argtypes
    return kernel32


class JobObject:
    """Windows: a job that ends every process in it when killed or when its last handle closes.

    ``kernel32``: the Win32 functions (a stand-in in tests); every failure falls back on
    terminating the launcher and the reported interpreter one by one.
    """

    def __init__(self, kernel32=None):
        self._kernel32 = kernel32
        self._lock = threading.Lock()  # kill comes from timer and reader threads: never on a closed handle
        self._job = None
        self._process = None
        self._interpreter = None  # handle of the reported interpreter (fallback, and to check its job)

    def popen_options(self) -> dict:
        return {"creationflags": CREATE_NO_WINDOW}  # no console window, as slicer.util.launchConsoleProcess

    def started(self, process: subprocess.Popen) -> None:
        self._process = process
        if self._kernel32 is None:
            self._kernel32 = _kernel32()
        job = self._kernel32.CreateJobObjectW(None, None)
        if not job:
            return
        limits = ExtendedLimits()
        limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        if (self._kernel32.SetInformationJobObject(job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, ctypes.byref(limits),
                                                   ctypes.sizeof(limits))
                and self._kernel32.AssignProcessToJobObject(job, int(process._handle))):
            self._job = job
        else:
            self._kernel32.CloseHandle(job)

    def adopt(self, pid: int) -> None:
        """Hold the interpreter's handle, and put it in the job if the launcher started it too early."""
        kernel32 = self._kernel32
        with self._lock:
            if kernel32 is None or self._interpreter is not None or not pid:
                return
            access = PROCESS_TERMINATE | PROCESS_SET_QUOTA | PROCESS_QUERY_LIMITED_INFORMATION
            handle = kernel32.OpenProcess(access, 0, int(pid))
            if not handle:
                return
            self._interpreter = handle
            if self._job is not None:
                inside = ctypes.c_int(0)
                if kernel32.IsProcessInJob(handle, self._job, ctypes.byref(inside)) and not inside.value:
                    kernel32.AssignProcessToJobObject(self._job, handle)

    def kill(self) -> None:
        kernel32 = self._kernel32
        if kernel32 is None:
            return
        with self._lock:
            if self._job is not None and kernel32.TerminateJobObject(self._job, KILLED_EXIT_CODE):
                return
            if self._interpreter is not None:
                kernel32.TerminateProcess(self._interpreter, KILLED_EXIT_CODE)
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def close(self) -> None:
        """Let go of the handles (closing the job's last one ends whatever is still in it)."""
        with self._lock:
            for name in ("_interpreter", "_job"):
                handle = getattr(self, name)
                if handle is not None:
                    self._kernel32.CloseHandle(handle)
                    setattr(self, name, None)


def process_tree(os_name: str = os.name):
    """How the worker's processes are started and ended on this OS."""
    return JobObject() if os_name == "nt" else ProcessGroup()
