"""``oflsam2 batch`` in this process: real cropped CHAOS volumes, a random-weight SAM2.1-tiny at
256 px and an adapter trained in the test. Named outputs, the cases table, one model load,
resume by recorded settings, and bad input that fails only its own case."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from cohort_data import CASES, read_array, read_table

from oflsam2 import batch, cli, executors, pipeline
from oflsam2.api import Engine, MethodOptions
from oflsam2.cli import batch as batch_command

COMMON = ["--model", "sam2.1-tiny", "--random-weights", "--image-size", "256", "--device", "cpu", "--deterministic"]


def adapter_args(cohort) -> list[str]:
    return ["--method", "ofl", "--adapter", str(cohort.adapter), "--labels", "1", *COMMON]


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def local_run(cohort, tmp_path_factory):
    """The cohort segmented with the adapter by ``oflsam2 batch --json --seg-nrrd`` (stderr not a TTY)."""
    out = tmp_path_factory.mktemp("batch") / "out"
    loads = executors.MODEL_LOADS
    code, stdout, stderr = run_cli(["batch", str(cohort.images), "--out", str(out), "--seg-nrrd", "--json", *adapter_args(cohort)])
    return {"out": out, "code": code, "stdout": stdout, "stderr": stderr, "loads": executors.MODEL_LOADS - loads}


def test_batch_writes_named_outputs_and_the_cases_table(local_run, cohort):
    out = local_run["out"]
    assert local_run["code"] == 0, local_run["stderr"]
    names = [f"image_{n}" for n in CASES]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cases.csv", *(f"{n}{suffix}" for n in names for suffix in ("_seg.nii.gz", "_seg.seg.nrrd", "_seg.nii.gz.run.json"))]
    )
    table = read_table(out / "cases.csv")
    assert list(table) == names
    for name in names:
        row = table[name]
        assert (row["status"], row["slices"], row["attempts"], row["error"]) == ("done", "8", "1", "")
        assert float(row["seconds"]) > 0
        image = sitk.ReadImage(str(cohort.images / f"{name}.nii.gz"))
        result = sitk.ReadImage(str(out / f"{name}_seg.nii.gz"))
        assert result.GetSize() == image.GetSize() and result.GetOrigin() == image.GetOrigin()
        assert set(np.unique(sitk.GetArrayFromImage(result))) <= {0, 1}
        assert np.array_equal(read_array(out / f"{name}_seg.seg.nrrd"), sitk.GetArrayFromImage(result))
        engine = json.loads((out / f"{name}_seg.nii.gz.run.json").read_text())["summary"]["engine"]
        assert engine["ofl_preset"] == "paper" and engine["options"]["max_fit_slices"] is None  # the record says how
    summary = json.loads(local_run["stdout"])
    assert summary["failed"] == 0 and [r["case"] for r in summary["cases"]] == names
    # One model for the whole batch; no progress bar under --json (and stderr is not a TTY).
    assert local_run["loads"] == 1
    assert "cases:" not in local_run["stderr"] and "encoding" not in local_run["stderr"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_overall_bar(local_run, cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(local_run["out"], out)  # every case is done: the bar runs through the skips
    terminal = Terminal()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(terminal):
        assert cli.main(["batch", str(cohort.images), "--out", str(out), "--seg-nrrd", *adapter_args(cohort)]) == 0
    assert "cases: 100%" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_a_batch_case_equals_the_same_segment_run(local_run, cohort, tiny_model, tmp_path):
    single = tmp_path / "single.nii.gz"
    pipeline.segment_files(
        cohort.images / "image_2.nii.gz", None, single, labels=[1], method="ofl", settings=cohort.settings,
        options=MethodOptions(adapter=str(cohort.adapter)), engine=Engine(cohort.settings, model=tiny_model),
    )
    assert np.array_equal(read_array(single), read_array(local_run["out"] / "image_2_seg.nii.gz"))


def test_resume_skips_cases_done_with_the_same_settings(local_run, cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(local_run["out"], out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*_seg.*")}
    (out / "image_2_seg.seg.nrrd").unlink()  # an output lost: that case runs again
    record = json.loads((out / "image_3_seg.nii.gz.run.json").read_text())
    record["status"] = "writing"  # a batch killed while writing case 3
    (out / "image_3_seg.nii.gz.run.json").write_text(json.dumps(record))
    code, _, _ = run_cli(["batch", str(cohort.images), "--out", str(out), "--seg-nrrd", *adapter_args(cohort)])
    assert code == 0
    table = read_table(out / "cases.csv")
    assert [table[f"image_{n}"]["status"] for n in CASES] == ["skipped", "done", "done"]
    assert table["image_1"]["slices"] == "8"
    assert (out / "image_1_seg.nii.gz").stat().st_mtime_ns == stamps["image_1_seg.nii.gz"]
    assert (out / "image_2_seg.seg.nrrd").is_file()
    for n in CASES:
        assert np.array_equal(read_array(out / f"image_{n}_seg.nii.gz"), read_array(local_run["out"] / f"image_{n}_seg.nii.gz"))
    assert not list(out.glob(".*"))  # no temporary file left behind
    # Changed settings (here the confidence gate) make every case due again.
    cases = batch.collect_cases(cohort.images, out, seg_nrrd=True)
    job = batch.BatchJob("ofl", cohort.settings, MethodOptions(adapter=str(cohort.adapter)), labels=[1])
    assert {batch.plan_case(job, c)[0] for c in cases} == {"skip"}
    job.options.gamma = 0.5
    assert {batch.plan_case(job, c)[0] for c in cases} == {"run"}


def test_support_dir_cases_that_fail_do_not_stop_the_others(cohort, tmp_path):
    images, supports, out = tmp_path / "images", tmp_path / "supports", tmp_path / "out"
    shutil.copytree(cohort.images, images)
    shutil.copytree(cohort.supports, supports)
    (images / "broken.nii.gz").write_bytes(b"not a volume at all")
    shutil.copy(supports / "image_1.nii.gz", supports / "broken.nii.gz")
    moved = sitk.ReadImage(str(supports / "image_3.nii.gz"))
    moved.SetOrigin(tuple(o + 900.0 for o in moved.GetOrigin()))  # another grid, far from the image
    sitk.WriteImage(moved, str(supports / "image_3.nii.gz"))
    code, stdout, _ = run_cli(["batch", str(images), "--out", str(out), "--support-dir", str(supports), "--method", "sam2", *COMMON])
    assert code == batch_command.EXIT_SOME_FAILED
    table = read_table(out / "cases.csv")
    assert [table[c]["status"] for c in ("broken", "image_1", "image_2", "image_3")] == ["failed", "done", "done", "failed"]
    assert "broken.nii.gz" in table["broken"]["error"]
    assert "image_3" in table["image_3"]["error"] and "grid" in table["image_3"]["error"].lower()
    assert "failed image_3" in stdout and "2 case(s) done" in stdout
    # The failed cases leave nothing behind; the annotated slices reach the done cases' outputs.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cases.csv", "image_1_seg.nii.gz", "image_1_seg.nii.gz.run.json", "image_2_seg.nii.gz", "image_2_seg.nii.gz.run.json"]
    )
    support = read_array(cohort.supports / "image_1.nii.gz")
    assert np.array_equal(read_array(out / "image_1_seg.nii.gz")[1], support[1])


def test_a_file_the_batch_did_not_write_is_never_replaced(cohort, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "image_1_seg.nii.gz").write_bytes(b"the user's own file")
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image,out\n{cohort.images / 'image_1.nii.gz'},\n{cohort.images / 'image_2.nii.gz'},two.nii.gz\n")
    code, _, _ = run_cli(["batch", str(manifest), "--out", str(out), *adapter_args(cohort)])
    assert code == batch_command.EXIT_SOME_FAILED
    table = read_table(out / "cases.csv")
    assert table["image_1"]["status"] == "failed" and "not written by oflsam2 batch" in table["image_1"]["error"]
    assert (out / "image_1_seg.nii.gz").read_bytes() == b"the user's own file"
    assert table["image_2"]["status"] == "done" and (out / "two.nii.gz").is_file() and (out / "two.nii.gz.run.json").is_file()


def test_a_dicom_series_folder_is_one_case(shared_data, tmp_path):
    """The folder holds the CT series and a DICOM-SEG beside it; its support is NAME.nrrd."""
    source = shared_data / "dcmqi_ct3slice"
    images, supports, out = tmp_path / "images", tmp_path / "supports", tmp_path / "out"
    (images / "ct").mkdir(parents=True)
    supports.mkdir()
    for name in ("ct-3slice_01.dcm", "ct-3slice_02.dcm", "ct-3slice_03.dcm", "liver.dcm"):
        shutil.copy(source / name, images / "ct" / name)
    liver = sitk.ReadImage(str(source / "liver_seg.nrrd"))
    annotated = sitk.GetArrayFromImage(liver)
    annotated[1:] = 0  # plane 0 annotated; planes 1 and 2 are propagated
    support = sitk.GetImageFromArray(annotated)
    support.CopyInformation(liver)
    sitk.WriteImage(support, str(supports / "ct.nrrd"))
    code, _, _ = run_cli(
        ["batch", str(images), "--out", str(out), "--support-dir", str(supports), "--method", "sam2", "--axis", "axial", *COMMON]
    )
    assert code == 0
    assert read_table(out / "cases.csv")["ct"]["status"] == "done"
    result = sitk.ReadImage(str(out / "ct_seg.nii.gz"))
    assert result.GetSize() == (512, 512, 3)
    assert np.array_equal(sitk.GetArrayFromImage(result)[0], annotated[0])


@pytest.mark.parametrize(
    "setup, extra, complaint",
    [
        ("empty", [], "holds no volume"),
        ("out-file", [], "is a file"),
        ("other-model", ["--image-size", "512"], "image_size 256"),
        ("missing-ray", ["--executor", "ray"], "pip install"),
        ("workers-local", ["--workers", "2"], "--executor ray only"),
    ],
)
def test_bad_batch_input_exits_2_before_any_case(cohort, tmp_path, monkeypatch, setup, extra, complaint):
    source, out = cohort.images, tmp_path / "out"
    if setup == "empty":
        source = tmp_path / "empty"
        source.mkdir()
    if setup == "out-file":
        out.write_bytes(b"keep me")
    if setup == "missing-ray":
        monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, stderr = run_cli(["batch", str(source), "--out", str(out), *adapter_args(cohort), *extra])
    assert code == cli.EXIT_USER_ERROR
    assert complaint in stderr
    if setup == "out-file":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists() or not any(out.glob("*_seg*"))


def test_the_local_executor_never_imports_ray():
    script = (
        "import sys\n"
        "from oflsam2 import cli, batch, executors, experiment\n"
        "from oflsam2.api import ModelSettings\n"
        "executors.make_executor('local', ModelSettings(random_weights=True, device='cpu', image_size=256), max_cached_volumes=1)\n"
        "cli.build_parser()\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
