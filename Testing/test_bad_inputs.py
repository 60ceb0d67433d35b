"""Hostile-but-realistic input, driven as a table: each row is a command line, the exit status
and message it must give, and the promise that nothing the user has is touched.

Every command runs in-process through ``oflsam2.cli.main`` on small crops of real volumes (CHAOS
T2 MRI, TotalSegmentator CT) written into ``tmp_path``. SAM2 is replaced by ``FakeEngine``, a
deterministic stand-in with the Engine's ``segment`` signature: what is checked here is what
happens around the model (reading, validation, composition, writing), and a refused run must
never even build the engine. Signals use subprocesses; a full disk and a read-only folder use
small tmpfs mounts (root only, skipped otherwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from oflsam2 import api, cli
from oflsam2.api import SegmentResult
from oflsam2.errors import Cancelled, InputError

RealEngine = api.Engine  # the autouse fixture replaces it with FakeEngine

REPO = Path(__file__).resolve().parents[1]
CROP = slice(4, 16)  # 12 axial slices of CHAOS case 2 (original 4..15)
ANNOTATED = (4, 10)  # cropped indices of the annotated slices (original 8 and 14)


# ---------------------------------------------------------------------------------------------
# A stand-in engine


class FakeEngine:
    """The Engine's ``segment`` with deterministic masks: label ``v`` covers a box shifted by
    ``v`` on every slice, so later labels overlap earlier ones and every annotated slice is
    covered by a prediction (which the pipeline must not let through there)."""

    built: list = []
    error: BaseException | None = None

    def __init__(self, settings, *args, **kwargs):
        FakeEngine.built.append(settings)

    def segment(self, image, supports, *, method, axis, preset, options, references, events, **rest):
        image = api.validate_run(image, supports, method=method, axis=axis, preset=preset, options=options,
                                 references=references)
        if FakeEngine.error is not None:
            raise FakeEngine.error
        masks = {}
        for support in supports:
            mask = np.zeros(image.shape, bool)
            view = np.moveaxis(mask, axis, 0)
            h, w = view.shape[1:]
            shift = 4 * support.label
            view[:, h // 4 + shift : 3 * h // 4, w // 4 + shift : 3 * w // 4] = True
            masks[support.label] = mask
        return SegmentResult(masks, axis, method, {"engine": "fake"})


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "Engine", FakeEngine)
    monkeypatch.setenv("OFLSAM2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OFLSAM2_CHECKPOINT", raising=False)
    FakeEngine.built, FakeEngine.error = [], None
    yield FakeEngine


# ---------------------------------------------------------------------------------------------
# Files


def write(array, path, like: sitk.Image | None = None, **geometry) -> Path:
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    for key, value in geometry.items():
        getattr(image, f"Set{key}")(value)
    sitk.WriteImage(image, str(path))
    return Path(path)


def crop(image: sitk.Image, z: slice) -> sitk.Image:
    return image[:, :, z.start : z.stop]


@pytest.fixture(scope="module")
def source(shared_data, tmp_path_factory) -> Path:
    """Small real inputs, written once; each test works on its own copy."""
    folder = tmp_path_factory.mktemp("bad_inputs_source")
    chaos = shared_data / "chaos_t2_fewshot"
    image = sitk.Cast(crop(sitk.ReadImage(str(chaos / "image_2.nii.gz")), CROP), sitk.sitkFloat32)
    labels = crop(sitk.ReadImage(str(chaos / "label_2.nii.gz")), CROP)
    dense = np.rint(sitk.GetArrayFromImage(labels)).astype(np.uint8)
    support = np.zeros_like(dense)
    for z in ANNOTATED:
        support[z] = dense[z]
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    write(support, folder / "support.nii.gz", image)
    write(dense, folder / "labels.nii.gz", image)
    write(dense, folder / "out.nii.gz", image)  # an earlier result the user keeps
    reference = sitk.Cast(crop(sitk.ReadImage(str(chaos / "image_3.nii.gz")), slice(6, 18)), sitk.sitkFloat32)
    sitk.WriteImage(reference, str(folder / "ref_image.nii.gz"))
    ref_labels = np.rint(sitk.GetArrayFromImage(crop(sitk.ReadImage(str(chaos / "label_3.nii.gz")), slice(6, 18))))
    write(ref_labels.astype(np.uint8), folder / "ref_labels.nii.gz", reference)
    ct = sitk.ReadImage(str(shared_data / "totalsegmentator_ct_mr" / "example_ct.nii.gz"))
    sitk.WriteImage(crop(ct, slice(50, 60)), str(folder / "ct.nii.gz"))
    return folder


@dataclass
class Workspace:
    root: Path

    def __getitem__(self, name: str) -> str:
        return str(self.root / name)

    def path(self, name: str) -> Path:
        return self.root / name

    def array(self, name: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(self[name]))

    def image(self) -> sitk.Image:
        return sitk.ReadImage(self["image.nii.gz"])

    def snapshot(self) -> dict[str, str]:
        """SHA256 of every file (and mode), by relative path: what 'untouched' is checked against."""
        found = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[str(path.relative_to(self.root))] = f"{digest} {stat.S_IMODE(path.stat().st_mode):o}"
            elif path.is_dir():
                found[str(path.relative_to(self.root)) + "/"] = "dir"
        return found


@pytest.fixture
def ws(source, tmp_path) -> Workspace:
    root = tmp_path / "work"
    shutil.copytree(source, root)
    return Workspace(root)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- builders of odd files (setup column of the table) ----------------------------------------


def empty_file(ws):
    ws.path("bad.nii.gz").write_bytes(b"")


def text_file(ws):
    ws.path("bad.nii.gz").write_text("patient notes, not an image\n")


def image_2d(ws):
    write(np.zeros((64, 64), np.float32), ws.path("bad.nii.gz"))


def image_4d(ws):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 12, 64, 64), np.float32), isVector=False), ws["bad.nii.gz"])


def image_rgb(ws):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 64, 64, 3), np.uint8), isVector=True), ws["bad.nii.gz"])


def misaligned_support(ws):
    support = sitk.ReadImage(ws["support.nii.gz"])
    angle = np.deg2rad(20)
    support.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    sitk.WriteImage(support, ws["bad.nii.gz"])


def truncated(name):
    def make(ws):
        data = ws.path(name).read_bytes()
        ws.path("bad.nii.gz").write_bytes(data[: len(data) * 2 // 3])

    return make


def corrupt(name):
    def make(ws):
        data = bytearray(ws.path(name).read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(64)  # a damaged block: the gzip CRC no longer matches
        ws.path("bad.nii.gz").write_bytes(bytes(data))

    return make


def nan_image(ws):
    array = ws.array("image.nii.gz")
    array[3, 100:110, 100:110] = np.nan
    array[5, 0, 0] = np.inf
    write(array, ws.path("bad.nii.gz"), ws.image())


def nan_support(ws):
    array = ws.array("support.nii.gz").astype(np.float32)
    array[ANNOTATED[0], 0, 0] = np.nan
    write(array, ws.path("bad.nii.gz"), ws.image())


def integer_intensity_image(ws):
    """The MR image stored as int16, as scanners write it: many distinct whole numbers."""
    write(np.rint(ws.array("image.nii.gz")).astype(np.int16), ws.path("bad.nii.gz"), ws.image())


def adapter_json(ws, label=1, **fields):
    from oflsam2.ofl.adapter import KIND

    folder = ws.path("adapter")
    folder.mkdir(exist_ok=True)
    record = {"kind": KIND, "label": label, "label_name": f"label_{label}", "model": "sam2.1-tiny",
              "image_size": 1024, "axis": 0, "preset": "mr", **fields}
    (folder / f"label_{label}.json").write_text(json.dumps(record))


def two_label_adapter(ws):
    adapter_json(ws, 1)
    adapter_json(ws, 3)


def reference_without_label_4(ws):
    labels = ws.array("ref_labels.nii.gz")
    write(np.where(labels == 4, 0, labels), ws.path("ref_without_4.nii.gz"), sitk.ReadImage(ws["ref_labels.nii.gz"]))


def a_file(ws):
    ws.path("notes.txt").write_text("not a folder")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(tempfile.gettempdir()) / "oflsam2_pickle_ran_code"


def evil_checkpoint(ws):
    MARKER.unlink(missing_ok=True)
    with open(ws.path("evil.pt"), "wb") as stream:
        pickle.dump({"model": _Evil()}, stream)


def experiment_file(ws):
    """A small valid experiment over copies of the crop (cases 1 and 2)."""
    import yaml

    for case in (1, 2):
        shutil.copy(ws["image.nii.gz"], ws.path(f"img_{case}.nii.gz"))
        shutil.copy(ws["labels.nii.gz"], ws.path(f"lab_{case}.nii.gz"))
    config = {
        "name": "small", "data_root": ".", "labels": {1: "liver"}, "axis": 0, "preset": "mr",
        "cases": {"ids": [1, 2], "image": "img_{id}.nii.gz", "label": "lab_{id}.nii.gz"},
        "support": {"mode": "slices", "volumes": [1], "slices_per_label": 1, "groups": 1, "seed": 0},
        "queries": [2], "methods": [{"method": "forward"}], "model": {"model": "sam2.1-tiny", "image_size": 256},
    }
    ws.path("exp.yaml").write_text(yaml.safe_dump(config))


def eval_folders(ws):
    for name in ("pred", "ref"):
        ws.path(name).mkdir()
        shutil.copy(ws["labels.nii.gz"], ws.path(name) / "case2.nii.gz")


# ---------------------------------------------------------------------------------------------
# The table


SEGMENT = ["segment", "--image", "{image.nii.gz}", "--support", "{support.nii.gz}", "--out", "{out.nii.gz}",
           "--method", "ofl", "--random-weights"]


def segment(**replace):
    """SEGMENT with some options replaced (``image="{bad.nii.gz}"``) or added (``extra=[...]``)."""
    argv = list(SEGMENT)
    for key, value in replace.items():
        if key == "extra":
            continue
        flag = "--" + key.replace("_", "-")
        if value is None:
            index = argv.index(flag)
            del argv[index : index + 2]
        else:
            argv[argv.index(flag) + 1] = value
    return argv + list(replace.get("extra", []))


@dataclass
class Case:
    id: str
    item: str  # the point (12.N), or "held" for behaviour that was already right
    argv: list
    code: int
    message: str  # regex searched in stdout + stderr
    setup: object = None
    changed: tuple = ()  # files allowed (and expected) to change; every other one is untouched
    short: bool = False  # the message must stay short (a few lines)


CASES = [
    # --- already right: keep it so
    Case("missing-image", "held", segment(image="{nope.nii.gz}"), 2, r"image .*nope.nii.gz does not exist"),
    Case("empty-file", "held", segment(image="{bad.nii.gz}"), 2, r"The image .*bad.nii.gz is an empty file \(0 bytes\)", empty_file),
    Case("text-file", "held", segment(image="{bad.nii.gz}"), 2, r"Cannot read the image", text_file),
    Case("2d-image", "held", segment(image="{bad.nii.gz}"), 2, r"is a 2-D image", image_2d),
    Case("4d-image", "held", segment(image="{bad.nii.gz}"), 2, r"is 4-D", image_4d),
    Case("rgb-image", "held", segment(image="{bad.nii.gz}"), 2, r"3 values per voxel", image_rgb),
    Case("misaligned-support", "held", segment(support="{bad.nii.gz}"), 2, r"not on this image's grid.*rotated",
         misaligned_support),
    Case("slice-out-of-range", "held", segment(extra=["--support-slices", "4,40"]), 2,
         r"Slice\(s\) 40 lie outside the volume: it has slices 0\.\.11"),
    Case("malformed-range", "held", segment(extra=["--support-slices", "3-a"]), 2, r"Cannot read '3-a'"),
    Case("backwards-range", "held", segment(extra=["--support-slices", "9-3"]), 2, r"runs backwards"),
    Case("out-is-support", "held", segment(out="{support.nii.gz}"), 2, r"is one of the inputs"),
    Case("seg-nrrd-is-out", "held", segment(extra=["--seg-nrrd", "{out.nii.gz}"]), 2, r"must end with one of .seg.nrrd"),
    # torch's own text went on to suggest loading it with weights_only=False
    Case("malicious-pickle", "held", ["checkpoints", "verify", "{evil.pt}"], 2,
         r"not a readable PyTorch checkpoint: it is not a plain file of weights(?!.*weights_only)", evil_checkpoint),
    # --- 2: support from other volumes alone
    Case("reference-only-revsam2", "2",
         ["segment", "--image", "{image.nii.gz}", "--out", "{out.nii.gz}", "--method", "revsam2", "--top-k", "3",
          "--reference", "{ref_image.nii.gz}:{ref_labels.nii.gz}", "--labels", "1", "--random-weights"],
         0, r"wrote .*out.nii.gz", changed=("out.nii.gz",)),
    Case("reference-only-sam2", "2",
         ["segment", "--image", "{image.nii.gz}", "--out", "{out.nii.gz}", "--method", "sam2",
          "--reference", "{ref_image.nii.gz}:{ref_labels.nii.gz}", "--labels", "1", "--random-weights"],
         2, r"needs a prompt in the volume itself"),
    # --- 3: an adapter knows its labels
    Case("adapter-without-labels", "3", segment(support=None, extra=["--adapter", "{adapter}"]), 0,
         r"label 1 .*\n.*label 3 ", two_label_adapter, changed=("out.nii.gz",)),
    # --- 6: no output may be an input
    Case("eval-out-is-ref", "6", ["eval", "--pred", "{support.nii.gz}", "--ref", "{labels.nii.gz}", "--out",
                                  "{labels.nii.gz}"], 2, r"would overwrite the input"),
    Case("eval-out-in-ref-folder", "6", ["eval", "--pred", "{pred}", "--ref", "{ref}", "--out", "{ref/case2.nii.gz}"],
         2, r"would overwrite the input", eval_folders),
    Case("train-out-is-image", "6", ["train", "--image", "{image.nii.gz}", "--support", "{support.nii.gz}", "--out",
                                     "{image.nii.gz}", "--random-weights"], 2, r"is a file; give a folder"),
    Case("experiment-out-is-a-case", "6", ["experiment", "{exp.yaml}", "--out", "{img_2.nii.gz}", "--random-weights"],
         2, r"--out .*img_2.nii.gz is a file", experiment_file),
    Case("experiment-out-is-the-config", "6", ["experiment", "{exp.yaml}", "--out", "{exp.yaml}", "--random-weights"],
         2, r"--out .*exp.yaml is a file", experiment_file),
    # --- 7: train --out that cannot be a folder
    Case("train-out-under-a-file", "7", ["train", "--image", "{image.nii.gz}", "--support", "{support.nii.gz}",
                                         "--out", "{notes.txt/adapter}", "--random-weights"],
         2, r"cannot be created: .*notes.txt is a file", a_file),
    # --- 9: truncated or corrupt gzip NIfTI
    Case("truncated-image", "9", segment(image="{bad.nii.gz}"), 2, r"image .*bad.nii.gz is truncated or corrupt",
         truncated("image.nii.gz")),
    Case("truncated-support", "9", segment(support="{bad.nii.gz}"), 2, r"label map .*bad.nii.gz is truncated",
         truncated("support.nii.gz")),
    Case("corrupt-image", "9", segment(image="{bad.nii.gz}"), 2, r"bad.nii.gz is truncated or corrupt",
         corrupt("image.nii.gz")),
    # --- 10: NaN / Inf stored in NIfTI
    Case("nan-image", "10", segment(image="{bad.nii.gz}"), 2, r"has 101 NaN or infinite voxels", nan_image),
    Case("nan-support", "10", segment(support="{bad.nii.gz}"), 2, r"NaN or infinite", nan_support),
    # --- 11: huge ranges: clipped before expanding, short messages
    Case("huge-range", "11", segment(extra=["--support-slices", "0-999999999999"]), 2,
         r"Slice\(s\) 12-999999999999 lie outside the volume", short=True),
    Case("long-range", "11", segment(extra=["--support-slices", "0-5000"]), 2,
         r"Slice\(s\) 12-5000 lie outside", short=True),
    Case("many-empty-slices", "11", segment(extra=["--support-slices", "0-11"]), 2,
         r"Slice\(s\) 0-3, 5-9, 11 hold no annotation .*annotated: 4, 10", short=True),
    # --- 12: image size bounds
    Case("image-size-0", "12", segment(extra=["--image-size", "0"]), 2, r"multiple of 32 from 256 to 2048"),
    Case("image-size-huge", "12", segment(extra=["--image-size", "100000"]), 2, r"multiple of 32 from 256 to 2048"),
    Case("image-size-odd", "12", segment(extra=["--image-size", "300"]), 2, r"multiple of 32 from 256 to 2048"),
    # --- 13: adapter and --save-adapter problems before any heavy work
    Case("adapter-wrong-axis", "13", segment(support=None, extra=["--adapter", "{adapter}", "--axis", "coronal"]), 2,
         r"does not fit this run: axis is 0 in the adapter but 1 now", adapter_json),
    Case("adapter-other-model", "13",
         segment(support=None, extra=["--adapter", "{adapter}", "--model", "sam2.1-small"]), 2,
         r"model is 'sam2.1-tiny' in the adapter but 'sam2.1-small' now", adapter_json),
    Case("adapter-lacks-label", "13", segment(support=None, extra=["--adapter", "{adapter}", "--labels", "2"]), 2,
         r"has no adapter for label 2", adapter_json),
    Case("save-adapter-is-a-file", "13", segment(extra=["--save-adapter", "{notes.txt}"]), 2,
         r"--save-adapter .*notes.txt is a file", a_file),
    Case("save-adapter-under-a-file", "13", segment(extra=["--save-adapter", "{notes.txt/adapter}"]), 2,
         r"cannot be created: .*notes.txt is a file", a_file),
    # --- 15: options a method cannot use, references without the label
    Case("save-adapter-with-revsam2", "15", segment(method="revsam2", extra=["--save-adapter", "{new_adapter}"]), 2,
         r"--save-adapter is for OFL-SAM2 adapters; method 'revsam2' cannot use one"),
    Case("reference-lacks-label", "15",
         segment(extra=["--reference", "{ref_image.nii.gz}:{ref_without_4.nii.gz}", "--labels", "4"]), 0,
         r"warning: Reference\(s\) ref_image.nii.gz hold no voxel of label 4", reference_without_label_4,
         changed=("out.nii.gz",)),
    Case("no-support-has-label", "15",
         ["segment", "--image", "{image.nii.gz}", "--out", "{out.nii.gz}", "--method", "revsam2", "--reference",
          "{ref_image.nii.gz}:{ref_labels.nii.gz}", "--labels", "9", "--random-weights"], 2,
         r"Label 9 occurs in no support"),
    # --- 16: eval refuses an image given as a prediction
    Case("eval-intensity-prediction", "16", ["eval", "--pred", "{bad.nii.gz}", "--ref", "{labels.nii.gz}"], 2,
         r"looks like an intensity image", integer_intensity_image),
    # --- 17: messages that say what is wrong
    Case("adapter-json-file", "17", segment(support=None, extra=["--adapter", "{adapter/label_1.json}"]), 2,
         r"--adapter wants the adapter folder .*not a file in it", adapter_json),
    Case("eval-missing-pred", "17", ["eval", "--pred", "{nope.nii.gz}", "--ref", "{labels.nii.gz}"], 2,
         r"--pred .*nope.nii.gz does not exist"),
    # the example was a window's: percentile:-100,300
    Case("percentile-backwards", "17", segment(extra=["--preset", "percentile:99,1"]), 2,
         r"the lower first, e.g. percentile:0.5,99.5\."),
]


def fill(argv, ws: Workspace) -> list[str]:
    return [re.sub(r"\{([^}]+)\}", lambda m: ws[m.group(1)], str(a)) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.item}:{c.id}" for c in CASES])
def test_bad_input_table(case: Case, ws, capsys):
    if case.setup is not None:
        case.setup(ws)
    before = ws.snapshot()
    code, out, err = run_cli(fill(case.argv, ws), capsys)
    text = out + err
    assert code == case.code, text
    assert re.search(case.message, text), text
    assert "Traceback" not in text
    after = ws.snapshot()
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed == set(case.changed), f"changed: {changed}"
    if case.code != 0:
        assert FakeEngine.built == [], "a refused run must not build the engine"
    if case.short:
        (message,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(message) < 200, message
    if case.id == "malicious-pickle":
        assert not MARKER.exists(), "the checkpoint's pickled code ran"


# ---------------------------------------------------------------------------------------------
# Cases that need more than a command line


def test_multi_label_annotated_slices_come_out_as_drawn(ws, capsys):
    """12.1: on slice 4 label 4 (spleen) is absent; its prediction must not write there."""
    support = ws.array("support.nii.gz")
    assert not (support[ANNOTATED[0]] == 4).any() and (support == 4).any()
    code, out, err = run_cli(fill(SEGMENT, ws), capsys)
    assert code == 0, err
    result = ws.array("out.nii.gz")
    for z in ANNOTATED:
        np.testing.assert_array_equal(result[z], support[z])
    assert (result == 4).sum() > 0  # the fake prediction did land elsewhere


def test_reference_only_runs_hand_references_and_no_in_volume_support(ws, capsys, monkeypatch):
    """12.2: the README's cross-volume example reaches the engine with references and empty supports."""
    seen = {}
    original = FakeEngine.segment

    def spy(self, image, supports, **kwargs):
        seen.update(supports=supports, references=kwargs["references"])
        return original(self, image, supports, **kwargs)

    monkeypatch.setattr(FakeEngine, "segment", spy)
    argv = ["segment", "--image", "{image.nii.gz}", "--out", "{out.nii.gz}", "--method", "forward",
            "--reference", "{ref_image.nii.gz}:{ref_labels.nii.gz}", "--labels", "1,2", "--random-weights"]
    code, _, err = run_cli(fill(argv, ws), capsys)
    assert code == 0, err
    assert [s.slices for s in seen["supports"]] == [[], []]
    (reference,) = seen["references"]
    assert reference.name == "ref_image.nii.gz" and set(np.unique(reference.labels)) >= {0, 1, 2}


def mount_tmpfs(folder: Path, options: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    mount_tmpfs(folder, options)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("name", ["result.nii.gz", "result.nii", "result.nrrd"])
def test_disk_full_keeps_the_old_output_and_says_so(ws, capsys, tmp_path, name):
    """12.4: the writer cannot finish; the file it leaves is checked, nothing is replaced."""
    with tmpfs(tmp_path / "small", "size=64k") as disk:
        old = disk / name
        old.write_bytes(b"an earlier result")
        # Fill the disk so only a little room is left for the new file.
        filler = disk / "filler"
        handle = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(handle, bytes(4096))
        os.close(handle)
        os.truncate(filler, max(filler.stat().st_size - 2 * 1024, 0))
        code, out, err = run_cli(fill(segment(out=str(old)), ws), capsys)
        assert code == 2, out + err
        assert "Could not write" in err and "Traceback" not in err
        assert old.read_bytes() == b"an earlier result"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", name]  # no temporary left


def test_out_and_seg_nrrd_are_written_together(ws, capsys, monkeypatch):
    """12.5: interrupted while writing the second file, the first is not replaced either."""
    from oflsam2 import outputs

    real_write = outputs.sitk.WriteImage

    def interrupted_on_seg_nrrd(image, path, *args):
        if ".seg.nrrd" in str(path):
            raise KeyboardInterrupt
        return real_write(image, path, *args)

    ws.path("out.seg.nrrd").write_bytes(b"an earlier segmentation")
    before = ws.snapshot()
    monkeypatch.setattr(outputs.sitk, "WriteImage", interrupted_on_seg_nrrd)
    code, _, err = run_cli(fill(segment(extra=["--seg-nrrd", "{out.seg.nrrd}"]), ws), capsys)
    assert code == 130 and "no output was written" in err
    assert ws.snapshot() == before


def test_failed_train_leaves_no_adapter_folder(ws, capsys):
    """12.7: the folder train created is removed when the run fails."""
    FakeEngine.error = Cancelled()
    argv = ["train", "--image", "{image.nii.gz}", "--support", "{support.nii.gz}", "--out", "{adapters/liver}",
            "--random-weights", "--epochs", "1"]
    code, _, err = run_cli(fill(argv, ws), capsys)
    assert code == 130, err
    assert not ws.path("adapters").exists()


def test_train_into_a_read_only_place_is_refused_before_work(ws, capsys, tmp_path):
    """12.7 / 12.13: a read-only file system (refused even for root) gives a message, not a traceback."""
    with tmpfs(tmp_path / "readonly", "ro,size=64k") as place:
        argv = ["train", "--image", "{image.nii.gz}", "--support", "{support.nii.gz}", "--out",
                str(place / "adapter"), "--random-weights"]
        code, _, err = run_cli(fill(argv, ws), capsys)
        assert code == 2 and "not writable" in err and "Traceback" not in err, err
        assert FakeEngine.built == []


def test_outputs_keep_the_replaced_files_mode_or_follow_the_umask(ws, capsys):
    """12.8: mkstemp's 0600 must not leak into the user's files."""
    os.chmod(ws["out.nii.gz"], 0o644)
    previous = os.umask(0o027)
    try:
        code, _, err = run_cli(fill(segment(extra=["--seg-nrrd", "{new.seg.nrrd}"]), ws), capsys)
        assert code == 0, err
        eval_code, _, err = run_cli(fill(["eval", "--pred", "{out.nii.gz}", "--ref", "{labels.nii.gz}", "--out",
                                          "{scores.csv}"], ws), capsys)
        assert eval_code == 0, err
    finally:
        os.umask(previous)
    assert stat.S_IMODE(ws.path("out.nii.gz").stat().st_mode) == 0o644
    for new in ("new.seg.nrrd", "scores.csv", "scores_summary.csv"):
        assert stat.S_IMODE(ws.path(new).stat().st_mode) == 0o640, new


def test_adapter_trained_on_mr_warns_on_ct(ws, capsys):
    """12.14: an adapter records the intensities it was trained on; another kind of volume is
    segmented (with the adapter's own preset) but the user is warned."""
    adapter_json(ws, 1, intensity={"modality": "mr", "low": 0.0, "high": 900.0})
    argv = ["segment", "--image", "{ct.nii.gz}", "--out", "{ct_out.nii.gz}", "--method", "ofl", "--adapter",
            "{adapter}", "--random-weights"]
    code, out, err = run_cli(fill(argv, ws), capsys)
    assert code == 0, err
    assert re.search(r"warning: The adapter for label 1 was trained on mr-like .* this volume looks like ct", err)
    assert "preset mr" in out  # the adapter's preset, not the CT window "auto" would pick


def test_unreadable_file_is_reported_as_such(ws, capsys):
    """12.17: permission denied is not "does not exist" (run as another user when root)."""
    import torch

    from oflsam2 import checkpoints

    # As 'nobody', the run still imports lazily from the interpreter, torch and this checkout.
    code_paths = (Path(os.__file__), Path(torch.__file__), checkpoints.MANIFEST_PATH)
    if os.geteuid() == 0 and not all(_others_can_read(path) for path in code_paths):
        pytest.skip("the interpreter or the checkout lies in a folder other users cannot enter")
    shared = Path(tempfile.mkdtemp(prefix="oflsam2-perm-"))
    try:
        os.chmod(shared, 0o777)
        image = shared / "image.nii.gz"
        shutil.copy(ws["image.nii.gz"], image)
        os.chmod(image, 0)
        argv = fill(segment(image=str(image), out=str(shared / "out.nii.gz")), ws)
        with _as_nobody():
            code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "cannot be read: permission denied" in err, err
        assert sorted(p.name for p in shared.iterdir()) == ["image.nii.gz"]
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _others_can_read(path: Path) -> bool:
    """Whether a user other than the owner can read ``path`` (every folder above it enterable)."""
    path = path.resolve()
    folders_ok = all(os.stat(folder).st_mode & stat.S_IXOTH for folder in path.parents)
    return folders_ok and bool(os.stat(path).st_mode & stat.S_IROTH)


@contextlib.contextmanager
def _as_nobody():
    """Drop the effective user id to 'nobody' for the block when running as root."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


# ---------------------------------------------------------------------------------------------
# 12.18: the Python API refuses bad arguments with InputError before any model work


def _mask(shape=(6, 16, 16)):
    mask = np.zeros(shape, bool)
    mask[2, 4:8, 4:8] = True
    return mask


API_CASES = [
    ("float slice", lambda: api.LabelSupport(1, "a", _mask(), [3.0]), r"whole numbers from 0; got 3.0"),
    ("text slice", lambda: api.LabelSupport(1, "a", _mask(), ["3"]), r"got '3'"),
    ("no slices", lambda: api.LabelSupport(1, "a", _mask(), None), r"must be a list of whole numbers; got None"),
    ("label 0", lambda: api.LabelSupport(0, "a", _mask(), [2]), r"from 1 to 65535; got 0"),
    ("negative label", lambda: api.LabelSupport(-3, "a", _mask(), [2]), r"from 1 to 65535; got -3"),
    ("many-valued mask", lambda: api.LabelSupport(1, "a", _mask().astype(np.uint8) * 3, [2]), r"values other than 0 and 1"),
    ("2-D mask", lambda: api.LabelSupport(1, "a", _mask()[0], [2]), r"3-D \(z, y, x\) bool array"),
    ("num_retrieved 0", lambda: api.MethodOptions(num_retrieved=0), r"num_retrieved must be a whole number of at least 1"),
    ("epochs -5", lambda: api.MethodOptions(epochs=-5), r"epochs must be a whole number of at least 0"),
    ("gamma 2", lambda: api.MethodOptions(gamma=2), r"gamma must be a number between 0.0 and 1.0"),
    ("unknown mode", lambda: api.MethodOptions(revsam2_mode="fast"), r"Unknown RevSAM2 mode 'fast'"),
    ("candidate loss typo", lambda: api.MethodOptions(candidate_loss="best"),
     r"Unknown candidate loss 'best'; choose one of: predicted, min, all"),
    ("online solver typo", lambda: api.MethodOptions(online_solver="normal"), r"Unknown online solver 'normal'"),
    ("initial fit typo", lambda: api.MethodOptions(initial_fit="paper"), r"Unknown initial fit 'paper'"),
    ("overfit guard typo", lambda: api.MethodOptions(overfit_guard="early"), r"Unknown overfit guard 'early'"),
    ("empty fraction 1.5", lambda: api.MethodOptions(fit_empty_fraction=1.5), r"fit_empty_fraction must be a number between 0.0 and 1.0"),
    ("backprop iters 0", lambda: api.MethodOptions(learner_backprop_iters=0),
     r"learner_backprop_iters must be a whole number of at least 1"),
    ("flag as text", lambda: api.MethodOptions(accept_absent="no"), r"accept_absent must be True or False; got 'no'"),
    ("image_size text", lambda: api.ModelSettings(image_size="256"), r"Image size '256' is not supported"),
    ("image_size 0", lambda: api.ModelSettings(image_size=0), r"multiple of 32 from 256 to 2048"),
    ("image_size huge", lambda: api.ModelSettings(image_size=100000), r"multiple of 32 from 256 to 2048"),
    ("bad device", lambda: api.ModelSettings(device="tpu"), r"Unknown device 'tpu'"),
]


@pytest.mark.parametrize("build, message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_arguments(build, message):
    with pytest.raises(InputError, match=message):
        build()


def test_a_mask_given_as_a_list_is_accepted_as_bool():
    support = api.LabelSupport(1, "a", _mask().tolist(), (2,))
    assert support.mask.dtype == bool and support.mask.sum() == 16 and support.slices == [2]


def test_engine_validates_before_loading_the_model():
    """Fields changed after construction are caught by validate_run, before the model is built."""
    engine = RealEngine(api.ModelSettings(random_weights=True, device="cpu", image_size=256))
    image = np.zeros((6, 16, 16), np.float32)
    support = api.LabelSupport(1, "a", _mask(), [2])
    support.slices = [3.0]
    with pytest.raises(InputError, match="whole numbers from 0"):
        engine.segment(image, [support], method="sam2")
    options = api.MethodOptions()
    options.num_retrieved = 0
    with pytest.raises(InputError, match="num_retrieved"):
        engine.segment(image, [api.LabelSupport(1, "a", _mask(), [2])], options=options)
    with pytest.raises(InputError, match="needs a prompt in the volume"):
        engine.segment(image, [api.LabelSupport(1, "a", np.zeros((6, 16, 16), bool), [])], method="sam2")
    assert engine._model is None


# ---------------------------------------------------------------------------------------------
# Signals: a subprocess stopped mid-run leaves nothing behind

_SLOW_RUN = """
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


@pytest.mark.parametrize("signum, codes", [(signal.SIGINT, {130}), (signal.SIGTERM, {-signal.SIGTERM, 143})])
def test_signal_mid_run_leaves_nothing_behind(ws, tmp_path, signum, codes):
    started = tmp_path / "started"
    before = ws.snapshot()
    argv = fill(segment(extra=["--seg-nrrd", "{out.seg.nrrd}"]), ws)
    process = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(started), *argv], cwd=ws.root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # importing torch and sam2 takes minutes on a loaded 2-core machine
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not started.exists():
        process.kill()
    assert started.exists(), process.communicate()[1].decode()
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode in codes, err.decode()
    assert ws.snapshot() == before
