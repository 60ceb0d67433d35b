"""OFL-SAM2 fusion: parameter counts, the plain-SAM2 start, the memory-only switch, trainability."""

from __future__ import annotations

import math

import pytest
import torch

from oflsam2.ofl.fusion import DEFAULT_GATE_BIAS, AdaptiveFusion, ChannelLift, sum_fusion


def features(seed, channels=256, size=8, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(2, channels, size, size, generator=g)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_paper():
    assert count(AdaptiveFusion()) == 1_179_904
    assert count(ChannelLift()) == 16_640


def test_lift_maps_target_channels_to_feature_channels():
    lift = ChannelLift()
    assert lift.kernel_size == (1, 1) and lift.bias is not None
    assert lift(features(0, channels=64)).shape == (2, 256, 8, 8)


def test_fusion_starts_as_plain_sam2():
    afm = AdaptiveFusion()
    e1, e2 = features(1, scale=5.0), features(2, scale=20.0)  # magnitudes must not matter
    w = afm.weight_map(e1, e2)
    assert torch.allclose(w, torch.full_like(w, 1 / (1 + math.exp(-DEFAULT_GATE_BIAS))))
    assert w.min() > 0.989
    out = afm(e1, e2)
    assert torch.allclose(out, w * e1 + (1 - w) * e2)
    assert ((out - e1).abs() <= 0.0101 * (e2 - e1).abs() + 1e-5).all()


def test_memory_only_switch_returns_e1_exactly():
    afm = AdaptiveFusion(force_memory_only=True)
    torch.nn.init.normal_(afm.gate.weight)  # whatever the trained gate says
    e1 = features(3)
    e2 = features(4)
    e2[0, 0, 0, 0] = float("inf")
    assert torch.equal(afm(e1, e2), e1)
    afm.force_memory_only = False
    assert not torch.equal(afm(e1, features(4)), e1)


def test_gate_learns_from_its_zero_initialisation():
    afm = AdaptiveFusion(channels=8)
    e1, e2 = features(5, channels=8), features(6, channels=8)
    optimizer = torch.optim.SGD(afm.parameters(), lr=10.0)
    before = (afm(e1, e2) - e2).pow(2).mean().item()
    for _ in range(3):
        loss = (afm(e1, e2) - e2).pow(2).mean()  # a target that prefers E2'
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert afm.gate.weight.abs().sum() > 0
    assert (afm(e1, e2) - e2).pow(2).mean().item() < before
    w = afm.weight_map(e1, e2)
    assert w.std() > 0  # no longer input-independent


def test_learner_only_ablation_is_a_sum():
    e1, e2 = features(7), features(8)
    assert torch.equal(sum_fusion(e1, e2), e1 + e2)


def test_mismatched_branches_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        AdaptiveFusion(channels=8)(features(9, channels=8), features(10, channels=8, size=4))
