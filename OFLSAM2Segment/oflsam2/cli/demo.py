"""``oflsam2 demo``: segment a bundled sample volume end to end."""

from __future__ import annotations

from pathlib import Path

from ..settings import MethodOptions
from .arguments import (
    add_method,
    add_method_options,
    add_model_options,
    ofl_preset,
)
from .engine_options import model_settings, random_weights_banner
from .progress_bars import progress_events


def add_demo(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="segment the bundled MNI152 brain template's white matter (works offline)",
        description=(
            "Segment the white matter of a 24-slice axial slab of the MNI152 T1 template (bundled with "
            "nilearn) from 3 annotated slices, write the inputs, the result and a PNG overlay, and print Dice."
        ),
    )
    parser.add_argument("--out", default="oflsam2-demo", help="output folder (default ./oflsam2-demo)")
    add_method(parser, "method")
    add_model_options(parser)
    add_method_options(parser, "epochs")
    parser.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .. import demo

    settings = model_settings(args)
    result = demo.run(Path(args.out), args.method, settings, MethodOptions.preset(ofl_preset(args), epochs=args.epochs), progress_events())
    for path in result["files"]:
        print(f"wrote {path}")
    print(f"Dice vs the MNI152 white-matter map (> {demo.WM_THRESHOLD}): {result['dice']:.3f} "
          f"(on the {result['unannotated_slices']} unannotated slices: {result['dice_unannotated']:.3f})")
    if settings.random_weights:
        print(random_weights_banner())
        print("!! The Dice above comes from an untrained network and means nothing.")
    return 0
