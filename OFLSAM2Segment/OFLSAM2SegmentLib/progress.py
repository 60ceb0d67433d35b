"""Text for the staged progress bar and the support-set summary (pure functions, no Qt)."""

from __future__ import annotations

from typing import Sequence

STAGE_TITLES = {
    "queued": "Waiting for the server",  # its device runs another client's job first
    "installing": "Installing Python packages",
    "downloading": "Downloading checkpoint",
    "loading": "Loading model",
    "encoding": "Encoding slices",
    "training": "Training",
    "forward": "Forward pass",
    "reverse": "Reverse pass",
    "propagating": "Propagating",
    "writing": "Writing slices",
}


def progress_text(stage: str, done: int, total: int, message: str = "") -> tuple[int, str]:
    """(percent 0..100 of the current stage, one-line label), e.g.
    ``(25, "Training: Liver: epoch 10/40, loss 0.2130")``; without a message the label counts
    the steps (``"Propagating 3/9"``)."""
    title = STAGE_TITLES.get(stage, stage.capitalize())
    percent = int(round(100 * done / total)) if total > 0 else 0
    if message:
        text = f"{title}: {message}"
    else:
        text = f"{title} {done}/{total}" if total > 0 else title
    return max(0, min(100, percent)), text


def slice_ranges(indices: Sequence[int]) -> str:
    """``[3, 4, 5, 9, 12, 13]`` -> ``"3-5, 9, 12-13"``."""
    parts, run = [], []
    for index in sorted(set(int(i) for i in indices)):
        if run and index == run[-1] + 1:
            run.append(index)
            continue
        if run:
            parts.append(_range_text(run))
        run = [index]
    if run:
        parts.append(_range_text(run))
    return ", ".join(parts)


def support_line(name: str, axis_name: str, slices: Sequence[int], ignored_axes: Sequence[str] = ()) -> str:
    """One line of the support list: ``"Liver: 3 axial slices (12, 20-21)"``, plus the axes of
    strokes that a run along ``axis_name`` ignores (``"; strokes on the sagittal axis ignored"``)."""
    if not slices:
        line = f"{name}: no annotated slice - paint at least one {axis_name} slice"
    else:
        noun = "slice" if len(slices) == 1 else "slices"
        line = f"{name}: {len(slices)} {axis_name} {noun} ({slice_ranges(slices)})"
    if ignored_axes:
        line += f"; strokes on the {' and '.join(ignored_axes)} axis ignored"
    return line


def _range_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
