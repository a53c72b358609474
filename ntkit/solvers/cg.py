"""Deprecated: ``ntkit.solvers.cg`` is :mod:`ntkit.linalg.cg` (preconditioners: :mod:`ntkit.linalg.precond`)."""

from ntkit._deprecation import moved

moved("ntkit.solvers.cg", "ntkit.linalg.cg and ntkit.linalg.precond")

from ntkit.linalg.cg import CGResult, cg
from ntkit.linalg.lowrank import LowRankPreconditioner
from ntkit.linalg.precond import make_preconditioner, pivoted_cholesky

__all__ = ["cg", "CGResult", "LowRankPreconditioner", "pivoted_cholesky", "make_preconditioner"]
