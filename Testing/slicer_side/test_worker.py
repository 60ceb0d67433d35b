"""The engine worker and its protocol: streaming, cancel, errors, GPU out-of-memory recovery and
array transfer (no Slicer needed). These use the worker loop on a thread (fake engines cannot
cross a process boundary); ``test_worker_process.py`` runs the real process."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from fakes import CopyEngine, RaisingEngine

from oflsam2.api import LabelSupport, MethodOptions, ModelSettings
from OFLSAM2SegmentLib.worker import GpuOutOfMemory, MessageKind, SegmentRequest, Worker, is_out_of_memory

SHAPE = (5, 6, 7)


def request(settings=None, slices=(2,), axis=0, image=None):
    mask = np.zeros(SHAPE, bool)
    selector = [slice(None)] * 3
    for s in slices:
        selector[axis] = s
        mask[tuple(selector)] = True
    mask[:, 0, 0] = False
    image = image if image is not None else np.zeros(SHAPE, np.float32)
    return SegmentRequest(settings or ModelSettings(random_weights=True), image, [LabelSupport(3, "organ", mask, list(slices))],
                          "sam2", axis, "auto", MethodOptions())


def collect(job, timeout=10.0):
    assert job.finished.wait(timeout), "job did not finish"
    return list(job.messages())


@pytest.fixture
def factory():
    built = []

    def make(engine_for):
        def build(settings):
            engine = engine_for(settings)
            built.append((settings, engine))
            return engine
        return build

    make.built = built
    return make


def test_streams_every_plane_once_and_reports_unstreamed_planes(factory):
    worker = Worker(factory(lambda s: CopyEngine(s, stream_every=2)))
    job = worker.submit(request(slices=(2,), axis=1))
    messages = collect(job)
    worker.shutdown()

    slices = [m for m in messages if m[0] == "slice"]
    assert sorted(m[3] for m in slices) == [0, 1, 3, 4, 5]  # every plane but the annotated one, once
    assert all(m[1] == 3 and m[2] == 1 for m in slices)
    for message in slices:
        assert message[4].dtype == np.uint8 and message[4].shape == (5, 7)
        assert set(np.unique(message[4])) <= {0, 1}
    assert any(m[0] == "progress" and m[1] == "propagating" for m in messages)
    assert messages[-1][0] == "done" and messages[-1][1]["info"] == {"fake": True}


def test_engine_is_kept_while_the_settings_stay_the_same(factory):
    worker = Worker(factory(CopyEngine))
    collect(worker.submit(request()))
    collect(worker.submit(request()))
    assert len(factory.built) == 1
    collect(worker.submit(request(ModelSettings(random_weights=True, image_size=512))))
    worker.shutdown()
    assert len(factory.built) == 2


def test_cancel_stops_the_job_and_the_worker_runs_the_next(factory):
    gate = threading.Event()
    worker = Worker(factory(lambda s: CopyEngine(s, block=gate)))
    job = worker.submit(request())
    job.cancel()
    assert collect(job)[-1] == ("cancelled",)
    gate.set()
    assert collect(worker.submit(request()))[-1][0] == "done"
    worker.shutdown()


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
])
def test_gpu_out_of_memory_is_a_distinct_error_and_frees_the_engine(factory, monkeypatch, error):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    worker = Worker(factory(lambda s: RaisingEngine(error)))
    settings = ModelSettings(random_weights=True, device="cuda", image_size=1024)

    kind, exc, trace = collect(worker.submit(request(settings)))[-1]

    assert kind == "error" and isinstance(exc, GpuOutOfMemory)
    # The original exception stays in the worker; its type and message come back (never pickled).
    assert str(exc.__cause__) == f"{type(error).__name__}: {error}"
    assert "cuda" in str(exc) and "image size" in str(exc).lower() and "cpu" in str(exc).lower()
    assert "out of memory" in trace
    assert emptied, "torch.cuda.empty_cache() was not called"
    collect(worker.submit(request(settings)))  # the released engine is built again
    worker.shutdown()
    assert len(factory.built) == 2


def test_other_errors_pass_through_and_keep_the_thread_alive(factory):
    worker = Worker(factory(lambda s: RaisingEngine(ValueError("bad option"))))
    kind, exc, trace = collect(worker.submit(request()))[-1]
    assert kind == "error" and isinstance(exc, ValueError) and not is_out_of_memory(exc)
    assert "ValueError: bad option" in trace
    assert worker.alive
    worker.shutdown()
    assert not worker.alive


def test_request_never_keeps_a_view():
    volume = np.zeros((2, *SHAPE), np.float32)
    view = volume[1]
    owned = np.zeros(SHAPE, np.float32)
    assert not np.shares_memory(request(image=view).image, volume)
    assert request(image=owned).image is owned  # an array the caller handed over is not copied again


def test_errors_come_back_with_their_type_and_unknown_types_as_worker_errors():
    from oflsam2.errors import InputError
    from OFLSAM2SegmentLib.worker import WorkerError, rebuild_error

    rebuilt = rebuild_error({"error_type": "InputError", "error_module": "oflsam2.errors", "message": "bad slices"})
    assert type(rebuilt) is InputError and str(rebuilt) == "bad slices"
    assert type(rebuild_error({"error_type": "KeyError", "error_module": "builtins", "message": "x"})) is KeyError
    # A name that is not an exception of a known module never becomes one (no arbitrary class lookup).
    for event in ({"error_type": "system", "error_module": "os", "message": "rm"},
                  {"error_type": "Popen", "error_module": "subprocess", "message": "ls"},
                  {"error_type": "print", "error_module": "builtins", "message": "x"}):
        error = rebuild_error(event)
        assert type(error) is WorkerError and event["error_type"] in str(error)


def test_a_result_plane_that_cannot_be_read_fails_the_job_instead_of_the_timer(factory):
    worker = Worker(factory(CopyEngine))
    job = worker.submit(request())
    assert job.finished.wait(10)
    for plane in job.folder.glob("plane-*.npy"):
        plane.unlink()
    messages = list(job.messages())
    worker.shutdown()
    assert messages[-1][0] == MessageKind.DONE
    errors = [m for m in messages if m[0] == MessageKind.ERROR]
    assert errors and "could not be read" in str(errors[0][1])
    assert not job.folder.exists()  # the job's files are removed with its final message
