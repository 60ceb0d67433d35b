"""The Slicer logic against real MRML (slicer-core) computing on a real ``oflsam2 serve`` (a
process on 127.0.0.1 at a free port, random-weight SAM2.1-tiny at 256 px on the CPU): the same
runs give the same segments as with the local worker, and every Slicer-side guarantee holds
through the server: streamed writes, Cancel restores, one undo step, Update, the review table,
an adapter saved and used. A server killed mid-run fails the run with its reason and restores the
segments; a restarted one refuses the Update with the reason; the token is never logged."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fakes import ManualPump
from mrml_helpers import add_segmentation, add_volume_from_sitk, read_segments, require_slicer

slicer = require_slicer()
pytestmark = [pytest.mark.slicer, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/: the server helpers
from server_helpers import ServerProcess, chaos_crop  # noqa: E402

from OFLSAM2SegmentLib import compute, mrml_geometry, mrml_write  # noqa: E402
from OFLSAM2SegmentLib.logic import OFLSAM2Logic  # noqa: E402
from OFLSAM2SegmentLib.server_transport import HttpTransport  # noqa: E402
from OFLSAM2SegmentLib.worker import Worker  # noqa: E402

# deterministic: one torch thread in both processes, so that the server computes exactly what this one does
REAL = {"randomWeights": True, "device": "cpu", "model": "sam2.1-tiny", "imageSize": 256, "deterministic": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("server")) as running:
        yield running


def local_worker(tiny_model):
    from oflsam2.api import Engine

    return Worker(lambda settings: Engine(settings, model=tiny_model))


def server_worker(server, reconnect_seconds=20.0):
    target = server.target()
    return Worker(transport_factory=lambda on_event: HttpTransport(on_event, target, reconnect_seconds))


def liver_scene(scene, shared_data, slices=8):
    """A CHAOS MR crop with Liver annotated on two planes and Spleen, which no run may touch."""
    _, labels, image = chaos_crop(shared_data, 2, slices=slices, size=96)
    volume = add_volume_from_sitk(scene, image)
    annotation = np.zeros(labels.shape, bool)
    for index in (1, slices - 2):
        annotation[index] = labels[index] == 1
    segmentation, ids = add_segmentation(scene, volume, {"Liver": annotation, "Spleen": labels == 4})
    return labels, volume, segmentation, ids


def run_and_update(logic, scene, shared_data) -> dict:
    """OFL-SAM2, the review table, a correction and an Update, the Update undone: what each step left."""
    labels, volume, segmentation, ids = liver_scene(scene, shared_data)
    liver, spleen = ids
    before = read_segments(segmentation, volume)
    first = logic.process(volume, segmentation, [liver], method="ofl", axis="axial", epochs=1, **REAL)
    after_run = read_segments(segmentation, volume)
    quality = logic.lastRunQuality(liver)
    corrected = 4
    mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume)).write(liver, 0, corrected, labels[corrected] == 1)
    before_update = read_segments(segmentation, volume)
    update = logic.update()
    after_update = read_segments(segmentation, volume)
    assert logic.undoLastRun()  # the whole update is one undo step
    undone = read_segments(segmentation, volume)
    np.testing.assert_array_equal(undone[liver], before_update[liver])
    np.testing.assert_array_equal(after_update[spleen], before[spleen])
    return {"run": after_run[liver], "written": first["segments"][liver]["written"], "quality": quality,
            "update": after_update[liver], "recomputed": update["segments"][liver]["recomputed"],
            "edited": update["engine"]["edited"]}


def test_a_run_and_an_update_through_the_server_give_the_local_segments(server, shared_data, tiny_model, slicer_core):
    results = {}
    for where, worker in (("local", local_worker(tiny_model)), ("server", server_worker(server))):
        scene = slicer_core.vtkMRMLScene()
        logic = OFLSAM2Logic(worker=worker, pump=ManualPump())
        try:
            results[where] = run_and_update(logic, scene, shared_data)
        finally:
            worker.shutdown()
            scene.Clear(1)
    local, remote = results["local"], results["server"]
    assert remote["written"] == local["written"] == 6
    np.testing.assert_array_equal(remote["run"], local["run"])
    assert remote["quality"] == local["quality"]
    assert remote["edited"] == local["edited"] == [4]
    assert remote["recomputed"] == local["recomputed"] and remote["recomputed"]
    np.testing.assert_array_equal(remote["update"], local["update"])


def test_cancel_through_the_server_restores_the_segments(server, scene, shared_data):
    _, volume, segmentation, ids = liver_scene(scene, shared_data)
    before = read_segments(segmentation, volume)
    pump = ManualPump()
    worker = server_worker(server)
    logic = OFLSAM2Logic(worker=worker, pump=pump)
    written = []

    def cancel_after_two_planes(stage, done, total, text):
        written.append(stage)
        if logic.lastRun is not None and sum(logic.lastRun._written.values()) >= 2 and not logic.lastRun.job.cancel_requested:
            logic.cancel()

    try:
        run = logic.process(volume, segmentation, ids[:1], method="sam2", waitForCompletion=False,
                            progressCallback=cancel_after_two_planes, **REAL)
        pump.run_until_done(300)
        assert run.state == "cancelled" and run.restored, run.error
        after = read_segments(segmentation, volume)
        for segment_id in ids:
            np.testing.assert_array_equal(after[segment_id], before[segment_id])
        assert not logic.canUndo()  # a cancelled run leaves nothing to undo
        # the session goes on: the next run completes
        summary = logic.process(volume, segmentation, ids[:1], method="sam2", **REAL)
        assert summary["segments"][ids[0]]["written"] == 6
    finally:
        worker.shutdown()


def test_an_adapter_saved_through_the_server_segments_a_cohort_as_locally(server, shared_data, tiny_model, slicer_core,
                                                                           tmp_path):
    created = {}
    for where, worker in (("local", local_worker(tiny_model)), ("server", server_worker(server))):
        scene = slicer_core.vtkMRMLScene()
        logic = OFLSAM2Logic(worker=worker, pump=ManualPump())
        try:
            _, volume, segmentation, ids = liver_scene(scene, shared_data)
            adapter = tmp_path / where
            logic.saveAdapter(volume, segmentation, str(adapter), ids[:1], epochs=1, **REAL)
            assert sorted(p.name for p in adapter.iterdir()) == ["Liver.json", "Liver.safetensors"]
            _, _, image = chaos_crop(shared_data, 3, slices=6, size=96)
            cohort = add_volume_from_sitk(scene, image)
            (made,) = logic.segmentVolumesWithAdapter([cohort], str(adapter), **REAL)
            created[where] = read_segments(made, cohort)[made.GetSegmentation().GetNthSegmentID(0)]
        finally:
            worker.shutdown()
            scene.Clear(1)
    assert created["server"].any()
    np.testing.assert_array_equal(created["server"], created["local"])


def test_a_killed_server_fails_the_run_and_a_restarted_one_refuses_the_update(scene, shared_data, tmp_path):
    from oflsam2.errors import InputError

    labels, volume, segmentation, ids = liver_scene(scene, shared_data)
    annotation = np.zeros(labels.shape, bool)
    annotation[[1, 6]] = labels[[1, 6]] == 1
    other, other_ids = add_segmentation(scene, volume, {"Liver again": annotation})  # for the run the kill interrupts
    first = ServerProcess(tmp_path / "first")
    pump = ManualPump()
    worker = server_worker(first, reconnect_seconds=2.0)
    logic = OFLSAM2Logic(worker=worker, pump=pump)
    second = None
    try:
        logic.process(volume, segmentation, ids[:1], method="sam2", **REAL)  # a result the server keeps
        before = read_segments(other, volume)
        killed = []

        def kill_once_propagating(stage, done, total, text):  # after the first streamed plane was written
            if logic.lastRun is not None and any(logic.lastRun._written.values()) and not killed:
                killed.append(first.process.pid)
                os.kill(first.process.pid, signal.SIGKILL)

        run = logic.process(volume, other, other_ids, method="ofl", waitForCompletion=False, epochs=1,
                            progressCallback=kill_once_propagating, **REAL)
        pump.run_until_done(300)
        assert killed and run.state == "failed" and run.restored, (run.state, run.error)
        assert f"server at {first.url}" in str(run.error) and "Nothing answers" in str(run.error)
        np.testing.assert_array_equal(read_segments(other, volume)[other_ids[0]], before[other_ids[0]])
        after = read_segments(segmentation, volume)

        second = ServerProcess(tmp_path / "second", port=first.port, token_file=first.token_file)
        mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume)).write(
            ids[0], 0, 3, after[ids[0]][1])  # a correction, then Update: the server lost the result
        corrected = read_segments(segmentation, volume)
        with pytest.raises(InputError, match="no longer holds the result of that run .*restarted"):
            logic.update()
        now = read_segments(segmentation, volume)
        for segment_id in ids:
            np.testing.assert_array_equal(now[segment_id], corrected[segment_id])
        summary = logic.process(volume, other, other_ids, method="sam2", **REAL)  # a fresh run works
        assert summary["segments"][other_ids[0]]["written"] == 6
    finally:
        worker.shutdown()
        first.stop()
        if second is not None:
            second.stop()


def test_compute_on_a_server_from_the_settings_installs_nothing_and_never_logs_the_token(server, scene, shared_data,
                                                                                       caplog):
    from OFLSAM2SegmentLib.shared_worker import shutdown_shared_worker

    _, volume, segmentation, ids = liver_scene(scene, shared_data, slices=4)
    compute.save(compute.ComputeSettings(compute.SERVER, server.url, server.token))
    installs = []
    logic = OFLSAM2Logic(pump=ManualPump(), installer=lambda: installs.append(1))
    caplog.set_level(logging.DEBUG)
    try:
        assert server.token not in repr(compute.load()) and server.token not in repr(logic.computeTarget())
        assert "token was accepted" in logic.testServerConnection(server.url, server.token)
        summary = logic.process(volume, segmentation, ids[:1], method="sam2", **REAL)
        assert summary["segments"][ids[0]]["written"] == 2
        assert isinstance(logic.worker.transport, HttpTransport) and installs == []
        with pytest.raises(Exception, match="refused the token") as refused:
            logic.testServerConnection(server.url, "wrong-token")
        assert "wrong-token" not in str(refused.value)
        compute.save(compute.ComputeSettings(compute.SERVER, "", ""))
        with pytest.raises(Exception, match="needs the server's URL and its token"):
            logic.process(volume, segmentation, ids[:1], method="sam2", **REAL)
    finally:
        compute.save(compute.ComputeSettings())
        shutdown_shared_worker()
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert server.token not in logged and server.token not in server.log_text()


NO_HEAVY = textwrap.dedent('''
    """Slicer's Python in server mode: a run and an Update with torch, sam2, safetensors, hydra, scipy... absent."""
    import importlib.abc
    import sys

    BLOCKED = ("torch", "torchvision", "sam2", "safetensors", "hydra", "omegaconf", "iopath", "scipy", "tqdm", "PIL",
               "fastapi", "uvicorn", "starlette", "httpx")

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (absent in this Slicer)")
            return None

    sys.meta_path.insert(0, Absent())
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import numpy as np

    from mrml_helpers import read_segments
    from test_server_logic import REAL, liver_scene
    import slicer
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    from OFLSAM2SegmentLib import mrml_geometry, mrml_write
    from OFLSAM2SegmentLib.logic import OFLSAM2Logic
    from OFLSAM2SegmentLib.shared_worker import shutdown_shared_worker
    from pathlib import Path

    scene = slicer.vtkMRMLScene()
    labels, volume, segmentation, ids = liver_scene(scene, Path(sys.argv[3]), slices=6)
    logic = OFLSAM2Logic()
    logic.useServer(sys.argv[4], sys.argv[5])
    summary = logic.process(volume, segmentation, ids[:1], method="ofl", epochs=1, **REAL)
    mrml_write.SegmentPlaneReplacer(segmentation, mrml_geometry.volume_geometry(volume)).write(ids[0], 0, 2, labels[2] == 1)
    update = logic.update()
    shutdown_shared_worker()
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("written", summary["segments"][ids[0]]["written"], "recomputed", update["segments"][ids[0]]["recomputed"],
          "heavy", heavy)
''')


def test_slicer_in_server_mode_needs_no_torch_nor_sam2(server, shared_data, tmp_path):
    script = tmp_path / "slicer_without_torch.py"
    script.write_text(NO_HEAVY)
    here = Path(__file__).resolve().parent
    module = here.parents[1] / "OFLSAM2Segment"
    done = subprocess.run([sys.executable, str(script), str(here), str(module), str(shared_data), server.url, server.token],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written 4 recomputed [" in done.stdout and "heavy []" in done.stdout, done.stdout
