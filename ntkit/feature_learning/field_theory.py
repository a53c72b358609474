r"""Dynamical mean-field theory (DMFT) of feature learning in infinitely wide networks under μP.

Bordelon & Pehlevan 2022, *Self-consistent dynamical field theory of kernel evolution in wide neural networks*
(NeurIPS; arXiv:2205.09653). The network, in the mean-field / maximal-update parameterisation (μP; Yang & Hu
2021) with all parameters ``N(0, 1)`` (``σ_ℓ = W_std``, ``β_ℓ = b_std`` of the ``ℓ``-th Dense layer, ``D`` input
features, hidden width ``N``)::

    h¹_μ = σ₀ W⁰ x_μ/√D + β₀ b⁰,     h^{ℓ+1}_μ = σ_ℓ W^ℓ φ(h^ℓ_μ)/√N + β_ℓ b^ℓ,
    f_μ  = (σ_L w^L·φ(h^L_μ)/√N + β_L b^L) / (γ₀ √N)              (= w^L·φ(h^L_μ)/(γ₀ N) for σ = 1, β = 0)

trained by gradient flow ``dθ/dt = −η₀ γ₀² N ∇_θ L`` on ``L = (1/2P) Σ_μ |f_c(x_μ) − y_μ|²`` with centred
outputs ``f_c = f(θ_t) − f(θ_0)``. With the error signal ``Δ_μ(t) = y_μ − f_c(x_μ, t)``, the kernels

    Φ^ℓ_{μν}(t, s) = φ(h^ℓ_μ(t))·φ(h^ℓ_ν(s))/N,   G^ℓ_{μν}(t, s) = g^ℓ_μ(t)·g^ℓ_ν(s)/N,   g^ℓ = γ₀N ∂f/∂h^ℓ,
    Φ̃^ℓ = σ_ℓ² Φ^ℓ + β_ℓ²  (Φ⁰ = x·x'/D),      G^{L+1} = 1

drive the outputs exactly at every width (c = η₀/P)::

    ∂f_μ/∂t = c Σ_ν K_μν(t) Δ_ν(t),       K(t) = Σ_{ℓ=0}^{L} G^{ℓ+1}(t, t) ⊙ Φ̃^ℓ(t, t).

As ``N → ∞`` every neuron of layer ℓ is an independent draw of one stochastic process, the single-site
("field") dynamics of Bordelon & Pehlevan (their eqs. for ``h``, ``z`` and the response functions; here
with the factors ``γ₀`` of their ``A``, ``B`` and ``c`` written out)::

    h^ℓ_μ(t) = u^ℓ_μ(t) + ∫₀ᵗ ds Σ_ν [ A^{ℓ−1}_{μν}(t, s) + γ₀ c Δ_ν(s) Φ̃^{ℓ−1}_{μν}(t, s) ] g^ℓ_ν(s)
    z^ℓ_μ(t) = r^ℓ_μ(t) + ∫₀ᵗ ds Σ_ν [ B^ℓ_{μν}(t, s)   + γ₀ c Δ_ν(s) σ_ℓ² G^{ℓ+1}_{μν}(t, s) ] φ(h^ℓ_ν(s))
    g^ℓ_μ(t) = φ'(h^ℓ_μ(t)) z^ℓ_μ(t)
    u^ℓ ~ GP(0, Φ̃^{ℓ−1}),   r^ℓ ~ GP(0, σ_ℓ² G^{ℓ+1})                       (independent Gaussian sources)
    Φ^ℓ = ⟨φ(h^ℓ) φ(h^ℓ)ᵀ⟩,   G^ℓ = ⟨g^ℓ g^ℓᵀ⟩                              (self-consistency)
    A^ℓ_{μν}(t, s) = σ_ℓ² ⟨δφ(h^ℓ_μ(t))/δr^ℓ_ν(s)⟩,   B^ℓ_{μν}(t, s) = σ_ℓ² ⟨δg^{ℓ+1}_μ(t)/δu^{ℓ+1}_ν(s)⟩

(``A⁰ = B^L = 0``; ``u¹`` is constant in time, and ``z^L_μ(t) = σ_L w^L(t)`` is the same for every input). The
response functions are the Onsager reaction of the initial weights ``W^ℓ(0)``, which the forward and the
backward pass share; they vanish for one hidden layer. Multiple outputs: ``g``, ``z``, ``r``, ``G`` and ``B``
carry an output index ``c`` beside ``μ`` (``G^{L+1}_{μc,νc'} = δ_{cc'}``, ``Δ_ν g_ν → Σ_c Δ_{νc} g_{νc}``).

At ``γ₀ → 0`` the fields are their Gaussian sources, the kernels keep their initial (NNGP and NTK) values and
``K(t) = Θ``, the NTK of the same net in the NTK parameterisation: ``f(t) = (I − exp(−η₀Θt/P)) y``, which is
``ntkit.predict.gradient_descent_mse(Θ, y, learning_rate=η₀·out)`` from ``fx_train_0 = 0`` (ntkit normalises the
MSE by all ``P·out`` targets, so ``η = η₀·out`` gives ``η/(P·out) = η₀/P``): the times ``t`` of the two are the
same, because the μP net's function-space kernel ``γ₀²N ∇f·∇f`` *is* the NTK-parameterised net's NTK.

Discretisation (chosen so that the γ₀ → 0 limit is exact on any grid):

* time grid ``0 = t₀ < … < t_{T−1}`` (the requested times, plus 0); fields and two-time kernels live on it;
* ``∫₀^{t_k} ds F(s) ≈ Σ_j W_kj F(t_j)``, the trapezoid rule (second order); the response functions are
  derivatives with respect to the grid values of the sources, so they carry no quadrature weight;
* outputs by the exponential midpoint rule ``Δ_{k+1} = exp(−c (t_{k+1} − t_k) K̄) Δ_k``,
  ``K̄ = (K(t_k) + K(t_{k+1}))/2`` (second order, and exact when ``K`` is constant — the lazy limit — so that
  there ``f`` is the closed-form NTK flow at every grid time).

Solution (the Monte-Carlo-over-fields scheme of Bordelon & Pehlevan, with changes that make it exact at
``γ₀ → 0``, deterministic and free of inner iterations):

1. start from the lazy kernels (``Φ^ℓ``, ``G^ℓ`` constant in time, ``A = B = 0``); per iteration, solve the
   outputs for ``Δ``, then for every layer draw ``S`` samples of the sources as ``u = Φ̃^{1/2} ε``,
   ``r = (σ_ℓ²G^{ℓ+1})^{1/2} ε'`` (symmetric square roots of the PSD parts; for the first layer a factor of
   ``Φ̃⁰``'s rank ``≤ D + 1``, so that its draws live in that many dimensions; ``ε``, ``ε'`` standard normal from a
   fixed seed, the same draws every iteration, by randomised quasi-Monte Carlo: scrambled Sobol nets) and solve
   each sample's field equations exactly by marching in time: with the explicit quadrature and causal
   responses, ``h(t_k)`` needs ``g`` before ``t_k`` only, then ``z(t_k)`` needs ``φ(h)`` up to ``t_k``;
2. control variates: ``Φ^ℓ = E[φ(u)φ(u)ᵀ] + ⟨φ(h)φ(h)ᵀ − φ(u)φ(u)ᵀ⟩_S`` with the first term exact (the layer's
   own kernel rule on ``Φ̃^{ℓ−1}``), and likewise ``G^ℓ = K̇(Φ̃^{ℓ−1}) ⊙ σ_ℓ²G^{ℓ+1} + ⟨g gᵀ − g₀ g₀ᵀ⟩_S``,
   ``g₀ = φ'(u) r``: the Monte-Carlo part is only the non-Gaussian correction, which vanishes with γ₀;
3. response functions as averages of pathwise Jacobians (as in the authors' code), from the tangent equations
   of the march (see ``_Solver._responses``) on ``response_samples`` of the samples. For piecewise-linear ``φ``
   (ReLU family) ``φ'' = (b − a)δ(h)``: the delta is a narrow Gaussian (``smoothing``), since a trajectory
   crossing a kink changes the *averaged* response. (Stein's lemma, ``⟨F εᵀ⟩ = ⟨∂F/∂u⟩ S_u``, would need the
   inverse of source covariances that are singular at the lazy start — time-constant — and nearly singular
   for smooth-in-time fields: it amplifies the Monte-Carlo noise without bound, so it is not used);
4. damped updates ``X ← X + β (X_new − X)`` of all kernels and responses until the outputs change by less than
   ``tol`` (relative to ``max |y|``).

Sampling error: each kernel entry is a mean of ``S`` i.i.d. terms, so its standard error is ``σ_ij/√S``
(``σ_ij`` the terms' standard deviation; central limit theorem), and ``σ_ij = O(γ₀)`` because of the control
variates. The samples are processed in chunks; the spread of the outputs predicted from each chunk's kernels
(batch means) estimates the outputs' standard error, reported as ``std_error``. With ``samples=None`` the
solver first converges with ``min_samples`` and then raises ``S`` to ``S·(std_error/mc_tol)²`` (at most
``max_samples``), continuing from the converged kernels.

Cost per iteration and hidden layer: ``O(S·(Tn)²·out)`` for the fields and kernels and ``O((Tn·out)³)`` for the
square roots, with ``n`` the train + test points and ``T`` the grid length: for ``P ≲ 100`` points and a few
dozen times. One hidden layer is much cheaper (no two-time kernels, no responses): ``O(S·T·n²)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch import Tensor

from ntkit._inputs import as_batch, to_tensor
from ntkit._memory import check_fits
from ntkit.feature_learning._kernels import affine_map, blockwise_map, nonlinear_map
from ntkit.feature_learning._network import FCSpec, as_float64, fc_spec
from ntkit.layers.base import Layer
from ntkit.layers.elementwise import ABRelu, ElementwiseLayer, Sign

__all__ = ["DMFTResult", "dmft", "quadrature_weights"]

F64 = torch.float64


@dataclasses.dataclass
class DMFTResult:
    """The infinite-width μP training dynamics returned by :func:`dmft`.

    Points are indexed train first, then test (``n = P + Q``); times are ``times`` (the requested ones).

    Attributes:
      times: ``(T,)`` the requested times.
      f_train: ``(T, P, out)`` centred outputs ``f(θ_t) − f(θ_0)`` on the training points.
      f_test: ``(T, Q, out)`` on the test points, or ``None``.
      y_train: ``(P, out)`` targets.
      feature_kernels: per hidden layer ``ℓ = 1..L``, ``Φ^ℓ(t, t)`` ``(T, n, n)`` over train + test points.
      gradient_kernels: per hidden layer, ``G^ℓ(t, t)`` ``(T, n, n, out, out)`` (zipped output axes).
      ntk: ``K(t)`` ``(T, n, n, out, out)``, the kernel that drives the outputs.
      gamma, learning_rate: ``γ₀`` and ``η₀``.
      samples: Monte-Carlo samples per layer used at the end.
      iterations: self-consistency iterations run; ``converged``: whether the last change was below ``tol``;
        ``residual``: that last relative change of the outputs.
      std_error: ``(T, n, out)`` estimated Monte-Carlo standard error of the outputs (batch means).
      grid: ``(T_grid,)`` the time grid the equations were solved on (``0`` and ``times``).
    """

    times: Tensor
    f_train: Tensor
    f_test: Optional[Tensor]
    y_train: Tensor
    feature_kernels: list[Tensor]
    gradient_kernels: list[Tensor]
    ntk: Tensor
    gamma: float
    learning_rate: float
    samples: int
    iterations: int
    converged: bool
    residual: float
    std_error: Tensor
    grid: Tensor

    @property
    def train_loss(self) -> Tensor:
        """``(T,)``: ``L(t) = (1/2P) Σ_μ |f_c(x_μ, t) − y_μ|²``."""
        return 0.5 * ((self.f_train - self.y_train) ** 2).sum((1, 2)) / self.f_train.shape[1]

    def test_loss(self, y_test: Any) -> Tensor:
        """``(T,)``: ``(1/2Q) Σ |f_c(x, t) − y|²`` on the test points."""
        if self.f_test is None:
            raise ValueError("this result has no test points; pass x_test= to dmft.")
        y = to_tensor(as_float64(y_test), "y_test", dtype=F64, device=self.f_test.device).reshape(
            self.f_test.shape[1], -1
        )
        return 0.5 * ((self.f_test - y) ** 2).sum((1, 2)) / self.f_test.shape[1]


def quadrature_weights(grid: Tensor) -> Tensor:
    """``W`` ``(T, T)``, strictly lower triangular: ``∫₀^{t_k} F(s) ds ≈ Σ_{j<k} W_kj F(t_j)``.

    The trapezoid rule on ``[t₀, t_{k−1}]`` and, on the last step ``[t_{k−1}, t_k]``, the integrand extrapolated
    linearly from ``t_{k−2}, t_{k−1}`` (the two-step Adams–Bashforth rule; the plain left rule on the first
    step): second order, and explicit, so that the field equations can be solved by marching in time.
    """
    T = grid.shape[0]
    W = grid.new_zeros(T, T)
    dt = grid[1:] - grid[:-1]
    for k in range(1, T):
        W[k, : k - 1] += dt[: k - 1] / 2
        W[k, 1:k] += dt[: k - 1] / 2
        h = dt[k - 1]
        if k == 1:
            W[k, 0] += h
        else:
            ratio = h * h / (2 * dt[k - 2])
            W[k, k - 1] += h + ratio
            W[k, k - 2] -= ratio
    return W


def _sqrt_psd(C: Tensor) -> tuple[Tensor, Tensor]:
    """``(S, S²)``: the symmetric square root of the PSD part of ``C`` and the covariance it samples."""
    lam, V = torch.linalg.eigh((C + C.T) / 2)
    lam = lam.clamp_min(0.0)
    S = (V * lam.sqrt()) @ V.T
    return (S + S.T) / 2, (V * lam) @ V.T


def _low_rank_factor(C: Tensor, rtol: float = 1e-12) -> Tensor:
    """``R`` ``(k, m)`` with ``RᵀR = C`` (PSD part), ``k`` the numerical rank of ``C``: a Gaussian with covariance
    ``C`` is ``εR`` for ``ε ~ N(0, I_k)``, so (quasi-)Monte Carlo runs in ``k`` dimensions, not ``m``."""
    lam, V = torch.linalg.eigh((C + C.T) / 2)
    keep = lam > rtol * max(float(lam.max()), 1e-300)
    return lam[keep].sqrt()[:, None] * V[:, keep].T


def second_derivative(phi: ElementwiseLayer, h: Tensor, smoothing: float) -> Tensor:
    """``φ''(h)`` for the tangent equations of the response functions.

    Smooth ``φ``: by automatic differentiation of ``φ``. Piecewise-linear ``φ`` (:class:`~ntkit.layers.ABRelu`:
    ReLU, leaky ReLU, ``|x|``): ``φ'' = (b − a) δ(h)``, the Dirac delta replaced by a Gaussian of width
    ``smoothing·rms(h)`` — the response of the *averaged* dynamics includes the kinks (a trajectory crossing
    ``h = 0`` switches its gradient), which a derivative taken sample by sample would miss. ``Sign``: 0 (its
    ``φ' = 0`` in ntkit's convention).
    """
    if isinstance(phi, Sign):
        return torch.zeros_like(h)
    if isinstance(phi, ABRelu):
        eps = smoothing * max(float(h.pow(2).mean().sqrt()), 1e-300)
        return (phi.b - phi.a) * torch.exp(-0.5 * (h / eps) ** 2) / (math.sqrt(2 * math.pi) * eps)
    with torch.enable_grad():
        xx = h.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(phi.fn(xx).sum(), xx, create_graph=True)
        if not d1.requires_grad:  # φ' constant
            return torch.zeros_like(h)
        (d2,) = torch.autograd.grad(d1.sum(), xx)
    return d2


def _equal_time(K2: Tensor, T: int, m: int) -> Tensor:
    """Equal-time blocks ``K(t, t)`` ``(T, m, m)`` of a two-time kernel stored as ``(T·m, T·m)``."""
    return torch.diagonal(K2.reshape(T, m, T, m), dim1=0, dim2=2).permute(2, 0, 1)


def _broadcast_time(K: Tensor, T: int) -> Tensor:
    """A time-independent ``(m, m)`` kernel as a two-time ``(T·m, T·m)`` one."""
    m = K.shape[0]
    return K.reshape(1, m, 1, m).expand(T, m, T, m).reshape(T * m, T * m).clone()


# ---------------------------------------------------------------------------------------------------------
# the solver
# ---------------------------------------------------------------------------------------------------------
class _Solver:
    """State and iteration of the DMFT; see the module docstring for the equations and the scheme."""

    def __init__(
        self,
        spec: FCSpec,
        x: Tensor,
        P: int,
        y: Tensor,
        gamma: float,
        grid: Tensor,
        learning_rate: float,
        chunk: int,
        seed: int,
        qmc: bool,
        responses: bool,
        response_samples: int,
        smoothing: float,
    ):
        self.spec, self.L = spec, spec.depth
        self.n, self.P, self.O = x.shape[0], P, y.shape[1]
        self.T = grid.shape[0]
        self.F, self.B = self.T * self.n, self.T * self.n * self.O
        self.y, self.grid = y, grid
        self.gamma, self.c = float(gamma), float(learning_rate) / P
        self.chunk, self.seed = chunk, seed
        self.responses, self.response_samples, self.smoothing = responses, response_samples, smoothing
        self.W = quadrature_weights(grid)
        # W[k] minus the trapezoid weights of [t₀, t_{k−1}]: nonzero at j = k−1 (rho1) and k−2 (rho2) only
        dt = (grid[1:] - grid[:-1]).tolist()
        self.rho1 = [0.0] + [dt[k - 1] + (dt[k - 1] ** 2 / (2 * dt[k - 2]) if k > 1 else 0.0) for k in range(1, self.T)]
        self.rho2 = [0.0, 0.0] + [-(dt[k - 1] ** 2) / (2 * dt[k - 2]) for k in range(2, self.T)]
        self.qmc = qmc
        self.dev = x.device
        self.phi0 = affine_map(spec.dense[0], (x @ x.T) / x.shape[1])  # Φ̃⁰ (n, n), constant in time
        self._lazy_init()

    # -- sizes of the stored kernels ------------------------------------------------------------------
    def two_time_phi(self, l: int) -> bool:
        """Φ^ℓ is needed at two times (it is the source covariance of layer ℓ+1)."""
        return l <= self.L - 1

    def two_time_g(self, l: int) -> bool:
        """G^ℓ is needed at two times (it is the source covariance of layer ℓ−1)."""
        return l >= 2

    # -- lazy initial state ----------------------------------------------------------------------------
    def _lazy_init(self) -> None:
        spec, T, n, O = self.spec, self.T, self.n, self.O
        cov = self.phi0
        nngp: list[Tensor] = []
        dots: list[Tensor] = []
        for l in range(1, self.L + 1):
            k, d = nonlinear_map(spec.phis[l - 1], cov, need_dot=True)
            assert d is not None
            nngp.append(k)
            dots.append(d)
            cov = affine_map(spec.dense[l], k)
        g = torch.ones(n, n, dtype=F64, device=self.dev)  # G^{L+1} (per output channel)
        grads: list[Tensor] = [g] * (self.L + 1)
        for l in range(self.L, 0, -1):
            g = dots[l - 1] * (spec.sigma(l) ** 2) * g
            grads[l - 1] = g
        eye = torch.eye(O, dtype=F64, device=self.dev)
        self.Phi: dict[int, Tensor] = {}
        self.G: dict[int, Tensor] = {}
        for l in range(1, self.L + 1):
            k = nngp[l - 1]
            self.Phi[l] = _broadcast_time(k, T) if self.two_time_phi(l) else k.expand(T, n, n).clone()
            gl = torch.einsum("mn,cd->mcnd", grads[l - 1], eye).reshape(n * O, n * O)
            self.G[l] = _broadcast_time(gl, T) if self.two_time_g(l) else gl.expand(T, n * O, n * O).clone()
        self.A: dict[int, Tensor] = {
            l: torch.zeros(self.F, self.B, dtype=F64, device=self.dev) for l in range(1, self.L)
        }
        self.Bresp: dict[int, Tensor] = {
            l: torch.zeros(self.B, self.F, dtype=F64, device=self.dev) for l in range(1, self.L)
        }

    # -- kernels the equations use --------------------------------------------------------------------
    def phi_eq(self, l: int) -> Tensor:
        """``Φ^ℓ(t, t)`` ``(T, n, n)``."""
        K = self.Phi[l]
        return _equal_time(K, self.T, self.n) if self.two_time_phi(l) else K

    def g_eq(self, l: int) -> Tensor:
        """``G^ℓ(t, t)`` ``(T, n·O, n·O)``."""
        K = self.G[l]
        return _equal_time(K, self.T, self.n * self.O) if self.two_time_g(l) else K

    def ntk(self, phi_eq: Optional[list[Tensor]] = None, g_eq: Optional[list[Tensor]] = None) -> Tensor:
        """``K(t) = Σ_ℓ G^{ℓ+1}(t, t) ⊙ Φ̃^ℓ(t, t)`` as ``(T, n, O, n, O)``."""
        T, n, O, spec = self.T, self.n, self.O, self.spec
        phis = phi_eq if phi_eq is not None else [self.phi_eq(l) for l in range(1, self.L + 1)]
        gs = g_eq if g_eq is not None else [self.g_eq(l) for l in range(1, self.L + 1)]
        eye = torch.eye(O, dtype=F64, device=self.dev)
        # ℓ = 0: G¹(t, t) ⊙ Φ̃⁰;  ℓ = 1..L−1: G^{ℓ+1} ⊙ Φ̃^ℓ;  ℓ = L: 1 ⊙ Φ̃^L
        K = gs[0].reshape(T, n, O, n, O) * self.phi0[None, :, None, :, None]
        for l in range(1, self.L + 1):
            pt = spec.sigma(l) ** 2 * phis[l - 1] + spec.beta(l) ** 2
            g = gs[l].reshape(T, n, O, n, O) if l < self.L else eye[None, None, :, None, :]
            K = K + g * pt[:, :, None, :, None]
        return K

    # -- outputs ----------------------------------------------------------------------------------------
    def outputs(self, K: Tensor) -> tuple[Tensor, Tensor]:
        """``(Δ (T, P, O), f (T, n, O))`` from ``K(t)`` by the exponential midpoint rule."""
        T, n, O, P = self.T, self.n, self.O, self.P
        K2 = K.reshape(T, n * O, n * O)
        PO = P * O
        delta = self.y.reshape(PO).clone()
        ftest = self.y.new_zeros((n - P) * O)
        deltas, ftests = [delta], [ftest]
        for k in range(T - 1):
            dt = float(self.grid[k + 1] - self.grid[k])
            Kb = (K2[k] + K2[k + 1]) / 2
            Ktr = (Kb[:PO, :PO] + Kb[:PO, :PO].T) / 2
            lam, V = torch.linalg.eigh(Ktr)
            lam = lam.clamp_min(0.0)
            coef = V.T @ delta
            decay = torch.exp(-self.c * dt * lam)
            # ∫₀^dt c e^{−cλs} ds = −expm1(−cλ dt)/λ  (→ c·dt as λ → 0)
            small = lam * self.c * dt < 1e-12
            integ = torch.where(small, torch.full_like(lam, self.c * dt), -torch.expm1(-self.c * dt * lam) / lam)
            if n > P:
                ftest = ftest + Kb[PO:, :PO] @ (V @ (integ * coef))
            delta = V @ (decay * coef)
            deltas.append(delta)
            ftests.append(ftest)
        D = torch.stack(deltas).reshape(T, P, O)
        f = torch.cat([self.y[None] - D, torch.stack(ftests).reshape(T, n - P, O)], 1)
        return D, f

    # -- one layer's Monte Carlo --------------------------------------------------------------------
    def _noise(self, l: int, replicate: int, size: int, dims: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Standard normal draws ``(ε_u, ε_r)`` of one replicate: a scrambled Sobol net (randomised quasi-Monte
        Carlo: independent scramblings are i.i.d. replicates) mapped through the normal quantile."""
        seed = ((self.seed * 1_000_003 + l) * 1_000_033 + replicate) % (2**62)
        if self.qmc and sum(dims) <= 21201:
            eng = torch.quasirandom.SobolEngine(sum(dims), scramble=True, seed=seed)
            v = eng.draw(size, dtype=F64)
            eps = torch.special.ndtri(v.clamp(1e-16, 1 - 1e-16))
        else:
            gen = torch.Generator()
            gen.manual_seed(seed)
            eps = torch.randn(size, sum(dims), generator=gen, dtype=F64)
        eps = eps.to(self.dev)
        return eps[:, : dims[0]], eps[:, dims[0] :]

    def layer_update(self, l: int, delta: Tensor, n_chunks: int) -> dict[str, Any]:
        """New estimates from layer ``ℓ``'s fields: Φ^ℓ, G^ℓ, the responses A^ℓ and B^{ℓ−1}, and per-chunk
        equal-time kernels (for the batch-means error)."""
        spec, L, T, n, O, P = self.spec, self.L, self.T, self.n, self.O, self.P
        F, B = self.F, self.B
        phi = spec.phis[l - 1]
        gc = self.gamma * self.c
        Dfull = torch.zeros(T, n, O, dtype=F64, device=self.dev)
        Dfull[:, :P] = delta
        eye = torch.eye(O, dtype=F64, device=self.dev)
        sl = spec.sigma(L)
        # ---- sources: u ~ N(0, Φ̃^{ℓ−1}), r ~ N(0, σ_ℓ² G^{ℓ+1}) (symmetric square roots) ---------------
        if l == 1:  # constant in time
            # Φ̃⁰ = σ₀²XXᵀ/D + β₀² has rank ≤ D + 1: draw u in that many dimensions
            Su = _low_rank_factor(self.phi0)
            Cu = Su.T @ Su
            du = Su.shape[0]
        else:
            Su, Cu = _sqrt_psd(spec.sigma(l - 1) ** 2 * self.Phi[l - 1] + spec.beta(l - 1) ** 2)
            du = F
        if l == L:  # r^L = σ_L w^L(0): one draw per output, the same for every input and time
            Sr = Cr = None
            dr = O
        else:
            Sr, Cr = _sqrt_psd(spec.sigma(l) ** 2 * self.G[l + 1])
            dr = B
        # ---- the Gaussian parts of the control variates, exact ---------------------------------------
        k_lazy, dot_lazy = blockwise_map(phi, Cu, need_dot=True)
        assert dot_lazy is not None
        if l == 1:
            phi_lazy = _broadcast_time(k_lazy, T) if self.two_time_phi(l) else k_lazy.expand(T, n, n)
            if l == L:
                g_lazy = (torch.einsum("mn,cd->mcnd", dot_lazy, eye).reshape(n * O, n * O) * sl**2).expand(
                    T, n * O, n * O
                )
            else:
                assert Cr is not None
                cr_eq = _equal_time(Cr, T, n * O).reshape(T, n, O, n, O)
                g_lazy = (cr_eq * dot_lazy[None, :, None, :, None]).reshape(T, n * O, n * O)
        else:
            phi_lazy = k_lazy if self.two_time_phi(l) else _equal_time(k_lazy, T, n)
            d6 = dot_lazy.reshape(T, n, 1, T, n, 1)
            if l == L:
                g_lazy = (d6 * (sl**2 * eye).reshape(1, 1, O, 1, 1, O)).reshape(B, B)
            else:
                assert Cr is not None
                g_lazy = (d6 * Cr.reshape(T, n, O, T, n, O)).reshape(B, B)
        # ---- the operators of the field equations (causal: see _march) -------------------------------
        Mh = Mz = A1 = None
        if l == 1:
            A1 = gc * self.phi0[:, :P]  # (n, P): h = u + γ₀c Φ̃⁰[:, train] ∫ Σ_c Δ g
        else:
            cov_prev = spec.sigma(l - 1) ** 2 * self.Phi[l - 1] + spec.beta(l - 1) ** 2
            Mh = cov_prev.reshape(T, n, T, n, 1) * (gc * self.W).reshape(T, 1, T, 1, 1) * Dfull.reshape(1, 1, T, n, O)
            Mh = Mh + self.A[l - 1].reshape(T, n, T, n, O)
        if l < L:
            Gt = (spec.sigma(l) ** 2 * self.G[l + 1]).reshape(T, n, O, T, n, O)
            Mz = torch.einsum("tmcjnd,jnd->tmcjn", Gt, Dfull) * (gc * self.W).reshape(T, 1, 1, T, 1)
            Mz = Mz + self.Bresp[l].reshape(T, n, O, T, n)
        need_resp = self.responses and self.gamma > 0 and L > 1
        # ---- chunks ------------------------------------------------------------------------------------
        two_phi, two_g = self.two_time_phi(l), self.two_time_g(l)
        dev = self.dev
        acc_phi = torch.zeros(F, F, dtype=F64, device=dev) if two_phi else torch.zeros(T, n, n, dtype=F64, device=dev)
        acc_g = (
            torch.zeros(B, B, dtype=F64, device=dev) if two_g else torch.zeros(T, n * O, n * O, dtype=F64, device=dev)
        )
        acc_A = torch.zeros(F, B, dtype=F64, device=dev) if (need_resp and l < L) else None
        acc_B = torch.zeros(B, F, dtype=F64, device=dev) if (need_resp and l > 1) else None
        n_jac = 0
        chunk_phi_eq, chunk_g_eq = [], []
        total = 0
        for ci in range(n_chunks):
            S = self.chunk
            eu, er = self._noise(l, ci, S, (du, dr))
            u = (eu @ Su).reshape(S, 1, n).expand(S, T, n) if l == 1 else (eu @ Su).reshape(S, T, n)
            if l == L:
                r = (sl * er).reshape(S, 1, 1, O).expand(S, T, n, O)
            else:
                assert Sr is not None
                r = (er @ Sr).reshape(S, T, n, O)
            h, ph, g, z = self._march(l, u, r, Mh, A1, Mz, Dfull)
            pu, dpu = phi.fn(u), phi.derivative(u)
            g0 = dpu[..., None] * r
            cphi = torch.einsum("stm,stn->tmn", ph, ph) - torch.einsum("stm,stn->tmn", pu, pu)
            if two_phi:
                pf, puf = ph.reshape(S, F), pu.reshape(S, F)
                acc_phi += pf.T @ pf - puf.T @ puf
            else:
                acc_phi += cphi
            g3, g03 = g.reshape(S, T, n * O), g0.reshape(S, T, n * O)
            cg = torch.einsum("sta,stb->tab", g3, g3) - torch.einsum("sta,stb->tab", g03, g03)
            if two_g:
                gf, g0f = g.reshape(S, B), g0.reshape(S, B)
                acc_g += gf.T @ gf - g0f.T @ g0f
            else:
                acc_g += cg
            if (acc_A is not None or acc_B is not None) and n_jac < self.response_samples:
                m = min(S, self.response_samples - n_jac)
                jA, jB = self._responses(l, h[:m], z[:m], Mh, A1, Mz, Dfull, acc_A is not None, acc_B is not None)
                if acc_A is not None and jA is not None:
                    acc_A += jA
                if acc_B is not None and jB is not None:
                    acc_B += jB
                n_jac += m
            chunk_phi_eq.append(cphi / S)
            chunk_g_eq.append(cg / S)
            total += S
        out: dict[str, Any] = {"Phi": phi_lazy + acc_phi / total, "G": g_lazy + acc_g / total}
        if acc_A is not None:
            out["A"] = spec.sigma(l) ** 2 * acc_A / n_jac
        if acc_B is not None:
            out["B"] = spec.sigma(l - 1) ** 2 * acc_B / n_jac
        phi_lazy_eq = _equal_time(phi_lazy, T, n) if two_phi else phi_lazy
        g_lazy_eq = _equal_time(g_lazy, T, n * O) if two_g else g_lazy
        out["chunk_phi_eq"] = [phi_lazy_eq + c for c in chunk_phi_eq]
        out["chunk_g_eq"] = [g_lazy_eq + c for c in chunk_g_eq]
        return out

    def _dense_ops(
        self, l: int, Mh: Optional[Tensor], A1: Optional[Tensor], Mz: Optional[Tensor], Dfull: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``M_h`` ``(T, n, T, n, O)`` and ``M_z`` ``(T, n, O, T, n)`` as dense tensors (the structured first-layer
        and readout operators written out), for the tangent equations."""
        T, n, O, P = self.T, self.n, self.O, self.P
        gc = self.gamma * self.c
        if Mh is None:
            assert A1 is not None
            Mh = torch.zeros(T, n, T, n, O, dtype=F64, device=self.dev)
            Mh[:, :, :, :P] = (
                self.W.reshape(T, 1, T, 1, 1) * A1.reshape(1, n, 1, P, 1) * Dfull[:, :P].reshape(1, 1, T, P, O)
            )
        if Mz is None:
            s2 = self.spec.sigma(self.L) ** 2
            Mz = (gc * s2 * self.W.reshape(T, 1, 1, T, 1) * Dfull.permute(2, 0, 1).reshape(1, 1, O, T, n)).expand(
                T, n, O, T, n
            )
        return Mh, Mz

    def _responses(
        self,
        l: int,
        h: Tensor,
        z: Tensor,
        Mh: Optional[Tensor],
        A1: Optional[Tensor],
        Mz: Optional[Tensor],
        Dfull: Tensor,
        want_A: bool,
        want_B: bool,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Sums over the given samples of the pathwise Jacobians ``∂φ(h)/∂r`` ``(F, B)`` and ``∂g/∂u`` ``(B, F)``.

        Tangent equations of the march (linear, causal, solved the same way), for perturbations ``δr``, ``δu``::

            δh_k = δu_k + Σ_{j<k} M_h[k, j] δg_j,   δz_k = δr_k + Σ_{j≤k} M_z[k, j] φ'(h_j) δh_j,
            δg_k = φ''(h_k) z_k δh_k + φ'(h_k) δz_k
        """
        spec, T, n, O = self.spec, self.T, self.n, self.O
        F, B = self.F, self.B
        phi = spec.phis[l - 1]
        Mh_d, Mz_d = self._dense_ops(l, Mh, A1, Mz, Dfull)
        Mh2 = Mh_d.reshape(T, n, T * n * O)
        Mz2 = Mz_d.reshape(T, n * O, T * n)
        d1_all = phi.derivative(h)
        d2_all = second_derivative(phi, h, self.smoothing)
        # directions, ordered by time (causality: at step k only those of times ≤ k can be non-zero): per time,
        # the r-perturbations (n·O of them, for A), then the u-perturbations (n, for B)
        mr, mu = (n * O if want_A else 0), (n if want_B else 0)
        md = mr + mu
        dirs = T * md
        sumA = torch.zeros(F, B, dtype=F64, device=self.dev) if want_A else None
        sumB = torch.zeros(B, F, dtype=F64, device=self.dev) if want_B else None
        per = max(1, (1 << 26) // max(1, 8 * dirs * (F + B)))  # samples per batch: ~64 MiB of tangents
        ar_r = torch.arange(n * O, device=self.dev)
        ar_u = torch.arange(n, device=self.dev)
        for a in range(0, h.shape[0], per):
            zb = z[a : a + per].reshape(-1, T, n * O)
            d1, d2 = d1_all[a : a + per], d2_all[a : a + per]
            S = zb.shape[0]
            d1r = d1.repeat_interleave(O, dim=2) if O > 1 else d1  # φ'(h) per (input, output)
            curv = (d2.repeat_interleave(O, dim=2) if O > 1 else d2) * zb  # φ''(h) z
            # layout (time, unit, sample, direction): the sums over (j, unit) are one matrix product per step
            dg = torch.zeros(T, n * O, S, dirs, dtype=F64, device=self.dev)
            dphi = torch.zeros(T, n, S, dirs, dtype=F64, device=self.dev)
            for k in range(T):
                if k > 0:  # δh_k = Σ_{j<k} M_h[k, j] δg_j
                    dhk = (Mh2[k, :, : k * n * O] @ dg[:k].reshape(k * n * O, S * dirs)).reshape(n, S, dirs)
                else:
                    dhk = torch.zeros(n, S, dirs, dtype=F64, device=self.dev)
                if want_B:  # + δu_k
                    dhk[ar_u, :, k * md + mr + ar_u] += 1.0
                dphi[k] = d1[:, k].T[:, :, None] * dhk
                # δz_k = δr_k + Σ_{j≤k} M_z[k, j] φ'(h_j) δh_j
                dzk = (Mz2[k, :, : (k + 1) * n] @ dphi[: k + 1].reshape((k + 1) * n, S * dirs)).reshape(n * O, S, dirs)
                if want_A:
                    dzk[ar_r, :, k * md + ar_r] += 1.0
                # δg_k = φ''(h_k) z_k δh_k + φ'(h_k) δz_k
                dhk_r = dhk.repeat_interleave(O, dim=0) if O > 1 else dhk
                dg[k] = curv[:, k].T[:, :, None] * dhk_r + d1r[:, k].T[:, :, None] * dzk
            if sumA is not None:
                sumA += dphi.sum(2).reshape(T, n, T, md)[..., :mr].reshape(F, B)
            if sumB is not None:
                sumB += dg.sum(2).reshape(T, n * O, T, md)[..., mr:].reshape(B, F)
        return sumA, sumB

    def _march(
        self,
        l: int,
        u: Tensor,
        r: Tensor,
        Mh: Optional[Tensor],
        A1: Optional[Tensor],
        Mz: Optional[Tensor],
        Dfull: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(h, φ(h), g, z)`` of one chunk, by marching in time, exactly (no iteration):
        ``h(t_k) = u(t_k) + Σ_{j<k} M_h[k, j] g(t_j)`` (explicit quadrature, strictly causal responses A), then
        ``z(t_k) = r(t_k) + Σ_{j≤k} M_z[k, j] φ(h(t_j))`` (B may act at equal times) and ``g = φ'(h) z``.

        The structured operators of the first layer (``Φ̃⁰`` is constant in time) and of the readout (``z^L`` is
        the same for every input) keep running trapezoid integrals: O(1) work per step."""
        spec, L, T, n, O, P = self.spec, self.L, self.T, self.n, self.O, self.P
        S = u.shape[0]
        phi = spec.phis[l - 1]
        if self.gamma == 0.0:
            h = u.contiguous()
            return h, phi.fn(h), phi.derivative(h)[..., None] * r, r
        gcs = self.gamma * self.c * spec.sigma(L) ** 2
        h = torch.empty(S, T, n, dtype=F64, device=self.dev)
        ph = torch.empty(S, T, n, dtype=F64, device=self.dev)
        g = torch.empty(S, T, n, O, dtype=F64, device=self.dev)
        z = torch.empty(S, T, n, O, dtype=F64, device=self.dev)
        dts = (self.grid[1:] - self.grid[:-1]).tolist()
        rho1, rho2 = self.rho1, self.rho2
        # running trapezoid integrals up to t_{k−1} of q = Σ_c Δ g (layer 1) and p = Σ_ν Δ φ (readout)
        Iq = torch.zeros(S, P, dtype=F64, device=self.dev)
        Ip = torch.zeros(S, O, dtype=F64, device=self.dev)
        q_prev: list[Tensor] = []
        p_prev: list[Tensor] = []
        for k in range(T):
            hk = u[:, k]
            if k > 0:
                if Mh is None:
                    assert A1 is not None
                    acc = Iq + rho1[k] * q_prev[-1]
                    if k > 1:
                        acc = acc + rho2[k] * q_prev[-2]
                    hk = hk + acc @ A1.T
                else:
                    hk = hk + g[:, :k].reshape(S, -1) @ Mh[k, :, :k].reshape(n, -1).T
            h[:, k] = hk
            pk = phi.fn(hk)
            ph[:, k] = pk
            if Mz is None:
                zk = r[:, k]
                if k > 0:
                    acc = Ip + rho1[k] * p_prev[-1]
                    if k > 1:
                        acc = acc + rho2[k] * p_prev[-2]
                    zk = zk + (gcs * acc)[:, None, :]
                pnew = pk[:, :P] @ Dfull[k, :P]  # (S, O)
                if k > 0:
                    Ip = Ip + dts[k - 1] / 2 * (p_prev[-1] + pnew)
                p_prev = [*p_prev[-1:], pnew]
            else:
                zk = r[:, k] + (ph[:, : k + 1].reshape(S, -1) @ Mz[k, :, :, : k + 1].reshape(n * O, -1).T).reshape(
                    S, n, O
                )
            zk = zk.expand(S, n, O)
            z[:, k] = zk
            gk = phi.derivative(hk)[..., None] * zk
            g[:, k] = gk
            if Mh is None:
                qnew = (gk[:, :P] * Dfull[k, :P]).sum(-1)
                if k > 0:
                    Iq = Iq + dts[k - 1] / 2 * (q_prev[-1] + qnew)
                q_prev = [*q_prev[-1:], qnew]
        return h, ph, g, z


# ---------------------------------------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------------------------------------
def dmft(
    net: Layer,
    x_train: Any,
    y_train: Any,
    *,
    gamma: float,
    times: Any,
    x_test: Any = None,
    learning_rate: float = 1.0,
    samples: Optional[int] = None,
    mc_tol: float = 2e-3,
    min_samples: int = 4096,
    max_samples: int = 1 << 17,
    replicates: int = 16,
    damping: float = 0.6,
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    qmc: bool = True,
    responses: bool = True,
    response_samples: int = 1024,
    smoothing: float = 0.2,
    max_step: Optional[float] = None,
) -> DMFTResult:
    r"""Infinite-width μP training of ``net`` by full-batch gradient flow on MSE (Bordelon & Pehlevan 2022).

    See the module docstring for the network, the equations, the discretisation and the Monte-Carlo scheme.

    Args:
      net: ``serial(Dense(N), φ, ..., Dense(out))`` (any elementwise ``φ``; ``W_std``/``b_std`` honoured; the
        widths do not matter). Its μP finite twin is ``net.module(D, parameterization="mup", gamma=gamma)``.
      x_train: ``(P, D)`` inputs (``P ≲ 100``); y_train: ``(P,)`` or ``(P, out)`` targets.
      gamma: ``γ₀ ≥ 0``, the feature-learning strength (``0`` is the lazy NTK limit).
      times: the times (``≥ 0``, in units where ``dθ/dt = −η₀γ₀²N ∇L``) at which to return outputs and kernels;
        with ``0`` they are also the solver's time grid (second-order accurate: refine it, or pass
        ``max_step``, until the outputs stop moving).
      x_test: ``(Q, D)`` points whose outputs and kernels are tracked (they do not affect training).
      learning_rate: ``η₀``.
      samples: Monte-Carlo samples per layer (in at least ``replicates`` chunks of a power of two); ``None``
        chooses them from ``mc_tol`` (between ``min_samples`` and ``max_samples``).
      mc_tol: target standard error of the outputs, relative to ``max |y|`` (``samples=None``).
      damping: ``β`` of the damped self-consistency updates; tol: stop when the outputs change by less than
        ``tol·max|y|``; max_iter: at most this many iterations.
      seed: the Monte-Carlo draws (fixed: the result is deterministic).
      qmc: draw the sources by randomised quasi-Monte Carlo (scrambled Sobol replicates, one per chunk) rather
        than plain Monte Carlo; both are unbiased, the replicates' spread is the error estimate either way.
      responses: ``False`` drops the response functions ``A``, ``B`` (keeps them zero): only to measure their
        effect; the equations need them for two or more hidden layers.
      response_samples: samples (of the ``samples``) on which the response functions' pathwise Jacobians are
        averaged (their cost per sample is that of ``T·n·(1 + out)`` field solves).
      smoothing: width, relative to the fields' rms, of the Gaussian that stands for ``δ(h)`` in ``φ''`` of
        piecewise-linear ``φ`` (ReLU family) in those Jacobians.
      max_step: refine the grid so that no step exceeds it.

    Returns:
      :class:`DMFTResult` (``f_train`` ``(T, P, out)``, ``f_test``, ``feature_kernels``, ...).
    """
    spec = fc_spec(net, "dmft")
    xt = as_batch(x_train, "x_train").to(F64)
    if xt.dim() != 2:
        raise ValueError(f"x_train must be (P, features) for a fully-connected net, got shape {tuple(xt.shape)}.")
    dev = xt.device
    P = xt.shape[0]
    y = to_tensor(as_float64(y_train), "y_train", dtype=F64, device=dev)
    if y.dim() == 1:
        y = y[:, None]
    if y.dim() != 2 or y.shape[0] != P:
        raise ValueError(f"y_train must be (P,) or (P, out) with P = {P}, got shape {tuple(y.shape)}.")
    if y.shape[1] != spec.out_features:
        raise ValueError(
            f"y_train has {y.shape[1]} outputs but the net's readout Dense has out_features={spec.out_features}."
        )
    if x_test is not None:
        xq = as_batch(x_test, "x_test").to(device=dev, dtype=F64)
        if xq.dim() != 2 or xq.shape[1] != xt.shape[1]:
            raise ValueError(f"x_test must be (Q, {xt.shape[1]}), got shape {tuple(xq.shape)}.")
        x = torch.cat([xt, xq])
    else:
        x = xt
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma={gamma!r} must be a finite number >= 0 (0 is the lazy NTK limit).")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate={learning_rate!r} must be a positive number.")
    ts = to_tensor(as_float64(times), "times", dtype=F64, device=dev).reshape(-1)
    if ts.numel() == 0 or bool((ts < 0).any()):
        raise ValueError("times must be a non-empty array of times >= 0.")
    if bool((ts[1:] <= ts[:-1]).any()):
        raise ValueError("times must be strictly increasing.")
    grid = torch.unique(torch.cat([ts.new_zeros(1), ts]))
    if max_step is not None:
        if not max_step > 0:
            raise ValueError(f"max_step={max_step!r} must be > 0.")
        pts = [grid[:1]]
        for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
            m = max(1, math.ceil((b - a) / max_step - 1e-12))
            pts.append(torch.linspace(a, b, m + 1, dtype=F64, device=dev)[1:])
        grid = torch.cat(pts)
    out_index = torch.searchsorted(grid, ts)
    for name, v in (
        ("replicates", replicates),
        ("min_samples", min_samples),
        ("max_samples", max_samples),
        ("response_samples", response_samples),
    ):
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"{name}={v!r} must be a positive int.")
    if samples is not None and not (isinstance(samples, int) and samples > 0):
        raise ValueError(f"samples={samples!r} must be a positive int or None.")
    if not 0 < damping <= 1:
        raise ValueError(f"damping={damping!r} must be in (0, 1].")

    n, T, O = x.shape[0], grid.shape[0], y.shape[1]
    F, B = T * n, T * n * O
    L = spec.depth
    # samples come in chunks, one randomised-QMC replicate each (a power of two: Sobol nets), at least
    # `replicates` of them, each small enough that its fields (~12 arrays of F + B values per sample) fit 256 MiB
    start = min_samples if samples is None else samples
    per_sample = 8 * 12 * (F + B)
    cap = max(64, 1 << max(0, int(math.log2(max(1, (1 << 28) // per_sample)))))
    chunk = max(64, min(cap, 1 << max(0, math.ceil(math.log2(max(1, start / replicates))))))
    n_chunks = max(1, math.ceil(start / chunk))
    cap_chunks = n_chunks if samples is not None else max(n_chunks, math.ceil(max_samples / chunk))
    # memory: two-time kernels, responses and operators (a few copies each), and one chunk's work arrays
    kernel_bytes = 8 * (3 * (L - 1) * (F * F + B * B + 2 * F * B) + 3 * F * B)
    work_bytes = per_sample * chunk
    check_fits(
        kernel_bytes + work_bytes,
        dev,
        f"the DMFT state ({n} points x {T} times x {O} outputs, {L} layers, {cap_chunks * chunk} samples)",
        "use fewer points, times or samples (or samples=... with a looser mc_tol).",
    )

    solver = _Solver(
        spec, x, P, y, gamma, grid, learning_rate, chunk, seed, qmc, responses, response_samples, smoothing
    )
    D, f = solver.outputs(solver.ntk())
    yscale = max(float(y.abs().max()), 1e-300)
    it = 0
    residual = math.inf
    converged = False
    std_err = torch.zeros(T, n, O, dtype=F64, device=dev)
    while True:
        converged = False
        for _ in range(max_iter):
            it += 1
            ups = {l: solver.layer_update(l, D, n_chunks) for l in range(1, L + 1)}
            for l, up in ups.items():
                solver.Phi[l] = solver.Phi[l] + damping * (up["Phi"] - solver.Phi[l])
                solver.G[l] = solver.G[l] + damping * (up["G"] - solver.G[l])
                if "A" in up:
                    solver.A[l] = solver.A[l] + damping * (up["A"] - solver.A[l])
                if "B" in up:
                    solver.Bresp[l - 1] = solver.Bresp[l - 1] + damping * (up["B"] - solver.Bresp[l - 1])
            D_new, f_new = solver.outputs(solver.ntk())
            residual = float((f_new - f).abs().max()) / yscale
            D, f = D_new, f_new
            if residual < tol or gamma == 0.0:
                converged = True
                # batch means: outputs from each chunk's equal-time kernels
                per_chunk = []
                for ci in range(n_chunks):
                    phis = [ups[l]["chunk_phi_eq"][ci] for l in range(1, L + 1)]
                    gs = [ups[l]["chunk_g_eq"][ci] for l in range(1, L + 1)]
                    per_chunk.append(solver.outputs(solver.ntk(phis, gs))[1])
                if n_chunks > 1:
                    stack = torch.stack(per_chunk)
                    std_err = stack.std(0) / math.sqrt(n_chunks)
                break
        if not converged or samples is not None or gamma == 0.0:
            break
        rel = float(std_err.abs().max()) / yscale
        if rel <= mc_tol or n_chunks >= cap_chunks:
            break
        want = math.ceil(n_chunks * (rel / mc_tol) ** 2 * 1.1)
        n_chunks = min(cap_chunks, max(want, n_chunks + 1))

    sel = out_index
    ntk = solver.ntk()[sel].permute(0, 1, 3, 2, 4)  # (T, n, n, O, O)
    feats = [solver.phi_eq(l)[sel] for l in range(1, L + 1)]
    grads = [solver.g_eq(l)[sel].reshape(len(sel), n, O, n, O).permute(0, 1, 3, 2, 4) for l in range(1, L + 1)]
    return DMFTResult(
        times=ts,
        f_train=f[sel, :P],
        f_test=f[sel, P:] if n > P else None,
        y_train=y,
        feature_kernels=feats,
        gradient_kernels=grads,
        ntk=ntk,
        gamma=float(gamma),
        learning_rate=float(learning_rate),
        samples=n_chunks * chunk,
        iterations=it,
        converged=converged,
        residual=residual,
        std_error=std_err[sel],
        grid=grid,
    )
