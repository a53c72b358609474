"""Linear algebra for kernel systems (was ``ntkit.solvers``).

* :mod:`~ntkit.linalg.dense`: safeguarded dense solves (:class:`PSDMatrix`: checks, Cholesky with a jitter
  ladder, eigendecomposition fallback, clear errors);
* :mod:`~ntkit.linalg.operators`: kernel matrices as linear operators (dense, matvec, tiled);
* :mod:`~ntkit.linalg.cg`: preconditioned conjugate gradients (:mod:`~ntkit.linalg.precond`: Nyström and
  pivoted-Cholesky preconditioners);
* :mod:`~ntkit.linalg.nystrom`: Nyström approximations and ridge-leverage sampling;
  :mod:`~ntkit.linalg.falkon`: Falkon-style Nyström KRR.

Random features of networks live in :mod:`ntkit.random_features`; tiled and stored kernel matrices (and
their operators) in :mod:`ntkit.tiling`.
"""

from ntkit.linalg.cg import CGResult, cg
from ntkit.linalg.dense import (
    NumericalWarning,
    PSDMatrix,
    add_diagonal_regularizer,
    as_kernel_matrix,
    check_memory,
    psd_rtol,
    symmetry_rtol,
)
from ntkit.linalg.falkon import FalkonResult, falkon
from ntkit.linalg.lowrank import LowRankPreconditioner
from ntkit.linalg.nystrom import NystromApprox, nystrom, ridge_leverage_scores, rls_sample
from ntkit.linalg.operators import DenseOperator, KernelOperator, MatvecOperator, TiledOperator, as_operator, tmm
from ntkit.linalg.precond import make_preconditioner, pivoted_cholesky

__all__ = [
    "NumericalWarning",
    "PSDMatrix",
    "add_diagonal_regularizer",
    "as_kernel_matrix",
    "check_memory",
    "psd_rtol",
    "symmetry_rtol",
    "KernelOperator",
    "DenseOperator",
    "MatvecOperator",
    "TiledOperator",
    "as_operator",
    "tmm",
    "CGResult",
    "cg",
    "LowRankPreconditioner",
    "make_preconditioner",
    "pivoted_cholesky",
    "NystromApprox",
    "nystrom",
    "ridge_leverage_scores",
    "rls_sample",
    "FalkonResult",
    "falkon",
]
