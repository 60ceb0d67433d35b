"""Benchmark: time of each RevSAM2 stage with 5 and 10 support slices.

Query: CHAOS T2 case 1 (liver); supports: liver slices of cases 2, 3 and 5 spread evenly, passed
as reference volumes. Random-weight SAM2.1-tiny on this CPU; slices are encoded before timing
(every stage reads the same feature cache). Prints the median over --repeats of the support
encoding, forward, reverse and propagation stages, the ratios reverse/forward (target <= 2)
and whole/forward (target <= 4), and which stage dominates.

    python benchmarks/revsam2_stages.py [--image-size 256] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "OFLSAM2Segment"))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chaos_t2_fewshot"
LIVER = 1
STAGES = ("supports", "forward", "reverse", "propagating")


def load_case(folder: Path, case: int):
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"image_{case}.nii.gz"))).astype(np.float32)
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"label_{case}.nii.gz")))).astype(np.uint8)
    return image, labels


def support_references(folder: Path, count: int):
    """``count`` liver slices spread over cases 2, 3, 5, one Reference per case."""
    from oflsam2.api import Reference

    cases = (2, 3, 5)
    references = []
    for position, case in enumerate(cases):
        image, labels = load_case(folder, case)
        present = np.flatnonzero((labels == LIVER).any(axis=(1, 2)))
        share = count // len(cases) + (position < count % len(cases))
        chosen = present[np.linspace(0, len(present) - 1, share).round().astype(int)]
        references.append(Reference(image[chosen], labels[chosen], name=f"case {case}"))
    return references


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--supports", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()

    import torch

    from oflsam2.api import Engine, LabelSupport, MethodOptions, ModelSettings

    torch.set_num_threads(args.threads)
    image, _ = load_case(args.data, 1)
    engine = Engine(ModelSettings(random_weights=True, device="cpu", image_size=args.image_size))
    support = [LabelSupport(LIVER, "liver", np.zeros(image.shape, bool), [])]
    print(f"RevSAM2 on CHAOS T2 case 1 ({image.shape[0]} query slices), SAM2.1-tiny random weights, "
          f"image size {args.image_size}, CPU {args.threads} threads, median of {args.repeats}")
    for count in args.supports:
        references = support_references(args.data, count)
        options = MethodOptions(max_supports=count)
        engine.segment(image, support, method="revsam2", preset="mr", options=options, references=references)  # warm caches
        runs = []
        for _ in range(args.repeats):
            result = engine.segment(image, support, method="revsam2", preset="mr", options=options, references=references)
            runs.append(result.info["labels"][LIVER]["seconds"])
        seconds = {stage: statistics.median(r.get(stage, 0.0) for r in runs) for stage in STAGES}
        whole = sum(seconds.values())
        figures = "  ".join(f"{stage} {value:.2f} s" for stage, value in seconds.items())
        print(f"{count:2d} supports: {figures}  whole {whole:.2f} s")
        print(f"   reverse/forward = {seconds['reverse'] / seconds['forward']:.2f} (target <= 2)   "
              f"whole/forward = {whole / seconds['forward']:.2f} (target <= 4)   "
              f"dominant: {max(seconds, key=seconds.get)}")


if __name__ == "__main__":
    main()
