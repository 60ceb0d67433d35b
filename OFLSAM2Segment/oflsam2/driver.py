"""One memory-bank driver over ``SAM2Base`` internals, shared by every method.

SAM2's video predictor hides its memory bank behind frame indices. The methods here need banks
it cannot express (OFL-SAM2 retrieves support slices of other volumes per query slice; RevSAM2
conditions on one query slice to re-predict supports), so the bank is assembled explicitly:
spatial memories with their temporal slot and object pointers with their signed distance.
:class:`TrackedVolume` rebuilds exactly the bank the predictor would build, which the parity
test checks against ``SAM2VideoPredictor`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sam2.modeling.sam2_utils import get_1d_sine_pe, select_closest_cond_frames

from .backend import Sam2Model
from .features import Backbone


@dataclass
class Memory:
    """One slice's entry in a memory bank.

    features: (B, 64, S/16, S/16), stored in bf16 as SAM2's predictor stores them;
    obj_ptr: (B, 256); object_score: (B, 1) logit (> 0: object present).
    """

    features: torch.Tensor
    obj_ptr: torch.Tensor
    object_score: torch.Tensor


@dataclass
class Prediction:
    """SAM2 head output for B slices: low_res (B, 1, S/4, S/4) and high_res (B, 1, S, S) mask
    logits (object-score gated), obj_ptr (B, 256), object_score (B, 1), and iou (B, 1): the
    decoder's predicted IoU of the mask it output (1 for a given mask)."""

    low_res: torch.Tensor
    high_res: torch.Tensor
    obj_ptr: torch.Tensor
    object_score: torch.Tensor
    iou: torch.Tensor | None = None


class Sam2Driver:
    """Calls the frozen SAM2 pieces: memory attention, heads, memory encoder."""

    def __init__(self, model: Sam2Model, vision_pos: torch.Tensor):
        """``vision_pos``: (1, 256, S/16, S/16) position encoding of the top feature level."""
        self.model = model
        self.net = model.net
        self.vision_pos = vision_pos.to(model.device)
        # The memory encoder's sine position encoding depends only on the map size: compute it
        # once, (1, 64, S/16, S/16), so banks loaded from an adapter need no encoder pass.
        h, w = self.vision_pos.shape[-2:]
        probe = torch.zeros(1, self.net.mem_dim, h, w, device=model.device)
        self._maskmem_pos = self.net.memory_encoder.position_encoding(probe).float()

    @property
    def num_maskmem(self) -> int:
        return self.net.num_maskmem

    # -- inputs and outputs -------------------------------------------------------------------
    def mask_to_model(self, masks: np.ndarray) -> torch.Tensor:
        """(B, H, W) bool slices -> (B, 1, S, S) float {0, 1} as ``add_new_mask`` resizes them."""
        x = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None].to(self.model.device)
        size = self.model.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            x = (x >= 0.5).float()
        return x

    @staticmethod
    def to_slice_logits(low_res: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """(B, 1, s, s) logits -> (B, H, W) logits at the slice's own size (bilinear)."""
        return F.interpolate(low_res.float(), size=shape, mode="bilinear", align_corners=False)[:, 0]

    def to_slice_masks(self, low_res: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
        """(B, 1, s, s) logits -> (B, H, W) bool masks."""
        return (self.to_slice_logits(low_res, shape) > 0).cpu().numpy()

    # -- SAM2 steps -------------------------------------------------------------------------------
    def attend(
        self,
        backbone: Backbone,
        spatial: Sequence[tuple[int, Memory]],
        pointers: Sequence[tuple[int, torch.Tensor]],
        num_frames: int,
    ) -> torch.Tensor:
        """Memory attention: E1 = image features conditioned on a bank -> (B, 256, h, w).

        spatial: (distance, memory) pairs; distance 0 marks a conditioning memory, d >= 1 the
        slice d steps back. As in SAM2, a recent memory's temporal encoding is indexed by its
        distance (``maskmem_tpos_enc[d - 1]``) and a conditioning memory's by the table's last
        entry, so a bank with fewer recent slots than the model's (``num_maskmem`` option) keeps
        each memory's true distance. pointers: (signed distance, obj_ptr (B or 1, 256)).
        ``num_frames`` sets the pointer-distance normalisation as in SAM2.
        """
        net, B = self.net, backbone.batch_size
        C, h, w = backbone.vision.shape[1:]
        memories, memory_pos = [], []
        for distance, mem in spatial:
            if not 0 <= distance < net.num_maskmem:
                raise ValueError(f"A recent memory must lie 1..{net.num_maskmem - 1} slices back; got {distance}.")
            memories.append(mem.features.expand(B, -1, -1, -1).flatten(2).permute(2, 0, 1))
            pos = self._maskmem_pos.flatten(2).permute(2, 0, 1)
            slot = net.num_maskmem - 1 if distance == 0 else distance - 1
            memory_pos.append((pos + net.maskmem_tpos_enc[slot]).expand(-1, B, -1))
        num_ptr_tokens = 0
        if pointers and net.use_obj_ptrs_in_encoder:
            distances, ptrs = zip(*pointers)
            ptrs = torch.stack([p.expand(B, -1) for p in ptrs], dim=0)  # (P, B, C)
            if net.add_tpos_enc_to_obj_ptrs:
                t_diff_max = max(min(num_frames, net.max_obj_ptrs_in_encoder) - 1, 1)
                tpos_dim = C if net.proj_tpos_enc_in_obj_ptrs else net.mem_dim
                ptr_pos = torch.tensor(distances, device=ptrs.device)
                ptr_pos = net.obj_ptr_tpos_proj(get_1d_sine_pe(ptr_pos / t_diff_max, dim=tpos_dim))
                ptr_pos = ptr_pos.unsqueeze(1).expand(-1, B, net.mem_dim)
            else:
                ptr_pos = ptrs.new_zeros(len(distances), B, net.mem_dim)
            if net.mem_dim < C:  # one 256-d pointer -> 4 tokens of 64
                split = C // net.mem_dim
                ptrs = ptrs.reshape(-1, B, split, net.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
                ptr_pos = ptr_pos.repeat_interleave(split, dim=0)
            memories.append(ptrs)
            memory_pos.append(ptr_pos)
            num_ptr_tokens = ptrs.shape[0]
        curr = backbone.vision.flatten(2).permute(2, 0, 1)
        curr_pos = self.vision_pos.expand(B, -1, -1, -1).flatten(2).permute(2, 0, 1)
        with self.model.autocast():
            out = net.memory_attention(
                curr=[curr],
                curr_pos=[curr_pos],
                memory=torch.cat(memories, dim=0),
                memory_pos=torch.cat(memory_pos, dim=0),
                num_obj_ptr_tokens=num_ptr_tokens,
            )
        return out.permute(1, 2, 0).reshape(B, C, h, w)

    def decode_candidates(self, pix_feat: torch.Tensor, backbone: Backbone):
        """The mask decoder before object-score gating (for training): three candidate low-res
        logits (B, 3, S/4, S/4), their IoU estimates (B, 3) and the object-score logit (B, 1)."""
        net, B = self.net, pix_feat.shape[0]
        no_points = (torch.zeros(B, 1, 2, device=pix_feat.device), -torch.ones(B, 1, dtype=torch.int32, device=pix_feat.device))
        with self.model.autocast():
            sparse, dense = net.sam_prompt_encoder(points=no_points, boxes=None, masks=None)
            logits, ious, _, object_score = net.sam_mask_decoder(
                image_embeddings=pix_feat,
                image_pe=net.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
                repeat_image=False,
                high_res_features=backbone.high_res,
            )
        return logits.float(), ious.float(), object_score.float()

    def decode(self, pix_feat: torch.Tensor, backbone: Backbone) -> Prediction:
        """SAM2 heads without prompts (multimask as SAM2 tracks): E (B, 256, h, w) -> Prediction."""
        with self.model.autocast():
            _, _, ious, low, high, ptr, score = self.net._forward_sam_heads(
                backbone_features=pix_feat,
                point_inputs=None,
                mask_inputs=None,
                high_res_features=backbone.high_res,
                multimask_output=self.net._use_multimask(is_init_cond_frame=False, point_inputs=None),
            )
        # With several candidates SAM2 outputs the one of highest predicted IoU.
        iou = ious.float().amax(dim=1, keepdim=True)
        return Prediction(low.float(), high.float(), ptr.float(), score.float(), iou)

    def mask_as_output(self, backbone: Backbone, masks: torch.Tensor) -> Prediction:
        """A given mask (B, 1, S, S) in {0, 1} taken as the slice's output (±10 logits)."""
        with self.model.autocast():
            _, _, ious, low, high, ptr, score = self.net._use_mask_as_output(backbone.vision, backbone.high_res, masks)
        return Prediction(low.float(), high.float(), ptr.float(), score.float(), ious.float()[:, :1])

    def encode_memory(self, backbone: Backbone, prediction: Prediction, binarize: bool, dtype=torch.bfloat16) -> Memory:
        """Memory of a slice from its high-res logits: binarised for given masks, soft for tracked
        predictions (SAM2's rule); no-object embedding when the object score is <= 0.
        Features are kept in bf16 as SAM2's predictor keeps them unless ``dtype`` says otherwise
        (OFL-SAM2's learner targets stay fp32)."""
        h, w = backbone.vision.shape[-2:]
        vision_seq = backbone.vision.flatten(2).permute(2, 0, 1)
        with self.model.autocast():
            features, _ = self.net._encode_new_memory(
                current_vision_feats=[vision_seq],
                feat_sizes=[(h, w)],
                pred_masks_high_res=prediction.high_res,
                object_score_logits=prediction.object_score,
                is_mask_from_pts=binarize,
            )
        return Memory(features.to(dtype), prediction.obj_ptr, prediction.object_score)

    def condition_on_mask(self, backbone: Backbone, masks: torch.Tensor, dtype=torch.bfloat16) -> tuple[Prediction, Memory]:
        """A slice with a given mask as a conditioning memory, exactly as the predictor's
        ``add_new_mask`` + propagation preflight: mask as output, then its low-res logits
        upsampled and binarised into the memory encoder."""
        prediction = self.mask_as_output(backbone, masks)
        size = self.model.image_size
        upsampled = F.interpolate(prediction.low_res, size=(size, size), mode="bilinear", align_corners=False)
        given = Prediction(prediction.low_res, upsampled, prediction.obj_ptr, prediction.object_score)
        memory = self.encode_memory(backbone, given, binarize=True, dtype=dtype)
        return prediction, memory

    def track(self, backbone: Backbone, spatial, pointers, num_frames: int) -> tuple[Prediction, Memory]:
        """Predict slices from a bank and encode their own memories (SAM2's tracking step)."""
        prediction = self.decode(self.attend(backbone, spatial, pointers, num_frames), backbone)
        return prediction, self.encode_memory(backbone, prediction, binarize=False)


class TrackedVolume:
    """The bank of one object tracked through a volume, with SAM2's video-predictor rules.

    Conditioning memories: every given slice (temporal slot 0). Recent memories: the tracked
    slices 1..num_maskmem-1 before the current one in the direction of travel (gaps stay gaps).
    Pointers: past conditioning slices plus tracked slices up to min(N, 16) - 1 back.
    ``extra``: memories from outside the volume (RevSAM2's supports, off by default) joining every
    bank as conditioning memories with pointer distance 1, since they have no place in the volume.
    """

    def __init__(self, net, num_frames: int, num_maskmem: int | None = None):
        self.net = net
        self.num_frames = num_frames
        self.num_maskmem = num_maskmem or net.num_maskmem
        self.cond: dict[int, Memory] = {}
        self.tracked: dict[int, Memory] = {}
        self.extra: list[Memory] = []

    def bank(self, index: int, reverse: bool) -> tuple[list[tuple[int, Memory]], list[tuple[int, torch.Tensor]]]:
        net, step = self.net, -1 if reverse else 1
        selected, unselected = select_closest_cond_frames(index, self.cond, net.max_cond_frames_in_attn)
        spatial = [(0, mem) for mem in selected.values()] + [(0, mem) for mem in self.extra]
        for distance in range(self.num_maskmem - 1, 0, -1):  # oldest first, as SAM2 orders them
            previous = index - step * distance
            mem = self.tracked.get(previous, unselected.get(previous))
            if mem is not None:
                spatial.append((distance, mem))
        past_cond = selected
        if net.only_obj_ptrs_in_the_past_for_eval:
            past_cond = {t: m for t, m in selected.items() if (t >= index if reverse else t <= index)}
        pointers = [
            ((index - t) * step if net.use_signed_tpos_enc_to_obj_ptrs else abs(index - t), mem.obj_ptr)
            for t, mem in past_cond.items()
        ]
        pointers += [(1, mem.obj_ptr) for mem in self.extra]
        for t_diff in range(1, min(self.num_frames, net.max_obj_ptrs_in_encoder)):
            t = index - step * t_diff
            if t < 0 or t >= self.num_frames:
                break
            mem = self.tracked.get(t, unselected.get(t))
            if mem is not None:
                pointers.append((t_diff, mem.obj_ptr))
        return spatial, pointers
