"""Kernel matrices as linear operators: what the scalable solvers take.

A solver needs ``K @ V`` (block matvecs), the diagonal and a few columns ``K[:, idx]`` (Nyström centres,
pivoted Cholesky). :func:`as_operator` turns each accepted form into a :class:`KernelOperator`:

* a dense tensor (:class:`DenseOperator`),
* a :class:`~ntkit.tiling.KernelStore` on disk (:class:`~ntkit.tiling.store.StoredMatrix`, streamed by tiles),
* a ``kernel_fn`` with its inputs (:class:`ntkit.tiling.KernelFnOperator`: matrix-free, each product
  recomputes tiles),
* any matvec callable (:class:`MatvecOperator`).

Under ``torchrun`` the tiled operators split their tiles across ranks and sum the partial products with one
``all_reduce`` (each rank owns whole tiles, hence block rows); every rank gets the full product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ntkit._tiles import Tile, TilePlan
from ntkit.distributed import all_reduce_, context

__all__ = ["KernelOperator", "TiledOperator", "DenseOperator", "MatvecOperator", "as_operator", "tmm"]


def tmm(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` for a tall ``a`` and a thin ``b``, computed as ``(bᵀ a)ᵀ``: some BLAS builds (MKL on AMD
    CPUs) take a path up to 10x slower for the transposed-left product of tall-skinny matrices."""
    return (b.T @ a).T


class KernelOperator:
    """A square or rectangular kernel matrix known through products. Subclasses set ``shape``, ``dtype``,
    ``device`` and implement :meth:`matmat`; :meth:`diagonal` and :meth:`columns` have generic (slow,
    matvec-based) defaults that subclasses replace with direct reads."""

    shape: tuple[int, int]
    dtype: torch.dtype = torch.float64
    device: torch.device = torch.device("cpu")
    distributed: bool = True  # split work over torch.distributed ranks when a group is active

    def matmat(self, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``K @ v`` for ``v`` of shape ``(n2, k)``; returns ``(n1, k)`` in ``self.dtype``."""
        raise NotImplementedError

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.dim() == 1:
            return self.matmat(v[:, None])[:, 0]
        return self.matmat(v)

    def _unit(self, idx: Tensor) -> Tensor:
        e = torch.zeros(self.shape[1], len(idx), dtype=self.dtype, device=self.device)
        e[idx, torch.arange(len(idx), device=self.device)] = 1
        return e

    def columns(self, idx: Union[Tensor, Sequence[int]]) -> Tensor:
        """``K[:, idx]`` as an ``(n1, len(idx))`` tensor (default: products with unit vectors)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.matmat(self._unit(idx))

    def diagonal(self) -> Tensor:
        """``diag(K)`` (square operators). Default: unit-vector products in blocks of 256 (slow)."""
        self._need_square("diagonal")
        n = self.shape[0]
        out = torch.empty(n, dtype=self.dtype, device=self.device)
        for s in range(0, n, 256):
            idx = torch.arange(s, min(n, s + 256))
            out[s : s + len(idx)] = self.columns(idx)[idx, torch.arange(len(idx))]
        return out

    def to_tensor(self) -> Tensor:
        """The whole matrix in memory (only for what fits)."""
        return self.columns(torch.arange(self.shape[1]))

    def _need_square(self, what: str) -> None:
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"{what} needs a square kernel matrix; this one is {self.shape}.")

    def _check_rhs(self, v: Tensor) -> Tensor:
        if v.dim() != 2 or v.shape[0] != self.shape[1]:
            raise ValueError(f"K @ V: K is {self.shape}, V must be ({self.shape[1]}, k); got {tuple(v.shape)}.")
        return v.to(device=self.device, dtype=self.dtype)

    def as_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mm(x):
            t = torch.from_numpy(x.reshape(self.shape[1], -1)).to(self.dtype)
            return self.matmat(t).cpu().numpy()

        return LinearOperator(self.shape, matvec=mm, matmat=mm, dtype="float64")


class DenseOperator(KernelOperator):
    """A kernel matrix held in memory. Under ``torchrun`` each rank multiplies its block of rows."""

    def __init__(self, k: Tensor, dtype: Optional[torch.dtype] = None):
        if k.dim() != 2:
            raise ValueError(f"a kernel matrix must be 2-D; got shape {tuple(k.shape)}.")
        if not bool(torch.isfinite(k).all()):
            raise ValueError("the kernel matrix contains NaN/Inf; recompute it (float64 helps) before solving.")
        self.dtype = dtype or (k.dtype if k.dtype == torch.float64 else torch.float64)
        self.k = k
        self.shape = (k.shape[0], k.shape[1])
        self.device = k.device

    def matmat(self, v):
        v = self._check_rhs(v)
        ctx = context(init=False)
        if not (self.distributed and ctx.active):
            return (self.k.to(self.dtype) @ v) if self.k.dtype != self.dtype else self.k @ v
        out = torch.zeros(self.shape[0], v.shape[1], dtype=self.dtype, device=self.device)
        rows = math.ceil(self.shape[0] / ctx.world_size)
        r0, r1 = ctx.rank * rows, min(self.shape[0], (ctx.rank + 1) * rows)
        out[r0:r1] = self.k[r0:r1].to(self.dtype) @ v
        return all_reduce_(out)

    def columns(self, idx):
        return self.k[:, torch.as_tensor(idx, dtype=torch.long, device=self.k.device)].to(self.dtype)

    def diagonal(self):
        self._need_square("diagonal")
        return torch.diagonal(self.k).to(self.dtype)

    def to_tensor(self):
        return self.k.to(self.dtype)


class MatvecOperator(KernelOperator):
    """Any function ``v -> K @ v`` on ``(n, k)`` tensors, with an optional known diagonal.

    The function is called on every rank as is (it does its own distribution, if any).
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        n: int,
        *,
        n1: Optional[int] = None,
        diagonal: Optional[Tensor] = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ):
        self.fn = matvec
        self.shape = (n if n1 is None else n1, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self._diag = diagonal

    def matmat(self, v):
        out = self.fn(self._check_rhs(v))
        if out.shape != (self.shape[0], v.shape[1]):
            raise ValueError(f"the matvec returned shape {tuple(out.shape)}, expected {(self.shape[0], v.shape[1])}.")
        return out.to(self.dtype)

    def diagonal(self):
        if self._diag is not None:
            return self._diag.to(device=self.device, dtype=self.dtype)
        return super().diagonal()


class TiledOperator(KernelOperator):
    """An operator whose matrix comes tile by tile: subclasses set ``plan`` (a :class:`TilePlan`; for a
    symmetric plan only upper tiles exist and each off-diagonal one is used twice) and implement
    ``_tile(t)`` (the tile's block in ``dtype`` on ``device``). Under ``torchrun`` each rank takes its
    round-robin share of the tiles and the partial products are summed with ``all_reduce``."""

    plan: TilePlan

    def _tile(self, t: Tile) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _my_tiles(self):
        ctx = context(init=False)
        split = self.distributed and ctx.active
        for i, t in enumerate(self.plan):
            if not split or i % ctx.world_size == ctx.rank:
                yield t

    def matmat(self, v):
        v = self._check_rhs(v)
        out = torch.zeros(self.shape[0], v.shape[1], dtype=self.dtype, device=self.device)
        for t in self._my_tiles():
            k = self._tile(t)
            out[t.r0 : t.r1] += k @ v[t.c0 : t.c1]
            if self.plan.symmetric and not t.diagonal:
                out[t.c0 : t.c1] += tmm(k, v[t.r0 : t.r1])
        return all_reduce_(out) if self.distributed else out


def as_operator(a: Any, n: Optional[int] = None) -> KernelOperator:
    """A :class:`KernelOperator` for a dense tensor / numpy array, a :class:`~ntkit.tiling.KernelStore`
    holding one kernel, a store's matrix (``store['nngp']``), an operator, or a matvec callable (then pass
    ``n``)."""
    if isinstance(a, KernelOperator):
        return a
    matrix = getattr(a, "matrix", None)
    if callable(matrix) and not isinstance(a, Tensor):  # a KernelStore (ntkit.tiling): its one kernel
        return matrix()
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if isinstance(a, Tensor):
        return DenseOperator(a)
    if callable(a):
        if n is None:
            raise ValueError(
                "a matvec function needs its size: pass n=..., or wrap it as MatvecOperator(fn, n, diagonal=...)."
            )
        return MatvecOperator(a, n)
    raise TypeError(
        f"cannot use a {type(a).__name__} as a kernel matrix: pass a tensor, a KernelStore, a "
        f"KernelOperator or a matvec function."
    )
