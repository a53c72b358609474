"""Deprecated: ``ntkit.solvers.nystrom`` is :mod:`ntkit.linalg.nystrom` (Falkon: :mod:`ntkit.linalg.falkon`)."""

from ntkit._deprecation import moved

moved("ntkit.solvers.nystrom", "ntkit.linalg.nystrom and ntkit.linalg.falkon")

from ntkit.linalg.falkon import FalkonResult, falkon
from ntkit.linalg.nystrom import NystromApprox, nystrom, ridge_leverage_scores, rls_sample

__all__ = ["nystrom", "NystromApprox", "rls_sample", "ridge_leverage_scores", "falkon", "FalkonResult"]
