"""The ``PythonSlicer`` stand-in (``app_launcher``) does what its documented rules say: the
worker tests rely on it to behave as Slicer's launcher does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from app_launcher import crashed, install
from process_helpers import children, process_alive, wait_gone

pytestmark = pytest.mark.skipif(os.name == "nt" or not os.path.isdir("/proc"), reason="POSIX stand-in, read from /proc")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    return install(tmp_path_factory.mktemp("Slicer 5.10"))


def run(launcher, code, **kwargs):
    return subprocess.run([launcher, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, **kwargs)


def test_the_interpreter_gets_the_launchers_environment_and_its_stdin(launcher):
    done = run(launcher, """\
        import os, sys
        print(os.environ["PYTHONNOUSERSITE"], os.environ["PIP_REQUIRE_VIRTUALENV"])
        print(os.environ["PYTHONPATH"])
        print(sys.stdin.readline().strip())
    """, input="from Slicer\n", env={**os.environ, "PYTHONPATH": "/inherited"})
    assert done.returncode == 0, done.stderr
    variables, python_path, line = done.stdout.splitlines()
    assert variables == "1 0"  # rule 6: the settings' variables (PYTHONNOUSERSITE, PIP_REQUIRE_VIRTUALENV)
    assert python_path.endswith(os.pathsep + "/inherited") and "site-packages" in python_path.split(os.pathsep)[0]
    assert line == "from Slicer"  # rule 7: stdin forwarded


def test_exit_codes_pass_through_and_a_signal_becomes_exit_1_with_the_launchers_line(launcher):
    assert run(launcher, "raise SystemExit(7)").returncode == 7
    done = run(launcher, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    python_real = os.path.join(os.path.dirname(launcher), "python-real")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"error: [{python_real}] exit abnormally - Report the problem."
    assert crashed(-9, "posix") and not crashed(1, "posix")
    assert crashed(0xC0000005, "nt") and crashed(0xF291, "nt") and not crashed(1, "nt") and not crashed(0xD0000001, "nt")


def test_killing_the_launcher_leaves_the_interpreter_running(launcher):
    process = subprocess.Popen([launcher, "-c", "import time; print('up', flush=True); time.sleep(600)"],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "up"
    (interpreter,) = children(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    try:
        assert process_alive(interpreter), "rule 9: nothing ties the interpreter's life to the launcher"
    finally:
        os.kill(interpreter, signal.SIGKILL)
        process.stdout.close()
    assert wait_gone(interpreter)


def test_a_missing_interpreter_is_reported(tmp_path):
    launcher = install(tmp_path, python=sys.executable)
    os.remove(os.path.join(os.path.dirname(launcher), "python-real"))
    done = run(launcher, "pass")
    assert done.returncode == 1 and "error: Application does NOT exist [" in done.stderr
