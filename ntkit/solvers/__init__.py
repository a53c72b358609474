"""Solvers for kernel systems: safe dense solves (linalg), conjugate gradients (cg), Nyström / Falkon (nystrom)
and NNGP/NTK random features (random_features). All take dense tensors; cg/nystrom also take stores and matvecs."""
from ntkit.solvers.cg import CGResult, LowRankPreconditioner, cg, make_preconditioner, pivoted_cholesky
from ntkit.solvers.linalg import (NumericalWarning, PSDMatrix, add_diagonal_regularizer, as_kernel_matrix,
                                  check_memory)
from ntkit.solvers.nystrom import FalkonResult, NystromApprox, falkon, nystrom, ridge_leverage_scores, rls_sample
from ntkit.solvers.random_features import RandomFeatures, random_features

__all__ = ["NumericalWarning", "PSDMatrix", "add_diagonal_regularizer", "as_kernel_matrix", "check_memory",
           "CGResult", "LowRankPreconditioner", "cg", "make_preconditioner", "pivoted_cholesky",
           "FalkonResult", "NystromApprox", "falkon", "nystrom", "ridge_leverage_scores", "rls_sample",
           "RandomFeatures", "random_features"]
