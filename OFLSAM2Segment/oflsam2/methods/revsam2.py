"""RevSAM2 (arXiv 2409.04298): segment a volume from a few support slices with a frozen SAM2.

1. Forward: every query slice is predicted on its own from the supports (conditioning memories,
   placed as if they preceded the query: FS-MedSAM2's one-support-video-per-query).
2. Reverse: each non-empty prediction becomes the only memory, and the supports are re-predicted
   from it; the mean support Dice scores the prediction.
3. The k best-scored slices keep their forward masks and condition plain SAM2 tracking through
   the query volume (the ``sam2`` method's propagation).

Method ``forward`` is stage 1 alone (the FS-MedSAM2 baseline). ``options.revsam2_mode`` selects
the paper's ablations: ``forward``, ``forward_fifo`` (supports plus a FIFO of query predictions,
tracked slice by slice) and ``random`` (k random slices instead of reverse scoring).

Queries are the target slices that were not annotated. Annotated slices of the target volume
count as supports and, being the user's own truth at a known position, also condition the final
tracking where they lie; ``options.include_supports_in_propagation`` adds the supports from
reference volumes to that tracking as well.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..driver import Memory, TrackedVolume
from ..errors import InputError
from ..events import check_cancel
from ..features import Backbone
from .base import RunContext, SupportSet, SupportSlice
from .sam2_propagation import propagate
from .sweep import tracking_quality

MODES = ("full", "forward", "forward_fifo", "random")
SAMPLINGS = ("even", "random")


@dataclass
class SupportBank:
    """N_s support slices as SAM2 sees them.

    backbone: their features as one batch of N_s (support order); memories: N_s conditioning
    memories of batch 1 (features (1, 64, S/16, S/16), bf16 as SAM2 stores them); masks: the
    ground truth Y_j, (H_j, W_j) bool at each support's own slice size.
    """

    backbone: Backbone
    memories: list[Memory]
    masks: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.memories)


def check_options(options) -> None:
    if options.revsam2_mode not in MODES:
        raise InputError(f"Unknown RevSAM2 mode {options.revsam2_mode!r}; choose one of: {', '.join(MODES)}.")
    if options.top_k < 1:
        raise InputError(f"RevSAM2 top-k must be at least 1 (the paper uses 3); got {options.top_k}.")
    if options.max_supports is not None and options.max_supports < 1:
        raise InputError(f"The number of RevSAM2 supports must be at least 1 (or unlimited); got {options.max_supports}.")
    if options.support_sampling not in SAMPLINGS:
        raise InputError(f"Unknown support sampling {options.support_sampling!r}; choose one of: {', '.join(SAMPLINGS)}.")
    if options.forward_batch_size < 1:
        raise InputError(f"The forward batch size must be at least 1; got {options.forward_batch_size}.")


def choose_supports(ctx: RunContext, support: SupportSet) -> tuple[list[SupportSlice], list[SupportSlice]]:
    """The non-empty annotated slices used as supports, at most ``options.max_supports``:
    (slices of the target volume, slices of reference volumes).

    Slices of the target volume come first (same patient); the rest is filled from the
    reference volumes, evenly spread over them or drawn by ``options.seed``.
    """
    options = ctx.options
    own = [SupportSlice(ctx.target, i, mask) for i, mask in sorted(support.in_volume.items()) if mask.any()]
    external = [s for s in support.external if s.mask.any()]
    if not own and not external:
        raise InputError(
            f"RevSAM2 needs at least one support slice that contains label {support.name!r}: annotate it "
            "on a slice of the volume or give --reference volumes where it is present."
        )
    limit = options.max_supports or len(own) + len(external)
    if len(own) >= limit:
        return _subsample(own, limit, options), []
    return own, _subsample(external, limit - len(own), options)


def _subsample(slices: list, count: int, options) -> list:
    if len(slices) <= count:
        return slices
    if options.support_sampling == "random":
        keep = np.sort(np.random.default_rng(options.seed).choice(len(slices), size=count, replace=False))
    else:
        keep = np.unique(np.linspace(0, len(slices) - 1, num=count).round().astype(int))
    return [slices[i] for i in keep]


def encode_supports(ctx: RunContext, slices: list[SupportSlice]) -> SupportBank:
    """Features and conditioning memories (mask as output, binarised) of the supports, batched
    per source volume."""
    driver = ctx.driver
    backbones, memories = [], []
    for source, group in itertools.groupby(slices, key=lambda s: s.source):
        group = list(group)
        indices = [s.index for s in group]
        source.encode(indices, events=ctx.events)
        backbone = source.backbone(indices)
        _, memory = driver.condition_on_mask(backbone, driver.mask_to_model(np.stack([s.mask for s in group])))
        backbones.append(backbone)
        memories += [
            Memory(memory.features[j : j + 1], memory.obj_ptr[j : j + 1], memory.object_score[j : j + 1])
            for j in range(len(group))
        ]
    joined = Backbone(*(torch.cat(level) for level in zip(*((b.fpn0, b.fpn1, b.vision) for b in backbones))))
    return SupportBank(joined, memories, [s.mask for s in slices])


def forward_predictions(
    ctx: RunContext, bank: SupportBank, queries: list[int], label: int, final: bool, qualities: dict | None = None
) -> dict[int, np.ndarray]:
    """Stage 1: each query slice from the supports alone -> {index: (H, W) bool}.

    The bank is FS-MedSAM2's video [S_0 .. S_{N_s-1}, Q]: every support a conditioning memory,
    its pointer at distance N_s - j, and N_s + 1 frames. Query slices never see each other, so
    they are batched. ``final``: report each slice as done (the ``forward`` baseline), with its
    quality. ``qualities``: filled with each slice's quality (:func:`tracking_quality`).
    """
    driver, n_s = ctx.driver, len(bank)
    spatial = [(0, memory) for memory in bank.memories]
    pointers = [(n_s - j, memory.obj_ptr) for j, memory in enumerate(bank.memories)]
    batch = ctx.options.forward_batch_size
    predictions = {}
    for start in range(0, len(queries), batch):
        check_cancel(ctx.events)
        last = min(start + batch, len(queries))
        ctx.events.progress("forward", start, len(queries), f"query slices {start + 1}-{last} of {len(queries)}")
        indices = queries[start : start + batch]
        backbone = ctx.target.backbone(indices)
        prediction = driver.decode(driver.attend(backbone, spatial, pointers, n_s + 1), backbone)
        for row, (index, mask) in enumerate(zip(indices, driver.to_slice_masks(prediction.low_res, ctx.slice_shape))):
            predictions[index] = mask
            quality = tracking_quality(prediction, row)
            if qualities is not None:
                qualities[index] = quality
            if final:
                ctx.record_quality(label, index, quality)
                ctx.emit(label, index, mask)
    ctx.events.progress("forward", len(queries), len(queries), "forward propagation done")
    return predictions


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks; 0 when both are empty (supports never are)."""
    total = int(prediction.sum()) + int(truth.sum())
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total if total else 0.0


def reverse_scores(ctx: RunContext, bank: SupportBank, predictions: dict[int, np.ndarray]) -> dict[int, float]:
    """Stage 2: s_i = mean_j Dice(support j re-predicted from (Q_i, P_i), Y_j); 0 for empty P_i.

    The bank is a two-frame video [Q_i, S_j]: one conditioning memory from the binarised P_i,
    pointer distance 1; the N_s supports form one batch.
    """
    driver = ctx.driver
    scores = {}
    for done, (index, mask) in enumerate(predictions.items()):
        check_cancel(ctx.events)
        ctx.events.progress("reverse", done, len(predictions), f"scoring query slice {done + 1}/{len(predictions)}")
        if not mask.any():
            scores[index] = 0.0
            continue
        _, memory = driver.condition_on_mask(ctx.target.backbone([index]), driver.mask_to_model(mask[None]))
        rebuilt = driver.decode(driver.attend(bank.backbone, [(0, memory)], [(1, memory.obj_ptr)], 2), bank.backbone)
        support_dice = [
            dice(driver.to_slice_masks(rebuilt.low_res[j : j + 1], truth.shape)[0], truth)
            for j, truth in enumerate(bank.masks)
        ]
        scores[index] = float(np.mean(support_dice))
    ctx.events.progress("reverse", len(predictions), len(predictions), "reverse propagation done")
    return scores


def select_top_k(scores: dict[int, float], candidates: list[int], k: int) -> list[int]:
    """Stage 3: the k candidates with the highest score, the lower index first on ties (sorted)."""
    return sorted(sorted(candidates, key=lambda i: (-scores[i], i))[:k])


def select_random(candidates: list[int], k: int, seed: int) -> list[int]:
    """The ``random`` ablation: k candidates drawn by ``seed`` (sorted)."""
    if len(candidates) <= k:
        return sorted(candidates)
    return sorted(int(i) for i in np.random.default_rng(seed).choice(candidates, size=k, replace=False))


def forward_with_fifo(ctx: RunContext, bank: SupportBank, queries: list[int], label: int) -> np.ndarray:
    """The ``forward_fifo`` ablation (FS-MedSAM2's volume mode): the video [supports, query
    slices 0 .. N-1] tracked in order, supports as conditioning frames and a FIFO of the query
    predictions; annotated target slices are skipped (a gap in the FIFO)."""
    driver, n_s = ctx.driver, len(bank)
    num_frames = n_s + ctx.num_slices
    out = np.zeros((ctx.num_slices,) + ctx.slice_shape, dtype=bool)
    track = TrackedVolume(ctx.model.net, num_frames, ctx.options.num_maskmem)
    track.cond = dict(enumerate(bank.memories))
    for done, index in enumerate(queries):
        check_cancel(ctx.events)
        ctx.events.progress("forward", done, len(queries), f"slice {done + 1}/{len(queries)} with query memory")
        backbone = ctx.target.backbone([index])
        spatial, pointers = track.bank(n_s + index, reverse=False)
        prediction, track.tracked[n_s + index] = driver.track(backbone, spatial, pointers, num_frames)
        out[index] = driver.to_slice_masks(prediction.low_res, ctx.slice_shape)[0]
        ctx.record_quality(label, index, tracking_quality(prediction))
        ctx.emit(label, index, out[index])
    ctx.events.progress("forward", len(queries), len(queries), "forward propagation done")
    return out


def segment(ctx: RunContext, support: SupportSet, mode: str) -> np.ndarray:
    """One label through the stages of ``mode`` -> (N, H, W) bool; statistics in ``ctx.info``."""
    options = ctx.options
    check_options(options)
    label = support.label
    queries = [i for i in range(ctx.num_slices) if i not in support.in_volume]
    seconds: dict[str, float] = {}
    info = {"mode": mode, "seconds": seconds}
    ctx.info[label] = info
    if ctx.previous is not None:
        return update(ctx, support, mode, info)

    started = time.perf_counter()
    own, external = choose_supports(ctx, support)
    bank = encode_supports(ctx, own + external)
    info["supports"] = len(bank)
    seconds["supports"] = time.perf_counter() - started

    started = time.perf_counter()
    if mode == "forward_fifo":
        out = forward_with_fifo(ctx, bank, queries, label)
        seconds["forward"] = time.perf_counter() - started
        return out
    forward_quality: dict[int, dict] = {}
    predictions = forward_predictions(ctx, bank, queries, label, final=mode == "forward", qualities=forward_quality)
    seconds["forward"] = time.perf_counter() - started
    if mode == "forward":
        out = np.zeros((ctx.num_slices,) + ctx.slice_shape, dtype=bool)
        for index, mask in predictions.items():
            out[index] = mask
        return out

    candidates = [i for i, mask in predictions.items() if mask.any()]
    if mode == "random":
        selected = select_random(candidates, options.top_k, options.seed)
    else:
        started = time.perf_counter()
        info["scores"] = reverse_scores(ctx, bank, predictions)
        seconds["reverse"] = time.perf_counter() - started
        selected = select_top_k(info["scores"], candidates, options.top_k)
    info["selected"] = selected
    if not selected:
        ctx.events.progress("propagating", 1, 1, f"{support.name}: no query slice was predicted to contain it; the result is empty")
        empty = np.zeros((ctx.num_slices,) + ctx.slice_shape, dtype=bool)
        for index in queries:
            ctx.emit(label, index, empty[index])
        return empty

    check_cancel(ctx.events)
    for index in selected:  # final already: they keep their forward masks
        forward = forward_quality[index]
        if "scores" in info:  # the reverse score is what chose it
            quality = {"quality": info["scores"][index], "source": "reverse", "reverse": info["scores"][index]}
            ctx.record_quality(label, index, quality | {"iou": forward["iou"], "presence": forward["presence"]})
        else:
            ctx.record_quality(label, index, forward)
        ctx.emit(label, index, predictions[index])
    given = {i: predictions[i] for i in selected} | support.in_volume
    extra = bank.memories[len(own) :] if options.include_supports_in_propagation else []
    started = time.perf_counter()
    out = propagate(ctx, label, given, extra_conditioning=extra)
    seconds["propagating"] = time.perf_counter() - started
    for index in selected:
        out[index] = predictions[index]
    return out


def update(ctx: RunContext, support: SupportSet, mode: str, info: dict) -> np.ndarray:
    """Re-propagate after a correction (``ctx.previous``), outward from the edited slices.

    ``full`` and ``random``: the previous run's selected slices keep their masks and condition
    the tracking again, with every annotated slice, edited ones included; the forward and
    reverse stages are not re-run. ``forward``: the edited slices join the supports and the
    slices around them are predicted again. ``forward_fifo`` cannot be updated (every slice
    depends on all the slices before it).
    """
    label = support.label
    if mode == "forward_fifo":
        raise InputError(
            "An update is not available for RevSAM2 mode forward_fifo (each slice depends on every slice "
            "before it); run a fresh segmentation without a previous result."
        )
    if mode == "forward" or ctx.options.include_supports_in_propagation:
        own, external = choose_supports(ctx, support)
        bank = encode_supports(ctx, own + external)
        info["supports"] = len(bank)
    if mode == "forward":
        out = np.zeros((ctx.num_slices,) + ctx.slice_shape, dtype=bool)
        sweep = ctx.sweep(label, support.in_volume)
        for index, _ in sweep:
            out[index] = forward_predictions(ctx, bank, [index], label, final=True)[index]
            sweep.done(index, out[index])
        return out
    selected = [i for i in ctx.previous.selected.get(label, []) if i not in support.in_volume]
    info["selected"] = selected
    given = {i: ctx.previous.masks[label][i] for i in selected} | support.in_volume
    extra = bank.memories[len(own) :] if ctx.options.include_supports_in_propagation else []
    return propagate(ctx, label, given, extra_conditioning=extra)


@torch.no_grad()
def run(ctx: RunContext, support: SupportSet) -> np.ndarray:
    """Method ``revsam2`` (stages per ``options.revsam2_mode``)."""
    return segment(ctx, support, ctx.options.revsam2_mode)


@torch.no_grad()
def run_forward(ctx: RunContext, support: SupportSet) -> np.ndarray:
    """Method ``forward``: the forward stage alone, every query slice final as it comes."""
    return segment(ctx, support, "forward")
