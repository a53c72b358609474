"""Layer normalisation: the finite layer and its infinite-width kernel rule.

Finite layer (NT's ``LayerNorm``): each sample is centred and scaled over ``axis`` (the channel axis, and
optionally spatial axes)::

    y = (x − mean_axis(x)) / √(eps + var_axis(x))

Kernel rule. Over infinitely many i.i.d. channels of zero-mean Gaussian pre-activations the mean tends to 0
and the variance to the sample's own variance ``q`` (averaged over the normalised spatial axes), so (NT,
following the law of large numbers; the normalisation's Jacobian is a rank-two correction whose NTK
contribution vanishes with the width)::

    K'[i, j] = K[i, j] / √((eps + q_i)(eps + q_j)),     Θ'[i, j] = Θ[i, j] / √((eps + q_i)(eps + q_j))

The output is still Gaussian, now with unit variance: what :class:`~ntkit.layers.elementwise_poly.Hermite`
needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError, single, single_shape

__all__ = ["LayerNorm"]


def _resolve_axes(axis: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """Non-negative, sorted axes of an ``ndim``-D ``(N, C, *spatial)`` tensor; one error for each misuse."""
    out = []
    for a in axis:
        if not -ndim <= a < ndim:
            raise LayerError(
                f"LayerNorm(axis={axis}): axis {a} is out of range for {ndim}-D activations "
                f"(batch, channels{', spatial' * (ndim - 2)})."
            )
        out.append(a % ndim)
    out = sorted(set(out))
    if 0 in out:
        raise LayerError(
            f"LayerNorm(axis={axis}) normalises over the batch axis 0, which ntkit does not support "
            f"(it would couple samples); use the channel axis 1 and optionally spatial axes 2, 3, ..."
        )
    if 1 not in out:
        raise LayerError(
            f"LayerNorm(axis={axis}) must normalise over the channel axis 1 (PyTorch layout "
            f"N, C, *spatial) for an infinite-width limit to exist; e.g. axis=1 or axis=(1, 2, 3)."
        )
    return tuple(out)


class _LayerNormModule(nn.Module):
    """``(x − mean) / √(eps + var)`` over ``axis`` of each sample (biased variance, as NT)."""

    def __init__(self, axis: tuple[int, ...], eps: float):
        super().__init__()
        self.axis, self.eps = axis, eps

    def forward(self, x: Tensor) -> Tensor:
        dims = _resolve_axes(self.axis, x.dim())
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return (x - mean) / torch.sqrt((var + self.eps).clamp_min(torch.finfo(x.dtype).tiny))

    def extra_repr(self) -> str:
        return f"axis={self.axis}, eps={self.eps}"


class LayerNorm(Layer):
    """Layer normalisation over ``axis`` (default: the channel axis 1 of PyTorch's ``(N, C, *spatial)``
    layout; NT's default ``axis=-1`` is the same axis in its channels-last layout). See the module docstring
    for the finite layer and the kernel rule.

    Args:
      axis: an int or a tuple of ints; must contain the channel axis 1 and may add spatial axes (e.g.
        ``(1, 2, 3)`` normalises over channels and pixels of an image). The batch axis is not allowed.
      eps: added to the variance before the square root (NT's default ``1e-12``).
    """

    tracks_means = True

    def __init__(self, axis: Union[int, Sequence[int]] = 1, eps: float = 1e-12):
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
            raise ValueError(f"axis={axis!r} must be an int or a non-empty tuple of ints.")
        eps = float(eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps={eps!r} must be a finite number >= 0.")
        self.axis, self.eps = axes, eps

    def _dims(self, k: Kernel) -> tuple[list[int], list[int]]:
        """Dims to average the variances over: in ``k.variances()``'s layout (batch pair first) and in
        ``k.self_variances()``'s (one batch axis). Full-spatial layouts pair each spatial axis with its twin;
        averaging over both members is harmless since one of them has size 1."""
        spatial = [a - 2 for a in _resolve_axes(self.axis, len(k.shape1)) if a >= 2]
        if k.diagonal_spatial or k.spatial_ndim == 0:
            return [2 + t for t in spatial], [1 + t for t in spatial]
        return (
            [d for t in spatial for d in (2 + 2 * t, 3 + 2 * t)],
            [d for t in spatial for d in (1 + 2 * t, 2 + 2 * t)],
        )

    def _scale(self, v: Tensor, dims: list[int]) -> Tensor:
        """``√(eps + mean_dims(v))``; a zero variance with ``eps = 0`` gives a tiny scale, not a 0/0."""
        if dims:
            v = v.mean(dim=dims, keepdim=True)
        return torch.sqrt((v + self.eps).clamp_min(torch.finfo(v.dtype).tiny))

    def kernel(self, k):
        k = single(k, self)
        if not k.is_gaussian:
            where = "the raw inputs" if k.is_input else "non-Gaussian activations (e.g. a nonlinearity's output)"
            raise LayerError(
                f"LayerNorm is applied to {where}; its kernel rule needs zero-mean Gaussian "
                f"pre-activations (as in NT). Put a Dense or Conv layer right before it."
            )
        pair_dims, self_dims = self._dims(k)
        q11, q22 = k.variances()
        den = self._scale(q11, pair_dims) * self._scale(q22, pair_dims)

        def self_cov(which: int) -> Tensor:
            qa, qb = k.self_variances(which)
            cov = k.cov1 if which == 1 else k.cov2
            return cov / (self._scale(qa, self_dims) * self._scale(qb, self_dims))

        out = k.replace(
            nngp=None if k.nngp is None else k.nngp / den,
            ntk=None if k.ntk is None else k.ntk / den,
            cov1=None if k.cov1 is None else self_cov(1),
            cov2=None if k.cov2 is None else self_cov(2),
            is_input=False,
            mean1=None,  # zero-mean Gaussian in (checked above), zero-mean out
            mean2=None,
            mean_kind="exact",
        )
        return out.with_exact_diagonal()

    def build(self, in_shape, width, generator, readout):
        s = single_shape(in_shape, self)
        _resolve_axes(self.axis, len(s) + 1)  # fail early, with the same message as the kernel
        return _LayerNormModule(self.axis, self.eps), s

    def __repr__(self):
        axis = self.axis[0] if len(self.axis) == 1 else self.axis
        return f"LayerNorm(axis={axis}, eps={self.eps})"
