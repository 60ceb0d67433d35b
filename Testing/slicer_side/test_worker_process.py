"""The engine worker as a real process (``python -m oflsam2.worker``, random-weight SAM2.1-tiny at
256 px on the CPU): warm across runs, no orphan after shutdown, a killed worker fails the run
cleanly and the next run starts a new one, an unresponsive worker is killed after a cancel.

Each process test runs twice (``worker_python``): with a plain Python, and through a stand-in of
Slicer's ``PythonSlicer`` launcher (``app_launcher``), whose child is the real interpreter."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time

import numpy as np
import pytest
from fakes import ManualPump
from mrml_helpers import read_segments, require_slicer
from process_helpers import process_tree, wait_for_interpreter, wait_gone

slicer = require_slicer()
pytestmark = [pytest.mark.slicer, pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")]

from oflsam2.api import LabelSupport, MethodOptions, ModelSettings  # noqa: E402
from oflsam2.worker import PROTOCOL_VERSION, load_array  # noqa: E402
from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402
from OFLSAM2SegmentLib.worker import MessageKind, SegmentRequest, Worker, WorkerDied  # noqa: E402

FAST = {"randomWeights": True, "device": "cpu", "model": "sam2.1-tiny", "imageSize": 256}
SETTINGS = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256)


def sam2_request(shape=(4, 48, 48)):
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[1, 10:30, 12:34] = True
    return SegmentRequest(SETTINGS, image, [LabelSupport(1, "organ", mask, [1])], "sam2", 0, "auto", MethodOptions())


def finish(job, timeout=300.0):
    assert job.finished.wait(timeout), "the worker did not answer"
    return list(job.messages())


def test_a_warm_worker_reuses_its_features_and_shutdown_leaves_no_process(worker_python):
    worker = Worker(python=worker_python())
    request = sam2_request()
    first = finish(worker.submit(request))
    pid, root = worker.pid, worker._root
    processes = process_tree(pid)  # the launcher and the interpreter, or the interpreter alone
    assert wait_for_interpreter(worker) in processes and len(processes) == 1 + worker_python.launcher
    assert worker.protocol == PROTOCOL_VERSION and worker.startup_seconds is not None
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700  # arrays go through a private folder
    second = finish(worker.submit(sam2_request()))

    for messages in (first, second):
        assert messages[-1][0] == MessageKind.DONE
        planes = [m for m in messages if m[0] == MessageKind.SLICE]
        assert sorted(m[3] for m in planes) == [0, 2, 3]
        assert all(m[4].dtype == np.uint8 and m[4].shape == (48, 48) for m in planes)
    assert worker.pid == pid  # the same process served both runs
    # The second run on the same volume encoded nothing new: the feature cache was kept.
    assert second[-1][1]["info"]["slices_encoded"] == first[-1][1]["info"]["slices_encoded"] == 4
    assert not any(p.name.startswith("job-") for p in root.iterdir())  # each job's files removed

    worker.shutdown()
    assert wait_gone(*processes), "a worker process outlived shutdown()"
    assert not root.exists()


def test_killing_the_worker_mid_run_fails_the_run_restores_and_the_next_run_starts_a_new_worker(scene, worker_python):
    """The interpreter is killed as the system's out-of-memory killer would (SIGKILL). Through
    the launcher only its "exit abnormally" line and exit code 1 tell it: the run must say the
    interpreter ended abnormally (memory), never a plain "exited with code 1"."""
    from OFLSAM2SegmentLib.testing import make_annotated_volume

    volume, segmentation, ids = make_annotated_volume(scene, shape=(5, 32, 32))
    before = read_segments(segmentation, volume)
    pump = ManualPump()
    worker = Worker(python=worker_python())
    logic = OFLSAM2Logic(worker=worker, pump=pump)
    killed = []

    def kill_once_propagating(stage, done, total, text):
        if stage == "propagating" and not killed:
            killed.append(process_tree(worker.pid))
            os.kill(wait_for_interpreter(worker), signal.SIGKILL)

    run = logic.process(volume, segmentation, ids[:1], method="sam2", waitForCompletion=False,
                        progressCallback=kill_once_propagating, **FAST)
    pump.run_until_done(timeout=300)

    assert killed and run.state == "failed" and isinstance(run.error, WorkerDied)
    message = str(run.error)
    assert "next run starts a new worker" in message and "memory ran out" in message
    if worker_python.launcher:
        assert "interpreter behind Slicer's launcher (PythonSlicer) ended abnormally" in message, message
        assert "exited with code" not in message and "Report the problem" not in message
    else:
        assert "SIGKILL" in message
    assert run.restored and not logic.isRunning()
    after = read_segments(segmentation, volume)
    for segment_id in before:
        np.testing.assert_array_equal(after[segment_id], before[segment_id])
    assert wait_gone(*killed[0])

    summary = logic.process(volume, segmentation, ids[:1], method="sam2", **FAST)
    assert worker.pid not in killed[0] and summary["segments"][ids[0]]["written"] == 3
    processes = process_tree(worker.pid)
    worker.shutdown()
    assert wait_gone(*processes)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP to freeze the worker")
def test_a_worker_that_ignores_cancel_is_killed_after_the_grace_period(scene, worker_python):
    """The interpreter is stuck (stopped): the grace kill must end it, not only a launcher in
    front of it (before: the launcher died, the run waited for ever on the live interpreter)."""
    from OFLSAM2SegmentLib.testing import make_annotated_volume

    volume, segmentation, ids = make_annotated_volume(scene, shape=(5, 32, 32))
    before = read_segments(segmentation, volume)
    pump = ManualPump()
    worker = Worker(python=worker_python(), grace_seconds=1.0)
    logic = OFLSAM2Logic(worker=worker, pump=pump)
    frozen, frozen_at = [], []

    def freeze_and_cancel(stage, done, total, text):
        if stage == "propagating" and not frozen:
            frozen.extend(process_tree(worker.pid))
            frozen_at.append(time.monotonic())
            os.kill(wait_for_interpreter(worker), signal.SIGSTOP)  # stuck: the cancel message is never read
            logic.cancel()

    run = logic.process(volume, segmentation, ids[:1], method="sam2", waitForCompletion=False,
                        progressCallback=freeze_and_cancel, **FAST)
    pump.run_until_done(timeout=300)

    assert frozen and run.state == "cancelled" and run.restored
    assert time.monotonic() - frozen_at[0] < 20  # 1 s grace, then the kill
    assert wait_gone(*frozen), "the frozen worker was not killed"
    after = read_segments(segmentation, volume)
    for segment_id in before:
        np.testing.assert_array_equal(after[segment_id], before[segment_id])
    worker.shutdown()


def test_the_worker_never_loads_a_pickle_or_a_path_outside_its_folder(tmp_path):
    np.save(tmp_path / "plain.npy", np.arange(3), allow_pickle=False)
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.testing.assert_array_equal(load_array(tmp_path, "plain.npy"), np.arange(3))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_array(tmp_path, "pickled.npy")
    for name in ("../plain.npy", str(tmp_path / "plain.npy"), ".."):
        with pytest.raises(ValueError, match="plain names"):
            load_array(tmp_path, name)


def test_the_worker_command_uses_the_given_interpreter_and_finds_the_engine(tmp_path, worker_python):
    """The interpreter is injectable (Slicer: sys.executable, i.e. PythonSlicer); a request
    the worker cannot read gets an error event and the worker carries on until shutdown."""
    from OFLSAM2SegmentLib.worker import ProcessTransport

    events = []
    python = worker_python() or sys.executable
    transport = ProcessTransport(lambda t, event: events.append(event), python=python, root=tmp_path)
    assert transport.command == [python, "-m", "oflsam2.worker", "--root", str(tmp_path)]
    (tmp_path / "job-7").mkdir()
    transport.send({"type": "segment", "job": 7, "folder": str(tmp_path / "job-7"), "image": "missing.npy"})
    transport.send({"type": "shutdown"})
    transport.close_input()
    assert transport.wait(60)
    assert events[0]["event"] == "hello" and events[0]["protocol"] == PROTOCOL_VERSION
    assert events[0]["root"] == str(tmp_path.resolve())
    assert events[1]["event"] == "error" and events[1]["job"] == 7 and events[1]["error_type"] == "ProtocolError"
    assert "lacks settings" in events[1]["message"]
    assert events[-1] is None  # end of the connection
