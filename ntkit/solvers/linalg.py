"""Deprecated: ``ntkit.solvers.linalg`` is :mod:`ntkit.linalg.dense` since 0.2."""

from ntkit._deprecation import moved

moved("ntkit.solvers.linalg", "ntkit.linalg.dense")

from ntkit.linalg.dense import *
from ntkit.linalg.dense import __all__
