"""OFL-SAM2's fusion of the two branches before SAM2's frozen mask decoder.

E1 (B, C, H, W) is SAM2's memory-conditioned feature, E2 (B, D, H, W) the learner's target
feature. E2 is lifted to C channels (E2′) and the adaptive fusion module (AFM) mixes the two:

    W = σ(conv3×3([E1, E2′])),   E_tar = W ⊙ E1 + (1 − W) ⊙ E2′.
"""

from __future__ import annotations

import torch
from torch import nn

# σ(4.6) ≈ 0.990: E_tar starts as 0.99·E1 + 0.01·E2′, i.e. plain SAM2, while σ′ ≈ 0.0099 still
# lets the gate learn (a bias near 10 would start equally close to E1 but barely move).
DEFAULT_GATE_BIAS = 4.6


class ChannelLift(nn.Conv2d):
    """E2′ = lift(E2): a 1×1 convolution with bias, (B, D, H, W) -> (B, C, H, W).

    16,640 parameters at the paper's D = 64, C = 256; PyTorch's default initialisation.
    """

    def __init__(self, in_channels: int = 64, out_channels: int = 256):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=True)


class AdaptiveFusion(nn.Module):
    """The AFM: a 3×3 conv (2C -> C, bias) + sigmoid gate W between E1 and E2′, 1,179,904
    parameters at C = 256.

    The gate starts input-independent and open towards E1: zero conv weights and a bias of
    ``gate_bias`` make W = σ(gate_bias) everywhere at initialisation, whatever the feature
    magnitudes (random weights, even small ones, would multiply 2C·9 inputs of E1's scale and
    could move W far from 1). The weights still receive gradient, since ∂W/∂weight depends
    on the inputs, not on the weights.

    ``force_memory_only`` makes W ≡ 1 exactly (E_tar is E1 itself): the parity/ablation
    switch that reduces OFL-SAM2's decoder input to plain SAM2's.
    """

    def __init__(self, channels: int = 256, gate_bias: float = DEFAULT_GATE_BIAS, force_memory_only: bool = False):
        super().__init__()
        self.gate = nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1, bias=True)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)
        self.force_memory_only = force_memory_only

    def weight_map(self, e1: torch.Tensor, e2_lifted: torch.Tensor) -> torch.Tensor:
        """W = σ(conv([E1, E2′])): (B, C, H, W) each -> (B, C, H, W) in (0, 1)."""
        if e1.shape != e2_lifted.shape:
            raise ValueError(f"E1 and the lifted E2 must have the same shape; got {tuple(e1.shape)} and {tuple(e2_lifted.shape)}.")
        return torch.sigmoid(self.gate(torch.cat([e1, e2_lifted], dim=1)))

    def forward(self, e1: torch.Tensor, e2_lifted: torch.Tensor) -> torch.Tensor:
        """E_tar = W ⊙ E1 + (1 − W) ⊙ E2′, (B, C, H, W)."""
        if self.force_memory_only:
            return e1
        return self.mix(self.weight_map(e1, e2_lifted), e1, e2_lifted)

    @staticmethod
    def mix(w: torch.Tensor, e1: torch.Tensor, e2_lifted: torch.Tensor) -> torch.Tensor:
        """W ⊙ E1 + (1 − W) ⊙ E2′ for a weight map W from :meth:`weight_map`."""
        return w * e1 + (1 - w) * e2_lifted


def sum_fusion(e1: torch.Tensor, e2_lifted: torch.Tensor) -> torch.Tensor:
    """E_tar = E1 + E2′, (B, C, H, W): the "few-shot learner without AFM" ablation.

    The paper (Table 4) adds the learner's features without the AFM but does not say how; we
    read it as a plain sum: the lift is trained either way, so it can learn any scale for E2′,
    whereas a fixed average would also halve E1, which the frozen decoder is tuned to.
    """
    return e1 + e2_lifted
