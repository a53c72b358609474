"""Kernels at scale: tiled, out-of-core, resumable and distributed kernel matrices.

* :func:`kernel_matrix` computes ``K(X1, X2)`` of any ``kernel_fn`` in tiles of any size under a memory
  budget, in memory or into a :class:`KernelStore` (zarr, one chunk per tile, crash-safe, resumable), split
  across ``torchrun`` ranks.
* :class:`KernelStore` / :class:`StoredMatrix`: the on-disk matrix, read lazily by the solvers.
* :func:`as_operator` and the operators (:class:`DenseOperator`, :class:`KernelFnOperator`,
  :class:`MatvecOperator`): what ``ntkit.solvers.cg`` / ``nystrom`` take.
"""
from ntkit.tiling.distributed import DistContext, context
from ntkit.tiling.operator import DenseOperator, KernelFnOperator, KernelOperator, MatvecOperator, as_operator
from ntkit.tiling.plan import Tile, TilePlan, choose_tile_size
from ntkit.tiling.store import CorruptTileError, KernelStore, StoredMatrix, StoreMismatchError
from ntkit.tiling.tiles import kernel_matrix

__all__ = ["kernel_matrix", "KernelStore", "StoredMatrix", "StoreMismatchError", "CorruptTileError",
           "KernelOperator", "DenseOperator", "KernelFnOperator", "MatvecOperator", "as_operator",
           "Tile", "TilePlan", "choose_tile_size",
           "DistContext", "context"]
