"""A hostile new user of the ``oflsam2`` command line and Python API: the defects found by trying
links, folders, full disks, label maps in the wrong place and wrong Python types.

Each test states the input, the exit status or error it must give, and what must stay as it was.
Commands run in-process through ``oflsam2.cli.main`` on a small crop of a real CHAOS T2 volume;
SAM2 is replaced by ``FakeEngine`` where the model is not the point. The Python API cases use the
real :class:`~oflsam2.api.Engine` (random weights, 256 px): every one is refused before the model
is built, so none of them loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from oflsam2 import api, cli
from oflsam2.api import Engine, LabelSupport, MethodOptions, ModelSettings, Reference, SegmentResult
from oflsam2.cli import batch as batch_command
from oflsam2.errors import InputError

ANNOTATED = (1, 5)


class FakeEngine:
    """The Engine's ``segment`` with a fixed box per label (validated like the real one)."""

    built: list = []

    def __init__(self, settings, *args, **kwargs):
        FakeEngine.built.append(settings)

    def segment(self, image, supports, *, method, axis, preset, options, references, events, **rest):
        image = api.validate_run(image, supports, method=method, axis=axis, preset=preset, options=options,
                                 references=references)
        masks = {}
        for support in supports:
            mask = np.zeros(image.shape, bool)
            mask[:, 20:40, 20:40] = True
            masks[support.label] = mask
        return SegmentResult(masks, axis, method, {"engine": "fake"})


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "Engine", FakeEngine)
    monkeypatch.setenv("OFLSAM2_CACHE_DIR", str(tmp_path / "cache"))
    FakeEngine.built = []
    return FakeEngine


@pytest.fixture(scope="module")
def source(shared_data, tmp_path_factory) -> Path:
    """An 8-slice 128x128 crop of CHAOS case 1 with its labels and a 2-slice support."""
    folder = tmp_path_factory.mktemp("hostile_source")
    chaos = shared_data / "chaos_t2_fewshot"
    image = sitk.Cast(sitk.ReadImage(str(chaos / "image_1.nii.gz"))[64:192, 64:192, 14:22], sitk.sitkFloat32)
    dense = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(chaos / "label_1.nii.gz"))[64:192, 64:192, 14:22]))
    support = np.zeros(dense.shape, np.uint8)
    for z in ANNOTATED:
        support[z] = dense[z]
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    for name, array in (("support.nii.gz", support), ("labels.nii.gz", dense.astype(np.uint8))):
        labels = sitk.GetImageFromArray(array)
        labels.CopyInformation(image)
        sitk.WriteImage(labels, str(folder / name))
    return folder


@pytest.fixture
def ws(source, tmp_path) -> Path:
    root = tmp_path / "work"
    shutil.copytree(source, root)
    return root


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--method", "sam2", "--random-weights", "--image-size", "256"]


# --- outputs that are inputs in disguise ------------------------------------------------------


def test_segment_refuses_an_output_that_is_the_support_reached_through_a_link(ws, fake_engine, capsys):
    """--support LINK --out REAL-FILE (LINK -> REAL-FILE): a path comparison saw two names and
    replaced the user's support with the result (exit 0)."""
    (ws / "link.nii.gz").symlink_to(ws / "support.nii.gz")
    before = digests(ws)
    code, _, err = run_cli(
        ["segment", "--image", ws / "image.nii.gz", "--support", ws / "link.nii.gz", "--out", ws / "support.nii.gz", *FAST],
        capsys,
    )
    assert code == cli.EXIT_USER_ERROR and "one of the inputs" in err and "Traceback" not in err
    assert digests(ws) == before and not fake_engine.built


def test_segment_refuses_an_output_that_is_a_hard_link_to_the_image(ws, fake_engine, capsys):
    os.link(ws / "image.nii.gz", ws / "same.nii.gz")
    before = digests(ws)
    code, _, err = run_cli(
        ["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz", "--out", ws / "same.nii.gz", *FAST],
        capsys,
    )
    assert code == cli.EXIT_USER_ERROR and "one of the inputs" in err
    assert digests(ws) == before


def test_eval_refuses_an_out_that_is_the_reference_reached_through_a_link(ws, capsys):
    """eval --ref LINK --out REAL-FILE overwrote the reference label map with CSV (exit 0)."""
    (ws / "ref_link.nii.gz").symlink_to(ws / "labels.nii.gz")
    before = digests(ws)
    code, _, err = run_cli(
        ["eval", "--pred", ws / "support.nii.gz", "--ref", ws / "ref_link.nii.gz", "--out", ws / "labels.nii.gz"], capsys
    )
    assert code == cli.EXIT_USER_ERROR and "would overwrite the input" in err
    assert digests(ws) == before


# --- output locations ---------------------------------------------------------------------------


def test_eval_out_that_is_a_folder_is_refused_without_a_traceback(ws, capsys):
    """eval --out FOLDER ended in IsADirectoryError from os.replace."""
    (ws / "scores").mkdir()
    code, _, err = run_cli(["eval", "--pred", ws / "support.nii.gz", "--ref", ws / "labels.nii.gz", "--out", ws / "scores"], capsys)
    assert code == cli.EXIT_USER_ERROR and "is a folder" in err and "Traceback" not in err
    assert list((ws / "scores").iterdir()) == []


def test_output_under_a_file_says_it_is_a_file(ws, fake_engine, capsys):
    """--out support.nii.gz/x.nii.gz said 'the folder support.nii.gz does not exist'."""
    code, _, err = run_cli(
        ["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz",
         "--out", ws / "support.nii.gz" / "x.nii.gz", *FAST],
        capsys,
    )
    assert code == cli.EXIT_USER_ERROR and "is a file, not a folder" in err


def test_eval_on_a_full_disk_keeps_the_old_csv_and_says_why(ws, full_disk, capsys):
    """A full disk ended in an OSError traceback from write_csv."""
    code, _, err = run_cli(
        ["eval", "--pred", ws / "support.nii.gz", "--ref", ws / "labels.nii.gz", "--out", full_disk / "scores.csv"], capsys
    )
    assert code == cli.EXIT_USER_ERROR and "No space left" in err and "Traceback" not in err
    assert (full_disk / "scores.csv").read_text() == "old scores\n"
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "scores.csv"]  # no temporary left


def test_an_unexpected_os_error_is_a_message_not_a_traceback(ws, monkeypatch, capsys):
    """The last safety net: an OSError that no command turned into a message."""
    from oflsam2 import evaluation

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/somewhere/labels.nii.gz")

    monkeypatch.setattr(evaluation, "evaluate_pair", fail)
    code, _, err = run_cli(["eval", "--pred", ws / "support.nii.gz", "--ref", ws / "labels.nii.gz"], capsys)
    assert code == cli.EXIT_USER_ERROR and "Permission denied" in err and "/somewhere/labels.nii.gz" in err
    assert "Traceback" not in err


_SLOW_TRAIN = """
import sys, time
from pathlib import Path
from oflsam2 import api, cli

class SlowEngine:
    def __init__(self, settings, *args, **kwargs):
        pass
    def segment(self, image, supports, **kwargs):
        Path(sys.argv[1]).write_text("running")
        time.sleep(60)

api.Engine = SlowEngine
sys.exit(cli.main(sys.argv[2:]))
"""


def test_sigterm_during_train_removes_the_new_adapter_folder(ws, tmp_path):
    """SIGTERM killed the process at once (exit -15): the adapter folder it had created stayed
    behind, empty. Now SIGTERM unwinds like Ctrl+C and exits with 143."""
    started = tmp_path / "started"
    before = digests(ws)
    argv = ["train", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz", "--out", ws / "new" / "adapter",
            "--model", "sam2.1-tiny", "--random-weights", "--image-size", "256", "--epochs", "1"]
    process = subprocess.Popen([sys.executable, "-c", _SLOW_TRAIN, str(started), *map(str, argv)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.exists(), process.communicate()[1].decode()
    assert (ws / "new" / "adapter").is_dir()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and b"Terminated" in err, err.decode()
    assert not (ws / "new").exists() and digests(ws) == before


def test_experiment_given_a_folder_says_it_wants_the_yaml_file(ws, capsys):
    """`experiment FOLDER` said 'The experiment file FOLDER does not exist'."""
    code, _, err = run_cli(["experiment", ws, "--out", ws / "results", "--random-weights"], capsys)
    assert code == cli.EXIT_USER_ERROR and "is a folder" in err and "YAML" in err


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder bind-mounted read-only (root ignores permission bits, not a read-only mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root")
    folder = tmp_path / "read_only"
    folder.mkdir()
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_quality_out_in_a_read_only_folder_is_refused_before_the_model(ws, read_only_folder, fake_engine, capsys):
    """--quality-out into a read-only folder passed the checks: the run went through the model
    and failed only when writing the CSV."""
    code, _, err = run_cli(
        ["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz", "--out", ws / "out.nii.gz",
         "--quality-out", read_only_folder / "quality.csv", *FAST],
        capsys,
    )
    assert code == cli.EXIT_USER_ERROR and "not writable" in err and "Traceback" not in err
    assert not fake_engine.built and not (ws / "out.nii.gz").exists()


# --- batch --------------------------------------------------------------------------------------


def test_batch_without_any_support_or_adapter_is_refused_before_the_model(ws, fake_engine, capsys):
    """Without --support-dir or --adapter the batch loaded the model and failed every case (exit 1)."""
    cases = ws / "cases"
    cases.mkdir()
    shutil.copy(ws / "image.nii.gz", cases / "c1.nii.gz")
    code, _, err = run_cli(["batch", cases, "--out", ws / "out", *FAST], capsys)
    assert code == cli.EXIT_USER_ERROR and "--support-dir" in err and "--adapter" in err
    assert not fake_engine.built and not (ws / "out" / "cases.csv").exists()


def test_an_interrupted_batch_says_finished_cases_are_kept(ws, monkeypatch, capsys):
    """Ctrl+C in a batch said 'no output was written' although every finished case is kept."""

    def run_batch_command(args):  # stands in for the real handler, interrupted after some cases
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_command, "run_batch_command", run_batch_command)
    code, _, err = run_cli(["batch", ws, "--out", ws / "out", *FAST], capsys)
    assert code == cli.EXIT_INTERRUPTED and "finished cases are kept" in err and "no output was written" not in err


def test_batch_refuses_its_input_folder_as_output_folder(ws, capsys):
    """--out INPUT wrote NAME_seg.nii.gz beside the volumes: the next run read them as cases."""
    cases = ws / "cases"
    cases.mkdir()
    shutil.copy(ws / "image.nii.gz", cases / "c1.nii.gz")
    code, _, err = run_cli(["batch", cases, "--out", cases, "--support-dir", ws, *FAST], capsys)
    assert code == cli.EXIT_USER_ERROR and "is the input folder" in err
    assert sorted(p.name for p in cases.iterdir()) == ["c1.nii.gz"]


def test_batch_output_folder_inside_the_input_folder_is_not_a_case(ws):
    """An output subfolder holding files looked like a DICOM series folder: one more failed case."""
    from oflsam2.batch import collect_cases

    cases = ws / "cases"
    (cases / "results").mkdir(parents=True)
    shutil.copy(ws / "image.nii.gz", cases / "c1.nii.gz")
    (cases / "results" / "cases.csv").write_text("case,status\n")
    found = collect_cases(cases, cases / "results")
    assert [case.name for case in found] == ["c1"]


def test_batch_refuses_to_write_cases_csv_over_its_manifest(ws, fake_engine, capsys):
    """`batch DIR/cases.csv --out DIR` replaced the user's manifest with the batch's case list."""
    manifest = ws / "cases.csv"
    manifest.write_text(f"image,support\n{ws / 'image.nii.gz'},{ws / 'support.nii.gz'}\n")
    before = digests(ws)
    code, _, err = run_cli(["batch", manifest, "--out", ws, *FAST], capsys)
    assert code == cli.EXIT_USER_ERROR and "over its input" in err and str(manifest) in err
    assert digests(ws) == before and not fake_engine.built


@pytest.fixture
def fake_batch_engine(monkeypatch, fake_engine):
    """The batch's executor builds FakeEngine instead of loading SAM2."""
    from oflsam2 import executors

    monkeypatch.setattr(executors, "build_engine", lambda settings, max_cached_volumes: FakeEngine(settings))
    return fake_engine


def truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: len(data) * 2 // 3])
    return target


def table_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_batch_cases_of_one_name_each_get_their_row_and_a_failure_is_counted(ws, fake_batch_engine, capsys):
    """a/image.nii.gz (truncated) and b/image.nii.gz in one manifest: the failed case wrote
    nothing, yet the batch said "2 case(s) done, 0 failed", exited 0 and cases.csv listed both as
    done (rows were kept by name: the first case's row was lost)."""
    truncated_copy(ws / "image.nii.gz", ws / "a" / "image.nii.gz")
    (ws / "b").mkdir()
    shutil.copy(ws / "image.nii.gz", ws / "b" / "image.nii.gz")
    manifest = ws / "manifest.csv"
    manifest.write_text("image,support,out\na/image.nii.gz,support.nii.gz,a.nii.gz\nb/image.nii.gz,support.nii.gz,b.nii.gz\n")
    code, out, err = run_cli(["batch", manifest, "--out", ws / "out", *FAST], capsys)
    assert code == batch_command.EXIT_SOME_FAILED, err
    assert "1 case(s) done, 0 skipped (already done), 1 failed" in out
    assert f"failed image ({ws / 'a' / 'image.nii.gz'})" in out
    rows = table_rows(ws / "out" / "cases.csv")
    assert [(r["case"], r["image"], r["status"]) for r in rows] == [
        ("image", str(ws / "a" / "image.nii.gz"), "failed"), ("image", str(ws / "b" / "image.nii.gz"), "done")]
    assert "truncated" in rows[0]["error"]
    assert sorted(p.name for p in (ws / "out").iterdir()) == ["b.nii.gz", "b.nii.gz.run.json", "cases.csv"]


def test_batch_outputs_of_one_stem_keep_their_own_records(ws, fake_batch_engine, capsys):
    """Outputs x.nii.gz and x.nrrd shared one record x.run.json: every resume recomputed one of
    them, and when one failed it deleted the other's record, after which the good case failed
    on every re-run ("not written by oflsam2 batch")."""
    shutil.copy(ws / "image.nii.gz", ws / "second.nii.gz")
    manifest = ws / "manifest.csv"
    manifest.write_text("image,support,out\nimage.nii.gz,support.nii.gz,x.nii.gz\nsecond.nii.gz,support.nii.gz,x.nrrd\n")
    out = ws / "out"

    def statuses():
        code, _, err = run_cli(["batch", manifest, "--out", out, *FAST], capsys)
        return code, [r["status"] for r in table_rows(out / "cases.csv")]

    assert statuses() == (0, ["done", "done"])
    assert {"x.nii.gz.run.json", "x.nrrd.run.json"} <= {p.name for p in out.iterdir()}
    stamp = (out / "x.nii.gz").stat().st_mtime_ns
    assert statuses() == (0, ["skipped", "skipped"])
    truncated_copy(ws / "image.nii.gz", ws / "second.nii.gz")  # the second case now fails
    assert statuses() == (batch_command.EXIT_SOME_FAILED, ["skipped", "failed"])
    assert statuses() == (batch_command.EXIT_SOME_FAILED, ["skipped", "failed"])  # the first case's record survived
    assert (out / "x.nii.gz").stat().st_mtime_ns == stamp


def test_batch_takes_over_the_record_an_older_version_named_after_the_stem(ws, fake_batch_engine, capsys):
    """A batch finished by an older version (records NAME_seg.run.json) resumes: its cases are
    skipped, not refused as files the batch did not write."""
    cases = ws / "cases"
    cases.mkdir()
    shutil.copy(ws / "image.nii.gz", cases / "c1.nii.gz")
    shutil.copy(ws / "support.nii.gz", ws / "c1.nii.gz")
    argv = ["batch", cases, "--out", ws / "out", "--support-dir", ws, *FAST]
    assert run_cli(argv, capsys)[0] == 0
    os.replace(ws / "out" / "c1_seg.nii.gz.run.json", ws / "out" / "c1_seg.run.json")
    assert run_cli(argv, capsys)[0] == 0
    assert [r["status"] for r in table_rows(ws / "out" / "cases.csv")] == ["skipped"]
    assert sorted(p.name for p in (ws / "out").iterdir()) == ["c1_seg.nii.gz", "c1_seg.nii.gz.run.json", "cases.csv"]


@pytest.mark.parametrize("rows, seg_nrrd, complaint", [
    ("image.nii.gz,support.nii.gz,x.nii.gz\nsecond.nii.gz,support.nii.gz,x.seg.nrrd\n", True, "writes too"),
    ("image.nii.gz,support.nii.gz,x.seg.nrrd\n", True, "writes too"),  # its own label map is its .seg.nrrd
    ("image.nii.gz,support.nii.gz,x.nii.gz\nsecond.nii.gz,support.nii.gz,X.nii.gz/../x.nii.gz\n", False, "writes too"),
    ("image.nii.gz,support.nii.gz,x.nii.gz\nimage.nii.gz,support.nii.gz,y.nii.gz\n", False, "listed twice"),
])
def test_batch_refuses_colliding_outputs_before_any_work_and_leaves_no_out_folder(ws, fake_batch_engine, capsys, rows,
                                                                                   seg_nrrd, complaint):
    shutil.copy(ws / "image.nii.gz", ws / "second.nii.gz")
    manifest = ws / "manifest.csv"
    manifest.write_text("image,support,out\n" + rows)
    before = digests(ws)
    code, _, err = run_cli(["batch", manifest, "--out", ws / "out", *FAST, *(["--seg-nrrd"] if seg_nrrd else [])], capsys)
    assert code == cli.EXIT_USER_ERROR and complaint in err and "Traceback" not in err
    assert not fake_batch_engine.built and digests(ws) == before
    assert not (ws / "out").exists(), "a refused batch left its --out folder"


def test_a_refused_batch_leaves_no_out_folder(ws, fake_batch_engine, capsys):
    empty = ws / "empty"
    empty.mkdir()
    code, _, err = run_cli(["batch", empty, "--out", ws / "new" / "out", "--support-dir", ws, *FAST], capsys)
    assert code == cli.EXIT_USER_ERROR and "holds no volume" in err
    assert not (ws / "new").exists()
    code, _, err = run_cli(["batch", ws, "--out", ws / "new" / "out", "--support-dir", ws / "image.nii.gz", *FAST], capsys)
    assert code == cli.EXIT_USER_ERROR and "is a file" in err  # before: "the support folder ... does not exist"
    assert not (ws / "new").exists()


def test_batch_refuses_a_manifest_out_column_naming_another_cases_image(ws, tmp_path):
    """Row 1's out was row 2's image: it would be overwritten before row 2 is segmented."""
    from oflsam2.batch import collect_cases

    shutil.copy(ws / "image.nii.gz", ws / "second.nii.gz")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        f"image,support,out\n{ws / 'image.nii.gz'},{ws / 'support.nii.gz'},{ws / 'second.nii.gz'}\n"
        f"{ws / 'second.nii.gz'},{ws / 'support.nii.gz'},\n"
    )
    with pytest.raises(InputError, match="over its input"):
        collect_cases(manifest, tmp_path / "out")


# --- a label map given as the image -------------------------------------------------------------


def test_a_label_map_given_as_the_image_is_named_in_a_warning(ws, fake_engine, capsys):
    """--image labels.nii.gz segmented the label map without a word."""
    code, _, err = run_cli(
        ["segment", "--image", ws / "labels.nii.gz", "--support", ws / "support.nii.gz", "--out", ws / "out.nii.gz", *FAST],
        capsys,
    )
    assert code == 0 and "looks like a label map" in err and "--image" in err


def test_a_label_map_given_as_a_reference_image_is_named_in_a_warning(ws, fake_engine, capsys):
    """--reference labels.nii.gz:labels.nii.gz used the label map as the reference's image without a word."""
    code, _, err = run_cli(
        ["segment", "--image", ws / "image.nii.gz", "--out", ws / "out.nii.gz", *FAST, "--method", "forward",
         "--reference", f"{ws / 'labels.nii.gz'}:{ws / 'labels.nii.gz'}", "--labels", "1"],
        capsys,
    )
    assert code == 0 and f"reference image {ws / 'labels.nii.gz'} holds only the values" in err and "IMAGE:LABELS" in err


def test_a_real_image_gets_no_label_map_warning(ws, fake_engine, capsys):
    code, _, err = run_cli(
        ["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz", "--out", ws / "out.nii.gz", *FAST],
        capsys,
    )
    assert code == 0 and "looks like a label map" not in err


def test_an_output_that_is_a_loop_of_links_is_refused_before_the_model(ws, fake_engine, capsys):
    """--out naming a loop of symbolic links passed the checks: the run went through the model and
    failed when moving the result into place ('[Errno 40] Too many levels of symbolic links')."""
    (ws / "a.nii.gz").symlink_to(ws / "b.nii.gz")
    (ws / "b.nii.gz").symlink_to(ws / "a.nii.gz")
    code, _, err = run_cli(
        ["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz", "--out", ws / "a.nii.gz", *FAST],
        capsys,
    )
    assert code == cli.EXIT_USER_ERROR and "Too many levels of symbolic links" in err and "remove the link" in err
    assert not fake_engine.built and "Errno" not in err


@pytest.mark.parametrize("axis", ["sagittal", "coronal"])
def test_an_axis_the_annotation_only_crosses_as_lines_is_refused(ws, fake_engine, capsys, axis):
    """--axis sagittal with slices annotated on axial planes took every sagittal plane crossing the
    strokes (97 of 128) as an annotated slice holding two lines, and ran 7 minutes to return them."""
    code, _, err = run_cli(["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz",
                            "--out", ws / "out.nii.gz", *FAST, "--axis", axis], capsys)
    assert code == cli.EXIT_USER_ERROR and f"crosses the {axis} slices only as lines" in err and "--axis axial" in err
    assert not fake_engine.built and not (ws / "out.nii.gz").exists()
    code, _, err = run_cli(["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz",
                            "--out", ws / "out.nii.gz", *FAST, "--axis", "axial"], capsys)
    assert code == 0, err


def test_a_negative_seed_is_refused_before_the_model(ws, fake_engine, capsys):
    """--seed -1 ran the model and ended in numpy's 'expected non-negative integer' traceback."""
    code, _, err = run_cli(["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz",
                            "--out", ws / "out.nii.gz", *FAST, "--seed", "-1"], capsys)
    assert code == cli.EXIT_USER_ERROR and "seed must be a whole number of at least 0" in err
    assert not fake_engine.built and not (ws / "out.nii.gz").exists()


# --- review and correct: --previous and --save-state ----------------------------------------------


class ReviewFakeEngine(FakeEngine):
    """:class:`FakeEngine` with what a run's state records (annotated slices, quality)."""

    def segment(self, image, supports, **run):
        result = super().segment(image, supports, **run)
        result.info.update(annotated=sorted({i for s in supports for i in s.slices}), quality={}, labels={})
        return result


@pytest.fixture
def reviewed(ws, fake_engine, monkeypatch, capsys):
    """A first run with --save-state ws/state: its output ws/v1.nii.gz and a copy with slice 3
    corrected, ws/v1_fixed.nii.gz."""
    monkeypatch.setattr(api, "Engine", ReviewFakeEngine)
    code, _, err = run_cli(["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz",
                            "--out", ws / "v1.nii.gz", "--save-state", ws / "state", *FAST], capsys)
    assert code == 0, err
    first = sitk.ReadImage(str(ws / "v1.nii.gz"))
    fixed = sitk.GetArrayFromImage(first)
    fixed[3, 60:80, 60:80] = 1
    corrected = sitk.GetImageFromArray(fixed)
    corrected.CopyInformation(first)
    sitk.WriteImage(corrected, str(ws / "v1_fixed.nii.gz"))
    FakeEngine.built = []
    return ws


def _update(ws, previous, capsys, state="state"):
    return run_cli(["segment", "--image", ws / "image.nii.gz", "--support", ws / "v1_fixed.nii.gz", "--previous", previous,
                    "--out", ws / "v2.nii.gz", "--save-state", ws / state, *FAST], capsys)


def test_a_previous_result_that_cannot_be_read_is_refused_clearly(reviewed, capsys):
    """An empty or damaged --previous ended in SimpleITK's RuntimeError traceback (exit 1); a
    folder was said not to exist; another spacing was reported as 'size (..) vs (..)', the same size."""
    ws = reviewed
    (ws / "empty.nii.gz").write_bytes(b"")
    (ws / "folder").mkdir()
    other = sitk.ReadImage(str(ws / "v1.nii.gz"))
    other.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(other, str(ws / "respaced.nii.gz"))
    before = digests(ws)
    for previous, fragment in (("empty.nii.gz", "previous result {} is an empty file"),
                               ("folder", "previous result {} is a folder"),
                               ("respaced.nii.gz", "spacing (2.0000, 2.0000, 2.0000)")):
        code, _, err = _update(ws, ws / previous, capsys)
        assert code == cli.EXIT_USER_ERROR and fragment.format(ws / previous) in err and "Traceback" not in err, err
    assert not FakeEngine.built and digests(ws) == before


def test_an_update_refuses_to_write_over_the_previous_result(reviewed, capsys):
    """--out equal to --previous replaced the untouched result of the first run: no output may be an input."""
    ws = reviewed
    before = digests(ws)
    code, _, err = run_cli(["segment", "--image", ws / "image.nii.gz", "--support", ws / "v1_fixed.nii.gz",
                            "--previous", ws / "v1.nii.gz", "--out", ws / "v1.nii.gz", "--save-state", ws / "state", *FAST],
                           capsys)
    assert code == cli.EXIT_USER_ERROR and "is one of the inputs" in err
    assert not FakeEngine.built and digests(ws) == before


def test_a_state_file_without_its_fields_is_refused_clearly(reviewed, capsys):
    """A truncated or hand-edited state.json ended in a KeyError traceback."""
    ws = reviewed
    state = json.loads((ws / "state" / "state.json").read_text())
    del state["axis_name"], state["grid"]
    (ws / "state" / "state.json").write_text(json.dumps(state))
    code, _, err = _update(ws, ws / "v1.nii.gz", capsys)
    assert code == cli.EXIT_USER_ERROR and "is not a run state this version reads" in err and "Traceback" not in err
    assert not FakeEngine.built and not (ws / "v2.nii.gz").exists()


def test_a_full_disk_for_the_state_says_the_outputs_were_written(ws, full_disk, fake_engine, monkeypatch, capsys):
    """The state could not be saved after the outputs were in place: the message was a bare
    'No space left on device.', as if nothing had been written."""
    monkeypatch.setattr(api, "Engine", ReviewFakeEngine)
    code, _, err = run_cli(["segment", "--image", ws / "image.nii.gz", "--support", ws / "support.nii.gz",
                            "--out", ws / "v1.nii.gz", "--save-state", full_disk / "state", *FAST], capsys)
    assert code == cli.EXIT_USER_ERROR and "Traceback" not in err
    assert f"{ws / 'v1.nii.gz'} was written, but the state in {full_disk / 'state'} could not be: No space left" in err
    assert (ws / "v1.nii.gz").is_file() and not (full_disk / "state" / "state.json").exists()
    assert not (full_disk / "state").exists()  # no temporary left, nor the empty folder (issue 24 §5)


# --- set-up -----------------------------------------------------------------------------------------


def test_setup_refuses_a_mistyped_option_before_installing_anything(tmp_path):
    """`scripts/setup.sh --tests` installed torch, sam2 and the rest before saying 'unknown option'."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    env = {**os.environ, "PYTHON": str(tmp_path / "no-python")}  # any install step would fail on it
    done = subprocess.run(["bash", tmp_path / "scripts" / "setup.sh", "--tests"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2 and "unknown option: --tests" in done.stderr, done.stderr
    assert not (tmp_path / ".venv").exists()


# --- Python API: wrong types are InputErrors before any model work ------------------------------


def _volume():
    image = np.random.default_rng(0).random((4, 64, 64)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[1, 20:30, 20:30] = True
    return image, LabelSupport(1, "liver", mask, [1])


def _segment(**changes):
    image, support = _volume()
    engine = Engine(ModelSettings(random_weights=True, image_size=256, device="cpu"))
    run = {"method": "sam2", **changes}
    try:
        engine.segment(image, [support], **run)
    finally:
        assert engine._model is None, "the model was built before the input was checked"


def _reference(image=None, labels=None):
    base, support = _volume()
    return Reference(base if image is None else image, support.mask.astype(np.int16) if labels is None else labels)


API_CASES = {
    # call -> fragment of the InputError; each raised a raw AttributeError/TypeError or ran silently
    "options as a dict": (lambda: _segment(options={"epochs": 1}), "MethodOptions"),
    "previous as a file name": (lambda: _segment(previous="previous.nii.gz"), "SegmentResult"),
    "events without methods": (lambda: _segment(events=object()), "progress, slice_done and is_cancelled"),
    "one Reference, not a list": (lambda: _segment(method="forward", references=_reference()), "list of Reference"),
    "reference image with NaN": (
        lambda: _segment(method="forward", references=[_reference(image=np.full((4, 64, 64), np.nan, np.float32))]),
        "NaN",
    ),
    "reference labels 0.5": (
        lambda: _segment(method="forward", references=[_reference(labels=_volume()[1].mask * 0.5)]), "whole numbers"
    ),
    "reference labels negative": (
        lambda: _segment(method="forward", references=[_reference(labels=-_volume()[1].mask.astype(np.int16))]),
        "whole numbers",
    ),
    "Engine given a dict": (lambda: Engine({"image_size": 256}), "ModelSettings"),
    "Engine given a model name": (lambda: Engine("sam2.1-tiny"), "ModelSettings"),
    "lr_milestones a number": (lambda: MethodOptions(lr_milestones=10), "lr_milestones"),
    # numpy's SeedSequence raised ValueError after the slices were encoded
    "negative seed": (lambda: MethodOptions(seed=-1), "seed must be a whole number of at least 0"),
    # the driver raised ValueError mid-propagation: SAM2's memory bank has 7 slots
    "num_maskmem beyond the model's": (lambda: MethodOptions(num_maskmem=8), "num_maskmem must be at most 7"),
}


def test_the_readme_review_call_works_after_a_plain_import():
    """The README's `oflsam2.review.suggest(result, n)` raised AttributeError after `import oflsam2`."""
    code = "import oflsam2; print(oflsam2.review.suggest.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "suggest", done.stderr


@pytest.mark.parametrize("case", list(API_CASES), ids=list(API_CASES))
def test_python_api_wrong_types_are_input_errors(case):
    call, fragment = API_CASES[case]
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        call()


# --- file modes -----------------------------------------------------------------------------------


def test_batch_records_and_report_pngs_follow_the_umask(tmp_path):
    """The batch's cases.csv / NAME_seg.run.json and the experiment's PNG figures were 0600
    (mkstemp's mode) whatever the umask; a replaced file keeps its own mode."""
    from PIL import Image

    from oflsam2.batch import _atomic_text
    from oflsam2.report import _save

    previous = os.umask(0o022)
    try:
        _atomic_text(tmp_path / "cases.csv", "case,status\n")
        _save(Image.new("RGB", (4, 4)), tmp_path / "figure.png")
        (tmp_path / "kept.json").write_text("{}")
        os.chmod(tmp_path / "kept.json", 0o640)
        _atomic_text(tmp_path / "kept.json", "{}\n")
    finally:
        os.umask(previous)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("cases.csv", "figure.png", "kept.json")}
    assert modes == {"cases.csv": 0o644, "figure.png": 0o644, "kept.json": 0o640}
