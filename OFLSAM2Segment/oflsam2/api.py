"""The engine's public entry point, shared by the CLI, the Slicer worker and the tests.

Arrays are numpy ``(z, y, x)`` as SimpleITK returns them (Slicer's KJI order). A run segments
one volume for one or more labels, one binary propagation per label, along one array axis.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .events import Events, RunEvents

METHODS = ("ofl", "revsam2", "forward", "sam2")


@dataclass
class ModelSettings:
    """Which SAM2 to run and where. ``model`` is a name from ``oflsam2/models.json``
    (``sam2.1-tiny`` ... ``sam2-large``, ``medsam2``)."""

    model: str = "sam2.1-tiny"
    checkpoint: str | None = None  # local path; None -> the verified cached download
    random_weights: bool = False  # real architecture, untrained: tests and smoke runs only
    device: str = "auto"  # auto | cuda | mps | cpu
    image_size: int = 1024  # SAM2 input size, a multiple of 32
    feature_dtype: str = "auto"  # auto | float32 | float16 | bfloat16 (feature-cache storage)
    cache_megabytes: int = 4096  # bound on cached slice features; least recently used evicted
    encode_batch_size: int = 4
    # Deterministic kernels (torch.use_deterministic_algorithms) and DETERMINISTIC_THREADS CPU
    # threads during a run: the same output whatever the thread count; slower.
    deterministic: bool = False


@dataclass
class LabelSupport:
    """Annotated slices of one label in the volume being segmented.

    ``mask`` is a bool ``(z, y, x)`` array of the whole volume; only the planes listed in
    ``slices`` (indices along the run's axis) are support, and they are copied to the output
    unchanged. A listed plane may be empty (an annotated "object absent" slice).
    """

    label: int
    name: str
    mask: np.ndarray
    slices: list[int]


@dataclass
class Reference:
    """Another image + label pair used as support (``--reference IMG:LABELS``).

    ``image`` holds raw intensities (the engine applies the same preset as for the target);
    ``labels`` is an integer ``(z, y, x)`` label map on the same grid; the reference is sliced
    along the same axis as the target.
    """

    image: np.ndarray
    labels: np.ndarray
    name: str = "reference"


@dataclass
class MethodOptions:
    """Every method's knobs in one place; each method reads the ones it needs."""

    # SAM2 propagation / shared
    num_maskmem: int | None = None  # None -> the model's own (7)
    # OFL-SAM2
    epochs: int = 40
    lr: float = 1e-3
    lr_milestones: tuple[int, ...] = (10, 30)
    gamma: float = 0.8  # confidence gate S_cf > gamma
    num_retrieved: int = 2  # K in the paper: top-K support memories by cosine similarity
    retrieval: str = "flat"  # flat | pooled
    learner_iters_train: int = 10
    learner_iters_online: int = 5
    use_learner: bool = True
    use_afm: bool = True
    online_update: bool = True
    exclude_radius: int = 2  # leave-one-slice-out: also exclude annotated slices within +-2
    max_fit_slices: int = 64
    seed: int = 0
    adapter: str | None = None  # saved adapter directory: segment without support, or warm start
    save_adapter: str | None = None  # directory to write the trained adapter(s) into
    warm_start_epochs: int = 10  # epochs when --adapter and new support are given together
    # RevSAM2
    top_k: int = 3
    revsam2_mode: str = "full"  # full | forward | forward_fifo | random
    include_supports_in_propagation: bool = False
    max_supports: int | None = 10  # non-empty support slices used (None: all); the paper uses 10
    support_sampling: str = "even"  # even | random (by seed): which supports when there are more
    forward_batch_size: int = 4  # query slices per forward pass


@dataclass
class SegmentResult:
    """Final masks per label, bool ``(z, y, x)``, plus what was done."""

    masks: dict[int, np.ndarray]
    axis: int
    method: str
    info: dict = field(default_factory=dict)


class Engine:
    """Owns one SAM2 model and the feature caches of the volumes it segmented last.

    The Slicer worker thread keeps one Engine for the whole session (re-running on the same
    volume reuses its encoded slices); the CLI makes one per run.
    """

    def __init__(self, settings: ModelSettings, max_cached_volumes: int = 2, model=None):
        """``model``: an already built :class:`~oflsam2.backend.Sam2Model` to share (tests)."""
        self.settings = settings
        self.max_cached_volumes = max_cached_volumes
        self._model = model
        self._caches: OrderedDict[str, object] = OrderedDict()

    @property
    def model(self):
        """The frozen SAM2 model, built on first use."""
        if self._model is None:
            from .backend import load_sam2

            self._model = load_sam2(self.settings)
        return self._model

    def feature_cache(self, normalized: np.ndarray, axis: int):
        """The cache of an intensity-normalised volume sliced along ``axis`` (reused if seen)."""
        from .features import FeatureCache, SliceStack, storage_dtype

        model = self.model
        digest = hashlib.blake2b(np.ascontiguousarray(normalized).tobytes(), digest_size=16)
        digest.update(f"{normalized.shape}|{axis}|{model.image_size}|{model.weights_id}".encode())
        key = digest.hexdigest()
        if key in self._caches:
            self._caches.move_to_end(key)
            return self._caches[key]
        cache = FeatureCache(
            model,
            SliceStack(normalized, axis),
            dtype=storage_dtype(self.settings.feature_dtype, model.device),
            max_bytes=self.settings.cache_megabytes << 20,
            batch_size=self.settings.encode_batch_size,
        )
        self._caches[key] = cache
        while len(self._caches) > self.max_cached_volumes:
            self._caches.popitem(last=False)
        return cache

    def segment(
        self,
        image: np.ndarray,
        supports: Sequence[LabelSupport],
        *,
        method: str = "ofl",
        axis: int = 0,
        preset: str = "auto",
        options: MethodOptions | None = None,
        references: Sequence[Reference] = (),
        events: RunEvents | None = None,
    ) -> SegmentResult:
        """Segment ``image`` (raw intensities, ``(z, y, x)``) for every label in ``supports``.

        Raises :class:`~oflsam2.errors.InputError` for unusable input and
        :class:`~oflsam2.errors.Cancelled` when ``events.is_cancelled()`` turns true. Slices are
        reported through ``events.slice_done`` as they finish; a caller that writes them at once
        must restore its previous state when the run raises. The user's annotated slices are
        never reported and are returned unchanged.
        """
        import torch

        from .driver import Sam2Driver
        from .methods import runner
        from .methods.base import RunContext
        from .volume import apply_preset

        options = options or MethodOptions()
        events = events or Events()
        image = _check_inputs(image, supports, method, axis, references)
        started = time.perf_counter()
        events.progress("loading", 0, 1, f"loading {self.settings.model}")
        model = self.model
        events.progress("loading", 1, 1, f"{self.settings.model} on {model.device}")
        target = self.feature_cache(apply_preset(image, preset), axis)
        target.encode(events=events)
        ctx = RunContext(model, Sam2Driver(model, target.position_encoding()), target, options, events, axis, preset)
        reference_slices = [
            (self.feature_cache(apply_preset(np.asarray(r.image, dtype=np.float32), preset), axis), np.moveaxis(r.labels, axis, 0))
            for r in references
        ]
        masks = {}
        for support in supports:
            label_support = _support_set(support, axis, reference_slices)
            with torch.no_grad(), deterministic_mode(self.settings.deterministic):
                result = runner(method)(ctx, label_support)
            for index, annotation in label_support.in_volume.items():
                result[index] = annotation
            masks[support.label] = np.moveaxis(result, 0, axis)
        for write in ctx.on_success:
            write()
        info = {
            "seconds": time.perf_counter() - started,
            "slices_encoded": target.encoded,
            "device": str(model.device),
            "random_weights": model.random_weights,
            "labels": ctx.info,
        }
        return SegmentResult(masks, axis, method, info)


DETERMINISTIC_THREADS = 1


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """Deterministic torch kernels and a fixed CPU thread count for the block (``enabled``),
    restored afterwards. Seeds alone already make two runs on one machine with one thread
    count identical; this also removes the thread count and nondeterministic GPU kernels."""
    if not enabled:
        yield
        return
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(DETERMINISTIC_THREADS)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _check_inputs(image, supports, method, axis, references) -> np.ndarray:
    from .errors import InputError

    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise InputError(f"The image must be a 3-D volume (z, y, x); got shape {image.shape}.")
    if axis not in (0, 1, 2):
        raise InputError(f"The slice axis must be 0, 1 or 2 (array order); got {axis!r}.")
    if not np.isfinite(image).all():
        raise InputError("The image contains NaN or infinite voxels; fix or mask them before segmenting.")
    if not supports:
        raise InputError("No label to segment: give at least one label with annotated slices or an adapter.")
    if len({s.label for s in supports}) != len(supports):
        raise InputError("Each label may appear only once in one run.")
    for s in supports:
        if s.mask.shape != image.shape:
            raise InputError(f"The support of label {s.name!r} has shape {s.mask.shape}, the image {image.shape}.")
        bad = [i for i in s.slices if not 0 <= i < image.shape[axis]]
        if bad:
            raise InputError(f"Annotated slice(s) {bad} of label {s.name!r} lie outside the volume (0..{image.shape[axis] - 1}).")
    for r in references:
        if np.shape(r.image) != np.shape(r.labels) or np.ndim(r.image) != 3:
            raise InputError(f"Reference {r.name!r}: image and labels must be 3-D arrays of the same shape.")
    return image


def _support_set(support: LabelSupport, axis: int, reference_slices):
    from .methods.base import SupportSet, SupportSlice

    in_volume = {i: np.take(support.mask, i, axis=axis).astype(bool) for i in sorted(set(support.slices))}
    external = [
        SupportSlice(cache, i, labels[i] == support.label)
        for cache, labels in reference_slices
        for i in range(labels.shape[0])
    ]
    return SupportSet(support.label, support.name, in_volume, external)
