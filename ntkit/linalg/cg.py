"""Preconditioned conjugate gradients for ``(K + λI) X = B``: kernel regression past what fits a Cholesky.

``K`` is anything :func:`ntkit.tiling.as_operator` accepts: a dense tensor, a :class:`~ntkit.tiling.KernelStore`
on disk (streamed tile by tile), a matrix-free :class:`~ntkit.tiling.KernelFnOperator`, or a matvec. Every
right-hand side (column of ``B``) runs its own CG recurrence (Hestenes & Stiefel 1952), all sharing one block
product ``K @ P`` per iteration, so ``k`` outputs cost about one matvec pass over ``K``.

Preconditioners (low rank + ridge, applied by the Woodbury identity):

* ``"nystrom"``: ``K ≈ U Λ Uᵀ`` from ``rank`` Nyström centres (uniform or ridge-leverage sampled), and
  ``P = U(Λ + λ)Uᵀ + λ(I − UUᵀ)`` (randomized Nyström preconditioning, Frangella, Tropp & Udell 2023).
  With ``rank`` above the effective dimension ``d_eff(λ)``, the condition number of ``P⁻¹(K + λI)`` is O(1).
* ``"pivchol"``: the same form from a partial pivoted Cholesky ``K ≈ F Fᵀ`` (Harbrecht, Peters & Schneider
  2012; Gardner et al. 2018); it reads ``rank`` single columns, so it suits in-memory and matrix-free kernels
  better than stores.

Under ``torchrun`` the operator splits its tiles (block rows) across ranks and all-reduces each product; the
vectors are replicated, so every rank runs the same recurrence. ``checkpoint=path`` saves the full CG state
every ``checkpoint_every`` iterations (atomically) and a rerun resumes from it.

For matrices that fit in memory a dense factorisation (``ntkit.linalg.PSDMatrix``) is faster and
exact; CG is for the rest. Preconditioners live in :mod:`ntkit.linalg.precond`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ntkit.distributed import barrier, context
from ntkit.linalg.lowrank import LowRankPreconditioner
from ntkit.linalg.operators import KernelOperator, as_operator
from ntkit.linalg.precond import make_preconditioner

__all__ = ["cg", "CGResult"]


@dataclasses.dataclass
class CGResult:
    """Solution and diagnostics of :func:`cg`.

    Attributes:
      x: the solution, shaped like ``B``, in float64 (or the ``dtype`` asked for).
      iterations: iterations run (in total, counting those before a restart from a checkpoint).
      residual: per right-hand side, the *true* relative residual ``‖B − (K + λI)X‖ / ‖B‖``, recomputed
        with one extra product at the end (not the recursively updated one).
      converged: every residual is at most ``tol``.
      history: the largest recursive relative residual after each iteration.
    """

    x: Tensor
    iterations: int
    residual: Tensor
    converged: bool
    history: list


def cg(
    a: Any,
    b: Tensor,
    lam: float = 0.0,
    *,
    tol: float = 1e-6,
    maxiter: Optional[int] = None,
    preconditioner: Union[str, LowRankPreconditioner, Callable[[Tensor], Tensor], None] = None,
    rank: int = 200,
    seed: int = 0,
    sampling: str = "uniform",
    x0: Optional[Tensor] = None,
    checkpoint: Union[str, os.PathLike, None] = None,
    checkpoint_every: int = 10,
    callback: Optional[Callable[[int, Tensor], None]] = None,
    n: Optional[int] = None,
) -> CGResult:
    """Solve ``(K + λI) X = B`` by (preconditioned) conjugate gradients, all columns of ``B`` at once.

    Args:
      a: the kernel ``K`` (tensor, :class:`~ntkit.tiling.KernelStore`, operator, or a matvec with ``n``).
      b: right-hand sides ``(n,)`` or ``(n, k)``.
      lam: ridge ``λ ≥ 0`` (absolute: add it to ``K``'s diagonal).
      tol: stop when every column's relative residual ``‖r‖/‖b‖`` is at most ``tol``.
      maxiter: at most this many iterations (default ``n``).
      preconditioner: ``None``, ``"nystrom"``, ``"pivchol"`` (built with ``rank``, ``seed``, ``sampling``),
        a :class:`LowRankPreconditioner`, or any callable ``R -> P⁻¹R``.
      x0: starting guess (default 0).
      checkpoint: file for the solver state; if it exists and matches this problem, the solve resumes
        from it (a finished solve returns at once). Rank 0 writes it.
      callback: ``callback(iteration, relative_residuals)`` after each iteration.

    Returns a :class:`CGResult`; ``converged`` is judged on the true residual.
    """
    op = as_operator(a, n=n)
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"CG needs a square kernel matrix; got {op.shape}.")
    if lam < 0:
        raise ValueError(f"lam={lam} must be >= 0.")
    vec = b.dim() == 1
    bb = (b[:, None] if vec else b).to(device=op.device, dtype=op.dtype)
    if bb.dim() != 2 or bb.shape[0] != op.shape[0]:
        raise ValueError(f"B must have shape ({op.shape[0]},) or ({op.shape[0]}, k); got {tuple(b.shape)}.")
    if not bool(torch.isfinite(bb).all()):
        raise ValueError("B contains NaN/Inf.")
    nn_ = op.shape[0]
    maxiter = nn_ if maxiter is None else int(maxiter)
    if isinstance(preconditioner, str):
        preconditioner = make_preconditioner(op, lam, preconditioner, rank, seed, sampling)
    m_inv = (lambda r: r) if preconditioner is None else getattr(preconditioner, "solve", preconditioner)
    pdesc = "none" if preconditioner is None else getattr(preconditioner, "description", repr(preconditioner))

    def apply(p: Tensor) -> Tensor:
        out = op.matmat(p)
        return out + lam * p if lam else out

    bnorm = torch.linalg.vector_norm(bb, dim=0)
    safe_b = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    fp = _fingerprint(bb, lam, tol, op, pdesc)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    state = _load(ckpt, fp) if ckpt is not None else None
    if state is not None:
        x, r, p, rz, it, history = (state[k] for k in ("x", "r", "p", "rz", "it", "history"))
    else:
        x = torch.zeros_like(bb) if x0 is None else (x0[:, None] if x0.dim() == 1 else x0).to(bb).clone()
        r = bb - apply(x) if x0 is not None else bb.clone()
        z = m_inv(r)
        p = z.clone()
        rz = (r * z).sum(0)
        it, history = 0, []
    res = torch.linalg.vector_norm(r, dim=0) / safe_b
    active = res > tol
    while it < maxiter and bool(active.any()):
        ap = apply(p)
        pap = (p * ap).sum(0)
        if bool((pap[active] <= 0).any()):
            raise ValueError(
                f"K + lam*I is not positive definite along a CG direction (pᵀ(K+λI)p = {float(pap.min()):.3e}); "
                f"the kernel is not PSD or lam is too small for its round-off: increase lam."
            )
        alpha = torch.where(active, rz / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rz))
        x = x + alpha * p
        r = r - alpha * ap
        it += 1
        res = torch.linalg.vector_norm(r, dim=0) / safe_b
        history.append(float(res.max()))
        if callback is not None:
            callback(it, res)
        active = res > tol
        if bool(active.any()):
            z = m_inv(r)
            rz_new = (r * z).sum(0)
            beta = torch.where(active, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
            p = z + beta * p
            rz = rz_new
        if ckpt is not None and (it % checkpoint_every == 0 or not bool(active.any())):
            _save(ckpt, dict(fp=fp, x=x, r=r, p=p, rz=rz, it=it, history=history))
    true = torch.linalg.vector_norm(bb - apply(x), dim=0) / safe_b
    if ckpt is not None:
        _save(ckpt, dict(fp=fp, x=x, r=r, p=p, rz=rz, it=it, history=history))
    out = x[:, 0] if vec else x
    return CGResult(x=out, iterations=it, residual=true, converged=bool((true <= tol).all()), history=history)


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
def _fingerprint(b: Tensor, lam: float, tol: float, op: KernelOperator, pdesc: str) -> dict:
    h = hashlib.sha256(b.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {
        "n": op.shape[0],
        "k": b.shape[1],
        "lam": float(lam),
        "b_sha256": h,
        "operator": type(op).__name__,
        "preconditioner": pdesc,
    }


def _load(path: Path, fp: dict) -> Optional[dict]:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fp") != fp:
        diff = [k for k in fp if state.get("fp", {}).get(k) != fp[k]]
        raise ValueError(
            f"the CG checkpoint {path} was made for a different problem (differs in {diff}); "
            f"delete it or pass another checkpoint path."
        )
    return state


def _save(path: Path, state: dict) -> None:
    if context(init=False).is_main:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    barrier()
