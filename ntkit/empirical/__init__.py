"""Empirical (finite-width) kernels of any ``torch.nn.Module``, linearisation and Taylor expansion.

* :func:`empirical_ntk`, :func:`empirical_nngp`, :func:`empirical_kernel_fn` (:mod:`ntkit.empirical.kernels`);
* :func:`linearize`, :func:`taylor_expand` (:mod:`ntkit.empirical.linearize`);
* the implementations behind one protocol (:mod:`ntkit.empirical.protocol`): Jacobian contraction
  (:mod:`~ntkit.empirical.jacobian`), NTK-vector products (:mod:`~ntkit.empirical.ntk_vp`) and structured
  derivatives (:mod:`~ntkit.empirical.structured`); :func:`ntk_implementation` gives one for callers that
  evaluate a model at many parameter values.
"""

from ntkit.empirical._model import compute_mode
from ntkit.empirical._spec import OutSpec, feature_gram
from ntkit.empirical.kernels import empirical_kernel_fn, empirical_nngp, empirical_ntk, ntk_implementation
from ntkit.empirical.linearize import linearize, taylor_expand
from ntkit.empirical.protocol import IMPLEMENTATIONS, EmpiricalError, Implementation

__all__ = [
    "empirical_ntk",
    "empirical_nngp",
    "empirical_kernel_fn",
    "linearize",
    "taylor_expand",
    "EmpiricalError",
    "IMPLEMENTATIONS",
    "Implementation",
    "ntk_implementation",
    "OutSpec",
    "feature_gram",
    "compute_mode",
]
