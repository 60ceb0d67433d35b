"""OFL-SAM2's support bank and its retrieval: a leaf shared by the method and its adapters.

The bank holds, per support slice of one label, what OFL-SAM2 needs at run time: the image
features F (learner inputs, retrieval keys), the SAM2 memories M of the given masks (learner
targets and conditioning memories) and their object pointers. Retrieval ranks bank slices by
cosine similarity of their features to a query slice's (the paper's Eq. 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..driver import Memory
from ..features import Backbone

TARGET_SOURCE = 0  # Bank.source of the slices annotated in the volume being segmented


@dataclass
class Bank:
    """Support slices of one label, on the model device.

    vision: (P, 256, h, w) image features F; targets: (P, 64, h, w) fp32 memory features of the
    given masks (learner targets and conditioning memories); obj_ptr: (P, 256); object_score:
    (P, 1), +10 where the given mask holds the object and -10 where it is empty; keys: (P, D)
    unit retrieval vectors; source: (P,) volume id (TARGET_SOURCE = the target volume); index:
    (P,) slice index in that volume.
    """

    vision: torch.Tensor
    targets: torch.Tensor
    obj_ptr: torch.Tensor
    object_score: torch.Tensor
    keys: torch.Tensor
    source: np.ndarray
    index: np.ndarray
    backbones: list[Backbone] = field(default_factory=list, repr=False)  # for training episodes
    masks: list[np.ndarray] = field(default_factory=list, repr=False)  # (H, W) bool per slice

    def __len__(self) -> int:
        return self.vision.shape[0]

    @property
    def has_object(self) -> np.ndarray:
        """(P,) bool: the slice's given mask holds the object."""
        return (self.object_score[:, 0] > 0).cpu().numpy()

    @property
    def in_target(self) -> np.ndarray:
        """(P,) bool: the slice is one the user annotated in the volume being segmented."""
        return self.source == TARGET_SOURCE

    def memory(self, i: int) -> Memory:
        return Memory(self.targets[i : i + 1], self.obj_ptr[i : i + 1], self.object_score[i : i + 1])


def retrieval_key(vision: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, 256, h, w) -> (B, D) unit vectors: flattened F (default) or its channel means."""
    key = vision.flatten(1) if mode == "flat" else vision.mean(dim=(2, 3))
    return F.normalize(key.float(), dim=1)


def retrieve(
    query_keys: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    allowed: torch.Tensor | None = None,
    has_object: np.ndarray | None = None,
) -> torch.Tensor:
    """Indices (B, k) of the k most cosine-similar bank slices, most similar first.

    ``allowed``: (B, P) bool, the slices each query may retrieve. ``has_object``: (P,) bool;
    when given, a query whose top k are all empty while an allowed slice holds the object gets
    the most similar such slice in place of its k-th: SAM2 then always sees what the object
    looks like when the support shows it (with ~80 % empty slices it otherwise often does not).
    """
    similarity = query_keys @ keys.T
    if allowed is not None:
        similarity = similarity.masked_fill(~allowed, float("-inf"))
    top = similarity.topk(min(k, keys.shape[0]), dim=1).indices
    if has_object is None or not has_object.any():
        return top
    objects = torch.from_numpy(has_object).to(similarity.device)
    object_similarity = similarity.masked_fill(~objects, float("-inf"))
    best_object = object_similarity.argmax(dim=1)  # (B,)
    lacking = ~objects[top].any(dim=1) & torch.isfinite(object_similarity.max(dim=1).values)
    top[lacking, -1] = best_object[lacking]
    return top


def fit_set(bank: Bank, pool: np.ndarray, query_key: torch.Tensor, cap: int | None, empty_fraction: float) -> np.ndarray:
    """The learner's fit set for one query: indices into the bank.

    ``cap`` None: the whole ``pool``, in its order (the paper: every training sample). Otherwise
    at most ``cap`` slices unless the target's own annotated slices alone exceed it: the target's
    annotated slices in ``pool`` always come first, whatever ``cap``: they are the user's own
    statement about this volume. The rest is filled with slices holding the object, the most
    similar to the query first, keeping up to ``empty_fraction`` of ``cap`` for empty slices
    (negatives: they teach the mapping what "no object" looks like), also by similarity; empty
    slices fill whatever the object slices leave free.
    """
    pool = np.asarray(pool, dtype=int)
    if pool.size == 0 or cap is None:
        return pool
    similarity = (bank.keys[torch.from_numpy(pool).to(bank.keys.device)] @ query_key).cpu().numpy()
    ranked = pool[np.argsort(-similarity, kind="stable")]
    own = ranked[bank.in_target[ranked]]
    others = ranked[~bank.in_target[ranked]]
    objects, empties = others[bank.has_object[others]], others[~bank.has_object[others]]
    room = max(cap - own.size, 0)
    reserved = min(empties.size, int(round(cap * empty_fraction)), room)
    chosen_objects = objects[: room - reserved]
    chosen_empties = empties[: room - chosen_objects.size]
    return np.concatenate([own, chosen_objects, chosen_empties])
