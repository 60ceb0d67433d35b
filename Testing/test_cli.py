"""The ``oflsam2`` command line: arguments reach ``pipeline.segment_files`` intact, user errors
exit 2 with ``error: ...``, interruptions 130, and the checkpoint / demo commands behave offline.

``pipeline.segment_files`` is replaced by a recorder here: the real one is tested with real
data in the pipeline tests; this file checks what the CLI hands it and does with its result.
"""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest
import torch

from oflsam2 import cli, pipeline
from oflsam2.cli import train as train_command
from oflsam2.errors import Cancelled, InputError


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("OFLSAM2_CACHE_DIR", str(folder))
    monkeypatch.delenv("OFLSAM2_CHECKPOINT", raising=False)
    monkeypatch.delenv("OFLSAM2_DOWNLOAD_BASE", raising=False)
    return folder


class Recorder:
    """Stands in for ``segment_files``: records the call, reports two stages, returns a summary."""

    def __init__(self):
        self.calls = []
        self.raises = None

    def __call__(self, image_path, support_path, out_path, **kwargs):
        self.calls.append({"image": image_path, "support": support_path, "out": out_path, **kwargs})
        if self.raises is not None:
            raise self.raises
        events = kwargs["events"]
        for stage in ("encoding", "propagating"):
            events.progress(stage, 0, 3, "")
            events.progress(stage, 3, 3, "done")
        labels = kwargs["labels"] or [1]
        return {
            "method": kwargs["method"], "labels": labels, "label_names": {v: f"label_{v}" for v in labels},
            "axis": 0, "axis_name": "axial", "preset": "mr", "slices": {v: [2, 5] for v in labels},
            "voxels": {v: 100 * v for v in labels}, "outputs": [str(out_path)], "timings": {"total": 1.5},
        }

    @property
    def call(self):
        assert len(self.calls) == 1
        return self.calls[0]


@pytest.fixture
def recorder(monkeypatch):
    fake = Recorder()
    monkeypatch.setattr(pipeline, "segment_files", fake)
    return fake


def sam2_like_checkpoint(path, version="2.1"):
    weights = {"image_encoder.trunk.pos_embed": torch.zeros(4), "sam_mask_decoder.iou_token.weight": torch.ones(1, 8)}
    if version == "2.1":
        weights["no_obj_embed_spatial"] = torch.zeros(1, 64)
    torch.save({"model": weights}, path)
    return path


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------------------------
# segment / train


def test_segment_hands_every_option_to_the_pipeline(recorder, capsys):
    status = cli.main([
        "segment", "--image", "ct.nii.gz", "--support", "labels.nii.gz", "--out", "out.nii.gz",
        "--seg-nrrd", "out.seg.nrrd", "--support-slices", "12,20-21", "--labels", "1,3",
        "--reference", "r1.nii:r1_labels.nii", "--reference", "C:\\data\\r2.nii:C:\\data\\r2_labels.nii",
        "--method", "revsam2", "--random-weights", "--image-size", "256", "--axis", "coronal",
        "--preset", "window:-100,300", "--device", "cpu", "--top-k", "5", "--revsam2-mode", "forward_fifo",
        "--seed", "7", "--epochs", "3", "--gamma", "0.6", "--num-retrieved", "4",
    ])
    assert status == 0
    call = recorder.call
    assert (call["image"], call["support"], str(call["out"])) == ("ct.nii.gz", "labels.nii.gz", "out.nii.gz")
    assert call["seg_nrrd_path"] == "out.seg.nrrd"
    assert call["labels"] == [1, 3] and call["support_slices"].within(100) == [12, 20, 21]
    assert call["references"] == [("r1.nii", "r1_labels.nii"), ("C:\\data\\r2.nii", "C:\\data\\r2_labels.nii")]
    assert (call["method"], call["axis"], call["preset"]) == ("revsam2", "coronal", "window:-100,300")
    settings, options = call["settings"], call["options"]
    assert (settings.model, settings.random_weights, settings.image_size, settings.device) == ("sam2.1-tiny", True, 256, "cpu")
    assert settings.checkpoint is None
    assert (options.top_k, options.revsam2_mode, options.seed) == (5, "forward_fifo", 7)
    assert (options.epochs, options.gamma, options.num_retrieved) == (3, 0.6, 4)
    out, err = capsys.readouterr()
    assert "label 3 (label_3): 300 voxels" in out and "wrote out.nii.gz" in out
    assert "MEANINGLESS" in out and "MEANINGLESS" in err
    assert "encoding" in err and "propagating" in err  # one progress bar per stage


def test_segment_json_summary_carries_the_random_weights_warning(recorder, capsys):
    assert cli.main(["segment", "--image", "a.nii", "--support", "b.nii", "--out", "c.nii", "--method", "sam2",
                     "--random-weights", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "RANDOM WEIGHTS" in summary["warning"] and summary["method"] == "sam2"


@pytest.mark.parametrize("model, size", [("sam2.1-tiny", 1024), ("medsam2", 512)])
def test_image_size_defaults_to_the_models_training_size(recorder, model, size):
    assert cli.main(["segment", "--image", "a.nii", "--support", "b.nii", "--out", "c.nii", "--method", "ofl",
                     "--model", model, "--random-weights"]) == 0
    assert recorder.call["settings"].image_size == size


def test_segment_with_an_adapter_needs_no_support(recorder):
    assert cli.main(["segment", "--image", "a.nii", "--out", "c.nii", "--method", "ofl", "--labels", "2",
                     "--adapter", "trained", "--save-adapter", "again", "--random-weights"]) == 0
    call = recorder.call
    assert call["support"] is None and call["options"].adapter == "trained" and call["options"].save_adapter == "again"


def test_a_cached_checkpoint_is_checked_before_the_pipeline_runs(recorder, offline_cache, tmp_path):
    offline_cache.mkdir(parents=True)
    sam2_like_checkpoint(offline_cache / "MedSAM2_latest.pt")
    assert cli.main(["segment", "--image", "a.nii", "--support", "b.nii", "--out", "c.nii", "--method", "ofl",
                     "--model", "medsam2"]) == 0
    assert recorder.call["settings"].random_weights is False


@pytest.mark.parametrize(
    "extra, complaint",
    [
        (["--labels", "1,x"], "positive label values"),
        (["--labels", "0"], "positive label values"),
        (["--support-slices", "5-2"], "runs backwards"),
        (["--reference", "only_one_path.nii"], "IMAGE:LABELS"),
        (["--gamma", "1.5"], "between 0 and 1"),
        (["--top-k", "0"], "at least 1"),
        (["--model", "sam3"], "invalid choice"),
        (["--axis", "oblique"], "invalid choice"),
        (["--random-weights", "--checkpoint", "x.pt"], "not allowed with"),
    ],
)
def test_argument_errors_exit_2_before_anything_runs(recorder, capsys, extra, complaint):
    argv = ["segment", "--image", "a.nii", "--support", "b.nii", "--out", "c.nii", "--method", "ofl", *extra]
    if "--random-weights" not in extra:
        argv.append("--random-weights")
    assert cli.main(argv) == 2
    assert complaint in capsys.readouterr().err
    assert recorder.calls == []


def test_required_arguments_exit_2(recorder, capsys):
    assert cli.main(["segment", "--image", "a.nii", "--method", "ofl"]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["train", "--image", "a.nii", "--out", "adapter"]) == 2
    assert "--support" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert recorder.calls == []


def test_segment_without_method_runs_ofl(recorder):
    """The README's default: ``--method`` may be left out."""
    assert cli.main(["segment", "--image", "a.nii", "--support", "b.nii", "--out", "c.nii", "--random-weights"]) == 0
    assert recorder.call["method"] == "ofl"


def test_missing_checkpoint_exits_2_with_the_download_command(recorder, capsys, offline_cache):
    assert cli.main(["segment", "--image", "a.nii", "--support", "b.nii", "--out", "c.nii", "--method", "ofl"]) == 2
    err = capsys.readouterr().err
    # With no --model an ofl run uses the paper's backbone.
    assert err.startswith("error: ") and "oflsam2 checkpoints download sam2.1-base-plus" in err
    assert str(offline_cache) in err
    assert cli.main(["segment", "--image", "a.nii", "--support", "b.nii", "--out", "c.nii", "--method", "ofl",
                     "--checkpoint", "no_such_file.pt"]) == 2
    assert "no_such_file.pt" in capsys.readouterr().err
    assert recorder.calls == []


@pytest.mark.parametrize(
    "raised, status, text",
    [
        (InputError("Label(s) [4] do not occur in the support"), 2, "error: Label(s) [4] do not occur"),
        (Cancelled(), 130, "error: Cancelled by the user"),
        (KeyboardInterrupt(), 130, "error: Interrupted"),
    ],
)
def test_pipeline_errors_map_to_exit_codes(recorder, capsys, raised, status, text):
    recorder.raises = raised
    argv = ["segment", "--image", "a.nii", "--support", "b.nii", "--out", "c.nii", "--method", "ofl", "--random-weights"]
    assert cli.main(argv) == status
    assert text in capsys.readouterr().err


def test_unexpected_exceptions_propagate(recorder):
    recorder.raises = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["segment", "--image", "a.nii", "--support", "b.nii", "--out", "c.nii", "--method", "ofl", "--random-weights"])


def test_train_runs_ofl_and_saves_the_adapter(recorder, tmp_path, capsys):
    adapter = tmp_path / "liver_adapter"
    assert cli.main(["train", "--image", "a.nii", "--support", "b.nii", "--out", str(adapter), "--epochs", "5",
                     "--labels", "1", "--random-weights"]) == 0
    call = recorder.call
    assert call["method"] == "ofl"
    assert call["out"] == adapter / train_command.TRAINING_SEGMENTATION and adapter.is_dir()
    assert call["options"].save_adapter == str(adapter) and call["options"].epochs == 5
    assert call["seg_nrrd_path"] is None
    assert f"adapter saved in {adapter}" in capsys.readouterr().out


def test_train_refuses_a_file_as_adapter_folder(recorder, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert cli.main(["train", "--image", "a.nii", "--support", "b.nii", "--out", str(existing), "--random-weights"]) == 2
    assert existing.read_text() == "keep me" and recorder.calls == []


def test_an_optional_command_that_cannot_load_says_why(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_OPTIONAL_COMMANDS", (("stats", "no_such_module", "register_stats_command"),))
    assert cli.main(["stats"]) == 2
    assert "'stats' command is not available" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoints_list_shows_every_model_and_the_cache_state(offline_cache, capsys):
    offline_cache.mkdir(parents=True)
    (offline_cache / "MedSAM2_latest.pt").write_bytes(b"weights")
    (offline_cache / "sam2.1_hiera_tiny.pt.part").write_bytes(b"half")
    (offline_cache / "sam2-tiny.pt").write_bytes(b"unrelated")
    assert cli.main(["checkpoints", "list"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint folder: {offline_cache}" in out
    header, *lines = out.splitlines()[1:]
    column = header.index("STATUS")
    rows = {line.split()[0]: line[column:].split()[0] for line in lines}
    assert set(rows) == {"sam2.1-tiny", "sam2.1-small", "sam2.1-base-plus", "sam2.1-large", "sam2-tiny",
                         "sam2-small", "sam2-base-plus", "sam2-large", "medsam2"}
    assert (rows["medsam2"], rows["sam2.1-tiny"], rows["sam2-tiny"]) == ("downloaded", "partial", "-")
    assert re.search(r"sam2\.1-tiny\s+2\.1\s+156 MB", out)


def test_checkpoints_download_offline_exits_2_with_the_manual_route(offline_cache, capsys):
    status = cli.main(["checkpoints", "download", "sam2.1-tiny", "--url", f"http://127.0.0.1:{closed_port()}/x.pt", "--timeout", "3"])
    assert status == 2
    err = capsys.readouterr().err
    assert "sam2.1_hiera_tiny.pt" in err and str(offline_cache) in err
    assert not offline_cache.exists() or list(offline_cache.iterdir()) == []


def test_checkpoints_verify_reports_hash_and_version(tmp_path, capsys):
    path = sam2_like_checkpoint(tmp_path / "mine.pt")
    assert cli.main(["checkpoints", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"sha256\s+[0-9a-f]{64}", out) and "SAM2 v2.1" in out and "not an official file" in out
    assert cli.main(["checkpoints", "verify", str(path), "--model", "medsam2"]) == 0
    assert "checked structurally only" in capsys.readouterr().out
    assert cli.main(["checkpoints", "verify", str(path), "--model", "sam2.1-tiny"]) == 2
    assert "SHA256" in capsys.readouterr().err
    old = sam2_like_checkpoint(tmp_path / "old.pt", version="1")
    assert cli.main(["checkpoints", "verify", str(old), "--model", "medsam2"]) == 2
    assert "SAM2 v1 weights" in capsys.readouterr().err
    text = tmp_path / "text.pt"
    text.write_text("not weights\n" * 10)
    assert cli.main(["checkpoints", "verify", str(text)]) == 2
    assert cli.main(["checkpoints"]) == 2


# --------------------------------------------------------------------------------------------
# demo


def test_demo_without_a_checkpoint_ends_with_the_offline_message(tmp_path, capsys, offline_cache):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: The SAM2 checkpoint for model 'sam2.1-base-plus' is not on this computer" in err
    assert "sam2.1_hiera_base_plus.pt" in err and str(offline_cache) in err
    assert not out.exists()


def test_demo_prepares_the_sample_and_scores_the_result(tmp_path, capsys, monkeypatch):
    """The sample, support and scoring around ``segment_files``; the stand-in returns the
    reference itself, so Dice must be exactly 1."""
    pytest.importorskip("nilearn")
    import SimpleITK as sitk

    from oflsam2 import demo

    calls = []

    def answer_with_reference(image_path, support_path, out_path, **kwargs):
        calls.append(kwargs)
        reference = sitk.ReadImage(str(out_path.parent / "white_matter_reference.nii.gz"))
        sitk.WriteImage(reference, str(out_path))
        return {"outputs": [str(out_path)]}

    monkeypatch.setattr(pipeline, "segment_files", answer_with_reference)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--random-weights", "--image-size", "256", "--method", "sam2"]) == 0
    (kwargs,) = calls
    assert kwargs["labels"] == [demo.WM_LABEL] and kwargs["axis"] == "axial" and kwargs["method"] == "sam2"
    assert kwargs["settings"].image_size == 256 and kwargs["seg_nrrd_path"] == out / "segmentation.seg.nrrd"

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mni152_t1_slab.nii.gz")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "white_matter_reference.nii.gz")))
    support = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "support_3_slices.nii.gz")))
    assert image.shape[0] == demo.SLAB_SLICES and image.shape == reference.shape == support.shape
    assert set(np.unique(reference)) == {0, 1} and reference.mean() > 0.1  # a slab through the white matter
    annotated = [z for z in range(support.shape[0]) if support[z].any()]
    assert annotated == list(demo.SUPPORT_SLICES)
    assert np.array_equal(support[annotated], reference[annotated])

    from PIL import Image

    with Image.open(out / "overlay.png") as overlay:
        assert overlay.width > 3 * overlay.height and overlay.mode == "RGB"
        pixels = np.asarray(overlay)
    assert (pixels == demo.PREDICTION_RGB).all(axis=2).any()
    captured = capsys.readouterr().out
    assert "Dice vs the MNI152 white-matter map (> 0.5): 1.000" in captured
    assert "means nothing" in captured
