"""Benchmark: the engine's ``sam2`` propagation vs SAM2VideoPredictor vs the component floor.

Each variant runs in its own subprocess (so peak RSS is its own) on the same real volume,
model (random weights), frames and prompts:

- engine:    ``Engine.segment(method="sam2")`` end to end (encoding included);
- predictor: ``SAM2VideoPredictor`` init_state + add_new_mask + propagate forward and backward;
- floor:     the image encoder, memory attention and mask decoder alone, timed inside the
             engine run (everything else — memory encoding, bookkeeping — is overhead).

Prints seconds per slice (median over --repeats), peak RSS and the ratios
engine/predictor (target <= 1.0) and engine/floor (target <= 1.15).

    python benchmarks/sam2_baseline.py [--image-size 512] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "OFLSAM2Segment"))
DEFAULT_CASE = REPO.parent / "shared" / "data" / "chaos_t2_fewshot"


def load_case(folder: Path):
    import numpy as np
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "image_1.nii.gz"))).astype(np.float32)
    liver = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_1.nii.gz")))) == 1
    present = np.flatnonzero(liver.any(axis=(1, 2)))
    annotated = [int(present[len(present) // 3]), int(present[2 * len(present) // 3])]
    return image, liver, annotated


def run_variant(variant: str, image_size: int, folder: Path) -> dict:
    import torch

    from oflsam2.api import Engine, LabelSupport, ModelSettings
    from oflsam2.backend import load_sam2
    from oflsam2.driver import Sam2Driver
    from oflsam2.features import FeatureCache, SliceStack
    from oflsam2.volume import apply_preset

    image, liver, annotated = load_case(folder)
    settings = ModelSettings(random_weights=True, device="cpu", image_size=image_size, encode_batch_size=1)
    model = load_sam2(settings)
    timings = {"encode": 0.0, "attend": 0.0, "decode": 0.0}

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            timings[key] += time.perf_counter() - start
            return result

        setattr(owner, name, wrapper)

    start = time.perf_counter()
    if variant == "predictor":
        import sam2.sam2_video_predictor as video_predictor

        stack = SliceStack(apply_preset(image, "mr"), 0)
        frames = stack.frames(range(len(stack)), image_size, model.device)
        video_predictor.load_video_frames = lambda **kwargs: (frames, *stack.slice_shape)
        start = time.perf_counter()  # frame preparation is shared work; time SAM2 itself
        state = model.net.init_state(video_path="frames-in-memory")
        for index in annotated:
            model.net.add_new_mask(state, index, 1, torch.from_numpy(liver[index]))
        for reverse in (False, True):
            for _ in model.net.propagate_in_video(state, reverse=reverse):
                pass
    else:
        timed(FeatureCache, "_encode_batch", "encode")
        timed(Sam2Driver, "attend", "attend")
        timed(Sam2Driver, "decode", "decode")
        Engine(settings, model=model).segment(image, [LabelSupport(1, "liver", liver, annotated)], method="sam2", preset="mr")
    seconds = time.perf_counter() - start
    if variant == "floor":
        seconds = timings["encode"] + timings["attend"] + timings["decode"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "seconds": seconds, "slices": int(image.shape[0]), "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DEFAULT_CASE, help="the CHAOS T2 folder of the shared data")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.image_size, args.data)))
        return

    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for variant in ("engine", "predictor", "floor"):
            command = [sys.executable, __file__, "--variant", variant, "--image-size", str(args.image_size),
                       "--threads", str(args.threads), "--data", str(args.data)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.setdefault(variant, []).append(json.loads(out.strip().splitlines()[-1]))
    per_slice = {v: statistics.median(r["seconds"] / r["slices"] for r in rs) for v, rs in results.items()}
    print(f"CHAOS T2 case 1 ({results['engine'][0]['slices']} slices), SAM2.1-tiny random weights, "
          f"image size {args.image_size}, CPU {args.threads} threads, median of {args.repeats}")
    for variant in ("engine", "predictor", "floor"):
        peak = max(r["peak_rss_mb"] for r in results[variant])
        print(f"  {variant:9s} {per_slice[variant]:.3f} s/slice   peak RSS {peak:.0f} MB")
    print(f"  engine / predictor = {per_slice['engine'] / per_slice['predictor']:.3f}  (target <= 1.0)")
    print(f"  engine / floor     = {per_slice['engine'] / per_slice['floor']:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
