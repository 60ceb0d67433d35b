"""The engine worker under a hostile environment: a missing or wrong interpreter, a worker that
never starts, junk on its stdout, a foreign protocol, a client that dies, a temp folder that is
full, removed, or named with spaces and non-ASCII letters. Each case must end with a clear error
(or a working run), no process left behind and no temp files left over.

Real processes run a tiny shell script in place of the interpreter where the interpreter's
behaviour is the point; the fake-engine thread transport where the model is not. Tests that
start a worker process run twice (``worker_python``): with the interpreter itself, and with it
as ``python-real`` behind a stand-in of Slicer's ``PythonSlicer`` launcher (``app_launcher``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fakes import CopyEngine
from process_helpers import process_tree, wait_for_interpreter, wait_gone

from oflsam2.api import LabelSupport, MethodOptions, ModelSettings
from OFLSAM2SegmentLib.worker import (
    DownloadRequest,
    MessageKind,
    SegmentRequest,
    Worker,
    WorkerDied,
    WorkerStartError,
)

pytestmark = pytest.mark.skipif(os.name == "nt", reason="uses POSIX shell scripts as fake interpreters")

SETTINGS = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256)


def fake_python(folder: Path, body: str) -> str:
    """An executable that stands in for the interpreter (called as ``<it> -m oflsam2.worker``)."""
    path = folder / "fake python"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder for the test, so leftover worker folders can be counted."""
    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def leftovers(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def small_request(shape=(4, 8, 8)):
    mask = np.zeros(shape, bool)
    mask[1, 2:6, 2:6] = True
    return SegmentRequest(SETTINGS, np.zeros(shape, np.float32), [LabelSupport(1, "organ", mask, [1])], "sam2", 0,
                          "auto", MethodOptions())


def finish(job, timeout=60.0):
    assert job.finished.wait(timeout), "the job never ended"
    return list(job.messages())


# ---------------------------------------------------------------------------------------------
# The interpreter


def test_a_missing_interpreter_names_it_and_leaves_no_temp_folder(tmp_path, private_tmp):
    missing = str(tmp_path / "Program Files" / "Slicer 5.8" / "bin" / "PythonSlicer")
    worker = Worker(python=missing)
    with pytest.raises(WorkerStartError, match="PythonSlicer") as raised:
        worker.submit(small_request())
    assert missing in str(raised.value) and "reinstall the extension" in str(raised.value)
    assert not worker.alive and leftovers(private_tmp) == []
    worker.shutdown()


def test_process_with_a_missing_interpreter_raises_it_and_leaves_the_segmentation_as_it_was(tmp_path, scene):
    from mrml_helpers import read_segments, require_slicer

    slicer = require_slicer()

    from fakes import ManualPump

    from OFLSAM2SegmentLib.logic import OFLSAM2Logic
    from OFLSAM2SegmentLib.testing import make_annotated_volume

    volume, segmentation, ids = make_annotated_volume(scene, shape=(4, 16, 16))
    before = read_segments(segmentation, volume)
    logic = OFLSAM2Logic(worker=Worker(python=str(tmp_path / "no python")), pump=ManualPump())
    with pytest.raises(WorkerStartError, match="no python"):
        logic.process(volume, segmentation, ids[:1], method="sam2", randomWeights=True, device="cpu",
                      model="sam2.1-tiny", imageSize=256)
    assert not logic.isRunning()
    after = read_segments(segmentation, volume)
    for segment_id in before:
        np.testing.assert_array_equal(after[segment_id], before[segment_id])
    in_progress = slicer.vtkSlicerSegmentationsModuleLogic.InProgress
    segments = segmentation.GetSegmentation()
    assert all(slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(segments.GetSegment(i)) != in_progress
               for i in ids)


@pytest.mark.parametrize("interpreter", ["not python", "python without numpy"])
def test_an_interpreter_that_cannot_run_the_worker_names_it_and_the_fix(tmp_path, private_tmp, interpreter, worker_python):
    if interpreter == "not python":
        python = fake_python(tmp_path, "echo 'this is not Python' >&2\nexit 3\n")
    else:
        python = shutil.which("python3", path="/usr/bin:/bin")
        if python is None or subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode == 0:
            pytest.skip("needs a system python3 without numpy")
    python = worker_python(python)
    worker = Worker(python=python)
    job = worker.submit(small_request())
    messages = finish(job, 30)
    pid = job.transport.pid

    assert messages[-1][0] == MessageKind.ERROR and isinstance(messages[-1][1], WorkerDied)
    text = str(messages[-1][1])
    assert "could not start" in text and python in text and "Slicer's own Python" in text
    assert ("this is not Python" if interpreter == "not python" else "No module named 'numpy'") in text
    assert wait_gone(pid)
    worker.shutdown()
    assert leftovers(private_tmp) == []


def test_a_worker_that_never_says_hello_is_killed_and_the_run_fails(tmp_path, private_tmp, worker_python):
    python = worker_python(fake_python(tmp_path, f"echo $$ > '{tmp_path}/pid'\nexec sleep 600\n"))
    worker = Worker(python=python, start_timeout=1.0)
    started = time.monotonic()
    job = worker.submit(small_request())
    messages = finish(job, 30)  # before: waited for ever

    assert time.monotonic() - started < 20
    assert messages[-1][0] == MessageKind.ERROR and isinstance(messages[-1][1], WorkerDied)
    assert "did not start within 1 s" in str(messages[-1][1]) and python in str(messages[-1][1])
    assert wait_gone(job.transport.pid, int((tmp_path / "pid").read_text()))
    worker.shutdown()
    assert leftovers(private_tmp) == []


def test_a_worker_of_another_protocol_version_fails_the_run_with_what_to_do(tmp_path, private_tmp, worker_python):
    python = worker_python(fake_python(tmp_path, f"""\
        echo $$ > '{tmp_path}/pid'
        echo '{{"event": "hello", "protocol": 99, "pid": 1, "python": "3"}}'
        exec sleep 600
    """))
    worker = Worker(python=python)
    job = worker.submit(small_request())
    messages = finish(job, 30)
    assert messages[-1][0] == MessageKind.ERROR
    assert "protocol 99" in str(messages[-1][1]) and "Reinstall the extension" in str(messages[-1][1])
    assert wait_gone(job.transport.pid, int((tmp_path / "pid").read_text()))
    worker.shutdown()
    assert leftovers(private_tmp) == []


# ---------------------------------------------------------------------------------------------
# The worker's output


def test_junk_and_non_object_lines_on_the_workers_stdout_are_skipped(tmp_path, private_tmp, worker_python):
    """A library or a site hook that prints to stdout before the worker takes it over: text, a
    JSON list, an event without its fields. The worker must still serve (before: the reader
    thread died on the list, the run failed as 'worker died' and the live process was orphaned)."""
    python = fake_python(tmp_path, f"""\
        echo 'Loading plugins...'
        echo '[1, 2]'
        echo '"a string"'
        echo '{{"event": "progress", "job": 1}}'
        echo '{{"event": "slice", "job": 1, "file": 3}}'
        exec "{sys.executable}" "$@"
    """)
    worker = Worker(python=worker_python(python))
    job = worker.submit(DownloadRequest("no-such-model"))  # answered at once with an error event
    messages = finish(job, 60)
    pid = worker.pid
    processes = process_tree(pid)

    assert messages[-1][0] == MessageKind.ERROR and not isinstance(messages[-1][1], WorkerDied)
    assert "no-such-model" in str(messages[-1][1])
    assert worker.alive and worker.pid == pid == job.transport.pid  # the same process serves on
    worker.shutdown()
    assert wait_gone(*processes) and leftovers(private_tmp) == []


def test_the_worker_exits_and_removes_the_arrays_when_its_client_dies_mid_run(tmp_path, worker_python):
    """Slicer crashes or is killed during a run: the worker sees the end of its stdin, stops the
    run, removes the volume copy the client left in the temp folder, and exits (no orphan).
    Before: the worker exited but the request's arrays stayed in the temp folder for good."""
    temp = tmp_path / "temp"
    temp.mkdir()
    client = textwrap.dedent("""\
        import os, sys, time
        import numpy as np
        from oflsam2.api import LabelSupport, MethodOptions, ModelSettings
        from OFLSAM2SegmentLib.worker import SegmentRequest, Worker
        worker = Worker(python=sys.argv[1] or None)
        mask = np.zeros((4, 32, 32), bool)
        mask[1, 8:20, 8:20] = True
        settings = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256)
        job = worker.submit(SegmentRequest(settings, np.zeros((4, 32, 32), np.float32),
                                           [LabelSupport(1, "organ", mask, [1])], "sam2", 0, "auto", MethodOptions()))
        deadline = time.monotonic() + 120
        while job.results.empty() and time.monotonic() < deadline:  # the run has started
            time.sleep(0.02)
        print(worker.pid, worker.interpreter_pid, worker.protocol, flush=True)
        os.kill(os.getpid(), 9)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TMPDIR=str(temp))
    done = subprocess.run([sys.executable, "-c", client, worker_python() or ""], capture_output=True, text=True, env=env,
                          timeout=180)
    pid_text, interpreter_text, protocol = done.stdout.split()
    assert done.returncode == -signal.SIGKILL and protocol != "None"
    assert wait_gone(int(pid_text), int(interpreter_text), seconds=30), "the worker outlived its killed client"
    assert leftovers(temp) == [], "the killed client's arrays were left in the temp folder"


# ---------------------------------------------------------------------------------------------
# The temp folder


def test_a_full_temp_folder_gives_a_clear_error_and_leaves_no_partial_files(tmp_path, monkeypatch):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small tmp"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(small))
        worker = Worker(lambda settings: CopyEngine(settings))
        with pytest.raises(WorkerStartError, match="Could not write") as raised:
            worker.submit(small_request(shape=(8, 128, 128)))  # 512 KiB of image alone
        assert "TMPDIR" in str(raised.value)
        assert not any(p.name.startswith("job-") for p in small.rglob("*")), "partial arrays left behind"
        # The next run, small enough, works.
        messages = finish(worker.submit(small_request()), 30)
        assert messages[-1][0] == MessageKind.DONE
        worker.shutdown()
        assert leftovers(small) == []

        # The disk fills up during a run: the run fails saying where and what to do.
        gate = threading.Event()
        worker = Worker(lambda settings: CopyEngine(settings, block=gate, block_after=0))
        job = worker.submit(small_request())
        filler = small / "filler"
        with open(filler, "wb", buffering=0) as out:
            try:
                while True:
                    out.write(b"\0" * 4096)
            except OSError:
                pass
        gate.set()
        messages = finish(job, 30)
        assert messages[-1][0] == MessageKind.ERROR
        assert "Could not write a result plane" in str(messages[-1][1]) and "TMPDIR" in str(messages[-1][1])
        filler.unlink()
        assert finish(worker.submit(small_request()), 30)[-1][0] == MessageKind.DONE
        worker.shutdown()
        assert leftovers(small) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_temp_folder_removed_between_runs_is_made_again(private_tmp):
    """A temp cleaner (or the user) deletes the worker's folder while the worker lives on."""
    worker = Worker(lambda settings: CopyEngine(settings))
    assert finish(worker.submit(small_request()))[-1][0] == MessageKind.DONE
    root, transport = worker._root, worker.transport
    shutil.rmtree(root)
    messages = finish(worker.submit(small_request()))  # before: FileNotFoundError from mkdir
    assert messages[-1][0] == MessageKind.DONE and sum(m[0] == MessageKind.SLICE for m in messages) == 3
    # The same folder again: the running worker accepts request folders in that root only.
    assert worker._root == root and worker.transport is transport

    # Its name taken by something else meanwhile: a new root, served by a new worker.
    shutil.rmtree(root)
    root.write_text("not the worker's")
    messages = finish(worker.submit(small_request()))
    assert messages[-1][0] == MessageKind.DONE and worker._root != root and worker.transport is not transport
    assert not transport.alive and transport.wait(10)  # the worker of the old root ended
    root.unlink()
    worker.shutdown()
    assert leftovers(private_tmp) == []


def test_a_request_folder_removed_mid_run_fails_the_run_and_the_next_run_works(private_tmp):
    gate = threading.Event()
    worker = Worker(lambda settings: CopyEngine(settings, block=gate, block_after=0))
    job = worker.submit(small_request())
    shutil.rmtree(job.folder)
    gate.set()
    messages = finish(job)
    assert messages[-1][0] == MessageKind.ERROR
    assert finish(worker.submit(small_request()))[-1][0] == MessageKind.DONE
    worker.shutdown()
    assert leftovers(private_tmp) == []


def test_a_real_run_through_a_temp_folder_with_spaces_and_non_ascii_letters(tmp_path, monkeypatch, worker_python):
    """Windows-like names (``C:\\Users\\José Müller\\AppData\\Local\\Temp``): the arrays and
    the planes travel through such a folder; nothing is left after the run or the shutdown."""
    temp = tmp_path / "Users" / "José Müller 日本" / "Local Temp"
    temp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    worker = Worker(python=worker_python())
    messages = finish(worker.submit(small_request(shape=(3, 32, 32))), 300)
    assert messages[-1][0] == MessageKind.DONE, messages[-1]
    assert sorted(m[3] for m in messages if m[0] == MessageKind.SLICE) == [0, 2]
    assert not any(p.name.startswith("job-") for p in temp.rglob("*"))
    processes = process_tree(worker.pid)
    worker.shutdown()
    assert wait_gone(*processes) and leftovers(temp) == []


# ---------------------------------------------------------------------------------------------
# Slicer's module reload


def test_reloading_the_module_stops_its_worker_and_the_reloaded_module_starts_a_new_one(slicer_core):
    """The Reload button: ``onReload`` stops the worker and drops every ``OFLSAM2SegmentLib``
    module; Slicer then re-executes the module file, whose imports load the Lib afresh."""
    from loading_rules import load_like_slicer, load_source_as_module
    from test_slicer_loading import MODULE_DIR, editor_scene

    def started(worker):
        worker.start()
        deadline = time.monotonic() + 60
        while worker.protocol is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.protocol is not None, "the worker never said hello"
        return worker.pid

    scene = editor_scene(slicer_core.vtkMRMLScene())
    with load_like_slicer(MODULE_DIR, scene) as session:
        old_shared = sys.modules["OFLSAM2SegmentLib.shared_worker"]
        old_pid = started(old_shared.shared_worker())
        widget = object.__new__(session.module.OFLSAM2SegmentWidget)
        widget.onReload()
        assert session.reloaded and wait_gone(old_pid), "the worker outlived the reload"
        assert not [n for n in sys.modules if n.split(".")[0] == "OFLSAM2SegmentLib"], "stale Lib modules"

        load_source_as_module("OFLSAM2Segment", str(Path(MODULE_DIR) / "OFLSAM2Segment.py"))
        new_shared = sys.modules["OFLSAM2SegmentLib.shared_worker"]
        assert new_shared is not old_shared
        new_pid = started(new_shared.shared_worker())
        assert new_pid != old_pid
        session.app.emit("aboutToQuit()")  # both the old and the reloaded file's handlers are connected
        assert wait_gone(new_pid), "the reloaded module's worker outlived Slicer"
    scene.Clear(1)


def test_a_reload_during_a_run_restores_the_segments_first_and_keeps_one_worker_per_slicer(slicer_core):
    """Reload mid-run: the run's Qt timer goes with the old panel, so the reload itself must
    cancel the run and put the segments back before it stops the worker, and the run must end
    saying why (before: the segments kept the run's planes, the run never ended, and a timer
    that survived read planes from a removed folder: "a result plane could not be read").
    Afterwards the effect, which Slicer does not reload, and any logic of the old code share the
    reloaded module's one worker (before: the effect's old logic started a second one)."""
    from loading_rules import load_like_slicer, load_source_as_module
    from mrml_helpers import read_segments
    from test_slicer_loading import MODULE_DIR, editor_scene

    scene = editor_scene(slicer_core.vtkMRMLScene())
    with load_like_slicer(MODULE_DIR, scene) as session:
        from OFLSAM2SegmentLib.testing import make_annotated_volume

        old_shared = sys.modules["OFLSAM2SegmentLib.shared_worker"]
        old_drain = sys.modules["OFLSAM2SegmentLib.run"].drain
        volume, segmentation, ids = make_annotated_volume(scene, shape=(8, 32, 32))
        before = read_segments(segmentation, volume)
        # The fake engine built on this session's engine modules (its Cancelled is the worker's).
        engines = load_source_as_module("fakes_of_the_session", str(Path(__file__).with_name("fakes.py")))
        sys.modules.pop("fakes_of_the_session")
        gate = threading.Event()  # never set: the engine stops after two planes
        old_shared._shared_worker = old_shared.Worker(lambda s: engines.CopyEngine(s, block=gate, block_after=2))
        logic = session.module.OFLSAM2SegmentLogic()  # its pump is a Qt timer: one that never fires here
        texts = []
        run = logic.process(volume, segmentation, ids[:1], method="sam2", waitForCompletion=False,
                            progressCallback=lambda stage, done, total, text: texts.append((stage, text)),
                            randomWeights=True, device="cpu")
        deadline = time.monotonic() + 30
        while sum(run._written.values()) < 2:  # two timer ticks' worth of planes reach the segment
            old_drain(run)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not np.array_equal(read_segments(segmentation, volume)[ids[0]], before[ids[0]])
        effect_logic = session.registered_effects[0].logic()

        object.__new__(session.module.OFLSAM2SegmentWidget).onReload()

        assert run.state == "cancelled" and run.restored, (run.state, run.error)
        after = read_segments(segmentation, volume)
        for segment_id in before:
            np.testing.assert_array_equal(after[segment_id], before[segment_id])
        stage, text = texts[-1]
        assert stage == "cancelled" and "stopped for a reload" in text and "could not be read" not in text, text

        load_source_as_module("OFLSAM2Segment", str(Path(MODULE_DIR) / "OFLSAM2Segment.py"))
        new_shared = sys.modules["OFLSAM2SegmentLib.shared_worker"]
        assert new_shared is not old_shared
        worker = new_shared.shared_worker()
        assert old_shared.shared_worker() is worker and logic.worker is worker and effect_logic.worker is worker
        effect_logic = session.registered_effects[0].logic()
        assert isinstance(effect_logic, sys.modules["OFLSAM2SegmentLib.logic"].OFLSAM2Logic) and effect_logic.worker is worker
    scene.Clear(1)


# ---------------------------------------------------------------------------------------------
# Requests, cancel and kill


def test_a_request_line_without_a_known_type_is_answered_not_ignored(tmp_path, worker_python):
    """A request of a newer module (unknown type) or a truncated one: a line that names its job
    gets an error event for that job (before: ignored, and the client waited for ever); a line
    whose job cannot be read gets an error event for no job."""
    from OFLSAM2SegmentLib.worker import ProcessTransport

    events = []
    transport = ProcessTransport(lambda t, event: events.append(event), python=worker_python())
    transport.send({"job": 4, "folder": str(tmp_path)})
    transport.send({"type": "segment-v9", "job": 5})
    transport._input.write('{"type": "segment", "job": 6, "fold\n[1, 2]\n')  # truncated, then not an object
    transport.send({"type": "shutdown"})
    transport.close_input()
    assert transport.wait(60)
    errors = [e for e in events if e and e.get("event") == "error"]
    by_job = {e["job"]: e for e in errors if e["job"] is not None}
    assert sorted(by_job) == [4, 5] and "Unknown request type" in by_job[5]["message"]
    assert "different versions" in by_job[4]["message"]
    assert [e["error_type"] for e in errors if e["job"] is None] == ["ProtocolError"] * 2


def test_a_request_folder_outside_the_workers_root_is_refused_and_never_removed(tmp_path):
    """A request naming a ``job-*`` folder outside the worker's root (one of the user's, or one
    reached through a link) is refused, and the worker serves on; when its client dies it
    removes nothing of them (before: it removed every ``job-*`` folder any request named,
    anywhere, even for a request it refused)."""
    from OFLSAM2SegmentLib.worker import ProcessTransport

    victim, link = tmp_path / "Documents" / "job-2024", tmp_path / "links" / "job-link"
    victim.mkdir(parents=True)
    (victim / "thesis.txt").write_text("the user's work")
    link.parent.mkdir()
    link.symlink_to(victim)
    events = []
    transport = ProcessTransport(lambda t, event: events.append(event))  # the worker makes its own root
    for job, folder in ((7, victim), (8, link)):
        transport.send({"type": "segment", "job": job, "folder": str(folder), "settings": {}, "options": {},
                        "method": "sam2", "axis": 0, "preset": "auto", "image": "image.npy", "supports": []})
    transport.send({"type": "download", "job": 9, "model": "no-such-model"})
    deadline = time.monotonic() + 60
    while not any(e and e.get("job") == 9 for e in events) and time.monotonic() < deadline:
        time.sleep(0.05)
    transport.close_input()  # no shutdown: the client died
    assert transport.wait(60)
    errors = {e["job"]: e["message"] for e in events if e and e.get("event") == "error"}
    assert "not inside the worker's folder" in errors[7] and "not inside" in errors[8]
    assert "no-such-model" in errors[9]  # it served on
    assert (victim / "thesis.txt").read_text() == "the user's work" and link.is_symlink()


def test_a_request_that_cannot_be_sent_leaves_no_job_and_no_files(private_tmp):
    worker = Worker(lambda settings: CopyEngine(settings))
    request = small_request()
    request.options = MethodOptions(adapter=Path("adapter folder"))  # a Path is not JSON
    with pytest.raises(TypeError):
        worker.submit(request)
    assert worker._jobs == {} and not any(p.name.startswith("job-") for p in private_tmp.rglob("*"))
    assert finish(worker.submit(small_request()))[-1][0] == MessageKind.DONE
    worker.shutdown()
    assert leftovers(private_tmp) == []


def test_rapid_repeated_runs_each_finish_and_leave_no_files(private_tmp):
    gate = threading.Event()  # the first run waits until the queued one was cancelled
    worker = Worker(lambda settings: CopyEngine(settings, block=gate, block_after=0))
    jobs = [worker.submit(small_request()) for _ in range(8)]
    jobs[3].cancel()
    jobs[3].cancel()  # twice: no second message, no error
    gate.set()
    outcomes = [finish(job)[-1][0] for job in jobs]
    assert outcomes[3] == MessageKind.CANCELLED
    assert outcomes[:3] + outcomes[4:] == [MessageKind.DONE] * 7
    assert not any(p.name.startswith("job-") for p in private_tmp.rglob("*"))
    worker.shutdown()
    assert leftovers(private_tmp) == []


def test_cancel_before_hello_and_kill_during_model_load_leave_no_files_and_the_next_run_works(private_tmp, worker_python):
    worker = Worker(python=worker_python())
    job = worker.submit(small_request())
    job.cancel()  # the worker has not even said hello yet
    job.cancel()
    assert finish(job, 60)[-1][0] == MessageKind.CANCELLED
    pid = worker.pid
    processes = process_tree(pid)
    assert worker.alive, "a cancel that the worker honoured must not kill it"

    job = worker.submit(small_request())
    deadline = time.monotonic() + 120
    while job.results.empty() and time.monotonic() < deadline:  # the first progress: the model is loading
        time.sleep(0.02)
    os.kill(wait_for_interpreter(worker), signal.SIGKILL)
    messages = finish(job, 60)
    assert messages[-1][0] == MessageKind.ERROR and isinstance(messages[-1][1], WorkerDied)
    assert "memory ran out" in str(messages[-1][1]) and "exited with code" not in str(messages[-1][1])
    assert not any(p.name.startswith("job-") for p in private_tmp.rglob("*"))

    job = worker.submit(DownloadRequest("no-such-model"))  # a new worker answers
    assert finish(job, 60)[-1][0] == MessageKind.ERROR and worker.pid != pid and worker.alive
    processes += process_tree(worker.pid)
    worker.shutdown()
    assert wait_gone(*processes) and leftovers(private_tmp) == []


def test_a_module_folder_with_spaces_and_non_ascii_letters_starts_the_worker(tmp_path, worker_python):
    """The extension installed under ``C:/Users/José Müller/AppData/.../Slicer 5.8 Extensions``:
    the worker finds the engine through PYTHONPATH and its working folder."""
    module_dir = Path(__file__).resolve().parents[2] / "OFLSAM2Segment"
    installed = tmp_path / "José Müller 日本" / "Slicer 5.8 Extensions" / "OFLSAM2" / "lib"
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("oflsam2", "OFLSAM2SegmentLib"):
        shutil.copytree(module_dir / package, installed / package, ignore=ignore)
    client = textwrap.dedent("""\
        import sys
        from OFLSAM2SegmentLib.worker import DownloadRequest, Worker, engine_folder
        worker = Worker(python=sys.argv[1] or None)
        job = worker.submit(DownloadRequest("no-such-model"))
        assert job.finished.wait(120)
        kind, error = list(job.messages())[-1][:2]
        worker.shutdown()
        print(engine_folder())
        print(kind.value, type(error).__name__, error)
    """)
    others = [p for p in sys.path if p and Path(p).resolve() != module_dir]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed), *others]), PYTHONIOENCODING="utf-8")
    done = subprocess.run([sys.executable, "-c", client, worker_python() or ""], capture_output=True, text=True,
                          encoding="utf-8", env=env, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    folder, outcome = done.stdout.splitlines()[:2]
    assert Path(folder) == installed
    assert outcome.startswith("error") and "WorkerDied" not in outcome and "no-such-model" in outcome


def test_a_client_that_exits_without_shutdown_leaves_no_temp_folder_and_no_worker(tmp_path, worker_python):
    """A script (or a Slicer whose aboutToQuit handler never ran) that drops its Worker: the
    worker process ends with the pipes, and the temp folder with its job files goes with Python."""
    temp = tmp_path / "temp"
    temp.mkdir()
    client = textwrap.dedent("""\
        import sys
        from OFLSAM2SegmentLib.worker import DownloadRequest, Worker
        worker = Worker(python=sys.argv[1] or None)
        job = worker.submit(DownloadRequest("no-such-model"))
        assert job.finished.wait(120)  # its messages are never read: the job folder stays until exit
        print(worker.pid, worker.interpreter_pid, flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TMPDIR=str(temp))
    done = subprocess.run([sys.executable, "-c", client, worker_python() or ""], capture_output=True, text=True, env=env,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert wait_gone(*map(int, done.stdout.split()), seconds=30), "the worker outlived its client"
    assert leftovers(temp) == [], "the client's temp folder was left behind"


def test_sigterm_to_the_worker_removes_its_state_folder_with_the_trained_head(tmp_path, monkeypatch):
    """A supervisor (or the session's end) sends SIGTERM: the worker exits with 143 and removes
    the private folder holding the OFL-SAM2 head it trained for updates (before: no handler, the
    folder with the head stayed in the temp folder for good)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("TMPDIR", str(temp))  # the worker process's temp folder
    worker = Worker()
    request = small_request(shape=(4, 32, 32))
    request.method, request.options = "ofl", MethodOptions(epochs=1, learner_iters_train=1, learner_iters_online=1)
    messages = finish(worker.submit(request), 600)
    assert messages[-1][0] == MessageKind.DONE, messages[-1]
    states = list(temp.glob("oflsam2-worker-state-*"))
    assert len(states) == 1 and any(states[0].rglob("*.safetensors")), "no trained head was kept"
    pid = worker.pid
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, seconds=60)
    assert worker.transport._process.wait(10) == 128 + signal.SIGTERM
    assert not states[0].exists(), "the trained head was left in the temp folder"
    worker.shutdown()
    assert leftovers(temp) == []


def test_a_worker_whose_launcher_was_killed_is_replaced_and_its_interpreter_ends(worker_python, private_tmp):
    """Only the launcher dies (someone killed the process Slicer started): the interpreter lives
    on, holding the model. The next request starts a new worker and the old one must end: its
    stdin is closed and its process tree killed before it is replaced (before: it ran on)."""
    from process_helpers import process_alive

    if not worker_python.launcher:
        pytest.skip("needs a launcher in front of the interpreter")
    worker = Worker(python=worker_python())
    worker.start()
    interpreter, launcher = wait_for_interpreter(worker), worker.pid
    os.kill(launcher, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker.alive and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not worker.alive and process_alive(interpreter)  # nothing ties the interpreter to its launcher

    job = worker.submit(DownloadRequest("no-such-model"))
    assert finish(job, 60)[-1][0] == MessageKind.ERROR and worker.pid != launcher
    assert wait_gone(interpreter), "the replaced worker's interpreter lives on"
    processes = process_tree(worker.pid)
    worker.shutdown()
    assert wait_gone(*processes) and leftovers(private_tmp) == []


def test_a_stopped_and_continued_worker_finishes_and_a_frozen_one_does_not_outlive_shutdown(private_tmp, worker_python):
    worker = Worker(python=worker_python())
    job = worker.submit(small_request(shape=(3, 32, 32)))
    deadline = time.monotonic() + 120
    while job.results.empty() and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = wait_for_interpreter(worker)
    processes = process_tree(worker.pid)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.5)
    os.kill(pid, signal.SIGCONT)
    messages = finish(job, 300)
    assert messages[-1][0] == MessageKind.DONE
    assert sorted(m[3] for m in messages if m[0] == MessageKind.SLICE) == [0, 2]

    os.kill(pid, signal.SIGSTOP)  # frozen when Slicer quits: shutdown kills it after its timeout
    started = time.monotonic()
    worker.shutdown(timeout=1.0)
    assert time.monotonic() - started < 10 and wait_gone(*processes, seconds=10)
    assert leftovers(private_tmp) == []
