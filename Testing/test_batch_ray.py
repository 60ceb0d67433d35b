"""Cohorts on Ray: a local Ray instance with 2 CPUs and 2 actors gives exactly the local
results (batch and experiment), a killed actor's case is retried on another, and an
unreachable cluster address is refused at once. Every Ray process is gone afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from cohort_data import CASES, read_array, read_table

from oflsam2 import batch, experiment
from oflsam2.api import Engine, MethodOptions
from oflsam2.executors import LocalExecutor, RayExecutor

ray = pytest.importorskip("ray")


def processes_mentioning(text: str) -> list[int]:
    """Process ids whose command line contains ``text`` (Linux /proc; none elsewhere)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with 2 CPUs in its own short temporary folder (socket paths are
    length-limited); shut down at the end, and no process of it may remain."""
    folder = tempfile.mkdtemp(prefix="oflray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=folder)
    yield
    ray.shutdown()
    deadline = time.monotonic() + 20
    while processes_mentioning(folder) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_mentioning(folder)
    shutil.rmtree(folder, ignore_errors=True)
    assert not left, f"Ray processes left running: {left}"


def adapter_job(cohort) -> batch.BatchJob:
    return batch.BatchJob("ofl", cohort.settings, MethodOptions(adapter=str(cohort.adapter)), labels=[1])


@pytest.fixture(scope="module")
def local_outputs(cohort, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    executor = LocalExecutor(lambda: Engine(cohort.settings, model=tiny_model))
    outcome = batch.run_batch(adapter_job(cohort), batch.collect_cases(cohort.images, out), out, executor)
    assert outcome.failed == 0
    return out


def assert_same_outputs(out: Path, reference: Path) -> None:
    for number in CASES:
        name = f"image_{number}_seg.nii.gz"
        assert np.array_equal(read_array(out / name), read_array(reference / name)), name


def test_ray_batch_equals_the_local_batch(ray_instance, cohort, local_outputs, tmp_path):
    out = tmp_path / "out"
    with RayExecutor(cohort.settings, max_cached_volumes=1, workers=2) as executor:
        outcome = batch.run_batch(adapter_job(cohort), batch.collect_cases(cohort.images, out), out, executor)
        assert executor.model_loads() == [1, 1]  # each actor loaded its model once, for all its cases
        workers = set(executor.pids.values())
    assert outcome.failed == 0
    assert_same_outputs(out, local_outputs)
    table = read_table(out / "cases.csv")
    assert all(row["status"] == "done" and row["attempts"] == "1" for row in table.values())
    assert len(workers) == 2 and os.getpid() not in workers


def test_a_killed_actor_s_case_is_retried_on_another(ray_instance, cohort, local_outputs, tmp_path):
    out = tmp_path / "out"
    killed = []

    def kill_during_first_case(index, attempt, pid):
        if not killed:
            killed.append((index, pid))
            # The case is on the actor; kill its process while it computes.
            threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()

    with RayExecutor(cohort.settings, max_cached_volumes=1, workers=2) as executor:
        executor.on_dispatch = kill_during_first_case
        outcome = batch.run_batch(adapter_job(cohort), batch.collect_cases(cohort.images, out), out, executor)
        assert executor.replaced == 1 and len(executor.pids) == 2 and killed[0][1] not in executor.pids.values()
    (index, pid), = killed
    assert outcome.failed == 0
    table = read_table(out / "cases.csv")
    victim = f"image_{CASES[index]}"
    assert table[victim]["attempts"] == "2"
    assert all(row["attempts"] == "1" for case, row in table.items() if case != victim)
    assert_same_outputs(out, local_outputs)
    assert not list(out.glob(".*")), "a temporary file of the killed attempt was left"


def test_experiment_on_ray_equals_local(ray_instance, cohort, tiny_model, tmp_path):
    config_file = tmp_path / "exp.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "cases": [
                    {"id": str(n), "image": str(cohort.images / f"image_{n}.nii.gz"), "label": str(cohort.labels / f"image_{n}.nii.gz")}
                    for n in CASES
                ],
                "labels": {1: "liver"},
                "support": {"mode": "slices", "volumes": ["1"], "slices_per_label": 2},
                "queries": ["2"],
                "methods": [{"method": "forward"}],
                "model": {"model": "sam2.1-tiny", "image_size": 256, "random_weights": True, "device": "cpu", "deterministic": True},
                "report": {"montage": False},
            }
        )
    )
    config = experiment.load_config(config_file)
    local = experiment.run_experiment(config, tmp_path / "local", engine_factory=lambda s: Engine(s, model=tiny_model), progress=False)
    with RayExecutor(config.model, max_cached_volumes=experiment.cached_volumes(config), workers=2) as executor:
        remote = experiment.run_experiment(config, tmp_path / "ray", progress=False, executor=executor)
    assert remote.computed == local.computed == 1
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in remote.rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in local.rows
    ]
    path = Path("group_0") / "forward" / "2" / experiment.PREDICTION_FILE
    assert np.array_equal(read_array(tmp_path / "ray" / path), read_array(tmp_path / "local" / path))


def test_an_unreachable_address_is_refused_at_once(cohort, tmp_path, capsys):
    import socket

    from oflsam2 import cli

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    started = time.monotonic()
    code = cli.main([
        "batch", str(cohort.images), "--out", str(tmp_path / "out"), "--method", "ofl", "--adapter", str(cohort.adapter),
        "--labels", "1", "--random-weights", "--image-size", "256", "--device", "cpu",
        "--executor", "ray", "--address", f"127.0.0.1:{port}",
    ])
    assert code == cli.EXIT_USER_ERROR and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"Cannot reach a Ray cluster at 127.0.0.1:{port}" in err and "ray start --head" in err
    assert not any((tmp_path / "out").glob("*_seg*"))


def test_cli_batch_on_its_own_ray_instance(cohort, local_outputs, tmp_path):
    """``--executor ray`` without ``--address``: the command starts a local Ray instance, runs
    the cases on it, shuts it down, and leaves no Ray process behind."""
    ray_root = tempfile.mkdtemp(prefix="oflcli", dir="/tmp")
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image\n{cohort.images / 'image_2.nii.gz'}\n")
    command = [
        sys.executable, "-m", "oflsam2.cli", "batch", str(manifest), "--out", str(tmp_path / "out"), "--method", "ofl",
        "--adapter", str(cohort.adapter), "--labels", "1", "--random-weights", "--image-size", "256", "--device", "cpu",
        "--deterministic", "--executor", "ray", "--workers", "1", "--json",
    ]
    try:
        done = subprocess.run(command, env={**os.environ, "RAY_TMPDIR": ray_root}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["cases"][0]["status"] == "done"
        name = "image_2_seg.nii.gz"
        assert np.array_equal(read_array(tmp_path / "out" / name), read_array(local_outputs / name))
        assert not processes_mentioning(ray_root), "the command left Ray processes running"
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class RayBatchCommand:
    """``oflsam2 batch --executor ray --workers 1 --json`` on the cohort, in a process of its own
    (a new session: its Ray processes are told from others), with its own Ray temp folder."""

    def __init__(self, cohort, tmp_path):
        self.ray_root = tempfile.mkdtemp(prefix="oflsig", dir="/tmp")
        self.out = tmp_path / "out"
        command = [
            sys.executable, "-m", "oflsam2.cli", "batch", str(cohort.images), "--out", str(self.out), "--method", "ofl",
            "--adapter", str(cohort.adapter), "--labels", "1", "--random-weights", "--image-size", "256", "--device", "cpu",
            "--deterministic", "--executor", "ray", "--workers", "1", "--json",
        ]
        self.process = subprocess.Popen(command, env={**os.environ, "RAY_TMPDIR": self.ray_root}, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)

    def wait_for_a_case(self) -> None:
        """Until the first case runs on the actor (its record is written first)."""
        deadline = time.monotonic() + 600  # Ray's start and the model load take minutes on a loaded 2-core machine
        while not list(self.out.glob("*.run.json")) and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(self.out.glob("*.run.json")), f"no case started: {self.process.communicate(timeout=60)[1][-2000:]}"

    def finish(self) -> tuple[str, str]:
        try:
            return self.process.communicate(timeout=300)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while processes_mentioning(self.ray_root) and time.monotonic() < deadline:
                time.sleep(0.5)
            self.left = processes_mentioning(self.ray_root)
            shutil.rmtree(self.ray_root, ignore_errors=True)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "Interrupted"), (signal.SIGTERM, 143, "Terminated")])
def test_cli_batch_on_ray_stops_on_a_signal_as_the_local_one_does(cohort, tmp_path, signum, code, word):
    """Issue 24 §5: under SIGTERM Ray's handler won (exit 1, or an abort with a C++ stack dump)
    instead of the documented 143; Ctrl+C must stop it with 130, keeping the finished cases."""
    run = RayBatchCommand(cohort, tmp_path)
    run.wait_for_a_case()
    run.process.send_signal(signum)
    _, err = run.finish()
    assert run.process.returncode == code, err[-3000:]
    assert f"error: {word}; finished cases are kept" in err and "SIGTERM received" not in err
    assert not run.left, "Ray processes were left running"


def test_a_dead_actor_s_notice_stays_off_stdout_under_json(cohort, tmp_path):
    """Issue 24 §5: Ray printed its notice of a dead actor on stdout, before the --json summary,
    so stdout no longer parsed. The killed case is retried on a new actor."""
    run = RayBatchCommand(cohort, tmp_path)
    run.wait_for_a_case()
    actors = [pid for pid in descendants(run.process.pid) if command_line(pid).startswith(b"ray::EngineWorker")]
    assert actors, "the actor process was not found"
    for pid in actors:
        os.kill(pid, signal.SIGKILL)
    out, err = run.finish()
    assert run.process.returncode == 0, err[-3000:]
    summary = json.loads(out)  # before: "A worker died or was killed ..." came first
    assert summary["failed"] == 0 and any(row["attempts"] == 2 for row in summary["cases"])
    assert not run.left, "Ray processes were left running"

