"""Nyström approximation of kernel matrices and ridge-leverage-score sampling.

With centres ``S`` (``m`` of the ``n`` points), ``C = K[:, S]`` and ``W = K[S, S]``, the Nyström approximation
is ``K ≈ C W⁺ Cᵀ = F Fᵀ`` with ``F = C V Λ^{-1/2}`` (``W = V Λ Vᵀ``, numerically zero eigenvalues dropped).
It needs only ``m`` columns of ``K``: one pass over a store, or ``n·m`` kernel evaluations matrix-free.

Sampling the centres:

* ``"uniform"``: ``m`` distinct points uniformly at random.
* ``"rls"``: by ridge leverage scores ``ℓ_i(λ) = [K (K + λI)⁻¹]_ii`` (Alaoui & Mahoney 2015; Musco &
  Musco 2017). Then ``m = O(d_eff(λ) log d_eff(λ))`` centres, ``d_eff(λ) = Σ ℓ_i(λ)``, give
  ``‖K − F Fᵀ‖₂ ≤ λ`` with high probability; uniform sampling needs ``O(n · max_i ℓ_i)`` instead, which is
  much larger when a few points (outliers, rare clusters) carry high leverage. The scores are estimated
  *sequentially*, as in BLESS (Rudi, Calandriello, Carratino & Rosasco 2018): starting from a large
  ``λ₀ = tr(K)/m`` where uniform sampling is accurate, ``λ`` shrinks geometrically and at each stage the
  scores are re-estimated from the previous stage's centres (Musco & Musco's estimator
  ``ℓ̃_i = (K_ii − k_iS Σ (Σ K_SS Σ + λI)⁻¹ Σ k_Si)/λ`` with importance weights ``Σ``), then ``m`` centres are
  redrawn in proportion to them.

:func:`ntkit.linalg.falkon` solves Nyström KRR with the preconditioner of Falkon (Rudi, Carratino & Rosasco
2017).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ntkit.linalg.lowrank import LowRankPreconditioner
from ntkit.linalg.operators import as_operator, tmm

__all__ = ["nystrom", "NystromApprox", "rls_sample", "ridge_leverage_scores"]


@dataclasses.dataclass
class NystromApprox:
    """``K ≈ F Fᵀ`` from centres ``idx``; ``factor`` is ``F`` (``n x r``, ``r ≤ m``)."""

    idx: Tensor
    factor: Tensor

    def matmat(self, v: Tensor) -> Tensor:
        return self.factor @ tmm(self.factor, v.to(self.factor))

    def to_tensor(self) -> Tensor:
        return self.factor @ self.factor.T

    def preconditioner(self, lam: float) -> LowRankPreconditioner:
        """A preconditioner for ``K + λI`` (see :class:`ntkit.linalg.lowrank.LowRankPreconditioner`)."""
        return LowRankPreconditioner.from_factor(self.factor, lam, f"nystrom(m={len(self.idx)})")


def _factor(c: Tensor, idx: Tensor, rcond: float = 1e-12) -> Tensor:
    w = c[idx]
    w = 0.5 * (w + w.T)
    lam, v = torch.linalg.eigh(w)
    keep = lam > rcond * lam.max().clamp_min(0) * max(1, len(idx))
    return (c @ v[:, keep]) / torch.sqrt(lam[keep])


def nystrom(
    a: Any,
    m: int,
    *,
    sampling: str = "uniform",
    lam: Optional[float] = None,
    seed: int = 0,
    centres: Optional[Union[Tensor, Sequence[int]]] = None,
) -> NystromApprox:
    """Nyström approximation of ``K`` with ``m`` centres.

    Args:
      a: the kernel (tensor, :class:`~ntkit.tiling.KernelStore`, or operator).
      m: number of centres (at most ``n``).
      sampling: ``"uniform"`` or ``"rls"`` (ridge leverage scores at ``lam``; see the module docstring).
      lam: ridge for ``"rls"`` (absolute, as in ``K + λI``); default: the ``λ`` at which ``m`` centres are
        about twice the estimated effective dimension.
      seed: seeds the sampling.
      centres: use these indices instead of sampling.
    """
    op = as_operator(a)
    n = op.shape[0]
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"Nyström needs a square kernel matrix; got {op.shape}.")
    if centres is not None:
        idx = torch.as_tensor(centres, dtype=torch.long)
    else:
        if not (isinstance(m, int) and 1 <= m <= n):
            raise ValueError(f"m={m!r} centres: need an int in [1, n={n}].")
        if sampling == "uniform":
            g = torch.Generator().manual_seed(int(seed))
            idx = torch.randperm(n, generator=g)[:m]
        elif sampling == "rls":
            idx = rls_sample(op, m, lam=lam, seed=seed)[0]
        else:
            raise ValueError(f"sampling={sampling!r}: choose 'uniform' or 'rls'.")
    idx = torch.sort(idx).values
    return NystromApprox(idx=idx, factor=_factor(op.columns(idx), idx))


def ridge_leverage_scores(k: Tensor, lam: float) -> Tensor:
    """Exact ``ℓ_i(λ) = [K (K + λI)⁻¹]_ii`` of a dense PSD matrix (``O(n³)``; for checks and small n)."""
    ev, v = torch.linalg.eigh(k.to(torch.float64))
    ev = ev.clamp_min(0)
    return ((v**2) * (ev / (ev + lam))).sum(1)


def _rls_estimate(c: Tensor, idx: Tensor, diag: Tensor, weights: Tensor, lam: float) -> Tensor:
    """Musco & Musco's ridge-leverage estimate from weighted centres (weights ``1/(m p_j)``)."""
    s = torch.sqrt(weights)
    cs = c * s
    ws = cs[idx] * s[:, None]
    ws = 0.5 * (ws + ws.T) + lam * torch.eye(len(idx), dtype=c.dtype, device=c.device)
    L, info = torch.linalg.cholesky_ex(ws)
    if int(info) != 0:  # round-off: lift by a relative jitter
        L = torch.linalg.cholesky(ws + 1e-10 * float(ws.diagonal().mean()) * torch.eye(len(idx), dtype=c.dtype))
    z = torch.linalg.solve_triangular(L, cs.T, upper=False)
    return ((diag - (z**2).sum(0)) / lam).clamp(0.0, 1.0)


def rls_sample(
    a: Any, m: int, lam: Optional[float] = None, seed: int = 0, growth: float = 4.0, max_stages: int = 8
) -> tuple[Tensor, Tensor]:
    """``m`` centres drawn by sequentially estimated ridge leverage scores (module docstring).

    Returns ``(idx, scores)``: the centres and the final estimated scores of all ``n`` points. Each stage
    reads ``m`` columns of ``K``.
    """
    op = as_operator(a)
    n = op.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    diag = op.diagonal()
    lam0 = float(diag.sum()) / m
    target = lam0 / growth**max_stages if lam is None else float(lam)
    if target <= 0:
        raise ValueError(f"lam={lam} must be > 0 for ridge-leverage sampling.")
    ratio = max(growth, (lam0 / target) ** (1.0 / max_stages)) if lam0 > target else 1.0
    p = torch.full((n,), 1.0 / n, dtype=op.dtype)
    idx = torch.randperm(n, generator=g)[:m]
    lam_h, scores = lam0, p
    for _ in range(max_stages):
        lam_h = max(lam_h / ratio, target)
        c = op.columns(idx)
        scores = _rls_estimate(c, idx, diag, 1.0 / (m * p[idx]), lam_h)
        d_eff = float(scores.sum())
        p = scores / scores.sum()
        p = 0.99 * p + 0.01 / n  # keep every point reachable (bounded importance weights)
        idx = torch.multinomial(p, m, replacement=False, generator=g)
        if lam_h <= target or (lam is None and d_eff >= m / 2):
            break
    return idx, scores
