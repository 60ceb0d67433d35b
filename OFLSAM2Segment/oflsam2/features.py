"""Slices as SAM2 inputs, and the per-volume cache of their image-encoder features.

Every slice is encoded once (in batches) and every later step — propagation, OFL-SAM2 training
epochs, RevSAM2's forward and reverse passes — reads the cache. One cache serves all labels and
methods run on the same volume.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backend import Sam2Model
from .events import RunEvents, check_cancel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """Image-encoder output of B slices, float32 on the model device (``S`` = image size).

    fpn0: (B, 32, S/4, S/4) and fpn1: (B, 64, S/8, S/8) — high-res decoder features
    (``conv_s0``/``conv_s1`` already applied); vision: (B, 256, S/16, S/16) — F in the papers.
    """

    fpn0: torch.Tensor
    fpn1: torch.Tensor
    vision: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.vision.shape[0]

    @property
    def high_res(self) -> list[torch.Tensor]:
        return [self.fpn0, self.fpn1]

    def expand(self, batch_size: int) -> "Backbone":
        """Repeat a single slice's features as a batch (no copy)."""
        return Backbone(*(t.expand(batch_size, -1, -1, -1) for t in (self.fpn0, self.fpn1, self.vision)))


class SliceStack:
    """Slices of one intensity-normalised volume along one array axis.

    ``volume`` is (z, y, x) float in [0, 1]; slice ``i`` is the plane at index ``i`` of ``axis``,
    shape (H, W) = the two remaining axes in order.
    """

    def __init__(self, volume: np.ndarray, axis: int):
        self.slices = np.moveaxis(np.asarray(volume, dtype=np.float32), axis, 0)
        self.axis = axis

    def __len__(self) -> int:
        return self.slices.shape[0]

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.slices.shape[1], self.slices.shape[2]

    def frames(self, indices: Sequence[int], image_size: int, device: torch.device) -> torch.Tensor:
        """SAM2 input for the given slices: (B, 3, S, S), plain resize, ImageNet-normalised."""
        batch = torch.from_numpy(np.ascontiguousarray(self.slices[list(indices)])).to(device)
        return to_model_input(batch, image_size)


def to_model_input(slices: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, H, W) intensities in [0, 1] -> (B, 3, S, S) normalised as SAM2 was trained."""
    x = slices[:, None].float()
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def storage_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs (SAM2 runs under bf16 autocast there anyway), fp32 on CPU (exact)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class FeatureCache:
    """Encodes slices of a :class:`SliceStack` on demand and keeps them, least recently used first out.

    ``max_bytes`` bounds what is kept; an evicted slice is re-encoded when asked for again.
    """

    def __init__(
        self,
        model: Sam2Model,
        stack: SliceStack,
        *,
        dtype: torch.dtype = torch.float32,
        max_bytes: int = 4 << 30,
        batch_size: int = 4,
    ):
        self.model = model
        self.stack = stack
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.batch_size = max(1, batch_size)
        self._store: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self.vision_pos: torch.Tensor | None = None  # (1, 256, S/16, S/16), identical for all slices
        self.encoded = 0  # encoder passes (slices), re-encodes included

    def __len__(self) -> int:
        return len(self.stack)

    def position_encoding(self) -> torch.Tensor:
        """(1, 256, S/16, S/16) position encoding of the top level (the same for every slice)."""
        if self.vision_pos is None:
            self._encode_batch([0])
        return self.vision_pos

    def encode(self, indices: Sequence[int] | None = None, events: RunEvents | None = None) -> None:
        """Make sure the given slices (default: all) are cached, reporting ``encoding`` progress."""
        todo = [i for i in (range(len(self.stack)) if indices is None else indices) if i not in self._store]
        todo = list(dict.fromkeys(todo))
        for start in range(0, len(todo), self.batch_size):
            if events is not None:
                check_cancel(events)
                events.progress("encoding", start, len(todo), "encoding slices")
            self._encode_batch(todo[start : start + self.batch_size])
        if events is not None and todo:
            events.progress("encoding", len(todo), len(todo), "slices encoded")

    def backbone(self, indices: Sequence[int]) -> Backbone:
        """Cached features of the given slices, in that order, as float32 on the model device."""
        self.encode(indices)
        entries = []
        for i in indices:
            if i not in self._store:  # evicted meanwhile: the request is larger than the bound
                self._encode_batch([i])
            self._store.move_to_end(i)
            entries.append(self._store[i])
        return Backbone(*(torch.cat(level).to(self.model.device, torch.float32) for level in zip(*entries)))

    @torch.no_grad()
    def _encode_batch(self, indices: list[int]) -> None:
        frames = self.stack.frames(indices, self.model.image_size, self.model.device)
        with self.model.autocast():
            out = self.model.net.forward_image(frames)
        fpn = out["backbone_fpn"]
        if self.vision_pos is None:
            self.vision_pos = out["vision_pos_enc"][-1][:1].float().clone()
        keep_on = self.model.device if self.model.device.type == "cuda" else torch.device("cpu")
        for b, i in enumerate(indices):
            entry = tuple(level[b : b + 1].to(keep_on, self.dtype).clone() for level in fpn)
            self._store[i] = entry
            self._bytes += sum(t.numel() * t.element_size() for t in entry)
        self.encoded += len(indices)
        while self._bytes > self.max_bytes and len(self._store) > len(indices):
            _, old = self._store.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old)
