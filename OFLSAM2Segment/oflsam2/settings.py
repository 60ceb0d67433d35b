"""What a run is given: model settings, method options, label supports, references, the result,
and the method registry's names and titles.

A leaf of the engine (numpy and the standard library; no torch): the Slicer module, the CLI's
parsers and every engine module import these without loading a model's code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .volume import MAX_LABEL

# The method registry: every method's name and title. methods/__init__.py maps the same names to
# their runners (a test checks), so adding a method touches that table and these.
METHOD_TITLES = {
    "ofl": "OFL-SAM2",
    "revsam2": "RevSAM2",
    "forward": "Forward propagation (RevSAM2 stage 1)",
    "sam2": "SAM2 propagation",
}
METHODS = tuple(METHOD_TITLES)
DEFAULT_METHOD = "ofl"
# Offered in the Slicer module and the editor effect; ``forward`` (RevSAM2 without its reverse
# stage) is an ablation, for the CLI and experiments.
SLICER_METHODS = ("ofl", "revsam2", "sam2")
# Each method's model when the user names none: its paper's backbone (OFL-SAM2 used SAM2 base,
# RevSAM2 SAM2 tiny); plain propagation follows RevSAM2.
DEFAULT_MODELS = {"ofl": "sam2.1-base-plus", "revsam2": "sam2.1-tiny", "forward": "sam2.1-tiny", "sam2": "sam2.1-tiny"}
DEVICES = ("auto", "cuda", "mps", "cpu")
FEATURE_DTYPES = ("auto", "float32", "float16", "bfloat16")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 256, 2048  # SAM2 input sizes that fit its design and a GPU's memory
REVSAM2_MODES = ("full", "forward", "forward_fifo", "random")
RETRIEVALS = ("flat", "pooled")
SUPPORT_SAMPLINGS = ("even", "random")
INITIAL_FITS = ("episode", "even")
CANDIDATE_LOSSES = ("predicted", "min", "all")
OVERFIT_GUARDS = ("holdout", "none")
ONLINE_SOLVERS = ("gram", "samples")
TRAIN_SOLVERS = ("gram", "krylov", "samples")
SAMPLE_WEIGHTS = ("mean", "sum")
TAU_INITS = ("zero", "default")
OFL_LOSSES = ("ce_dice", "sam2")
MODEL_MEMORY_SLOTS = 7  # num_maskmem of every SAM2 and SAM2.1 config: the memory bank cannot hold more


@dataclass
class ModelSettings:
    """Which SAM2 to run and where. ``model`` is a name from ``oflsam2/models.json``
    (``sam2.1-tiny`` ... ``sam2-large``, ``medsam2``); by default the default method's (OFL-SAM2's)
    paper backbone, ``sam2.1-base-plus``: for RevSAM2's, name it (``default_model("revsam2")``)."""

    model: str = DEFAULT_MODELS[DEFAULT_METHOD]
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
    """Every method's knobs in one place; each method reads the ones it needs.

    ``MethodOptions()`` is OFL-SAM2 as its paper states it; :meth:`extended` is the project's own
    choices on top of it (:data:`EXTENDED_OFL`); :func:`ofl_preset` says which a value is.
    """

    # SAM2 propagation / shared
    num_maskmem: int | None = None  # None -> the model's own (7)
    # OFL-SAM2 (paper values; docs/methods.md has the extended ones)
    epochs: int = 40
    lr: float = 1e-3
    lr_milestones: tuple[int, ...] = (10, 30)
    gamma: float = 0.8  # confidence gate S_cf > gamma
    num_retrieved: int = 2  # K in the paper: top-K support memories by cosine similarity
    retrieval: str = "flat"  # flat | pooled
    learner_iters_train: int = 10
    learner_iters_online: int = 5
    learner_iters_first: int | None = None  # the first tau at inference; None: learner_iters_online (paper)
    use_learner: bool = True
    use_afm: bool = True
    online_update: bool = True
    exclude_radius: int = 2  # leave-one-slice-out: also exclude annotated slices within +-2
    max_fit_slices: int | None = None  # learner samples per fit (training episodes, first tau); None: all (paper)
    max_online_samples: int | None = None  # accepted slices kept as learner samples (oldest dropped); None: all (paper)
    sample_weights: str = "mean"  # the learner's sample weights: mean (1/N, LWL's code) | sum (1 each)
    tau_init: str = "zero"  # tau_0 of every fit: zero (LWL's initializer) | default (PyTorch's conv initialisation)
    loss: str = "ce_dice"  # ce_dice (paper: CE + Dice, every episode) | sam2 (mask loss on object episodes + object BCE)
    adapter_empty_slices: int | None = None  # empty support slices an adapter keeps; None: all
    seed: int = 0
    adapter: str | None = None  # saved adapter directory: segment without support, or warm start
    save_adapter: str | None = None  # directory to write the trained adapter(s) into
    warm_start_epochs: int = 10  # --adapter with new support; scaled by the share of support new to it (an update: corrected slices)
    # OFL-SAM2 choices the paper leaves open: its reading here; MethodOptions.extended() turns the project's on
    initial_fit: str = "episode"  # episode (as training fits: own slices first, objects, by similarity) | even
    fit_empty_fraction: float = 0.25  # share of a capped fit set kept for empty slices (negatives)
    retrieval_object_guarantee: bool = False  # a retrieved memory holds the object if any support does
    empty_episodes_per_object: float | None = None  # empty-slice training episodes per object episode; None: all
    episode_recent_memories: bool = False  # training E1 also sees ground-truth recent memories
    candidate_loss: str = "predicted"  # mask loss on the candidate inference outputs | min | all
    overfit_guard: str = "none"  # holdout: below holdout_below_episodes keep the weights best on held-out episodes | none
    holdout_below_episodes: int = 16
    accept_absent: bool = False  # confident "object absent" predictions enter the memory bank
    learner_backprop_iters: int | None = None  # training backpropagates through the last N learner steps | None (all)
    online_solver: str = "gram"  # online tau updates on Gram statistics (fixed cost) | samples (same steps)
    train_solver: str = "gram"  # episode tau in its Krylov space from Gram statistics | krylov (from the samples) | samples
    # RevSAM2
    top_k: int = 3
    revsam2_mode: str = "full"  # full | forward | forward_fifo | random
    include_supports_in_propagation: bool = False
    max_supports: int | None = 10  # non-empty support slices used (None: all); the paper uses 10
    support_sampling: str = "even"  # even | random (by seed): which supports when there are more
    forward_batch_size: int = 4  # query slices per forward pass

    def __post_init__(self):
        check_method_options(self)

    @classmethod
    def extended(cls, **changes) -> MethodOptions:
        """The ``extended`` preset: the paper plus the project's choices (:data:`EXTENDED_OFL`);
        ``changes`` (any fields) apply on top."""
        return cls(**{**EXTENDED_OFL, **changes})

    @classmethod
    def preset(cls, name: str, **changes) -> MethodOptions:
        """``MethodOptions()`` (``paper``) or :meth:`extended` (``extended``), then ``changes``."""
        _choice(name, OFL_PRESETS, "OFL-SAM2 preset")
        return cls.extended(**changes) if name == "extended" else cls(**changes)


# The OFL-SAM2 fields where the `extended` preset departs from the paper (MethodOptions() holds
# the paper's values): the project's own choices, each described in docs/methods.md.
EXTENDED_OFL = {
    "retrieval_object_guarantee": True,  # the 2nd retrieved slice replaced by an object slice when both are empty
    "max_fit_slices": 64,  # own slices, then ~75 % object slices ranked by similarity, fixed for the sweep
    "max_online_samples": 32,  # a window of accepted slices
    "learner_iters_first": 10,  # the first tau at inference as training fits it
    "accept_absent": True,  # confident empty predictions enter the memory bank
    "empty_episodes_per_object": 1.0,  # empty episodes re-balanced to one per object episode
    "overfit_guard": "holdout",  # a held-out third and best-epoch restore below 16 episodes
    "episode_recent_memories": True,  # training E1 sees ground-truth recent memories
    "loss": "sam2",  # mask loss on object episodes only, plus BCE on the object score
    "adapter_empty_slices": 16,  # an adapter keeps every object slice and 16 empty ones
    "train_solver": "krylov",  # each episode's Krylov space from its samples (the same steps as gram)
}
OFL_PRESETS = ("paper", "extended")


def ofl_preset(options: MethodOptions) -> str:
    """``paper`` or ``extended`` when ``options`` hold that preset's value in every field of
    :data:`EXTENDED_OFL`, else ``custom``: what run records say beside every field."""
    paper = MethodOptions.__dataclass_fields__
    if all(getattr(options, name) == paper[name].default for name in EXTENDED_OFL):
        return "paper"
    if all(getattr(options, name) == value for name, value in EXTENDED_OFL.items()):
        return "extended"
    return "custom"


@dataclass
class SegmentResult:
    """Final masks per label, bool ``(z, y, x)``, plus what was done."""

    masks: dict[int, np.ndarray]
    axis: int
    method: str
    info: dict = field(default_factory=dict)


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
    for name in ("random_weights", "deterministic"):
        _flag(getattr(settings, name), name)


def check_method_options(options: MethodOptions) -> None:
    """Raise :class:`InputError` for a field of ``options`` that cannot work."""
    if options.num_maskmem is not None:
        _whole(options.num_maskmem, "num_maskmem", 1)
        if options.num_maskmem > MODEL_MEMORY_SLOTS:
            raise InputError(
                f"num_maskmem must be at most {MODEL_MEMORY_SLOTS}, the memory slots of the SAM2 models; "
                f"got {options.num_maskmem}."
            )
    _whole(options.epochs, "epochs", 0)
    _whole(options.warm_start_epochs, "warm_start_epochs", 0)
    _number(options.lr, "lr", 0.0, None, open_low=True)
    _number(options.gamma, "gamma", 0.0, 1.0)
    _whole(options.num_retrieved, "num_retrieved", 1)
    _choice(options.retrieval, RETRIEVALS, "retrieval")
    _whole(options.learner_iters_train, "learner_iters_train", 0)
    _whole(options.learner_iters_online, "learner_iters_online", 0)
    _whole(options.exclude_radius, "exclude_radius", 0)
    for name in ("learner_iters_first", "max_fit_slices", "max_online_samples", "adapter_empty_slices"):
        if getattr(options, name) is not None:
            _whole(getattr(options, name), name, 1 if name.startswith("max_") else 0)
    _choice(options.sample_weights, SAMPLE_WEIGHTS, "sample weighting")
    _choice(options.tau_init, TAU_INITS, "tau initialisation")
    _choice(options.loss, OFL_LOSSES, "OFL-SAM2 loss")
    _whole(options.seed, "seed", 0)
    _whole(options.top_k, "top_k", 1)
    _choice(options.revsam2_mode, REVSAM2_MODES, "RevSAM2 mode")
    if options.max_supports is not None:
        _whole(options.max_supports, "max_supports", 1)
    _choice(options.support_sampling, SUPPORT_SAMPLINGS, "support sampling")
    _whole(options.forward_batch_size, "forward_batch_size", 1)
    _choice(options.initial_fit, INITIAL_FITS, "initial fit")
    _number(options.fit_empty_fraction, "fit_empty_fraction", 0.0, 1.0)
    if options.empty_episodes_per_object is not None:
        _number(options.empty_episodes_per_object, "empty_episodes_per_object", 0.0, None)
    _choice(options.candidate_loss, CANDIDATE_LOSSES, "candidate loss")
    _choice(options.overfit_guard, OVERFIT_GUARDS, "overfit guard")
    _whole(options.holdout_below_episodes, "holdout_below_episodes", 0)
    if options.learner_backprop_iters is not None:
        _whole(options.learner_backprop_iters, "learner_backprop_iters", 1)
    _choice(options.online_solver, ONLINE_SOLVERS, "online solver")
    _choice(options.train_solver, TRAIN_SOLVERS, "training solver")
    for name in ("use_learner", "use_afm", "online_update", "retrieval_object_guarantee", "episode_recent_memories",
                 "accept_absent", "include_supports_in_propagation"):
        _flag(getattr(options, name), name)
    if not isinstance(options.lr_milestones, (list, tuple)):
        raise InputError(f"lr_milestones must be a list of epochs, e.g. (10, 30); got {options.lr_milestones!r}.")
    for milestone in options.lr_milestones:
        _whole(milestone, "lr_milestones", 0)
    for name in ("adapter", "save_adapter"):
        value = getattr(options, name)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise InputError(f"{name} must be a folder path; got {value!r}.")


def _whole(value, name: str, minimum: int) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be a whole number of at least {minimum}; got {value!r}.")


def _flag(value, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False; got {value!r}.")


def _number(value, name: str, low: float, high: float | None, open_low: bool = False) -> None:
    valid = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
    valid = valid and np.isfinite(value) and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not valid:
        bounds = f"between {low} and {high}" if high is not None else f"above {low}"
        raise InputError(f"{name} must be a number {bounds}; got {value!r}.")


def _choice(value, choices, name: str) -> None:
    if value not in choices:
        raise InputError(f"Unknown {name} {value!r}; choose one of: {', '.join(choices)}.")


def default_model(method: str) -> str:
    """The model a run of ``method`` uses when the user names none (see DEFAULT_MODELS)."""
    return DEFAULT_MODELS.get(method, DEFAULT_MODELS["sam2"])
