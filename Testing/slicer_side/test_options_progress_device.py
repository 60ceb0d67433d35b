"""Run options, progress text and the torch-free GPU probe (no Slicer needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from oflsam2.errors import InputError
from OFLSAM2SegmentLib import device
from OFLSAM2SegmentLib.options import needs_download, option_names, parse_options, snake_case
from OFLSAM2SegmentLib.progress import progress_text, slice_ranges, support_line

MODULE_DIR = Path(__file__).resolve().parents[2] / "OFLSAM2Segment"


def test_camel_and_snake_case_options_reach_the_right_objects():
    config = parse_options("revsam2", {"imageSize": "512", "numRetrieved": 3.0, "top_k": 5, "randomWeights": "true",
                                       "axis": "Coronal", "preset": "window:-100,200", "lrMilestones": "5, 9"})
    assert config.method == "revsam2" and config.axis == "coronal" and config.preset == "window:-100,200"
    assert config.settings.image_size == 512 and config.settings.random_weights is True
    assert config.options.num_retrieved == 3 and config.options.top_k == 5 and config.options.lr_milestones == (5, 9)
    assert snake_case("numRetrieved") == "num_retrieved" and "gamma" in option_names()


def test_the_ofl_preset_option_picks_the_method_options_and_fields_apply_on_top():
    from oflsam2.settings import MethodOptions

    assert parse_options("ofl", {}).options == MethodOptions()  # the paper, by default
    assert parse_options("ofl", {"oflPreset": "extended"}).options == MethodOptions.extended()
    config = parse_options("ofl", {"ofl_preset": "extended", "maxFitSlices": "8", "acceptAbsent": "false", "learnerItersFirst": ""})
    assert config.options == MethodOptions.extended(max_fit_slices=8, accept_absent=False)  # "": the preset's own value
    assert parse_options("ofl", {"emptyEpisodesPerObject": "2.5"}).options.empty_episodes_per_object == 2.5  # optional float
    assert "ofl_preset" in option_names()
    with pytest.raises(InputError, match="Unknown OFL-SAM2 preset 'legacy'"):
        parse_options("ofl", {"oflPreset": "legacy"})


def test_image_size_zero_is_the_models_own():
    assert parse_options("ofl", {"imageSize": 0}).settings.image_size == 1024
    assert parse_options("ofl", {"model": "medsam2", "imageSize": 0}).settings.image_size == 512


@pytest.mark.parametrize("options,message", [
    ({"imageSize": 300}, "multiple of 32"),
    ({"device": "tpu"}, "Unknown device"),
    ({"gamma": 2}, "gamma"),
    ({"epochs": 2.5}, "type int"),
    ({"model": "sam3"}, "Unknown model"),
    ({"axis": "oblique"}, "Unknown slice axis"),
    ({"preset": "ct-brain"}, "preset"),
    ({"numRetrieved": 0}, "num_retrieved"),
    ({"colour": "red"}, "Unknown option 'colour'"),
])
def test_bad_options_are_refused_with_a_reason(options, message):
    with pytest.raises(InputError, match=message):
        parse_options("ofl", options)
    with pytest.raises(InputError, match="Unknown method"):
        parse_options("unet", {})


def test_an_adapter_file_given_for_its_folder_is_called_a_file(tmp_path):
    """Issue 24 §6: the adapter's JSON file picked instead of its folder was reported as "the
    adapter folder ... does not exist"."""
    from OFLSAM2SegmentLib.options import read_adapters

    (tmp_path / "label_1.json").write_text("{}")
    with pytest.raises(InputError, match=r"label_1.json is a file; give the adapter folder that holds it") as raised:
        read_adapters(str(tmp_path / "label_1.json"))
    assert "does not exist" not in str(raised.value) and str(tmp_path) in str(raised.value)
    with pytest.raises(InputError, match="does not exist"):
        read_adapters(str(tmp_path / "missing"))


def test_local_model_is_identified_from_the_file(tmp_path, monkeypatch):
    from oflsam2 import checkpoints

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not really weights")
    with pytest.raises(InputError, match="not one of the official checkpoints"):
        parse_options("ofl", {"model": "local", "checkpoint": str(weights)})
    digest = checkpoints.sha256_file(weights)
    manifest = checkpoints.load_manifest()
    manifest["sam2.1-small"]["sha256"] = digest
    monkeypatch.setattr(checkpoints, "load_manifest", lambda: manifest)
    config = parse_options("ofl", {"model": "local", "checkpoint": str(weights)})
    assert config.settings.model == "sam2.1-small" and config.settings.checkpoint == str(weights)
    with pytest.raises(InputError, match="needs the path"):
        parse_options("ofl", {"model": "local"})


def test_download_is_needed_only_for_a_missing_cached_checkpoint(tmp_path, monkeypatch):
    from oflsam2.checkpoints import ENV_CACHE_DIR, ENV_CHECKPOINT

    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(ENV_CHECKPOINT, raising=False)
    settings = parse_options("ofl", {"model": "sam2.1-tiny"}).settings
    assert needs_download(settings)
    (tmp_path / "sam2.1_hiera_tiny.pt").write_bytes(b"x")
    assert not needs_download(settings)
    assert not needs_download(parse_options("ofl", {"model": "sam2.1-large", "randomWeights": True}).settings)
    assert not needs_download(parse_options("ofl", {"model": "sam2.1-large", "checkpoint": str(tmp_path / "mine.pt")}).settings)


def test_progress_text_and_support_lines():
    assert progress_text("training", 10, 40, "Liver: epoch 10/40, loss 0.2130") == (25, "Training: Liver: epoch 10/40, loss 0.2130")
    assert progress_text("propagating", 3, 9) == (33, "Propagating 3/9")
    assert progress_text("propagating", 3, 0) == (0, "Propagating")
    assert progress_text("someday", 1, 1)[1] == "Someday 1/1"
    assert slice_ranges([9, 3, 4, 5, 12, 13, 5]) == "3-5, 9, 12-13"
    assert support_line("Liver", "axial", [12, 20, 21]) == "Liver: 3 axial slices (12, 20-21)"
    assert support_line("Liver", "axial", [7]) == "Liver: 1 axial slice (7)"
    assert "no annotated slice" in support_line("Spleen", "coronal", [])
    assert support_line("Liver", "axial", [2, 5], ["sagittal"]) == "Liver: 2 axial slices (2, 5); strokes on the sagittal axis ignored"


def test_start_up_imports_and_the_gpu_probe_do_not_import_torch():
    """Slicer imports the module at start-up: torch (seconds to import, maybe not installed
    yet) must wait until a run starts."""
    import importlib.util
    import subprocess

    modules = ["OFLSAM2SegmentLib.worker", "OFLSAM2SegmentLib.options", "OFLSAM2SegmentLib.progress",
               "OFLSAM2SegmentLib.device", "OFLSAM2SegmentLib.install", "oflsam2.volume", "oflsam2.checkpoints"]
    if importlib.util.find_spec("slicer") is not None:
        modules += ["OFLSAM2SegmentLib.logic", "OFLSAM2SegmentLib.mrml_read", "OFLSAM2SegmentLib.mrml_write", "OFLSAM2SegmentLib.mrml_undo",
                    "OFLSAM2SegmentLib.testing"]
    code = (f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r}); import " + ", ".join(modules)
            + "; from OFLSAM2SegmentLib.device import available_devices; available_devices()"
            + "; from OFLSAM2SegmentLib.options import model_choices; model_choices()"
            + "; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_gpu_probe_reads_the_system(monkeypatch):
    assert device.available_devices()[-1] == "cpu"
    monkeypatch.setattr(device.os.path, "isdir", lambda path: False)
    monkeypatch.setattr(device.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(device.shutil, "which", lambda name: None)
    monkeypatch.setattr(device.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(device.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(device.platform, "mac_ver", lambda: ("14.5", ("", "", ""), "arm64"))
    assert device.available_devices() == ["mps", "cpu"]
    monkeypatch.setattr(device.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert device.available_devices()[0] == "cuda"


def test_low_vram_warning_uses_nvidia_smi(monkeypatch, tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 6144\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert device.gpu_memory_bytes() == 6144 << 20
    assert "6.4 GB" in device.low_memory_warning("auto")
    assert device.low_memory_warning("cpu") is None
    smi.write_text("#!/bin/sh\necho 24576\n")
    assert device.low_memory_warning("cuda") is None
