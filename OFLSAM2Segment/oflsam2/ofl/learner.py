"""OFL-SAM2's few-shot learner: fits the mapping filter τ by unrolled steepest descent.

The mapping network is one bias-free convolution T_τ(F) = conv2d(F, τ), F (N, C, H, W) image
features -> (N, D, H, W) predicted SAM2 memory features. τ is not a trained parameter: the
learner produces it from support pairs (F_i, M_i) by minimising the ridge loss

    L(τ) = ½ Σ_i w_i ‖T_τ(F_i) − M_i‖² + ½ β ‖τ‖²,   β = λ² (clamped ≥ 1e-6),

where λ is the only trained weight and w_i = 1/N (``sample_weights="mean"``, as LWL's code
weights the same sum) or 1 (``"sum"``, the paper's Eq. 2 as printed). Every fit starts from τ0:
zero (``tau_init="zero"``, LWL's initializer) or a fixed draw of PyTorch's default convolution
initialisation (``"default"``). T_τ is linear in τ, so the exact line search along the gradient
g has the closed form α = ‖g‖² / (Σ_i w_i ‖conv(F_i, g)‖² + β ‖g‖²) (LWL lineage).

Several episodes (independent fits, each with its own τ and α) can be fitted at once by passing
5-D features (E, N, C, H, W): they run as one grouped convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MIN_RIDGE_WEIGHT = 1e-6
MIN_STEP_DENOMINATOR = 1e-8
KRYLOV_BREAKDOWN = 1e-6  # a Lanczos residual this small relative to its product: the space is invariant


@dataclass
class KrylovSpace:
    """Where steepest descent from τ0 moves on one fit set (see :meth:`FewShotLearner.krylov_space`):
    basis (m, D, C, k, k) orthonormal, projected (m, m) fp64 = basisᵀ B basis, norm = ‖R‖.
    ``built_for``: the steps it was built for (m is fewer when the space became invariant).
    From a τ0 ≠ 0 also ``origin`` (τ0), ``residual`` (basisᵀ (R − B τ0)) and ``start``
    (basisᵀ τ0), fp64 coordinates; None from τ0 = 0 (the residual is then ‖R‖ e1)."""

    basis: torch.Tensor
    projected: torch.Tensor
    norm: torch.Tensor
    built_for: int = 0
    origin: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    start: torch.Tensor | None = None


class FewShotLearner(nn.Module):
    """Produces τ (D, C, k, k) from support pairs; its one parameter is the ridge scale λ.

    ``chunk_size`` bounds how many samples are convolved at once: the largest temporaries are
    (chunk_size, C, H, W) casts of the features and (chunk_size, D, H, W) residuals. When the
    fit keeps its graph for training, autograd still holds every chunk's residuals.
    """

    def __init__(
        self,
        feature_channels: int = 256,
        target_channels: int = 64,
        kernel_size: int = 3,
        init_lambda: float = 1e-2,
        chunk_size: int = 8,
        sample_weights: str = "mean",
        tau_init: str = "zero",
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number (same-size output); got {kernel_size}.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1; got {chunk_size}.")
        if sample_weights not in ("mean", "sum") or tau_init not in ("zero", "default"):
            raise ValueError(f"sample_weights is mean or sum, tau_init zero or default; got {sample_weights!r}, {tau_init!r}.")
        self.feature_channels = feature_channels
        self.target_channels = target_channels
        self.kernel_size = kernel_size
        self.chunk_size = chunk_size
        self.sample_weights = sample_weights
        self.ridge_lambda = nn.Parameter(torch.tensor(float(init_lambda)))
        if tau_init == "default":  # τ0 = what nn.Conv2d(C, D, k, bias=False) starts from; saved with the head
            origin = torch.empty(target_channels, feature_channels, kernel_size, kernel_size)
            nn.init.kaiming_uniform_(origin, a=math.sqrt(5))
            self.register_buffer("origin", origin)
        else:
            self.origin = None  # τ0 = 0

    def default_weight(self, samples: int) -> float:
        """Each sample's weight w_i when none are given: 1/N or 1."""
        return 1.0 / samples if self.sample_weights == "mean" else 1.0

    def ridge_weight(self) -> torch.Tensor:
        """β = λ², clamped so that the inner problem stays strictly convex."""
        return self.ridge_lambda.pow(2).clamp(min=MIN_RIDGE_WEIGHT)

    def fit(
        self,
        features: torch.Tensor | None,
        targets: torch.Tensor | None,
        weights: torch.Tensor | None = None,
        tau_init: torch.Tensor | None = None,
        num_iters: int = 10,
        create_graph: bool | None = None,
        backprop_iters: int | None = None,
        statistics: KrylovSpace | GramFit | None = None,
    ) -> torch.Tensor:
        """Run ``num_iters`` steepest-descent steps from τ0 (or ``tau_init``) and return τ.

        features: (N, C, H, W), or (E, N, C, H, W) for E episodes, any float dtype (cast to
        fp32 chunk by chunk); targets: (N, D, H, W) / (E, N, D, H, W); weights: (N,) / (E, N)
        non-negative sample weights, default :meth:`default_weight`; tau_init: (D, C, k, k) /
        (E, D, C, k, k).
        Returns τ of the matching shape, fp32 (fp64 if the targets are fp64).

        ``create_graph`` (default: whether grad mode is on at the call) keeps the unrolled
        graph so that an outer loss reaches λ and ``tau_init``; otherwise the fit runs with
        grad enabled internally (it works under ``torch.no_grad()``) and τ comes back detached.
        ``backprop_iters`` (with ``create_graph``): keep the graph of the last this many steps
        only (truncated unrolling: the earlier steps are run detached, which saves most of the
        backward pass; ``tau_init``'s graph is then cut). None keeps every step.

        ``statistics``: what these same samples reduce to, computed once, which takes the same
        steps without going through the samples again: a :class:`KrylovSpace` from
        :meth:`krylov_space` or :meth:`krylov_space_of` (from τ0, with the graph to λ: training episodes) or a
        :class:`GramFit` holding them (detached, warm starts allowed). Single fits with the
        default weights only; the samples are then checked but not read, and may be None.
        """
        if num_iters < 0:
            raise ValueError(f"num_iters must be 0 or more; got {num_iters}.")
        if create_graph is None:
            create_graph = torch.is_grad_enabled()
        if statistics is not None:
            if (features is not None and features.dim() == 5) or weights is not None:
                raise ValueError("A fit from precomputed statistics takes one episode with the default weights.")
            if features is not None or targets is not None:
                self._episodes(features, targets, None)
            if isinstance(statistics, GramFit):
                if create_graph and (tau_init is not None and tau_init.requires_grad):
                    raise ValueError("A fit on Gram statistics is detached: it cannot carry tau_init's graph.")
                return statistics.fit(tau_init, num_iters)
            if tau_init is not None:
                raise ValueError("A fit in a Krylov space starts from the learner's τ0; tau_init must be None.")
            return self._fit_in_space(statistics, num_iters, create_graph, backprop_iters)
        episodic = features.dim() == 5
        features, targets, weights = self._episodes(features, targets, weights)
        dtype = torch.float64 if targets.dtype == torch.float64 else torch.float32
        targets, weights = targets.to(dtype), weights.to(dtype)
        episodes = features.shape[0]
        # inference_mode(False): tensors made inside torch.inference_mode() could not carry grad
        with torch.inference_mode(False), torch.enable_grad():
            targets, weights = _autograd_usable(targets), _autograd_usable(weights)
            tau = _autograd_usable(self._initial_tau(tau_init, episodes, dtype, features.device))
            if not (create_graph and tau.requires_grad):  # else keep tau_init's graph
                tau = tau.detach().requires_grad_(True)
            beta = self.ridge_weight().to(dtype)
            detached_steps = 0 if backprop_iters is None or not create_graph else max(num_iters - backprop_iters, 0)
            for iteration in range(num_iters):
                graph = create_graph and iteration >= detached_steps
                step_beta = beta if graph else beta.detach()
                gradient = self._gradient(tau, features, targets, weights, step_beta, graph)
                step = self._step_length(gradient, features, weights, step_beta)
                tau = tau - step.view(-1, 1, 1, 1, 1) * gradient
                if not graph:
                    tau = tau.detach().requires_grad_(True)
        if not create_graph:
            tau = tau.detach()
        return tau if episodic else tau[0]

    def loss(
        self,
        tau: torch.Tensor,
        features: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The inner loss L(τ): a scalar, or (E,) per episode for 5-D inputs (shapes as in fit)."""
        episodic = features.dim() == 5
        features, targets, weights = self._episodes(features, targets, weights)
        tau = tau if episodic else tau[None]
        targets, weights = targets.to(tau.dtype), weights.to(tau.dtype)
        total = 0.5 * self.ridge_weight().to(tau.dtype) * tau.pow(2).flatten(1).sum(dim=1)
        for start in range(0, features.shape[1], self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            total = total + self._data_loss(tau, features[:, chunk], targets[:, chunk], weights[:, chunk])
        return total if episodic else total[0]

    def apply(self, tau: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """E2 = T_τ(F): features (B, C, H, W) -> (B, D, H, W) with τ (D, C, k, k); or, per
        episode, features (E, B, C, H, W) with τ (E, D, C, k, k) -> (E, B, D, H, W)."""
        if tau.dim() == 4:
            return _grouped_conv(features[None].to(tau.dtype), tau[None])[0]
        return _grouped_conv(features.to(tau.dtype), tau)

    def krylov_space(self, features: torch.Tensor, targets: torch.Tensor, num_iters: int) -> KrylovSpace:
        """The space in which ``num_iters`` steps from τ0 on these samples move, for any λ.

        From τ0 = 0 the k-th iterate lies in the Krylov space span{R, BR, …, B^(k−1) R} of the
        data term B v = Σ_i w_i X_iᵀ X_i v and R = Σ_i w_i X_iᵀ M_i (the negative first
        gradient), and the ridge term only shifts B by β·I, which leaves that space unchanged.
        From a τ0 ≠ 0 the first gradient β τ0 − (R − B τ0) depends on β: the iterates then lie
        in τ0 + the block Krylov space of {R − B τ0, τ0}, twice as many vectors.
        ``num_iters`` products with B per starting vector (Lanczos, orthogonalised twice) give an
        orthonormal basis Q and the projection Qᵀ B Q; :meth:`fit` given this space then takes the
        same steps at a negligible cost per fit, for whatever λ is at the time, with the same graph
        to λ. Features (N, C, H, W), targets (N, D, H, W), the default weights; no graph is kept.
        """
        if num_iters < 0:
            raise ValueError(f"num_iters must be 0 or more; got {num_iters}.")
        if features.dim() != 4:
            raise ValueError(f"A Krylov space is built for one fit: features (N, C, H, W); got {tuple(features.shape)}.")
        features, targets, weights = self._episodes(features, targets, None)
        dtype = torch.float64 if targets.dtype == torch.float64 else torch.float32
        targets, weights = targets.to(dtype), weights.to(dtype)
        origin = self._initial_tau(None, 1, dtype, features.device) if self.origin is not None else None
        zero_targets = torch.zeros_like(targets)
        no_ridge = torch.zeros((), dtype=dtype, device=features.device)
        with torch.inference_mode(False), torch.enable_grad():
            targets, weights = _autograd_usable(targets), _autograd_usable(weights)

            def product(vector):  # B v
                leaf = vector.detach().requires_grad_(True)
                return self._gradient(leaf, features, zero_targets, weights, no_ridge, False).detach()

            start = origin if origin is not None else torch.zeros((1,) + self._tau_shape(), dtype=dtype, device=features.device)
            residual = -self._gradient(start.requires_grad_(True), features, targets, weights, no_ridge, False).detach()
            return self._lanczos(residual, origin, product, num_iters)

    def krylov_space_of(self, gram: torch.Tensor, cross: torch.Tensor, count: int, num_iters: int) -> KrylovSpace:
        """:meth:`krylov_space` of the ``count`` samples whose Gram statistics (:class:`GramFit`)
        are G = Σ X_iᵀ X_i (C·k², C·k²) and H = Σ X_iᵀ M_i (C·k², D): each product with B is
        one product with G, whatever the number of samples. The basis is in G's dtype."""
        if count <= 0:
            raise ValueError("The learner needs at least one support sample to fit.")
        scale = self.default_weight(count)
        shape = (1,) + self._tau_shape()

        def matrix(vector):  # (1, D, C, k, k) -> (C·k², D), GramFit's layout
            return vector.reshape(shape[1], -1).T

        def product(vector):
            return (scale * (gram @ matrix(vector))).T.reshape(shape)

        origin = None if self.origin is None else self.origin.to(gram.device, gram.dtype)[None]
        with torch.no_grad():
            gradient = cross if origin is None else cross - gram @ matrix(origin)
            return self._lanczos((scale * gradient).T.reshape(shape), origin, product, num_iters)

    def _tau_shape(self) -> tuple[int, int, int, int]:
        return (self.target_channels, self.feature_channels, self.kernel_size, self.kernel_size)

    @staticmethod
    def _lanczos(residual: torch.Tensor, origin: torch.Tensor | None, product, num_iters: int) -> KrylovSpace:
        """Orthonormal basis of the (block) Krylov space of ``residual`` (and ``origin``) under
        ``product``, ``num_iters`` vectors per start, and what :class:`KrylovSpace` holds."""
        norm = residual.double().norm()
        queue = [(residual, norm)] + ([(origin, origin.double().norm())] if origin is not None else [])
        wanted = num_iters * len(queue)
        basis, products = [], []
        while queue and len(basis) < wanted:
            vector, scale = queue.pop(0)
            for _ in range(2 if basis else 0):  # once loses orthogonality in floating point; twice is enough
                for q in basis:
                    vector = vector - (vector * q).sum() * q
            length = vector.double().norm()
            if length == 0 or length <= KRYLOV_BREAKDOWN * scale:  # nothing new: the steps stay in the space
                continue
            basis.append(vector / length.to(vector.dtype))
            products.append(product(basis[-1]))
            queue.append((products[-1], products[-1].double().norm()))
        stacked = torch.cat(basis) if basis else residual[:0]  # (m, D, C, k, k)
        flat_basis = stacked.flatten(1).double()
        projected = flat_basis @ (torch.cat(products).flatten(1).double().T if products else flat_basis.T)
        space = KrylovSpace(stacked, (0.5 * (projected + projected.T)).cpu(), norm.cpu(), num_iters)
        if origin is not None:
            space.origin = origin[0]
            space.residual = (flat_basis @ residual.flatten().double()).cpu()
            space.start = (flat_basis @ origin.flatten().double()).cpu()
        return space

    def _fit_in_space(self, space: KrylovSpace, num_iters: int, create_graph: bool, backprop_iters: int | None) -> torch.Tensor:
        """τ (D, C, k, k) after ``num_iters`` steps from τ0 = 0 in ``space``'s coordinates: the
        value and, with ``create_graph``, the graph to λ of the steps on the samples."""
        if num_iters > space.built_for:
            raise ValueError(f"The Krylov space was built for {space.built_for} steps; {num_iters} were asked for.")
        size = space.basis.shape[0]
        beta = self.ridge_weight().double().cpu()
        detached_steps = 0 if backprop_iters is None or not create_graph else max(num_iters - backprop_iters, 0)
        if space.residual is not None:
            first = space.residual
        else:
            first = torch.zeros(size, dtype=torch.float64)
            if size:
                first[0] = space.norm
        coordinates = torch.zeros(size, dtype=torch.float64)
        with torch.inference_mode(False), (torch.enable_grad() if create_graph else torch.no_grad()):
            for iteration in range(num_iters):
                graph = create_graph and iteration >= detached_steps
                step_beta = beta if graph else beta.detach()
                hessian = space.projected + step_beta * torch.eye(size, dtype=torch.float64)
                gradient = hessian @ coordinates - first
                if space.start is not None:  # + β τ0
                    gradient = gradient + step_beta * space.start
                squared_norm = gradient.pow(2).sum()
                curvature = gradient @ hessian @ gradient
                coordinates = coordinates - squared_norm / curvature.clamp(min=MIN_STEP_DENOMINATOR) * gradient
                if not graph:
                    coordinates = coordinates.detach()
            coordinates = coordinates.to(device=space.basis.device, dtype=space.basis.dtype)
            tau = torch.einsum("m,mdcij->dcij", coordinates, space.basis)
            if space.origin is not None:
                tau = tau + space.origin
        return tau if create_graph else tau.detach()

    def _episodes(self, features, targets, weights):
        """Validate shapes and return (E, N, C, H, W) features, (E, N, D, H, W) targets, (E, N) weights."""
        if features.dim() not in (4, 5) or targets.dim() != features.dim():
            raise ValueError(
                "features and targets must both be (N, C, H, W) or both (E, N, C, H, W); "
                f"got {tuple(features.shape)} and {tuple(targets.shape)}."
            )
        if features.dim() == 4:
            features, targets = features[None], targets[None]
            weights = None if weights is None else weights[None]
        episodes, samples, channels, height, width = features.shape
        expected_targets = (episodes, samples, self.target_channels, height, width)
        if channels != self.feature_channels or tuple(targets.shape) != expected_targets:
            raise ValueError(
                f"The learner maps {self.feature_channels} feature channels to {self.target_channels} "
                f"target channels on the same grid; got features {tuple(features.shape)} and targets "
                f"{tuple(targets.shape)}."
            )
        if samples == 0:
            raise ValueError("The learner needs at least one support sample to fit.")
        if weights is None:
            return features, targets, targets.new_full((episodes, samples), self.default_weight(samples))
        if tuple(weights.shape) != (episodes, samples) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(
                f"Sample weights must be finite, non-negative and of shape ({samples},) per episode; "
                f"got shape {tuple(weights.shape)}."
            )
        return features, targets, weights

    def _initial_tau(self, tau_init, episodes, dtype, device) -> torch.Tensor:
        shape = (episodes, self.target_channels, self.feature_channels, self.kernel_size, self.kernel_size)
        if tau_init is None and self.origin is not None:
            return self.origin.to(device, dtype).expand(shape).clone()
        if tau_init is None:
            return torch.zeros(shape, dtype=dtype, device=device)
        tau = tau_init if tau_init.dim() == 5 else tau_init[None]
        if tuple(tau.shape) != shape:
            raise ValueError(f"tau_init must have shape {shape[1:]} (or {shape} for episodes); got {tuple(tau_init.shape)}.")
        return tau.to(dtype)

    def _data_loss(self, tau, features, targets, weights) -> torch.Tensor:
        """½ Σ_i w_i ‖conv(F_i, τ) − M_i‖² per episode, (E,), for one chunk of samples."""
        residual = _grouped_conv(_autograd_usable(features.to(tau.dtype)), tau) - targets
        return 0.5 * (weights * residual.pow(2).flatten(2).sum(dim=2)).sum(dim=1)

    def _gradient(self, tau, features, targets, weights, beta, create_graph) -> torch.Tensor:
        """∇L(τ), (E, D, C, k, k), accumulated over sample chunks so each chunk's graph can go."""
        gradient = beta * tau
        for start in range(0, features.shape[1], self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            data_loss = self._data_loss(tau, features[:, chunk], targets[:, chunk], weights[:, chunk])
            (part,) = torch.autograd.grad(data_loss.sum(), tau, create_graph=create_graph)
            gradient = gradient + part
        return gradient

    def _step_length(self, gradient, features, weights, beta) -> torch.Tensor:
        """Exact line-search step α per episode, (E,): ‖g‖² / (Σ w_i ‖conv(F_i, g)‖² + β‖g‖²)."""
        squared_norm = gradient.pow(2).flatten(1).sum(dim=1)
        curvature = beta * squared_norm
        for start in range(0, features.shape[1], self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            response = _grouped_conv(_autograd_usable(features[:, chunk].to(gradient.dtype)), gradient)
            curvature = curvature + (weights[:, chunk] * response.pow(2).flatten(2).sum(dim=2)).sum(dim=1)
        return squared_norm / curvature.clamp(min=MIN_STEP_DENOMINATOR)


def _autograd_usable(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of an inference-mode tensor (autograd cannot save those), else the tensor itself."""
    return tensor.clone() if tensor.is_inference() else tensor


def _grouped_conv(features: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Per-episode convolution: features (E, N, C, H, W), τ (E, D, C, k, k) -> (E, N, D, H, W).

    The episodes become the groups of one conv2d; for E = 1 no copy of the features is made.
    """
    episodes, samples, channels, height, width = features.shape
    _, out_channels, _, k, _ = tau.shape
    stacked = features.transpose(0, 1).reshape(samples, episodes * channels, height, width)
    out = F.conv2d(stacked, tau.reshape(episodes * out_channels, channels, k, k), padding=k // 2, groups=episodes)
    return out.view(samples, episodes, out_channels, height, width).transpose(0, 1)


GRAM_ROW_BLOCKS = 9  # row blocks of the Gram update: only the blocks on and above the diagonal are multiplied
GRAM_CHUNK_POSITIONS = 4096  # feature-map positions (samples × H × W) per Gram update product


class GramFit:
    """The learner's ridge problem kept as sufficient statistics, for fast fits.

    With X_i = im2col(F_i) (P, C·k²), t = τ as a (C·k², D) matrix and the learner's equal weights
    w (1/N or 1), the inner loss ½ Σ_i w ‖X_i t − M_i‖² + ½ β ‖t‖² depends on the samples only through
    G = Σ X_iᵀ X_i (C·k², C·k²), H = Σ X_iᵀ M_i (C·k², D) and N. Steepest descent with the exact
    line search on (G, H, N) takes the same steps as :meth:`FewShotLearner.fit` on the samples
    (up to rounding) at a cost that does not grow with N:

    - an iteration needs one (C·k²)² × D product, G g: the gradient's own product G t is carried
      along the steps (G t_{k+1} = G t_k − α G g_k) and across fits, where adding or dropping a
      sample changes it by X_iᵀ (X_i t), a P × C·k² × D product;
    - adding or dropping a sample costs one P × (C·k²)² update, of which only the blocks on and
      above the diagonal are multiplied (G is symmetric).
    """

    def __init__(self, learner: FewShotLearner, device, dtype=torch.float32):
        size = learner.feature_channels * learner.kernel_size**2
        self.learner = learner
        self.gram = torch.zeros(size, size, device=device, dtype=dtype)
        self.cross = torch.zeros(size, learner.target_channels, device=device, dtype=dtype)
        self.count = 0
        self._tau: torch.Tensor | None = None  # the last fit's t, (C·k², D)
        self._gram_tau: torch.Tensor | None = None  # G t for it, kept current by update()
        bounds = torch.linspace(0, size, GRAM_ROW_BLOCKS + 1).round().long().unique().tolist()
        self._blocks = list(zip(bounds[:-1], bounds[1:]))

    def _columns(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (C·k², N·H·W) patches, rows in the order of τ's (D, C, k, k) weights."""
        k = self.learner.kernel_size
        columns = F.unfold(features.to(self.gram.dtype), kernel_size=k, padding=k // 2)  # (N, Ck², P)
        return columns.transpose(0, 1).reshape(columns.shape[1], -1)

    def update(self, features: torch.Tensor, targets: torch.Tensor, sign: float = 1.0) -> None:
        """Add (sign +1) or remove (sign −1) samples: features (N, C, H, W), targets (N, D, H, W)."""
        # samples per product: up to chunk_size, fewer on large maps (the patches of one 64×64
        # map are already 38 MB, and a product over 4096 positions runs near full speed)
        per_chunk = max(1, min(self.learner.chunk_size, GRAM_CHUNK_POSITIONS // (features.shape[-2] * features.shape[-1])))
        with torch.no_grad():
            for start in range(0, features.shape[0], per_chunk):
                chunk = slice(start, start + per_chunk)
                columns = self._columns(features[chunk])  # (Ck², nP)
                values = targets[chunk].to(self.gram.dtype).transpose(0, 1).flatten(1).T  # (nP, D)
                for low, high in self._blocks:  # the upper block triangle; mirrored below
                    self.gram[low:high, low:].addmm_(columns[low:high], columns[low:].T, alpha=sign)
                self.cross.addmm_(columns, values, alpha=sign)
                if self._gram_tau is not None:  # keep G t exact for the carried t
                    self._gram_tau.addmm_(columns, columns.T @ self._tau, alpha=sign)
                self.count += int(sign) * features[chunk].shape[0]
            for i, (low, high) in enumerate(self._blocks):
                for lower_low, lower_high in self._blocks[i + 1 :]:
                    self.gram[lower_low:lower_high, low:high] = self.gram[low:high, lower_low:lower_high].T

    def _start(self, tau_init: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """t (C·k², D) from τ (D, C, k, k; None: the learner's τ0) and G t: carried when τ is
        the last fit's result."""
        if tau_init is None and self.learner.origin is not None:
            return self._start(self.learner.origin)
        if tau_init is None:
            return torch.zeros_like(self.cross), torch.zeros_like(self.cross)
        t = tau_init.detach().to(self.gram.dtype).reshape(tau_init.shape[0], -1).T.contiguous()
        if self._tau is not None and torch.equal(t, self._tau):
            return self._tau, self._gram_tau
        return t, self.gram @ t

    def fit(self, tau_init: torch.Tensor | None, num_iters: int) -> torch.Tensor:
        """``num_iters`` steepest-descent steps from ``tau_init`` (D, C, k, k; None: zero);
        returns τ (detached, in ``tau_init``'s dtype or the statistics')."""
        if self.count <= 0:
            raise ValueError("The learner needs at least one support sample to fit.")
        learner = self.learner
        shape = (learner.target_channels, learner.feature_channels, learner.kernel_size, learner.kernel_size)
        with torch.no_grad():
            beta = self.learner.ridge_weight().detach().to(self.gram.dtype)
            scale = learner.default_weight(self.count)
            t, gram_t = self._start(tau_init)
            for _ in range(num_iters):
                gradient = (gram_t - self.cross) * scale + beta * t
                gram_gradient = self.gram @ gradient
                squared_norm = gradient.pow(2).sum()
                curvature = (gradient * gram_gradient).sum() * scale + beta * squared_norm
                step = squared_norm / curvature.clamp(min=MIN_STEP_DENOMINATOR)
                t = t - step * gradient
                gram_t = gram_t - step * gram_gradient
            self._tau, self._gram_tau = t, gram_t
        return t.T.reshape(shape).to(self.gram.dtype if tau_init is None else tau_init.dtype)
