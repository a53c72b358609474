"""Deprecated: ``ntkit.tiling.operator`` is :mod:`ntkit.linalg.operators` (and ``KernelFnOperator``:
:mod:`ntkit.tiling.operators`) since 0.2."""

from ntkit._deprecation import moved

moved("ntkit.tiling.operator", "ntkit.linalg.operators (KernelFnOperator: ntkit.tiling.operators)")

from ntkit.linalg.operators import (  # noqa: E402
    DenseOperator,
    KernelOperator,
    MatvecOperator,
    TiledOperator,
    as_operator,
    tmm,
)
from ntkit.tiling.operators import KernelFnOperator  # noqa: E402

__all__ = [
    "KernelOperator",
    "TiledOperator",
    "DenseOperator",
    "MatvecOperator",
    "KernelFnOperator",
    "as_operator",
    "tmm",
]
