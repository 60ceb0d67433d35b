"""The order a method visits slices in, and what it records per slice (quality).

A full run travels outward from the first annotated slice: forward to the end, then backward to
the start. An update after a correction (:class:`PreviousRun`) travels outward from each edited
slice instead, in both directions, and stops a direction at the volume's edge, at an annotated
slice, or once the new masks agree with the previous result (Dice >= ``AGREEMENT_DICE``) on
``AGREEING_SLICES`` consecutive slices; the slices it did not reach keep the previous result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

AGREEMENT_DICE = 0.98
AGREEING_SLICES = 3


@dataclass
class PreviousRun:
    """The result an update corrects, along the run's axis.

    masks: label -> (N, H, W) bool, the previous output; edited: slices whose annotation differs
    from it (now annotated); selected: label -> RevSAM2's conditioning query slices of that run.
    """

    masks: dict[int, np.ndarray]
    edited: list[int]
    selected: dict[int, list[int]] = field(default_factory=dict)


def agrees(new: np.ndarray, old: np.ndarray) -> bool:
    """Dice(new, old) >= AGREEMENT_DICE; two empty masks agree."""
    total = int(new.sum()) + int(old.sum())
    if total == 0:
        return True
    return 2.0 * int(np.logical_and(new, old).sum()) / total >= AGREEMENT_DICE


class Sweep:
    """Iterate ``(index, step)`` over the slices to predict (step +1 forward, -1 backward); call
    :meth:`done` with each predicted mask before asking for the next slice.

    ``given``: the annotated (or otherwise fixed) slices, never visited. ``previous``: the
    previous masks (N, H, W) of this label in an update, with the ``edited`` slices to start
    from; None for a full run.
    """

    def __init__(self, num_slices: int, given, previous: np.ndarray | None = None, edited=()):
        self.num_slices = num_slices
        self.given = set(given)
        self.previous = previous
        self.edited = sorted(edited)
        self._last: np.ndarray | None = None
        self._visited: list[int] = []

    @property
    def bound(self) -> int:
        """At most this many slices are visited (for progress bars)."""
        return self.num_slices - len(self.given)

    @property
    def recomputed(self) -> list[int]:
        """The slices visited so far, sorted."""
        return sorted(set(self._visited))

    def first(self) -> int | None:
        """The first slice the sweep will visit (None: nothing to predict)."""
        return next((index for index, _ in self._plan()), None)

    def done(self, index: int, mask: np.ndarray) -> None:
        self._visited.append(index)
        self._last = mask

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.previous is None:
            yield from self._plan()
            return
        for start in self.edited:
            for step in (1, -1):
                agreeing, index = 0, start + step
                while 0 <= index < self.num_slices and index not in self.given and agreeing < AGREEING_SLICES:
                    yield index, step
                    agreeing = agreeing + 1 if agrees(self._last, self.previous[index]) else 0
                    index += step

    def _plan(self) -> Iterator[tuple[int, int]]:
        """The full run's order; for an update, each edit's first slice in each direction."""
        n = self.num_slices
        if self.previous is not None:
            for start in self.edited:
                for step in (1, -1):
                    if 0 <= start + step < n and start + step not in self.given:
                        yield start + step, step
            return
        start = min(self.given) if self.given else 0
        order = [(i, 1) for i in range(start, n)] + [(i, -1) for i in range(start - 1, -1, -1)]
        yield from ((i, step) for i, step in order if i not in self.given)


def tracking_quality(prediction, row: int = 0) -> dict:
    """Quality of slice ``row`` of a SAM2 prediction from its decoder outputs.

    ``presence`` = σ(object-score logit). A slice predicted to hold the object scores
    predicted IoU × presence; one predicted empty scores 1 − presence (how sure SAM2 is that the
    object is absent). Returns ``{"quality", "source", "iou", "presence"}``.
    """
    presence = float(prediction.object_score[row].float().sigmoid().flatten()[0])  # no torch import: review loads this module
    iou = float(prediction.iou[row].float().flatten()[0].clamp(0.0, 1.0)) if prediction.iou is not None else 1.0
    if bool((prediction.high_res[row] > 0).any()):
        return {"quality": iou * presence, "source": "iou_x_presence", "iou": iou, "presence": presence}
    return {"quality": 1.0 - presence, "source": "absent", "iou": iou, "presence": presence}
