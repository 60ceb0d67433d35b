"""What every method receives: the model, the driver, cached slices and one label's support."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend import Sam2Model
from ..driver import Sam2Driver
from ..events import RunEvents
from ..features import FeatureCache
from ..settings import MethodOptions
from .sweep import PreviousRun, Sweep


@dataclass
class SupportSlice:
    """One annotated slice: features come from ``source`` at ``index``; ``mask`` is (H, W) bool at
    that source's slice size."""

    source: FeatureCache
    index: int
    mask: np.ndarray


@dataclass
class SupportSet:
    """All support of one label: annotated slices of the target volume and of references."""

    label: int
    name: str
    in_volume: dict[int, np.ndarray] = field(default_factory=dict)  # target index -> (H, W) bool
    external: list[SupportSlice] = field(default_factory=list)

    def all_slices(self, target: FeatureCache) -> list[SupportSlice]:
        own = [SupportSlice(target, i, m) for i, m in sorted(self.in_volume.items())]
        return own + self.external


@dataclass
class RunContext:
    """Shared by the methods of one run; ``emit`` reports a finished target slice."""

    model: Sam2Model
    driver: Sam2Driver
    target: FeatureCache
    options: MethodOptions
    events: RunEvents
    axis: int
    preset: str = "auto"
    info: dict = field(default_factory=dict)  # per-label statistics reported by the methods
    intensity: dict = field(default_factory=dict)  # the target's volume.intensity_summary, kept by adapters
    on_success: list = field(default_factory=list)  # writes deferred until every label succeeded
    staged: object = None  # a StagedOutputs that adapter files are written into (the caller commits), or None
    previous: PreviousRun | None = None  # set for an update after a correction
    quality: dict = field(default_factory=dict)  # label -> slice -> {"quality", "source", components}
    sweeps: dict = field(default_factory=dict)  # label -> the Sweep its propagation used

    @property
    def num_slices(self) -> int:
        return len(self.target)

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.target.stack.slice_shape

    def emit(self, label: int, index: int, mask: np.ndarray) -> None:
        self.events.slice_done(label, self.axis, index, mask)

    def sweep(self, label: int, given) -> Sweep:
        """The slices this label's propagation visits: a full run, or, in an update, outward
        from the edited slices until the previous result is met again."""
        if self.previous is None:
            sweep = Sweep(self.num_slices, given)
        else:
            sweep = Sweep(self.num_slices, given, self.previous.masks[label], self.previous.edited)
        self.sweeps[label] = sweep
        return sweep

    def record_quality(self, label: int, index: int, quality: dict) -> None:
        """Keep one predicted slice's quality (``quality`` in [0, 1], ``source``, components)."""
        self.quality.setdefault(label, {})[index] = quality
