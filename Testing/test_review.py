"""Review and correct (issue 11): per-slice quality of every method, suggestions, updates after
a correction, and the CLI's --quality-out / --suggest / --save-state / --previous.

Real CHAOS T2 volumes (cropped), a random-weight SAM2.1-tiny at 256 px. Masks of an untrained
SAM2 are meaningless, so the tests check ranges, bookkeeping and invariants, never quality.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from oflsam2 import cli
from oflsam2.api import Engine, LabelSupport, MethodOptions, ModelSettings, SegmentResult
from oflsam2.errors import InputError
from oflsam2.methods.sweep import AGREEING_SLICES, Sweep, agrees
from oflsam2.review import quality_rows, suggest, write_quality_csv

LIVER, RIGHT_KIDNEY = 1, 2
Z, Y, X = slice(16, 28), slice(40, 200), slice(20, 200)  # 12 slices, all holding the liver
ANNOTATED = [2, 9]  # inside the crop
NEW_SLICE = 5  # annotated for the update, between the two


@pytest.fixture(scope="module")
def crop(chaos_case):
    image, labels = chaos_case(1)
    return image[Z, Y, X], labels[Z, Y, X]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(ModelSettings(random_weights=True, device="cpu", image_size=tiny_model.image_size), model=tiny_model)


@pytest.fixture(scope="module")
def first_run(engine, crop):
    """``first_run(method)``: the module's one run of ``method`` with the liver annotated on ANNOTATED."""
    image, labels = crop
    done = {}

    def run(method: str) -> SegmentResult:
        if method not in done:
            done[method] = engine.segment(image, supports(labels, ANNOTATED), method=method, preset="mr", options=quick(top_k=2))
        return done[method]

    return run


def quick(**overrides) -> MethodOptions:
    settings = dict(epochs=1, lr_milestones=(), max_fit_slices=8, warm_start_epochs=1)
    settings.update(overrides)
    return MethodOptions(**settings)


def supports(labels, slices, values=(LIVER,)):
    return [LabelSupport(v, f"label_{v}", labels == v, list(slices)) for v in values]


# -- quality -------------------------------------------------------------------------------------

COMPONENTS = {"ofl": {"s_cf"}, "sam2": {"iou", "presence"}, "forward": {"iou", "presence"}, "revsam2": {"iou", "presence"}}


@pytest.mark.parametrize("method", ["sam2", "forward", "revsam2", "ofl"])
def test_every_method_records_a_quality_per_slice(first_run, crop, method):
    image, _ = crop
    result = first_run(method)
    quality = result.info["quality"][LIVER]
    assert sorted(quality) == list(range(len(image)))  # every slice, propagated or annotated
    for index, entry in quality.items():
        assert 0.0 <= entry["quality"] <= 1.0
        if index in ANNOTATED:
            assert entry == {"quality": 1.0, "source": "annotated"}
            continue
        assert COMPONENTS[method] <= set(entry), entry
        if entry["source"] == "iou_x_presence":
            assert entry["quality"] == pytest.approx(entry["iou"] * entry["presence"])
            assert result.masks[LIVER][index].any()
        elif entry["source"] == "absent":
            assert not result.masks[LIVER][index].any()
        elif entry["source"] == "s_cf":
            assert entry["quality"] == entry["s_cf"]
        else:
            assert method == "revsam2" and entry["source"] == "reverse"
    if method == "ofl":  # the very S_cf the confidence gate saw, slice for slice
        gated = result.info["labels"][LIVER]["confidence"]
        order = [i for i in range(ANNOTATED[0], len(image)) if i not in ANNOTATED] + list(range(ANNOTATED[0] - 1, -1, -1))
        assert [quality[i]["s_cf"] for i in order] == gated
    if method == "revsam2":
        stats = result.info["labels"][LIVER]
        for index in stats["selected"]:
            assert quality[index]["source"] == "reverse"
            assert quality[index]["quality"] == pytest.approx(stats["scores"][index])
    rows = quality_rows(result)
    assert [(r["label"], r["slice"]) for r in rows] == [(LIVER, i) for i in range(len(image))]


def test_quality_csv_is_written_whole(tmp_path):
    result = SegmentResult({3: np.zeros((4, 2, 2), bool)}, 0, "sam2", {"quality": {3: {1: {"quality": 0.25, "source": "s_cf"}}}})
    path = write_quality_csv(quality_rows(result), tmp_path / "q.csv")
    assert list(csv.DictReader(path.open())) == [{"label": "3", "slice": "1", "quality": "0.250000", "source": "s_cf"}]
    assert [p.name for p in tmp_path.iterdir()] == ["q.csv"]  # no temporary file left


# -- suggestions ---------------------------------------------------------------------------------

def synthetic_result(extent=(5, 26), annotated=(10, 20), quality=None, num_slices=32) -> SegmentResult:
    masks = np.zeros((num_slices, 8, 8), dtype=bool)
    masks[extent[0] : extent[1], 2:6, 2:6] = True
    quality = quality or {i: {"quality": 0.9, "source": "s_cf"} for i in range(num_slices)}
    return SegmentResult({LIVER: np.moveaxis(masks, 0, 1)}, 1, "ofl", {"annotated": list(annotated), "quality": {LIVER: quality}})


def test_suggestions_are_spread_inside_the_object_away_from_annotations_lowest_first():
    low = {i: {"quality": q, "source": "s_cf"} for i, q in enumerate(np.linspace(0.1, 0.9, 32))}
    low[2] = {"quality": 0.0, "source": "absent"}  # outside the object: never suggested
    low[15] = {"quality": 0.05, "source": "s_cf"}  # the weakest slice inside
    low[16] = {"quality": 0.06, "source": "s_cf"}  # next to it: too close to be suggested too
    result = synthetic_result(quality=low)
    picked = suggest(result, 4)[LIVER]
    assert picked[0] == 15
    assert 16 not in picked
    assert all(5 <= i < 26 for i in picked)
    assert all(abs(i - a) >= 3 for i in picked for a in (10, 20))
    assert all(abs(a - b) >= 3 for a in picked for b in picked if a != b)
    qualities = [low[i]["quality"] for i in picked]
    assert qualities == sorted(qualities)
    assert picked == [15, 5, 23]  # 14-17, 6-7 and 24-25 lie too close to a suggestion: only 3 fit


def test_suggestions_stop_when_the_object_has_no_room_left():
    result = synthetic_result(extent=(8, 14), annotated=(10,))
    assert suggest(result, 5)[LIVER] == [13]  # 8 and 9 lie too close to 10; 13 is the only slice 3 away
    assert suggest(synthetic_result(extent=(0, 0)), 3)[LIVER] == []
    with pytest.raises(InputError, match="whole number"):
        suggest(result, -1)


def test_suggestions_on_a_real_run_lie_inside_the_predicted_extent(first_run):
    result = first_run("sam2")
    picked = suggest(result, 3)[LIVER]
    present = np.flatnonzero(result.masks[LIVER].any(axis=(1, 2)))
    assert picked
    for i in picked:
        assert present[0] <= i <= present[-1]
        assert min(abs(i - a) for a in ANNOTATED) >= 3
    quality = result.info["quality"][LIVER]
    assert quality[picked[0]]["quality"] == min(
        quality[i]["quality"] for i in range(present[0], present[-1] + 1) if min(abs(i - a) for a in ANNOTATED) >= 3
    )


# -- the sweep of an update ----------------------------------------------------------------------

def test_update_sweep_stops_after_three_agreeing_slices_and_at_annotations():
    previous = np.zeros((20, 4, 4), dtype=bool)
    previous[:, 1:3, 1:3] = True
    sweep = Sweep(20, given={2, 10}, previous=previous, edited=[10])
    visited = []
    for index, step in sweep:
        visited.append((index, step))
        differs = index in (11, 12)  # the first two slices forward change, then agreement
        mask = ~previous[index] if differs else previous[index]
        sweep.done(index, mask)
    forward = [i for i, s in visited if s == 1]
    backward = [i for i, s in visited if s == -1]
    assert forward == [11, 12, 13, 14, 15]  # 13, 14, 15 agree: stop
    assert backward == [9, 8, 7]  # agreement at once: three slices
    assert sweep.recomputed == [7, 8, 9, 11, 12, 13, 14, 15]
    stopped = Sweep(20, given={8, 10}, previous=previous, edited=[10])
    for index, _ in stopped:
        stopped.done(index, ~previous[index])  # never agrees: runs to the edge and to the annotation
    assert stopped.recomputed == [9] + list(range(11, 20))
    assert AGREEING_SLICES == 3 and agrees(np.zeros((2, 2), bool), np.zeros((2, 2), bool))


# -- updates -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["sam2", "ofl"])
def test_update_keeps_every_annotation_and_the_previous_result_outside_the_recomputed_slices(engine, crop, method, tmp_path):
    image, labels = crop
    values = (LIVER, RIGHT_KIDNEY)
    first_options = quick(save_adapter=str(tmp_path / "adapter")) if method == "ofl" else quick()
    first = engine.segment(image, supports(labels, ANNOTATED, values), method=method, preset="mr", options=first_options)
    corrected = supports(labels, sorted(ANNOTATED + [NEW_SLICE]), values)
    options = quick(adapter=str(tmp_path / "adapter"), warm_start_epochs=6) if method == "ofl" else quick()
    before = engine.feature_cache  # the update reuses the volume's cached features
    updated = engine.update(image, corrected, first, method=method, preset="mr", options=options)
    assert engine.feature_cache == before
    assert updated.info["edited"] == [NEW_SLICE]
    if method == "ofl":  # 1 corrected of 3 annotated slices: ceil(6 x 1/3) warm-start epochs
        for value in values:
            stats = updated.info["labels"][value]
            assert stats["warm_start"] == {"epochs": 2, "new_slices": 1, "support_slices": 3}
            assert len(stats["loss_history"]) == 2
    changed = set()
    for value, support in zip(values, corrected):
        recomputed = updated.info["recomputed"][value]
        assert recomputed and NEW_SLICE not in recomputed
        assert set(recomputed) <= set(range(ANNOTATED[0] + 1, ANNOTATED[1]))  # stops at the annotated neighbours
        changed |= set(recomputed)
        for index in range(len(image)):
            if index in support.slices:
                assert np.array_equal(updated.masks[value][index], support.mask[index]), index  # exactly as drawn
            elif index not in recomputed:
                assert np.array_equal(updated.masks[value][index], first.masks[value][index]), index
        quality = updated.info["quality"][value]
        assert quality[NEW_SLICE]["source"] == "annotated"
        for index in set(range(len(image))) - set(recomputed) - set(support.slices):
            assert quality[index] == first.info["quality"][value][index]  # carried over
    assert changed


class FakeBank:
    """What :func:`warm_start` reads of a bank: target slice indices, then reference slices."""

    def __init__(self, target_slices, references=0):
        self.index = np.array(list(target_slices) + list(range(references)))
        self.in_target = np.array([True] * len(target_slices) + [False] * references)

    def __len__(self):
        return len(self.index)


def test_warm_start_epochs_grow_with_the_share_of_new_support():
    from types import SimpleNamespace

    from oflsam2.methods.ofl import warm_start
    from oflsam2.methods.sweep import PreviousRun

    options = MethodOptions(warm_start_epochs=10)
    update = SimpleNamespace(options=options, previous=PreviousRun({}, edited=[5]))
    epochs, new = warm_start(update, FakeBank([2, 5, 9, 14]))
    assert epochs == 3 and new.tolist() == [1]  # ceil(10 x 1/4)
    epochs, new = warm_start(update, FakeBank([2, 5, 9, 14], references=4))  # slice 5 of a reference is not new
    assert epochs == 2 and new.tolist() == [1]
    epochs, new = warm_start(SimpleNamespace(options=options, previous=PreviousRun({}, edited=[2, 5, 9])), FakeBank([2, 5, 9, 14]))
    assert epochs == 8 and new.tolist() == [0, 1, 2]
    epochs, new = warm_start(SimpleNamespace(options=options, previous=None), FakeBank([2, 5, 9]))  # adapter on new support
    assert epochs == 10 and new.tolist() == [0, 1, 2]
    assert warm_start(SimpleNamespace(options=options, previous=PreviousRun({}, edited=[])), FakeBank([2, 9]))[0] == 0


def test_a_warm_start_holds_out_slices_the_head_knows_not_the_new_ones():
    from types import SimpleNamespace

    from oflsam2.methods.ofl import held_out_split

    episodes = [SimpleNamespace(query=q, has_object=True) for q in range(4)]
    options = MethodOptions.extended()  # the held-out guard is an extension of the paper
    for seed in range(20):
        assert 2 not in held_out_split(episodes, options, np.random.default_rng(seed), keep_training=[2])
        assert held_out_split(episodes, options, np.random.default_rng(seed), keep_training=[2]).size == 1
        without = held_out_split(episodes, options, np.random.default_rng(seed))
        every = held_out_split(episodes, options, np.random.default_rng(seed), keep_training=range(4))
        assert without.tolist() == every.tolist()  # nothing else to hold out: as a full run does


def test_update_with_nothing_edited_returns_the_previous_result(engine, crop, first_run):
    image, labels = crop
    first = first_run("sam2")
    again = engine.update(image, supports(labels, ANNOTATED), first, method="sam2", preset="mr")
    assert again.info["edited"] == [] and again.info["recomputed"] == {LIVER: []}
    assert np.array_equal(again.masks[LIVER], first.masks[LIVER])


def test_updates_refuse_what_cannot_be_an_edit(engine, crop):
    image, labels = crop
    previous = SegmentResult(
        {LIVER: labels == LIVER}, 0, "sam2", {"annotated": ANNOTATED, "quality": {}, "labels": {}}
    )
    run = dict(method="sam2", preset="mr")
    with pytest.raises(InputError, match="cannot remove an annotation"):
        engine.update(image, supports(labels, ANNOTATED[:1]), previous, **run)
    with pytest.raises(InputError, match="axis"):
        engine.update(image, supports(labels, [80]), previous, method="sam2", preset="mr", axis=1)
    with pytest.raises(InputError, match="another image grid"):
        small = SegmentResult({LIVER: (labels == LIVER)[:, :-1]}, 0, "sam2", previous.info)
        engine.update(image, supports(labels, ANNOTATED), small, **run)
    with pytest.raises(InputError, match="method 'sam2'"):
        engine.update(image, supports(labels, ANNOTATED), previous, method="ofl", preset="mr")
    with pytest.raises(InputError, match="not segmented in the previous result"):
        engine.update(image, supports(labels, ANNOTATED, (LIVER, RIGHT_KIDNEY)), previous, **run)


# -- the command line ----------------------------------------------------------------------------

def write_like(array: np.ndarray, reference: sitk.Image, path) -> str:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture(scope="module")
def first_cli_run(shared_data, tmp_path_factory):
    """One real CLI run with --save-state on a cropped CHAOS volume (sam2, random weights)."""
    folder = tmp_path_factory.mktemp("review_cli")
    chaos = shared_data / "chaos_t2_fewshot"
    image = sitk.ReadImage(str(chaos / "image_1.nii.gz"))[X, Y, Z]
    truth = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(chaos / "label_1.nii.gz"))[X, Y, Z])).astype(np.uint8)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sparse = np.zeros_like(truth)
    sparse[ANNOTATED] = np.where(truth[ANNOTATED] == LIVER, LIVER, 0)
    paths = {
        "image": str(folder / "image.nii.gz"),
        "support": write_like(sparse, image, folder / "support.nii.gz"),
        "prev": str(folder / "prev.nii.gz"),
        "first_state": str(folder / "first_state"),
        "folder": folder,
    }
    status = cli.main(
        ["segment", "--image", paths["image"], "--support", paths["support"], "--out", paths["prev"], "--method", "sam2",
         "--model", "sam2.1-tiny", "--random-weights", "--image-size", "256", "--device", "cpu", "--save-state", paths["first_state"],
         "--suggest", "2", "--quality-out", str(folder / "q.csv")]
    )
    assert status == 0
    return paths, truth, image


@pytest.fixture
def cli_run(first_cli_run, tmp_path):
    """The first run's files with a private copy of its state (an update rewrites the state)."""
    paths, truth, image = first_cli_run
    shutil.copytree(paths["first_state"], tmp_path / "state")
    return {**paths, "state": str(tmp_path / "state"), "out": tmp_path}, truth, image


def corrected_copy(paths, truth, image, name="corrected.nii.gz", change=None):
    previous = sitk.GetArrayFromImage(sitk.ReadImage(paths["prev"]))
    corrected = previous.copy()
    if change is None:
        corrected[NEW_SLICE] = np.where(truth[NEW_SLICE] == LIVER, LIVER, 0)
    else:
        change(corrected)
    return write_like(corrected, image, paths["out"] / name), previous


def update_args(paths, support, out, *extra, previous=None, image_size="256", state=True):
    return [
        "segment", "--image", paths["image"], "--support", support, "--previous", previous or paths["prev"],
        "--out", str(paths["out"] / out), "--method", "sam2", "--model", "sam2.1-tiny", "--random-weights",
        "--image-size", image_size, "--device", "cpu", *(["--save-state", paths["state"]] if state else []), *extra,
    ]


def test_cli_update_from_a_corrected_copy(cli_run, capsys):
    paths, truth, image = cli_run
    rows = list(csv.DictReader(open(paths["folder"] / "q.csv")))
    assert [int(r["slice"]) for r in rows] == list(range(truth.shape[0]))
    assert all(0.0 <= float(r["quality"]) <= 1.0 for r in rows)
    state = json.loads(open(paths["state"] + "/state.json").read())
    assert state["annotated"] == ANNOTATED and state["model"] == "sam2.1-tiny" and state["image_size"] == 256
    support, previous = corrected_copy(paths, truth, image)
    capsys.readouterr()
    assert cli.main(update_args(paths, support, "new.nii.gz", "--json", "--suggest", "2")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["edited"] == [NEW_SLICE]
    assert summary["slices"][str(LIVER)] == sorted(ANNOTATED + [NEW_SLICE])
    assert set(summary["suggested"]) == {str(LIVER)}
    assert summary["engine"]["quality"][str(LIVER)][str(NEW_SLICE)]["source"] == "annotated"
    recomputed = summary["engine"]["recomputed"][str(LIVER)]
    updated = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["out"] / "new.nii.gz")))
    drawn = sitk.GetArrayFromImage(sitk.ReadImage(support))
    for index in range(truth.shape[0]):
        if index in ANNOTATED + [NEW_SLICE]:
            assert np.array_equal(updated[index], drawn[index]), index
        elif index not in recomputed:
            assert np.array_equal(updated[index], previous[index]), index
    state = json.loads(open(paths["state"] + "/state.json").read())
    assert state["annotated"] == sorted(ANNOTATED + [NEW_SLICE])
    # The state now describes new.nii.gz: the old output no longer passes as the previous result.
    assert cli.main(update_args(paths, support, "again.nii.gz")) == 2
    assert "not the output saved with this state" in capsys.readouterr().err
    assert not (paths["out"] / "again.nii.gz").exists()


def test_cli_update_bad_inputs_change_nothing(cli_run, capsys):
    paths, truth, image = cli_run
    state_file = paths["state"] + "/state.json"
    saved = open(state_file).read()
    previous = sitk.GetArrayFromImage(sitk.ReadImage(paths["prev"]))
    good = corrected_copy(paths, truth, image)[0]

    def sagittal(corrected):  # one sagittal plane flipped: a stroke through every axial slice
        corrected[:, :, 90] = np.where(corrected[:, :, 90] == LIVER, 0, LIVER)

    def erase(corrected):
        corrected[ANNOTATED[0]] = 0

    cropped = sitk.ReadImage(paths["prev"])[:, :, 1:]
    other_grid = write_like(sitk.GetArrayFromImage(cropped), cropped, paths["out"] / "grid.nii.gz")
    cases = [
        (update_args(paths, corrected_copy(paths, truth, image, "sag.nii.gz", sagittal)[0], "o1.nii.gz"), "one plane of array axis 2"),
        (update_args(paths, corrected_copy(paths, truth, image, "erase.nii.gz", erase)[0], "o2.nii.gz"), "cannot remove an annotation"),
        (update_args(paths, good, "o3.nii.gz", image_size="512"), "another model setup"),
        (update_args(paths, good, "o4.nii.gz", "--axis", "coronal"), "axial axis"),
        (update_args(paths, good, "o5.nii.gz", previous=other_grid), "another grid"),
        (update_args(paths, good, "o6.nii.gz", state=False), "--previous needs --save-state"),
        (update_args(paths, good, "o7.nii.gz", "--method", "ofl"), "same method"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert cli.main(args) == 2, message
        assert message in capsys.readouterr().err
    assert open(state_file).read() == saved
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(paths["prev"])), previous)
    assert not {f"o{i}.nii.gz" for i in range(1, 8)} & {p.name for p in paths["out"].iterdir()}
