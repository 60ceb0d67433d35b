"""Method ``sam2``: the annotated slices become mask prompts and SAM2 tracks outward through the
volume, forward from the first annotated slice to the end, then backward to the start — what
``SAM2VideoPredictor.propagate_in_video`` does with ``reverse=False`` then ``reverse=True``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..driver import Memory, TrackedVolume
from ..errors import InputError
from ..events import check_cancel
from .base import RunContext, SupportSet
from .sweep import tracking_quality


def propagate(
    ctx: RunContext,
    label: int,
    given: dict[int, np.ndarray],
    stage: str = "propagating",
    extra_conditioning: Sequence[Memory] = (),
) -> np.ndarray:
    """Track one object from the given slices (index -> (H, W) bool) -> (N, H, W) bool.

    Given slices keep the mask SAM2 makes of them (their prompt, resized twice); callers that
    must return the user's own annotation copy it over afterwards. ``extra_conditioning``:
    memories of slices from other volumes added to every bank (see :class:`TrackedVolume`); none
    in SAM2. The slices visited are :meth:`RunContext.sweep`'s (every other one in a full run),
    each with its quality recorded.
    """
    driver, cache, n = ctx.driver, ctx.target, ctx.num_slices
    shape = ctx.slice_shape
    out = np.zeros((n,) + shape, dtype=bool)
    track = TrackedVolume(ctx.model.net, n, ctx.options.num_maskmem)
    track.extra = list(extra_conditioning)
    for index in sorted(given):
        backbone = cache.backbone([index])
        prediction, memory = driver.condition_on_mask(backbone, driver.mask_to_model(given[index][None]))
        track.cond[index] = memory
        out[index] = driver.to_slice_masks(prediction.low_res, shape)[0]
    sweep = ctx.sweep(label, given)
    for done, (index, step) in enumerate(sweep):
        ctx.events.progress(stage, min(done, sweep.bound), sweep.bound, f"slice {done + 1}/{sweep.bound}")
        check_cancel(ctx.events)  # after reporting: a cancel asked for now stops here
        backbone = cache.backbone([index])
        spatial, pointers = track.bank(index, reverse=step < 0)
        prediction, memory = ctx.driver.track(backbone, spatial, pointers, n)
        track.tracked[index] = memory
        out[index] = driver.to_slice_masks(prediction.low_res, shape)[0]
        sweep.done(index, out[index])
        ctx.record_quality(label, index, tracking_quality(prediction))
        ctx.emit(label, index, out[index])
    ctx.events.progress(stage, sweep.bound, sweep.bound, "done")
    return out


@torch.no_grad()
def run(ctx: RunContext, support: SupportSet) -> np.ndarray:
    if not support.in_volume:
        raise InputError(
            f"SAM2 propagation of label {support.name!r} needs annotated slices in the volume itself; "
            "annotate at least one slice, or use --method ofl / revsam2 with --reference volumes."
        )
    return propagate(ctx, support.label, support.in_volume)
