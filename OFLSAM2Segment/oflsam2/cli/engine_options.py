"""From parsed arguments to what a run needs: model and method settings, an adapter's settings, and the
server engine when ``--server`` names one."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError
from ..settings import MethodOptions
from .arguments import ofl_preset


def server_target(args):
    """The server named by ``--server``/``--token-file`` or their variables, else None (run here)."""
    from ..client import target_from_options

    if not hasattr(args, "server"):
        return None
    return target_from_options(args.server, args.token_file, args.server_ca)


def engine_for_args(args, settings):
    """A :class:`~oflsam2.remote_engine.RemoteEngine` when a server is named, else None (a local Engine)."""
    target = server_target(args)
    if target is None:
        return None
    from ..remote_engine import RemoteEngine

    return RemoteEngine(target, settings)


def closing_engine(engine):
    """Close a remote engine's session on the way out (a local one has nothing to close)."""
    import contextlib

    return contextlib.closing(engine) if engine is not None else contextlib.nullcontext()


def method_options(args):
    """:class:`~oflsam2.settings.MethodOptions` from the ``segment`` options (also used by ``batch``)."""
    return MethodOptions.preset(
        ofl_preset(args), epochs=args.epochs, gamma=args.gamma, num_retrieved=args.num_retrieved, top_k=args.top_k,
        revsam2_mode=args.revsam2_mode, seed=args.seed, adapter=args.adapter,
        save_adapter=getattr(args, "save_adapter", None), warm_start_epochs=args.warm_start_epochs,
    )


def model_settings(args):
    """:class:`~oflsam2.api.ModelSettings` from the model options; resolves the checkpoint
    now (raising :class:`CheckpointError` with what to do) unless random weights are asked for."""
    from ..api import ModelSettings, default_model
    from ..checkpoints import model_entry, resolve_checkpoint

    trained = adapter_settings(getattr(args, "adapter", None))
    name = args.model or trained.get("model") or default_model(getattr(args, "method", "ofl"))
    entry = model_entry(name)
    remote = server_target(args) is not None
    if remote and args.checkpoint:
        raise InputError("--checkpoint names a file on this computer, which a server cannot use: leave it out (the "
                         "server runs the models it has downloaded) and name the model with --model.")
    if args.random_weights:
        print(random_weights_banner(), file=sys.stderr)
    elif not remote:  # a server checks its own checkpoints
        resolve_checkpoint(name, args.checkpoint)
    return ModelSettings(
        model=name, checkpoint=args.checkpoint, random_weights=args.random_weights,
        device=args.device, image_size=args.image_size or trained.get("image_size") or entry["image_size"],
        deterministic=getattr(args, "deterministic", False),
    )


def adapter_settings(folder) -> dict:
    """The model and image size every adapter in ``folder`` was trained with (the defaults of a
    run that uses them); empty when there is no readable adapter there or they disagree."""
    from ..errors import AdapterError
    from ..ofl.adapter_metadata import list_adapters

    if folder is None or not Path(folder).is_dir():
        return {}

    try:
        adapters = list_adapters(folder)
    except AdapterError:
        return {}
    agreed = {}
    for key in ("model", "image_size"):
        values = {a.get(key) for a in adapters}
        if len(values) == 1 and None not in values:
            agreed[key] = values.pop()
    return agreed


def random_weights_banner() -> str:
    line = "!" * 78
    return (
        f"{line}\n!! RANDOM WEIGHTS: SAM2 is built untrained. Every mask and every score of this\n"
        f"!! run is MEANINGLESS; use it only to test the installation.\n{line}"
    )
