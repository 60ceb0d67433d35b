"""The experiment runner: config checks, support draws, bookkeeping, resumption and tables.

Most tests use small synthetic volumes and a fake engine that returns a dilated copy of the
query's own labels (read back from the image intensities); one runs the real engine with a
random-weight SAM2, and the shipped configs are parsed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from scipy import ndimage

from oflsam2 import cli, experiment
from oflsam2.api import SegmentResult
from oflsam2.errors import InputError
from oflsam2.evaluation import read_csv
from oflsam2.settings import MethodOptions

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "Resources" / "experiments"
ABLATION_RUNS = ["ofl-paper", "ofl-extended", "revsam2", "sam2"]
SHAPE = (10, 24, 24)  # (z, y, x)
SPACING_XYZ = (1.0, 1.0, 3.0)


def make_dataset(root: Path, count: int = 5) -> None:
    """Cases 1..count: label 1 and 2 boxes whose z extent varies by case; intensity 100 * label + 20."""
    root.mkdir(parents=True, exist_ok=True)
    for case in range(1, count + 1):
        labels = np.zeros(SHAPE, dtype=np.uint8)
        labels[1 + case % 3 : 7, 4:12, 4:12] = 1
        labels[3 : 8 + case % 2, 14:20, 12:20] = 2
        for array, name in ((labels * 100.0 + 20.0, "image"), (labels, "label")):
            image = sitk.GetImageFromArray(array.astype(np.float32 if name == "image" else np.uint8))
            image.SetSpacing(SPACING_XYZ)
            sitk.WriteImage(image, str(root / f"{name}_{case}.nii.gz"))


BASE = {
    "name": "synthetic",
    "data_root": "data",
    "cases": {"ids": [1, 2, 3, 4, 5], "image": "image_{id}.nii.gz", "label": "label_{id}.nii.gz"},
    "labels": {1: "box one", 2: "box two"},
    "axis": 0,
    "preset": "window:0,1000",
    "support": {"mode": "slices", "volumes": 2, "slices_per_label": 3, "groups": 2, "seed": 0},
    "methods": [{"method": "revsam2"}, {"method": "forward", "name": "fwd"}],
    "model": {"model": "sam2.1-tiny", "image_size": 256},
    "report": {"montage": True, "montage_slices": 4},
}


def write_config(folder: Path, changes=None, remove=()) -> Path:
    config = copy.deepcopy(BASE)
    for key, value in (changes or {}).items():
        if key == "support":  # changed keys only; everything else is replaced whole
            config[key].update(value)
        else:
            config[key] = value
    for key in remove:
        config.pop(key)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def dataset(tmp_path):
    make_dataset(tmp_path / "data")
    return tmp_path


class FakeEngine:
    """Engine stand-in: each label's mask is the query's true label dilated by one voxel in-plane;
    annotated planes are copied through, as the real engine does. Records every call."""

    def __init__(self, settings):
        self.settings = settings
        self.calls = []

    def segment(self, image, supports, *, method, axis, preset, options, references, events):
        assert preset == experiment.NORMALISED_PRESET and 0.0 <= image.min() and image.max() <= 1.0
        truth = np.rint((image * 1000 - 20) / 100).astype(int)  # the preset window:0,1000 undone
        in_plane = np.zeros((3, 3, 3), dtype=bool)
        in_plane[1] = True
        masks = {}
        for support in supports:
            mask = ndimage.binary_dilation(truth == support.label, structure=in_plane)
            for plane in support.slices:
                mask[plane] = support.mask[plane]
            masks[support.label] = mask
        events.progress("propagating", 1, 1)
        self.calls.append({"method": method, "supports": supports, "references": references, "truth": truth, "options": options})
        return SegmentResult(masks, axis, method, {"seconds": 0.0})


class Factory:
    def __init__(self):
        self.engines = []

    def __call__(self, settings):
        self.engines.append(FakeEngine(settings))
        return self.engines[-1]

    @property
    def calls(self):
        return [call for engine in self.engines for call in engine.calls]


def refuse_engine(settings):
    raise AssertionError("a fully finished experiment must not build an engine")


def test_slices_protocol_files_and_tables(dataset):
    config = experiment.load_config(write_config(dataset))
    factory = Factory()
    outcome = experiment.run_experiment(config, dataset / "out", engine_factory=factory, progress=False)
    groups = json.loads((dataset / "out" / "run.json").read_text())["groups"]
    assert [len(g["support"]) for g in groups] == [2, 2] and groups[0]["support"] != groups[1]["support"]
    assert outcome.computed == 2 * 3 * 2 and outcome.skipped == 0  # groups x queries x methods
    # Slices mode: one call per label; its references stack only the 3 drawn planes, all holding it.
    assert len(factory.calls) == 2 * 3 * 2 * 2
    for call in factory.calls:
        (support,) = call["supports"]
        assert support.slices == [] and not support.mask.any() and support.mask.shape == SHAPE
        assert sum(r.labels.shape[0] for r in call["references"]) == 3
        for reference in call["references"]:
            assert reference.image.shape[1:] == SHAPE[1:]
            assert all((plane == support.label).any() for plane in reference.labels)
    # Per-case files.
    case_dir = dataset / "out" / "group_1" / "fwd" / groups[1]["queries"][0]
    prediction = sitk.ReadImage(str(case_dir / experiment.PREDICTION_FILE))
    assert prediction.GetSize() == SHAPE[::-1] and prediction.GetSpacing() == SPACING_XYZ
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) == {0, 1, 2}
    assert (case_dir / "montage.png").is_file() and (case_dir / "info.json").is_file()
    assert {p.name for p in (dataset / "out" / "group_0" / "supports").iterdir()} == {f"{c}.png" for c in groups[0]["support"]}
    # Tables: mean +- std over groups of the per-group mean over query cases.
    rows = read_csv(dataset / "out" / "cases.csv")
    assert len(rows) == outcome.computed * 2
    results = {(r["method"], r["label"]): r for r in read_csv(dataset / "out" / "results.csv")}
    assert set(results) == {(m, label) for m in ("revsam2", "fwd") for label in (1, 2, "mean")}
    for method in ("revsam2", "fwd"):
        per_group = [[r["dice"] for r in rows if r["method"] == method and r["group"] == g and r["label"] == 1] for g in (0, 1)]
        assert results[(method, 1)]["dice_mean"] == pytest.approx(np.mean([np.mean(v) for v in per_group]))
        assert results[(method, 1)]["dice_std"] == pytest.approx(np.std([np.mean(v) for v in per_group]))
        label_means = [
            np.mean([r["dice"] for r in rows if r["method"] == method and r["group"] == g and r["label"] == k])
            for g in (0, 1) for k in (1, 2)
        ]
        assert results[(method, "mean")]["dice_mean"] == pytest.approx(np.mean(label_means))
        assert results[(method, 1)]["groups"] == 2 and results[(method, 1)]["cases"] == 6
    assert 0.5 < results[("fwd", 1)]["dice_mean"] < 1.0  # dilated boxes: imperfect, not random
    assert "| fwd | mean | mean over labels |" in (dataset / "out" / "results.md").read_text()
    assert (dataset / "out" / "dice_boxplot.png").is_file()


def test_resume_skips_finished_cases_and_reruns_a_deleted_one(dataset):
    config = experiment.load_config(write_config(dataset, {"support": {"mode": "volumes", "slices_per_label": None, "groups": 1}}))
    out = dataset / "out"
    first = experiment.run_experiment(config, out, engine_factory=Factory(), progress=False)
    assert (first.computed, first.skipped) == (3 * 2, 0)
    second = experiment.run_experiment(config, out, engine_factory=refuse_engine, progress=False)
    assert (second.computed, second.skipped) == (0, 6)
    assert second.results == first.results
    removed = out / "group_0" / "fwd" / json.loads((out / "run.json").read_text())["groups"][0]["queries"][1]
    (removed / experiment.METRICS_FILE).unlink()
    factory = Factory()
    third = experiment.run_experiment(config, out, engine_factory=factory, progress=False)
    assert (third.computed, third.skipped) == (1, 5)
    assert len(factory.calls) == 1 and factory.calls[0]["method"] == "forward"  # volumes mode: one call
    assert third.results == first.results
    assert len(read_csv(out / "cases.csv")) == 6 * 2


def write_yaml_without_slices(folder: Path, changes: dict) -> Path:
    config = copy.deepcopy(BASE)
    config["support"] = {"mode": "volumes", "volumes": 2, "groups": 1}
    config.update(changes)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_volumes_mode_passes_whole_volumes_in_one_call(dataset):
    methods = {"methods": [{"method": "ofl", "options": {"epochs": 3, "lr": "1e-4"}}]}
    config = experiment.load_config(write_yaml_without_slices(dataset, methods))
    assert config.methods[0].options.lr == 1e-4 and config.methods[0].options.epochs == 3
    factory = Factory()
    experiment.run_experiment(config, dataset / "out", engine_factory=factory, progress=False)
    assert len(factory.calls) == 3
    for call in factory.calls:
        assert [s.label for s in call["supports"]] == [1, 2]
        assert [r.image.shape for r in call["references"]] == [SHAPE, SHAPE]
        assert call["options"].epochs == 3


def test_annotated_query_planes(dataset):
    path = write_yaml_without_slices(dataset, {"methods": [{"method": "sam2", "annotate_query": 1}]})
    factory = Factory()
    experiment.run_experiment(experiment.load_config(path), dataset / "out", engine_factory=factory, progress=False)
    for call in factory.calls:
        for support in call["supports"]:
            (plane,) = support.slices
            truth = call["truth"] == support.label
            assert np.array_equal(support.mask[plane], truth[plane]) and truth[plane].any()
            assert not np.delete(support.mask, plane, axis=0).any()
    # Label 1 of case 3 spans planes 1..6: the middle of those 6 planes is index 3 -> plane 4.
    info = json.loads((dataset / "out" / "group_0" / "sam2" / "3" / "info.json").read_text())
    assert info["annotated_planes"]["4"] == ["1"]
    assert "also given 1 annotated plane(s)" in (dataset / "out" / "results.md").read_text()


def test_draws_are_reproducible_and_a_changed_draw_is_refused(dataset):
    config = experiment.load_config(write_config(dataset))
    infos = experiment.scan_cases(config)
    assert experiment.draw_groups(config, infos) == experiment.draw_groups(config, infos)
    experiment.run_experiment(config, dataset / "out", engine_factory=Factory(), progress=False)
    changed = experiment.load_config(write_config(dataset, {"support": {"seed": 2}}))
    with pytest.raises(InputError, match="different `groups`"):
        experiment.run_experiment(changed, dataset / "out", engine_factory=refuse_engine, progress=False)


@pytest.mark.parametrize(
    "changes, remove, expected",
    [
        ({}, ("methods",), "`the top level` lacks the required key(s) methods"),
        ({"colour": "red"}, (), "unknown key(s) colour"),
        ({"methods": [{"method": "unet"}]}, (), "`methods[0].method` must be one of"),
        ({"methods": [{"method": "ofl", "options": {"topk": 3}}]}, (), "`methods[0].options` has unknown key(s) topk"),
        ({"methods": [{"method": "ofl", "options": {"epochs": "many"}}]}, (), "`methods[0].options.epochs` must be a whole number"),
        ({"methods": [{"method": "ofl"}, {"method": "ofl"}]}, (), "same name"),
        ({"model": {"modle": "x"}}, (), "`model` has unknown key(s) modle"),
        ({"cases": {"ids": [1, 2], "image": "scan_{id}.nii.gz", "label": "label_{id}.nii.gz"}}, (), "scan_1.nii.gz"),
        ({"cases": {"ids": [1], "image": "image.nii.gz", "label": "label_{id}.nii.gz"}}, (), "`cases.image` must contain {id}"),
        ({"labels": {1: "box one", 7: "ghost"}}, (), "label 7 (ghost) from `labels` is found in no label file"),
        ({"labels": {"liver": 1}}, (), "`labels` keys must be positive whole numbers"),
        ({"queries": [1, 2]}, (), "`queries` shares case(s) 1, 2 with `support.pool`"),
        ({"support": {"slices_per_label": None}}, (), "`support.slices_per_label` is required"),
        ({"support": {"slices_per_label": 50}}, (), "Cannot draw 50 support planes for label 1"),
        ({"support": {"volumes": 9}}, (), "`support.volumes` must lie in 1..5"),
        ({"support": {"volumes": [1, 9]}}, (), "`support.volumes` names unknown case(s) 9"),
        ({"preset": "bone"}, (), "`preset` Unknown intensity preset"),
        ({"axis": 3}, (), "`axis` must lie in 0..2"),
        ({"data_root": "nowhere"}, (), "does not exist"),
    ],
)
def test_config_errors_name_the_key_and_file(dataset, changes, remove, expected):
    path = write_config(dataset, changes, remove)
    with pytest.raises(InputError) as error:
        config = experiment.load_config(path)
        experiment.draw_groups(config, experiment.scan_cases(config))
    message = str(error.value)
    assert expected in message
    assert "exp.yaml" in message or "Cannot draw" in message


def test_image_and_labels_on_different_grids(dataset):
    moved = sitk.ReadImage(str(dataset / "data" / "image_2.nii.gz"))
    moved.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(moved, str(dataset / "data" / "image_2.nii.gz"))
    config = experiment.load_config(write_config(dataset))
    with pytest.raises(InputError, match="label map and the image lie on different grids"):
        experiment.scan_cases(config)


def test_command_line_reports_config_errors(dataset, capsys):
    from oflsam2.cli import main

    assert main(["experiment", str(write_config(dataset, {"colour": "red"})), "--quiet"]) == 2
    assert "unknown key(s) colour" in capsys.readouterr().err


def test_a_refused_experiment_leaves_no_output_folder(dataset, capsys):
    """A label found in no case is refused after the data were read: the --out folder was made
    before that, and stayed behind empty."""
    from oflsam2.cli import main

    out = dataset / "results" / "synthetic"
    config = write_config(dataset, {"labels": {9: "nowhere"}})
    assert main(["experiment", str(config), "--out", str(out), "--quiet"]) == 2
    assert "found in no label file" in capsys.readouterr().err
    assert not (dataset / "results").exists()


# ---------------------------------------------------------------------------------------------
# Shipped configs


def placeholder_root(config_path: Path, root: Path) -> Path:
    """Empty files at every path a config names (the loader only checks that they exist)."""
    raw = yaml.safe_load(config_path.read_text())
    for case in raw["cases"]["ids"]:
        for key in ("image", "label"):
            path = root / raw["cases"][key].replace("{id}", str(case))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    return root


@pytest.mark.parametrize(
    "name, labels, mode, volumes, groups, methods",
    [
        ("synapse_ofl_2vol", 8, "volumes", 2, 3, ["ofl"]),
        ("synapse_ofl_3vol", 8, "volumes", 3, 3, ["ofl"]),
        ("promise12_ofl_2vol", 1, "volumes", 2, 3, ["ofl"]),
        ("promise12_ofl_3vol", 1, "volumes", 3, 3, ["ofl"]),
        ("chaos_revsam2", 4, "slices", 3, 3, ["revsam2", "forward"]),
        ("ablation_synapse", 8, "volumes", 3, 3, ABLATION_RUNS),
        ("ablation_chaos", 4, "slices", 3, 3, ABLATION_RUNS),
    ],
)
def test_paper_configs(tmp_path, monkeypatch, name, labels, mode, volumes, groups, methods):
    path = EXPERIMENTS / f"{name}.yaml"
    for variable in ("SYNAPSE_ROOT", "PROMISE12_ROOT", "CHAOS_ROOT"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(InputError, match="Set the environment variable it names, or Pass --data-root"):
        experiment.load_config(path)
    config = experiment.load_config(path, data_root=placeholder_root(path, tmp_path))
    assert config.name == name and len(config.labels) == labels
    assert (config.support.mode, config.support.volumes, config.support.groups) == (mode, volumes, groups)
    assert [m.name for m in config.methods] == methods and config.model.image_size == 1024
    if config.queries:
        assert not set(config.queries) & set(config.support.pool)
    if name.startswith("synapse"):
        assert len(config.queries) == 12 and len(config.support.pool) == 18 and config.preset == "ct-abdomen"
    if name in ("chaos_revsam2", "ablation_chaos"):
        assert config.support.slices_per_label == 10 and len(config.cases) == 20
    if name.startswith("ablation"):  # OFL-SAM2 as its paper states it against the extended preset, same backbone
        ofl_runs = {m.name: m.options for m in config.methods if m.method == "ofl"}
        assert ofl_runs == {"ofl-paper": MethodOptions(), "ofl-extended": MethodOptions.extended()}
        assert config.model.model == "sam2.1-base-plus"


def test_chaos_shared_config(shared_data):
    path = EXPERIMENTS / "chaos_shared.yaml"
    raw = yaml.safe_load(path.read_text())
    assert (path.parent / raw["data_root"]).resolve() == (REPO.parent / "shared" / "data" / "chaos_t2_fewshot").resolve()
    config = experiment.load_config(path, data_root=shared_data / "chaos_t2_fewshot", random_weights=True, device="cpu")
    assert config.model.random_weights and config.model.device == "cpu" and config.model.image_size == 256
    assert [m.method for m in config.methods] == ["sam2", "forward", "revsam2", "ofl"]
    assert config.methods[0].annotate_query == 1
    (group,) = experiment.draw_groups(config, experiment.scan_cases(config))
    assert group["support"] == ["1", "2", "3"] and group["queries"] == ["5", "8", "10"]
    for label, per_case in group["slices"].items():
        assert sum(len(p) for p in per_case.values()) == 10 and set(per_case) == {"1", "2", "3"}
        for case, planes in per_case.items():
            labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(config.cases[case].label))))
            assert all((labels[p] == int(label)).any() for p in planes)


# ---------------------------------------------------------------------------------------------
# Real engine


def test_real_engine_end_to_end(dataset, tiny_model):
    from oflsam2.api import Engine

    config = experiment.load_config(
        write_config(
            dataset,
            {
                "cases": {"ids": [1, 2, 3], "image": "image_{id}.nii.gz", "label": "label_{id}.nii.gz"},
                "labels": {1: "box one"},
                "support": {"volumes": [1, 2], "slices_per_label": 2, "groups": 1},
                "queries": [3],
                "methods": [{"method": "forward"}, {"method": "sam2", "annotate_query": 1}],
                "model": {"model": "sam2.1-tiny", "image_size": 256, "random_weights": True, "device": "cpu"},
            },
        )
    )
    outcome = experiment.run_experiment(config, dataset / "out", engine_factory=lambda s: Engine(s, model=tiny_model), progress=False)
    assert outcome.computed == 2 and len(outcome.rows) == 2
    assert all(0.0 <= r["dice"] <= 1.0 for r in outcome.rows)
    # The annotated plane reaches sam2's output unchanged.
    info = json.loads((dataset / "out" / "group_0" / "sam2" / "3" / "info.json").read_text())
    (plane,) = [int(p) for p in info["annotated_planes"]]
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "out" / "group_0" / "sam2" / "3" / experiment.PREDICTION_FILE)))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "data" / "label_3.nii.gz")))
    assert np.array_equal(prediction[plane] == 1, truth[plane] == 1)
    assert "RANDOM WEIGHTS" in (dataset / "out" / "results.md").read_text()


def test_ofl_presets_in_an_experiment_file(dataset):
    methods = [{"method": "ofl", "name": "p", "options": {"epochs": 2}},
               {"method": "ofl", "name": "e", "options": {"ofl_preset": "extended", "max_fit_slices": 8}}]
    config = experiment.load_config(write_config(dataset, {"methods": methods}, remove=("model",)))
    assert [m.options for m in config.methods] == [MethodOptions(epochs=2), MethodOptions.extended(max_fit_slices=8)]
    assert config.model.model == "sam2.1-base-plus"  # no model given: OFL-SAM2's backbone
    bad = write_config(dataset, {"methods": [{"method": "ofl", "options": {"ofl_preset": "legacy"}}]})
    with pytest.raises(InputError, match="ofl_preset` must be one of paper, extended"):
        experiment.load_config(bad)


def test_the_ablation_runs_end_to_end_in_one_command(shared_data, tiny_model, tmp_path, monkeypatch, capsys):
    """Both shipped ablation files, their methods and options as shipped, in one ``oflsam2
    experiment`` command with random weights: their data cut to 4 CHAOS cases of 8 slices, one
    query, the liver, 1 epoch, 256 px."""
    from oflsam2 import backend

    data = tmp_path / "data"
    for case in (1, 2, 3, 5):
        for kind in ("image", "label"):
            volume = sitk.ReadImage(str(shared_data / "chaos_t2_fewshot" / f"{kind}_{case}.nii.gz"))[:, :, 12:20]
            data.mkdir(exist_ok=True)
            sitk.WriteImage(sitk.Cast(volume, sitk.sitkFloat32), str(data / f"{kind}_{case}.nii.gz"))
    paths = []
    for name, variable in (("ablation_synapse", "SYNAPSE_ROOT"), ("ablation_chaos", "CHAOS_ROOT")):
        raw = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())
        assert [m.get("name", m["method"]) for m in raw["methods"]] == ABLATION_RUNS
        for method in raw["methods"]:
            if method["method"] == "ofl":
                method["options"].update(epochs=1)
        raw.update(cases={"ids": [1, 2, 3, 5], "image": "image_{id}.nii.gz", "label": "label_{id}.nii.gz"},
                   labels={1: "liver"}, preset="mr", queries=[5], model={"model": "sam2.1-tiny", "image_size": 256})
        support = {"volumes": 2, "pool": [1, 2, 3], "groups": 1} if raw["support"]["mode"] == "volumes" else {
            "volumes": [1, 2], "slices_per_label": 4, "groups": 1}
        raw["support"].update(support)
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(raw))
        monkeypatch.setenv(variable, str(data))
    monkeypatch.setattr(backend, "load_sam2", lambda settings: tiny_model)
    out = tmp_path / "results"
    status = cli.main(["experiment", *map(str, paths), "--random-weights", "--device", "cpu", "--out", str(out),
                       "--no-montage", "--quiet"])
    assert status == 0, capsys.readouterr().err
    for name in ("ablation_synapse", "ablation_chaos"):
        rows = read_csv(out / name / "results.csv")
        assert {r["method"] for r in rows} == set(ABLATION_RUNS)
        recorded = json.loads((out / name / "run.json").read_text())["methods"]
        assert recorded["ofl-paper"]["ofl_preset"] == "paper" and recorded["ofl-extended"]["ofl_preset"] == "extended"
        assert recorded["ofl-extended"]["options"]["max_fit_slices"] == 64 and recorded["ofl-paper"]["options"]["max_fit_slices"] is None
    assert "ablation_synapse" in capsys.readouterr().out
