"""``MethodOptions()`` runs OFL-SAM2 as its paper states it (issue 22): one test per row of the
table in docs/methods.md, on a run recorded on real CHAOS T2 slices (random-weight SAM2.1-tiny, 256 px);
and ``MethodOptions.extended()`` holds the project's choices as they were before.

The recorded run: CHAOS case 1 (37 slices) with 3 annotated liver slices, two cropped reference
volumes as further support, 1 epoch, gate γ = 0 (every non-empty prediction passes, so that
more slices are accepted than the old window of 32 held; the rule is the paper's for any γ).
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from oflsam2.api import Engine, LabelSupport, MethodOptions, ModelSettings, Reference
from oflsam2.driver import Sam2Driver
from oflsam2.events import Events
from oflsam2.methods import ofl, ofl_adapters, ofl_spaces
from oflsam2.ofl.learner import FewShotLearner
from oflsam2.settings import EXTENDED_OFL, ofl_preset
from oflsam2.volume import apply_preset

LIVER = 1
ANNOTATED = [12, 18, 24]
REFERENCE_CROPS = {2: slice(3, 11), 3: slice(6, 12)}  # 4 + 3 empty slices, 4 + 3 with the liver


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=tiny_model.image_size),
                  model=tiny_model)


@pytest.fixture(scope="module")
def target(chaos_case):
    return chaos_case(1)


@pytest.fixture(scope="module")
def references(chaos_case):
    out = []
    for case, crop in REFERENCE_CROPS.items():
        image, labels = chaos_case(case)
        out.append(Reference(image[crop], labels[crop], name=f"case{case}"))
    return out


def liver_support(labels):
    return [LabelSupport(LIVER, "liver", labels == LIVER, ANNOTATED)]


@pytest.fixture(scope="module")
def paper_run(engine, target, references, tmp_path_factory):
    """One run with the paper's options (1 epoch, γ = 0), recording what the method did; it
    saves its adapter."""
    record = {"bank": None, "fits": [], "attends": [], "retrievals": [], "fit_sets": [], "learners": [], "phase": "training"}
    build_bank, fit, attend, retrieve = ofl.build_bank, FewShotLearner.fit, Sam2Driver.attend, ofl.retrieve
    build_space = ofl_spaces.EpisodeSpaces._build

    def recording_build_bank(ctx, support):
        record["bank"] = build_bank(ctx, support)
        return record["bank"]

    def recording_fit(self, features, targets, weights=None, tau_init=None, num_iters=10, **kwargs):
        record["fits"].append({"phase": record["phase"], "iters": num_iters, "warm": tau_init is not None,
                               "statistics": type(kwargs.get("statistics")).__name__})
        return fit(self, features, targets, weights, tau_init, num_iters, **kwargs)

    def recording_attend(self, backbone, spatial, pointers, num_frames):
        record["attends"].append({"phase": record["phase"], "distances": [d for d, _ in spatial], "pointers": [d for d, _ in pointers]})
        return attend(self, backbone, spatial, pointers, num_frames)

    def recording_retrieve(query_keys, keys, k, allowed=None, has_object=None):
        found = retrieve(query_keys, keys, k, allowed, has_object)
        record["retrievals"].append({"phase": record["phase"], "k": k, "guarantee": has_object is not None,
                                     "query": query_keys.clone(), "allowed": allowed, "found": found.clone()})
        return found

    def recording_build_space(self, fit_indices):
        record["fit_sets"].append(fit_indices.cpu().numpy())
        return build_space(self, fit_indices)

    class RecordedLearner(ofl.OnlineLearner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record["learners"].append(self)

    def on_progress(stage, done, total, message=""):
        if stage == "propagating":
            record["phase"] = "propagating"

    image, labels = target
    options = MethodOptions(epochs=1, gamma=0.0, save_adapter=str(tmp_path_factory.mktemp("paper") / "adapter"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ofl, "build_bank", recording_build_bank)
        patch.setattr(FewShotLearner, "fit", recording_fit)
        patch.setattr(Sam2Driver, "attend", recording_attend)
        patch.setattr(ofl, "retrieve", recording_retrieve)
        patch.setattr(ofl_spaces.EpisodeSpaces, "_build", recording_build_space)
        patch.setattr(ofl, "OnlineLearner", RecordedLearner)
        result = engine.segment(image, liver_support(labels), method="ofl", preset="mr", options=options,
                                references=references, events=Events(on_progress=on_progress))
    record["info"], record["result"], record["options"] = result.info["labels"][LIVER], result, options
    return record


def test_the_paper_is_the_default_and_the_run_says_so(paper_run):
    assert ofl_preset(MethodOptions()) == "paper" and ofl_preset(MethodOptions.extended()) == "extended"
    assert ofl_preset(MethodOptions.extended(accept_absent=False)) == "custom"
    assert ofl_preset(MethodOptions.extended(gamma=0.5, epochs=3)) == "extended"  # fields both presets share
    info = paper_run["result"].info
    assert info["ofl_preset"] == "paper" and info["options"] == dataclasses.asdict(paper_run["options"])


# -- row "Retrieval (Eq. 1)": the top K = 2 by cosine similarity, nothing replaced ----------------


def test_retrieval_is_the_top_two_by_cosine_similarity(paper_run):
    bank = paper_run["bank"]
    assert MethodOptions().num_retrieved == 2
    calls = paper_run["retrievals"]
    assert {c["phase"] for c in calls} == {"training", "propagating"} and all(c["k"] == 2 and not c["guarantee"] for c in calls)
    for call in calls:
        similarity = call["query"] @ bank.keys.T
        if call["allowed"] is not None:
            similarity = similarity.masked_fill(~call["allowed"], float("-inf"))
        assert torch.equal(call["found"], similarity.topk(2, dim=1).indices)
    # ...and in the paper's setting some slices outside the organ get no organ memory at all
    propagated = [c["found"][0].tolist() for c in calls if c["phase"] == "propagating"]
    assert any(not bank.has_object[found].any() for found in propagated)
    assert paper_run["info"]["retrieval_with_object"] < 1.0


# -- row "Learner fit (Eq. 2)": every training sample, no cap, no ranking ------------------------


def test_the_learner_fits_every_training_sample(paper_run):
    bank = paper_run["bank"]
    assert MethodOptions().max_fit_slices is None
    pools = ofl.episode_pools(bank, MethodOptions().exclude_radius)
    # each episode (in the epoch's random order) fits its whole pool, in bank order
    assert sorted(f.tolist() for f in paper_run["fit_sets"]) == sorted(pools[q].tolist() for q in pools)
    learner = paper_run["learners"][0]
    assert paper_run["info"]["initial_fit"]["slices"] == len(bank)  # at inference: the whole bank
    assert learner.base[0] is bank.vision  # the bank itself, not a ranked subset


# -- row "Online samples": every accepted slice is added -----------------------------------------


def test_every_accepted_slice_joins_the_learners_samples(paper_run):
    info, learner, bank = paper_run["info"], paper_run["learners"][0], paper_run["bank"]
    assert info["accepted"] > 32  # more than the old window held
    assert learner.gram.count == len(bank) + info["accepted"]  # none dropped
    assert learner.online == []  # the Gram statistics hold them: no copy kept
    assert FewShotLearner().sample_weights == "mean"  # each of the N samples weighs 1/N (LWL's code of Eq. 2)


# -- row "Iterations": 10 in training, 5 at inference, the first τ included ------------------------


def test_ten_iterations_in_training_and_five_at_inference(paper_run):
    fits = paper_run["fits"]
    training = [f for f in fits if f["phase"] == "training"]
    first = [f for f in fits if f["phase"] == "propagating" and not f["warm"]]
    assert training and all(f["iters"] == 10 and f["statistics"] == "KrylovSpace" for f in training)
    assert len(first) == 1 and first[0]["iters"] == 5 and paper_run["info"]["initial_fit"]["iterations"] == 5
    assert paper_run["learners"][0].opts.learner_iters_online == 5


# -- row "Memory update": S_cf > γ for a non-empty prediction, nothing else -------------------------


def test_only_confident_non_empty_predictions_update_memory_and_learner(paper_run):
    info = paper_run["info"]
    scores = np.array(info["confidence"])
    assert MethodOptions().gamma == 0.8
    assert info["accepted"] == int((scores > 0.0).sum()) and info["accepted_absent"] == 0
    assert info["rejected"] == int((scores == 0.0).sum())  # empty predictions: S_cf undefined, never stored
    # what SAM2 attended to while propagating: the retrieved pair plus accepted slices only
    propagated = [a for a in paper_run["attends"] if a["phase"] == "propagating"]
    assert all(a["distances"][:2] == [0, 0] for a in propagated)


# -- row "Training": every episode each epoch, no held-out restore, no recent memories in E1 -------


def test_training_runs_every_episode_as_inference_would_see_it(paper_run):
    info = paper_run["info"]
    episodes = info["episodes"]
    assert MethodOptions().epochs == 40
    assert episodes["empty"] > 0 and episodes["empty_per_epoch"] == episodes["empty"] and episodes["held_out"] == 0
    assert info["best_epoch"] is None and info["heldout_loss"] == []
    training_fits = [f for f in paper_run["fits"] if f["phase"] == "training"]
    assert len(training_fits) == episodes["object"] + episodes["empty"]  # one epoch: every episode once
    training = [a for a in paper_run["attends"] if a["phase"] == "training"]
    assert training and all(a["distances"] == [0, 0] and a["pointers"] == [1, 1] for a in training)


# -- loss: the paper's CE + Dice, on every episode ---------------------------------------------------


def test_the_loss_is_ce_and_dice_on_every_episode(engine, target):
    image, labels = target
    cache = engine.feature_cache(apply_preset(image, "mr"), 0)
    driver = Sam2Driver(engine.model, cache.position_encoding())
    low = engine.model.image_size // 4
    for index in (2, 18):  # no liver on slice 2, liver on slice 18
        backbone = cache.backbone([index])
        candidates, ious, score = driver.decode_candidates(backbone.vision, backbone)
        mask = torch.from_numpy((labels[index] == LIVER).astype(np.float32))[None, None]
        truth = (torch.nn.functional.interpolate(mask, size=(low, low), mode="bilinear", antialias=True) >= 0.5).float()
        paper = ofl.segmentation_loss(candidates, ious, score, truth, "predicted", "ce_dice")
        sam2 = ofl.segmentation_loss(candidates, ious, score, truth, "predicted", "sam2")
        object_bce = torch.nn.functional.binary_cross_entropy_with_logits(score, truth.flatten(1).amax(1, keepdim=True))
        if truth.any():
            assert paper.item() == pytest.approx((sam2 - object_bce).item(), rel=1e-6)
        else:  # SAM2's training has no mask loss here; the paper's loss does
            assert sam2.item() == pytest.approx(object_bce.item(), rel=1e-6) and paper.item() > 0.1
    assert MethodOptions().loss == "ce_dice"


# -- adapters keep every training sample -------------------------------------------------------------


def test_a_paper_adapter_keeps_every_support_slice_and_records_its_options(paper_run):
    from pathlib import Path

    folder = Path(paper_run["options"].save_adapter)
    bank = paper_run["bank"]
    tensors = load_file(str(folder / "liver.safetensors"))
    assert tensors["bank.vision"].shape[0] == len(bank) > int(bank.has_object.sum())  # the empty slices too, all of them
    assert (~bank.has_object).sum() > 0
    many_empty = SimpleNamespace(has_object=np.arange(60) % 3 == 0)  # 20 object slices, 40 empty ones
    assert ofl_adapters.adapter_slices(many_empty, MethodOptions().adapter_empty_slices).size == 60
    assert ofl_adapters.adapter_slices(many_empty, MethodOptions.extended().adapter_empty_slices).size == 20 + 16
    training = json.loads((folder / "liver.json").read_text())["training"]
    assert training["ofl_preset"] == "paper"
    options = json.loads(json.dumps(dataclasses.asdict(paper_run["options"])))
    assert training["options"] == {k: v for k, v in options.items() if k not in ("adapter", "save_adapter")}


def test_an_adapter_trained_with_another_tau0_is_refused(engine, target, tmp_path):
    from oflsam2.errors import AdapterError

    image, labels = target
    crop, crop_labels = image[10:22], labels[10:22]
    support = [LabelSupport(LIVER, "liver", crop_labels == LIVER, [2, 8])]
    folder = tmp_path / "adapter"
    engine.segment(crop, support, method="ofl", preset="mr", options=MethodOptions(epochs=0, tau_init="default", save_adapter=str(folder)))
    assert "head.learner.origin" in load_file(str(folder / "liver.safetensors"))  # τ0 travels with the head
    blank = [LabelSupport(LIVER, "liver", np.zeros(crop.shape, bool), [])]
    with pytest.raises(AdapterError, match="tau_init='default'"):
        engine.segment(crop, blank, method="ofl", preset="mr", options=MethodOptions(adapter=str(folder)))
    again = engine.segment(crop, blank, method="ofl", preset="mr", options=MethodOptions(adapter=str(folder), tau_init="default"))
    assert again.masks[LIVER].shape == crop.shape


# -- the extended preset is the project's choices as they were -------------------------------------

# MethodOptions() before issue 22, field by field; the new fields at the values that reproduce it.
BEFORE_ISSUE_22 = {
    "num_maskmem": None, "epochs": 40, "lr": 1e-3, "lr_milestones": (10, 30), "gamma": 0.8, "num_retrieved": 2,
    "retrieval": "flat", "learner_iters_train": 10, "learner_iters_online": 5, "use_learner": True, "use_afm": True,
    "online_update": True, "exclude_radius": 2, "max_fit_slices": 64, "seed": 0, "adapter": None, "save_adapter": None,
    "warm_start_epochs": 10, "initial_fit": "episode", "fit_empty_fraction": 0.25, "retrieval_object_guarantee": True,
    "empty_episodes_per_object": 1.0, "episode_recent_memories": True, "candidate_loss": "predicted",
    "overfit_guard": "holdout", "holdout_below_episodes": 16, "accept_absent": True, "learner_backprop_iters": None,
    "online_solver": "gram", "train_solver": "krylov", "top_k": 3, "revsam2_mode": "full",
    "include_supports_in_propagation": False, "max_supports": 10, "support_sampling": "even", "forward_batch_size": 4,
    # new fields: the first τ as training fitted it, the window of 32 (MAX_ONLINE_SAMPLES), 1/N weights, τ0 = 0,
    # SAM2's loss terms, 16 empty slices per adapter (ADAPTER_EMPTY_SLICES)
    "learner_iters_first": 10, "max_online_samples": 32, "sample_weights": "mean", "tau_init": "zero", "loss": "sam2",
    "adapter_empty_slices": 16,
}


def test_extended_sets_every_field_to_its_value_before_issue_22():
    assert dataclasses.asdict(MethodOptions.extended()) == BEFORE_ISSUE_22
    paper = MethodOptions()
    assert all(getattr(paper, name) != value for name, value in EXTENDED_OFL.items())  # each one a departure
    assert MethodOptions.extended(max_fit_slices=8, seed=3).max_fit_slices == 8  # fields still override
    assert MethodOptions.preset("extended") == MethodOptions.extended() and MethodOptions.preset("paper") == paper
