"""Build a frozen SAM2 / SAM2.1 model from ``sam2``'s own configs.

The model is built as ``SAM2VideoPredictor`` (a ``SAM2Base`` subclass) with the predictor's
post-processing overrides, so that the engine's driver and SAM2's own video predictor run the
very same network; the engine then calls ``SAM2Base`` internals directly.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from .errors import CheckpointError, InputError
from .settings import ModelSettings

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0
RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: the SAM2 architecture is built untrained (fixed seed). Masks are "
    "meaningless; use this only for tests, smoke runs and benchmarks."
)

# SAM2VideoPredictor's build-time overrides (``build_sam2_video_predictor`` with post-processing).
_PREDICTOR_OVERRIDES = [
    "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
]


@dataclass
class Sam2Model:
    """A frozen SAM2 network plus what identifies it (for adapters and caches)."""

    net: torch.nn.Module  # sam2.sam2_video_predictor.SAM2VideoPredictor, eval mode, no grads
    name: str
    config: str
    version: str  # "2.1" or "1"
    image_size: int
    device: torch.device
    weights_id: str  # checkpoint SHA256, or "random-weights:<seed>"

    @property
    def random_weights(self) -> bool:
        return self.weights_id.startswith("random-weights")

    def autocast(self):
        """bf16 autocast on CUDA (as SAM2's demos run); plain fp32 elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit but unavailable device is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("Device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("Device 'mps' was requested but Apple MPS is not available; use --device cpu or auto.")
    if name not in ("cuda", "mps", "cpu"):
        raise InputError(f"Unknown device {name!r}; choose auto, cuda, mps or cpu.")
    return torch.device(name)


def check_image_size(image_size: int) -> None:
    if image_size < 256 or image_size % 32:
        raise InputError(
            f"Image size {image_size} is not supported: SAM2 needs a multiple of 32, at least 256 "
            "(1024 is the size SAM2 was trained at)."
        )


def load_sam2(settings: ModelSettings) -> Sam2Model:
    """Build the model named in ``settings`` with its checkpoint (or random weights)."""
    import sam2  # noqa: F401  (initialises Hydra's config search path)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .checkpoints import checkpoint_version, load_manifest, read_state_dict, resolve_checkpoint, sha256_file

    manifest = load_manifest()
    if settings.model not in manifest:
        raise InputError(f"Unknown model {settings.model!r}; choose one of: {', '.join(sorted(manifest))}.")
    entry = manifest[settings.model]
    check_image_size(settings.image_size)
    device = pick_device(settings.device)

    state_dict = None
    if settings.random_weights:
        weights_id = f"random-weights:{RANDOM_WEIGHTS_SEED}"
        log.warning(RANDOM_WEIGHTS_WARNING)
    else:
        path = resolve_checkpoint(settings.model, settings.checkpoint)
        state_dict = read_state_dict(path, settings.model)
        found = checkpoint_version(state_dict)
        if found != entry["version"]:
            raise CheckpointError(
                f"The checkpoint {path} holds SAM2 v{found} weights but the model {settings.model!r} "
                f"is SAM2 v{entry['version']}; pick a 'sam{'2.1' if found == '2.1' else '2'}-...' model "
                "that matches the file, or give the matching checkpoint."
            )
        weights_id = sha256_file(path)

    overrides = _PREDICTOR_OVERRIDES + [f"++model.image_size={settings.image_size}"]
    cfg = compose(config_name=entry["config"], overrides=overrides)
    OmegaConf.resolve(cfg)
    with torch.random.fork_rng(devices=[]):  # built on the CPU: CUDA's generators are never seeded
        torch.default_generator.manual_seed(RANDOM_WEIGHTS_SEED)
        net = instantiate(cfg.model, _recursive_=True)
    if state_dict is not None:
        try:
            missing, unexpected = net.load_state_dict(state_dict, strict=False)
        except RuntimeError as exc:  # tensor shape mismatch: another model size
            raise CheckpointError(
                f"The checkpoint does not fit the {settings.model!r} architecture ({exc}); "
                "choose the model size that matches the file."
            ) from exc
        if missing or unexpected:
            raise CheckpointError(
                f"The checkpoint does not fit the {settings.model!r} architecture "
                f"({len(missing)} missing, {len(unexpected)} unexpected weights, e.g. "
                f"{(missing or unexpected)[0]!r}); choose the model size that matches the file."
            )
    net.fill_hole_area = 0  # hole filling needs sam2's optional CUDA extension; keep CPU/GPU identical
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return Sam2Model(
        net=net,
        name=settings.model,
        config=entry["config"],
        version=entry["version"],
        image_size=settings.image_size,
        device=device,
        weights_id=weights_id,
    )
