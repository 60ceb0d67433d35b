"""Progress, per-slice results and cancellation: the only channel between a run and its caller.

The CLI prints a progress bar from these events, the Slicer worker forwards them to a queue
that the main thread drains, and tests record them.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from .errors import Cancelled


class RunEvents(Protocol):
    def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        """``stage`` is one of ``loading``, ``encoding``, ``training``, ``forward``,
        ``reverse``, ``propagating``, ``writing``; ``done`` of ``total`` steps are finished."""

    def slice_done(self, label: int, axis: int, index: int, mask: np.ndarray) -> None:
        """A final mask (2-D bool, the plane of array axis ``axis`` at ``index``) is ready."""

    def is_cancelled(self) -> bool:
        """True once the user asked to stop; the run raises :class:`Cancelled` at the next step."""


class CancelToken:
    """Thread-safe cancel flag shared by a caller and a run."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def is_cancelled(self) -> bool:
        return self._event.is_set()


class Events:
    """Plain implementation of :class:`RunEvents` built from optional callables."""

    def __init__(self, on_progress=None, on_slice=None, cancel: CancelToken | None = None):
        self._on_progress = on_progress
        self._on_slice = on_slice
        self._cancel = cancel or CancelToken()

    def progress(self, stage, done, total, message=""):
        if self._on_progress is not None:
            self._on_progress(stage, done, total, message)

    def slice_done(self, label, axis, index, mask):
        if self._on_slice is not None:
            self._on_slice(label, axis, index, mask)

    def is_cancelled(self):
        return self._cancel.is_cancelled()


def check_cancel(events: RunEvents) -> None:
    """Raise :class:`Cancelled` if the caller asked to stop."""
    if events.is_cancelled():
        raise Cancelled()
