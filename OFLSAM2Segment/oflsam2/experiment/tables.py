"""Result tables: mean ± std over support groups, written as CSV, Markdown and a Dice box plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..evaluation import SUMMARY_METRICS, mean_std, summarize, summary_markdown, write_csv
from ..metrics import METRIC_LIBRARIES, METRIC_NAMES
from .config import ExperimentConfig

CASE_COLUMNS = (
    "group", "method", "case", "label", "name", *METRIC_NAMES, "pred_empty", "ref_empty", "tp", "pred_voxels", "ref_voxels", "seconds"
)
RESULT_KEYS = ("method", "label", "name", "groups", "cases")


@dataclass
class ExperimentOutcome:
    rows: list[dict]  # every per-case row (CASE_COLUMNS)
    results: list[dict]  # mean ± std over groups (RESULT_KEYS + <metric>_mean/_std)
    computed: int  # cases run now
    skipped: int  # cases found finished
    files: dict[str, Path] = field(default_factory=dict)


def summarize_groups(rows: list[dict], config: ExperimentConfig) -> list[dict]:
    """Mean ± std over groups of the per-group mean over query cases, per method and label.

    Each method ends with a ``label = "mean"`` row: per group the mean over labels, then mean ±
    std over groups. Columns: :data:`RESULT_KEYS`, ``<metric>_mean``, ``<metric>_std``.
    """
    results = []
    for run in config.methods:
        chosen = [r for r in rows if r["method"] == run.name]
        if not chosen:
            continue
        groups = sorted({r["group"] for r in chosen})
        per_group = [{e["label"]: e for e in summarize([r for r in chosen if r["group"] == g])} for g in groups]
        for label in [*config.labels, "mean"]:
            entries = [p[label] for p in per_group if label in p]
            counted = [r for r in chosen if label == "mean" or r["label"] == label]
            entry = {
                "method": run.name,
                "label": label,
                "name": config.labels.get(label, "mean over labels"),
                "groups": len(entries),
                "cases": len({(r["group"], r["case"]) for r in counted}),
            }
            for metric in SUMMARY_METRICS:
                entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean_std([e[f"{metric}_mean"] for e in entries])
            results.append(entry)
    return results


def write_tables(config: ExperimentConfig, rows: list[dict], out_dir: Path, computed: int, skipped: int) -> ExperimentOutcome:
    """Write cases.csv, results.csv, results.md and the Dice box plot into ``out_dir``."""
    from ..report import write_dice_boxplot

    results = summarize_groups(rows, config)
    files = {
        "cases": write_csv(rows, out_dir / "cases.csv", CASE_COLUMNS),
        "results": write_csv(
            results, out_dir / "results.csv", [*RESULT_KEYS, *(f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std"))]
        ),
    }
    markdown = out_dir / "results.md"
    markdown.write_text(results_markdown(config, results))
    files["markdown"] = markdown
    per_case: dict[str, list[float]] = {}
    for run in config.methods:
        keys = sorted({(r["group"], r["case"]) for r in rows if r["method"] == run.name})
        per_case[run.name] = [
            float(np.nanmean([r["dice"] for r in rows if r["method"] == run.name and (r["group"], r["case"]) == k] or [math.nan]))
            for k in keys
        ]
    if any(per_case.values()):
        files["boxplot"] = write_dice_boxplot(
            out_dir / "dice_boxplot.png", per_case, title=f"{config.name}: Dice per query case (mean over labels)"
        )
    return ExperimentOutcome(rows, results, computed, skipped, files)


def results_markdown(config: ExperimentConfig, results: list[dict]) -> str:
    """The results table with a header saying how it was made."""
    protocol = config.support
    volumes = protocol.volumes if isinstance(protocol.volumes, int) else f"{len(protocol.volumes)} fixed ({', '.join(protocol.volumes)})"
    if protocol.mode == "slices":
        draw = f"{protocol.slices_per_label} planes per label from {volumes} support volume(s)"
    else:
        draw = f"every plane of {volumes} support volume(s)"
    annotated = [
        f"- {r.name}: also given {r.annotate_query} annotated plane(s) per label of the query itself (kept in its output)"
        for r in config.methods if r.annotate_query
    ]
    weights = "RANDOM WEIGHTS (smoke test, meaningless scores)" if config.model.random_weights else "pretrained weights"
    return "\n".join(
        [
            f"# {config.name}",
            "",
            f"- config: `{config.path.name}`; support: {draw}, {protocol.groups} group(s), seed {protocol.seed}",
            f"- model: {config.model.model}, image size {config.model.image_size}, {weights}; axis {config.axis}, preset {config.preset}",
            f"- metrics: {METRIC_LIBRARIES}; NSD tolerance {config.nsd_tolerance_mm:g} mm; empty-vs-empty: {config.both_empty}",
            "- each cell: mean ± std over groups of the mean over query cases; HD95 vox is the SAMed/OFL-SAM2 headline HD",
            *annotated,
            "",
            summary_markdown(results, RESULT_KEYS[:3]),
            "",
        ]
    )
