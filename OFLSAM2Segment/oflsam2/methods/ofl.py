"""Method ``ofl``: OFL-SAM2 — SAM2 frozen, an online few-shot learner plus adaptive fusion.

Per label: a support bank (image features F, SAM2 memories M of the annotated masks, object
pointers) is built from the annotated slices; the fusion head (lift, AFM, the learner's λ) is
trained on episodes drawn from the bank; then the volume is propagated slice by slice with
E_tar = AFM(E1, lift(T_τ(F))) fed to SAM2's heads, and confident slices (S_cf > γ) join both the
memory bank and the learner's fit set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..driver import Memory, Prediction
from ..errors import InputError
from ..events import check_cancel
from ..features import Backbone
from ..ofl.fusion import AdaptiveFusion, ChannelLift, sum_fusion
from ..ofl.learner import FewShotLearner
from .base import RunContext, SupportSet

MAX_ONLINE_SAMPLES = 32  # learner samples added while propagating (oldest dropped first)


class FusionHead(nn.Module):
    """What OFL-SAM2 trains for one label: the learner's λ, the channel lift and the AFM."""

    def __init__(self, use_learner: bool = True, use_afm: bool = True):
        super().__init__()
        self.learner = FewShotLearner()
        self.lift = ChannelLift()
        self.afm = AdaptiveFusion()
        self.use_learner = use_learner
        self.use_afm = use_afm

    def fuse(self, e1: torch.Tensor, tau: torch.Tensor | None, vision: torch.Tensor) -> torch.Tensor:
        """E1 (B, 256, h, w) from memory attention + T_τ(F) -> E_tar (B, 256, h, w)."""
        if not self.use_learner or tau is None:
            return e1
        e2 = self.lift(self.learner.apply(tau, vision))
        return self.afm(e1, e2) if self.use_afm else sum_fusion(e1, e2)


@dataclass
class Bank:
    """Support slices of one label, on the model device.

    vision: (P, 256, h, w) image features F; targets: (P, 64, h, w) fp32 memory features of the
    given masks (learner targets and conditioning memories); obj_ptr: (P, 256); object_score:
    (P, 1); keys: (P, D) unit retrieval vectors; source: (P,) volume id (0 = the target volume);
    index: (P,) slice index in that volume.
    """

    vision: torch.Tensor
    targets: torch.Tensor
    obj_ptr: torch.Tensor
    object_score: torch.Tensor
    keys: torch.Tensor
    source: np.ndarray
    index: np.ndarray
    backbones: list[Backbone] = field(default_factory=list, repr=False)  # for training episodes
    masks: list[np.ndarray] = field(default_factory=list, repr=False)  # (H, W) bool per slice

    def __len__(self) -> int:
        return self.vision.shape[0]

    def memory(self, i: int) -> Memory:
        return Memory(self.targets[i : i + 1], self.obj_ptr[i : i + 1], self.object_score[i : i + 1])


def retrieval_key(vision: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, 256, h, w) -> (B, D) unit vectors: flattened F (default) or its channel means."""
    key = vision.flatten(1) if mode == "flat" else vision.mean(dim=(2, 3))
    return F.normalize(key.float(), dim=1)


def retrieve(query_keys: torch.Tensor, keys: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (B, k) of the k most cosine-similar bank slices, most similar first."""
    similarity = query_keys @ keys.T
    if allowed is not None:
        similarity = similarity.masked_fill(~allowed, float("-inf"))
    return similarity.topk(min(k, keys.shape[0]), dim=1).indices


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

    Several support volumes: leave-one-volume-out. One volume: leave-one-slice-out, also
    excluding annotated slices within ``exclude_radius`` (near neighbours leak the answer).
    Queries without a usable pool are skipped.
    """
    several_volumes = len(set(bank.source.tolist())) > 1
    pools = {}
    for q in range(len(bank)):
        if several_volumes:
            pool = np.flatnonzero(bank.source != bank.source[q])
        else:
            pool = np.flatnonzero(np.abs(bank.index - bank.index[q]) > exclude_radius)
        if pool.size:
            pools[q] = pool
    return pools


def segmentation_loss(candidates: torch.Tensor, object_score: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE + Dice on pre-gating logits (best of the 3 candidates) + BCE on the object score.

    candidates: (1, 3, s, s) logits; object_score: (1, 1); target: (1, 1, s, s) in {0, 1}.
    The mask terms apply only when the object is present, as in SAM2's training.
    """
    present = target.flatten(1).amax(dim=1, keepdim=True)  # (1, 1)
    loss = F.binary_cross_entropy_with_logits(object_score, present)
    if present.item() > 0:
        target3 = target.expand_as(candidates)
        ce = F.binary_cross_entropy_with_logits(candidates, target3, reduction="none").mean(dim=(2, 3))
        prob = candidates.sigmoid()
        dice = 1 - (2 * (prob * target3).sum(dim=(2, 3)) + 1) / (prob.sum(dim=(2, 3)) + target3.sum(dim=(2, 3)) + 1)
        loss = loss + (ce + dice).min(dim=1).values.mean()
    return loss


def fit_subset(bank: Bank, pool: np.ndarray, query_key: torch.Tensor, cap: int) -> np.ndarray:
    """At most ``cap`` pool slices for the learner, the most similar to the query first."""
    if pool.size <= cap:
        return pool
    similarity = (bank.keys[torch.from_numpy(pool)] @ query_key).cpu().numpy()
    return pool[np.argsort(-similarity, kind="stable")[:cap]]


def train(ctx: RunContext, head: FusionHead, bank: Bank, epochs: int, label_name: str, seed: int = 0) -> list[float]:
    """Fit the head on episodes drawn from the bank (their order from ``seed``); returns the mean
    loss of each epoch."""
    opts, driver = ctx.options, ctx.driver
    pools = episode_pools(bank, opts.exclude_radius)
    if not pools or epochs <= 0 or not head.use_learner:  # without the learner nothing is trained
        return []
    low_res = ctx.model.image_size // 4
    episodes = []
    with torch.no_grad():  # E1 and the targets do not depend on trained weights: compute once
        for q, pool in pools.items():
            allowed = torch.zeros(1, len(bank), dtype=torch.bool, device=bank.keys.device)
            allowed[0, torch.from_numpy(pool)] = True
            retrieved = retrieve(bank.keys[q : q + 1], bank.keys, opts.num_retrieved, allowed)[0].tolist()
            e1 = driver.attend(
                bank.backbones[q],
                [(0, bank.memory(i)) for i in retrieved],
                [(1, bank.obj_ptr[i : i + 1]) for i in retrieved],
                ctx.num_slices,
            )
            target = torch.from_numpy(bank.masks[q].astype(np.float32))[None, None].to(e1.device)
            target = (F.interpolate(target, size=(low_res, low_res), mode="bilinear", antialias=True) >= 0.5).float()
            fit = fit_subset(bank, pool, bank.keys[q], opts.max_fit_slices)
            episodes.append((q, e1, target, torch.from_numpy(fit).to(bank.vision.device)))
    decay, no_decay = [], []
    for name, p in head.named_parameters():
        (no_decay if name.startswith("learner.") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(opts.lr_milestones), gamma=0.1)
    generator = np.random.default_rng(seed)
    history = []
    head.train()
    for epoch in range(epochs):
        losses = []
        for e in generator.permutation(len(episodes)):
            check_cancel(ctx.events)
            q, e1, target, fit = episodes[e]
            with torch.enable_grad():
                tau = head.learner.fit(bank.vision[fit], bank.targets[fit], num_iters=opts.learner_iters_train, create_graph=True)
                e_tar = head.fuse(e1, tau, bank.vision[q : q + 1])
                candidates, _, object_score = driver.decode_candidates(e_tar, bank.backbones[q])
                loss = segmentation_loss(candidates, object_score, target)
                trainable = loss.requires_grad  # False only when the AFM is forced to W = 1
                if trainable:
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            losses.append(loss.item())
        if trainable:
            schedule.step()
        history.append(float(np.mean(losses)))
        ctx.events.progress("training", epoch + 1, epochs, f"{label_name}: epoch {epoch + 1}/{epochs}, loss {history[-1]:.4f}")
    head.eval()
    return history


def confidence(high_res_logits: torch.Tensor) -> float:
    """S_cf = mean probability over the predicted foreground (0 when nothing is predicted)."""
    prob = high_res_logits.float().sigmoid()
    foreground = prob > 0.5
    count = int(foreground.sum())
    return float(prob[foreground].sum()) / count if count else 0.0


class OnlineLearner:
    """τ and the samples it is fitted on: the bank (capped) plus accepted slices (capped)."""

    def __init__(self, head: FusionHead, bank: Bank, opts):
        self.head, self.opts = head, opts
        keep = np.linspace(0, len(bank) - 1, num=min(len(bank), opts.max_fit_slices)).round().astype(int)
        keep = torch.from_numpy(np.unique(keep)).to(bank.vision.device)
        self.base = (bank.vision[keep], bank.targets[keep])
        self.online: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tau = self._fit(None) if head.use_learner else None

    def _fit(self, tau_init):
        vision = torch.cat([self.base[0]] + [v for v, _ in self.online])
        targets = torch.cat([self.base[1]] + [t for _, t in self.online])
        return self.head.learner.fit(vision, targets, tau_init=tau_init, num_iters=self.opts.learner_iters_online).detach()

    def add(self, vision: torch.Tensor, target: torch.Tensor) -> None:
        self.online = (self.online + [(vision, target.float())])[-MAX_ONLINE_SAMPLES:]
        if self.head.use_learner:
            self.tau = self._fit(self.tau)


def propagate(ctx: RunContext, head: FusionHead, bank: Bank, label: int, given: dict[int, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Segment the target volume slice by slice -> ((N, H, W) bool, statistics).

    With annotated slices in the volume it travels outward from the first one (forward to the
    end, then backward to the start); otherwise it sweeps 0 -> N-1.
    """
    opts, driver, cache = ctx.options, ctx.driver, ctx.target
    n, shape = ctx.num_slices, ctx.slice_shape
    out = np.zeros((n,) + shape, dtype=bool)
    learner = OnlineLearner(head, bank, opts)
    accepted: dict[int, Memory] = {}
    if given:
        start = min(given)
        order = [(i, 1) for i in range(start, n)] + [(i, -1) for i in range(start - 1, -1, -1)]
    else:
        order = [(i, 1) for i in range(n)]
    order = [(i, step) for i, step in order if i not in given]
    num_recent = (opts.num_maskmem or ctx.model.net.num_maskmem) - 1
    max_pointers = min(n, ctx.model.net.max_obj_ptrs_in_encoder)
    stats = {"accepted": 0, "rejected": 0, "confidence": []}
    for done, (index, step) in enumerate(order):
        ctx.events.progress("propagating", done, len(order), f"slice {done + 1}/{len(order)}")
        check_cancel(ctx.events)  # after reporting: a cancel asked for now stops here
        backbone = cache.backbone([index])
        retrieved = retrieve(retrieval_key(backbone.vision, opts.retrieval), bank.keys, opts.num_retrieved)[0].tolist()
        spatial = [(0, bank.memory(i)) for i in retrieved]
        pointers = [(1, bank.obj_ptr[i : i + 1]) for i in retrieved]
        for t_rel in range(num_recent, 0, -1):  # oldest first, as SAM2 orders its recent memories
            previous = accepted.get(index - step * t_rel)
            if previous is not None:
                spatial.append((num_recent + 1 - t_rel, previous))
        for t_diff in range(1, max_pointers):
            previous = accepted.get(index - step * t_diff)
            if previous is not None:
                pointers.append((t_diff, previous.obj_ptr))
        e1 = driver.attend(backbone, spatial, pointers, n)
        prediction = driver.decode(head.fuse(e1, learner.tau, backbone.vision), backbone)
        out[index] = driver.to_slice_masks(prediction.low_res, shape)[0]
        ctx.emit(label, index, out[index])
        score = confidence(prediction.high_res)
        stats["confidence"].append(score)
        if opts.online_update and score > opts.gamma:
            memory = driver.encode_memory(backbone, prediction, binarize=False, dtype=torch.float32)
            accepted[index] = memory
            learner.add(backbone.vision, memory.features)
            stats["accepted"] += 1
        else:
            stats["rejected"] += 1
    ctx.events.progress("propagating", len(order), len(order), "done")
    return out, stats


def label_seed(seed: int, label: int) -> int:
    """The seed of one label's random choices, derived from the run's ``seed``: labels draw
    independently of each other and of the order they are run in."""
    return int(np.random.SeedSequence([seed, label]).generate_state(1)[0])


def build_head(opts, seed: int, device) -> FusionHead:
    """A fusion head whose random initialisation (the lift) depends on ``seed`` only; torch's
    global random state is left as it was (a fork, seeded locally)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = FusionHead(opts.use_learner, opts.use_afm)
    return head.to(device)


def run(ctx: RunContext, support: SupportSet) -> np.ndarray:
    """Train (or load) the fusion head for one label, then propagate it through the volume."""
    from .ofl_adapters import load_for_run, save_after_run

    opts = ctx.options
    seed = label_seed(opts.seed, support.label)
    head = build_head(opts, seed, ctx.model.device)
    loaded = load_for_run(ctx, support, head)
    if loaded is not None and not (support.in_volume or support.external):
        bank, history = loaded, []  # adapter only: its stored bank is the support
    else:
        if not (support.in_volume or support.external):
            raise InputError(
                f"OFL-SAM2 needs support for label {support.name!r}: annotated slices in the volume, "
                "--reference volumes, or a trained --adapter."
            )
        bank = build_bank(ctx, support)
        epochs = opts.warm_start_epochs if loaded is not None else opts.epochs
        history = train(ctx, head, bank, epochs, support.name, seed)
    with torch.no_grad():
        masks, stats = propagate(ctx, head, bank, support.label, support.in_volume)
    stats["loss_history"] = history
    stats["seed"] = seed
    ctx.info[support.label] = stats
    save_after_run(ctx, support, head, bank, stats)
    return masks
