"""How the worker's processes are ended on each OS (``OFLSAM2SegmentLib.process_tree``).

POSIX runs for real here: a stand-in launcher (a shell that starts a child and waits) is killed
alone, as when only the started process is ended, and the group kill still ends its child.
Windows cannot run here: its job-object logic is driven through a recording stand-in for
kernel32 that follows the documented Win32 contracts (handles, BOOL results, out-parameters)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

import pytest
from process_helpers import process_alive, wait_gone

from OFLSAM2SegmentLib import process_tree as tree_module
from OFLSAM2SegmentLib.process_tree import JobObject, ProcessGroup, process_tree


def test_each_os_gets_its_mechanism():
    assert isinstance(process_tree("posix"), ProcessGroup)
    assert process_tree("posix").popen_options() == {"start_new_session": True}
    windows = process_tree("nt")
    assert isinstance(windows, JobObject)
    assert windows.popen_options() == {"creationflags": tree_module.CREATE_NO_WINDOW}


@pytest.mark.skipif(os.name == "nt" or not os.path.isdir("/proc"), reason="POSIX process groups, read from /proc")
def test_the_group_kill_ends_the_child_of_a_launcher_that_is_already_gone():
    tree = ProcessGroup()
    launcher = subprocess.Popen(["/bin/sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                                **tree.popen_options())
    tree.started(launcher)
    child = int(launcher.stdout.readline())
    os.kill(launcher.pid, signal.SIGKILL)  # what killing only the started process does
    launcher.wait(10)
    assert process_alive(child), "the child should outlive its launcher (nothing ties them)"
    tree.kill()
    assert wait_gone(child)
    tree.kill()  # again, with nothing left: no error
    launcher.stdout.close()


class FakePopen:
    def __init__(self):
        self.pid, self._handle, self.killed = 4242, 111, False

    def poll(self):
        return None if not self.killed else -9

    def kill(self):
        self.killed = True


class RecordingKernel32:
    """kernel32 as documented: handles are non-zero on success, functions return BOOL."""

    def __init__(self, create=True, assign=True, terminate_job=True, already_in_job=False):
        self.calls = []
        self._create, self._assign, self._terminate_job, self._in_job = create, assign, terminate_job, already_in_job
        self.limit_flags = None
        self.limits_size = None

    def CreateJobObjectW(self, attributes, name):
        self.calls.append(("CreateJobObjectW",))
        return 900 if self._create else None

    def SetInformationJobObject(self, job, kind, limits, size):
        self.calls.append(("SetInformationJobObject", job, kind))
        self.limit_flags = limits._obj.BasicLimitInformation.LimitFlags
        self.limits_size = size
        return 1

    def AssignProcessToJobObject(self, job, process):
        self.calls.append(("AssignProcessToJobObject", job, process))
        return 1 if self._assign else 0

    def IsProcessInJob(self, process, job, result):
        self.calls.append(("IsProcessInJob", process, job))
        result._obj.value = int(self._in_job)
        return 1

    def OpenProcess(self, access, inherit, pid):
        self.calls.append(("OpenProcess", access, pid))
        return 700

    def TerminateJobObject(self, job, code):
        self.calls.append(("TerminateJobObject", job))
        return 1 if self._terminate_job else 0

    def TerminateProcess(self, process, code):
        self.calls.append(("TerminateProcess", process))
        return 1

    def CloseHandle(self, handle):
        self.calls.append(("CloseHandle", handle))
        return 1

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


def test_the_launcher_goes_into_a_job_that_kills_on_close():
    kernel32, process = RecordingKernel32(), FakePopen()
    job = JobObject(kernel32)
    job.started(process)
    assert kernel32.named("SetInformationJobObject") == [("SetInformationJobObject", 900, 9)]
    assert kernel32.limit_flags == tree_module.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    if ctypes.sizeof(ctypes.c_void_p) == 8:  # JOBOBJECT_EXTENDED_LIMIT_INFORMATION on 64-bit Windows
        assert kernel32.limits_size == 144
    assert kernel32.named("AssignProcessToJobObject") == [("AssignProcessToJobObject", 900, 111)]
    job.kill()
    assert kernel32.named("TerminateJobObject") == [("TerminateJobObject", 900)]
    assert not kernel32.named("TerminateProcess") and not process.killed
    job.close()
    assert ("CloseHandle", 900) in kernel32.calls
    job.kill()  # a late grace-kill timer: never on the closed handle
    assert kernel32.named("TerminateJobObject") == [("TerminateJobObject", 900)]


@pytest.mark.parametrize("already_in_job", [True, False])
def test_the_reported_interpreter_joins_the_job_unless_it_is_in_it(already_in_job):
    kernel32 = RecordingKernel32(already_in_job=already_in_job)
    job = JobObject(kernel32)
    job.started(FakePopen())
    job.adopt(5151)
    assert kernel32.named("OpenProcess")[0][2] == 5151
    assigned = [c for c in kernel32.named("AssignProcessToJobObject") if c[2] == 700]
    assert assigned == ([] if already_in_job else [("AssignProcessToJobObject", 900, 700)])
    job.close()
    assert {("CloseHandle", 700), ("CloseHandle", 900)} <= set(kernel32.calls)


@pytest.mark.parametrize("failure", ["no job", "assignment refused", "termination refused"])
def test_without_a_working_job_both_processes_are_terminated_one_by_one(failure):
    kernel32 = RecordingKernel32(create=failure != "no job", assign=failure != "assignment refused",
                                 terminate_job=failure != "termination refused")
    process = FakePopen()
    job = JobObject(kernel32)
    job.started(process)
    job.adopt(5151)
    job.kill()
    assert ("TerminateProcess", 700) in kernel32.calls and process.killed
    if failure == "assignment refused":  # the unusable job handle is not kept open
        assert ("CloseHandle", 900) in kernel32.calls
