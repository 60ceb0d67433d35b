"""Progress on stderr: one tqdm bar per run stage, and byte bars for downloads and hashing."""

from __future__ import annotations

import sys


def progress_events():
    """:class:`~oflsam2.events.Events` that draw one tqdm bar per stage on stderr."""
    from ..events import Events

    bars = StageBars()
    return Events(on_progress=bars.update)


class StageBars:
    """One tqdm bar per run stage; a new stage closes the previous bar."""

    def __init__(self, **bar_options):
        self._stage = None
        self._bar = None
        self._bar_options = {"leave": True, **bar_options}

    def update(self, stage: str, done: int, total: int, message: str = "") -> None:
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total, desc=stage, file=sys.stderr, mininterval=0.5, **self._bar_options)
        bar = self._bar
        if total != bar.total:
            bar.total = total
        bar.n = done
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if total and done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None


class ByteBar:
    """A tqdm bar in bytes fed as ``update(done, total)`` (download and hashing progress)."""

    def __init__(self, desc: str, total: int | None):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, mininterval=0.5)

    def update(self, done: int, total: int) -> None:
        if total and total != self._bar.total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
