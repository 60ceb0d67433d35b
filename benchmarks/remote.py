"""Benchmark: computing on an ``oflsam2 serve`` server vs the local worker process.

The same segmentation (CHAOS T2 case 2, a slab of ``--planes`` full 256x256 planes through the
liver with two annotated, random-weight SAM2.1-tiny at 256 px on the CPU) is run by the Slicer
module's own client (``OFLSAM2SegmentLib.worker.Worker``, no MRML):

- local:  with the worker process (``python -m oflsam2.worker``, pipes, ``.npy`` files);
- remote: with ``HttpTransport`` to ``oflsam2 serve`` on 127.0.0.1 (uploads, long-polled events
          with the planes inside).

Both start warm (model loaded by a first run); each measured run gets a volume of its own (the
intensities shifted: the same work, a cold feature cache). Prints:

- ``remote_over_local=``: median seconds of a run, remote / local (target <= 1.10);
- ``first_slice_local_s=`` / ``first_slice_remote_s=``: submit to the first plane received;
- ``concurrent_over_sequential=``: throughput of 4 clients (4 sessions) submitting at once over
  the same 4 jobs one after another on the same server (target >= 0.90: the device's queue
  loses nothing to concurrency);
- ``memory_per_session_mb=``: the server's resident memory per extra session that ran a job
  (its encoded slices and kept result; the model is shared).

    python benchmarks/remote.py [--planes 12] [--repeats 3] [--method sam2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "OFLSAM2Segment"))
DATA = REPO.parent / "shared" / "data" / "chaos_t2_fewshot"


def load_slab(case: int, planes: int):
    import numpy as np
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / f"image_{case}.nii.gz"))).astype(np.float32)
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / f"label_{case}.nii.gz"))))
    present = np.flatnonzero((labels == 1).any(axis=(1, 2)))
    first = max(0, int(present[len(present) // 2]) - planes // 2)
    return image[first:first + planes], labels[first:first + planes] == 1


def request(slab, liver, offset: float, method: str, epochs: int):
    import numpy as np

    from oflsam2.api import LabelSupport, MethodOptions, ModelSettings
    from OFLSAM2SegmentLib.worker import SegmentRequest

    planes = slab.shape[0]
    annotated = [planes // 4, (3 * planes) // 4]
    mask = np.zeros(liver.shape, bool)
    mask[annotated] = liver[annotated]
    settings = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256)
    return SegmentRequest(settings, slab + np.float32(offset), [LabelSupport(1, "liver", mask, annotated)], method, 0,
                          "auto", MethodOptions(epochs=epochs))


def timed(worker, job_request) -> tuple[float, float]:
    """(seconds to the run's end, seconds to its first plane) of one job."""
    from OFLSAM2SegmentLib.worker import MessageKind

    started = time.perf_counter()
    job = worker.submit(job_request)
    first = None
    while True:
        message = job.results.get(timeout=1800)
        if message[0] == MessageKind.SLICE and first is None:
            first = time.perf_counter() - started
        if message[0] in (MessageKind.DONE, MessageKind.ERROR, MessageKind.CANCELLED):
            if message[0] != MessageKind.DONE:
                raise RuntimeError(f"the run ended with {message}")
            list(job.messages())  # removes the job's files
            return time.perf_counter() - started, first


def start_server(folder: Path):
    token = secrets.token_urlsafe(24)
    token_file = folder / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = dict(os.environ, OFLSAM2_CONFIG_DIR=str(folder), PYTHONPATH=str(REPO / "OFLSAM2Segment"))
    process = subprocess.Popen([sys.executable, "-m", "oflsam2.cli", "serve", "--port", "0", "--device", "cpu",
                                "--token-file", str(token_file), "--stop-with-stdin"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:
        if "listening on" in line:
            return process, line.split("listening on ")[1].split()[0], token
    raise RuntimeError("the server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planes", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="sam2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--case", type=int, default=2)
    args = parser.parse_args()

    from oflsam2.client import ServerTarget
    from OFLSAM2SegmentLib.server_transport import HttpTransport
    from OFLSAM2SegmentLib.worker import Worker

    slab, liver = load_slab(args.case, args.planes)
    jobs = iter(range(1, 10_000))

    def next_request():
        return request(slab, liver, 10.0 * next(jobs), args.method, args.epochs)

    folder = Path(tempfile.mkdtemp(prefix="oflsam2-remote-benchmark-"))
    server, url, token = start_server(folder)
    target = ServerTarget(url, token)

    def remote_worker():
        return Worker(transport_factory=lambda on_event: HttpTransport(on_event, target))

    local, remote = Worker(), remote_worker()
    try:
        timed(local, next_request())  # model loaded, worker warm
        timed(remote, next_request())
        rss_one = rss_mb(server.pid)
        results = {"local": [], "remote": []}
        for _ in range(args.repeats):  # interleaved: the machine's load touches both alike
            results["local"].append(timed(local, next_request()))
            results["remote"].append(timed(remote, next_request()))
        for name, runs in results.items():
            print(f"{name}: runs {[round(s, 2) for s, _ in runs]} s, first plane {[round(f, 2) for _, f in runs]} s")
        median = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
        first = {name: statistics.median(f for _, f in runs) for name, runs in results.items()}
        print(f"remote_over_local={median['remote'] / median['local']:.3f}  (target <= 1.10; "
              f"{median['remote']:.2f} s vs {median['local']:.2f} s, {args.planes} planes, {args.method})")
        print(f"first_slice_local_s={first['local']:.2f}  first_slice_remote_s={first['remote']:.2f}")

        clients = [remote] + [remote_worker() for _ in range(3)]
        for client in clients[1:]:
            timed(client, next_request())  # each session opened and warm, as in the sequential case
        rss_four = rss_mb(server.pid)
        sequential_started = time.perf_counter()
        for client in clients:
            timed(client, next_request())
        sequential = time.perf_counter() - sequential_started
        together, errors = [], []

        def one(client):
            try:
                together.append(timed(client, next_request()))
            except Exception as exc:
                errors.append(exc)

        concurrent_started = time.perf_counter()
        threads = [threading.Thread(target=one, args=(client,)) for client in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent = time.perf_counter() - concurrent_started
        if errors:
            raise errors[0]
        print(f"concurrent_over_sequential={sequential / concurrent:.3f}  (target >= 0.90; 4 jobs: one after another "
              f"{sequential:.2f} s, all at once {concurrent:.2f} s, first plane at once "
              f"{statistics.median(f for _, f in together):.2f} s median)")
        print(f"memory_per_session_mb={(rss_four - rss_one) / 3:.0f}  (server resident memory {rss_one:.0f} MB with one "
              f"session, {rss_four:.0f} MB with four)")
        for client in clients[1:]:
            client.shutdown()
    finally:
        local.shutdown()
        remote.shutdown()
        server.stdin.close()
        server.wait(60)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
