"""``oflsam2 eval``: file and folder scoring on real CHAOS label maps, grids, tables, CLI."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from oflsam2 import evaluation
from oflsam2.errors import InputError


def write_like(array: np.ndarray, like: sitk.Image, path) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def chaos_label(shared_data):
    return shared_data / "chaos_t2_fewshot" / "label_1.nii.gz"


@pytest.fixture(scope="module")
def eroded(chaos_label, tmp_path_factory):
    """CHAOS case 1 with every organ eroded by one voxel in-plane; and the labels eroded."""
    image = sitk.ReadImage(str(chaos_label))
    labels = np.rint(sitk.GetArrayFromImage(image)).astype(np.uint8)
    out = np.zeros_like(labels)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    for value in range(1, 5):
        out[ndimage.binary_erosion(labels == value, structure=in_plane)] = value
    path = tmp_path_factory.mktemp("eroded") / "case1_pred.nii.gz"
    write_like(out, image, path)
    return path, labels, out


def test_case_name_strips_extensions_and_role_words():
    assert evaluation.case_name("label_1.nii.gz") == "1"
    assert evaluation.case_name("case0001_pred.seg.nrrd") == "case0001"
    assert evaluation.case_name("/x/Case07_segmentation.mhd") == "Case07"
    assert evaluation.case_name("img5-gt.nrrd") == "img5"
    assert evaluation.case_name("label.nii.gz") == "label"


def test_real_label_map_against_itself(chaos_label):
    rows = evaluation.evaluate_pair(chaos_label, chaos_label)
    assert [r["label"] for r in rows] == [1, 2, 3, 4]  # float64 labels rounded; all present
    for row in rows:
        assert row["case"] == "1"
        assert row["dice"] == 1.0 and row["hd95_voxel"] == 0.0 and row["hd95_mm"] == 0.0
        assert row["assd_mm"] == 0.0 and row["nsd"] == 1.0


def test_real_label_map_against_its_erosion(chaos_label, eroded):
    path, labels, out = eroded
    rows = evaluation.evaluate_pair(path, chaos_label, labels=[1, 4], nsd_tolerance_mm=1.0)
    assert [r["label"] for r in rows] == [1, 4]
    for row in rows:
        ref, pred = labels == row["label"], out == row["label"]
        # The erosion lies inside the organ: Dice = 2|E| / (|E| + |R|) exactly.
        assert row["dice"] == pytest.approx(2 * pred.sum() / (pred.sum() + ref.sum()))
        assert 0.5 < row["dice"] < 0.99
        assert row["tp"] == pred.sum() and row["ref_voxels"] == ref.sum()
        # One in-plane voxel step is 1.25 mm: most surface points lie that far, some diagonally.
        assert 1.0 <= row["hd95_voxel"] <= 2.0 and 1.25 <= row["hd95_mm"] <= 2.5
        assert 0 < row["nsd"] < 1  # 1.25 mm steps miss a 1 mm tolerance, touching walls count


def test_grid_mismatch_names_both_grids(chaos_label, tmp_path):
    image = sitk.ReadImage(str(chaos_label))
    moved = sitk.Image(image)
    moved.SetSpacing((1.5, 1.25, 7.7))
    path = tmp_path / "pred.nii.gz"
    sitk.WriteImage(moved, str(path))
    with pytest.raises(InputError, match="different grids") as error:
        evaluation.evaluate_pair(path, chaos_label)
    assert "1.5" in str(error.value) and "1.25" in str(error.value)


def run_cli(argv):
    parser = argparse.ArgumentParser()
    evaluation.register_eval_command(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_command_writes_tables(chaos_label, eroded, tmp_path, capsys):
    out = tmp_path / "results.csv"
    assert run_cli(["eval", "--pred", str(eroded[0]), "--ref", str(chaos_label), "--labels", "1,2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| case | label | dice |" in printed and "±" in printed
    rows = evaluation.read_csv(out)
    assert [(r["case"], r["label"]) for r in rows] == [("1", 1), ("1", 2)]
    assert isinstance(rows[0]["dice"], float) and rows[0]["pred_empty"] is False
    summary = evaluation.read_csv(tmp_path / "results_summary.csv")
    assert [s["label"] for s in summary] == [1, 2, "mean"]
    assert summary[-1]["dice_mean"] == pytest.approx((rows[0]["dice"] + rows[1]["dice"]) / 2)


def test_cli_main_exits_2_on_grid_mismatch(chaos_label, tmp_path, capsys):
    from oflsam2.cli import main

    small = sitk.Image(16, 16, 4, sitk.sitkUInt8)
    path = tmp_path / "small.nii.gz"
    sitk.WriteImage(small, str(path))
    assert main(["eval", "--pred", str(path), "--ref", str(chaos_label)]) == 2
    assert "different grids" in capsys.readouterr().err


def test_bad_label_list_is_a_usage_error():
    with pytest.raises(argparse.ArgumentTypeError):
        evaluation.parse_label_list("1,liver")
    with pytest.raises(argparse.ArgumentTypeError):
        evaluation.parse_label_list("0,2")
    assert evaluation.parse_label_list("3, 1,3") == [1, 3]


# ---------------------------------------------------------------------------------------------
# Folder mode and tables on small synthetic label maps


def small_map(values: dict[int, tuple[slice, ...]], shape=(6, 12, 12)) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    for value, box in values.items():
        array[box] = value
    return array


def write(array, path, spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_folder_mode_matches_by_case_and_reports_the_rest(tmp_path):
    preds, refs = tmp_path / "pred", tmp_path / "ref"
    preds.mkdir(), refs.mkdir()
    box = (slice(1, 4), slice(2, 8), slice(2, 8))
    write(small_map({1: box}), refs / "label_1.nii.gz")
    write(small_map({2: box}), refs / "label_2.nrrd")  # label 2 only here: scored for case 1 too
    write(small_map({1: box}), preds / "1_pred.nii.gz")
    write(small_map({2: box}), preds / "2_seg.nii.gz")
    write(small_map({1: box}), preds / "3_pred.nii.gz")
    (preds / "notes.txt").write_text("not a label map")
    rows, unmatched = evaluation.evaluate_folders(preds, refs)
    assert [(r["case"], r["label"]) for r in rows] == [("1", 1), ("1", 2), ("2", 1), ("2", 2)]
    assert [p.name for p in unmatched] == ["3_pred.nii.gz"]
    dice = {(r["case"], r["label"]): r["dice"] for r in rows}
    assert dice == {("1", 1): 1.0, ("1", 2): 1.0, ("2", 1): 1.0, ("2", 2): 1.0}  # empty pairs -> 1
    flags = {(r["case"], r["label"]): (r["pred_empty"], r["ref_empty"]) for r in rows}
    assert flags[("1", 2)] == (True, True) and flags[("1", 1)] == (False, False)
    excluded, _ = evaluation.evaluate_folders(preds, refs, both_empty="exclude")
    assert math.isnan([r for r in excluded if r["case"] == "1" and r["label"] == 2][0]["dice"])


def test_two_files_naming_one_case_are_refused(tmp_path):
    for name in ("7_pred.nii.gz", "7.nrrd"):
        write(small_map({}), tmp_path / name)
    with pytest.raises(InputError, match="same case"):
        evaluation.match_folders(tmp_path, tmp_path)


def test_summary_means_and_pooled_dice():
    rows = [
        {"case": "a", "label": 1, "dice": 0.5, "hd95_voxel": 2.0, "hd95_mm": math.nan, "assd_mm": 1.0, "nsd": 0.4,
         "tp": 10, "pred_voxels": 20, "ref_voxels": 20},
        {"case": "b", "label": 1, "dice": 1.0, "hd95_voxel": 0.0, "hd95_mm": 3.0, "assd_mm": 3.0, "nsd": 0.8,
         "tp": 30, "pred_voxels": 30, "ref_voxels": 30},
        {"case": "a", "label": 2, "dice": 0.0, "hd95_voxel": 0.0, "hd95_mm": math.nan, "assd_mm": math.nan, "nsd": 0.0,
         "tp": 0, "pred_voxels": 0, "ref_voxels": 5},
    ]
    summary = {s["label"]: s for s in evaluation.summarize(rows)}
    assert summary[1]["dice_mean"] == 0.75 and summary[1]["dice_std"] == 0.25
    assert summary[1]["hd95_mm_mean"] == 3.0  # NaN left out
    assert summary[1]["pooled_dice_mean"] == pytest.approx(2 * 40 / 100)
    assert math.isnan(summary[2]["hd95_mm_mean"])
    assert summary["mean"]["dice_mean"] == pytest.approx(0.375) and summary["mean"]["cases"] == 2
    table = evaluation.summary_markdown(evaluation.summarize(rows))
    assert "| 1 | 2 | 75.00 ± 25.00 |" in table and "n/a" in table


def test_csv_round_trip_keeps_types(tmp_path):
    rows = [{"case": "007", "label": 3, "dice": math.nan, "pred_empty": True, "tp": 4}]
    path = evaluation.write_csv(rows, tmp_path / "r.csv")
    back = evaluation.read_csv(path)[0]
    assert back["case"] == "007" and back["label"] == 3 and back["pred_empty"] is True and back["tp"] == 4
    assert math.isnan(back["dice"])


def test_scores_and_summary_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    """eval wrote the per-case CSV and then its summary: a failure on the second left a new
    scores file beside an old summary."""
    scores, summary = tmp_path / "scores.csv", tmp_path / "scores_summary.csv"
    scores.write_text("old scores\n")
    summary.write_text("old summary\n")
    real_write, calls = evaluation._write_temporary_csv, []

    def disk_full_on_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(*args)

    monkeypatch.setattr(evaluation, "_write_temporary_csv", disk_full_on_second)
    with pytest.raises(evaluation.OFLSAM2Error, match="scores_summary.csv: No space left on device. The existing files were kept"):
        evaluation.write_csv_files([([{"a": 1}], scores, None), ([{"b": 2}], summary, None)])
    assert scores.read_text() == "old scores\n" and summary.read_text() == "old summary\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv", "scores_summary.csv"]  # no temporary left
    monkeypatch.undo()
    evaluation.write_csv_files([([{"a": 1}], scores, None), ([{"b": 2}], summary, None)])
    assert evaluation.read_csv(scores) == [{"a": 1}] and evaluation.read_csv(summary) == [{"b": 2}]


def test_a_folder_in_the_way_of_the_summary_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "scores_summary.csv").mkdir()
    with pytest.raises(InputError, match="a folder of that name is in the way"):
        evaluation.write_csv_files([([{"a": 1}], tmp_path / "scores.csv", None), ([{"b": 2}], tmp_path / "scores_summary.csv", None)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores_summary.csv"]


def test_unreadable_and_non_label_files(tmp_path):
    image = sitk.GetImageFromArray(np.full((4, 8, 8), 0.5, dtype=np.float32))
    sitk.WriteImage(image, str(tmp_path / "soft.nii.gz"))
    with pytest.raises(InputError, match="non-integer"):
        evaluation.read_label_map(tmp_path / "soft.nii.gz")
    with pytest.raises(InputError, match="does not exist"):
        evaluation.read_label_map(tmp_path / "missing.nii.gz")
    vector = sitk.GetImageFromArray(np.zeros((4, 8, 8, 2), dtype=np.uint8), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "layers.nrrd"))
    with pytest.raises(InputError, match="single-layer"):
        evaluation.read_label_map(tmp_path / "layers.nrrd")
