"""``oflsam2 segment``: one volume from its annotated slices (or an adapter), with review outputs."""

from __future__ import annotations

import json
from pathlib import Path

from .arguments import (
    add_inputs,
    add_method,
    add_method_options,
    add_model_options,
    add_server_options,
    at_least,
)
from .engine_options import closing_engine, engine_for_args, method_options, model_settings, random_weights_banner
from .progress_bars import progress_events


def add_segment(commands) -> None:
    parser = commands.add_parser(
        "segment",
        help="segment a volume from annotated slices (or with a trained adapter)",
        description="Segment IMAGE from the annotated slices in LABELS and write the result.",
    )
    add_inputs(parser, support_required=False)
    parser.add_argument("--out", required=True, help="output label volume (.nii.gz, .nii, .nrrd, .mha)")
    parser.add_argument("--seg-nrrd", help="also write a Slicer segmentation file (.seg.nrrd)")
    add_method(parser, "segmentation method")
    add_model_options(parser)
    add_server_options(parser)
    parser.add_argument("--adapter", help="trained OFL-SAM2 adapter folder (segment without support, or warm start)")
    parser.add_argument("--save-adapter", help="write the trained OFL-SAM2 adapter into this folder")
    add_method_options(parser, "epochs", "gamma", "num_retrieved", "top_k", "revsam2_mode", "seed", "warm_start_epochs")
    review = parser.add_argument_group("review and correct")
    review.add_argument("--quality-out", metavar="CSV", help="write per-slice quality as label,slice,quality,source rows")
    review.add_argument("--suggest", type=at_least(0), metavar="N", help="print the N slices per label best worth annotating next")
    review.add_argument("--save-state", metavar="DIR", help="save what an update needs (settings, quality, OFL-SAM2 adapter) in DIR")
    review.add_argument(
        "--previous", metavar="PREV",
        help="update PREV (an output of a run with --save-state DIR) from the slices where --support differs from it",
    )
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.set_defaults(func=run_segment)


def run_segment(args) -> int:
    if args.previous or args.save_state or args.quality_out or args.suggest is not None:
        return _run_reviewed(args)
    summary = run_pipeline(args, args.method, Path(args.out), args.seg_nrrd, method_options(args))
    print_summary(summary, args.json)
    return 0


def _run_reviewed(args) -> int:
    """``segment`` with the review options (quality, suggestions, saved state, update)."""
    from ..run_state import describe, segment_reviewed

    settings = model_settings(args)
    engine = engine_for_args(args, settings)
    with closing_engine(engine):
        summary = segment_reviewed(
            image_path=args.image, support_path=args.support, out_path=Path(args.out), seg_nrrd_path=args.seg_nrrd,
            method=args.method, axis=args.axis, preset=args.preset, labels=args.labels, support_slices=args.support_slices,
            references=args.reference, settings=settings, options=method_options(args), events=progress_events(),
            previous_path=args.previous, state_dir=args.save_state, quality_out=args.quality_out,
            suggest_count=args.suggest, label_names=args.label_names, engine=engine,
        )
    if settings.random_weights:
        summary["warning"] = random_weights_banner()
    print_summary(summary, args.json)
    if not args.json:
        for line in describe(summary):
            print(line)
    return 0


def run_pipeline(args, method: str, out_path: Path, seg_nrrd, options) -> dict:
    """Check the checkpoint first (a missing one should not cost a volume read), then run."""
    from .. import pipeline

    settings = model_settings(args)
    engine = engine_for_args(args, settings)
    with closing_engine(engine):
        summary = pipeline.segment_files(
            args.image, args.support, out_path,
            labels=args.labels, support_slices=args.support_slices, method=method, axis=args.axis,
            preset=args.preset, settings=settings, options=options, references=args.reference,
            seg_nrrd_path=seg_nrrd, events=progress_events(), label_names=args.label_names, engine=engine,
        )
    if settings.random_weights:
        summary["warning"] = random_weights_banner()
    return summary


def json_summary(summary: dict) -> dict:
    """The summary as ``--json`` prints it: ``labels`` maps each label value to its name,
    annotated slices, voxel count and what the engine did for it (for ``ofl``: ``initial_fit``,
    ``retrieval_with_object``, ``accepted``, ``rejected``, ``gate_mean_w``, ...), so that
    ``labels.1.accepted`` reads one label's figures; ``engine.labels`` keeps the engine's own."""
    engine_labels = summary.get("engine", {}).get("labels", {})
    per_label = {}
    for value in summary["labels"]:
        entry = {
            "name": summary.get("label_names", {}).get(value),
            "slices": summary.get("slices", {}).get(value),
            "voxels": summary.get("voxels", {}).get(value),
        }
        entry.update(engine_labels.get(value, {}))
        per_label[str(value)] = entry
    return {**summary, "labels": per_label}


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(json_summary(summary), indent=2, default=str))
        return
    print(f"method {summary['method']} along the {summary['axis_name']} axis (array axis {summary['axis']}), preset {summary['preset']}")
    for label in summary["labels"]:
        name = summary["label_names"][label]
        slices = summary["slices"][label]
        print(f"  label {label} ({name}): {summary['voxels'][label]} voxels; annotated slices {slices}")
    for path in summary["outputs"]:
        print(f"wrote {path}")
    if "model" in summary.get("engine", {}):
        print(f"model {summary['engine']['model']}")
    if "ofl_preset" in summary.get("engine", {}):
        print(f"OFL-SAM2 preset {summary['engine']['ofl_preset']}")
    print(f"took {summary['timings']['total']:.1f} s")
    if "warning" in summary:
        print(summary["warning"])
