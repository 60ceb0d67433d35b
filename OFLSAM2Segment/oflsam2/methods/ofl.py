"""Method ``ofl``: OFL-SAM2 — SAM2 frozen, an online few-shot learner plus adaptive fusion.

Per label: a support bank (image features F, SAM2 memories M of the annotated masks, object
pointers) is built from the annotated slices; the fusion head (lift, AFM, the learner's λ) is
trained on episodes drawn from the bank; then the volume is propagated slice by slice with
E_tar = AFM(E1, lift(T_τ(F))) fed to SAM2's heads, and confident slices (S_cf > γ) join both the
memory bank and the learner's fit set.

Training and inference put E1 and τ together the same way: the learner's fit set is built by
:func:`~.ofl_bank.fit_set` (every support slice, as the paper; or, with ``max_fit_slices``, the
target's annotated slices, then object slices, then a share of empty ones, by similarity); E1
attends to the retrieved support memories (and, in training with ``episode_recent_memories``,
ground-truth recent memories) and object pointers in both. τ is fitted with
``learner_iters_train`` iterations in training, ``learner_iters_first`` (default: the online 5)
for the first τ at inference and ``learner_iters_online`` per online update.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..driver import Memory
from ..errors import InputError
from ..events import check_cancel
from ..ofl.fusion import AdaptiveFusion, ChannelLift, sum_fusion
from ..ofl.learner import FewShotLearner, GramFit
from .base import RunContext, SupportSet
from .ofl_adapters import load_for_run, save_after_run
from .ofl_bank import Bank, fit_set, retrieval_key, retrieve
from .ofl_spaces import EpisodeSpaces


class FusionHead(nn.Module):
    """What OFL-SAM2 trains for one label: the learner's λ, the channel lift and the AFM."""

    def __init__(self, use_learner: bool = True, use_afm: bool = True, sample_weights: str = "mean", tau_init: str = "zero"):
        super().__init__()
        self.learner = FewShotLearner(sample_weights=sample_weights, tau_init=tau_init)
        self.lift = ChannelLift()
        self.afm = AdaptiveFusion()
        self.use_learner = use_learner
        self.use_afm = use_afm

    def fuse(self, e1: torch.Tensor, tau: torch.Tensor | None, vision: torch.Tensor, gate_means: list | None = None) -> torch.Tensor:
        """E1 (B, 256, h, w) from memory attention + T_τ(F) -> E_tar (B, 256, h, w).

        ``gate_means``: if given, the mean AFM weight W on E1 of this call is appended to it.
        """
        if not self.use_learner or tau is None:
            return e1
        e2 = self.lift(self.learner.apply(tau, vision))
        if not self.use_afm:
            return sum_fusion(e1, e2)
        if gate_means is None or self.afm.force_memory_only:
            return self.afm(e1, e2)
        weights = self.afm.weight_map(e1, e2)  # computed once for the fusion and the report
        gate_means.append(float(weights.mean()))
        return self.afm.mix(weights, e1, e2)


def build_bank(ctx: RunContext, support: SupportSet) -> Bank:
    """Encode every support slice's mask the way SAM2 encodes an input mask (fp32 targets)."""
    slices = support.all_slices(ctx.target)
    sources = {id(ctx.target): 0}
    parts = []
    for s in slices:
        backbone = s.source.backbone([s.index])
        prediction, memory = ctx.driver.condition_on_mask(backbone, ctx.driver.mask_to_model(s.mask[None]), dtype=torch.float32)
        parts.append((backbone, memory, sources.setdefault(id(s.source), len(sources)), s.index, s.mask))
    vision = torch.cat([p[0].vision for p in parts])
    return Bank(
        vision=vision,
        targets=torch.cat([p[1].features for p in parts]),
        obj_ptr=torch.cat([p[1].obj_ptr for p in parts]),
        object_score=torch.cat([p[1].object_score for p in parts]),
        keys=retrieval_key(vision, ctx.options.retrieval),
        source=np.array([p[2] for p in parts]),
        index=np.array([p[3] for p in parts]),
        backbones=[p[0] for p in parts],
        masks=[p[4] for p in parts],
    )


def episode_pools(bank: Bank, exclude_radius: int) -> dict[int, np.ndarray]:
    """For each bank slice used as a training query, the bank slices it may learn from.

    Several support volumes: leave-one-volume-out, except that the target's own annotated
    slices stay in every pool (a query of the target volume loses only those within
    ``exclude_radius`` of itself). One volume: leave-one-slice-out, also excluding annotated
    slices within ``exclude_radius`` (near neighbours leak the answer). Queries without a
    usable pool are skipped.
    """
    several_volumes = len(set(bank.source.tolist())) > 1
    near = np.abs(bank.index[None, :] - bank.index[:, None]) <= exclude_radius  # (P, P)
    pools = {}
    for q in range(len(bank)):
        same_volume = bank.source == bank.source[q]
        if several_volumes:
            keep = ~same_volume | (bank.in_target & same_volume & ~near[q])
        else:
            keep = ~near[q]
        pool = np.flatnonzero(keep)
        if pool.size:
            pools[q] = pool
    return pools


def segmentation_loss(
    candidates: torch.Tensor, ious: torch.Tensor, object_score: torch.Tensor, target: torch.Tensor, candidate: str = "predicted",
    terms: str = "sam2",
) -> torch.Tensor:
    """CE + Dice on pre-gating logits (``terms="ce_dice"``, the paper's loss, on every episode) or,
    as in SAM2's training (``"sam2"``), BCE on the object score plus CE + Dice only when the
    object is present.

    candidates: (1, 3, s, s) logits; ious: (1, 3) predicted IoUs; object_score: (1, 1); target:
    (1, 1, s, s) in {0, 1}. The mask terms apply to the candidate chosen by ``candidate``:
    ``predicted`` the one inference outputs (highest predicted IoU), ``min`` the best of the
    three (SAM2's training), ``all`` their mean.
    """
    present = target.flatten(1).amax(dim=1, keepdim=True)  # (1, 1)
    if terms == "ce_dice":
        loss = candidates.new_zeros(())
    else:
        loss = F.binary_cross_entropy_with_logits(object_score, present)
    if present.item() > 0 or terms == "ce_dice":
        target3 = target.expand_as(candidates)
        ce = F.binary_cross_entropy_with_logits(candidates, target3, reduction="none").mean(dim=(2, 3))
        prob = candidates.sigmoid()
        dice = 1 - (2 * (prob * target3).sum(dim=(2, 3)) + 1) / (prob.sum(dim=(2, 3)) + target3.sum(dim=(2, 3)) + 1)
        per_candidate = ce + dice  # (1, 3)
        if candidate == "predicted":
            mask_loss = per_candidate.gather(1, ious.argmax(dim=1, keepdim=True))
        elif candidate == "min":
            mask_loss = per_candidate.min(dim=1).values
        else:
            mask_loss = per_candidate.mean(dim=1)
        loss = loss + mask_loss.mean()
    return loss


def recent_memories(bank: Bank, q: int, num_recent: int, max_pointers: int):
    """Ground-truth stand-ins for what inference has when it reaches bank slice ``q`` going
    forward: the memories of the annotated slices 1..num_recent before it in its volume (by
    distance) and their object pointers up to ``max_pointers`` - 1 back.
    Returns (spatial, pointers) as :meth:`Sam2Driver.attend` takes them."""
    same = np.flatnonzero(bank.source == bank.source[q])
    by_index = {int(bank.index[i]): int(i) for i in same}
    spatial, pointers = [], []
    for distance in range(num_recent, 0, -1):  # oldest first, as SAM2 orders them
        i = by_index.get(int(bank.index[q]) - distance)
        if i is not None:
            spatial.append((distance, bank.memory(i)))
    for distance in range(1, max_pointers):
        i = by_index.get(int(bank.index[q]) - distance)
        if i is not None:
            pointers.append((distance, bank.obj_ptr[i : i + 1]))
    return spatial, pointers


@dataclass
class Episode:
    """One training query: its E1 (1, 256, h, w), low-res target (1, 1, s, s) and fit set (F,)."""

    query: int
    e1: torch.Tensor
    target: torch.Tensor
    fit: torch.Tensor
    has_object: bool


def build_episodes(ctx: RunContext, bank: Bank) -> list[Episode]:
    """Every usable training query with the inputs it meets at inference (see the module doc)."""
    opts, driver = ctx.options, ctx.driver
    pools = episode_pools(bank, opts.exclude_radius)
    low_res = ctx.model.image_size // 4
    num_recent = (opts.num_maskmem or ctx.model.net.num_maskmem) - 1
    max_pointers = min(ctx.num_slices, ctx.model.net.max_obj_ptrs_in_encoder)
    has_object = bank.has_object if opts.retrieval_object_guarantee else None
    episodes = []
    for q, pool in pools.items():
        allowed = torch.zeros(1, len(bank), dtype=torch.bool, device=bank.keys.device)
        allowed[0, torch.from_numpy(pool)] = True
        retrieved = retrieve(bank.keys[q : q + 1], bank.keys, opts.num_retrieved, allowed, has_object)[0].tolist()
        spatial = [(0, bank.memory(i)) for i in retrieved]
        pointers = [(1, bank.obj_ptr[i : i + 1]) for i in retrieved]
        if opts.episode_recent_memories:
            recent, recent_pointers = recent_memories(bank, q, num_recent, max_pointers)
            spatial, pointers = spatial + recent, pointers + recent_pointers
        e1 = driver.attend(bank.backbones[q], spatial, pointers, ctx.num_slices)
        target = torch.from_numpy(bank.masks[q].astype(np.float32))[None, None].to(e1.device)
        target = (F.interpolate(target, size=(low_res, low_res), mode="bilinear", antialias=True) >= 0.5).float()
        fit = fit_set(bank, pool, bank.keys[q], opts.max_fit_slices, opts.fit_empty_fraction)  # None: the whole pool
        episodes.append(Episode(q, e1, target, torch.from_numpy(fit).to(bank.vision.device), bool(bank.has_object[q])))
    return episodes


def empty_episodes_per_epoch(has_object: np.ndarray, empty_per_object: float | None) -> int:
    """How many empty-slice episodes an epoch draws: at most ``empty_per_object`` per episode
    holding the object (None, or no such episode: every empty one)."""
    objects, empties = int(has_object.sum()), int((~has_object).sum())
    if empty_per_object is None or objects == 0:
        return empties
    return min(empties, math.ceil(empty_per_object * objects))


def epoch_order(has_object: np.ndarray, empty_per_object: float | None, rng: np.random.Generator) -> np.ndarray:
    """The episodes of one epoch in random order: every one holding the object plus
    :func:`empty_episodes_per_epoch` empty ones, drawn afresh each epoch."""
    objects, empties = np.flatnonzero(has_object), np.flatnonzero(~has_object)
    count = empty_episodes_per_epoch(has_object, empty_per_object)
    empties = rng.choice(empties, size=count, replace=False) if count < empties.size else empties
    return rng.permutation(np.concatenate([objects, empties]))


def episode_loss(
    ctx: RunContext, head: FusionHead, bank: Bank, episode: Episode, create_graph: bool, spaces: EpisodeSpaces | None = None
) -> torch.Tensor:
    """The episode's segmentation loss with τ fitted on its fit set: in its Krylov space
    (``train_solver`` ``gram`` or ``krylov``, from ``spaces``) or through autograd on the
    samples; all take the same steps and give the same gradient in λ."""
    opts = ctx.options
    space = None
    if opts.train_solver != "samples":
        space = (spaces or EpisodeSpaces(head.learner, bank, opts.learner_iters_train, opts.train_solver, budget=0))(episode)
    # with Gram statistics standing for them, the samples are not gathered (a copy of the fit set)
    samples = (None, None) if opts.train_solver == "gram" else (bank.vision[episode.fit], bank.targets[episode.fit])
    tau = head.learner.fit(
        *samples, num_iters=opts.learner_iters_train,
        create_graph=create_graph, backprop_iters=opts.learner_backprop_iters, statistics=space,
    )
    e_tar = head.fuse(episode.e1, tau, bank.vision[episode.query : episode.query + 1])
    candidates, ious, object_score = ctx.driver.decode_candidates(e_tar, bank.backbones[episode.query])
    return segmentation_loss(candidates, ious, object_score, episode.target, opts.candidate_loss, opts.loss)


def held_out_split(episodes: list[Episode], opts, rng: np.random.Generator, keep_training=()) -> np.ndarray:
    """Indices of the episodes held out to watch for overfitting (none when the guard is off or
    there are enough episodes): a third, at least one, preferably holding the object. Episodes
    whose query is in ``keep_training`` (bank indices: a warm start's new slices) are held out
    only when nothing else can be."""
    if opts.overfit_guard != "holdout" or len(episodes) >= opts.holdout_below_episodes or len(episodes) < 2:
        return np.zeros(0, dtype=int)
    keep = {int(i) for i in keep_training}
    eligible = np.array([e.query not in keep for e in episodes])
    if not eligible.any():
        eligible[:] = True
    has_object = np.array([e.has_object for e in episodes]) & eligible
    candidates = np.flatnonzero(has_object) if has_object.any() else np.flatnonzero(eligible)
    count = min(max(1, len(episodes) // 3), candidates.size)
    return np.sort(rng.choice(candidates, size=count, replace=False))


def train(ctx: RunContext, head: FusionHead, bank: Bank, epochs: int, label_name: str, seed: int = 0,
          keep_training=()) -> dict:
    """Fit the head on episodes drawn from the bank (their order and draws from ``seed``);
    ``keep_training``: bank slices the overfit guard holds out last (:func:`held_out_split`).

    Returns the training report: ``loss_history`` (mean training loss per epoch),
    ``heldout_loss`` (held-out loss before training and after each epoch, when the overfit guard
    holds episodes out), ``best_epoch`` (the epoch whose weights are kept: 0 = untrained) and
    the episode counts.
    """
    opts = ctx.options
    report = {"loss_history": [], "heldout_loss": [], "best_epoch": None, "episodes": {}}
    if epochs <= 0 or not head.use_learner:  # without the learner nothing is trained
        return report
    with torch.no_grad():  # E1 and the targets do not depend on trained weights: compute once
        episodes = build_episodes(ctx, bank)
    if not episodes:
        return report
    rng = np.random.default_rng(seed)
    held_out = held_out_split(episodes, opts, rng, keep_training)
    training = [e for i, e in enumerate(episodes) if i not in held_out]
    has_object = np.array([e.has_object for e in training], dtype=bool)
    report["episodes"] = {
        "object": int(has_object.sum()),
        "empty": int((~has_object).sum()),
        "empty_per_epoch": empty_episodes_per_epoch(has_object, opts.empty_episodes_per_object),
        "held_out": int(held_out.size),
    }
    if not training:
        return report
    decay, no_decay = [], []
    for name, p in head.named_parameters():
        (no_decay if name.startswith("learner.") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(opts.lr_milestones), gamma=0.1)
    spaces = EpisodeSpaces(head.learner, bank, opts.learner_iters_train, opts.train_solver)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(np.mean([episode_loss(ctx, head, bank, episodes[i], False, spaces).item() for i in held_out]))

    best_state = None
    if held_out.size:
        report["heldout_loss"].append(held_out_loss())
        report["best_epoch"], best_state = 0, copy.deepcopy(head.state_dict())
    head.train()
    for epoch in range(epochs):
        losses, stepped = [], False
        for e in epoch_order(has_object, opts.empty_episodes_per_object, rng):
            check_cancel(ctx.events)
            with torch.enable_grad():
                loss = episode_loss(ctx, head, bank, training[e], True, spaces)
                if loss.requires_grad:  # False only when the AFM is forced to W = 1
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    stepped = True
            losses.append(loss.item())
        if stepped:
            schedule.step()
        report["loss_history"].append(float(np.mean(losses)))
        if held_out.size:
            report["heldout_loss"].append(held_out_loss())
            if report["heldout_loss"][-1] < report["heldout_loss"][report["best_epoch"]]:
                report["best_epoch"], best_state = epoch + 1, copy.deepcopy(head.state_dict())
        mean_loss = report["loss_history"][-1]
        ctx.events.progress("training", epoch + 1, epochs, f"{label_name}: epoch {epoch + 1}/{epochs}, loss {mean_loss:.4f}")
    if best_state is not None:  # keep the weights that did best on the held-out episodes
        head.load_state_dict(best_state)
    head.eval()
    return report


def confidence(high_res_logits: torch.Tensor) -> float:
    """S_cf = mean probability over the predicted foreground (0 when nothing is predicted)."""
    prob = high_res_logits.float().sigmoid()
    foreground = prob > 0.5
    count = int(foreground.sum())
    return float(prob[foreground].sum()) / count if count else 0.0


class OnlineLearner:
    """τ and the samples it is fitted on: the initial fit set plus accepted slices.

    ``initial_fit="episode"`` builds the first fit set as a training episode does (every support
    slice; with ``max_fit_slices``, every annotated slice of the target, then object slices by
    similarity to ``first_key``), ``"even"`` takes evenly spaced bank slices;
    it is fitted with ``learner_iters_first`` iterations (default: the online
    ``learner_iters_online``). Each accepted slice joins the samples (with ``max_online_samples``,
    the oldest beyond it leave) and τ takes ``learner_iters_online`` steps warm-started from the
    current τ. The fits run on the samples' Gram statistics (``online_solver="gram"``,
    :class:`GramFit`: a fixed cost per update) or on the samples themselves (``"samples"``: a
    cost growing with them); both take the same steps.
    """

    def __init__(self, head: FusionHead, bank: Bank, opts, first_key: torch.Tensor):
        self.head, self.opts = head, opts
        everything = np.arange(len(bank))
        if opts.initial_fit == "episode":
            keep = fit_set(bank, everything, first_key, opts.max_fit_slices, opts.fit_empty_fraction)
        else:
            count = min(len(bank), opts.max_fit_slices or len(bank))
            keep = np.unique(np.linspace(0, len(bank) - 1, num=count).round().astype(int))
        iterations = opts.learner_iters_online if opts.learner_iters_first is None else opts.learner_iters_first
        self.initial_fit = {
            "target_slices": sorted(int(i) for i in bank.index[keep][bank.in_target[keep]]),
            "slices": int(keep.size),
            "iterations": iterations if head.use_learner else 0,
        }
        if np.array_equal(keep, everything):  # the whole bank: no copy
            self.base = (bank.vision, bank.targets)
        else:
            keep = torch.from_numpy(keep).to(bank.vision.device)
            self.base = (bank.vision[keep], bank.targets[keep])
        # accepted samples are kept only where a later step reads them again
        self.keep_samples = opts.online_solver != "gram" or opts.max_online_samples is not None
        self.online: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gram: GramFit | None = None
        self.tau = None
        if not head.use_learner:
            return
        if opts.online_solver == "gram":
            self.gram = GramFit(head.learner, bank.vision.device)
            self.gram.update(*self.base)
        self.tau = self.head.learner.fit(*self.base, num_iters=iterations, statistics=self.gram).detach()

    def _fit(self, tau_init, iterations: int):
        vision = torch.cat([self.base[0]] + [v for v, _ in self.online])
        targets = torch.cat([self.base[1]] + [t for _, t in self.online])
        return self.head.learner.fit(vision, targets, tau_init=tau_init, num_iters=iterations).detach()

    def add(self, vision: torch.Tensor, target: torch.Tensor) -> None:
        sample = (vision, target.float())
        window, dropped = self.opts.max_online_samples, []
        if self.keep_samples:
            self.online.append(sample)
            if window is not None and len(self.online) > window:
                dropped, self.online = self.online[:-window], self.online[-window:]
        if not self.head.use_learner:
            return
        if self.gram is None:
            self.tau = self._fit(self.tau, self.opts.learner_iters_online)
            return
        for old in dropped:
            self.gram.update(*old, sign=-1.0)
        self.gram.update(*sample)
        self.tau = self.gram.fit(self.tau, self.opts.learner_iters_online)


def absent_confidence(object_score: torch.Tensor) -> float:
    """How sure SAM2 is that the object is absent: σ(−object score logit)."""
    return float(torch.sigmoid(-object_score.float()).min())


def slice_quality(score: float, object_score: torch.Tensor, predicted_empty: bool) -> dict:
    """A propagated slice's quality: S_cf when the object was predicted, else how sure SAM2 is
    that it is absent, σ(−object score) (S_cf of an empty prediction is 0 by definition)."""
    if predicted_empty:
        absent = absent_confidence(object_score)
        return {"quality": absent, "source": "absent", "s_cf": score, "presence": 1.0 - absent}
    return {"quality": score, "source": "s_cf", "s_cf": score}


def propagate(ctx: RunContext, head: FusionHead, bank: Bank, label: int, given: dict[int, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Segment the target volume slice by slice -> ((N, H, W) bool, statistics).

    With annotated slices in the volume it travels outward from the first one (forward to the
    end, then backward to the start); otherwise it sweeps 0 -> N-1; an update after a correction
    travels outward from the edited slices only (:class:`~.sweep.Sweep`). A slice enters the memory
    bank and the learner's set when its prediction is confident (S_cf > γ); with
    ``accept_absent`` a confident "object absent" (σ(−object score) > γ) enters the memory bank
    only, so that past the end of an organ the recent memories say so.
    """
    opts, driver, cache = ctx.options, ctx.driver, ctx.target
    n, shape = ctx.num_slices, ctx.slice_shape
    out = np.zeros((n,) + shape, dtype=bool)
    sweep = ctx.sweep(label, given)  # outward from the first annotated slice, or from the edits of an update
    if sweep.first() is None:
        return out, {"accepted": 0, "rejected": 0, "confidence": []}
    ctx.events.progress("propagating", 0, sweep.bound, "fitting the learner")
    first_key = retrieval_key(cache.backbone([sweep.first()]).vision, opts.retrieval)[0]
    learner = OnlineLearner(head, bank, opts, first_key)
    accepted: dict[int, Memory] = {}
    num_recent = (opts.num_maskmem or ctx.model.net.num_maskmem) - 1
    max_pointers = min(n, ctx.model.net.max_obj_ptrs_in_encoder)
    support_has_object = bank.has_object
    guarantee = support_has_object if opts.retrieval_object_guarantee else None
    stats = {"accepted": 0, "accepted_absent": 0, "rejected": 0, "confidence": [], "initial_fit": learner.initial_fit}
    with_object, gate_means, visited = 0, [], 0
    for done, (index, step) in enumerate(sweep):
        ctx.events.progress("propagating", min(done, sweep.bound), sweep.bound, f"slice {done + 1}/{sweep.bound}")
        check_cancel(ctx.events)  # after reporting: a cancel asked for now stops here
        backbone = cache.backbone([index])
        key = retrieval_key(backbone.vision, opts.retrieval)
        retrieved = retrieve(key, bank.keys, opts.num_retrieved, has_object=guarantee)[0].tolist()
        with_object += bool(support_has_object[retrieved].any())
        spatial = [(0, bank.memory(i)) for i in retrieved]
        pointers = [(1, bank.obj_ptr[i : i + 1]) for i in retrieved]
        for distance in range(num_recent, 0, -1):  # oldest first, as SAM2 orders its recent memories
            previous = accepted.get(index - step * distance)
            if previous is not None:
                spatial.append((distance, previous))
        for distance in range(1, max_pointers):
            previous = accepted.get(index - step * distance)
            if previous is not None:
                pointers.append((distance, previous.obj_ptr))
        e1 = driver.attend(backbone, spatial, pointers, n)
        prediction = driver.decode(head.fuse(e1, learner.tau, backbone.vision, gate_means), backbone)
        out[index] = driver.to_slice_masks(prediction.low_res, shape)[0]
        sweep.done(index, out[index])
        visited += 1
        ctx.emit(label, index, out[index])
        score = confidence(prediction.high_res)
        stats["confidence"].append(score)
        predicted_empty = not bool((prediction.high_res > 0).any())
        ctx.record_quality(label, index, slice_quality(score, prediction.object_score, predicted_empty))
        if opts.online_update and score > opts.gamma and not (predicted_empty and opts.accept_absent):
            memory = driver.encode_memory(backbone, prediction, binarize=False, dtype=torch.float32)
            accepted[index] = memory
            learner.add(backbone.vision, memory.features)
            stats["accepted"] += 1
        elif opts.online_update and opts.accept_absent and predicted_empty and absent_confidence(prediction.object_score) > opts.gamma:
            accepted[index] = driver.encode_memory(backbone, prediction, binarize=False, dtype=torch.float32)
            stats["accepted"] += 1
            stats["accepted_absent"] += 1
        else:
            stats["rejected"] += 1
    ctx.events.progress("propagating", sweep.bound, sweep.bound, "done")
    stats["retrieval_with_object"] = with_object / visited if support_has_object.any() else None
    stats["gate_mean_w"] = float(np.mean(gate_means)) if gate_means else None
    return out, stats


def label_seed(seed: int, label: int) -> int:
    """The seed of one label's random choices, derived from the run's ``seed``: labels draw
    independently of each other and of the order they are run in."""
    return int(np.random.SeedSequence([seed, label]).generate_state(1)[0])


def build_head(opts, seed: int, device) -> FusionHead:
    """A fusion head whose random initialisation (τ0 with ``tau_init="default"``, the lift)
    depends on ``seed`` only; torch's global random state, CUDA's included, is left as it was
    (the head is built on the CPU from a fork of the CPU generator, then moved)."""
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: CUDA's are never seeded
        torch.default_generator.manual_seed(seed)
        head = FusionHead(opts.use_learner, opts.use_afm, opts.sample_weights, opts.tau_init)
    return head.to(device)


def warm_start(ctx: RunContext, bank: Bank) -> tuple[int, np.ndarray]:
    """How a loaded head is refined on ``bank``: ``(epochs, new)``, ``new`` the bank indices of the
    slices it was not trained on.

    Rule: ``warm_start_epochs`` x (new support slices / all support slices), rounded up, so the
    refinement grows with how much of the support is new. In an update the new slices are the
    corrected ones (the head was trained on the others): one corrected slice among four
    annotated trains ceil(10 x 1/4) = 3 epochs. An adapter refined on another volume's slices
    (all new to it) trains all ``warm_start_epochs``. The overfit guard holds out slices the head
    already knows, whose loss tells whether refining it made them worse, rather than new ones.
    """
    if ctx.previous is None:
        new = np.arange(len(bank))
    else:
        new = np.flatnonzero(bank.in_target & np.isin(bank.index, list(ctx.previous.edited)))
    return math.ceil(ctx.options.warm_start_epochs * new.size / max(len(bank), 1)), new


def run(ctx: RunContext, support: SupportSet) -> np.ndarray:
    """Train (or load) the fusion head for one label, then propagate it through the volume."""
    opts = ctx.options
    seed = label_seed(opts.seed, support.label)
    head = build_head(opts, seed, ctx.model.device)
    loaded = load_for_run(ctx, support, head)
    if loaded is not None and not (support.in_volume or support.external):
        bank, report = loaded, train(ctx, head, loaded, 0, support.name)  # adapter only: its stored bank is the support
    else:
        if not (support.in_volume or support.external):
            raise InputError(
                f"OFL-SAM2 needs support for label {support.name!r}: annotated slices in the volume, "
                "--reference volumes, or a trained --adapter."
            )
        bank = build_bank(ctx, support)
        if loaded is None:
            report = train(ctx, head, bank, opts.epochs, support.name, seed)
        else:
            epochs, new = warm_start(ctx, bank)
            report = train(ctx, head, bank, epochs, support.name, seed, keep_training=new)
            report["warm_start"] = {"epochs": epochs, "new_slices": int(new.size), "support_slices": len(bank)}
    with torch.no_grad():
        masks, stats = propagate(ctx, head, bank, support.label, support.in_volume)
    stats.update(report, seed=seed)
    ctx.info[support.label] = stats
    save_after_run(ctx, support, head, bank, stats)
    return masks
