"""Benchmark: OFL-SAM2 propagation vs the ``sam2`` baseline, and OFL-SAM2 training time.

On a real CHAOS T2 volume with a random-weight SAM2.1-tiny on this CPU:

1. seconds per propagated slice of ``ofl`` (training excluded) and of ``sam2`` on the same
   volume, model and annotated slices, slices already encoded, at --propagation-sizes; "all
   accepted" (gamma 0: every slice joins the bank, every object slice refits the learner) is
   the worst case (target <= 1.25x sam2);
2. training time of the fusion head for 5, 10 and 20 support slices at --image-sizes:
   full runs of --epochs where --full-epochs-max-size allows, otherwise the measured time of
   --probe-epochs epochs scaled to --epochs (printed as an extrapolation); target <= 60 s for
   10 slices, 40 epochs, 256 px;
3. peak RSS of the process.

Each figure is measured for the ``paper`` preset (``MethodOptions()``) and, side by side in the
same process, for the ``extended`` one and the options that restore the behaviour before issue
10 (``LEGACY``, on top of ``extended``); training also with ``train_solver="samples"`` (the
unrolled fit through autograd, the default before the Krylov solver). The summary lines
``train_s_10_slices=`` and ``accepted_over_sam2=`` (256 px, ``paper``) come last.

    python benchmarks/ofl.py [--propagation-sizes 256 512] [--image-sizes 256 1024] [--epochs 40]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "OFLSAM2Segment"))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chaos_t2_fewshot"


def load_case(folder: Path, case: int = 1):
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"image_{case}.nii.gz"))).astype(np.float32)
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"label_{case}.nii.gz")))).astype(np.uint8)
    return image, labels


def support_slices(labels: np.ndarray, label: int, count: int) -> list[int]:
    """``count`` slices spread over the volume, preferring those that contain the label."""
    present = np.flatnonzero((labels == label).any(axis=(1, 2)))
    pool = present if len(present) >= count else np.arange(labels.shape[0])
    return sorted({int(i) for i in pool[np.linspace(0, len(pool) - 1, count).round().astype(int)]})


# Options that, on top of MethodOptions.extended(), restore OFL-SAM2 as it was before issue 10.
LEGACY = dict(
    initial_fit="even", learner_iters_first=None, retrieval_object_guarantee=False, empty_episodes_per_object=None,
    episode_recent_memories=False, candidate_loss="min", overfit_guard="none", accept_absent=False, online_solver="samples",
    train_solver="samples",
)
PRESETS = {"paper": {}, "extended": {"ofl_preset": "extended"}, "samples": {"ofl_preset": "extended", "train_solver": "samples"},
           "legacy": {"ofl_preset": "extended", **LEGACY}}


def ofl_options(ofl_preset: str = "paper", **overrides):
    from oflsam2.api import MethodOptions

    return MethodOptions.preset(ofl_preset, **overrides)


def time_training(engine, image, labels, count: int, epochs: int, **overrides):
    """Seconds spent in OFL-SAM2's training loop for ``epochs`` epochs on ``count`` slices."""
    from oflsam2.api import LabelSupport
    from oflsam2.methods import ofl

    spent = []
    original = ofl.train

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return result

    ofl.train = timed
    try:
        slices = support_slices(labels, 1, count)
        support = LabelSupport(1, "liver", labels == 1, slices)
        engine.segment(image, [support], method="ofl", preset="mr", options=ofl_options(epochs=epochs, **overrides))
    finally:
        ofl.train = original
    return spent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[256, 1024], help="training sizes")
    parser.add_argument("--propagation-sizes", type=int, nargs="*", default=[256, 512])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--probe-epochs", type=int, default=2)
    parser.add_argument("--full-epochs-max-size", type=int, default=256)
    parser.add_argument("--support-counts", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--repeats", type=int, default=3, help="propagation timings (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()

    import torch

    from oflsam2.api import Engine, LabelSupport, ModelSettings

    torch.set_num_threads(args.threads)
    image, labels = load_case(args.data)
    annotated = support_slices(labels, 1, 3)
    print(f"CHAOS T2 case 1 ({image.shape[0]} slices), SAM2.1-tiny random weights, CPU {args.threads} threads")
    support = [LabelSupport(1, "liver", labels == 1, annotated)]
    summary = {}
    for size in args.propagation_sizes:
        engine = Engine(ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=size))
        engine.segment(image, support, method="sam2", preset="mr")  # encode once; both reuse the cache
        tracked = image.shape[0] - len(annotated)
        # Random weights pass the confidence gate rarely; "all accepted" (gamma 0) is the worst
        # case: every slice joins the bank and every object slice refits the learner.
        variants = {
            "sam2": ("sam2", None),
            "ofl": ("ofl", ofl_options(epochs=0)),
            "ofl, all accepted": ("ofl", ofl_options(epochs=0, gamma=0.0)),
            "extended, all accepted": ("ofl", ofl_options("extended", epochs=0, gamma=0.0)),
            "legacy, all accepted": ("ofl", ofl_options(epochs=0, gamma=0.0, **PRESETS["legacy"])),
        }
        timings = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (method, options) in variants.items():
                start = time.perf_counter()
                engine.segment(image, support, method=method, preset="mr", options=options)
                timings[name].append((time.perf_counter() - start) / tracked)
        per_slice = {m: statistics.median(t) for m, t in timings.items()}
        print(f"image size {size}: propagation, median of {args.repeats}, {tracked} tracked slices")
        for name in variants:
            print(f"  {name:20s} {per_slice[name]:.3f} s/slice   /sam2 = {per_slice[name] / per_slice['sam2']:.3f}")
        if size == 256:
            summary["accepted_over_sam2"] = per_slice["ofl, all accepted"] / per_slice["sam2"]
    for size in args.image_sizes:
        engine = Engine(ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=size))
        print(f"image size {size}: training")
        for count in args.support_counts:
            for variant, overrides in PRESETS.items():
                if size <= args.full_epochs_max_size:
                    seconds = time_training(engine, image, labels, count, args.epochs, **overrides)
                    note = f"{args.epochs} epochs measured"
                else:
                    seconds = time_training(engine, image, labels, count, args.probe_epochs, **overrides) * args.epochs / args.probe_epochs
                    note = f"{args.probe_epochs} epochs measured, x{args.epochs / args.probe_epochs:g} extrapolated"
                print(f"  {variant:9s} training on {count:2d} support slices: {seconds:7.1f} s for {args.epochs} epochs ({note})")
                if size == 256 and count == 10 and variant == "paper":
                    summary["train_s_10_slices"] = seconds
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    for key, value in summary.items():
        print(f"{key}={value:.3f}")


if __name__ == "__main__":
    main()
