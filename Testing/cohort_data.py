"""A small real cohort for the batch tests: three CHAOS T2 volumes cropped to 8 slices around
the liver's middle (full 256x256 planes, geometry kept), their label maps, support maps with
two annotated liver slices, and an OFL-SAM2 adapter trained on case 1 (2 epochs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CASES = (1, 2, 3)
SLICES = 8


@dataclass
class Cohort:
    images: Path  # folder: image_1.nii.gz ...
    labels: Path  # folder: full reference label maps, same names
    supports: Path  # folder: two annotated liver slices per case, same names
    adapter: Path
    settings: object  # ModelSettings of every run: random tiny SAM2.1, 256 px, CPU, deterministic


def batch_settings():
    from oflsam2.api import ModelSettings

    # deterministic: one CPU thread in every run, so an actor with its own thread budget
    # computes exactly what this process computes.
    return ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256, deterministic=True)


def make_cohort(folder: Path, shared_data: Path, model) -> Cohort:
    from oflsam2 import pipeline
    from oflsam2.api import Engine, MethodOptions

    images, labels, supports = folder / "images", folder / "labels", folder / "supports"
    for path in (images, labels, supports):
        path.mkdir(parents=True)
    for number in CASES:
        name = f"image_{number}.nii.gz"
        image = sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / name))
        label = sitk.Cast(sitk.Round(sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / f"label_{number}.nii.gz"))), sitk.sitkUInt8)
        liver = np.flatnonzero((sitk.GetArrayFromImage(label) == 1).any(axis=(1, 2)))
        start = int(liver[len(liver) // 2]) - SLICES // 2
        image, label = image[:, :, start : start + SLICES], label[:, :, start : start + SLICES]
        sitk.WriteImage(image, str(images / name))
        sitk.WriteImage(label, str(labels / name))
        array = sitk.GetArrayFromImage(label)
        support = np.zeros_like(array)
        for plane in (1, SLICES - 2):
            support[plane] = array[plane] == 1
        support_image = sitk.GetImageFromArray(support)
        support_image.CopyInformation(label)
        sitk.WriteImage(support_image, str(supports / name))
    settings = batch_settings()
    pipeline.segment_files(
        images / "image_1.nii.gz", labels / "image_1.nii.gz", folder / "training.nii.gz", labels=[1], method="ofl",
        settings=settings, options=MethodOptions(epochs=2, save_adapter=str(folder / "adapter")),
        engine=Engine(settings, model=model),
    )
    return Cohort(images, labels, supports, folder / "adapter", settings)


def read_array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def read_table(path) -> dict[str, dict]:
    import csv

    with open(path, newline="") as stream:
        return {row["case"]: row for row in csv.DictReader(stream)}
