"""Nyström kernel ridge regression with Falkon's preconditioner (Rudi, Carratino & Rosasco 2017)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch import Tensor

from ntkit.linalg.cg import cg
from ntkit.linalg.nystrom import rls_sample
from ntkit.linalg.operators import MatvecOperator, as_operator, tmm

__all__ = ["falkon", "FalkonResult"]


# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FalkonResult:
    """Nyström KRR: predictions are ``K(x, x[idx]) @ alpha``.

    Attributes: ``alpha`` (``m x k``), ``idx`` (centres), ``iterations``, ``residual`` (of the preconditioned
    normal equations), ``fitted`` (``K[:, idx] @ alpha`` on the training points).
    """

    alpha: Tensor
    idx: Tensor
    iterations: int
    residual: Tensor
    fitted: Tensor

    def predict(self, k_test_centres: Tensor) -> Tensor:
        """Predictions from the test-centre kernel ``K(x_test, x_train[idx])``."""
        return k_test_centres.to(self.alpha) @ self.alpha


def falkon(
    a: Any,
    y: Tensor,
    lam: float,
    m: int = 1000,
    *,
    sampling: str = "uniform",
    seed: int = 0,
    centres: Optional[Tensor] = None,
    tol: float = 1e-8,
    maxiter: int = 200,
) -> FalkonResult:
    """Nyström kernel ridge regression with Falkon's preconditioner (Rudi, Carratino & Rosasco 2017).

    Minimises ``‖K_nm α − y‖² + λ αᵀ K_mm α`` (the Nyström restriction of ``min ‖f − y‖² + λ‖f‖²``, i.e.
    of ``(K + λI)⁻¹ y`` with ``lam`` absolute, as :func:`ntkit.solvers.cg.cg`). With ``K_mm = TᵀT`` and
    ``TTᵀ/m + λ/n I = AᵀA`` (Cholesky), ``B = T⁻¹A⁻¹/√n`` makes ``Bᵀ(K_nmᵀK_nm + λK_mm)B`` well conditioned;
    CG then needs ``O(log(1/tol))`` iterations. Memory: ``K_nm`` (``n x m``) is held in float64.
    """
    op = as_operator(a)
    n = op.shape[0]
    yy = (y[:, None] if y.dim() == 1 else y).to(torch.float64)
    if yy.shape[0] != n:
        raise ValueError(f"y has {yy.shape[0]} rows but the kernel is {op.shape}.")
    if not lam > 0:
        raise ValueError(f"lam={lam} must be > 0 for Falkon.")
    if centres is None:
        if sampling == "uniform":
            centres = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:m]
        else:
            centres = rls_sample(op, m, lam=lam, seed=seed)[0]
    idx = torch.sort(torch.as_tensor(centres, dtype=torch.long)).values
    mm = len(idx)
    knm = op.columns(idx).to(torch.float64)
    kmm = 0.5 * (knm[idx] + knm[idx].T)
    eye = torch.eye(mm, dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps * mm * float(kmm.diagonal().mean())
    t = torch.linalg.cholesky(kmm + eps * eye, upper=True)
    lam_n = lam / n  # Falkon's λ: (1/n)‖K_nm α − y‖² + λ_n αᵀK_mm α
    amat = torch.linalg.cholesky(t @ t.T / mm + lam_n * eye, upper=True)

    def b_apply(v):  # B v
        return torch.linalg.solve_triangular(
            t, torch.linalg.solve_triangular(amat, v, upper=True), upper=True
        ) / math.sqrt(n)

    def bt_apply(u):  # Bᵀ u
        w = torch.linalg.solve_triangular(t.T, u, upper=False)
        return torch.linalg.solve_triangular(amat.T, w, upper=False) / math.sqrt(n)

    def h(v):
        bv = b_apply(v)
        return bt_apply(tmm(knm, knm @ bv) / n + lam_n * (kmm @ bv))

    rhs = bt_apply(tmm(knm, yy) / n)
    res = cg(MatvecOperator(h, mm), rhs, 0.0, tol=tol, maxiter=maxiter)
    beta = res.x if res.x.dim() == 2 else res.x[:, None]
    alpha = b_apply(beta)
    return FalkonResult(alpha=alpha, idx=idx, iterations=res.iterations, residual=res.residual, fitted=knm @ alpha)
