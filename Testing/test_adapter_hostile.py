"""Hostile adapters (issue 24, section 3): files that point outside their folder, NaN or huge
tensors, missing or mis-shaped tensors and mistyped fields, two labels of one name, a save that
must wait for the outputs, file modes, and an adapter saved from Slicer (named segments) used
by the CLI's cohort command.

Real CHAOS T2 crops, a random-weight SAM2.1-tiny at 256 px on the CPU, adapters trained in the
test by the real engine (their masks are meaningless; the tests check refusals and files).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from oflsam2 import api, cli, pipeline
from oflsam2.api import Engine, LabelSupport, MethodOptions, ModelSettings
from oflsam2.errors import AdapterError, InputError
from oflsam2.ofl.adapter import list_adapters, load_adapter, save_adapter

LIVER = 1
SLICES = slice(14, 20)  # 6 slices through the liver of CHAOS case 1
ANNOTATED = [1, 4]
MODEL = ["--model", "sam2.1-tiny", "--random-weights", "--image-size", "256", "--device", "cpu"]


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def case(shared_data, tmp_path_factory) -> dict:
    """Image and liver support files of a 6-slice crop of CHAOS case 1 (full 256x256 planes)."""
    folder = tmp_path_factory.mktemp("adapter_case")
    chaos = shared_data / "chaos_t2_fewshot"
    image = sitk.ReadImage(str(chaos / "image_1.nii.gz"))[:, :, SLICES]
    labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(chaos / "label_1.nii.gz"))[:, :, SLICES])).astype(np.uint8)
    support = np.zeros_like(labels)
    support[ANNOTATED] = np.where(labels[ANNOTATED] == LIVER, LIVER, 0)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    support_image = sitk.GetImageFromArray(support)
    support_image.CopyInformation(image)
    sitk.WriteImage(support_image, str(folder / "support.nii.gz"))
    return {"folder": folder, "image": folder / "image.nii.gz", "support": folder / "support.nii.gz",
            "array": sitk.GetArrayFromImage(image).astype(np.float32), "labels": labels}


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(ModelSettings(random_weights=True, device="cpu", image_size=256, model="sam2.1-tiny"), model=tiny_model)


@pytest.fixture(scope="module")
def named_adapter(case, engine, tmp_path_factory) -> Path:
    """The liver adapter the Slicer module saves: the worker's Engine.segment with the segment's
    name ("Liver") and its label value in the selection (1)."""
    folder = tmp_path_factory.mktemp("slicer_adapter") / "adapter"
    support = LabelSupport(LIVER, "Liver", case["labels"] == LIVER, ANNOTATED)
    engine.segment(case["array"], [support], method="ofl", preset="mr",
                   options=MethodOptions(epochs=1, save_adapter=str(folder)))
    assert sorted(p.name for p in folder.iterdir()) == ["Liver.json", "Liver.safetensors"]
    return folder


def rewrite(folder: Path, tensors=None, **fields) -> None:
    """Change an adapter's tensors and/or metadata fields, keeping its hash consistent."""
    meta_path = folder / "Liver.json"
    meta = json.loads(meta_path.read_text())
    if tensors is not None:
        save_file(tensors, str(folder / meta["tensors_file"]))
        meta["tensors_sha256"] = hashlib.sha256((folder / meta["tensors_file"]).read_bytes()).hexdigest()
    meta.update(fields)
    meta_path.write_text(json.dumps(meta))


def tampered(named_adapter, tmp_path, change) -> Path:
    folder = tmp_path / "tampered"
    shutil.copytree(named_adapter, folder)
    tensors = load_file(str(folder / "Liver.safetensors"))
    change(folder, tensors)
    return folder


# --- the tensor file must be the adapter's own ----------------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_a_tensor_file_outside_the_adapter_folder_is_refused(named_adapter, tmp_path, where):
    """tensors_file "/elsewhere/x.safetensors" or "../x.safetensors" (hash consistent) was loaded."""
    folder = tmp_path / "adapter"
    shutil.copytree(named_adapter, folder)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "Liver.safetensors", outside)
    (folder / "Liver.safetensors").unlink()
    rewrite(folder, tensors_file=str(outside) if where == "absolute" else "../outside.safetensors")
    with pytest.raises(AdapterError, match="not a file name in the adapter's folder"):
        load_adapter(folder, label="Liver")


# --- values that load but segment nothing -------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_nan_or_huge_tensors_are_refused_even_with_a_consistent_hash(named_adapter, tmp_path, value):
    """NaN or 1e30 in the head (hash recomputed): rc 0 and an empty result, no warning."""
    def poison(folder, tensors):
        key = next(k for k in tensors if k.startswith("head.") and tensors[k].is_floating_point())
        tensors[key] = torch.full_like(tensors[key], value)
        rewrite(folder, tensors)

    folder = tampered(named_adapter, tmp_path, poison)
    with pytest.raises(AdapterError, match="NaN or infinite|far beyond"):
        load_adapter(folder, label="Liver")


# --- damaged adapters through the CLI: an adapter error, never a traceback ------------------------


def _drop_head_tensor(folder, tensors):
    rewrite(folder, {k: v for k, v in tensors.items() if k != next(k for k in tensors if k.startswith("head."))})


def _misshape_bank(folder, tensors):
    tensors["bank.vision"] = tensors["bank.vision"][:, :, :8].contiguous()
    rewrite(folder, tensors)


def _drop_bank(folder, tensors):
    rewrite(folder, {k: v for k, v in tensors.items() if k != "bank.targets"})


DAMAGED = {
    "a head tensor missing": (_drop_head_tensor, "head does not fit"),
    "the stored support mis-shaped": (_misshape_bank, "does not fit this model"),
    "a support tensor missing": (_drop_bank, "lacks the tensor"),
    "intensity range as text": (lambda f, t: rewrite(f, intensity={"modality": "ct", "low": "low", "high": "high"}), "intensity"),
    "image size as text": (lambda f, t: rewrite(f, image_size="256"), "image_size is '256', not a whole number"),
    "axis as text": (lambda f, t: rewrite(f, axis="axial"), "axis is 'axial', not a whole number"),
    "label as text": (lambda f, t: rewrite(f, label="one"), "label is 'one', not a whole number"),
}


@pytest.mark.parametrize("name", list(DAMAGED), ids=list(DAMAGED))
def test_a_damaged_adapter_is_an_adapter_error_not_a_traceback(named_adapter, case, tmp_path, name):
    change, fragment = DAMAGED[name]
    folder = tampered(named_adapter, tmp_path, change)
    code, _, err = run_cli(["segment", "--image", case["image"], "--out", tmp_path / "out.nii.gz", "--method", "ofl",
                            "--adapter", folder, "--labels", "1", "--preset", "mr", *MODEL])
    assert code == cli.EXIT_USER_ERROR and "Traceback" not in err, err
    assert "dapter" in err and fragment in err, err
    assert not (tmp_path / "out.nii.gz").exists()


# --- two labels named alike -----------------------------------------------------------------------


def test_two_labels_of_one_name_are_refused_before_the_model(case, tmp_path):
    """Labels 1 and 2 both named "Liver" wrote one adapter: label 1's was overwritten by label 2's."""
    engine = Engine(ModelSettings(random_weights=True, device="cpu", image_size=256, model="sam2.1-tiny"))
    supports = [LabelSupport(1, "Liver", case["labels"] == 1, ANNOTATED), LabelSupport(2, "liver", case["labels"] == 2, ANNOTATED)]
    with pytest.raises(InputError, match="same name"):
        engine.segment(case["array"], supports, method="ofl", options=MethodOptions(epochs=1, save_adapter=str(tmp_path / "a")))
    assert engine._model is None and not (tmp_path / "a").exists()


def metadata(label, name):
    return {"model": "sam2.1-tiny", "config": "c", "checkpoint_sha256": "random-weights:0", "image_size": 256,
            "preset": "mr", "axis": 0, "label": label, "label_name": name}


def test_a_label_finds_its_adapter_by_name_and_an_unnamed_one_by_a_value_only_one_adapter_holds(tmp_path):
    """The rule of oflsam2.adapter_labels, which the CLI's checks, the loader and Slicer share."""
    from oflsam2.adapter_labels import find_adapter

    tensor = {"x": torch.zeros(2)}
    save_adapter(tmp_path / "a", tensor, metadata(1, "Liver"))
    save_adapter(tmp_path / "a", tensor, metadata(2, "Spleen"))
    save_adapter(tmp_path / "b", tensor, metadata(1, "Liver"))
    save_adapter(tmp_path / "b", tensor, metadata(1, "Kidney"))  # saved from another selection: value 1 again
    a, b = list_adapters(tmp_path / "a"), list_adapters(tmp_path / "b")
    assert find_adapter(a, 2, "liver")["label_name"] == "Liver"  # a name wins over the value
    assert find_adapter(a, 2, "label_2")["label_name"] == "Spleen"  # unnamed: by value
    assert find_adapter(a, 3, "label_3") is None and find_adapter(a, 1, "Kidney") is None
    assert find_adapter(b, 1, "kidney")["label_name"] == "Kidney"
    with pytest.raises(AdapterError, match="several adapters for label value 1"):
        find_adapter(b, 1, "label_1")


def test_an_unnamed_label_whose_value_several_adapters_hold_is_refused_before_the_model(case, tmp_path):
    """The pre-check took the first adapter holding the value (or name): Kidney's head on the liver."""
    tensor = {"x": torch.zeros(2)}
    for name in ("Liver", "Kidney"):
        save_adapter(tmp_path / "adapters", tensor, metadata(1, name))

    class NoEngine:
        def segment(self, *args, **kwargs):
            raise AssertionError("the model was used before the adapter was checked")

    with pytest.raises(AdapterError, match="several adapters for label value 1"):
        pipeline.segment_files(case["image"], None, tmp_path / "out.nii.gz", labels=[1], method="ofl", preset="mr",
                               settings=ModelSettings(random_weights=True, image_size=256, model="sam2.1-tiny"),
                               options=MethodOptions(adapter=str(tmp_path / "adapters")), engine=NoEngine())


# --- saving: with the outputs, with the umask's permissions ---------------------------------------


@pytest.mark.parametrize("existing", [True, False])
def test_save_adapter_waits_for_the_outputs(case, tmp_path, full_disk, existing):
    """--save-adapter into a folder holding an adapter replaced it although the output could not be
    written (disk full); a new folder was created and filled."""
    adapters = tmp_path / "adapters"
    if existing:
        save_adapter(adapters, {"x": torch.zeros(2)}, metadata(1, "label_1"))
        before = digests(adapters)
    code, _, err = run_cli(["segment", "--image", case["image"], "--support", case["support"], "--out",
                            full_disk / "out.nii.gz", "--method", "ofl", "--epochs", "1", "--save-adapter", adapters, *MODEL])
    assert code == cli.EXIT_USER_ERROR and "Traceback" not in err, err
    assert not (full_disk / "out.nii.gz").exists()
    if existing:
        assert digests(adapters) == before  # the old adapter, and no temporary file
    else:
        assert not adapters.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_both_adapter_files_get_the_umasks_permissions(tmp_path, umask):
    """The .safetensors file was 0600 (or 0644) whatever the umask, while the JSON was 0644."""
    previous = os.umask(umask)
    try:
        save_adapter(tmp_path, {"x": torch.zeros(2)}, metadata(1, "Liver"))
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"Liver.json": 0o666 & ~umask, "Liver.safetensors": 0o666 & ~umask}


# --- an adapter saved from Slicer, used by the CLI's cohort command --------------------------------


def test_the_cohort_command_uses_an_adapter_saved_from_slicer(named_adapter, case, tmp_path):
    """The pre-check matched label 1 by value, the loader by name (label_1): every case failed
    after the model loaded and the volume was encoded."""
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(case["image"], scans / "case.nii.gz")
    for extra in ([], ["--labels", "1"]):
        out = tmp_path / f"out{len(extra)}"
        code, _, err = run_cli(["batch", scans, "--out", out, "--method", "ofl", "--adapter", named_adapter, "--seg-nrrd",
                                "--preset", "mr", *extra, *MODEL])
        assert code == 0, err
        segmentation = sitk.ReadImage(str(out / "case_seg.seg.nrrd"))
        assert segmentation.GetMetaData("Segment0_Name") == "Liver"  # named after its adapter


def test_a_cohort_label_without_adapter_is_refused_before_the_model(named_adapter, case, tmp_path, monkeypatch):
    built = []

    class CountingEngine(Engine):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(api, "Engine", CountingEngine)
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(case["image"], scans / "case.nii.gz")
    for names, label in ((["--labels", "1", "--label-names", "1=Spleen"], "label 1 (Spleen)"), (["--labels", "2"], "label 2")):
        code, _, err = run_cli(["batch", scans, "--out", tmp_path / "out", "--method", "ofl", "--adapter", named_adapter,
                                *names, *MODEL])
        assert code == cli.EXIT_USER_ERROR and f"has no adapter for {label}; it holds: Liver (1)" in err, err
    assert not built and not (tmp_path / "out" / "case_seg.nii.gz").exists()
