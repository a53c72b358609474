"""Output-axis conventions of empirical kernels (NT's), as einsum strings.

Output conventions (NT's): a model maps a batch ``x`` of ``N`` samples to ``f(x)`` of shape ``(N, *O)``.
A kernel between ``x1`` and ``x2`` has, for every axis of ``f(x)`` (the batch axis included), two axes
(the ``x1`` side, then the ``x2`` side) unless the axis is

* in ``trace_axes``: summed over its matching pair and divided by its size (NT *averages* traced axes);
* in ``diagonal_axes``: only its matching pair's diagonal is kept, as one axis.

So ``f(x)`` of shape ``(N, O)`` gives ``(N1, N2)`` with ``trace_axes=(-1,)`` and ``(N1, N2, O, O)`` with
``trace_axes=()``; ``diagonal_axes=(0,)`` gives per-sample kernels ``(N, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor

from ntkit.empirical.protocol import EmpiricalError

__all__ = ["OutSpec", "feature_gram"]

_LETTERS1 = "abefhklmnopqruv"  # letters c d g s t w x y z are kept for internal axes
_LETTERS2 = "ABEFHKLMNOPQRUV"


def _canon_axes(axes: Union[int, Sequence[int]], ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for a in axes:
        if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
            raise EmpiricalError(
                f"{what}={tuple(axes)}: axis {a} is out of range for model outputs with "
                f"{ndim} axes (batch axis included); use axes in [{-ndim}, {ndim - 1}]."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise EmpiricalError(f"{what}={tuple(axes)} names an axis twice.")
    return tuple(sorted(out))


class OutSpec:
    """Trace/diagonal bookkeeping for outputs of per-sample shape ``O`` (see the module docstring)."""

    def __init__(self, out_shape: Sequence[int], trace_axes, diagonal_axes):
        self.O = tuple(int(s) for s in out_shape)
        nd = 1 + len(self.O)
        if nd > len(_LETTERS1):
            raise EmpiricalError(f"model outputs with {nd} axes are not supported (at most {len(_LETTERS1)}).")
        self.trace = _canon_axes(trace_axes, nd, "trace_axes")
        self.diag = _canon_axes(diagonal_axes, nd, "diagonal_axes")
        if 0 in self.trace:
            raise EmpiricalError(
                "trace_axes contains the batch axis 0"
                + (
                    " (the model's output has no other axis, so the default trace_axes=(-1,) means the batch axis)"
                    if nd == 1
                    else ""
                )
                + "; a kernel cannot average over samples. Use trace_axes=() for scalar outputs."
            )
        both = set(self.trace) & set(self.diag)
        if both:
            raise EmpiricalError(f"axes {sorted(both)} are in both trace_axes and diagonal_axes; choose one.")
        self.batch_diag = 0 in self.diag
        l1 = ["i"] + [_LETTERS1[k] for k in range(len(self.O))]
        l2 = ["i" if self.batch_diag else "j"] + [
            _LETTERS1[k] if (k + 1) in self.trace or (k + 1) in self.diag else _LETTERS2[k] for k in range(len(self.O))
        ]
        self.s1, self.s2 = "".join(l1), "".join(l2)
        out, self.pairs = [], []
        for ax in range(nd):
            if ax in self.trace:
                continue
            if ax in self.diag:
                out.append(l1[ax])
                self.pairs.append(False)
            else:
                out += [l1[ax], l2[ax]]
                self.pairs.append(True)
        self.out = "".join(out)
        self.trace_size = math.prod(self.O[a - 1] for a in self.trace)
        # multiply-adds per (i, j) pair in a contraction over one parameter: kept^2 * diag * traced
        self.q = math.prod(s if (k + 1) in self.trace or (k + 1) in self.diag else s * s for k, s in enumerate(self.O))
        self.per_pair = self.q // max(self.trace_size, 1)  # output entries per (i, j)

    def shape(self, n1: int, n2: int) -> tuple[int, ...]:
        sizes = {"i": n1, "j": n2}
        for k, s in enumerate(self.O):
            sizes[_LETTERS1[k]] = s
            sizes[_LETTERS2[k]] = s
        return tuple(sizes[c] for c in self.out)

    def contract(self, a: Tensor, b: Tensor, extra: str = "z") -> Tensor:
        """``sum_extra a[i, *O, extra] b[j, *O, extra]`` with traced axes summed, diagonal axes shared (not
        yet divided by the trace size)."""
        return torch.einsum(f"{self.s1}{extra},{self.s2}{extra}->{self.out}", a, b)

    def swap_perm(self) -> list[int]:
        """Permutation exchanging the roles of x1 and x2 (for filling the lower blocks of x1 vs x1)."""
        perm, pos = [], 0
        for paired in self.pairs:
            perm += [pos + 1, pos] if paired else [pos]
            pos += 2 if paired else 1
        return perm


def feature_gram(
    f1: Tensor, f2: Tensor, trace_axes: Union[int, Sequence[int]] = (-1,), diagonal_axes: Union[int, Sequence[int]] = ()
) -> Tensor:
    """Inner products of per-sample features ``f1 (N1, *O)``, ``f2 (N2, *O)`` under the output conventions:
    traced axes averaged, diagonal axes kept once, other axes paired (the empirical NNGP of features)."""
    spec = OutSpec(f1.shape[1:], trace_axes, diagonal_axes)
    if spec.batch_diag and f1.shape[0] != f2.shape[0]:
        raise EmpiricalError("diagonal_axes contains the batch axis 0, which needs equal batch sizes.")
    return torch.einsum(f"{spec.s1},{spec.s2}->{spec.out}", f1, f2) / spec.trace_size
