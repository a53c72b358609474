"""Deprecated: ``ntkit.gpytorch`` is :mod:`ntkit.integrations.gp_kernels` since 0.2."""

from ntkit._deprecation import moved

moved("ntkit.gpytorch", "ntkit.integrations.gp_kernels")

from ntkit.integrations.gp_kernels import NetKernel, NNGPKernel, NTKKernel, weight_layers  # noqa: E402

__all__ = ["NetKernel", "NNGPKernel", "NTKKernel", "weight_layers"]
