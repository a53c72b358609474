r"""Deep kernel machines (DKMs): Bayesian representation learning at infinite width.

Aitchison, Yang & Ober 2023, *A theory of representation learning gives a deep generalisation of kernel
methods* (ICML; arXiv:2108.13097). In a deep Gaussian process / Bayesian network whose widths grow with a
factor ``ν_ℓ`` per layer, the posterior over each layer's Gram matrix ``G_ℓ = F_ℓF_ℓᵀ/N_ℓ`` concentrates on the
maximiser of the *DKM objective*::

    L(G_1, …, G_L) = log P(Y | G_L) − Σ_{ℓ=1}^{L} ν_ℓ KL( N(0, G_ℓ) ‖ N(0, K_ℓ(G_{ℓ−1})) )

    log P(Y | G_L) = Σ_c log N(y_c; 0, K_{L+1}(G_L) + σ² I)              (Gaussian likelihood, σ² = noise_var)
    KL(N(0, G) ‖ N(0, K)) = ½ [tr(K⁻¹G) − P + log|K| − log|G|]

with ``G_0 = XXᵀ/D`` and the kernel maps read off the net ``serial(Dense_0, φ_1, Dense_1, …, φ_L, Dense_L)``
by ntkit's layer rules: ``K_1(G_0) = W_std₀² G_0 + b_std₀²`` and ``K_{ℓ+1}(G) = W_std_ℓ² E[φ_ℓ(u)φ_ℓ(u)ᵀ] +
b_std_ℓ²`` for ``u ~ N(0, G)`` (so ``G_ℓ`` is the Gram matrix of layer ℓ's pre-activations). As every
``ν_ℓ → ∞`` the KL terms pin ``G_ℓ = K_ℓ(G_{ℓ−1})``: the NNGP of the same net, whose prediction is exact GP
regression with the NNGP kernel; finite ``ν`` lets the representations move towards the data (the DKM learns
them), which a fixed kernel cannot.

Inducing points (Milsom, Anson & Aitchison 2024, *Convolutional deep kernel machines*, ICLR; the scheme of Yang et
al. 2023): the objective is written for ``M`` inducing inputs ``Z`` (default: the training inputs, the exact DKM),
whose Grams ``G_ℓ^{ii}`` are the parameters; the Grams of every other point (training and test) follow from the
prior's Gaussian conditional given the inducing features, layer by layer::

    G^{·i} = K^{·i} (K^{ii})⁻¹ G^{ii},
    G^{··} = K^{··} − K^{·i}(K^{ii})⁻¹K^{i·} + K^{·i}(K^{ii})⁻¹ G^{ii} (K^{ii})⁻¹ K^{i·}

with ``K = K_ℓ(G_{ℓ−1})`` over all points. The KL terms then run over the inducing points only (the conditional
of the other points equals the prior's, contributing no KL), and the likelihood uses the training points' Gram.
With ``Z = X`` this is the exact objective above. ``G^{ii} = VVᵀ`` is optimised over ``V`` by L-BFGS in float64,
starting from the NNGP (``V = chol K^{ii}``), where every KL term is zero.

Prediction: the GP on the last layer, ``mean = K_{*X}(K_{XX} + σ²I)⁻¹Y``, ``var = diag(K_{**} − K_{*X}(K_{XX} +
σ²I)⁻¹K_{X*})`` (the latent function's variance; add ``noise_var`` for that of a new observation), with
``K = K_{L+1}(G_L)`` over training and test points.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ntkit._inputs import as_batch, to_tensor
from ntkit.feature_learning._kernels import affine_map, nonlinear_map
from ntkit.feature_learning._network import FCSpec, as_float64, fc_spec
from ntkit.layers.base import Layer

__all__ = ["DKMFit", "dkm"]

F64 = torch.float64


def _chol(K: Tensor, jitter: float) -> Tensor:
    """Cholesky factor of ``K + jitter·mean(diag)·I``; if that fails, the jitter is raised (from 1e-12, tenfold,
    up to 1e-4)."""
    scale = float(torch.diagonal(K).mean().detach())
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    j = jitter
    while True:
        L, info = torch.linalg.cholesky_ex(K + j * scale * eye)
        if int(info) == 0:
            return L
        if j >= 1e-4:
            raise ValueError(
                "a DKM kernel matrix is not positive definite even with jitter 1e-4·mean(diag): duplicated "
                "inducing points or inputs? Remove duplicates or use fewer inducing points."
            )
        j = max(j * 10, 1e-12)


def _layer_maps(spec: FCSpec, l: int, G: Tensor) -> Tensor:
    """``K_l(G)``: ``Dense_0`` on the input Gram for ``l = 1``, else ``Dense_{l−1} ∘ φ_{l−1}``."""
    if l == 1:
        return affine_map(spec.dense[0], G)
    k, _ = nonlinear_map(spec.phis[l - 2], G)
    return affine_map(spec.dense[l - 1], k)


def _propagate(K: Tensor, V: Tensor, M: int, jitter: float) -> tuple[Tensor, Tensor]:
    """``(G, L)``: the Gram over all points (inducing points first) given the prior ``K`` over all points and the
    whitened inducing factor ``V`` (``G^{ii} = L VVᵀ Lᵀ``, ``L = chol K^{ii}``), and ``L``.

    ``G = K + Bᵀ(VVᵀ − I)B`` with ``B = L⁻¹K^{i·}`` is the conditional formula of the module docstring written so
    that no inverse of ``K^{ii}`` is formed: at the NNGP (``V = I``) it is ``K`` exactly."""
    Lk = _chol(K[:M, :M], jitter)
    Bm = torch.linalg.solve_triangular(Lk, K[:M], upper=False)
    E = V @ V.T - torch.eye(M, dtype=V.dtype, device=V.device)
    G = K + Bm.T @ E @ Bm
    return (G + G.T) / 2, Lk


def _kl_whitened(V: Tensor) -> Tensor:
    """``KL(N(0, LVVᵀLᵀ) ‖ N(0, LLᵀ)) = ½ [‖V‖² − M − 2 Σ log|V_ii|]`` for lower-triangular ``V``."""
    M = V.shape[0]
    return 0.5 * ((V * V).sum() - M - 2 * torch.log(torch.diagonal(V).abs()).sum())


@dataclasses.dataclass
class DKMFit:
    """A fitted deep kernel machine (:func:`dkm`).

    Attributes:
      grams: the learned inducing Grams ``G_ℓ^{ii}`` ``(M, M)``, ``ℓ = 1..L`` (pre-activation Grams of layer ℓ).
      nngp_grams: the NNGP's Grams on the inducing points (where the optimisation started; ``ν → ∞``).
      train_grams: the learned Grams over the training points ``(P, P)``; nngp_train_grams: the NNGP's.
      factors: the whitened factors ``V_ℓ`` (``G_ℓ^{ii} = L_ℓ V_ℓV_ℓᵀ L_ℓᵀ``, ``L_ℓ = chol K_ℓ(G_{ℓ−1})^{ii}``).
      inducing: the inducing inputs ``(M, D)``.
      nu, noise_var: the ``ν_ℓ`` and ``σ²``.
      objective: the DKM objective at the optimum divided by ``P``; objective_nngp: at the NNGP (the start).
      iterations: L-BFGS iterations.
      mean, variance: predictions at the ``x_test`` given to :func:`dkm` (``None`` without it).
    """

    spec: FCSpec
    x_train: Tensor
    y_train: Tensor
    inducing: Tensor
    factors: list[Tensor]
    grams: list[Tensor]
    nngp_grams: list[Tensor]
    train_grams: list[Tensor]
    nngp_train_grams: list[Tensor]
    nu: tuple[float, ...]
    noise_var: float
    objective: float
    objective_nngp: float
    iterations: int
    jitter: float
    mean: Optional[Tensor] = None
    variance: Optional[Tensor] = None

    def predict(self, x_test: Any, nngp: bool = False) -> tuple[Tensor, Tensor]:
        """``(mean (Q, out), variance (Q,))`` of the latent function at ``x_test`` (``nngp=True``: with the NNGP's
        Grams instead of the learned ones, i.e. NNGP regression)."""
        xq = as_batch(x_test, "x_test").to(device=self.x_train.device, dtype=F64)
        eye = [torch.eye(v.shape[0], dtype=F64, device=v.device) for v in self.factors]
        _, K = _all_grams(self.spec, self.inducing, self.x_train, xq, eye if nngp else self.factors, self.jitter)
        M = self.inducing.shape[0]
        return _gp_predict(K[M:, M:], self.y_train, self.noise_var)


def _all_grams(
    spec: FCSpec, Z: Tensor, X: Tensor, Xq: Optional[Tensor], factors: Sequence[Tensor], jitter: float
) -> tuple[list[Tensor], Tensor]:
    """Grams of every layer over ``[Z; X; Xq]`` and the output kernel ``K_{L+1}(G_L)`` over the same points, for
    the whitened inducing factors (lower triangular ``V_ℓ``)."""
    pts = torch.cat([Z, X] + ([Xq] if Xq is not None else []))
    M = Z.shape[0]
    G = (pts @ pts.T) / pts.shape[1]
    out = []
    for l in range(1, spec.depth + 1):
        K = _layer_maps(spec, l, G)
        G, _ = _propagate(K, factors[l - 1], M, jitter)
        out.append(G)
    return out, _layer_maps(spec, spec.depth + 1, G)


def _gp_predict(K: Tensor, y: Tensor, noise_var: float) -> tuple[Tensor, Tensor]:
    """GP regression with kernel ``K`` over ``[train; test]`` and absolute noise ``σ²``: ``(mean, variance)``."""
    P = y.shape[0]
    Ktr = K[:P, :P] + noise_var * torch.eye(P, dtype=K.dtype, device=K.device)
    Lc = torch.linalg.cholesky(Ktr)
    Kqt = K[P:, :P]
    mean = Kqt @ torch.cholesky_solve(y, Lc)
    w = torch.linalg.solve_triangular(Lc, Kqt.T, upper=False)
    var = torch.diagonal(K[P:, P:]) - (w * w).sum(0)
    return mean, var


def _objective(
    spec: FCSpec,
    Z: Tensor,
    X: Tensor,
    y: Tensor,
    factors: Sequence[Tensor],
    nus: Sequence[float],
    noise_var: float,
    jitter: float,
) -> Tensor:
    """The DKM objective divided by ``P`` (see the module docstring), with ``G_ℓ^{ii} = L_ℓV_ℓV_ℓᵀL_ℓᵀ``."""
    P, M = X.shape[0], Z.shape[0]
    pts = torch.cat([Z, X])
    G = (pts @ pts.T) / pts.shape[1]
    kl = G.new_zeros(())
    for l in range(1, spec.depth + 1):
        K = _layer_maps(spec, l, G)
        V = factors[l - 1]
        kl = kl + nus[l - 1] * _kl_whitened(V)
        G, _ = _propagate(K, V, M, jitter)
    Kout = _layer_maps(spec, spec.depth + 1, G)[M:, M:]
    Lc = torch.linalg.cholesky(Kout + noise_var * torch.eye(P, dtype=F64, device=X.device))
    alpha = torch.cholesky_solve(y, Lc)
    loglik = -0.5 * (y * alpha).sum() - y.shape[1] * torch.log(torch.diagonal(Lc)).sum()
    loglik = loglik - 0.5 * y.numel() * math.log(2 * math.pi)
    return (loglik - kl) / P


def dkm(
    net: Layer,
    x_train: Any,
    y_train: Any,
    *,
    nu: Union[float, Sequence[float]],
    noise_var: float,
    x_test: Any = None,
    num_inducing: Optional[int] = None,
    inducing: Any = None,
    max_iter: int = 200,
    tol: float = 1e-9,
    jitter: float = 0.0,
    seed: int = 0,
) -> DKMFit:
    """Fit a deep kernel machine for ``net`` (Aitchison et al. 2023; see the module docstring).

    Args:
      net: ``serial(Dense, φ, ..., Dense)``: the kernel maps between layers (widths do not matter).
      x_train: ``(P, D)``; y_train: ``(P,)`` or ``(P, out)`` regression targets.
      nu: ``ν`` of every hidden layer, or one per layer (``ν → ∞``: the NNGP).
      noise_var: ``σ²`` of the Gaussian likelihood (absolute).
      x_test: ``(Q, D)`` points to predict at (``fit.mean``, ``fit.variance``; or call ``fit.predict`` later).
      num_inducing: use ``M`` training points (a random subset, ``seed``) as inducing points; ``inducing``: the
        inducing inputs themselves ``(M, D)``. Default: all training points (the exact DKM).
      max_iter, tol: L-BFGS iterations and tolerance on the change of the objective (per training point).
      jitter: relative diagonal jitter of the prior's Cholesky factors (0: none unless one fails, then raised
        from 1e-12 tenfold).
    """
    spec = fc_spec(net, "dkm")
    X = as_batch(x_train, "x_train").to(F64)
    if X.dim() != 2:
        raise ValueError(f"x_train must be (P, features), got shape {tuple(X.shape)}.")
    P = X.shape[0]
    y = to_tensor(as_float64(y_train), "y_train", dtype=F64, device=X.device)
    y = y[:, None] if y.dim() == 1 else y
    if y.dim() != 2 or y.shape[0] != P:
        raise ValueError(f"y_train must be (P,) or (P, out) with P = {P}, got shape {tuple(y.shape)}.")
    L = spec.depth
    nus = (float(nu),) * L if isinstance(nu, (int, float)) else tuple(float(v) for v in nu)
    if len(nus) != L or not all(v > 0 and math.isfinite(v) for v in nus):
        raise ValueError(f"nu={nu!r}: give one finite ν > 0 or one per hidden layer ({L}).")
    if not (isinstance(noise_var, (int, float)) and noise_var > 0 and math.isfinite(noise_var)):
        raise ValueError(f"noise_var={noise_var!r} must be a positive number (the likelihood's σ²).")
    if inducing is not None and num_inducing is not None:
        raise ValueError("give inducing= (the points) or num_inducing= (a subset of x_train), not both.")
    if inducing is not None:
        Z = as_batch(inducing, "inducing").to(device=X.device, dtype=F64)
        if Z.dim() != 2 or Z.shape[1] != X.shape[1]:
            raise ValueError(f"inducing must be (M, {X.shape[1]}), got shape {tuple(Z.shape)}.")
    elif num_inducing is not None:
        if not (isinstance(num_inducing, int) and 0 < num_inducing <= P):
            raise ValueError(f"num_inducing={num_inducing!r} must be an int in [1, {P}].")
        gen = torch.Generator().manual_seed(seed)
        Z = X[torch.randperm(P, generator=gen)[:num_inducing].to(X.device)]
    else:
        Z = X
    M = Z.shape[0]
    Xq = None if x_test is None else as_batch(x_test, "x_test").to(device=X.device, dtype=F64)

    # start at the NNGP: V_ℓ = I, every KL term exactly zero
    raw = [torch.eye(M, dtype=F64, device=X.device).requires_grad_(True) for _ in range(L)]

    def factors_of(vs: Sequence[Tensor]) -> list[Tensor]:
        return [torch.tril(v) for v in vs]

    with torch.no_grad():
        start = float(_objective(spec, Z, X, y, factors_of(raw), nus, noise_var, jitter))
    opt = torch.optim.LBFGS(
        raw,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=tol,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = -_objective(spec, Z, X, y, factors_of(raw), nus, noise_var, jitter)
        loss.backward()
        return loss

    opt.step(closure)
    iterations = int(opt.state[raw[0]].get("n_iter", 0))
    eye = [torch.eye(M, dtype=F64, device=X.device) for _ in range(L)]
    with torch.no_grad():
        factors = [v.detach().clone() for v in factors_of(raw)]
        final = float(_objective(spec, Z, X, y, factors, nus, noise_var, jitter))
        if not math.isfinite(final) or final < start:
            # never return something worse than the NNGP the optimisation started from
            factors, final = [e.clone() for e in eye], start
        learned, _ = _all_grams(spec, Z, X, None, factors, jitter)
        prior, _ = _all_grams(spec, Z, X, None, eye, jitter)
    fit = DKMFit(
        spec=spec,
        x_train=X,
        y_train=y,
        inducing=Z,
        factors=factors,
        grams=[g[:M, :M] for g in learned],
        nngp_grams=[g[:M, :M] for g in prior],
        train_grams=[g[M:, M:] for g in learned],
        nngp_train_grams=[g[M:, M:] for g in prior],
        nu=nus,
        noise_var=float(noise_var),
        objective=final,
        objective_nngp=start,
        iterations=iterations,
        jitter=jitter,
    )
    if Xq is not None:
        with torch.no_grad():
            fit.mean, fit.variance = fit.predict(Xq)
    return fit
