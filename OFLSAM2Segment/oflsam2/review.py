"""Review and correct: per-slice quality, which slice to annotate next, and updates.

The clinician's loop is: annotate a few slices, segment, look at the weakest slices, correct
one, update. This module holds the engine's side of it that needs no model:

- **quality**: every method records, per label and per predicted slice, a quality in [0, 1]
  and what it is made of (``SegmentResult.info["quality"][label][slice]``): ``ofl`` S_cf, the
  mean probability over the predicted foreground (``source`` ``s_cf``); ``sam2``, ``forward``
  and the tracked slices of ``revsam2`` the decoder's predicted IoU × object presence
  σ(object score) (``iou_x_presence``); RevSAM2's selected slices their reverse score
  (``reverse``). A slice predicted empty scores how sure the model is that the object is absent
  (``absent``); annotated slices score 1 (``annotated``).
- :func:`suggest`: the slices whose annotation would most likely help.
- :func:`previous_run`: checks an update's previous result and finds the edited slices; the
  propagation itself (outward from the edits, until the previous result is met again) is
  :class:`oflsam2.methods.sweep.Sweep`.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .methods.sweep import PreviousRun
from .review_checks import check_result

SUGGESTION_SPACING = 3  # suggested slices lie at least this many slices from each other and from annotated ones
QUALITY_COLUMNS = ("label", "slice", "quality", "source")


def suggest(result, n: int, *, labels: Sequence[int] | None = None, spacing: int = SUGGESTION_SPACING) -> dict[int, list[int]]:
    """The ``n`` slices per label (indices along ``result.axis``) whose annotation would most
    likely help, best first.

    The rule, per label:

    1. Candidates are the slices inside the object's extent (from the first to the last slice
       where the result holds the label), that are not annotated and lie at least ``spacing``
       slices from every annotated slice.
    2. They are ranked by quality, lowest first; ties go to the slice farther from the nearest
       annotated slice, then to the lower index. A slice with no recorded quality ranks as 0.
    3. They are taken in that order, skipping any slice within ``spacing`` - 1 slices of one
       already taken, so that no two suggestions are closer than ``spacing``.

    Fewer than ``n`` come back when the extent holds fewer such slices (none when the label
    was found nowhere). ``result``: a :class:`~oflsam2.api.SegmentResult` whose ``info``
    holds ``annotated`` and ``quality`` (every run of :meth:`Engine.segment` does).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"The number of slices to suggest must be a whole number from 0; got {n!r}.")
    if isinstance(spacing, bool) or not isinstance(spacing, (int, np.integer)) or spacing < 1:
        raise InputError(f"The spacing of suggested slices must be a whole number from 1; got {spacing!r}.")
    check_result(result)
    annotated = sorted(int(i) for i in result.info.get("annotated", []))
    quality = result.info.get("quality", {})
    chosen = {}
    for label in labels if labels is not None else sorted(result.masks):
        if label not in result.masks:
            raise InputError(f"Label {label} is not in the result; it holds labels {sorted(result.masks)}.")
        present = np.flatnonzero(np.moveaxis(np.asarray(result.masks[label], dtype=bool), result.axis, 0).any(axis=(1, 2)))
        scores = _label_entries(quality, label)
        picked: list[int] = []
        if present.size:
            def distance(i: int) -> float:  # to the nearest annotated slice
                return min((abs(i - a) for a in annotated), default=float("inf"))

            candidates = [i for i in range(int(present[0]), int(present[-1]) + 1) if distance(i) >= spacing]
            candidates.sort(key=lambda i: (_quality_of(scores, i), -distance(i), i))
            for index in candidates:
                if len(picked) == n:
                    break
                if all(abs(index - other) >= spacing for other in picked):
                    picked.append(index)
        chosen[int(label)] = picked
    return chosen


def _label_entries(quality: dict, label: int) -> dict:
    """One label's ``slice -> entry`` map, whether keys are ints (engine) or strings (JSON)."""
    entries = quality.get(label, quality.get(str(label), {}))
    return {int(k): v for k, v in entries.items()}


def _quality_of(entries: dict, index: int) -> float:
    entry = entries.get(index)
    return float(entry["quality"]) if entry is not None else 0.0


def quality_rows(result) -> list[dict]:
    """``label, slice, quality, source`` rows of every label's recorded slices, in order."""
    rows = []
    for label in sorted(result.masks):
        for index, entry in sorted(_label_entries(result.info.get("quality", {}), label).items()):
            rows.append({"label": int(label), "slice": index, "quality": float(entry["quality"]), "source": entry["source"]})
    return rows


def write_quality_csv(rows: Sequence[dict], path) -> Path:
    """Write quality rows as CSV (``label,slice,quality,source``) atomically: a temporary file
    beside ``path`` moved into place, so an existing file is never left half-written."""
    path = Path(path)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=QUALITY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "quality": f"{row['quality']:.6f}"})
    write_text_atomic(path, text.getvalue())
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file in the same folder and ``os.replace``."""
    from .outputs import apply_destination_mode

    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        apply_destination_mode(temporary, path)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def previous_run(previous, supports, shape: tuple, method: str, axis: int, run_slices: Sequence[int],
                 image_digest: str | None = None) -> PreviousRun:
    """Check that ``previous`` (a :class:`~oflsam2.api.SegmentResult`) can be updated by this run
    and return it along the run's axis with the edited slices.

    An edited slice is one annotated now whose annotation of some label differs from the
    previous result there (a slice emptied of the object is one: a correction to "absent").
    Refused with :class:`InputError`: a malformed result, another image (its recorded
    ``image_digest`` differs from ``image_digest``, the fingerprint of this run's image), another
    method or axis, another grid, a label the previous run did not segment, and a slice
    annotated in the previous run that is no longer annotated (an update cannot remove an
    annotation).
    """
    check_result(previous, "previous result")
    recorded = previous.info.get("image_digest")
    if recorded is not None and image_digest is not None and recorded != image_digest:
        raise InputError(
            "The previous result was made on another image (the voxels differ, though the grid may be the same): "
            "an update must segment the image the previous run segmented. Give that image, or run a fresh segmentation."
        )
    if previous.method != method:
        raise InputError(
            f"The previous result was made with method {previous.method!r}, this run uses {method!r}: update "
            "with the same method, or run a fresh segmentation."
        )
    if previous.axis != axis:
        raise InputError(
            f"The previous result was propagated along array axis {previous.axis}, this run along {axis}: "
            "corrections must be drawn on slices of the run's axis. Update along the same axis."
        )
    previous_annotated = previous.info.get("annotated")
    if previous_annotated is None:
        raise InputError("The previous result does not record its annotated slices; run a fresh segmentation.")
    masks = {}
    for support in supports:
        mask = previous.masks.get(support.label)
        if mask is None:
            raise InputError(
                f"Label {support.label} ({support.name}) was not segmented in the previous result (it holds labels "
                f"{sorted(previous.masks)}); run a fresh segmentation to add a label."
            )
        if np.shape(mask) != tuple(shape):
            raise InputError(
                f"The previous result has shape {np.shape(mask)} but the image {tuple(shape)}: it belongs to "
                "another image grid. Give the result of a run on this image."
            )
        masks[support.label] = np.moveaxis(np.asarray(mask, dtype=bool), axis, 0)
    removed = sorted(set(int(i) for i in previous_annotated) - set(run_slices))
    if removed:
        raise InputError(
            f"Slice(s) {removed} were annotated in the previous run but are not annotated now: an update cannot "
            "remove an annotation. Keep them annotated, or run a fresh segmentation without them."
        )
    edited = [
        index for index in run_slices
        if any(not np.array_equal(np.take(s.mask, index, axis=axis), masks[s.label][index]) for s in supports)
    ]
    selected = {
        int(label): [int(i) for i in stats.get("selected", [])]
        for label, stats in previous.info.get("labels", {}).items()
        if isinstance(stats, dict)
    }
    return PreviousRun(masks, edited, selected)


def finish_label(ctx, label: int, result: np.ndarray) -> np.ndarray:
    """A method's (N, H, W) output of one label as the run returns it: in an update, the
    previous result everywhere the propagation did not reach."""
    ctx.quality.setdefault(label, {})
    if ctx.previous is None:
        return result
    merged = ctx.previous.masks[label].copy()
    recomputed = ctx.sweeps[label].recomputed if label in ctx.sweeps else []
    merged[recomputed] = result[recomputed]
    return merged


def review_info(ctx, run_slices: Sequence[int], previous) -> dict:
    """What a run adds to ``SegmentResult.info`` for review: ``annotated`` slices, per-label
    ``quality`` (an update keeps the previous quality of the slices it did not recompute) and,
    in an update, the ``edited`` slices and each label's ``recomputed`` ones."""
    quality = {}
    for label, recorded in ctx.quality.items():
        merged = {}
        if previous is not None:
            recomputed = set(ctx.sweeps[label].recomputed) if label in ctx.sweeps else set()
            merged = {i: e for i, e in _label_entries(previous.info.get("quality", {}), label).items() if i not in recomputed}
        merged.update(recorded)
        merged.update({i: {"quality": 1.0, "source": "annotated"} for i in run_slices})
        quality[label] = dict(sorted(merged.items()))
    info = {"annotated": list(run_slices), "quality": quality}
    if previous is not None:
        info["edited"] = list(ctx.previous.edited)
        info["recomputed"] = {label: ctx.sweeps[label].recomputed if label in ctx.sweeps else [] for label in ctx.quality}
    return info
