"""Closed-form theory of kernel regression: what the kernel's eigensystem predicts before any training.

:func:`eigenlearning` gives the test and train mean squared errors of kernel ridge regression (KRR) with ``n``
samples from the *eigenlearning* equations of Simon, Dickens, Karkada & DeWeese, "The eigenlearning framework:
a conservation law perspective on kernel ridge regression and wide neural networks" (TMLR 2023,
arXiv:2110.03922). Since the NTK of an infinitely wide network trained to convergence on the MSE loss *is* a
KRR predictor (ridge = ``diag_reg``), the same numbers predict the generalisation of wide networks.

The inputs are the eigensystem of the kernel *operator* under the data distribution ``p``: the kernel's Mercer
decomposition ``K(x, x') = Σᵢ λᵢ φᵢ(x) φᵢ(x')`` with ``E_p[φᵢ φⱼ] = δᵢⱼ``, and the target's coefficients
``f = Σᵢ vᵢ φᵢ``. :func:`eigensystem` estimates both from a kernel matrix on many samples of ``p`` (the
eigenvalues of ``K/M`` and the projections of the targets), as Simon et al. do for real data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Union

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from ntkit._inputs import to_tensor

__all__ = ["eigenlearning", "EigenlearningResult", "eigensystem"]


@dataclasses.dataclass(frozen=True)
class EigenlearningResult:
    """The eigenlearning estimates for KRR with ``n`` samples (see :func:`eigenlearning`).

    Attributes:
      kappa: the effective regularisation ``κ ≥ 0``, the solution of ``Σᵢ λᵢ/(λᵢ + κ) + δ/κ = n``.
      learnabilities: ``Lᵢ = λᵢ/(λᵢ + κ)`` per eigenmode (in the eigenvalues' dtype and device): the fraction
        of a target's component along ``φᵢ`` that KRR learns on average; ``Σᵢ Lᵢ + δ/κ = n`` (the
        conservation law).
      overfitting: ``E₀ = n/(n − Σᵢ Lᵢ²) ≥ 1``, the factor by which the noise and the unlearnt part of the
        target are amplified (``inf`` when ``n`` equals the number of modes at zero ridge).
      test_mse: the predicted test MSE ``E₀ (Σᵢ (1 − Lᵢ)² vᵢ² + ε²)``, against noisy test labels (with a
        noise-free test set subtract ``noise``); averaged over the outputs for several targets.
      train_mse: the predicted train MSE ``(δ/(n κ))² · test_mse`` (zero at zero ridge: KRR interpolates).
      n, ridge, noise: the inputs.
    """

    kappa: float
    learnabilities: Tensor
    overfitting: float
    test_mse: float
    train_mse: float
    n: int
    ridge: float
    noise: float


def _kappa(lam: np.ndarray, n: int, ridge: float) -> float:
    """The root of ``g(κ) = Σ λ/(λ + κ) + δ/κ − n`` (decreasing in κ > 0), solved in log κ."""
    if ridge == 0.0 and n >= int((lam > 0).sum()):
        return 0.0  # as many samples as modes (or more): KRR interpolates every mode exactly

    def g(log_kappa: float) -> float:
        kappa = math.exp(log_kappa)
        return float(np.sum(lam / (lam + kappa))) + ridge / kappa - n

    # Σ λ/(λ+κ) ≤ Σ λ / κ, so g ≤ 0 at κ = (Σλ + δ)/n; g grows without bound (δ > 0) or to rank − n > 0
    # (δ = 0) as κ → 0: step down until it is positive
    hi = math.log((float(lam.sum()) + ridge) / n)
    lo = hi - 2.0
    while g(lo) <= 0.0:
        lo -= 4.0
        if lo < hi - 1500.0:  # κ below e^-1500 relative: numerically zero
            return 0.0
    if g(hi) >= 0.0:
        return math.exp(hi)
    return math.exp(brentq(g, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=500))


def eigenlearning(
    eigenvalues: Any, coefficients: Any, n: int, ridge: float = 0.0, noise: float = 0.0
) -> EigenlearningResult:
    r"""Test and train MSE of kernel ridge regression on ``n`` samples, predicted from the kernel's eigensystem.

    Simon et al. (2023) show that KRR with ``n`` i.i.d. samples, ridge ``δ`` and label noise of variance
    ``ε²``, ``f̂(x) = k(x, X) (K(X, X) + δ I)⁻¹ y``, behaves on average as if it learnt each eigenmode
    ``φᵢ`` of the kernel by the fraction ``Lᵢ`` (its *learnability*), with ``κ`` set by a conservation law
    (the paper's "eigenlearning equations"; the equation numbers differ between its arXiv and TMLR versions):

    .. math::

        \sum_i \frac{\lambda_i}{\lambda_i + \kappa} + \frac{\delta}{\kappa} = n, \qquad
        \mathcal{L}_i = \frac{\lambda_i}{\lambda_i + \kappa}, \qquad
        \mathcal{E}_0 = \frac{n}{n - \sum_i \mathcal{L}_i^2},

    .. math::

        \text{test MSE} = \mathcal{E}_0 \Big(\sum_i (1 - \mathcal{L}_i)^2 v_i^2 + \epsilon^2\Big), \qquad
        \text{train MSE} = \frac{\delta^2}{n^2 \kappa^2}\, \text{test MSE}.

    The estimates are those of Canatar, Bordelon & Pehlevan (2021) and Jacot et al. (2020) in a simpler
    form; they become exact as ``n`` and the number of modes grow together, and are typically within a few
    per cent already for tens of samples (``tests/test_theory.py`` checks 10 % on a held-out task).

    Args:
      eigenvalues: ``λᵢ ≥ 0`` of the kernel operator under the data distribution, shape ``(M,)``, any order.
        Include the tail of the spectrum: truncating it changes ``κ``.
      coefficients: the target's coefficients ``vᵢ = E_p[f φᵢ]`` in the same eigenbasis, shape ``(M,)``, or
        ``(M, K)`` for ``K`` outputs (the MSEs are then averaged over outputs). Fewer than ``M`` rows are
        padded with zeros (modes the target does not use).
      n: number of training samples (``n ≥ 1``).
      ridge: ``δ ≥ 0`` in ``(K + δ I)⁻¹`` (an absolute ridge on the kernel matrix, not NT's relative
        ``diag_reg``: ``δ = diag_reg · mean(diag K)``).
      noise: ``ε² ≥ 0``, the variance of the label noise (on train and test labels).

    Returns:
      an :class:`EigenlearningResult` with ``kappa``, ``learnabilities``, ``overfitting`` (``E₀``),
      ``test_mse`` and ``train_mse``.

    Example::

        from ntkit.theory import eigenlearning
        lam = 1.0 / torch.arange(1, 10_001, dtype=torch.float64) ** 2  # a power-law spectrum
        v = torch.zeros(10_000, dtype=torch.float64)
        v[[0, 4, 40]] = 1.0                                            # a target on three modes
        r = eigenlearning(lam, v, n=100, ridge=1e-3, noise=0.01)
        r.kappa, r.learnabilities[[0, 4, 40]], r.test_mse
    """
    lam_t = to_tensor(eigenvalues, "eigenvalues")
    if lam_t.dim() != 1 or lam_t.numel() == 0:
        raise ValueError(f"eigenvalues must be a non-empty vector (M,), got shape {tuple(lam_t.shape)}.")
    lam = lam_t.detach().to("cpu", torch.float64).numpy()
    if (lam < 0).any():
        worst = float(lam.min())
        if worst < -1e-10 * float(np.abs(lam).max()):
            raise ValueError(
                f"eigenvalues must be >= 0 (the smallest is {worst:.3g}); clip round-off first "
                "(e.g. eigenvalues.clamp(min=0))."
            )
        lam = np.clip(lam, 0.0, None)
    v_t = to_tensor(coefficients, "coefficients")
    v = v_t.detach().to("cpu", torch.float64).numpy()
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] > lam.shape[0]:
        raise ValueError(
            f"coefficients must have shape (M,) or (M, K) with M <= {lam.shape[0]} (the number of eigenvalues), "
            f"got {tuple(v_t.shape)}."
        )
    if v.shape[0] < lam.shape[0]:
        v = np.concatenate([v, np.zeros((lam.shape[0] - v.shape[0], v.shape[1]))])
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer (the number of training samples), got {n!r}.")
    n = int(n)
    ridge, noise = float(ridge), float(noise)
    if not (ridge >= 0.0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be finite and >= 0, got {ridge!r}.")
    if not (noise >= 0.0 and math.isfinite(noise)):
        raise ValueError(f"noise is the label-noise variance ε² and must be finite and >= 0, got {noise!r}.")
    if float(lam.max()) == 0.0:
        raise ValueError("every eigenvalue is 0: the kernel learns nothing.")

    kappa = _kappa(lam, n, ridge)
    L = lam / (lam + kappa) if kappa > 0 else (lam > 0).astype(np.float64)
    denom = n - float(np.sum(L**2))
    e0 = n / denom if denom > 1e-12 * n else math.inf
    unlearnt = float(np.mean(np.sum((1.0 - L)[:, None] ** 2 * v**2, axis=0)))
    test = e0 * (unlearnt + noise) if (unlearnt + noise) > 0 else 0.0
    train = (ridge / (n * kappa)) ** 2 * test if kappa > 0 else 0.0
    out_dtype = lam_t.dtype if lam_t.is_floating_point() else torch.float64
    return EigenlearningResult(
        kappa=kappa,
        learnabilities=torch.from_numpy(L).to(device=lam_t.device, dtype=out_dtype),
        overfitting=e0,
        test_mse=test,
        train_mse=train,
        n=n,
        ridge=ridge,
        noise=noise,
    )


def eigensystem(kernel_matrix: Any, targets: Union[Tensor, np.ndarray, None] = None) -> tuple[Tensor, Tensor]:
    """The kernel operator's eigenvalues and a target's coefficients, estimated from ``M`` samples of ``p``.

    With ``K`` the ``M x M`` kernel matrix on i.i.d. samples ``x₁ … x_M`` of the data distribution and
    ``K = U diag(μ) Uᵀ``, the operator's eigenvalues are ``λᵢ ≈ μᵢ / M`` and its eigenfunctions at the
    samples ``φᵢ(x_j) ≈ √M U_ji``, so the coefficients of ``f`` are ``vᵢ = E_p[f φᵢ] ≈ U_{:,i}ᵀ f(X) / √M``.
    The estimates are exact for the empirical distribution of the samples themselves (KRR on ``n`` of the
    ``M`` points, tested on all of them), and converge to the population's as ``M`` grows.

    Args:
      kernel_matrix: ``(M, M)`` symmetric kernel matrix on the samples (e.g. ``net.kernel_fn(x, None, "ntk")``).
      targets: ``(M,)`` or ``(M, K)`` target values at the samples, or ``None``.

    Returns:
      ``(eigenvalues, coefficients)``: eigenvalues ``(M,)`` in decreasing order (clipped at 0) and the
      coefficients ``(M,)``/``(M, K)`` in the same order (an empty tensor when ``targets`` is ``None``), in
      float64 on the kernel's device; ready for :func:`eigenlearning`.
    """
    k = to_tensor(kernel_matrix, "kernel_matrix")
    if k.dim() != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise ValueError(f"kernel_matrix must be a square (M, M) matrix, got shape {tuple(k.shape)}.")
    m = k.shape[0]
    k = k.to(torch.float64)
    mu, u = torch.linalg.eigh(0.5 * (k + k.T))
    mu, u = mu.flip(0).clamp(min=0.0), u.flip(1)
    if targets is None:
        return mu / m, torch.empty(0, dtype=torch.float64, device=k.device)
    y = to_tensor(targets, "targets", dtype=torch.float64, device=k.device)
    if y.shape[0] != m or y.dim() > 2:
        raise ValueError(f"targets must have shape ({m},) or ({m}, K), got {tuple(y.shape)}.")
    return mu / m, (u.T @ y) / math.sqrt(m)
