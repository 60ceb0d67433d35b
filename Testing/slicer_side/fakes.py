"""Test doubles for the engine seam of the Slicer worker (the real engine is tested too)."""

from __future__ import annotations

import threading

import numpy as np

from oflsam2.api import SegmentResult
from oflsam2.events import check_cancel


def nearest_annotation(mask: np.ndarray, slices, axis: int, index: int) -> np.ndarray:
    """The annotated plane closest to ``index`` (ties: the lower one) -- a predictable "propagation"."""
    nearest = min(slices, key=lambda s: (abs(s - index), s))
    return np.take(mask, nearest, axis=axis).astype(bool)


class CopyEngine:
    """Copies each label's nearest annotated plane onto every other plane, reporting progress.

    ``stream_every``: report only every n-th plane through ``slice_done`` (the worker must send
    the rest from the result). ``block``: an event to wait on, see ``block_after``.
    ``block_after``: wait on ``block`` once that many slices were sent (0: before the first).
    ``fail_after``: raise ``error`` once that many slices were sent. A label without annotated
    planes gets ``image > 0.5`` (the adapter-only case).
    """

    def __init__(self, settings=None, stream_every=1, block: threading.Event | None = None, block_after=0,
                 fail_after=None, error=None):
        self.settings = settings
        self.stream_every = stream_every
        self.block = block
        self.block_after = block_after
        self.fail_after = fail_after
        self.error = error
        self.calls = []

    def segment(self, image, supports, *, method, axis, preset, options, references, events):
        self.calls.append({"image": image, "supports": supports, "method": method, "axis": axis, "preset": preset,
                           "options": options, "references": references})
        events.progress("loading", 1, 1, "fake model")
        sent = 0
        masks = {}
        for support in supports:
            result = np.zeros(image.shape, bool)
            count = image.shape[axis]
            for index in range(count):
                check_cancel(events)
                if self.block is not None and sent == self.block_after:
                    while not self.block.wait(0.01):
                        check_cancel(events)
                if support.slices:
                    plane = nearest_annotation(support.mask, support.slices, axis, index)
                else:
                    plane = np.take(image, index, axis=axis) > 0.5
                selector = [slice(None)] * 3
                selector[axis] = index
                result[tuple(selector)] = plane
                if index in support.slices:
                    continue
                if self.fail_after is not None and sent >= self.fail_after:
                    raise self.error
                if index % self.stream_every == 0:
                    events.slice_done(support.label, axis, index, plane)
                    sent += 1
                events.progress("propagating", index + 1, count, support.name)
            masks[support.label] = result
        return SegmentResult(masks, axis, method, {"fake": True})


class RaisingEngine:
    """Raises ``error`` at once."""

    def __init__(self, error):
        self.error = error

    def segment(self, image, supports, **kwargs):
        raise self.error


class ManualPump:
    """The test pump: remembers the step; the test drives it like the Qt timer would."""

    def __init__(self):
        self.step = None

    def start(self, step):
        self.step = step

    def run_until_done(self, timeout=30.0):
        import time

        deadline = time.monotonic() + timeout
        while not self.step():
            if time.monotonic() > deadline:
                raise TimeoutError("the run did not end")
            time.sleep(0.01)
