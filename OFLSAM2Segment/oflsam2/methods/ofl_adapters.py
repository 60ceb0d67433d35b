"""OFL-SAM2 adapters in a run: what is saved after training and how a saved one is used.

An adapter holds the trained head (λ, lift, AFM, and τ0 when it is not zero) and a support bank,
so that it segments new volumes with no support at all — the cohort batch path. The bank keeps
every support slice, or (``adapter_empty_slices``) every one that holds the object and that many
empty ones, evenly spread: image features and memory features in bf16, object pointers and
object scores in fp32, and the retrieval keys when they are pooled (flat keys are the normalised
features themselves and are recomputed). At 1024 px a slice costs about 2.5 MiB (2 MiB features
+ 0.5 MiB memory): 90 object slices and 16 empty ones from 3 volumes make about 265 MiB, every
slice of 3 Synapse volumes (about 450) about 1.1 GiB. The metadata records every option of the
run that trained it (``training.options``) and its preset (``training.ofl_preset``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..adapter_labels import require_adapter
from ..errors import AdapterError
from ..ofl.adapter import list_adapters, load_adapter, save_adapter
from ..ofl.adapter_metadata import check_trained_with
from ..settings import ofl_preset
from .base import RunContext, SupportSet
from .ofl_bank import Bank, retrieval_key

FEATURE_STRIDE = 16  # SAM2's image features F: one per 16x16 pixels of the model input
ADAPTER_EMPTY_SLICES = 16  # empty support slices kept as negatives (retrieval, learner)
_BANK_FIELDS = ("vision", "targets", "obj_ptr", "object_score")
_BF16_FIELDS = ("vision", "targets")  # the large ones; bf16 is what SAM2's own memory bank keeps


def adapter_slices(bank: Bank, empty_slices: int | None = None) -> np.ndarray:
    """Bank indices an adapter keeps: every slice, or every slice holding the object plus up to
    ``empty_slices`` empty ones evenly spread over the rest."""
    objects, empties = np.flatnonzero(bank.has_object), np.flatnonzero(~bank.has_object)
    if empty_slices is not None and empties.size > empty_slices:
        empties = empties[np.unique(np.linspace(0, empties.size - 1, empty_slices).round().astype(int))]
    return np.sort(np.concatenate([objects, empties]))


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
    """Load ``options.adapter`` for this label into ``head``; return its stored bank (or None).

    The label's adapter is found by :func:`oflsam2.adapter_labels.find_adapter` (the rule the
    checks before the run use); tensors that do not fit the head or the model are an
    :class:`AdapterError`."""
    folder = ctx.options.adapter
    if not folder:
        return None
    if Path(folder).is_file():  # one adapter's own file: it is the one
        chosen = {"path": str(folder)}
    else:
        chosen = require_adapter(list_adapters(folder), support.label, support.name, folder)
    tensors, metadata = load_adapter(chosen["path"], expected=expected_metadata(ctx))
    check_trained_with(metadata, ctx.options)
    device = ctx.model.device
    try:
        head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    except RuntimeError as error:  # missing, unexpected or mis-shaped head tensors
        raise AdapterError(f"Adapter {chosen['path']}: its head does not fit this engine's OFL-SAM2 head "
                           f"({str(error).strip().splitlines()[0]} ...). Train the adapter again.") from None
    head.to(device)
    _check_bank(chosen["path"], tensors, ctx.model.image_size // FEATURE_STRIDE)
    bank = {f: tensors[f"bank.{f}"].to(device, torch.float32) for f in _BANK_FIELDS}
    count = bank["vision"].shape[0]
    stored_keys = tensors.get("bank.keys") if ctx.options.retrieval == "pooled" else None
    return Bank(
        **bank,
        keys=stored_keys.to(device, torch.float32) if stored_keys is not None else retrieval_key(bank["vision"], ctx.options.retrieval),
        source=np.ones(count, dtype=int),
        index=np.arange(count),
    )


def _check_bank(path, tensors: dict, side: int) -> None:
    """Refuse a stored bank whose tensors are missing or not shaped as this model's features:
    P slices of F (P, C, side, side), memory features (P, M, side, side), pointers (P, C) and
    object scores (P, 1)."""
    missing = [f"bank.{f}" for f in _BANK_FIELDS if f"bank.{f}" not in tensors]
    if missing:
        raise AdapterError(f"Adapter {path} lacks the tensor(s) {', '.join(missing)}; it is damaged. Train it again.")
    vision, targets, pointers, scores = (tensors[f"bank.{f}"].shape for f in _BANK_FIELDS)
    count = vision[0] if len(vision) == 4 else -1
    expected = {
        "vision": len(vision) == 4 and count > 0 and tuple(vision[2:]) == (side, side),
        "targets": len(targets) == 4 and (targets[0], *targets[2:]) == (count, side, side),
        "obj_ptr": tuple(pointers) == (count, vision[1] if len(vision) == 4 else -1),
        "object_score": tuple(scores) == (count, 1),
    }
    keys = tensors.get("bank.keys")
    if keys is not None:
        expected["keys"] = keys.ndim == 2 and keys.shape[0] == count
    wrong = [f"bank.{name} {tuple(tensors[f'bank.{name}'].shape)}" for name, fits in expected.items() if not fits]
    if wrong:
        raise AdapterError(
            f"Adapter {path}: the stored support does not fit this model's {side}x{side} features ({', '.join(wrong)}); "
            "it is damaged or was made for another model. Train it again."
        )


def save_after_run(ctx: RunContext, support: SupportSet, head, bank, stats: dict) -> None:
    """Queue this label's adapter for ``options.save_adapter``; the engine writes it (atomically)
    only once every label of the run has succeeded, so a cancelled run leaves no adapter."""
    opts = ctx.options
    if not opts.save_adapter:
        return
    keep = torch.from_numpy(adapter_slices(bank, opts.adapter_empty_slices)).to(bank.vision.device)
    tensors = {f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
    for name in _BANK_FIELDS:
        value = getattr(bank, name)[keep].detach()
        tensors[f"bank.{name}"] = value.to(torch.bfloat16 if name in _BF16_FIELDS else torch.float32).cpu().contiguous()
    if opts.retrieval == "pooled":
        tensors["bank.keys"] = bank.keys[keep].detach().float().cpu().contiguous()
    metadata = dict(expected_metadata(ctx))
    metadata.update(
        label=support.label,
        label_name=support.name,
        intensity=ctx.intensity,  # what it was trained on: a run on other-looking volumes is warned
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
            "adapter_slices": int(keep.numel()),
            "adapter_object_slices": int(bank.has_object.sum()),
            "support_volumes": int(len(set(bank.source.tolist()))),
            "final_loss": (stats.get("loss_history") or [None])[-1],
            "ofl_preset": ofl_preset(opts),
            "options": {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("adapter", "save_adapter")},
        },
    )
    ctx.on_success.append(lambda: save_adapter(opts.save_adapter, tensors, metadata, staged=ctx.staged))
