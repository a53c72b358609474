"""Deprecated: ``ntkit.solvers`` is :mod:`ntkit.linalg` (and :mod:`ntkit.random_features`) since 0.2."""

from ntkit._deprecation import moved

moved("ntkit.solvers", "ntkit.linalg (random features: ntkit.random_features)")

from ntkit.linalg import *
from ntkit.linalg import __all__ as _linalg_all
from ntkit.random_features import RandomFeatures, random_features

__all__ = [*_linalg_all, "RandomFeatures", "random_features"]
