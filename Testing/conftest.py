"""Shared fixtures: the real data folder (tests skip cleanly without it) and a random-weight SAM2."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    path = Path(os.environ.get("OFLSAM2_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real test data folder ../shared/data is absent")
    return path


@pytest.fixture(scope="session")
def tiny_model():
    """SAM2.1-tiny built from sam2's real config with fixed random weights, 256 px, CPU, fp32."""
    from oflsam2.api import ModelSettings
    from oflsam2.backend import load_sam2

    return load_sam2(ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256))


@pytest.fixture(scope="session")
def chaos_case(shared_data):
    """``chaos_case(n)`` -> (image float32, labels uint8), (z, y, x), of CHAOS T2 case n
    (1 liver, 2 right kidney, 3 left kidney, 4 spleen; the files store both as float64)."""
    import numpy as np
    import SimpleITK as sitk

    def load(number: int):
        folder = shared_data / "chaos_t2_fewshot"
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"image_{number}.nii.gz"))).astype(np.float32)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"label_{number}.nii.gz")))
        return image, np.rint(labels).astype(np.uint8)

    return load


@pytest.fixture(scope="session")
def cohort(tmp_path_factory, shared_data, tiny_model):
    """Three cropped CHAOS volumes, their supports and an adapter trained in the test (``cohort_data``)."""
    from cohort_data import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort"), shared_data, tiny_model)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last block, holding ``scores.csv`` ("old scores") and the
    filler (root only: skipped elsewhere)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "full"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (folder / "scores.csv").write_text("old scores\n")
        filler = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"\0" * 1024):
                pass
        except OSError:  # the disk is full
            pass
        finally:
            os.close(filler)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
