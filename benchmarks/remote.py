"""Benchmark: computing on an ``oflsam2 serve`` server vs the local worker process.

The same segmentation (CHAOS T2 case 2, a slab of ``--planes`` full 256x256 planes through the
liver with two annotated, random-weight SAM2.1-tiny at 256 px on the CPU) is run by the Slicer
module's own client (``OFLSAM2SegmentLib.worker.Worker``, no MRML):

- local:  with the worker process (``python -m oflsam2.worker``, pipes, ``.npy`` files);
- remote: with ``HttpTransport`` to ``oflsam2 serve`` on 127.0.0.1 (uploads, long-polled events
          with the planes inside).

Both start warm (model loaded by a first run); each measured run gets a volume of its own (noise
of one intensity unit added: the same work, a cold feature cache). Runs are deterministic (one
torch thread in the computing process: the figures suffer less from other jobs on a shared
machine) and repeated, local and remote in turn; ratios compare the fastest of each. Prints:

- ``remote_over_local=``: seconds of a run, remote / local (target <= 1.10), also in CPU seconds;
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


def request(slab, liver, seed: int, method: str, epochs: int):
    import numpy as np

    from oflsam2.api import LabelSupport, MethodOptions, ModelSettings
    from OFLSAM2SegmentLib.worker import SegmentRequest

    planes = slab.shape[0]
    annotated = [planes // 4, (3 * planes) // 4]
    mask = np.zeros(liver.shape, bool)
    mask[annotated] = liver[annotated]
    settings = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256, deterministic=True)
    noise = np.random.default_rng(seed).normal(0.0, 1.0, slab.shape).astype(np.float32)
    return SegmentRequest(settings, slab + noise, [LabelSupport(1, "liver", mask, annotated)], method, 0,
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall and CPU seconds (this process + the computing process) of a block."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        self.wall, self.client, self.computing = time.perf_counter(), time.process_time(), cpu_seconds(self.pid)
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.client = time.process_time() - self.client
        self.computing = cpu_seconds(self.pid) - self.computing
        self.cpu = self.client + self.computing


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
        return request(slab, liver, next(jobs), args.method, args.epochs)

    folder = Path(tempfile.mkdtemp(prefix="oflsam2-remote-benchmark-"))
    server, url, token = start_server(folder)
    target = ServerTarget(url, token)

    def remote_worker():
        return Worker(transport_factory=lambda on_event: HttpTransport(on_event, target))

    local, remote = Worker(), remote_worker()
    clients = [remote]
    try:
        timed(local, next_request())  # model loaded, worker warm
        timed(remote, next_request())
        rss_one = rss_mb(server.pid)
        runs = {"local": [], "remote": []}
        for _ in range(args.repeats):  # interleaved: the machine's load touches both alike
            for name, worker, pid in (("local", local, local.pid), ("remote", remote, server.pid)):
                with Meter(pid) as meter:
                    _, first = timed(worker, next_request())
                runs[name].append((meter.wall, first, meter.cpu, meter.client))
        for name, measured in runs.items():
            print(f"{name}: runs {[round(m[0], 2) for m in measured]} s, first plane {[round(m[1], 2) for m in measured]} s, "
                  f"CPU {[round(m[2], 2) for m in measured]} s (of which the client {[round(m[3], 2) for m in measured]})")
        best = {name: [min(m[i] for m in measured) for i in range(3)] for name, measured in runs.items()}
        print(f"remote_over_local={best['remote'][0] / best['local'][0]:.3f}  (target <= 1.10; fastest of {args.repeats}: "
              f"{best['remote'][0]:.2f} s vs {best['local'][0]:.2f} s, {args.planes} planes, {args.method}; in CPU "
              f"seconds of client and computing process {best['remote'][2] / best['local'][2]:.3f})")
        print(f"first_slice_local_s={best['local'][1]:.2f}  first_slice_remote_s={best['remote'][1]:.2f}")

        clients += [remote_worker() for _ in range(3)]
        for client in clients[1:]:
            timed(client, next_request())  # each session opened and warm, as in the sequential case
        rss_four = rss_mb(server.pid)
        pairs = []
        for _ in range(args.repeats):
            with Meter(server.pid) as sequential:
                for client in clients:
                    timed(client, next_request())
            together, errors = [], []

            def one(client):
                try:
                    together.append(timed(client, next_request()))
                except Exception as exc:
                    errors.append(exc)

            with Meter(server.pid) as concurrent:
                threads = [threading.Thread(target=one, args=(client,)) for client in clients]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            if errors:
                raise errors[0]
            pairs.append((sequential.wall, concurrent.wall, sequential.cpu, concurrent.cpu,
                          statistics.median(f for _, f in together)))
        for sequential_wall, concurrent_wall, sequential_cpu, concurrent_cpu, first in pairs:
            print(f"4 jobs: one after another {sequential_wall:.2f} s ({sequential_cpu:.1f} CPU s), all at once "
                  f"{concurrent_wall:.2f} s ({concurrent_cpu:.1f} CPU s), first plane at once {first:.2f} s median")
        ratio = min(p[0] for p in pairs) / min(p[1] for p in pairs)
        cpu_ratio = min(p[2] for p in pairs) / min(p[3] for p in pairs)
        print(f"concurrent_over_sequential={ratio:.3f}  (target >= 0.90; throughput at once over one after another, "
              f"fastest of {len(pairs)} each; in CPU seconds {cpu_ratio:.3f})")
        print(f"memory_per_session_mb={(rss_four - rss_one) / 3:.0f}  (server resident memory {rss_one:.0f} MB with one "
              f"session, {rss_four:.0f} MB with four)")
    finally:
        local.shutdown()
        for client in clients:
            client.shutdown()
        server.stdin.close()
        server.wait(60)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
