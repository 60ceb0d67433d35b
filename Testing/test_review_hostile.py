"""The review loop under a hostile user (issue 24, section 4, engine and CLI side): a cleared
false positive, another patient's image on the same grid, a label newly painted on a corrected
slice, damaged states and results, a full disk during an ``ofl`` update, and a state that lost
its adapter folder.

Real CHAOS T2 crops, a random-weight SAM2.1-tiny at 256 px on the CPU. An untrained SAM2 fills
almost every slice, which makes every non-annotated slice a false positive to clear; the tests
check bookkeeping, refusals and files, never mask quality.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from oflsam2 import cli
from oflsam2.api import Engine, LabelSupport, ModelSettings, SegmentResult
from oflsam2.errors import InputError
from oflsam2.review import suggest

LIVER = 1
X, Y, Z = slice(20, 200), slice(40, 200), slice(16, 28)  # 12 slices, each holding the liver
ANNOTATED = [2, 9]
FALSE_POSITIVE = 6  # not annotated; the untrained model fills it
MODEL = ["--model", "sam2.1-tiny", "--random-weights", "--image-size", "256", "--device", "cpu"]


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(shared_data, tmp_path_factory) -> dict:
    """A 12-slice crop of CHAOS case 1, its liver annotated on ANNOTATED, and the same crop of
    case 2 written on case 1's grid (another patient, the same grid)."""
    folder = tmp_path_factory.mktemp("review_source")
    chaos = shared_data / "chaos_t2_fewshot"
    image = sitk.ReadImage(str(chaos / "image_1.nii.gz"))[X, Y, Z]
    truth = np.rint(read(chaos / "label_1.nii.gz")[Z, Y, X]).astype(np.uint8)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sparse = np.zeros_like(truth)
    sparse[ANNOTATED] = np.where(truth[ANNOTATED] == LIVER, LIVER, 0)
    other = read(chaos / "image_2.nii.gz")[Z, Y, X].astype(np.float32)
    return {
        "folder": folder, "image": folder / "image.nii.gz", "sitk": image, "truth": truth,
        "support": write_like(sparse, image, folder / "support.nii.gz"),
        "other": write_like(other, image, folder / "other_patient.nii.gz"),
    }


def first_run(source, folder: Path, method: str) -> dict:
    paths = {"state": folder / "state", "prev": folder / "prev.nii.gz"}
    code, _, err = run_cli(["segment", "--image", source["image"], "--support", source["support"], "--out", paths["prev"],
                            "--method", method, "--epochs", "1", "--deterministic", "--save-state", paths["state"], *MODEL])
    assert code == 0, err
    return paths


@pytest.fixture(scope="module")
def sam2_run(source, tmp_path_factory) -> dict:
    return first_run(source, tmp_path_factory.mktemp("sam2_run"), "sam2")


@pytest.fixture(scope="module")
def ofl_run(source, tmp_path_factory) -> dict:
    return first_run(source, tmp_path_factory.mktemp("ofl_run"), "ofl")


@pytest.fixture
def ws(sam2_run, tmp_path) -> dict:
    """A private copy of the sam2 run's state (an update rewrites it)."""
    shutil.copytree(sam2_run["state"], tmp_path / "state")
    return {**sam2_run, "state": tmp_path / "state", "out": tmp_path}


def update(source, run, support, out, *extra, method="sam2", image=None):
    return run_cli(["segment", "--image", image or source["image"], "--support", support, "--previous", run["prev"],
                    "--out", out, "--method", method, "--save-state", run["state"], "--epochs", "1", "--deterministic",
                    *MODEL, *extra])


def corrected(source, ws, change, name="fixed.nii.gz", previous=None) -> Path:
    array = read(previous or ws["prev"])
    change(array)
    return write_like(array, source["sitk"], ws["out"] / name)


# --- a cleared false positive -------------------------------------------------------------------


def test_clearing_a_false_positive_is_a_correction_to_empty(source, ws):
    """The most common correction, emptying a slice the run filled outside the organ, stopped the
    update: "Slice(s) 6 were cleared of every label"."""
    assert read(ws["prev"])[FALSE_POSITIVE].any()

    def clear(array):
        array[FALSE_POSITIVE] = 0

    code, out, err = update(source, ws, corrected(source, ws, clear), ws["out"] / "v2.nii.gz", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["edited"] == [FALSE_POSITIVE] and summary["cleared"] == [FALSE_POSITIVE]
    v2 = read(ws["out"] / "v2.nii.gz")
    assert not v2[FALSE_POSITIVE].any()  # kept empty
    recomputed = summary["engine"]["recomputed"][str(LIVER)]
    assert recomputed and FALSE_POSITIVE not in recomputed  # propagated from it
    state = json.loads((ws["state"] / "state.json").read_text())
    assert state["annotated"] == sorted(ANNOTATED + [FALSE_POSITIVE])

    # The next round: the cleared slice is an annotated "absent" slice, not an erased one.
    def fix(array):
        array[4] = np.where(source["truth"][4] == LIVER, LIVER, 0)

    again = corrected(source, ws, fix, "fixed2.nii.gz", previous=ws["out"] / "v2.nii.gz")
    code, out, err = run_cli(["segment", "--image", source["image"], "--support", again, "--previous", ws["out"] / "v2.nii.gz",
                              "--out", ws["out"] / "v3.nii.gz", "--method", "sam2", "--save-state", ws["state"], "--json",
                              *MODEL])
    assert code == 0, err
    assert json.loads(out)["edited"] == [4]
    assert not read(ws["out"] / "v3.nii.gz")[FALSE_POSITIVE].any()


def test_erasing_an_annotated_slice_is_still_refused(source, ws):
    def erase(array):
        array[ANNOTATED[0]] = 0

    code, _, err = update(source, ws, corrected(source, ws, erase), ws["out"] / "v2.nii.gz")
    assert code == cli.EXIT_USER_ERROR and "cannot remove an annotation" in err


# --- another image --------------------------------------------------------------------------------


def test_an_update_with_another_patients_image_on_the_same_grid_is_refused(source, ws):
    """The state recorded the grid, not the image: case 2's voxels on case 1's grid were accepted."""
    before = digests(ws["state"])

    def fix(array):
        array[4] = np.where(source["truth"][4] == LIVER, LIVER, 0)

    code, _, err = update(source, ws, corrected(source, ws, fix), ws["out"] / "v2.nii.gz", image=source["other"])
    assert code == cli.EXIT_USER_ERROR and "is not the image the saved state was made on" in err, err
    assert digests(ws["state"]) == before and not (ws["out"] / "v2.nii.gz").exists()


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(ModelSettings(random_weights=True, device="cpu", image_size=256, model="sam2.1-tiny"), model=tiny_model)


def supports(labels, slices):
    return [LabelSupport(LIVER, "liver", labels == LIVER, list(slices))]


def test_engine_update_refuses_another_image(source, engine):
    image, labels = read(source["image"]).astype(np.float32), source["truth"]
    first = engine.segment(image, supports(labels, ANNOTATED), method="sam2", preset="mr")
    assert isinstance(first.info["image_digest"], str)
    other = read(source["other"]).astype(np.float32)
    with pytest.raises(InputError, match="made on another image"):
        engine.update(other, supports(labels, sorted(ANNOTATED + [4])), first, method="sam2", preset="mr")


# --- a new label on a corrected slice ---------------------------------------------------------------


def test_a_label_newly_painted_on_a_corrected_slice_is_refused_by_name(source, ws):
    """Label 3 painted on slice 4 was dropped and its voxels became background, rc 0."""
    before = digests(ws["state"])

    def paint(array):
        array[4, 10:30, 10:30] = 3

    code, _, err = update(source, ws, corrected(source, ws, paint), ws["out"] / "v2.nii.gz")
    assert code == cli.EXIT_USER_ERROR and "Label(s) 3 appear on slice(s) 4" in err, err
    assert digests(ws["state"]) == before and not (ws["out"] / "v2.nii.gz").exists()


# --- damaged states and results ---------------------------------------------------------------------

DAMAGED_STATES = {
    "axis text": {"axis": "x"},
    "axis out of range": {"axis": 7},
    "annotated text": {"annotated": ["2"]},
    "annotated beyond the volume": {"annotated": [2, 500]},
    "labels empty": {"labels": []},
    "labels text": {"labels": ["1"]},
    "quality text": {"quality": {"1": {"3": {"quality": "good", "source": "s_cf"}}}},
    "quality a list": {"quality": {"1": []}},
    "grid short": {"grid": {"size": [1, 2]}},
    "grid spacing text": {"grid": {"size": [180, 160, 12], "spacing": ["a", "b", "c"], "origin": [0, 0, 0],
                                   "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}},
}


@pytest.mark.parametrize("name", list(DAMAGED_STATES), ids=list(DAMAGED_STATES))
def test_a_damaged_state_is_refused_clearly(source, ws, name):
    """Hand-edited state fields ended in raw ValueError/TypeError tracebacks (or worse, were used)."""
    path = ws["state"] / "state.json"
    state = json.loads(path.read_text())
    state.update(DAMAGED_STATES[name])
    path.write_text(json.dumps(state))

    def fix(array):
        array[4] = np.where(source["truth"][4] == LIVER, LIVER, 0)

    code, _, err = update(source, ws, corrected(source, ws, fix), ws["out"] / "v2.nii.gz")
    assert code == cli.EXIT_USER_ERROR and "is damaged" in err and "Traceback" not in err, err
    assert not (ws["out"] / "v2.nii.gz").exists()


def _result(**changes) -> SegmentResult:
    mask = np.zeros((12, 64, 64), bool)
    mask[:, 20:40, 20:40] = True
    values = {"masks": {LIVER: mask}, "axis": 0, "method": "sam2",
              "info": {"annotated": [2, 9], "quality": {LIVER: {3: {"quality": 0.5, "source": "s_cf"}}}}}
    values.update(changes)
    return SegmentResult(**values)


BAD_RESULTS = {
    # each raised a raw TypeError/AttributeError/KeyError, or (the 0.5 mask) was read as all True
    "masks a list": (_result(masks=[np.zeros((12, 64, 64), bool)]), "dict of label value"),
    "mask a list": (_result(masks={LIVER: [[[0]]]}), "3-D"),
    "mask 2-D": (_result(masks={LIVER: np.zeros((64, 64), bool)}), "3-D"),
    "mask of 0.5": (_result(masks={LIVER: np.full((12, 64, 64), 0.5)}), "other than 0 and 1"),
    "label key text": (_result(masks={"liver": np.zeros((12, 64, 64), bool)}), "keyed by label values"),
    "axis 5": (_result(axis=5), "axis must be 0, 1 or 2"),
    "info None": (_result(info=None), "info must be a dict"),
    "annotated text": (_result(info={"annotated": "2,9"}), "annotated"),
    "annotated beyond": (_result(info={"annotated": [2, 40]}), "annotated"),
    "quality text": (_result(info={"annotated": [2], "quality": {LIVER: {3: {"quality": "high", "source": "s_cf"}}}}), "quality"),
    "quality entry a number": (_result(info={"annotated": [2], "quality": {LIVER: {3: 0.5}}}), "quality"),
}


@pytest.mark.parametrize("name", list(BAD_RESULTS), ids=list(BAD_RESULTS))
def test_a_malformed_result_is_an_input_error_for_update_and_suggest(name):
    result, fragment = BAD_RESULTS[name]
    image = np.random.default_rng(0).random((12, 64, 64)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[[2, 9], 20:40, 20:40] = True
    engine = Engine(ModelSettings(random_weights=True, image_size=256, device="cpu"))
    with pytest.raises(InputError, match=fragment):
        engine.update(image, [LabelSupport(LIVER, "liver", mask, [2, 9])], result, method="sam2")
    assert engine._model is None, "the model was built before the previous result was checked"
    with pytest.raises(InputError, match=fragment):
        suggest(result, 2)


# --- ofl: a full disk, a lost adapter ---------------------------------------------------------------


def test_a_full_disk_during_an_ofl_update_leaves_the_state_and_a_retry_gives_the_same_result(source, ofl_run, tmp_path, full_disk):
    """The state's adapter was replaced by the refined head before the outputs failed; state.json
    still described the old run, and the retry warm-started from the refined head."""
    pristine = tmp_path / "pristine"
    shutil.copytree(ofl_run["state"], pristine)
    run = {**ofl_run, "state": tmp_path / "state"}
    shutil.copytree(ofl_run["state"], run["state"])
    before = digests(run["state"])
    array = read(ofl_run["prev"])
    array[4] = np.where(source["truth"][4] == LIVER, LIVER, 0)
    support = write_like(array, source["sitk"], tmp_path / "fixed.nii.gz")

    code, _, err = update(source, run, support, full_disk / "v2.nii.gz", method="ofl")
    assert code == cli.EXIT_USER_ERROR and "Traceback" not in err, err
    assert digests(run["state"]) == before  # the adapter and state.json as they were, no temporary left

    code, _, err = update(source, run, support, tmp_path / "retry.nii.gz", method="ofl")
    assert code == 0, err
    code, _, err = update(source, {**ofl_run, "state": pristine}, support, tmp_path / "reference.nii.gz", method="ofl")
    assert code == 0, err
    np.testing.assert_array_equal(read(tmp_path / "retry.nii.gz"), read(tmp_path / "reference.nii.gz"))
    tensors = "adapter/label_1.safetensors"
    assert digests(run["state"])[tensors] == digests(pristine)[tensors] != before[tensors]  # refined once, alike


def test_an_ofl_state_without_its_adapter_folder_is_refused(source, ofl_run, tmp_path):
    """The update silently trained a new head from scratch."""
    run = {**ofl_run, "state": tmp_path / "state"}
    shutil.copytree(ofl_run["state"], run["state"])
    shutil.rmtree(run["state"] / "adapter")

    array = read(ofl_run["prev"])
    array[4] = 0
    support = write_like(array, source["sitk"], tmp_path / "fixed.nii.gz")
    code, _, err = update(source, run, support, tmp_path / "v2.nii.gz", method="ofl")
    assert code == cli.EXIT_USER_ERROR and "has no adapter/ folder" in err, err
    assert not (tmp_path / "v2.nii.gz").exists()
