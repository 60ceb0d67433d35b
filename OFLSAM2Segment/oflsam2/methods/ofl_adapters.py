"""OFL-SAM2 adapters in a run: what is saved after training and how a saved one is used.

An adapter holds the trained head (λ, lift, AFM) and a compact support bank (image features,
memory features, object pointers of at most ``ADAPTER_BANK_SLICES`` support slices, evenly
chosen), so that it segments new volumes with no support at all — the cohort batch path.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ofl.adapter import load_adapter, save_adapter
from .base import RunContext, SupportSet

ADAPTER_BANK_SLICES = 32
_BANK_FIELDS = ("vision", "targets", "obj_ptr", "object_score")


def expected_metadata(ctx: RunContext) -> dict:
    """What a saved adapter must agree with to be used in this run."""
    model = ctx.model
    return {
        "model": model.name,
        "config": model.config,
        "checkpoint_sha256": model.weights_id,
        "image_size": model.image_size,
        "preset": ctx.preset,
        "axis": ctx.axis,
    }


def load_for_run(ctx: RunContext, support: SupportSet, head):
    """Load ``options.adapter`` for this label into ``head``; return its stored bank (or None)."""
    from .ofl import Bank, retrieval_key

    if not ctx.options.adapter:
        return None
    tensors, _ = load_adapter(ctx.options.adapter, label=support.name, expected=expected_metadata(ctx))
    device = ctx.model.device
    head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    head.to(device)
    bank = {f: tensors[f"bank.{f}"].to(device, torch.float32) for f in _BANK_FIELDS}
    count = bank["vision"].shape[0]
    return Bank(
        **bank,
        keys=retrieval_key(bank["vision"], ctx.options.retrieval),
        source=np.ones(count, dtype=int),
        index=np.arange(count),
    )


def save_after_run(ctx: RunContext, support: SupportSet, head, bank, stats: dict) -> None:
    """Queue this label's adapter for ``options.save_adapter``; the engine writes it (atomically)
    only once every label of the run has succeeded, so a cancelled run leaves no adapter."""
    opts = ctx.options
    if not opts.save_adapter:
        return
    keep = np.unique(np.linspace(0, len(bank) - 1, num=min(len(bank), ADAPTER_BANK_SLICES)).round().astype(int))
    keep = torch.from_numpy(keep).to(bank.vision.device)
    tensors = {f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
    tensors.update({f"bank.{f}": getattr(bank, f)[keep].detach().cpu().contiguous() for f in _BANK_FIELDS})
    metadata = dict(expected_metadata(ctx))
    metadata.update(
        label=support.label,
        label_name=support.name,
        training={
            "epochs": len(stats.get("loss_history", [])),
            "lr": opts.lr,
            "lr_milestones": list(opts.lr_milestones),
            "gamma": opts.gamma,
            "num_retrieved": opts.num_retrieved,
            "retrieval": opts.retrieval,
            "use_learner": opts.use_learner,
            "use_afm": opts.use_afm,
            "seed": opts.seed,
            "label_seed": stats.get("seed"),  # derived from seed and label: head init, episode order
            "support_slices": len(bank),
            "support_volumes": int(len(set(bank.source.tolist()))),
            "final_loss": (stats.get("loss_history") or [None])[-1],
        },
    )
    ctx.on_success.append(lambda: save_adapter(opts.save_adapter, tensors, metadata))
