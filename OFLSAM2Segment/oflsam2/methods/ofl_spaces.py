"""Where OFL-SAM2's training episodes fit τ: each episode's Krylov space, built once and kept.

An episode's fit set never changes during training, only λ does, and the space its τ steps move
in does not depend on λ (:meth:`~oflsam2.ofl.learner.FewShotLearner.krylov_space`).
``train_solver="krylov"`` builds it from the episode's samples, one pass over them per basis
vector; ``"gram"`` from the Gram statistics of its fit set, one product with a (C·k²)² matrix per
vector whatever the number of samples. A fit set's statistics are the whole bank's minus those of
the slices it leaves out (the query's volume, or the annotated slices near the query), or, for a
fit set smaller than the rest, its own: the bank's are computed once, and a group's once for
every episode that shares it, so that fitting on every support slice (the paper) costs about
what a capped fit set did.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ..ofl.learner import FewShotLearner, GramFit, KrylovSpace
from .ofl_bank import Bank

# Training keeps each episode's Krylov space across epochs up to this many bytes (6 MB per
# episode at 10 iterations, C = 256, D = 64, k = 3, whatever the image size; 12 MB from a τ0 ≠ 0);
# past it, rebuilt.
TRAIN_SPACE_CACHE_BYTES = 1 << 30
GROUPS_KEPT = 8  # Gram statistics of fit sets or left-out groups kept (21 MB each at C·k² = 2304)
GRAM_SAMPLES_PER_UPDATE = 8  # bank slices gathered per statistics update (bounds the copy)


class PoolStatistics:
    """Gram statistics (G, H, N) of any set of bank slices, from the bank's total."""

    def __init__(self, learner: FewShotLearner, bank: Bank):
        self.learner, self.bank = learner, bank
        self._total: GramFit | None = None
        self.kept: OrderedDict[tuple, GramFit] = OrderedDict()

    @property
    def total(self) -> GramFit:
        """The whole bank's statistics, summed on first use."""
        if self._total is None:
            self._total = self._sum(np.arange(len(self.bank)))
        return self._total

    def _sum(self, indices: np.ndarray) -> GramFit:
        statistics = GramFit(self.learner, self.bank.vision.device)
        for start in range(0, indices.size, GRAM_SAMPLES_PER_UPDATE):
            chunk = torch.from_numpy(indices[start : start + GRAM_SAMPLES_PER_UPDATE]).to(self.bank.vision.device)
            statistics.update(self.bank.vision[chunk], self.bank.targets[chunk])
        return statistics

    def of(self, fit: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(G, H, N) of the bank slices ``fit``: the total minus the rest, or summed directly
        when the fit set is the smaller part of the bank (the subtraction would lose precision).
        The sums of the last few groups are kept: the episodes of one volume share them."""
        rest = np.setdiff1d(np.arange(len(self.bank)), fit)
        if rest.size == 0:
            return self.total.gram, self.total.cross, self.total.count
        direct = rest.size >= fit.size
        key = (direct, tuple((fit if direct else rest).tolist()))
        group = self.kept.pop(key, None) or self._sum(np.asarray(fit if direct else rest))
        self.kept[key] = group
        while len(self.kept) > GROUPS_KEPT:
            self.kept.popitem(last=False)
        if direct:
            return group.gram, group.cross, group.count
        return self.total.gram - group.gram, self.total.cross - group.cross, self.total.count - group.count


class EpisodeSpaces:
    """Each training episode's :class:`~oflsam2.ofl.learner.KrylovSpace`, built on first use
    (from its samples or from Gram statistics, per ``solver``) and kept across epochs while they
    fit in ``budget`` bytes."""

    def __init__(self, learner: FewShotLearner, bank: Bank, num_iters: int, solver: str = "krylov",
                 budget: int = TRAIN_SPACE_CACHE_BYTES):
        self.learner, self.bank, self.num_iters, self.solver, self.budget = learner, bank, num_iters, solver, budget
        self.kept: dict[int, KrylovSpace] = {}
        self.used = 0
        self.pools: PoolStatistics | None = None

    def __call__(self, episode) -> KrylovSpace:
        """The space of ``episode`` (its ``query`` bank index and ``fit`` set, a tensor of bank indices)."""
        space = self.kept.get(episode.query)
        if space is None:
            with torch.no_grad():
                space = self._build(episode.fit)
            size = space.basis.numel() * space.basis.element_size()
            if self.used + size <= self.budget:
                self.kept[episode.query], self.used = space, self.used + size
        return space

    def _build(self, fit: torch.Tensor) -> KrylovSpace:
        if self.solver != "gram":
            return self.learner.krylov_space(self.bank.vision[fit], self.bank.targets[fit], self.num_iters)
        if self.pools is None:
            self.pools = PoolStatistics(self.learner, self.bank)
        return self.learner.krylov_space_of(*self.pools.of(fit.cpu().numpy()), self.num_iters)
