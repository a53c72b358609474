"""Kernel matrices computed from a ``kernel_fn`` on demand: the matrix-free operator of the scalable solvers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from ntkit._inputs import as_batch
from ntkit._tiles import TilePlan
from ntkit.distributed import context
from ntkit.kernel import normalize_get
from ntkit.linalg.operators import TiledOperator
from ntkit.tiling.plan import choose_tile_size, compute_tile

__all__ = ["KernelFnOperator"]


class KernelFnOperator(TiledOperator):
    """``K(x1, x2)`` of a ``kernel_fn``, never stored: each product recomputes it tile by tile.

    Memory is ``O(tile_size²)`` whatever ``n``; time per product is one full kernel evaluation (half of it for
    ``x2=None``, where only upper tiles are computed and used twice). Tiles are computed in the inputs' dtype
    and multiplied in ``dtype`` (float64 by default).
    """

    def __init__(
        self,
        kernel_fn: Callable,
        x1: Any,
        x2: Any = None,
        get: str = "nngp",
        tile_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device | str] = None,
    ):
        names, _ = normalize_get(get)
        if len(names) != 1:
            raise ValueError(f"an operator is one matrix: pass get='nngp' or get='ntk', not {get!r}.")
        self.name = names[0]
        self.kernel_fn = kernel_fn
        self.x1 = as_batch(x1, "x1")
        self.x2 = None if x2 is None else as_batch(x2, "x2")
        n1 = self.x1.shape[0]
        n2 = n1 if self.x2 is None else self.x2.shape[0]
        self.shape = (n1, n2)
        self.dtype = dtype
        self.compute_device = context(init=False).device if device is None else torch.device(device)
        self.device = self.x1.device
        if tile_size is None:
            tile_size = choose_tile_size(kernel_fn, self.x1, n1, n2, 1, memory_budget, self.compute_device)
        self.plan = TilePlan(n1, n2, int(tile_size), symmetric=self.x2 is None)

    def _tile(self, t):
        k = compute_tile(self.kernel_fn, self.x1, self.x2, t, (self.name,), self.compute_device)[self.name]
        if k.dim() != 2:
            raise ValueError(
                f"kernel_fn returned tiles of shape {tuple(k.shape)}; an operator needs a 2-D "
                f"(N1, N2) kernel (add a readout/Flatten so no spatial axes remain)."
            )
        return k.to(device=self.device, dtype=self.dtype)

    def columns(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        xc = (self.x1 if self.x2 is None else self.x2)[idx.to(self.x1.device)]
        out = torch.empty(self.shape[0], len(idx), dtype=self.dtype, device=self.device)
        step = self.plan.tile_size
        for r0 in range(0, self.shape[0], step):
            k = self.kernel_fn(self.x1[r0 : r0 + step].to(self.compute_device), xc.to(self.compute_device), self.name)
            out[r0 : r0 + step] = k.to(device=self.device, dtype=self.dtype)
        return out

    def diagonal(self):
        self._need_square("diagonal")
        out = torch.empty(self.shape[0], dtype=self.dtype, device=self.device)
        step = self.plan.tile_size
        for r0 in range(0, self.shape[0], step):
            xb = self.x1[r0 : r0 + step].to(self.compute_device)
            out[r0 : r0 + step] = torch.diagonal(self.kernel_fn(xb, None, self.name)).to(self.dtype)
        return out
