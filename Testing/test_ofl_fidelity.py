"""OFL-SAM2's ``extended`` preset put together as it trains and runs (issue 10, items 1-8 and the info fields).

Real CHAOS T2 volumes (crops, so that the support has many empty slices, as for a small organ),
random-weight SAM2.1-tiny at 256 px. Each test checks a structural property of a run — what the
learner is fitted on, what memory attention sees, what enters the memory bank — never mask
quality, which random weights cannot give.
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager, redirect_stderr, redirect_stdout

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from oflsam2 import cli
from oflsam2.api import Engine, LabelSupport, MethodOptions, ModelSettings, Reference
from oflsam2.cli import engine_options
from oflsam2.driver import Sam2Driver
from oflsam2.events import Events
from oflsam2.methods import ofl
from oflsam2.ofl.fusion import DEFAULT_GATE_BIAS
from oflsam2.ofl.learner import FewShotLearner
from oflsam2.volume import apply_preset

LIVER = 1
TARGET_CROP = slice(8, 30)  # case 1: liver on crop slices 4..21
ANNOTATED = [6, 13, 20]
REFERENCE_CROPS = {2: slice(0, 20), 3: slice(0, 14)}  # 13 + 5 liver slices, 7 + 9 empty ones
FIT_CAP = 8


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(ModelSettings(random_weights=True, device="cpu", image_size=tiny_model.image_size), model=tiny_model)


@pytest.fixture(scope="module")
def target(chaos_case):
    image, labels = chaos_case(1)
    return image[TARGET_CROP], labels[TARGET_CROP]


@pytest.fixture(scope="module")
def references(chaos_case):
    out = []
    for case, crop in REFERENCE_CROPS.items():
        image, labels = chaos_case(case)
        out.append(Reference(image[crop], labels[crop], name=f"case{case}"))
    return out


def liver_support(labels, slices=ANNOTATED):
    return [LabelSupport(LIVER, "liver", labels == LIVER, list(slices))]


def options(**overrides) -> MethodOptions:
    """The ``extended`` preset: this file tests the project's choices beyond the paper (issue 10)."""
    settings = dict(epochs=1, lr_milestones=(1,), max_fit_slices=FIT_CAP)
    settings.update(overrides)
    return MethodOptions.extended(**settings)


@contextmanager
def recording():
    """Record the bank, every learner fit and every memory-attention bank of one run, each
    marked with the phase it happened in (training before the first propagated slice)."""
    record = {"bank": None, "fits": [], "attends": [], "phase": "training"}
    build_bank, fit, attend = ofl.build_bank, FewShotLearner.fit, Sam2Driver.attend

    def recording_build_bank(ctx, support):
        record["bank"] = build_bank(ctx, support)
        return record["bank"]

    def recording_fit(self, features, targets, weights=None, tau_init=None, num_iters=10, **kwargs):
        record["fits"].append(
            {"phase": record["phase"], "features": features.detach().clone(), "iters": num_iters, "warm": tau_init is not None}
        )
        return fit(self, features, targets, weights, tau_init, num_iters, **kwargs)

    def recording_attend(self, backbone, spatial, pointers, num_frames):
        record["attends"].append({"phase": record["phase"], "distances": [d for d, _ in spatial], "pointers": [d for d, _ in pointers]})
        return attend(self, backbone, spatial, pointers, num_frames)

    def on_progress(stage, done, total, message=""):
        if stage == "propagating":
            record["phase"] = "propagating"

    record["events"] = Events(on_progress=on_progress)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ofl, "build_bank", recording_build_bank)
        patch.setattr(FewShotLearner, "fit", recording_fit)
        patch.setattr(Sam2Driver, "attend", recording_attend)
        yield record


@pytest.fixture(scope="module")
def reference_run(engine, target, references):
    """One run: 3 annotated target slices plus two reference crops, 1 epoch."""
    image, labels = target
    with recording() as record:
        result = engine.segment(image, liver_support(labels), method="ofl", preset="mr", options=options(),
                                references=references, events=record["events"])
    record["info"] = result.info["labels"][LIVER]
    return record


def first_key(engine, image):
    """Retrieval key of the first propagated slice (the one after the first annotated one)."""
    cache = engine.feature_cache(apply_preset(image, "mr"), 0)
    return ofl.retrieval_key(cache.backbone([ANNOTATED[0] + 1]).vision, "flat")[0]


# -- item 1: the initial τ is fitted as training fits it --------------------------------------


def test_initial_fit_is_built_and_iterated_as_in_training(engine, target, reference_run):
    bank = reference_run["bank"]
    initial = [f for f in reference_run["fits"] if f["phase"] == "propagating" and not f["warm"]]
    assert len(initial) == 1
    assert initial[0]["iters"] == MethodOptions().learner_iters_train == 10  # not the online 5
    expected = ofl.fit_set(bank, np.arange(len(bank)), first_key(engine, target[0]), FIT_CAP, MethodOptions().fit_empty_fraction)
    assert torch.equal(initial[0]["features"], bank.vision[torch.from_numpy(expected)])
    online = [f for f in reference_run["fits"] if f["phase"] == "propagating" and f["warm"]]
    assert all(f["iters"] == 5 for f in online)
    assert reference_run["info"]["initial_fit"]["iterations"] == 10


# -- item 2: the target's annotated slices are in every fit set -------------------------------


def test_target_annotations_are_in_every_fit_set(reference_run):
    bank = reference_run["bank"]
    assert reference_run["info"]["initial_fit"]["target_slices"] == ANNOTATED
    own = np.flatnonzero(bank.in_target)
    assert sorted(bank.index[own].tolist()) == ANNOTATED and len(bank) > FIT_CAP
    for q, pool in ofl.episode_pools(bank, exclude_radius=2).items():
        fit = ofl.fit_set(bank, pool, bank.keys[q], FIT_CAP, 0.25)
        expected_own = [i for i in own if bank.source[q] != 0 or abs(bank.index[i] - bank.index[q]) > 2]
        assert set(expected_own) <= set(fit.tolist()), (q, fit)
    # ...and in the training fits actually run: every one holds the target's features
    training = [f["features"] for f in reference_run["fits"] if f["phase"] == "training"]
    assert training
    own_vision = bank.vision[torch.from_numpy(own)]
    with_all_own = sum(1 for f in training if all(any(torch.equal(v, x) for x in f) for v in own_vision))
    assert with_all_own >= len(training) - len(own)  # all but the target's own queries see all three


# -- item 3: empty slices do not dominate ---------------------------------------------------------


def test_every_retrieval_includes_an_object_slice(engine, target, reference_run):
    bank = reference_run["bank"]
    assert (~bank.has_object).sum() >= 10  # the support is mostly empty at its ends
    assert reference_run["info"]["retrieval_with_object"] == 1.0
    cache = engine.feature_cache(apply_preset(target[0], "mr"), 0)
    keys = ofl.retrieval_key(cache.backbone(list(range(len(target[0])))).vision, "flat")
    retrieved = ofl.retrieve(keys, bank.keys, 2, has_object=bank.has_object)
    assert bank.has_object[retrieved.cpu().numpy()].any(axis=1).all()
    # Where the most similar allowed slices are all empty, the guarantee brings in an object slice
    # (the least similar one here, the only one allowed), and plain top-2 retrieval does not.
    objects = np.flatnonzero(bank.has_object)
    farthest_object = int(objects[np.argmin((bank.keys[torch.from_numpy(objects)] @ keys[0]).cpu().numpy())])
    allowed = torch.from_numpy(~bank.has_object)[None].clone()
    allowed[0, farthest_object] = True
    plain = ofl.retrieve(keys[:1], bank.keys, 2, allowed)[0].tolist()
    guaranteed = ofl.retrieve(keys[:1], bank.keys, 2, allowed, has_object=bank.has_object)[0].tolist()
    assert not bank.has_object[plain].any()
    assert guaranteed == [plain[0], farthest_object]


def test_training_episodes_are_balanced(reference_run):
    episodes = reference_run["info"]["episodes"]
    assert episodes["object"] > 0 and episodes["empty"] > 0
    assert episodes["empty_per_epoch"] == min(episodes["empty"], episodes["object"])
    training_fits = [f for f in reference_run["fits"] if f["phase"] == "training"]
    assert len(training_fits) == episodes["object"] + episodes["empty_per_epoch"]  # one epoch


def test_fit_sets_put_object_slices_first_and_keep_some_negatives(reference_run):
    bank = reference_run["bank"]
    pool = np.flatnonzero(~bank.in_target)
    fit = ofl.fit_set(bank, pool, bank.keys[0], FIT_CAP, 0.25)
    assert len(fit) == FIT_CAP
    assert bank.has_object[fit].sum() == FIT_CAP - 2 and (~bank.has_object[fit]).sum() == 2


# -- item 4: the AFM is trained on inputs like those it meets -----------------------------------


def test_training_e1_sees_recent_memories_and_pointers(reference_run):
    training = [a for a in reference_run["attends"] if a["phase"] == "training"]
    assert training
    with_recent = [a for a in training if any(d > 0 for d in a["distances"])]
    # every reference slice but the first of its crop has its predecessor as a recent memory
    assert len(with_recent) >= sum(len(range(c.stop - c.start)) - 1 for c in REFERENCE_CROPS.values())
    assert all(1 in a["distances"] for a in with_recent if len(a["distances"]) > 3)
    assert any(max(a["pointers"]) > 1 for a in with_recent)


def test_loss_trains_the_candidate_inference_outputs(engine, target):
    """On a real slice through SAM2's real decoder: the mask loss of ``predicted`` is the loss
    of the highest-IoU candidate, which need not be the best-loss one."""
    image, labels = target
    cache = engine.feature_cache(apply_preset(image, "mr"), 0)
    model = engine.model
    driver = Sam2Driver(model, cache.position_encoding())
    backbone = cache.backbone([13])
    candidates, ious, score = driver.decode_candidates(backbone.vision, backbone)
    mask = torch.from_numpy((labels[13] == LIVER).astype(np.float32))[None, None]
    target_low = (torch.nn.functional.interpolate(mask, size=candidates.shape[-2:], mode="bilinear", antialias=True) >= 0.5).float()
    losses = [ofl.segmentation_loss(candidates[:, i : i + 1], ious[:, i : i + 1], score, target_low, "min").item() for i in range(3)]
    predicted = ofl.segmentation_loss(candidates, ious, score, target_low, "predicted").item()
    assert predicted == pytest.approx(losses[int(ious.argmax())], rel=1e-6)
    assert ofl.segmentation_loss(candidates, ious, score, target_low, "min").item() == pytest.approx(min(losses), rel=1e-6)
    assert ofl.segmentation_loss(candidates, ious, score, target_low, "all").item() == pytest.approx(
        np.mean(losses), rel=1e-5)


# -- item 5: small support sets do not overfit ------------------------------------------------------


def test_three_annotations_keep_the_gate_unless_held_out_loss_improves(engine, target):
    image, labels = target
    slices = [4, 12, 20]  # three annotated slices, far enough apart to be each other's episodes
    guarded = engine.segment(image, liver_support(labels, slices), method="ofl", preset="mr",
                             options=options(epochs=6, lr=1e-2, lr_milestones=(5,))).info["labels"][LIVER]
    assert guarded["episodes"]["held_out"] == 1 and len(guarded["heldout_loss"]) == 7
    start_w = float(torch.sigmoid(torch.tensor(DEFAULT_GATE_BIAS)))
    best = guarded["best_epoch"]
    if best == 0:
        assert guarded["gate_mean_w"] == pytest.approx(start_w, abs=1e-6)
    else:
        assert guarded["heldout_loss"][best] < guarded["heldout_loss"][0]
    unguarded = engine.segment(image, liver_support(labels, slices), method="ofl", preset="mr",
                               options=options(epochs=6, lr=1e-2, lr_milestones=(5,), overfit_guard="none")).info["labels"][LIVER]
    assert unguarded["gate_mean_w"] != pytest.approx(start_w, abs=1e-4)  # unguarded, the gate drifts


# -- item 6: adapters keep every object slice ---------------------------------------------------


def test_adapter_keeps_every_object_slice(engine, target, references, reference_run, tmp_path):
    image, labels = target
    folder = tmp_path / "adapter"
    engine.segment(image, liver_support(labels), method="ofl", preset="mr", options=options(epochs=0, save_adapter=str(folder)),
                   references=references)
    tensors = load_file(str(folder / "liver.safetensors"))
    bank = reference_run["bank"]
    objects, empties = int(bank.has_object.sum()), int((~bank.has_object).sum())
    assert tensors["bank.vision"].shape[0] == objects + min(empties, 16)
    assert int((tensors["bank.object_score"][:, 0] > 0).sum()) == objects
    assert tensors["bank.vision"].dtype == torch.bfloat16
    metadata = json.loads((folder / "liver.json").read_text())
    assert metadata["training"]["adapter_object_slices"] == objects
    no_support = [LabelSupport(LIVER, "liver", np.zeros(image.shape, bool), [])]
    result = engine.segment(image, no_support, method="ofl", preset="mr", options=options(adapter=str(folder)))
    assert result.info["labels"][LIVER]["retrieval_with_object"] == 1.0


# -- item 7: confident "object absent" predictions enter memory ---------------------------------


@pytest.fixture(scope="module")
def small_engine():
    """Random-weight SAM2.1-small at 256 px: unlike tiny, it predicts "object absent" on much of
    this volume, which is what item 7 is about."""
    from oflsam2.backend import load_sam2

    settings = ModelSettings(model="sam2.1-small", random_weights=True, device="cpu", image_size=256)
    return Engine(settings, model=load_sam2(settings))


def test_confident_absent_predictions_enter_the_memory_bank(small_engine, target):
    image, labels = target
    support = liver_support(labels)
    absent = small_engine.segment(image, support, method="ofl", preset="mr", options=options(epochs=0, gamma=0.0)).info["labels"][LIVER]
    scores = np.array(absent["confidence"])
    empty_predictions = int((scores == 0).sum())
    assert empty_predictions > 0  # the check below is not vacuous
    assert absent["accepted_absent"] == empty_predictions and absent["rejected"] == 0
    before = small_engine.segment(image, support, method="ofl", preset="mr",
                                  options=options(epochs=0, gamma=0.0, accept_absent=False)).info["labels"][LIVER]
    assert before["accepted"] == int((np.array(before["confidence"]) > 0).sum()) < len(scores)


# -- item 8: num_maskmem other than 7 keeps each memory's distance -----------------------------


def test_recent_memories_are_encoded_by_their_distance(engine, target):
    image, labels = target
    net = engine.model.net
    tokens = (engine.model.image_size // 16) ** 2
    seen = []
    attention = net.memory_attention.forward

    def spy(curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens=0):
        seen.append(memory_pos[: memory_pos.shape[0] - num_obj_ptr_tokens].detach().clone())
        return attention(curr=curr, memory=memory, curr_pos=curr_pos, memory_pos=memory_pos, num_obj_ptr_tokens=num_obj_ptr_tokens)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(net.memory_attention, "forward", spy)
        engine.segment(image, liver_support(labels), method="ofl", preset="mr", options=options(epochs=0, gamma=0.0, num_maskmem=3))
    cache = engine.feature_cache(apply_preset(image, "mr"), 0)
    driver = Sam2Driver(engine.model, cache.position_encoding())
    base = driver._maskmem_pos.flatten(2).permute(2, 0, 1)
    full = [pos for pos in seen if pos.shape[0] == 4 * tokens]  # 2 retrieved + 2 recent memories
    assert full
    for pos in full:
        older, previous = pos[2 * tokens : 3 * tokens], pos[3 * tokens :]
        assert torch.allclose(previous, base + net.maskmem_tpos_enc[0], atol=1e-6)  # 1 back
        assert torch.allclose(older, base + net.maskmem_tpos_enc[1], atol=1e-6)  # 2 back
        assert torch.allclose(pos[:tokens], base + net.maskmem_tpos_enc[net.num_maskmem - 1], atol=1e-6)  # retrieved


# -- what a run did, from outside -------------------------------------------------------------------


@pytest.fixture(scope="module")
def segment_json(target, tmp_path_factory):
    """``oflsam2 segment --json`` on the target with its 3 annotated slices: (status, stdout, stderr)."""
    tmp_path = tmp_path_factory.mktemp("segment_json")
    image, labels = target
    annotated = np.zeros_like(labels)
    for index in ANNOTATED:
        annotated[index] = labels[index] == LIVER
    for name, array in (("image", image), ("support", annotated)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nii.gz"))
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(io.StringIO()) as out, redirect_stderr(io.StringIO()) as err:
        patch.setenv("OFLSAM2_CACHE_DIR", str(tmp_path / "cache"))
        status = cli.main([
            "segment", "--image", str(tmp_path / "image.nii.gz"), "--support", str(tmp_path / "support.nii.gz"),
            "--out", str(tmp_path / "out.nii.gz"), "--method", "ofl", "--random-weights", "--image-size", "256",
            "--device", "cpu", "--epochs", "1", "--preset", "mr", "--model", "sam2.1-tiny", "--json", "--ofl-preset", "extended",
        ])
    return status, out.getvalue(), err.getvalue()


def test_segment_json_reports_the_per_label_info(target, segment_json):
    image, labels = target
    status, out, err = segment_json
    assert status == 0, err
    engine_info = json.loads(out)["engine"]
    assert engine_info["model"] == "sam2.1-tiny"  # the run says which model it used
    assert engine_info["ofl_preset"] == "extended" and engine_info["options"]["max_fit_slices"] == 64  # ...and how
    info = engine_info["labels"][str(LIVER)]
    assert info["initial_fit"]["target_slices"] == ANNOTATED and info["initial_fit"]["iterations"] == 10
    assert info["retrieval_with_object"] == 1.0
    assert info["accepted"] + info["rejected"] == len(image) - len(ANNOTATED)
    assert 0 < info["gate_mean_w"] < 1


def test_segment_json_puts_each_labels_info_under_labels(target, segment_json):
    """``labels.<value>`` holds one label's name, slices, voxels and the engine's figures."""
    image, _ = target
    status, out, err = segment_json
    assert status == 0, err
    summary = json.loads(out)
    liver = summary["labels"][str(LIVER)]
    assert list(summary["labels"]) == [str(LIVER)]
    assert liver["initial_fit"]["target_slices"] == ANNOTATED and liver["initial_fit"]["iterations"] == 10
    assert liver["retrieval_with_object"] == 1.0 and 0 < liver["gate_mean_w"] < 1
    assert liver["accepted"] + liver["rejected"] == len(image) - len(ANNOTATED)
    assert liver["slices"] == ANNOTATED and liver["voxels"] == summary["voxels"][str(LIVER)] > 0
    assert liver["name"] == summary["label_names"][str(LIVER)]
    assert liver["accepted"] == summary["engine"]["labels"][str(LIVER)]["accepted"]  # the engine's own place stays


# -- item 9: each method's default model is its paper's ------------------------------------------


@pytest.mark.parametrize("command, method, expected", [
    ("segment", "ofl", "sam2.1-base-plus"),
    ("segment", "revsam2", "sam2.1-tiny"),
    ("segment", "sam2", "sam2.1-tiny"),
    ("train", None, "sam2.1-base-plus"),
])
def test_default_model_is_the_papers_backbone(command, method, expected, tmp_path):
    argv = [command, "--image", "ct.nii.gz", "--support", "s.nii.gz", "--out", str(tmp_path / "out"), "--random-weights"]
    argv += ["--method", method] if method else []
    args = cli.build_parser().parse_args(argv)
    assert engine_options.model_settings(args).model == expected
    overridden = cli.build_parser().parse_args(argv + ["--model", "sam2.1-small"])
    assert engine_options.model_settings(overridden).model == "sam2.1-small"


# -- speed: online updates on Gram statistics take the learner's own steps ----------------------


def test_gram_online_update_takes_the_same_steps_as_the_samples(engine, target):
    """Real features and ground-truth memories of 10 CHAOS slices: 5 warm-started steps on the
    Gram statistics equal 5 steps on the samples, also after a sample is added and dropped."""
    from oflsam2.ofl.learner import GramFit

    image, labels = target
    cache = engine.feature_cache(apply_preset(image, "mr"), 0)
    driver = Sam2Driver(engine.model, cache.position_encoding())
    slices = list(range(4, 14))
    backbone = cache.backbone(slices)
    _, memory = driver.condition_on_mask(backbone, driver.mask_to_model(labels[slices] == LIVER), dtype=torch.float32)
    vision, targets = backbone.vision, memory.features
    learner = FewShotLearner()
    start = learner.fit(vision[:6], targets[:6], num_iters=10)
    expected = learner.fit(vision, targets, tau_init=start, num_iters=5)
    gram = GramFit(learner, vision.device)
    gram.update(vision[:7], targets[:7])
    gram.update(vision[:1] * 2, targets[:1])  # an extra sample, then dropped again
    gram.update(vision[7:], targets[7:])
    gram.update(vision[:1] * 2, targets[:1], sign=-1.0)
    got = gram.fit(start, 5)
    assert gram.count == len(slices)
    assert (got - expected).norm() / expected.norm() < 1e-3
    assert (got - start).norm() / (expected - start).norm() > 0.99  # the steps moved τ as far


def test_krylov_training_fit_takes_the_same_steps_and_gradient_as_the_samples(engine, target):
    """Real features and ground-truth memories of 9 CHAOS slices, a 10th as the query: τ fitted
    in the episode's Krylov space and the outer gradient in λ equal those of the unrolled fit."""
    image, labels = target
    cache = engine.feature_cache(apply_preset(image, "mr"), 0)
    driver = Sam2Driver(engine.model, cache.position_encoding())
    slices = list(range(4, 14))
    backbone = cache.backbone(slices)
    _, memory = driver.condition_on_mask(backbone, driver.mask_to_model(labels[slices] == LIVER), dtype=torch.float32)
    vision, targets = backbone.vision, memory.features
    learner = FewShotLearner()
    space = learner.krylov_space(vision[1:], targets[1:], 10)
    results = []
    for statistics in (None, space):
        learner.zero_grad()
        tau = learner.fit(vision[1:], targets[1:], num_iters=10, create_graph=True, statistics=statistics)
        (learner.apply(tau, vision[:1]) - targets[:1]).pow(2).mean().backward()
        results.append((tau.detach(), learner.ridge_lambda.grad.item()))
    (tau_samples, grad_samples), (tau_space, grad_space) = results
    assert (tau_space - tau_samples).norm() / tau_samples.norm() < 1e-4
    assert grad_samples != 0.0 and grad_space == pytest.approx(grad_samples, rel=1e-3)


def test_training_in_krylov_spaces_is_the_training_on_the_samples(engine, target):
    """Two epochs on the real volume: the same losses, held-out losses and kept epoch."""
    image, labels = target
    slices = [4, 8, 12, 16, 20]
    reports = [
        engine.segment(image, liver_support(labels, slices), method="ofl", preset="mr",
                       options=options(epochs=2, lr=1e-2, lr_milestones=(5,), gamma=1.0, train_solver=solver)).info["labels"][LIVER]
        for solver in ("krylov", "gram", "samples")
    ]
    samples = reports[-1]
    assert samples["episodes"]["held_out"] > 0
    for space in reports[:2]:  # from the samples, from their Gram statistics
        assert space["episodes"] == samples["episodes"]
        assert space["loss_history"] == pytest.approx(samples["loss_history"], rel=1e-4)
        assert space["heldout_loss"] == pytest.approx(samples["heldout_loss"], rel=1e-4)
        assert space["best_epoch"] == samples["best_epoch"]
        assert space["loss_history"][0] != space["loss_history"][1]  # training moved


def test_adapters_do_not_import_the_method():
    """ofl.py uses ofl_adapters.py, which needs only the bank leaf: no import cycle."""
    import ast
    import inspect

    from oflsam2.methods import ofl_adapters, ofl_bank

    for module in (ofl_adapters, ofl_bank):
        imported = {
            node.module for node in ast.walk(ast.parse(inspect.getsource(module)))
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "ofl" not in imported and "oflsam2.methods.ofl" not in imported, (module.__name__, imported)
