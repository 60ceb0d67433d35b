"""The engine's public entry point, shared by the CLI, the Slicer worker and the tests.

Arrays are numpy ``(z, y, x)`` as SimpleITK returns them (Slicer's KJI order). A run segments
one volume for one or more labels, one binary propagation per label, along one array axis.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from typing import Sequence

import numpy as np

from .errors import InputError
from .events import Events, RunEvents
from .settings import (
    DEFAULT_METHOD,
    METHODS,
    LabelSupport,
    MethodOptions,
    ModelSettings,
    Reference,
    SegmentResult,
    check_method_options,
    check_model_settings,
    default_model,
)

# What callers import from here; the run's inputs and result are defined in settings.py.
__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Engine",
    "LabelSupport",
    "MethodOptions",
    "ModelSettings",
    "Reference",
    "SegmentResult",
    "annotated_in_run",
    "default_model",
    "deterministic_mode",
    "validate_run",
]



class Engine:
    """Owns one SAM2 model and the feature caches of the volumes it segmented last.

    The Slicer worker thread keeps one Engine for the whole session (re-running on the same
    volume reuses its encoded slices); the CLI makes one per run.
    """

    def __init__(self, settings: ModelSettings, max_cached_volumes: int = 2, model=None):
        """``model``: an already built :class:`~oflsam2.backend.Sam2Model` to share (tests)."""
        if not isinstance(settings, ModelSettings):
            raise InputError(f"Engine needs a ModelSettings, e.g. ModelSettings(model='sam2.1-tiny'); got {type(settings).__name__}.")
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
        method: str = DEFAULT_METHOD,
        axis: int = 0,
        preset: str = "auto",
        options: MethodOptions | None = None,
        references: Sequence[Reference] = (),
        events: RunEvents | None = None,
        previous: SegmentResult | None = None,
        staged=None,
    ) -> SegmentResult:
        """Segment ``image`` (raw intensities, ``(z, y, x)``) for every label in ``supports``.

        ``previous``: an earlier result of this image, method and axis to update after a
        correction (see :func:`oflsam2.review.previous_run`): slices annotated now but drawn
        differently there are the edits, propagation restarts from them only, and every slice it
        does not reach keeps the previous result. ``info["quality"]`` holds each label's per-slice
        quality; :func:`oflsam2.review.suggest` reads it, and ``info["image_digest"]`` the image's
        fingerprint (an update of another image is refused).

        ``staged``: a :class:`~oflsam2.outputs.StagedOutputs` that the adapters of
        ``options.save_adapter`` are written into, to be moved into place when the caller commits
        it with its own outputs (the CLI: an adapter replaces the previous one only once the
        outputs are written); by default they are saved when the run succeeds.

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
        from .review import finish_label, previous_run, review_info
        from .review_checks import image_digest
        from .volume import apply_preset, intensity_summary, resolve_preset

        if previous is not None and not isinstance(previous, SegmentResult):
            raise InputError(f"previous must be the SegmentResult of an earlier run; got {type(previous).__name__}.")
        if events is not None and not all(callable(getattr(events, name, None)) for name in ("progress", "slice_done", "is_cancelled")):
            raise InputError(
                "events must have progress, slice_done and is_cancelled methods (see oflsam2.events.Events); "
                f"got {type(events).__name__}."
            )
        options = options or MethodOptions()
        events = events or Events()
        image = validate_run(
            image, supports, method=method, axis=axis, preset=preset, options=options, references=references,
            settings=self.settings,
        )
        preset = resolve_preset(image, preset)  # recorded by adapters: "auto" would say nothing
        run_slices = annotated_in_run(supports)
        digest = image_digest(image)
        update = None if previous is None else previous_run(previous, supports, image.shape, method, axis, run_slices, digest)
        started = time.perf_counter()
        events.progress("loading", 0, 1, f"loading {self.settings.model}")
        model = self.model
        events.progress("loading", 1, 1, f"{self.settings.model} on {model.device}")
        target = self.feature_cache(apply_preset(image, preset), axis)
        if update is None:  # an update encodes only the slices it visits
            target.encode(events=events)
        ctx = RunContext(model, Sam2Driver(model, target.position_encoding()), target, options, events, axis, preset)
        ctx.previous = update
        ctx.staged = staged
        ctx.intensity = intensity_summary(image)
        reference_slices = [
            (self.feature_cache(apply_preset(np.asarray(r.image, dtype=np.float32), preset), axis), np.moveaxis(r.labels, axis, 0))
            for r in references
        ]
        masks = {}
        for support in supports:
            label_support = _support_set(support, axis, reference_slices, run_slices)
            with torch.no_grad(), deterministic_mode(self.settings.deterministic):
                result = runner(method)(ctx, label_support)
            result = finish_label(ctx, support.label, result)
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
            "model": model.name,
            "image_digest": digest,
            "labels": ctx.info,
            **review_info(ctx, run_slices, previous),
        }
        return SegmentResult(masks, axis, method, info)

    def update(self, image: np.ndarray, supports: Sequence[LabelSupport], previous: SegmentResult, **run) -> SegmentResult:
        """Re-propagate ``previous`` after the user corrected slices: :meth:`segment` with
        ``previous`` (``run``: its other keyword arguments, as for the first run). For ``ofl``,
        pass the first run's ``options.save_adapter`` folder as ``options.adapter`` so the
        trained head is reused and only warm-started (``options.warm_start_epochs``)."""
        return self.segment(image, supports, previous=previous, **run)


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


def annotated_in_run(supports: Sequence[LabelSupport]) -> list[int]:
    """Every slice annotated for any label of the run. Such a slice is annotated for every label:
    a label absent there is an "object absent" annotation, and the whole slice is kept as drawn."""
    return sorted({i for support in supports for i in support.slices})


def validate_run(
    image,
    supports: Sequence[LabelSupport],
    *,
    method: str = DEFAULT_METHOD,
    axis: int = 0,
    preset: str = "auto",
    options: MethodOptions | None = None,
    references: Sequence[Reference] = (),
    settings: ModelSettings | None = None,
) -> np.ndarray:
    """Check everything a run is given before any model work; return the image as float32.

    The one validation used by :meth:`Engine.segment`, the CLI and the Slicer logic: raises
    :class:`~oflsam2.errors.InputError` with what to change. The dataclasses check themselves
    when built; they are checked again here because their fields may have been changed since.
    """
    from .volume import check_preset

    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    if isinstance(axis, (bool, np.bool_)) or axis not in (0, 1, 2):
        raise InputError(f"The slice axis must be 0, 1 or 2 (array order); got {axis!r}.")
    if not isinstance(preset, str):
        raise InputError(f"The intensity preset must be a name such as 'auto' or 'mr'; got {preset!r}.")
    check_preset(preset)
    if options is not None and not isinstance(options, MethodOptions):
        raise InputError(f"options must be a MethodOptions, e.g. MethodOptions(epochs=10); got {type(options).__name__}.")
    check_method_options(options or MethodOptions())
    if settings is not None:
        check_model_settings(settings)
    try:
        image = np.asarray(image, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"The image must be a 3-D numeric array (z, y, x); got {type(image).__name__}.") from None
    if image.ndim != 3:
        raise InputError(f"The image must be a 3-D volume (z, y, x); got shape {image.shape}.")
    if not np.isfinite(image).all():
        raise InputError("The image contains NaN or infinite voxels; fix or mask them before segmenting.")
    if isinstance(supports, LabelSupport) or not isinstance(supports, (list, tuple)):
        raise InputError(f"Give the supports as a list of LabelSupport; got {type(supports).__name__}.")
    if not supports:
        raise InputError("No label to segment: give at least one label with annotated slices or an adapter.")
    for s in supports:
        if not isinstance(s, LabelSupport):
            raise InputError(f"Each support must be a LabelSupport; got {type(s).__name__}.")
        LabelSupport.__post_init__(s)  # fields may have been replaced after construction
    if len({s.label for s in supports}) != len(supports):
        raise InputError("Each label may appear only once in one run.")
    if method == "ofl" and options is not None and (options.adapter or options.save_adapter):
        from .adapter_labels import check_distinct_names

        check_distinct_names((s.label, s.name) for s in supports)  # adapters are saved and found by name
    for s in supports:
        if s.mask.shape != image.shape:
            raise InputError(f"The support of label {s.name!r} has shape {s.mask.shape}, the image {image.shape}.")
        bad = [i for i in s.slices if not 0 <= i < image.shape[axis]]
        if bad:
            raise InputError(f"Annotated slice(s) {bad[:10]} of label {s.name!r} lie outside the volume (0..{image.shape[axis] - 1}).")
    if not isinstance(references, (list, tuple)):
        raise InputError(f"Give the references as a list of Reference; got {type(references).__name__}.")
    for r in references:
        if not isinstance(r, Reference):
            raise InputError(f"Each reference must be a Reference; got {type(r).__name__}.")
        if np.shape(r.image) != np.shape(r.labels) or np.ndim(r.image) != 3:
            raise InputError(f"Reference {r.name!r}: image and labels must be 3-D arrays of the same shape.")
        _check_reference_values(r)
    if method == "sam2":
        for s in supports:
            if not any(np.take(s.mask, i, axis=axis).any() for i in annotated_in_run(supports)):
                raise InputError(
                    f"SAM2 propagation of label {s.name!r} needs a prompt in the volume itself: annotate it on at "
                    "least one slice, or use --method ofl, revsam2 or forward with --reference volumes."
                )
    return image


def _check_reference_values(reference: Reference) -> None:
    """A reference image needs finite numbers; its labels whole numbers from 0 (as a support)."""
    image, labels = np.asarray(reference.image), np.asarray(reference.labels)
    if image.dtype.kind not in "biuf" or labels.dtype.kind not in "biuf":
        raise InputError(f"Reference {reference.name!r}: image and labels must be numeric arrays.")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InputError(f"Reference {reference.name!r}: the image has NaN or infinite voxels; fix or mask them first.")
    whole = labels.dtype.kind != "f" or (np.isfinite(labels).all() and (labels == np.rint(labels)).all())
    if not whole or (labels.size and labels.min() < 0):
        raise InputError(f"Reference {reference.name!r}: labels must be whole numbers from 0 (0 = background).")


def _support_set(support: LabelSupport, axis: int, reference_slices, run_slices: Sequence[int]):
    from .methods.base import SupportSet, SupportSlice

    in_volume = {i: np.take(support.mask, i, axis=axis).astype(bool) for i in run_slices}
    external = [
        SupportSlice(cache, i, labels[i] == support.label)
        for cache, labels in reference_slices
        for i in range(labels.shape[0])
    ]
    return SupportSet(support.label, support.name, in_volume, external)
