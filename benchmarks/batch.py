"""Benchmark: ``oflsam2 batch`` in this process (``local``) vs on Ray actors (``ray``).

The six shared CHAOS T2 volumes, whole, segmented with an OFL-SAM2 adapter (trained first on
three liver slices of case 1, not timed) by a random-weight SAM2.1-tiny at --image-size on this CPU. Each executor
runs the same batch into its own folder; the clock starts before the executor is made, so
start-up (Ray instance, actors, model loads) is part of both figures. Prints, per executor:
cases per minute, seconds from start to the first finished case, model loads per worker; then
``ray_over_local=<ratio>`` (throughput of ray over local; target >= 0.9 on a 2-core machine,
where parallelism cannot gain much: the point is overhead).

    python benchmarks/batch.py [--workers 2] [--image-size 256] [--data DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "OFLSAM2Segment"))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chaos_t2_fewshot"
CASES = (1, 2, 3, 5, 8, 10)


def train_adapter(data: Path, folder: Path, settings, epochs: int) -> Path:
    import numpy as np
    import SimpleITK as sitk

    from oflsam2 import pipeline
    from oflsam2.api import MethodOptions

    adapter = folder / "adapter"
    liver = np.flatnonzero((np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(data / "label_1.nii.gz")))) == 1).any(axis=(1, 2)))
    pipeline.segment_files(
        data / "image_1.nii.gz", data / "label_1.nii.gz", folder / "training.nii.gz", labels=[1], method="ofl",
        support_slices=[int(liver[i]) for i in np.linspace(0, len(liver) - 1, 3).round().astype(int)],
        settings=settings, options=MethodOptions(epochs=epochs, save_adapter=str(adapter)),
    )
    return adapter


def timed_batch(executor_factory, job, images: Path, out: Path) -> dict:
    from oflsam2 import batch

    started = time.perf_counter()
    finished = []
    with executor_factory() as executor:
        cases = batch.collect_cases(images, out)
        outcome = batch.run_batch(job, cases, out, executor, on_case_done=lambda row: finished.append(time.perf_counter() - started))
        loads = executor.model_loads()
    seconds = time.perf_counter() - started
    failed = [r for r in outcome.rows if r["status"] != "done"]
    if failed:
        raise SystemExit(f"cases failed: {failed}")
    return {"cases": len(cases), "seconds": seconds, "first": finished[0], "loads": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="adapter training epochs (untimed)")
    args = parser.parse_args()

    from oflsam2 import batch, executors
    from oflsam2.api import MethodOptions, ModelSettings

    settings = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=args.image_size)
    with tempfile.TemporaryDirectory(prefix="oflsam2-batch-bench-") as tmp:
        folder = Path(tmp)
        images = folder / "images"
        images.mkdir()
        for case in CASES:
            (images / f"image_{case}.nii.gz").symlink_to(args.data / f"image_{case}.nii.gz")
        adapter = train_adapter(args.data, folder, settings, args.epochs)
        job = batch.BatchJob("ofl", settings, MethodOptions(adapter=str(adapter)), labels=[1])
        loads_before = executors.MODEL_LOADS
        local = timed_batch(lambda: executors.make_executor("local", settings, max_cached_volumes=1), job, images, folder / "local")
        local["loads"] = [executors.MODEL_LOADS - loads_before]
        ray = timed_batch(
            lambda: executors.make_executor("ray", settings, max_cached_volumes=1, workers=args.workers), job, images, folder / "ray"
        )
    print(f"{len(CASES)} CHAOS T2 volumes, OFL-SAM2 adapter, random SAM2.1-tiny at {args.image_size} px, CPU")
    for name, figures in (("local", local), (f"ray ({args.workers} workers)", ray)):
        print(
            f"{name}: {figures['cases'] / figures['seconds'] * 60:.2f} cases/min ({figures['seconds']:.1f} s in all); "
            f"first case finished after {figures['first']:.1f} s; model loads per worker {figures['loads']}"
        )
    ratio = (ray["cases"] / ray["seconds"]) / (local["cases"] / local["seconds"])
    print(f"ray_over_local={ratio:.2f}")


if __name__ == "__main__":
    main()
