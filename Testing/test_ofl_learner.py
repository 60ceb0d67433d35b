"""OFL-SAM2 few-shot learner: the closed-form step, convergence to the ridge solution,
differentiability through λ, inference use, warm starts, episodes and chunking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from oflsam2.ofl.learner import FewShotLearner, GramFit

C, D, K = 4, 2, 3


def problem(samples=6, size=6, seed=0, dtype=torch.float64, noise=0.1):
    """Features (N, C, s, s) and targets made by a hidden filter plus noise, as fp64."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(samples, C, size, size, generator=g, dtype=dtype)
    true_tau = torch.randn(D, C, K, K, generator=g, dtype=dtype)
    targets = F.conv2d(features, true_tau, padding=K // 2) + noise * torch.randn(samples, D, size, size, generator=g, dtype=dtype)
    return features, targets


def learner(ridge_lambda=0.3, **kwargs) -> FewShotLearner:
    return FewShotLearner(C, D, K, init_lambda=ridge_lambda, **kwargs).double()


def test_defaults_follow_the_paper():
    model = FewShotLearner()
    assert model.ridge_lambda.item() == pytest.approx(1e-2)
    assert model.ridge_weight().item() == pytest.approx(1e-4)
    assert [p.numel() for p in model.parameters()] == [1]
    with torch.no_grad():
        model.ridge_lambda.zero_()
    assert model.ridge_weight().item() == pytest.approx(1e-6)  # clamped: the inner problem stays convex
    features, targets = torch.randn(2, 256, 4, 4), torch.randn(2, 64, 4, 4)
    tau = model.fit(features, targets, num_iters=2, create_graph=False)
    assert tau.shape == (64, 256, 3, 3) and tau.dtype == torch.float32
    assert model.apply(tau, features).shape == (2, 64, 4, 4)


@pytest.mark.parametrize("start", ["zero", "random"])
def test_one_step_is_an_exact_line_search(start):
    features, targets = problem()
    weights = torch.tensor([0.3, 0.1, 0.2, 0.15, 0.05, 0.2], dtype=torch.float64)
    model = learner()
    tau0 = torch.zeros(D, C, K, K, dtype=torch.float64) if start == "zero" else torch.randn(D, C, K, K, dtype=torch.float64)
    tau0_leaf = tau0.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model.loss(tau0_leaf, features, targets, weights), tau0_leaf)
    tau1 = model.fit(features, targets, weights, tau_init=tau0, num_iters=1, create_graph=False)
    step = tau0 - tau1
    alpha = (step * gradient).sum() / gradient.pow(2).sum()
    assert torch.allclose(step, alpha * gradient, atol=1e-12)  # moved along -g
    with torch.no_grad():
        search = minimize_scalar(
            lambda a: model.loss(tau0 - a * gradient, features, targets, weights).item(),
            bounds=(0.0, 10 * alpha.item()),
            method="bounded",
            options={"xatol": 1e-12},
        )
    assert alpha.item() == pytest.approx(search.x, rel=1e-5)


def ridge_solution(features, targets, weights, beta):
    """Normal equations of the ridge problem, built with unfold (im2col), independent of conv2d."""
    patches = F.unfold(features, K, padding=K // 2).transpose(1, 2)  # (N, positions, C*K*K)
    flat_targets = targets.flatten(2).transpose(1, 2)  # (N, positions, D)
    w = weights.view(-1, 1, 1)
    gram = (w * patches.transpose(1, 2) @ patches).sum(0) + beta * torch.eye(patches.shape[2], dtype=features.dtype)
    rhs = (w * patches.transpose(1, 2) @ flat_targets).sum(0)
    return torch.linalg.solve(gram, rhs).T.reshape(D, C, K, K)


def test_iterates_converge_monotonically_to_the_ridge_solution():
    features, targets = problem(samples=8, size=5, seed=1)
    weights = torch.full((8,), 1 / 8, dtype=torch.float64)
    model = learner(ridge_lambda=0.3)
    beta = model.ridge_weight().item()
    solution = ridge_solution(features, targets, weights, beta)
    with torch.no_grad():
        tau = torch.zeros(D, C, K, K, dtype=torch.float64)
        losses = [model.loss(tau, features, targets).item()]
        for _ in range(150):
            tau = model.fit(features, targets, tau_init=tau, num_iters=1)
            losses.append(model.loss(tau, features, targets).item())
        optimum = model.loss(solution, features, targets).item()
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] >= optimum - 1e-12
    assert (tau - solution).norm() / solution.norm() < 1e-6
    # A one-call fit of 150 iterations is the same sequence.
    with torch.no_grad():
        assert torch.allclose(model.fit(features, targets, num_iters=150), tau, atol=1e-12)


def test_outer_loss_gradient_reaches_lambda_and_matches_finite_differences():
    features, targets = problem(samples=5, size=6, seed=2, noise=1.0)
    query_features, query_targets = problem(samples=1, size=6, seed=3, noise=1.0)
    model = learner(ridge_lambda=0.5)

    def outer_loss():
        tau = model.fit(features, targets, num_iters=4)
        return (model.apply(tau, query_features) - query_targets).pow(2).mean()

    loss = outer_loss()
    assert loss.requires_grad
    loss.backward()
    grad = model.ridge_lambda.grad.item()
    assert math.isfinite(grad) and grad != 0.0
    eps = 1e-5
    with torch.no_grad():
        model.ridge_lambda += eps
        above = outer_loss().item()
        model.ridge_lambda -= 2 * eps
        below = outer_loss().item()
    assert grad == pytest.approx((above - below) / (2 * eps), rel=1e-4)


def test_warm_start_initial_tau_keeps_its_graph():
    features, targets = problem(samples=3, seed=4)
    model = learner()
    tau_init = torch.randn(D, C, K, K, dtype=torch.float64, requires_grad=True)
    model.fit(features, targets, tau_init=tau_init, num_iters=2).sum().backward()
    assert tau_init.grad is not None and torch.isfinite(tau_init.grad).all() and tau_init.grad.abs().sum() > 0


def test_fit_works_under_no_grad_and_inference_mode():
    features, targets = problem(samples=4, seed=5)
    model = learner()
    reference = model.fit(features, targets, num_iters=5, create_graph=False)
    with torch.no_grad():
        under_no_grad = model.fit(features, targets, num_iters=5)
    with torch.inference_mode():
        under_inference = model.fit(features.clone(), targets.clone(), num_iters=5)
    for tau in (reference, under_no_grad, under_inference):
        assert not tau.requires_grad
    assert torch.allclose(under_no_grad, reference, atol=1e-12)
    assert torch.allclose(under_inference, reference, atol=1e-12)
    assert model.ridge_lambda.grad is None
    assert model.loss(under_no_grad, features, targets) < model.loss(torch.zeros_like(reference), features, targets)


def test_warm_start_beats_a_cold_start_with_the_same_iterations():
    features, targets = problem(samples=10, size=6, seed=6)
    model = learner(ridge_lambda=0.1)
    with torch.no_grad():
        previous = model.fit(features[:8], targets[:8], num_iters=10)  # before two new slices arrived
        warm = model.fit(features, targets, tau_init=previous, num_iters=5)
        cold = model.fit(features, targets, num_iters=5)
        assert model.loss(warm, features, targets) <= model.loss(cold, features, targets)


def test_batched_episodes_equal_one_by_one_fits():
    episodes = [problem(samples=4, seed=10 + e) for e in range(3)]
    features = torch.stack([f for f, _ in episodes])
    targets = torch.stack([t for _, t in episodes])
    weights = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = learner()
    with torch.no_grad():
        together = model.fit(features, targets, weights, num_iters=6)
        alone = torch.stack([model.fit(features[e], targets[e], weights[e], num_iters=6) for e in range(3)])
        assert together.shape == (3, D, C, K, K)
        assert torch.allclose(together, alone, atol=1e-10)
        separately = torch.stack([model.loss(alone[e], features[e], targets[e], weights[e]) for e in range(3)])
        assert torch.allclose(model.loss(together, features, targets, weights), separately)
        applied = model.apply(together, features[:, :2])
        assert torch.allclose(applied[1], model.apply(alone[1], features[1, :2]), atol=1e-10)


def test_chunked_fit_equals_a_single_pass():
    features, targets = problem(samples=7, seed=7)
    with torch.no_grad():
        one_pass = learner(chunk_size=64).fit(features, targets, num_iters=5)
        chunked = learner(chunk_size=2).fit(features, targets, num_iters=5)
    assert torch.allclose(one_pass, chunked, atol=1e-10)


def test_apply_is_the_mapping_convolution_and_accepts_low_precision_features():
    model = FewShotLearner(C, D, K)
    tau = torch.randn(D, C, K, K)
    features = torch.randn(3, C, 7, 7)
    assert torch.allclose(model.apply(tau, features), F.conv2d(features, tau, padding=1), atol=1e-6)
    with torch.no_grad():
        half = model.fit(features.bfloat16(), torch.randn(3, D, 7, 7), num_iters=2)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert model.apply(half, features.bfloat16()).dtype == torch.float32


def test_kernel_size_one():
    model = FewShotLearner(C, D, kernel_size=1).double()
    features, targets = problem(samples=3, seed=8)
    with torch.no_grad():
        tau = model.fit(features, targets, num_iters=3)
    assert tau.shape == (D, C, 1, 1)


@pytest.mark.parametrize(
    "features, targets, weights, message",
    [
        (torch.randn(2, 5, 4, 4), torch.randn(2, D, 4, 4), None, "feature channels"),
        (torch.randn(2, C, 4, 4), torch.randn(2, D, 3, 4), None, "same grid"),
        (torch.randn(C, 4, 4), torch.randn(D, 4, 4), None, "both be"),
        (torch.randn(0, C, 4, 4), torch.randn(0, D, 4, 4), None, "at least one"),
        (torch.randn(2, C, 4, 4), torch.randn(2, D, 4, 4), torch.tensor([1.0, -1.0]), "non-negative"),
        (torch.randn(2, C, 4, 4), torch.randn(2, D, 4, 4), torch.ones(3), "shape"),
    ],
)
def test_bad_shapes_are_refused_clearly(features, targets, weights, message):
    with pytest.raises(ValueError, match=message):
        FewShotLearner(C, D).fit(features, targets, weights, num_iters=1)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="odd"):
        FewShotLearner(C, D, kernel_size=2)
    with pytest.raises(ValueError, match="tau_init"):
        FewShotLearner(C, D).fit(torch.randn(1, C, 4, 4), torch.randn(1, D, 4, 4), tau_init=torch.zeros(D, C, 1, 1))
    with pytest.raises(ValueError, match="num_iters"):
        FewShotLearner(C, D).fit(torch.randn(1, C, 4, 4), torch.randn(1, D, 4, 4), num_iters=-1)


# -- precomputed statistics take the same steps ----------------------------------------------------


def query_loss(model, tau, seed=21):
    query_features, query_targets = problem(samples=1, size=6, seed=seed, noise=1.0)
    return (model.apply(tau, query_features) - query_targets).pow(2).mean()


@pytest.mark.parametrize("num_iters, backprop_iters", [(10, None), (10, 3), (4, None), (1, None)])
def test_krylov_space_takes_the_unrolled_steps_and_gives_their_gradient(num_iters, backprop_iters):
    features, targets = problem(samples=5, size=6, seed=20, noise=1.0)
    model = learner(ridge_lambda=0.5)
    space = model.krylov_space(features, targets, 10)
    assert space.basis.shape == (10, D, C, K, K)
    flat = space.basis.flatten(1)
    assert torch.allclose(flat @ flat.T, torch.eye(10, dtype=torch.float64), atol=1e-12)  # orthonormal
    with torch.no_grad():
        model.ridge_lambda.fill_(0.2)  # λ moved after the space was built: the space still holds
    results = []
    for statistics in (None, space):
        model.zero_grad()
        tau = model.fit(features, targets, num_iters=num_iters, backprop_iters=backprop_iters, statistics=statistics)
        query_loss(model, tau).backward()
        results.append((tau.detach(), model.ridge_lambda.grad.item()))
    (tau_samples, grad_samples), (tau_space, grad_space) = results
    assert (tau_space - tau_samples).norm() <= 1e-10 * tau_samples.norm()
    assert grad_samples != 0.0 and grad_space == pytest.approx(grad_samples, rel=1e-8)


@pytest.mark.parametrize("tau_init, sample_weights, statistics", [
    ("default", "mean", "samples"), ("default", "sum", "samples"), ("zero", "sum", "samples"),
    ("zero", "mean", "gram"), ("default", "mean", "gram"), ("default", "sum", "gram"),
])
def test_krylov_space_follows_tau0_and_the_weighting_from_samples_or_gram(tau_init, sample_weights, statistics):
    """From PyTorch's default initialisation the steps start at a τ0 ≠ 0, whose first gradient
    depends on λ: the block Krylov space of {R − B τ0, τ0} takes the same steps and gives the
    same gradient in λ as backpropagating through them, in fp64; so does the space built from
    the samples' Gram statistics, and either weighting."""
    features, targets = problem(samples=5, size=6, seed=23, noise=1.0)
    model = learner(ridge_lambda=0.5, tau_init=tau_init, sample_weights=sample_weights)
    if statistics == "samples":
        space = model.krylov_space(features, targets, 10)
    else:
        gram = GramFit(model, "cpu", torch.float64)
        gram.update(features, targets)
        space = model.krylov_space_of(gram.gram, gram.cross, gram.count, 10)
    vectors = 20 if tau_init == "default" else 10
    assert space.basis.shape[0] == vectors
    flat = space.basis.flatten(1)
    assert torch.allclose(flat @ flat.T, torch.eye(vectors, dtype=torch.float64), atol=1e-12)
    with torch.no_grad():
        model.ridge_lambda.fill_(0.2)
    results = []
    for fit_statistics in (None, space):
        model.zero_grad()
        tau = model.fit(features, targets, num_iters=10, statistics=fit_statistics)
        query_loss(model, tau).backward()
        results.append((tau.detach(), model.ridge_lambda.grad.item()))
    (tau_samples, grad_samples), (tau_space, grad_space) = results
    assert (tau_space - tau_samples).norm() <= 1e-10 * tau_samples.norm()
    assert grad_samples != 0.0 and grad_space == pytest.approx(grad_samples, rel=1e-8)
    if tau_init == "default":  # the steps did start away from zero: τ0 is part of the result
        assert model.origin.abs().max() > 0
        zero_start = learner(ridge_lambda=0.2, sample_weights=sample_weights).fit(features, targets, num_iters=10)
        assert (tau_samples - zero_start).norm() > 1e-3 * tau_samples.norm()


def test_sample_weights_scale_the_data_term():
    """``sum`` weights each sample 1 (the printed Eq. 2), ``mean`` 1/N (LWL's code): with N
    samples the same steps as ``mean`` with the ridge weight divided by N."""
    features, targets = problem(samples=4, seed=24)
    tau = torch.randn(D, C, K, K, dtype=torch.float64, generator=torch.Generator().manual_seed(25))
    mean, total = learner(ridge_lambda=0.3), learner(ridge_lambda=0.3, sample_weights="sum")
    with torch.no_grad():
        ridge = 0.5 * mean.ridge_weight() * tau.pow(2).sum()
        data_sum, data_mean = total.loss(tau, features, targets) - ridge, mean.loss(tau, features, targets) - ridge
        assert data_sum.item() == pytest.approx(4 * data_mean.item(), rel=1e-12)
        scaled = learner()
        scaled.ridge_lambda.fill_(total.ridge_lambda.item() / 2)  # β / N = λ² / 4
        expected = scaled.fit(features, targets, num_iters=6)
        assert torch.allclose(total.fit(features, targets, num_iters=6), expected, atol=1e-10)
        assert not torch.allclose(mean.fit(features, targets, num_iters=6), expected, atol=1e-6)


def test_krylov_space_that_stops_growing_still_takes_every_step():
    # one position of a 1×1 map: B = Xᵀ X has rank one along each output, so R spans the space
    features, targets = problem(samples=1, size=1, seed=22)
    model = learner()
    space = model.krylov_space(features, targets, 10)
    assert space.basis.shape[0] == 1 and space.built_for == 10
    with torch.no_grad():
        expected = model.fit(features, targets, num_iters=10)
        assert torch.allclose(model.fit(features, targets, num_iters=10, statistics=space), expected, atol=1e-12)
    zero_targets = torch.zeros_like(targets)  # R = 0: nothing to move towards
    empty = model.krylov_space(features, zero_targets, 10)
    assert empty.basis.shape[0] == 0
    assert torch.equal(model.fit(features, zero_targets, num_iters=10, statistics=empty), torch.zeros(D, C, K, K, dtype=torch.float64))


def test_gram_statistics_take_the_sample_steps_across_updates_and_drops():
    """Online use: warm-started steps after each added sample, the oldest dropped past a
    window of 5, equal the steps on the samples in the window; G t is carried, not recomputed."""
    features, targets = problem(samples=9, size=6, seed=30, noise=1.0)
    model = learner(ridge_lambda=0.2)
    gram = GramFit(model, "cpu", torch.float64)
    window = [0, 1, 2]
    gram.update(features[window], targets[window])
    with torch.no_grad():
        tau = model.fit(features[window], targets[window], num_iters=10, statistics=gram)
        expected = model.fit(features[window], targets[window], num_iters=10)
        assert (tau - expected).norm() <= 1e-10 * expected.norm()
        for i in range(3, 9):
            gram.update(features[i : i + 1], targets[i : i + 1])
            window.append(i)
            if len(window) > 5:
                gram.update(features[window[0] : window[0] + 1], targets[window[0] : window[0] + 1], sign=-1.0)
                window.pop(0)
            tau = gram.fit(tau, 5)
            expected = model.fit(features[window], targets[window], tau_init=expected, num_iters=5)
            assert gram.count == len(window)
            assert (tau - expected).norm() <= 1e-10 * expected.norm(), i
        # a warm start from a τ the statistics did not produce
        other = torch.randn(D, C, K, K, dtype=torch.float64, generator=torch.Generator().manual_seed(31))
        assert torch.allclose(gram.fit(other, 3), model.fit(features[window], targets[window], tau_init=other, num_iters=3), atol=1e-10)
    patches = F.unfold(features[window], K, padding=K // 2)  # (N, C·k², P)
    assert torch.allclose(gram.gram, torch.einsum("nap,nbp->ab", patches, patches), atol=1e-10)
    assert torch.equal(gram.gram, gram.gram.T)  # the upper block triangle mirrored


def test_statistics_are_refused_where_they_cannot_take_the_steps():
    features, targets = problem(samples=3, seed=32)
    model = learner()
    space = model.krylov_space(features, targets, 4)
    with pytest.raises(ValueError, match="built for 4"):
        model.fit(features, targets, num_iters=5, statistics=space)
    with pytest.raises(ValueError, match="starts from the learner.s τ0"):
        model.fit(features, targets, tau_init=torch.zeros(D, C, K, K, dtype=torch.float64), num_iters=2, statistics=space)
    with pytest.raises(ValueError, match="default weights"):
        model.fit(features, targets, torch.full((3,), 1 / 3, dtype=torch.float64), num_iters=2, statistics=space)
    with pytest.raises(ValueError, match="one fit"):
        model.krylov_space(features[None], targets[None], 4)
