"""The protocol every empirical-NTK implementation follows, and the registry of implementations.

An implementation is built for one model, one parameter selection and one output spec
(:class:`~ntkit.empirical._spec.OutSpec`) and offers:

* ``features(x_block, params=None)``: per-sample quantities of a block of inputs (Jacobians, cotangents,
  or the inputs themselves), optionally at other parameter values (``params`` may hold extra fixed entries);
* ``pair(features1, features2)``: the kernel block between two blocks, traced axes summed but not yet
  divided by the trace size;
* estimates that size blocks and let ``"auto"`` choose: ``feature_bytes()`` / ``pair_bytes()`` (memory per
  sample / per pair), ``feature_flops()`` / ``pair_flops()`` and ``flops(n1, n2, x2_none)``;
* ``active()``: a context manager inside which ``features``/``pair`` may be called (structured derivatives
  attach forward hooks to the model's modules there, and remove them on exit, also on errors);
* ``has_structure()``: whether structured derivatives apply to any parameter.

All implementations are exact (they agree to round-off); they differ only in cost. :func:`make` builds one by
name; the names are :data:`IMPLEMENTATIONS`.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any, Optional

from torch import Tensor

__all__ = ["EmpiricalError", "Implementation", "IMPLEMENTATIONS", "split_params"]

#: names accepted by ``implementation=`` ("auto" chooses among the others)
IMPLEMENTATIONS = ("auto", "jacobian", "ntk_vp", "structured")


class EmpiricalError(ValueError):
    """Bad input to an empirical kernel; the message names the problem and the fix."""


class Implementation:
    """Base class of the implementations (see the module docstring for the protocol)."""

    name = ""
    fixed: dict[str, Tensor]
    budget: int

    def active(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext(self)

    def has_structure(self) -> bool:
        return False

    def features(self, x: Tensor, params: Optional[dict] = None) -> Any:
        raise NotImplementedError

    def pair(self, f1: Any, f2: Any) -> Tensor:
        raise NotImplementedError

    def feature_bytes(self) -> float:
        raise NotImplementedError

    def pair_bytes(self) -> float:
        raise NotImplementedError

    def feature_flops(self) -> float:
        raise NotImplementedError

    def pair_flops(self) -> float:
        raise NotImplementedError

    def flops(self, n1: int, n2: int, x2_none: bool) -> float:
        """Total FLOPs for ``n1 x n2`` pairs (``x2_none``: ``x1`` against itself, features once, half the pairs)."""
        nf = n1 if x2_none else n1 + n2
        pairs = n1 * (n1 + 1) / 2 if x2_none else n1 * n2
        return nf * self.feature_flops() + pairs * self.pair_flops()


def split_params(selected: dict, given: Optional[dict], fixed: dict) -> tuple[dict, dict]:
    """Values of the selected parameters, and everything held fixed (other parameters, given extras)."""
    if given is None:
        return selected, fixed
    return {k: given[k] for k in selected}, {**fixed, **{k: v for k, v in given.items() if k not in selected}}
