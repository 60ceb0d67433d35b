"""``oflsam2 train``: train an OFL-SAM2 adapter on annotated slices and save it to a folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError
from ..settings import MethodOptions
from .arguments import (
    add_inputs,
    add_method_options,
    add_model_options,
    add_server_options,
    ofl_preset,
)
from .segment import print_summary, run_pipeline

TRAINING_SEGMENTATION = "training_segmentation.nii.gz"


def add_train(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="train an OFL-SAM2 adapter on annotated slices",
        description=(
            "Train an OFL-SAM2 adapter on the annotated slices of IMAGE and save it in --out. "
            f"Training on a volume also segments it: the result is written to OUT/{TRAINING_SEGMENTATION}."
        ),
    )
    add_inputs(parser, support_required=True)
    parser.add_argument("--out", required=True, help="adapter folder to write (created if absent)")
    add_model_options(parser)
    add_server_options(parser)
    parser.add_argument("--adapter", help="adapter folder to start from (warm start)")
    add_method_options(parser, "epochs", "gamma", "num_retrieved", "seed")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.set_defaults(func=run_train)


def run_train(args) -> int:
    from ..pipeline import check_folder_writable, refuse_inputs_as_output

    adapter_dir = Path(args.out)
    check_folder_writable(adapter_dir, "--out")
    inputs = [args.image, args.support, *(p for pair in args.reference for p in pair)]
    for output in (adapter_dir, adapter_dir / TRAINING_SEGMENTATION):
        refuse_inputs_as_output(output, inputs)
    options = MethodOptions.preset(
        ofl_preset(args), epochs=args.epochs, gamma=args.gamma, num_retrieved=args.num_retrieved, seed=args.seed,
        adapter=args.adapter, save_adapter=str(adapter_dir),
    )
    created = create_folder(adapter_dir)
    try:
        summary = run_pipeline(args, "ofl", adapter_dir / TRAINING_SEGMENTATION, None, options)
    except BaseException:
        if created:  # a failed or interrupted run leaves no empty adapter folder behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    summary["adapter"] = str(adapter_dir)
    print_summary(summary, args.json)
    if not args.json:
        print(f"adapter saved in {adapter_dir}")
    return 0


def create_folder(folder: Path) -> Path | None:
    """Create ``folder`` (and missing parents); return the topmost folder created, if any."""
    if folder.is_dir():
        return None
    top = folder
    while not top.parent.exists():
        top = top.parent
    try:
        folder.mkdir(parents=True)
    except OSError as error:
        raise InputError(f"Cannot create the folder {folder}: {error.strerror or error}.") from None
    return top
