"""Tiles of a kernel matrix, and the one loop that assembles them.

A kernel matrix ``K(X1, X2)`` of ``n1 x n2`` sample pairs is cut into tiles of ``tile_size x tile_size``
samples; the last row/column of tiles is ragged when ``tile_size`` does not divide ``n`` (no divisibility
constraint). With ``x2=None`` the matrix is symmetric and only tiles on or above the block diagonal are
computed; :class:`Assembler` writes each off-diagonal one a second time, swapped, into its mirror position.
A network's ``kernel_fn``, :func:`ntkit.tiling.kernel_matrix` and the empirical NTK all iterate a
:class:`TilePlan` and place their tiles with an :class:`Assembler`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from ntkit._memory import check_fits, empty_output

__all__ = ["Tile", "TilePlan", "Assembler"]


@dataclasses.dataclass(frozen=True)
class Tile:
    """Block ``(bi, bj)`` of the tile grid: rows ``r0:r1`` of x1, columns ``c0:c1`` of x2."""

    bi: int
    bj: int
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def key(self) -> str:
        return f"{self.bi}_{self.bj}"

    @property
    def diagonal(self) -> bool:
        return self.bi == self.bj


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """All tiles of an ``n1 x n2`` matrix; ``symmetric`` keeps the upper block triangle only.

    Tiles are ``tile_size`` rows by ``col_size`` columns (default: square)."""

    n1: int
    n2: int
    tile_size: int
    symmetric: bool
    col_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.tile_size < 1 or (self.col_size is not None and self.col_size < 1):
            raise ValueError(f"tile_size={self.tile_size} must be a positive number of samples.")
        if self.symmetric and (self.n1 != self.n2 or self.col_size not in (None, self.tile_size)):
            raise ValueError("a symmetric plan needs n1 == n2 and square tiles.")

    @property
    def cols(self) -> int:
        return self.tile_size if self.col_size is None else self.col_size

    @property
    def grid(self) -> tuple[int, int]:
        return math.ceil(self.n1 / self.tile_size), math.ceil(self.n2 / self.cols)

    def bounds(self, b: int, n: int, size: Optional[int] = None) -> tuple[int, int]:
        size = self.tile_size if size is None else size
        return b * size, min((b + 1) * size, n)

    def row_blocks(self) -> list[tuple[int, int]]:
        """``(r0, r1)`` of every block of x1's samples."""
        return [self.bounds(b, self.n1) for b in range(self.grid[0])]

    def col_blocks(self) -> list[tuple[int, int]]:
        """``(c0, c1)`` of every block of x2's samples."""
        return [self.bounds(b, self.n2, self.cols) for b in range(self.grid[1])]

    def tile(self, bi: int, bj: int) -> Tile:
        r0, r1 = self.bounds(bi, self.n1)
        c0, c1 = self.bounds(bj, self.n2, self.cols)
        return Tile(bi, bj, r0, r1, c0, c1)

    def __iter__(self) -> Iterator[Tile]:
        g1, g2 = self.grid
        for bi in range(g1):
            for bj in range(bi if self.symmetric else 0, g2):
                yield self.tile(bi, bj)

    def __len__(self) -> int:
        g1, g2 = self.grid
        return g1 * (g1 + 1) // 2 if self.symmetric else g1 * g2


class Assembler:
    """Places tile results into whole ``(n1, n2, ...)`` outputs, one per name.

    The outputs are allocated on the first :meth:`put` (their trailing axes and dtype are the first tile's),
    after :func:`~ntkit._memory.check_fits` has checked that they fit (``what``/``fix`` word its error).
    For a symmetric plan every off-diagonal tile is written a second time into its mirror block as
    ``swap(block)`` (the kernel of ``(x2, x1)`` from that of ``(x1, x2)``), through a contiguous copy: writing a
    transposed view into a strided block directly is ~4x slower. ``zeros=True`` starts from zeros (outputs
    that distributed ranks fill in parts and then sum).
    """

    def __init__(
        self,
        plan: TilePlan,
        names: Sequence[str],
        swap: Callable[[Tensor], Tensor],
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        zeros: bool = False,
        what: str = "the output kernels",
        fix: str = "compute them to disk with ntkit.tiling.kernel_matrix(..., store=path).",
    ):
        self.plan, self.names, self.swap = plan, tuple(names), swap
        self.device, self.dtype, self.zeros = device, dtype, zeros
        self.what, self.fix = what, fix
        self.outputs: dict[str, Tensor] = {}

    def allocate(self, trailing: Mapping[str, Sequence[int]], dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the outputs ``(n1, n2, *trailing[name])`` now (:meth:`put` does it from its first tile)."""
        n1, n2 = self.plan.n1, self.plan.n2
        dtype = self.dtype or dtype
        device = self.device or device
        item = torch.empty((), dtype=dtype).element_size()
        need = sum(n1 * n2 * math.prod(trailing[g]) for g in self.names) * item
        check_fits(need, device, self.what, self.fix)
        like = torch.empty((), dtype=dtype, device=device)
        for g in self.names:
            shape = (n1, n2) + tuple(trailing[g])
            self.outputs[g] = like.new_zeros(shape) if self.zeros else empty_output(shape, like)

    def put(self, t: Tile, blocks: Mapping[str, Tensor]) -> None:
        """Write the blocks of tile ``t`` (and their mirrors, for a symmetric plan's off-diagonal tiles)."""
        if not self.outputs:
            first = blocks[self.names[0]]
            self.allocate({g: tuple(blocks[g].shape[2:]) for g in self.names}, first.dtype, first.device)
        mirror = self.plan.symmetric and not t.diagonal
        for g in self.names:
            out, blk = self.outputs[g], blocks[g]
            if blk.device != out.device or blk.dtype != out.dtype:
                blk = blk.to(device=out.device, dtype=out.dtype)
            out[t.r0 : t.r1, t.c0 : t.c1] = blk
            if mirror:
                out[t.c0 : t.c1, t.r0 : t.r1] = self.swap(blk).contiguous()
