"""Comparing predicted label maps with reference label maps: ``oflsam2 eval``.

A pair of files or two folders (files matched by case name) are read with SimpleITK, checked to
lie on the same grid, and scored per label with :mod:`oflsam2.metrics`. Results are rows
(``case``, ``label``, the metrics, emptiness flags and voxel counts) that can be summarised per
label, written as CSV and printed as a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OFLSAM2Error
from .metrics import METRIC_LIBRARIES, METRIC_NAMES, case_metrics, pooled_dice
from .outputs import apply_destination_mode, same_file
from .volume import MAX_DISTINCT_LABELS, check_nifti_file

LABEL_FILE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Words that name a file's role rather than its case; stripped (with a separator) from both
# sides before matching, so ``case7_pred.nii.gz`` meets ``case7_gt.nrrd``.
ROLE_WORDS = ("pred", "prediction", "seg", "segmentation", "label", "labels", "labelmap", "gt", "ref", "mask")
_ROLE_SUFFIX = re.compile(rf"[_.-]({'|'.join(ROLE_WORDS)})$", re.IGNORECASE)
_ROLE_PREFIX = re.compile(rf"^({'|'.join(ROLE_WORDS)})[_.-]", re.IGNORECASE)

ROW_COLUMNS = ("case", "label", *METRIC_NAMES, "pred_empty", "ref_empty", "tp", "pred_voxels", "ref_voxels")
SUMMARY_METRICS = (*METRIC_NAMES, "pooled_dice")
_TEXT_COLUMNS = {"case", "name", "method"}
_INT_COLUMNS = {"label", "tp", "pred_voxels", "ref_voxels", "group", "cases", "groups"}
_BOOL_COLUMNS = {"pred_empty", "ref_empty"}
# Relative tolerance on spacing, origin (in voxels) and direction when comparing grids.
_GRID_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# Reading and matching


def case_name(path) -> str:
    """The case a label file belongs to: its name without extension and role words.

    ``label_1.nii.gz`` -> ``1``; ``case0001_pred.seg.nrrd`` -> ``case0001``. A name made only of
    a role word (``label.nii.gz``) is kept as it is.
    """
    name = Path(path).name
    lowered = name.lower()
    stem = next((name[: -len(s)] for s in LABEL_FILE_SUFFIXES if lowered.endswith(s)), Path(name).stem)
    while True:
        stripped = _ROLE_PREFIX.sub("", _ROLE_SUFFIX.sub("", stem))
        if stripped == stem or not stripped:
            return stem
        stem = stripped


def read_label_map(path) -> tuple[np.ndarray, sitk.Image]:
    """A label file as an unsigned int ``(z, y, x)`` array (smallest fitting type) and its image.

    Float label maps holding whole numbers (CHAOS stores float64) are rounded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The label file {path} does not exist.")
    if not os.access(path, os.R_OK):
        raise InputError(f"The label file {path} cannot be read: permission denied.")
    check_nifti_file(path, "label file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"Cannot read {path} as a label map: {str(error).strip().splitlines()[-1]}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path} is not a 3-D single-layer label map ({image.GetDimension()}-D, "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)); export it as a labelmap volume."
        )
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        rounded = np.rint(array)
        if not np.isfinite(array).all() or np.abs(array - rounded).max(initial=0) > 1e-3:
            raise InputError(f"{path} holds non-integer values: it looks like an image, not a label map.")
        array = rounded
    if array.size and array.min() < 0:
        raise InputError(f"{path} holds negative values; label values must be 0 (background) or positive.")
    distinct = len(np.unique(array[::2, ::2, ::2]))  # a subsample: enough to tell, and fast
    if distinct > MAX_DISTINCT_LABELS:
        raise InputError(
            f"{path} has more than {distinct} distinct values: it looks like an intensity image, not a label map "
            f"(at most {MAX_DISTINCT_LABELS} labels are supported). Give the segmentation, not the image."
        )
    high = int(array.max(initial=0))
    return array.astype(np.uint8 if high <= 255 else np.uint16 if high <= 65535 else np.uint32), image


def check_same_grid(a, b, a_path, b_path, roles: tuple[str, str] = ("prediction", "reference")) -> None:
    """Raise :class:`InputError` with both grids' figures unless ``a`` and ``b`` coincide.

    ``a`` and ``b`` are ``sitk.Image`` or ``sitk.ImageFileReader`` (after
    ``ReadImageInformation``): anything with ``GetSize``/``GetSpacing``/``GetOrigin``/``GetDirection``.
    """
    spacing = np.array(b.GetSpacing())
    same = (
        tuple(a.GetSize()) == tuple(b.GetSize())
        and np.allclose(a.GetSpacing(), spacing, rtol=_GRID_TOLERANCE, atol=0)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=_GRID_TOLERANCE * spacing.max() * 10)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=_GRID_TOLERANCE)
    )
    if not same:
        width = max(len(r) for r in roles)
        raise InputError(
            f"The {roles[0]} and the {roles[1]} lie on different grids; resample the {roles[0]} onto the "
            f"{roles[1]}'s grid first.\n  {roles[0]:<{width}} {a_path}: {_grid_text(a)}"
            f"\n  {roles[1]:<{width}} {b_path}: {_grid_text(b)}"
        )


def match_folders(pred_dir, ref_dir) -> tuple[list[tuple[str, Path, Path]], list[Path]]:
    """Pair the label files of two folders by :func:`case_name`.

    Returns ``(pairs, unmatched)``: ``(case, pred_path, ref_path)`` sorted by case, and the files
    of either folder that found no partner.
    """
    preds, refs = _files_by_case(Path(pred_dir)), _files_by_case(Path(ref_dir))
    pairs = [(case_name(refs[key]), preds[key], refs[key]) for key in sorted(preds.keys() & refs.keys(), key=natural_key)]
    unmatched = sorted([preds[c] for c in preds.keys() - refs.keys()] + [refs[c] for c in refs.keys() - preds.keys()])
    return pairs, unmatched


# ---------------------------------------------------------------------------------------------
# Evaluating


def evaluate_masks(
    case: str,
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int],
    *,
    nsd_tolerance_mm: float = 1.0,
    both_empty: str = "one",
) -> list[dict]:
    """Rows of :data:`ROW_COLUMNS` for int label maps ``pred`` and ``ref`` ``(z, y, x)``."""
    rows = []
    for label in labels:
        metrics = case_metrics(
            pred == label, ref == label, spacing, nsd_tolerance_mm=nsd_tolerance_mm, both_empty=both_empty
        )
        rows.append({"case": case, "label": int(label), **metrics})
    return rows


def evaluate_pair(
    pred_path, ref_path, labels=None, nsd_tolerance_mm: float = 1.0, *, both_empty: str = "one", case: str | None = None
) -> list[dict]:
    """Score one predicted label file against its reference; one row per label.

    ``labels`` defaults to the non-zero labels present in the reference. Raises
    :class:`InputError` when the files cannot be read or lie on different grids.
    """
    ref, ref_image = read_label_map(ref_path)
    pred, pred_image = read_label_map(pred_path)
    check_same_grid(pred_image, ref_image, pred_path, ref_path)
    chosen = present_labels([ref]) if labels is None else _check_labels(labels)
    spacing = ref_image.GetSpacing()[::-1]
    return evaluate_masks(
        case or case_name(ref_path), pred, ref, spacing, chosen, nsd_tolerance_mm=nsd_tolerance_mm, both_empty=both_empty
    )


def evaluate_folders(
    pred_dir, ref_dir, labels=None, nsd_tolerance_mm: float = 1.0, *, both_empty: str = "one"
) -> tuple[list[dict], list[Path]]:
    """Score every matched pair of two folders; returns ``(rows, unmatched files)``.

    ``labels`` defaults to the union of the labels present in all reference files, so every case
    is scored on the same labels (a label missing from a case counts as an empty reference).
    """
    pairs, unmatched = match_folders(pred_dir, ref_dir)
    if not pairs:
        raise InputError(
            f"No file of {pred_dir} matches a file of {ref_dir} by case name "
            f"(names are compared without extension and the words {', '.join(ROLE_WORDS)})."
        )
    if labels is None:
        labels = present_labels(read_label_map(ref)[0] for _, _, ref in pairs)
    rows = []
    for case, pred, ref in pairs:
        rows += evaluate_pair(pred, ref, labels, nsd_tolerance_mm, both_empty=both_empty, case=case)
    return rows, unmatched


def present_labels(label_maps: Iterable[np.ndarray]) -> list[int]:
    """Sorted non-zero values found in any of ``label_maps``."""
    found: set[int] = set()
    for array in label_maps:
        found.update(int(v) for v in np.unique(array))
    found.discard(0)
    if not found:
        raise InputError("The reference label maps are empty: give the labels to score with --labels.")
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Tables


def summarize(rows: Sequence[dict], metrics: Sequence[str] = SUMMARY_METRICS) -> list[dict]:
    """Per label: ``cases`` and ``<metric>_mean`` / ``<metric>_std`` over cases, then a row with
    ``label = "mean"`` holding the mean of the per-label means (std across labels).

    NaN values (a metric undefined for a case) are left out of each mean; ``pooled_dice`` sums
    the voxel counts over cases instead.
    """
    table = []
    for label in sorted({r["label"] for r in rows}):
        chosen = [r for r in rows if r["label"] == label]
        entry = {"label": label, "cases": len(chosen)}
        for metric in metrics:
            values = (
                [pooled_dice(*(sum(r[k] for r in chosen) for k in ("tp", "pred_voxels", "ref_voxels")))]
                if metric == "pooled_dice"
                else [r[metric] for r in chosen]
            )
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean_std(values)
        table.append(entry)
    if table:
        overall = {"label": "mean", "cases": len({r["case"] for r in rows})}
        for metric in metrics:
            overall[f"{metric}_mean"], overall[f"{metric}_std"] = mean_std([e[f"{metric}_mean"] for e in table])
        table.append(overall)
    return table


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and population standard deviation of ``values``, NaN left out (NaN if none is left)."""
    kept = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if kept.size == 0:
        return math.nan, math.nan
    return float(kept.mean()), float(kept.std())


def write_csv(rows: Sequence[dict], path, columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV (atomically: a failed write leaves any old file intact)."""
    return write_csv_files([(rows, path, columns)])[0]


def write_csv_files(tables: Sequence[tuple[Sequence[dict], object, Sequence[str] | None]]) -> list[Path]:
    """Write several ``(rows, path, columns)`` tables as one unit: every file is written under a
    temporary name first, so a full disk or an interrupt replaces none of the existing files."""
    staged: list[tuple[Path, Path]] = []  # (temporary, destination)
    path = None
    try:
        for rows, path, columns in tables:
            path = Path(path)
            staged.append((_write_temporary_csv(rows, path, columns), path))
        for temporary, path in staged:
            os.replace(temporary, path)
    except OSError as error:  # disk full, a folder in the way: the old files stay as they were
        raise OFLSAM2Error(f"Could not write {path}: {error.strerror or error}. The existing files were kept.") from None
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
    return [path for _, path in staged]


def _write_temporary_csv(rows: Sequence[dict], path: Path, columns: Sequence[str] | None) -> Path:
    """``rows`` written and synced to a temporary file beside ``path``, with ``path``'s mode."""
    columns = list(columns or _columns_of(rows))
    if not path.parent.is_dir():
        raise InputError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    if path.is_dir():
        raise InputError(f"Cannot write {path}: a folder of that name is in the way; move it or choose another --out.")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            stream.flush()
            os.fsync(stream.fileno())
        apply_destination_mode(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def read_csv(path) -> list[dict]:
    """Rows written by :func:`write_csv`, with numbers and flags converted back."""
    with open(path, newline="") as stream:
        return [{key: _parse_cell(key, value) for key, value in row.items()} for row in csv.DictReader(stream)]


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub markdown table of ``columns`` of ``rows``; floats with ``digits`` decimals."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines)


def summary_markdown(summary: Sequence[dict], keys: Sequence[str] = ("label", "cases")) -> str:
    """Summary rows as markdown: the ``keys`` columns as they are, then every summary metric as
    ``mean ± std`` (Dice and NSD in %, distances in voxels / mm)."""
    table = []
    for entry in summary:
        cells = {key: entry[key] for key in keys}
        for metric in SUMMARY_METRICS:
            scale = 100.0 if metric in ("dice", "nsd", "pooled_dice") else 1.0
            cells[metric] = plus_minus(entry[f"{metric}_mean"] * scale, entry[f"{metric}_std"] * scale)
        table.append(cells)
    headers = [*keys, "Dice %", "HD95 vox", "HD95 mm", "ASSD mm", "NSD %", "pooled Dice %"]
    return markdown_table(table, [*keys, *SUMMARY_METRICS], headers)


def plus_minus(mean: float, std: float) -> str:
    """``"82.52 ± 1.03"`` (two decimals); ``"n/a"`` for NaN."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}"


# ---------------------------------------------------------------------------------------------
# Command line


def register_eval_command(subparsers) -> None:
    """Add ``eval --pred P --ref R [--labels 1,2] [--out results.csv] [--nsd-tolerance 1.0]``."""
    parser = subparsers.add_parser(
        "eval",
        help="score predicted label maps against references (Dice, HD95, ASSD, NSD)",
        description=(
            "Score a predicted label file against a reference, or every file of a prediction folder "
            "against the reference folder's file of the same case name. Metrics: " + METRIC_LIBRARIES + "."
        ),
    )
    parser.add_argument("--pred", required=True, help="predicted label file or folder")
    parser.add_argument("--ref", required=True, help="reference label file or folder")
    parser.add_argument("--labels", type=parse_label_list, help="labels to score, e.g. 1,2,3 (default: all in the reference)")
    parser.add_argument("--out", help="CSV of per-case rows; a per-label summary is written beside it (<name>_summary.csv)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1.0)")
    parser.add_argument(
        "--exclude-empty",
        action="store_true",
        help="leave labels empty in both prediction and reference out of the means (default: Dice 1)",
    )
    parser.set_defaults(func=run_eval_command)


def run_eval_command(args) -> int:
    """Handler of ``oflsam2 eval``; raises :class:`InputError` for unusable input."""
    out = Path(args.out) if args.out else None
    if out is not None and out.parent.is_file():
        raise InputError(f"Cannot write {out}: {out.parent} is a file, not a folder.")
    if out is not None and not out.parent.is_dir():
        raise InputError(f"Cannot write {out}: the folder {out.parent} does not exist.")
    if out is not None and out.is_dir():
        raise InputError(f"--out {out} is a folder; give a CSV file name such as {out / 'scores.csv'}.")
    if not args.nsd_tolerance >= 0:
        raise InputError(f"--nsd-tolerance must be a distance in mm >= 0; got {args.nsd_tolerance}.")
    both_empty = "exclude" if args.exclude_empty else "one"
    pred, ref = Path(args.pred), Path(args.ref)
    for flag, path in (("--pred", pred), ("--ref", ref)):
        if not path.exists():
            raise InputError(f"{flag} {path} does not exist.")
    if pred.is_dir() != ref.is_dir():
        raise InputError("--pred and --ref must both be files or both be folders.")
    if out is not None:
        _refuse_overwriting_inputs([out, out.with_name(f"{_csv_stem(out)}_summary.csv")], pred, ref)
        if out.name.lower().endswith(LABEL_FILE_SUFFIXES):  # in a prediction folder the next eval would read it as a case
            raise InputError(f"--out {out} is named like a label file; give a CSV file name such as {out.parent / 'scores.csv'}.")
    if pred.is_dir():
        rows, unmatched = evaluate_folders(pred, ref, args.labels, args.nsd_tolerance, both_empty=both_empty)
        for path in unmatched:
            print(f"warning: no partner for {path}", file=sys.stderr)
    else:
        rows = evaluate_pair(pred, ref, args.labels, args.nsd_tolerance, both_empty=both_empty)
    if args.labels is not None:
        _refuse_absent_labels(rows)
    summary = summarize(rows)
    if len(rows) <= 50:
        print(markdown_table(rows, ROW_COLUMNS[:7]))
        print()
    print(summary_markdown(summary))
    print(f"\nmetrics: {METRIC_LIBRARIES}; NSD tolerance {args.nsd_tolerance} mm")
    if out is not None:
        summary_path = out.with_name(f"{_csv_stem(out)}_summary.csv")
        write_csv_files([(rows, out, ROW_COLUMNS), (summary, summary_path, None)])
        print(f"wrote {out} and {summary_path}")
    return 0


def parse_label_list(text: str) -> list[int]:
    """``"1,2,5"`` -> ``[1, 2, 5]`` (an argparse ``type``: bad text is a usage error)."""
    try:
        return _check_labels(int(v) for v in text.replace(" ", "").split(",") if v)
    except (ValueError, InputError):
        raise argparse.ArgumentTypeError(f"give comma-separated positive whole numbers such as 1,2,3; got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# Helpers


def _refuse_overwriting_inputs(outputs, pred: Path, ref: Path) -> None:
    """Refuse a CSV that would replace a prediction or reference file (or one of their folders)."""
    inputs = [pred, ref]
    for folder in (pred, ref):
        if folder.is_dir():
            inputs += [p for p in folder.iterdir() if p.is_file()]
    for output in outputs:
        for source in inputs:
            if same_file(output, source):
                raise InputError(
                    f"--out would overwrite the input {source}; choose another name so your data is not overwritten."
                )


def _refuse_absent_labels(rows: Sequence[dict]) -> None:
    """A label asked for that no prediction and no reference holds is a typo: it would score a
    perfect Dice and NSD on every case."""
    absent = sorted({r["label"] for r in rows} - {r["label"] for r in rows if r["pred_voxels"] or r["ref_voxels"]})
    if absent:
        present = sorted({r["label"] for r in rows} - set(absent))
        raise InputError(
            f"Label {', '.join(map(str, absent))} is in none of the files (neither prediction nor reference), so every "
            f"score of it would be perfect; check --labels (labels found among those asked for: "
            f"{', '.join(map(str, present)) or 'none'}; leave out --labels to score every label of the references)."
        )


def _check_labels(labels) -> list[int]:
    values = [int(v) for v in labels]
    if not values or any(v <= 0 for v in values):
        raise InputError(f"Labels to score must be positive whole numbers; got {values!r}.")
    return sorted(set(values))


def _files_by_case(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(LABEL_FILE_SUFFIXES):
            found.setdefault(case_name(path).lower(), []).append(path)
    clashes = [paths for paths in found.values() if len(paths) > 1]
    if clashes:
        names = "; ".join(", ".join(p.name for p in paths) for paths in clashes)
        raise InputError(f"Several files of {folder} name the same case ({names}); keep one per case.")
    return {case: paths[0] for case, paths in found.items()}


def natural_key(text: str) -> list:
    """Sort key that puts ``case2`` before ``case10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def _grid_text(image) -> str:
    def fmt(values):
        return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

    return (
        f"size {image.GetSize()}, spacing {fmt(image.GetSpacing())} mm, origin {fmt(image.GetOrigin())}, "
        f"direction {fmt(image.GetDirection())}"
    )


def _columns_of(rows: Sequence[dict]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def _parse_cell(key: str, value: str):
    if key in _TEXT_COLUMNS:
        return value
    if key in _BOOL_COLUMNS:
        return value == "True"
    if key in _INT_COLUMNS:
        try:
            return int(value)
        except ValueError:
            return value
    try:
        return float(value)
    except ValueError:
        return value


def _format_cell(value, digits: int) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _csv_stem(path: Path) -> str:
    return path.name[:-4] if path.name.lower().endswith(".csv") else path.name
