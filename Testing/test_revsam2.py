"""RevSAM2 and the forward baseline on real CHAOS T2 volumes with the random-weight SAM2.1-tiny.

The query is a 7-slice crop of case 1 with one annotated slice; cases 2 and 3 are references.
Each stage's memory bank is checked against SAM2's own ``SAM2VideoPredictor`` on the short video
the paper implies (forward: [supports, query]; reverse: [query, support]; forward_fifo:
[supports, query volume]); the final stage against the engine's ``sam2`` method.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oflsam2.api import Engine, LabelSupport, MethodOptions, ModelSettings, Reference
from oflsam2.errors import Cancelled, InputError
from oflsam2.events import CancelToken, Events
from oflsam2.methods import revsam2
from oflsam2.volume import apply_preset

LIVER = 1
CROP = 7
ANNOTATED = 3  # index inside the crop
MAX_SUPPORTS = 3


@pytest.fixture(scope="module")
def case(chaos_case):
    image, labels = chaos_case(1)
    present = np.flatnonzero((labels == LIVER).any(axis=(1, 2)))
    start = int(present[len(present) // 2]) - ANNOTATED
    liver = labels[start : start + CROP] == LIVER
    assert liver[ANNOTATED].any()
    references = [Reference(*chaos_case(n), name=f"case {n}") for n in (2, 3)]
    return image[start : start + CROP], liver, references


@pytest.fixture(scope="module")
def engine(tiny_model):
    settings = ModelSettings(random_weights=True, device="cpu", image_size=tiny_model.image_size)
    return Engine(settings, max_cached_volumes=4, model=tiny_model)


class Recorder(Events):
    """Records progress and reported slices; cancels when ``cancel_at`` (stage, done) is reported."""

    def __init__(self, cancel_at=None):
        self.stages, self.slices, self.after_cancel = [], {}, []
        self.token = CancelToken()
        self.cancel_at = cancel_at
        super().__init__(self._progress, self._slice, self.token)

    def _progress(self, stage, done, total, message=""):
        self.stages.append(stage)
        if (stage, done) == self.cancel_at:
            self.token.cancel()

    def _slice(self, label, axis, index, mask):
        if self.token.is_cancelled():
            self.after_cancel.append(index)
        assert index not in self.slices, f"slice {index} reported twice"
        self.slices[index] = mask.copy()


def segment(engine, case, method="revsam2", annotated=(ANNOTATED,), events=None, **options):
    image, liver, references = case
    support = LabelSupport(LIVER, "liver", liver, list(annotated))
    options = MethodOptions(max_supports=MAX_SUPPORTS, **options)
    return engine.segment(image, [support], method=method, preset="mr", references=references, options=options, events=events)


def segment_recording_supports(engine, case, **kwargs):
    """Run and also return the support slices the method chose (in bank order)."""
    chosen = []
    original = revsam2.encode_supports

    def recording(ctx, slices):
        chosen.extend(slices)
        return original(ctx, slices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(revsam2, "encode_supports", recording)
        result = segment(engine, case, **kwargs)
    return result, chosen


@pytest.fixture(scope="module")
def forward_run(engine, case):
    events = Recorder()
    result, supports = segment_recording_supports(engine, case, method="forward", events=events)
    return result, supports, events


@pytest.fixture(scope="module")
def full_run(engine, case):
    events = Recorder()
    result, supports = segment_recording_supports(engine, case, events=events)
    return result, supports, events


def predictor_logits(model, frames, prompts, shape, monkeypatch):
    """SAM2VideoPredictor on the given frames (each (1, 3, S, S)): a mask prompt per prompted
    frame, then forward propagation -> {frame: (H, W) logits}."""
    import sam2.sam2_video_predictor as video_predictor

    video = torch.cat(frames)
    monkeypatch.setattr(video_predictor, "load_video_frames", lambda **kwargs: (video, *shape))
    state = model.net.init_state(video_path="frames-in-memory")
    for index, mask in prompts.items():
        model.net.add_new_mask(state, index, 1, torch.from_numpy(mask))
    return {index: logits[0, 0].cpu().numpy() for index, _, logits in model.net.propagate_in_video(state)}


def frame(model, source, index):
    return source.stack.frames([index], model.image_size, model.device)


def test_supports_are_non_empty_own_slices_first(forward_run, case):
    _, supports, _ = forward_run
    image, liver, _ = case
    assert len(supports) == MAX_SUPPORTS
    assert supports[0].index == ANNOTATED and np.array_equal(supports[0].mask, liver[ANNOTATED])
    assert all(s.mask.any() for s in supports)
    assert supports[1].source is not supports[2].source, "even sampling should reach both references"


def test_forward_matches_one_video_per_query(forward_run, tiny_model, monkeypatch):
    """Stage 1 = FS-MedSAM2's 1S1Q: video [S_0 .. S_{n-1}, Q_i], supports as mask prompts."""
    result, supports, _ = forward_run
    target = supports[0].source
    for query in (0, 6):
        frames = [frame(tiny_model, s.source, s.index) for s in supports] + [frame(tiny_model, target, query)]
        prompts = {j: s.mask for j, s in enumerate(supports)}
        logits = predictor_logits(tiny_model, frames, prompts, target.stack.slice_shape, monkeypatch)
        theirs = logits[len(supports)] > 0
        assert theirs.any()
        assert np.array_equal(result.masks[LIVER][query], theirs), f"query slice {query} differs"


def test_forward_mode_reports_every_query_slice_once(forward_run, case):
    result, _, events = forward_run
    queries = [i for i in range(CROP) if i != ANNOTATED]
    assert sorted(events.slices) == queries
    for index in queries:
        assert np.array_equal(events.slices[index], result.masks[LIVER][index])
    assert np.array_equal(result.masks[LIVER][ANNOTATED], case[1][ANNOTATED])
    assert "reverse" not in events.stages and "propagating" not in events.stages


def test_reverse_scores_are_mean_support_dice(full_run, forward_run, tiny_model, monkeypatch):
    """Stage 2 = video [Q_i, S_j] with P_i as the mask prompt, Dice against Y_j, mean over j."""
    result, supports, _ = full_run
    forward = forward_run[0].masks[LIVER]
    scores = result.info["labels"][LIVER]["scores"]
    assert sorted(scores) == [i for i in range(CROP) if i != ANNOTATED]
    target = supports[0].source
    for query in (0, 2, 5):
        dice = []
        for s in supports:
            frames = [frame(tiny_model, target, query), frame(tiny_model, s.source, s.index)]
            logits = predictor_logits(tiny_model, frames, {0: forward[query]}, s.mask.shape, monkeypatch)
            predicted = logits[1] > 0
            dice.append(2 * (predicted & s.mask).sum() / (predicted.sum() + s.mask.sum()))
        assert scores[query] == pytest.approx(np.mean(dice), abs=1e-9), f"query slice {query}"


def test_selection_is_top_k_with_deterministic_ties():
    scores = {0: 0.2, 1: 0.9, 2: 0.5, 3: 0.9, 4: 0.0, 5: 0.5}
    assert revsam2.select_top_k(scores, [0, 1, 2, 3, 5], 3) == [1, 2, 3]
    assert revsam2.select_top_k(scores, [0, 1, 2, 3, 5], 4) == [1, 2, 3, 5]
    assert revsam2.select_top_k(scores, [0, 2], 3) == [0, 2]  # fewer non-empty than k
    assert revsam2.select_top_k(scores, [], 3) == []
    assert revsam2.select_random([0, 2, 5, 6, 9], 2, seed=4) == revsam2.select_random([0, 2, 5, 6, 9], 2, seed=4)


def test_full_run_selects_best_scored_slices(full_run, forward_run):
    result, _, events = full_run
    info = result.info["labels"][LIVER]
    scores, selected = info["scores"], info["selected"]
    forward = forward_run[0].masks[LIVER]
    ranked = sorted((i for i in scores if forward[i].any()), key=lambda i: (-scores[i], i))
    assert selected == sorted(ranked[:3])
    for index in selected:  # they keep their forward masks and are final at once
        assert np.array_equal(result.masks[LIVER][index], forward[index])
    assert sorted(events.slices) == [i for i in range(CROP) if i != ANNOTATED]
    assert events.stages.index("reverse") > max(i for i, s in enumerate(events.stages) if s == "forward")


def test_self_propagation_equals_sam2_method(full_run, engine, case):
    """Stage 4 is the ``sam2`` method given the selected slices' masks (and the annotation)."""
    result, _, _ = full_run
    ours = result.masks[LIVER]
    selected = result.info["labels"][LIVER]["selected"]
    image, _, _ = case
    support = LabelSupport(LIVER, "liver", ours, sorted(selected + [ANNOTATED]))
    theirs = engine.segment(image, [support], method="sam2", preset="mr").masks[LIVER]
    assert np.array_equal(ours, theirs)


def test_forward_fifo_matches_supports_then_volume_video(engine, case, tiny_model, monkeypatch):
    """``forward_fifo`` = video [S_0 .. S_{n-1}, query slices 0 .. N-1] tracked in order."""
    events = Recorder()
    result, supports = segment_recording_supports(engine, case, annotated=(), revsam2_mode="forward_fifo", events=events)
    target = engine.feature_cache(apply_preset(case[0], "mr"), 0)
    frames = [frame(tiny_model, s.source, s.index) for s in supports] + [frame(tiny_model, target, i) for i in range(CROP)]
    logits = predictor_logits(tiny_model, frames, {j: s.mask for j, s in enumerate(supports)}, target.stack.slice_shape, monkeypatch)
    theirs = np.stack([logits[len(supports) + i] > 0 for i in range(CROP)])
    assert theirs.any()
    assert np.array_equal(result.masks[LIVER], theirs)
    assert sorted(events.slices) == list(range(CROP))


def test_include_supports_adds_reference_memories_to_the_bank(engine, case, monkeypatch):
    from oflsam2.driver import TrackedVolume

    banks = []
    original = TrackedVolume.bank

    def recording(self, index, reverse):
        spatial, pointers = original(self, index, reverse)
        banks.append((index, len(spatial), len(pointers), sum(d == 1 for d, _ in pointers)))
        return spatial, pointers

    monkeypatch.setattr(TrackedVolume, "bank", recording)
    plain = segment(engine, case)
    without, banks[:] = list(banks), []
    extended = segment(engine, case, include_supports_in_propagation=True)
    external = MAX_SUPPORTS - 1  # the annotated target slice is already a conditioning slice
    assert plain.info["labels"][LIVER]["selected"] == extended.info["labels"][LIVER]["selected"]
    assert [b[0] for b in banks] == [b[0] for b in without] and banks
    for (_, spatial, pointers, at_one), (_, spatial0, pointers0, at_one0) in zip(banks, without):
        assert (spatial, pointers, at_one) == (spatial0 + external, pointers0 + external, at_one0 + external)


@pytest.mark.parametrize("stage", ["reverse", "propagating"])
def test_cancel_between_stages(engine, case, stage):
    events = Recorder(cancel_at=(stage, 1))
    with pytest.raises(Cancelled):
        segment(engine, case, events=events)
    assert events.token.is_cancelled()
    assert events.after_cancel == []
    assert events.stages[-1] == stage


def test_random_mode_skips_reverse_scoring(engine, case):
    events = Recorder()
    result = segment(engine, case, revsam2_mode="random", seed=7, events=events)
    info = result.info["labels"][LIVER]
    assert "reverse" not in events.stages and "scores" not in info
    assert len(info["selected"]) == 3 and ANNOTATED not in info["selected"]
    assert sorted(events.slices) == [i for i in range(CROP) if i != ANNOTATED]


def test_bad_options_and_missing_object_are_input_errors(engine, case):
    with pytest.raises(InputError, match="mode"):
        segment(engine, case, revsam2_mode="backward")
    with pytest.raises(InputError, match="top_k"):
        segment(engine, case, top_k=0)
    image, liver, _ = case
    no_object = (image, np.zeros_like(liver), [])
    with pytest.raises(InputError, match="at least one support slice"):
        segment(engine, no_object)
