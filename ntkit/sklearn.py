"""Deprecated: ``ntkit.sklearn`` is :mod:`ntkit.integrations.estimators` since 0.2."""

from ntkit._deprecation import moved

moved("ntkit.sklearn", "ntkit.integrations.estimators")

from ntkit.architectures import fc_net  # noqa: E402
from ntkit.integrations.estimators import (  # noqa: E402
    NTKSVC,
    NetKernel,
    NNGPRegressor,
    NTKClassifier,
    NTKRegressor,
    compute_kernels,
    kernel,
)

__all__ = [
    "NTKRegressor",
    "NTKClassifier",
    "NNGPRegressor",
    "NTKSVC",
    "NetKernel",
    "kernel",
    "fc_net",
    "compute_kernels",
]
