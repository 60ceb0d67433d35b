"""Benchmark on a CUDA GPU: seconds per slice of ``sam2``, ``ofl`` and ``revsam2``, OFL-SAM2
training time and peak GPU memory, at 1024 px in bf16, for SAM2.1-tiny and SAM2.1-base-plus.

The volume is CHAOS T2 case 1 resized to 512 x 512 in-plane and repeated along z to 300
slices (the size the targets are stated for: >= 20 slices/s for ``ofl`` with tiny on an
H100-class GPU, <= 8 GB peak). Random weights (no checkpoint is needed; speed does not depend
on the weights, except that random weights pass OFL-SAM2's confidence gate at another rate;
"all accepted" (gamma 0) gives the worst case). Without CUDA it says so and exits with 0.

    python benchmarks/gpu.py [--models sam2.1-tiny sam2.1-base-plus] [--slices 300] [--epochs 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "OFLSAM2Segment"))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chaos_t2_fewshot"


def benchmark_volume(folder: Path, slices: int, size: int = 512):
    """CHAOS case 1 resized to size x size and tiled along z to ``slices`` -> (image, labels)."""
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "image_1.nii.gz"))).astype(np.float32)
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label_1.nii.gz")))).astype(np.uint8)
    image = F.interpolate(torch.from_numpy(image)[:, None], size=(size, size), mode="bilinear")[:, 0].numpy()
    labels = F.interpolate(torch.from_numpy(labels.astype(np.float32))[:, None], size=(size, size), mode="nearest")[:, 0].numpy()
    repeats = -(-slices // image.shape[0])
    return np.tile(image, (repeats, 1, 1))[:slices], np.tile(labels.astype(np.uint8), (repeats, 1, 1))[:slices]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sam2.1-tiny", "sam2.1-base-plus"])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--support-slices", type=int, default=10, help="annotated liver slices (OFL training set)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured.")
        return 0

    from oflsam2.api import Engine, LabelSupport, MethodOptions, ModelSettings

    card = torch.cuda.get_device_name(0)
    image, labels = benchmark_volume(args.data, args.slices)
    present = np.flatnonzero((labels == 1).any(axis=(1, 2)))
    annotated = sorted({int(i) for i in present[np.linspace(0, len(present) - 1, args.support_slices).round().astype(int)]})
    support = [LabelSupport(1, "liver", labels == 1, annotated)]
    tracked = image.shape[0] - len(annotated)
    print(f"{card}; volume {image.shape} (z, y, x), {len(annotated)} annotated slices, {args.image_size} px, bf16, random weights")
    for model in args.models:
        settings = ModelSettings(model=model, random_weights=True, device="cuda", image_size=args.image_size, feature_dtype="bfloat16")
        engine = Engine(settings)
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        engine.segment(image, support, method="sam2", preset="mr")  # encodes the volume once for all methods
        torch.cuda.synchronize()
        print(f"{model}: first run (encoding + sam2) {time.perf_counter() - start:.1f} s")
        runs = {
            "sam2": ("sam2", None),
            "ofl": ("ofl", MethodOptions(epochs=0)),
            "ofl, all accepted": ("ofl", MethodOptions(epochs=0, gamma=0.0)),
            "revsam2": ("revsam2", None),
        }
        for name, (method, options) in runs.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.segment(image, support, method=method, preset="mr", options=options)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / tracked
            print(f"  {name:18s} {seconds:.4f} s/slice  ({1 / seconds:.1f} slices/s)")
        from oflsam2.methods import ofl

        spent, original = [], ofl.train

        def timed(*a, **k):
            begin = time.perf_counter()
            result = original(*a, **k)
            torch.cuda.synchronize()
            spent.append(time.perf_counter() - begin)
            return result

        ofl.train = timed
        try:
            engine.segment(image, support, method="ofl", preset="mr", options=MethodOptions(epochs=args.epochs))
        finally:
            ofl.train = original
        print(f"  ofl training: {spent[0]:.1f} s for {args.epochs} epochs on {len(annotated)} slices")
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        del engine
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
