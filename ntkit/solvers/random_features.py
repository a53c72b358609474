"""Deprecated: ``ntkit.solvers.random_features`` is :mod:`ntkit.random_features` since 0.2."""

from ntkit._deprecation import moved

moved("ntkit.solvers.random_features", "ntkit.random_features")

from ntkit.random_features import RandomFeatures, random_features

__all__ = ["RandomFeatures", "random_features"]
