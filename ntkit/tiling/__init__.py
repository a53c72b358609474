"""Kernels at scale: tiled, out-of-core, resumable and distributed kernel matrices.

* :func:`kernel_matrix` computes ``K(X1, X2)`` of any ``kernel_fn`` in tiles of any size under a memory
  budget, in memory or into a :class:`KernelStore` (zarr, one chunk per tile, crash-safe, resumable), split
  across ``torchrun`` ranks.
* :class:`KernelStore` / :class:`StoredMatrix`: the on-disk matrix, read lazily by the solvers.
* :class:`KernelFnOperator`: a kernel recomputed tile by tile on every product (matrix-free).

The operator abstraction itself (:class:`~ntkit.linalg.KernelOperator`, :func:`~ntkit.linalg.as_operator`) lives
in :mod:`ntkit.linalg`; the process-group plumbing in :mod:`ntkit.distributed`.
"""

import warnings as _warnings

from ntkit._tiles import Tile, TilePlan
from ntkit.distributed import DistContext, context
from ntkit.linalg import operators as _operators
from ntkit.tiling.operators import KernelFnOperator
from ntkit.tiling.plan import choose_tile_size
from ntkit.tiling.store import CorruptTileError, KernelStore, StoredMatrix, StoreMismatchError
from ntkit.tiling.tiles import kernel_matrix

__all__ = [
    "kernel_matrix",
    "KernelStore",
    "StoredMatrix",
    "StoreMismatchError",
    "CorruptTileError",
    "KernelFnOperator",
    "Tile",
    "TilePlan",
    "choose_tile_size",
    "DistContext",
    "context",
]

_MOVED = {"KernelOperator", "DenseOperator", "MatvecOperator", "TiledOperator", "as_operator", "tmm"}


def __getattr__(name: str):
    """The operators moved to :mod:`ntkit.linalg` in 0.2; their old names here still work for one release."""
    if name in _MOVED:
        _warnings.warn(
            f"ntkit.tiling.{name} moved to ntkit.linalg.{name}; the old name is removed in 0.3.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_operators, name)
    raise AttributeError(f"module 'ntkit.tiling' has no attribute {name!r}")
