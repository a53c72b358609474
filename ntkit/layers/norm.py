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
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError, LiftOptions, lift_rule, single, single_shape, unsupported
from ntkit.layers.masking import position_masks

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

    def _scale(self, v: Tensor, dims: list[int], keep: Optional[Tensor] = None) -> Tensor:
        """``√(eps + mean_dims(v))``; a zero variance with ``eps = 0`` gives a tiny scale, not a 0/0. With masks
        (``keep``: ``True`` at unmasked positions, broadcast like ``v``) the mean is over the unmasked positions,
        as the finite layer's masked mean and variance (NT's ``mean_and_var(..., mask=)``)."""
        if dims and keep is not None:
            keep = keep.expand(v.shape)
            n = keep.sum(dim=dims, keepdim=True).clamp_min(1).to(v.dtype)
            v = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device)).sum(dim=dims, keepdim=True) / n
        elif dims:
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
        # masks (NT's mask_constant) matter when spatial axes are normalised: the mean is over unmasked positions
        p1, p2 = position_masks(k, repr(self)) if pair_dims else (None, None)
        keep = [None] * 4
        if p1 is not None:
            assert p2 is not None, "position_masks gives both sides"
            keep = [k._outer_view(~p1, 0, True), k._outer_view(~p2, 1, True)]
            keep += [k._outer_view(~p, side, False) for p, side in ((p1, 0), (p1, 1))]
        den = self._scale(q11, pair_dims, keep[0]) * self._scale(q22, pair_dims, keep[1])

        def self_cov(which: int) -> Tensor:
            qa, qb = k.self_variances(which)
            cov = k.cov1 if which == 1 else k.cov2
            ka, kb = keep[2:]
            if which == 2 and p2 is not None:
                ka, kb = k._outer_view(~p2, 0, False), k._outer_view(~p2, 1, False)
            return cov / (self._scale(qa, self_dims, ka) * self._scale(qb, self_dims, kb))

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
    carries_law = True  # the residual-stream program, scaled (ntkit.layers.residual_law)

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
            law=None if k.law is None else k.law.scaled(s),
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


# ---------------------------------------------------------------------------------------------------
# lift: LayerNorm, GroupNorm, InstanceNorm on (N, C, *spatial)
# ---------------------------------------------------------------------------------------------------
class ChannelSpatialNorm(LayerNorm):
    """:class:`LayerNorm` over every non-batch axis (the channels and all spatial axes), whatever the input's
    rank: the limit of ``nn.GroupNorm(G, C)`` for fixed ``G`` as ``C → ∞`` (each group of ``C/G → ∞`` i.i.d.
    channels is normalised over its channels and positions, which tends to the same mean 0 and variance — the
    pre-activation variance averaged over the positions — for every group)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__(axis=1, eps=eps)

    def _full(self, ndim: int) -> LayerNorm:
        return LayerNorm(tuple(range(1, ndim)), self.eps)

    def kernel(self, k):
        return self._full(len(single(k, self).shape1)).kernel(k)

    def build(self, in_shape, width, generator, readout):
        return self._full(len(single_shape(in_shape, self)) + 1).build(in_shape, width, generator, readout)

    def __repr__(self):
        return f"ChannelSpatialNorm(eps={self.eps})"


def _default_affine(m: nn.Module) -> bool:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    with torch.no_grad():
        return (w is None or bool((w == 1).all())) and (b is None or bool((b == 0).all()))


_AFFINE_WHY = (
    "its affine weight/bias differ from PyTorch's init (1, 0): per-channel values then scale and shift every "
    "channel differently, which has no infinite-width limit of its own (the law of those values as the channels "
    "grow is not fixed by a finite model). Fix: module.reset_parameters() to lift the model at initialisation."
)


@lift_rule(nn.LayerNorm)
def _lift_layernorm(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.LayerNorm(normalized_shape)`` on ``(N, C, *spatial)``: normalises the last ``len(normalized_shape)``
    axes, i.e. :class:`LayerNorm` over ``axis = (−k, …, −1)``; these must include the channel axis 1
    (``normalized_shape = (C,)`` on ``(N, C)``, ``(C, H, W)`` on images; checked when the kernel is computed).
    Affine parameters at their init (1, 0) are exact; other values are refused."""
    assert isinstance(m, nn.LayerNorm)
    if not _default_affine(m):
        raise unsupported(m, _AFFINE_WHY)
    k = len(m.normalized_shape)
    return LayerNorm(axis=tuple(range(-k, 0)), eps=float(m.eps))


@lift_rule(nn.GroupNorm)
def _lift_groupnorm(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.GroupNorm(G, C)`` with ``G < C`` -> :class:`ChannelSpatialNorm` (exact in the limit ``C → ∞`` at
    fixed ``G``); ``G = C`` (one channel per group, InstanceNorm) is refused."""
    assert isinstance(m, nn.GroupNorm)
    if m.num_groups == m.num_channels:
        raise unsupported(
            m,
            f"num_groups == num_channels ({m.num_groups}): every channel is normalised alone over its own positions "
            f"(InstanceNorm). Its output is a nonlinear function of a fixed, finite number of Gaussian values per "
            f"channel, whose kernel has no closed form in ntkit (and without spatial axes it is identically 0). Fix: "
            f"fewer groups (num_groups < num_channels: the limit is a LayerNorm over channels and positions), or "
            f"nn.LayerNorm / nn.BatchNorm in eval mode.",
        )
    if not _default_affine(m):
        raise unsupported(m, _AFFINE_WHY)
    return ChannelSpatialNorm(float(m.eps))


@lift_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _lift_instancenorm(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.InstanceNorm*d``: refused (see the message), except in eval mode with untouched running statistics
    (``track_running_stats=True``), where it is the fixed scaling ``x/√(1 + eps)`` (:class:`BatchNormEval`)."""
    assert isinstance(m, nn.modules.instancenorm._InstanceNorm)
    if not m.training and m.track_running_stats and m.running_mean is not None and m.running_var is not None:
        with torch.no_grad():
            untouched = bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())
        if untouched and _default_affine(m):
            return BatchNormEval(m.eps)
    raise unsupported(
        m,
        "InstanceNorm normalises every channel over its own positions: its output is a nonlinear function of a "
        "fixed, finite number of Gaussian values per channel (the pixels), whose kernel has no closed form in ntkit. "
        "Fix: nn.GroupNorm(num_groups < C, C) or nn.LayerNorm over channels and positions (whose limit ntkit has), "
        "or nn.BatchNorm in eval mode.",
    )
