"""Same input, same output: OFL-SAM2 runs and adapters depend on the seed only (issue 15).

Real CHAOS T2 crops, random-weight SAM2.1-tiny at 256 px. Between the two runs of each test the
global torch/numpy random state is moved on, as any other code in the process would do: a run
that drew from it (the fusion head's initialisation did) gives another result.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from oflsam2 import cli
from oflsam2.api import Engine, LabelSupport, MethodOptions, ModelSettings
from oflsam2.volume import apply_preset

LIVER = 1
CROP = slice(8, 20)  # 12 slices through the liver: quick, with empty and object slices


@pytest.fixture(scope="module")
def chaos_crop(chaos_case):
    image, labels = chaos_case(1)
    return image[CROP], labels[CROP]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(ModelSettings(random_weights=True, device="cpu", image_size=tiny_model.image_size), model=tiny_model)


def support(labels):
    liver = labels == LIVER
    present = np.flatnonzero(liver.any(axis=(1, 2)))
    return [LabelSupport(LIVER, "liver", liver, [int(i) for i in present[::4]])]


def options(**overrides) -> MethodOptions:
    settings = dict(epochs=2, lr_milestones=(1,), max_fit_slices=8, seed=7)
    settings.update(overrides)
    return MethodOptions(**settings)


def disturb_global_rng(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def test_engine_segment_twice_gives_identical_label_maps(engine, chaos_crop):
    image, labels = chaos_crop
    disturb_global_rng(1)
    first = engine.segment(image, support(labels), method="ofl", preset="mr", options=options())
    disturb_global_rng(2)
    second = engine.segment(image, support(labels), method="ofl", preset="mr", options=options())
    assert np.array_equal(first.masks[LIVER], second.masks[LIVER])
    assert first.info["labels"][LIVER]["loss_history"] == second.info["labels"][LIVER]["loss_history"]
    assert first.info["labels"][LIVER]["confidence"] == second.info["labels"][LIVER]["confidence"]
    # ...and the seed matters (the comparison above is not vacuous): another seed, another head.
    other = engine.segment(image, support(labels), method="ofl", preset="mr", options=options(seed=8))
    assert other.info["labels"][LIVER]["loss_history"] != first.info["labels"][LIVER]["loss_history"]


def test_a_run_leaves_the_global_random_state_unchanged(engine, chaos_crop):
    image, labels = chaos_crop
    disturb_global_rng(3)
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    engine.segment(image, support(labels), method="ofl", preset="mr", options=options())
    engine.segment(image, support(labels), method="revsam2", preset="mr", options=options(revsam2_mode="random", max_supports=2))
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]


def test_training_twice_gives_byte_identical_adapter_tensors(engine, chaos_crop, tmp_path):
    image, labels = chaos_crop
    files = []
    for run, global_seed in enumerate((4, 5)):
        disturb_global_rng(global_seed)
        folder = tmp_path / f"adapter{run}"
        engine.segment(image, support(labels), method="ofl", preset="mr", options=options(save_adapter=str(folder)))
        files.append(folder / "liver.safetensors")
    assert files[0].read_bytes() == files[1].read_bytes()
    first, second = load_file(str(files[0])), load_file(str(files[1]))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    metadata = json.loads((tmp_path / "adapter0" / "liver.json").read_text())
    assert metadata["training"]["seed"] == 7
    assert isinstance(metadata["training"]["label_seed"], int)


def test_deterministic_mode_restores_the_callers_torch_settings(tiny_model, chaos_crop):
    image, labels = chaos_crop
    settings = ModelSettings(random_weights=True, device="cpu", image_size=tiny_model.image_size, deterministic=True)
    engine = Engine(settings, model=tiny_model)
    threads = torch.get_num_threads()
    seen = []
    result = engine.segment(
        image, support(labels), method="ofl", preset="mr", options=options(epochs=1),
        events=_recording_events(seen),
    )
    assert result.masks[LIVER].shape == image.shape
    assert seen and all(flags == (True, 1) for flags in seen)  # on during the run...
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()  # ...off after


def test_deterministic_mode_covers_the_encoding_so_every_executor_computes_the_same(tiny_model, chaos_crop):
    """The slices are encoded with deterministic kernels and one thread too: a Ray actor (one
    thread) and a local run (the process's threads) must encode identically (before: encoding ran
    outside deterministic mode, and a Ray experiment's Dice differed from the local one in the
    7th digit)."""
    image, labels = chaos_crop
    settings = ModelSettings(random_weights=True, device="cpu", image_size=tiny_model.image_size, deterministic=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a local run on a 2-core machine
    seen = []
    try:
        Engine(settings, model=tiny_model).segment(image, support(labels), method="forward", preset="mr",
                                                   events=_recording_events(seen, stages=("encoding",)))
    finally:
        torch.set_num_threads(threads)
    assert seen and all(flags == (True, 1) for flags in seen), seen


def _recording_events(seen, stages=("training", "propagating")):
    from oflsam2.events import Events

    def on_progress(stage, done, total, message=""):
        if stage in stages:
            seen.append((torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()))

    return Events(on_progress=on_progress)


def test_cli_segment_twice_gives_identical_label_maps(chaos_crop, tmp_path, monkeypatch, capsys):
    """``oflsam2 segment --method ofl`` with no adapter, 2 epochs, random weights, 256 px."""
    monkeypatch.setenv("OFLSAM2_CACHE_DIR", str(tmp_path / "cache"))
    image, labels = chaos_crop
    annotated = np.zeros_like(labels)
    for index in support(labels)[0].slices:
        annotated[index] = labels[index] == LIVER
    paths = {}
    for name, array in (("image", image), ("support", annotated)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(paths[name]))
    outputs = []
    for run, global_seed in enumerate((6, 9)):
        disturb_global_rng(global_seed)
        out = tmp_path / f"out{run}.nii.gz"
        status = cli.main([
            "segment", "--image", str(paths["image"]), "--support", str(paths["support"]), "--out", str(out),
            "--method", "ofl", "--random-weights", "--image-size", "256", "--device", "cpu", "--epochs", "2",
            "--preset", "mr", "--seed", "3", "--model", "sam2.1-tiny",
        ])
        assert status == 0, capsys.readouterr().err
        outputs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
    assert outputs[0].any()
    assert np.array_equal(outputs[0], outputs[1])


def test_deterministic_runs_agree_across_thread_counts(tiny_model, chaos_crop):
    """``deterministic``: the whole run, the encoding of the slices included, runs on one thread,
    so 1 and 2 threads give the same features, floats and label maps (each run encodes afresh)."""
    image, labels = chaos_crop
    threads = torch.get_num_threads()
    runs = []
    for count in (1, 2):
        settings = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=tiny_model.image_size,
                                 deterministic=True)
        engine = Engine(settings, model=tiny_model)
        torch.set_num_threads(count)
        try:
            result = engine.segment(image, support(labels), method="ofl", preset="mr", options=options(epochs=1))
        finally:
            torch.set_num_threads(threads)
        cache = engine.feature_cache(apply_preset(image, "mr"), 0)  # the run's own, cached
        runs.append((result, cache.backbone(list(range(len(image)))).vision))
    (first, first_features), (second, second_features) = runs
    assert torch.equal(first_features, second_features)
    assert np.array_equal(first.masks[LIVER], second.masks[LIVER])
    for key in ("confidence", "loss_history"):
        assert first.info["labels"][LIVER][key] == second.info["labels"][LIVER][key]


def test_a_run_never_seeds_the_cuda_generators(engine, chaos_crop, monkeypatch):
    """Seeding torch's global generators seeds CUDA's too (at once, or queued until CUDA starts),
    and ``fork_rng(devices=[])`` does not give them back: the head (τ0 drawn too) and
    random weights are drawn from the CPU generator alone."""
    from oflsam2.backend import load_sam2

    seeded = []
    for module, name in ((torch.cuda, "manual_seed"), (torch.cuda, "manual_seed_all"), (torch.mps, "manual_seed")):
        monkeypatch.setattr(module, name, lambda *args, _name=name: seeded.append(_name))
    image, labels = chaos_crop
    torch_state = torch.random.get_rng_state()
    engine.segment(image, support(labels), method="ofl", preset="mr", options=options(epochs=1, tau_init="default"))
    load_sam2(ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256))
    assert seeded == []
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    torch.manual_seed(0)  # the check is not vacuous: the global seed would have been seen
    assert "manual_seed_all" in seeded


def test_deterministic_settings_prepare_cublas_before_the_model_is_built(tiny_model, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    Engine(ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256), model=tiny_model)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # only a deterministic engine asks for it
    Engine(ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256, deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own choice is kept
    Engine(ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256, deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
