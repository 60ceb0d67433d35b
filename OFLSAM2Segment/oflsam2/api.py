"""The engine's public entry point, shared by the CLI, the Slicer worker and the tests.

Arrays are numpy ``(z, y, x)`` as SimpleITK returns them (Slicer's KJI order). A run segments
one volume for one or more labels, one binary propagation per label, along one array axis.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import InputError
from .events import Events, RunEvents
from .volume import MAX_LABEL

METHODS = ("ofl", "revsam2", "forward", "sam2")
# Each method's model when the user names none: its paper's backbone (OFL-SAM2 used SAM2 base,
# RevSAM2 SAM2 tiny); plain propagation follows RevSAM2.
DEFAULT_MODELS = {"ofl": "sam2.1-base-plus", "revsam2": "sam2.1-tiny", "forward": "sam2.1-tiny", "sam2": "sam2.1-tiny"}
DEVICES = ("auto", "cuda", "mps", "cpu")
FEATURE_DTYPES = ("auto", "float32", "float16", "bfloat16")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 256, 2048  # SAM2 input sizes that fit its design and a GPU's memory
REVSAM2_MODES = ("full", "forward", "forward_fifo", "random")
RETRIEVALS = ("flat", "pooled")
SUPPORT_SAMPLINGS = ("even", "random")


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

    def __post_init__(self):
        check_model_settings(self)


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

    def __post_init__(self):
        """Refuse what cannot be a support; a 0/1 mask of another type or a list becomes bool."""
        if isinstance(self.label, (bool, np.bool_)) or not isinstance(self.label, (int, np.integer)) or not 0 < self.label <= MAX_LABEL:
            raise InputError(f"A label value must be a whole number from 1 to {MAX_LABEL}; got {self.label!r}.")
        self.label = int(self.label)
        if not isinstance(self.name, str) or not self.name.strip() or any(c in self.name for c in "\r\n"):
            raise InputError(f"The name of label {self.label} must be one line of text; got {self.name!r}.")
        try:
            mask = np.asarray(self.mask)
        except (TypeError, ValueError):
            mask = np.asarray(None)
        if mask.ndim != 3 or mask.dtype.kind not in "biuf":
            raise InputError(
                f"The mask of label {self.name!r} must be a 3-D (z, y, x) bool array; got "
                f"{type(self.mask).__name__} of shape {mask.shape}."
            )
        if mask.dtype != bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise InputError(
                    f"The mask of label {self.name!r} holds values other than 0 and 1; give a bool array "
                    "(True inside the object), e.g. labels == value."
                )
            mask = mask.astype(bool)
        self.mask = mask
        if not isinstance(self.slices, (list, tuple, range, np.ndarray)) or np.ndim(self.slices) != 1:
            raise InputError(f"The slices of label {self.name!r} must be a list of whole numbers; got {self.slices!r}.")
        for index in self.slices:
            if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or index < 0:
                raise InputError(
                    f"The slices of label {self.name!r} must be whole numbers from 0; got {index!r} in {list(self.slices)!r}."
                )
        self.slices = sorted({int(i) for i in self.slices})


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
    # OFL-SAM2 choices (issue 10); the value after "|" restores the behaviour before it
    initial_fit: str = "episode"  # episode (as training fits: own slices, objects first, 10 iters) | even
    fit_empty_fraction: float = 0.25  # share of a fit set kept for empty slices (negatives)
    retrieval_object_guarantee: bool = True  # a retrieved memory holds the object if any support does | False
    empty_episodes_per_object: float | None = 1.0  # empty-slice training episodes per object episode | None (all)
    episode_recent_memories: bool = True  # training E1 also sees ground-truth recent memories | False
    candidate_loss: str = "predicted"  # mask loss on the candidate inference outputs | min | all
    overfit_guard: str = "holdout"  # below holdout_below_episodes, keep the weights best on held-out episodes | none
    holdout_below_episodes: int = 16
    accept_absent: bool = True  # confident "object absent" predictions enter the memory bank | False
    learner_backprop_iters: int | None = None  # training backpropagates through the last N learner steps | None (all)
    online_solver: str = "gram"  # online tau updates on Gram statistics (fixed cost) | samples (same steps)
    # RevSAM2
    top_k: int = 3
    revsam2_mode: str = "full"  # full | forward | forward_fifo | random
    include_supports_in_propagation: bool = False
    max_supports: int | None = 10  # non-empty support slices used (None: all); the paper uses 10
    support_sampling: str = "even"  # even | random (by seed): which supports when there are more
    forward_batch_size: int = 4  # query slices per forward pass

    def __post_init__(self):
        check_method_options(self)


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
        method: str = "ofl",
        axis: int = 0,
        preset: str = "auto",
        options: MethodOptions | None = None,
        references: Sequence[Reference] = (),
        events: RunEvents | None = None,
        previous: SegmentResult | None = None,
    ) -> SegmentResult:
        """Segment ``image`` (raw intensities, ``(z, y, x)``) for every label in ``supports``.

        ``previous``: an earlier result of this image, method and axis to update after a
        correction (see :func:`oflsam2.review.previous_run`): slices annotated now but drawn
        differently there are the edits, propagation restarts from them only, and every slice it
        does not reach keeps the previous result. ``info["quality"]`` holds each label's per-slice
        quality; :func:`oflsam2.review.suggest` reads it.

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
        from .volume import apply_preset, intensity_summary, resolve_preset

        if previous is not None and not isinstance(previous, SegmentResult):
            raise InputError(f"previous must be the SegmentResult of an earlier run; got {type(previous).__name__}.")
        if events is not None and not all(callable(getattr(events, name, None)) for name in ("progress", "slice_done", "is_cancelled")):
            raise InputError(f"events must have progress, slice_done and is_cancelled methods (see oflsam2.events.Events); got {type(events).__name__}.")
        options = options or MethodOptions()
        events = events or Events()
        image = validate_run(
            image, supports, method=method, axis=axis, preset=preset, options=options, references=references,
            settings=self.settings,
        )
        preset = resolve_preset(image, preset)  # recorded by adapters: "auto" would say nothing
        run_slices = annotated_in_run(supports)
        update = None if previous is None else previous_run(previous, supports, image.shape, method, axis, run_slices)
        started = time.perf_counter()
        events.progress("loading", 0, 1, f"loading {self.settings.model}")
        model = self.model
        events.progress("loading", 1, 1, f"{self.settings.model} on {model.device}")
        target = self.feature_cache(apply_preset(image, preset), axis)
        if update is None:  # an update encodes only the slices it visits
            target.encode(events=events)
        ctx = RunContext(model, Sam2Driver(model, target.position_encoding()), target, options, events, axis, preset)
        ctx.previous = update
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


def default_model(method: str) -> str:
    """The model a run of ``method`` uses when the user names none (see DEFAULT_MODELS)."""
    return DEFAULT_MODELS.get(method, DEFAULT_MODELS["sam2"])


def annotated_in_run(supports: Sequence[LabelSupport]) -> list[int]:
    """Every slice annotated for any label of the run. Such a slice is annotated for every label:
    a label absent there is an "object absent" annotation, and the whole slice is kept as drawn."""
    return sorted({i for support in supports for i in support.slices})


def validate_run(
    image,
    supports: Sequence[LabelSupport],
    *,
    method: str = "ofl",
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


def check_model_settings(settings: ModelSettings) -> None:
    """Raise :class:`InputError` for a field of ``settings`` that cannot work."""
    if not isinstance(settings.model, str) or not settings.model:
        raise InputError(f"The model must be a name such as 'sam2.1-tiny'; got {settings.model!r}.")
    size = settings.image_size
    if (
        isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer))
        or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE or size % 32
    ):
        raise InputError(
            f"Image size {size!r} is not supported: use a multiple of 32 from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
            "(SAM2 models are trained at 1024; MedSAM2 at 512)."
        )
    _choice(settings.device, DEVICES, "device")
    _choice(settings.feature_dtype, FEATURE_DTYPES, "feature dtype")
    _whole(settings.cache_megabytes, "cache_megabytes", 0)
    _whole(settings.encode_batch_size, "encode_batch_size", 1)


def check_method_options(options: MethodOptions) -> None:
    """Raise :class:`InputError` for a field of ``options`` that cannot work."""
    if options.num_maskmem is not None:
        _whole(options.num_maskmem, "num_maskmem", 1)
    _whole(options.epochs, "epochs", 0)
    _whole(options.warm_start_epochs, "warm_start_epochs", 0)
    _number(options.lr, "lr", 0.0, None, open_low=True)
    _number(options.gamma, "gamma", 0.0, 1.0)
    _whole(options.num_retrieved, "num_retrieved", 1)
    _choice(options.retrieval, RETRIEVALS, "retrieval")
    _whole(options.learner_iters_train, "learner_iters_train", 0)
    _whole(options.learner_iters_online, "learner_iters_online", 0)
    _whole(options.exclude_radius, "exclude_radius", 0)
    _whole(options.max_fit_slices, "max_fit_slices", 1)
    _whole(options.seed, "seed", None)
    _whole(options.top_k, "top_k", 1)
    _choice(options.revsam2_mode, REVSAM2_MODES, "RevSAM2 mode")
    if options.max_supports is not None:
        _whole(options.max_supports, "max_supports", 1)
    _choice(options.support_sampling, SUPPORT_SAMPLINGS, "support sampling")
    _whole(options.forward_batch_size, "forward_batch_size", 1)
    if not isinstance(options.lr_milestones, (list, tuple)):
        raise InputError(f"lr_milestones must be a list of epochs, e.g. (10, 30); got {options.lr_milestones!r}.")
    for milestone in options.lr_milestones:
        _whole(milestone, "lr_milestones", 0)
    for name in ("adapter", "save_adapter"):
        value = getattr(options, name)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise InputError(f"{name} must be a folder path; got {value!r}.")


def _whole(value, name: str, minimum: int | None) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or (
        minimum is not None and value < minimum
    ):
        at_least = "" if minimum is None else f" of at least {minimum}"
        raise InputError(f"{name} must be a whole number{at_least}; got {value!r}.")


def _number(value, name: str, low: float, high: float | None, open_low: bool = False) -> None:
    valid = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
    valid = valid and np.isfinite(value) and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not valid:
        bounds = f"between {low} and {high}" if high is not None else f"above {low}"
        raise InputError(f"{name} must be a number {bounds}; got {value!r}.")


def _choice(value, choices, name: str) -> None:
    if value not in choices:
        raise InputError(f"Unknown {name} {value!r}; choose one of: {', '.join(choices)}.")


def _support_set(support: LabelSupport, axis: int, reference_slices, run_slices: Sequence[int]):
    from .methods.base import SupportSet, SupportSlice

    in_volume = {i: np.take(support.mask, i, axis=axis).astype(bool) for i in run_slices}
    external = [
        SupportSlice(cache, i, labels[i] == support.label)
        for cache, labels in reference_slices
        for i in range(labels.shape[0])
    ]
    return SupportSet(support.label, support.name, in_volume, external)
