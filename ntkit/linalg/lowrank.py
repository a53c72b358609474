"""The low-rank-plus-ridge preconditioner ``P = U(Λ + λ)Uᵀ + λ(I − UUᵀ)`` (applied by the Woodbury identity),
built from any factor ``K ≈ F Fᵀ`` (Nyström, pivoted Cholesky; :mod:`ntkit.linalg.precond`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ntkit.linalg.operators import tmm

__all__ = ["LowRankPreconditioner"]


class LowRankPreconditioner:
    """``P = U diag(Λ + λ) Uᵀ + λ (I − UUᵀ)`` for ``K ≈ U Λ Uᵀ`` (``U`` orthonormal, ``n x r``).

    ``solve(R) = U diag(1/(Λ + λ)) UᵀR + (R − UUᵀR)/λ`` costs ``O(n r k)``. Build it from any low-rank factor
    ``K ≈ F Fᵀ`` with :meth:`from_factor`.
    """

    def __init__(self, u: Tensor, eigvals: Tensor, lam: float, description: str = "lowrank"):
        if not lam > 0:
            raise ValueError(f"a low-rank preconditioner needs lam > 0 (got {lam}); regularise the system.")
        self.u, self.eigvals, self.lam = u, eigvals.clamp_min(0), float(lam)
        self.description = description

    @classmethod
    def from_factor(cls, f: Tensor, lam: float, description: str = "lowrank") -> LowRankPreconditioner:
        """From ``K ≈ F Fᵀ``: the thin SVD of ``F`` through the ``r x r`` Gram matrix ``FᵀF = V S² Vᵀ``."""
        s2, v = torch.linalg.eigh(f.T @ f)
        keep = s2 > s2.max().clamp_min(0) * 1e-12
        s2, v = s2[keep], v[:, keep]
        u = (f @ v) / torch.sqrt(s2)
        return cls(u, s2, lam, description)

    def solve(self, r: Tensor) -> Tensor:
        ur = tmm(self.u, r)
        return self.u @ (ur / (self.eigvals + self.lam)[:, None]) + (r - self.u @ ur) / self.lam

    __call__ = solve
