"""Branching: ``FanOut`` splits one path into several, ``FanIn*`` layers merge them.

Kernel rules assume the branches are independent given their inputs (each has its own Dense/Conv), as
NT does:

* ``FanInSum``:    K = Σ K_i,   Θ = Σ Θ_i
* ``FanInConcat`` (channel axis): K = Σ n_i K_i / Σ n_i, same for Θ (``n_i`` the branch widths)
* ``FanInProd``:   K = Π K_i,   Θ = Σ_i Θ_i Π_{j≠i} K_j   (product rule; output is not Gaussian)
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import nn

from ntkit.layers.base import Layer, LayerError

__all__ = ["FanOut", "FanInSum", "FanInConcat", "FanInProd"]


def _branches(k, layer: Layer) -> list:
    if not isinstance(k, list):
        raise LayerError(
            f"{type(layer).__name__} merges branches but got a single path; put FanOut(n) and parallel(...) before it."
        )
    return k


def _same_shapes(shapes: list, layer: Layer, skip_axis=None) -> None:
    def strip(s):
        return tuple(x for i, x in enumerate(s) if i != skip_axis)

    if len({strip(s) for s in shapes}) != 1:
        raise LayerError(
            f"{type(layer).__name__}: branch output shapes {shapes} differ"
            + ("" if skip_axis is None else " outside the concatenation axis")
            + "; make every branch end with the same shape."
        )


class _FanOutModule(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return tuple(x for _ in range(self.n))

    def extra_repr(self):
        return str(self.n)


class FanOut(Layer):
    """Copy the input into ``n`` branches (to be followed by ``parallel`` of ``n`` layers)."""

    def __init__(self, n: int):
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"FanOut(n={n!r}): n must be a positive int.")
        self.n = n

    def kernel(self, k):
        if isinstance(k, list):
            raise LayerError("FanOut got several branches already; merge them with a FanIn layer first.")
        return [k] * self.n

    def build(self, in_shape, width, generator, readout):
        return _FanOutModule(self.n), [in_shape] * self.n


class _FanInModule(nn.Module):
    def __init__(self, mode: str, axis: int = 1):
        super().__init__()
        self.mode, self.axis = mode, axis

    def forward(self, xs):
        if self.mode == "sum":
            return functools.reduce(operator.add, xs)
        if self.mode == "prod":
            return functools.reduce(operator.mul, xs)
        return torch.cat(tuple(xs), dim=self.axis)

    def extra_repr(self):
        return self.mode


class FanInSum(Layer):
    """Sum the branches (residual connections: ``serial(FanOut(2), parallel(block, Identity()), FanInSum())``)."""

    def kernel(self, k):
        ks = _branches(k, self)
        _same_shapes([x.shape1 for x in ks], self)
        first = ks[0]

        def total(name):
            vals = [getattr(x, name) for x in ks]
            return None if any(v is None for v in vals) else functools.reduce(operator.add, vals)

        return first.replace(
            nngp=total("nngp"),
            ntk=total("ntk"),
            cov1=total("cov1"),
            cov2=total("cov2"),
            is_gaussian=all(x.is_gaussian for x in ks),
            is_input=all(x.is_input for x in ks),
        )

    def build(self, in_shape, width, generator, readout):
        shapes = _branches(in_shape, self)
        _same_shapes(shapes, self)
        return _FanInModule("sum"), shapes[0]


class FanInProd(Layer):
    """Elementwise product of the branches. See module docstring for the rule; the output is not Gaussian."""

    def kernel(self, k):
        ks = _branches(k, self)
        _same_shapes([x.shape1 for x in ks], self)
        first = ks[0]

        def prod(vals):
            return functools.reduce(operator.mul, vals)

        ntk = None
        if all(x.ntk is not None for x in ks):
            ntk = sum(
                ks[i].ntk * prod([ks[j].nngp for j in range(len(ks)) if j != i]) if len(ks) > 1 else ks[i].ntk
                for i in range(len(ks))
            )
        cov1 = None if first.cov1 is None else prod([x.cov1 for x in ks])
        cov2 = None if first.cov2 is None else prod([x.cov2 for x in ks])
        return first.replace(
            nngp=prod([x.nngp for x in ks]), ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False, is_input=False
        )

    def build(self, in_shape, width, generator, readout):
        shapes = _branches(in_shape, self)
        _same_shapes(shapes, self)
        return _FanInModule("prod"), shapes[0]


class FanInConcat(Layer):
    """Concatenate the branches along ``axis`` (default: the channel axis; ``-1`` is accepted and means the
    channel axis for fully-connected inputs ``(N, features)``).

    Only channel concatenation has a kernel rule here: the result is the width-weighted mean of the
    branch kernels. Concatenating along a spatial axis raises an error.
    """

    def __init__(self, axis: int = 1):
        self.axis = axis

    def _channel_axis(self, ndim: int) -> int:
        ax = self.axis % ndim
        if ax == 0:
            raise LayerError("FanInConcat(axis=0) would concatenate along the batch axis; use axis=1 (channels).")
        if ax != 1:
            raise LayerError(
                f"FanInConcat(axis={self.axis}) concatenates along a spatial axis of "
                f"{ndim}-D activations; only channel concatenation (axis=1) has a kernel rule."
            )
        return ax

    def kernel(self, k):
        ks = _branches(k, self)
        ax = self._channel_axis(len(ks[0].shape1))
        _same_shapes([x.shape1 for x in ks], self, skip_axis=ax)
        widths = [x.width for x in ks]
        total_w = float(sum(widths))

        def mix(name):
            vals = [getattr(x, name) for x in ks]
            if any(v is None for v in vals):
                return None
            return functools.reduce(operator.add, [(w / total_w) * v for w, v in zip(widths, vals)])

        first = ks[0]
        shape1 = (first.shape1[0], int(total_w)) + tuple(first.shape1[2:])
        shape2 = (first.shape2[0], int(total_w)) + tuple(first.shape2[2:])
        return first.replace(
            nngp=mix("nngp"),
            ntk=mix("ntk"),
            cov1=mix("cov1"),
            cov2=mix("cov2"),
            shape1=shape1,
            shape2=shape2,
            # channels of different branches have different laws: a nonlinearity of the
            # mixture is not the mixture of nonlinearities, so a Dense/Conv must come next
            is_gaussian=False,
            is_input=all(x.is_input for x in ks),
        )

    def build(self, in_shape, width, generator, readout):
        shapes = _branches(in_shape, self)
        ax = self._channel_axis(len(shapes[0]) + 1)
        _same_shapes(shapes, self, skip_axis=ax - 1)
        out = list(shapes[0])
        out[ax - 1] = sum(s[ax - 1] for s in shapes)
        return _FanInModule("concat", ax), tuple(out)
