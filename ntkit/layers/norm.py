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
from ntkit.layers.base import Layer, LayerError, LiftOptions, lift_rule, single, single_shape, unsupported

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


# ---------------------------------------------------------------------------------------------------
# lift: BatchNorm in eval mode (untouched running statistics, default affine) is a fixed scaling
# ---------------------------------------------------------------------------------------------------
class _ScaleModule(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class BatchNormEval(Layer):
    """``nn.BatchNorm*d`` in eval mode with running mean 0, running variance 1, weight 1 and bias 0: the map
    ``y = x / √(1 + eps)``, a fixed scaling ``s``. Exactly ``K' = s² K``, means ``s μ``, Gaussianity and branch
    independence unchanged (a fixed linear map of each channel). ``Θ' = s² Θ``: the affine parameters ``γ, β``
    are held at their values (their own NTK contribution is not included). Any other running statistics make
    the map channel-dependent and any train-mode BatchNorm couples the samples of a batch, so neither has a
    per-pair kernel (:func:`ntkit.lift` refuses them)."""

    tracks_means = True

    def __init__(self, eps: float = 1e-5):
        self.eps = float(eps)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(1.0 + self.eps)

    def kernel(self, k):
        k = single(k, self)
        s2, s = self.scale**2, self.scale

        def sc(t, c):
            return None if t is None else t * c

        return k.replace(
            nngp=sc(k.nngp, s2),
            ntk=sc(k.ntk, s2),
            cov1=sc(k.cov1, s2),
            cov2=sc(k.cov2, s2),
            var1=sc(k.var1, s2),
            var2=sc(k.var2, s2),
            mean1=sc(k.mean1, s),
            mean2=sc(k.mean2, s),
            is_input=False,
        )

    def build(self, in_shape, width, generator, readout):
        return _ScaleModule(self.scale), single_shape(in_shape, self)

    def __repr__(self):
        return f"BatchNormEval(eps={self.eps})"


@lift_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _lift_batchnorm(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.BatchNorm*d`` -> :class:`BatchNormEval` when it is the fixed map ``x/√(1+eps)`` (eval mode, untouched
    running statistics, default affine); otherwise a :class:`~ntkit.layers.base.LiftError` saying why."""
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    if m.training or not m.track_running_stats or m.running_mean is None or m.running_var is None:
        raise unsupported(
            m,
            "BatchNorm in train mode (or without running statistics) normalises with the statistics of the batch, "
            "which couples the samples: there is no per-pair infinite-width kernel. Call model.eval() first "
            "(with untouched running statistics the eval-mode BatchNorm lifts exactly).",
        )
    with torch.no_grad():
        stats_ok = bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())
        affine_ok = not m.affine or (bool((m.weight == 1).all()) and bool((m.bias == 0).all()))
    if not stats_ok:
        raise unsupported(
            m,
            "its running statistics were updated (running_mean != 0 or running_var != 1): the eval-mode map then "
            "shifts and scales every channel by its own trained statistics, which have no infinite-width limit "
            "at initialisation. Reset them (module.reset_running_stats()) to lift the model at initialisation.",
        )
    if not affine_ok:
        raise unsupported(
            m,
            "its affine weight/bias differ from the default (1, 0): per-channel trained values have no "
            "infinite-width limit. Reset them (module.reset_parameters()) to lift the model at initialisation.",
        )
    return BatchNormEval(m.eps)
