"""Low-rank preconditioners for ``K + λI``: Nyström (randomized Nyström preconditioning, Frangella, Tropp &
Udell 2023) and partial pivoted Cholesky (Harbrecht, Peters & Schneider 2012; Gardner et al. 2018), both applied
by the Woodbury identity as ``P = U(Λ + λ)Uᵀ + λ(I − UUᵀ)`` for ``K ≈ U Λ Uᵀ``. Used by :func:`ntkit.linalg.cg`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ntkit.linalg.lowrank import LowRankPreconditioner
from ntkit.linalg.nystrom import nystrom
from ntkit.linalg.operators import as_operator

__all__ = ["LowRankPreconditioner", "pivoted_cholesky", "make_preconditioner"]


def pivoted_cholesky(a: Any, rank: int, tol: float = 0.0) -> tuple[Tensor, Tensor]:
    """Partial pivoted Cholesky ``K ≈ F Fᵀ`` (greedy on the residual diagonal; Harbrecht et al. 2012).

    Reads ``rank`` columns of ``K``. Stops early when the residual trace falls to ``tol · trace(K)``.
    Returns ``(F (n x r), pivots (r,))``.
    """
    op = as_operator(a)
    d = op.diagonal().clone()
    n = d.shape[0]
    rank = min(int(rank), n)
    f = torch.zeros(n, rank, dtype=op.dtype, device=op.device)
    piv = []
    total = float(d.sum())
    floor = float(d.max()) * n * torch.finfo(d.dtype).eps  # residuals below this are round-off
    for j in range(rank):
        i = int(torch.argmax(d))
        if d[i] <= floor or float(d.clamp_min(0).sum()) <= tol * total:
            f = f[:, :j]
            break
        col = op.columns([i])[:, 0] - f[:, :j] @ f[i, :j]
        f[:, j] = col / torch.sqrt(d[i])
        d = d - f[:, j] ** 2
        d[i] = 0
        piv.append(i)
    return f, torch.tensor(piv, dtype=torch.long)


def make_preconditioner(
    a: Any, lam: float, kind: str = "nystrom", rank: int = 200, seed: int = 0, sampling: str = "uniform"
) -> LowRankPreconditioner:
    """A :class:`LowRankPreconditioner` for ``K + λI``: ``kind="nystrom"`` (``sampling`` "uniform" or "rls")
    or ``"pivchol"``."""
    op = as_operator(a)
    if kind == "nystrom":
        ny = nystrom(op, rank, sampling=sampling, lam=lam, seed=seed)
        return LowRankPreconditioner.from_factor(ny.factor, lam, f"nystrom(rank={rank},{sampling},seed={seed})")
    if kind == "pivchol":
        f, _ = pivoted_cholesky(op, rank)
        return LowRankPreconditioner.from_factor(f, lam, f"pivchol(rank={rank})")
    raise ValueError(f"preconditioner={kind!r}: choose 'nystrom', 'pivchol', None, or pass an object with .solve(R).")
