"""Benchmark: an update after one correction vs the full run it corrects (issue 11).

On a real CHAOS T2 volume with a random-weight SAM2.1-tiny on this CPU, per method (``ofl``,
``sam2``):

1. a full run with 3 annotated slices of the liver (at 15 %, 35 % and 85 % of its extent);
2. one more slice annotated in the middle of the liver and an update of that result
   (:meth:`Engine.update`): ``ofl`` warm-starts the head saved by the first run
   (``--warm-start-epochs`` x new slices / annotated slices, rounded up: 3 of the default 10
   here); propagation restarts from the new slice only.

Printed per method: seconds of both, ``update_over_full=<ratio>`` (target <= 0.35) with the
update on the same Engine (features cached, as in Slicer), the same ratio in CPU seconds of this
process (``cpu_update_over_full``), ``cold_update_over_full`` with a new
Engine that must encode the slices it visits (as a separate CLI process; model build
excluded), how many slices the update recomputed and, for ``ofl``, the warm-start epochs it
trained. Masks of random weights are meaningless, and the machine is shared: timings are single
runs, measured side by side. The defaults are the engine's (``MethodOptions()``).

    python benchmarks/repropagate.py [--case 1] [--epochs 40] [--warm-start-epochs 10] [--image-size 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "OFLSAM2Segment"))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chaos_t2_fewshot"
LIVER = 1


def load_case(folder: Path, case: int):
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"image_{case}.nii.gz"))).astype(np.float32)
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"label_{case}.nii.gz")))).astype(np.uint8)
    return image, labels


def chosen_slices(labels: np.ndarray) -> tuple[list[int], int]:
    """Three annotated slices at 15/35/85 % of the liver's extent, and its middle slice."""
    present = np.flatnonzero((labels == LIVER).any(axis=(1, 2)))
    at = [int(present[round(f * (len(present) - 1))]) for f in (0.15, 0.35, 0.85)]
    middle = int(present[len(present) // 2])
    if middle in at:
        raise SystemExit(f"the middle slice {middle} is already annotated; choose another case")
    return at, middle


def timed(function):
    """``(result, wall seconds, CPU seconds of this process)``: on a shared machine the CPU
    seconds move less with the other jobs' load than the wall time does."""
    start, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    from oflsam2.settings import MethodOptions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--case", type=int, default=1)
    defaults = MethodOptions()
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="OFL-SAM2 epochs of the full run")
    parser.add_argument("--warm-start-epochs", type=int, default=defaults.warm_start_epochs,
                        help="OFL-SAM2 warm-start epochs for an all-new support (the update scales them)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["ofl", "sam2"])
    args = parser.parse_args()

    import torch

    from oflsam2.api import Engine, LabelSupport, ModelSettings
    from oflsam2.backend import load_sam2

    torch.set_num_threads(args.threads)
    image, labels = load_case(args.data, args.case)
    annotated, middle = chosen_slices(labels)
    liver = labels == LIVER
    settings = ModelSettings(random_weights=True, device="cpu", image_size=args.image_size)
    model = load_sam2(settings)
    print(f"CHAOS T2 case {args.case}: {image.shape[0]} slices of {image.shape[1]}x{image.shape[2]}, liver on "
          f"{int(liver.any(axis=(1, 2)).sum())}; annotated {annotated}, then {middle}; SAM2.1-tiny random weights, "
          f"{args.image_size} px, {args.threads} threads")
    for method in args.methods:
        with tempfile.TemporaryDirectory() as adapter:
            full_options = MethodOptions(epochs=args.epochs, save_adapter=adapter if method == "ofl" else None)
            update_options = MethodOptions(warm_start_epochs=args.warm_start_epochs, adapter=adapter if method == "ofl" else None)
            run = dict(method=method, preset="mr")
            engine = Engine(settings, model=model)
            given = [LabelSupport(LIVER, "liver", liver, annotated)]
            first, full_seconds, full_cpu = timed(lambda: engine.segment(image, given, options=full_options, **run))
            corrected = [LabelSupport(LIVER, "liver", liver, sorted(annotated + [middle]))]
            updated, update_seconds, update_cpu = timed(lambda: engine.update(image, corrected, first, options=update_options, **run))
            cold = Engine(settings, model=model)
            cold_updated, cold_seconds, _ = timed(lambda: cold.update(image, corrected, first, options=update_options, **run))
        recomputed = updated.info["recomputed"][LIVER]
        propagated = image.shape[0] - len(annotated)
        warm = updated.info.get("labels", {}).get(LIVER, {}).get("warm_start")  # ofl only
        trained = f" warm_start_epochs_trained={warm['epochs']} (cap {args.warm_start_epochs})" if warm else ""
        print(f"method={method} full_s={full_seconds:.1f} update_s={update_seconds:.1f} "
              f"update_over_full={update_seconds / full_seconds:.3f} cpu_update_over_full={update_cpu / full_cpu:.3f} "
              f"cold_update_s={cold_seconds:.1f} "
              f"cold_update_over_full={cold_seconds / full_seconds:.3f} "
              f"slices_recomputed={len(recomputed)} of {propagated} propagated (slices {recomputed}); "
              f"cold encoded {cold_updated.info['slices_encoded']} slices{trained}")


if __name__ == "__main__":
    main()
