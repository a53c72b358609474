"""Pooling and flattening: ``AvgPool``, ``SumPool``, ``GlobalAvgPool``, ``GlobalSumPool``, ``Flatten``.

Pooling is linear with fixed weights, so it maps the full pixel-pixel covariance by the same window on
each side (Novak et al. 2019; Arora et al. 2019). For one spatial axis with window ``w``, stride ``σ``::

    SumPool:  K'[y, y'] = Σ_{d, d' < w} K[σy + d, σy' + d']         (separable: one pass per axis and side)
    AvgPool:  K'[y, y'] = SumPool(K)[y, y'] / w²                     (NT's default: padded zeros count)
    GlobalAvgPool: K' = mean over all pixel pairs (y, y');   GlobalSumPool: the sum

The NTK follows the same rule (pooling has no parameters). These layers need the full covariance:
they set ``needs_full_spatial``, and a network containing one tracks it from the inputs on.

``Flatten`` reshapes ``(N, C, *S)`` to ``(N, C·|S|)``; the covariance of the flattened vector, averaged over
its entries as the next Dense layer sees it, is the mean over pixels of the same-pixel covariance
``K[y, y]`` (NT's convention). On fully-connected inputs ``(N, d)`` it is the identity.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit import _compile
from ntkit.kernel import Kernel
from ntkit.layers.base import (
    FeatureMap,
    Features,
    FeatureSpec,
    Lambda,
    Layer,
    LayerError,
    LiftOptions,
    lift_rule,
    single,
    single_shape,
    unsupported,
)
from ntkit.layers.conv import (
    AxisWindow,
    IntOrTuple,
    PaddingArg,
    _as_tuple,
    check_padding,
    pad_spatial,
    plan_windows,
    spatial_axes,
    window_sum,
)
from ntkit.layers.masking import position_masks

__all__ = ["AvgPool", "SumPool", "GlobalAvgPool", "GlobalSumPool", "Flatten", "PoolModule"]


def _fields(k: Kernel):
    """``(name, tensor, batch_ndim)`` for the kernel's present covariances."""
    for name, nd in (("nngp", 2), ("ntk", 2), ("cov1", 1), ("cov2", 1)):
        t = getattr(k, name)
        if t is not None:
            yield name, t, nd


def _tiled_pool_fused(t: Tensor, sizes: tuple, nd: int, scale: float) -> Tensor:
    """The sum pool of a full pixel-pair covariance (``nd`` batch axes, then ``(s_a, s_a')`` pairs) whose
    windows of ``sizes`` tile every axis without overlap or padding, times ``scale``: the passes of
    :meth:`_Pool.kernel` in the same order (axis by axis, each side), compiled into one call by
    :func:`ntkit._compile.fused` (2.3× faster than the eager passes on a 17 × 17 tile of 8×8 images, a script
    outside the repository)."""
    for a, w in enumerate(sizes):
        for side in (0, 1):
            ax = nd + 2 * a + side
            acc = t[(slice(None),) * ax + (slice(0, None, w),)]
            for d in range(1, w):
                acc = acc + t[(slice(None),) * ax + (slice(d, None, w),)]
            t = acc
    return t * scale if scale != 1.0 else t


def _need_full(k: Kernel, layer: Layer) -> None:
    if k.spatial_ndim == 0:
        raise LayerError(
            f"{type(layer).__name__} pools spatial axes but its input has none "
            f"(per-sample shape {k.shape1[1:]}); remove it or move it before Flatten/GlobalAvgPool."
        )
    if k.diagonal_spatial:
        raise LayerError(
            f"{type(layer).__name__} needs the full pixel-pixel covariance, but the kernel tracks only the "
            f"diagonal. Call it through a network (serial(...).kernel_fn), which tracks the full covariance "
            f"whenever a pooling layer is present."
        )


def _edge_counts(w: AxisWindow, dtype, device) -> Tensor:
    """Number of real (non-padding) pixels in each of the ``n_out`` windows of one axis."""
    ones = torch.zeros(w.n_in + w.lo + w.hi, dtype=dtype, device=device)
    ones[w.lo : w.lo + w.n_in] = 1
    return ones.unfold(0, w.size, w.stride)[: w.n_out].sum(-1)


class PoolModule(nn.Module):
    """Finite twin of :class:`AvgPool` / :class:`SumPool` (explicit padding, then a strided window sum)."""

    def __init__(self, wins: Sequence[AxisWindow], average: bool, normalize_edges: bool):
        super().__init__()
        self.wins, self.average, self.normalize_edges = tuple(wins), average, normalize_edges

    def forward(self, x: Tensor) -> Tensor:
        xp = pad_spatial(x, self.wins)
        ks = tuple(w.size for w in self.wins)
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(ks)]
        stride = tuple(w.stride for w in self.wins)
        y = pool(xp, ks, stride)  # mean over the padded window
        if not self.average:
            return y * math.prod(ks)
        if self.normalize_edges and not any(w.circular for w in self.wins):
            mask = pad_spatial(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), self.wins)
            y = y / pool(mask, ks, stride)  # mean over the real pixels only
        return y

    def extra_repr(self) -> str:
        return (
            f"{'avg' if self.average else 'sum'}, window={tuple(w.size for w in self.wins)}, "
            f"stride={tuple(w.stride for w in self.wins)}"
        )


class _Pool(Layer):
    needs_full_spatial = True
    tracks_means = True
    _average = True

    def __init__(
        self,
        window_shape: IntOrTuple,
        strides: Optional[IntOrTuple] = None,
        padding: PaddingArg = "VALID",
        normalize_edges: bool = False,
    ):
        name = type(self).__name__
        self.window_shape = _as_tuple(window_shape, "window_shape", name)
        self._int_window = isinstance(window_shape, int)
        self.strides = _as_tuple(strides, "strides", name)
        self.padding, _ = check_padding(padding, "zeros", name)
        self.normalize_edges = bool(normalize_edges)

    def input_rank(self) -> Optional[int]:
        return None if self._int_window else len(self.window_shape) + 2

    def _plan(self, shape: Sequence[int]) -> list[AxisWindow]:
        name = f"{type(self).__name__}(window_shape={self.window_shape}, padding={self.padding!r})"
        spatial = tuple(shape[1:])
        rank = self.input_rank()
        if not spatial or (rank is not None and len(spatial) != rank - 2) or len(spatial) > 3:
            raise LayerError(
                f"{name} needs activations with {rank - 2 if rank else '1 to 3'} spatial axes "
                f"(channels first) but got per-sample shape {tuple(shape)}."
            )
        return plan_windows(spatial, self.window_shape, self.strides, self.padding, "zeros", name)

    def kernel(self, k):
        k = single(k, self)
        _need_full(k, self)
        wins = self._plan(k.shape1[1:])
        edges = self._average and self.normalize_edges and self.padding != "CIRCULAR"
        # the average's 1/Π w² is applied in the last pass, on the smallest tensor
        scale = 1.0 / math.prod(w.size**2 for w in wins) if (self._average and not edges) else 1.0
        passes = [(a, side) for a in range(len(wins)) for side in (0, 1)]
        tiled = not edges and all(w.stride == w.size and w.lo == w.hi == 0 and w.n_in == w.size * w.n_out for w in wins)
        out = {}
        for name, t, nd in _fields(k):
            if tiled and _compile.compile_enabled() and _compile.worth_compiling(t):
                # ntkit.compiled(): the passes of a pool whose windows tile the image, as one compiled call
                sizes = tuple(w.size for w in wins)
                out[name] = _compile.fused(_tiled_pool_fused, t, sizes, nd, scale, batch_dims=nd)
                continue
            for i, (a, side) in enumerate(passes):
                t = window_sum(t, (nd + 2 * a + side,), wins[a], scale if i == len(passes) - 1 else 1.0)
            if edges:
                for a, w in enumerate(wins):
                    inv = 1.0 / _edge_counts(w, t.dtype, t.device)
                    for ax in spatial_axes(nd, a, True):
                        shape = [1] * t.dim()
                        shape[ax] = w.n_out
                        t = t * inv.reshape(shape)
            out[name] = t
        for name in ("mean1", "mean2"):  # the means (N, *s) pool linearly, once (one side)
            m = getattr(k, name)
            if m is None:
                continue
            mscale = 1.0 / math.prod(w.size for w in wins) if (self._average and not edges) else 1.0
            for a, w in enumerate(wins):
                m = window_sum(m, (1 + a,), w, mscale if a == len(wins) - 1 else 1.0)
                if edges:
                    shape = [1] * m.dim()
                    shape[1 + a] = w.n_out
                    m = m * (1.0 / _edge_counts(w, m.dtype, m.device)).reshape(shape)
            out[name] = m
        spatial = tuple(w.n_out for w in wins)
        return k.replace(**out, shape1=k.shape1[:2] + spatial, shape2=k.shape2[:2] + spatial)

    def build(self, in_shape, width, generator, readout):
        s = single_shape(in_shape, self)
        wins = self._plan(s)
        return PoolModule(wins, self._average, self.normalize_edges), (s[0],) + tuple(w.n_out for w in wins)

    def random_features(self, spec: FeatureSpec, generator: torch.Generator) -> tuple[FeatureMap, FeatureSpec]:
        """Pooling is linear with fixed weights: ``f' = pool(f)``, ``θ' = pool(θ)`` (the finite twin's window
        sums, per feature channel) give ``f'[y]·f''[y'] = Σ_{d,d'} w_d w_d' K[σy + d, σy' + d']``, the rule of
        the module docstring, exactly; see :mod:`ntkit.random_features`."""
        wins = self._plan((spec.dim,) + tuple(spec.spatial))
        pool = PoolModule(wins, self._average, self.normalize_edges)

        def fmap(feats: Features) -> Features:
            feats = feats.resolved()
            return Features(pool(feats.f), None if feats.theta is None else pool(feats.theta))

        return fmap, dataclasses.replace(spec, spatial=tuple(w.n_out for w in wins))

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.window_shape}, strides={self.strides}, padding={self.padding!r}"
            + (", normalize_edges=True" if self.normalize_edges else "")
            + ")"
        )


class AvgPool(_Pool):
    """Average pooling ``AvgPool(window_shape, strides=None, padding="VALID", normalize_edges=False)``.

    NT's ``stax.AvgPool``: ``strides=None`` means stride 1 (unlike ``torch.nn.AvgPool2d``, whose default
    stride is the window). ``normalize_edges=False`` divides by the full window, padded zeros included
    (``torch``'s ``count_include_pad=True``); ``True`` by the number of real pixels at the edges.
    Padding: ``"VALID"``, ``"SAME"``, ``"CIRCULAR"`` or explicit ints (as torch). Rule: module docstring.
    """


class SumPool(_Pool):
    """Sum pooling ``SumPool(window_shape, strides=None, padding="VALID")`` (NT's ``stax.SumPool``)."""

    _average = False

    def __init__(self, window_shape: IntOrTuple, strides: Optional[IntOrTuple] = None, padding: PaddingArg = "VALID"):
        super().__init__(window_shape, strides, padding, False)


class _GlobalPool(Layer):
    needs_full_spatial = True
    tracks_means = True
    _average = True

    def kernel(self, k):
        k = single(k, self)
        _need_full(k, self)
        out = {}
        p1, p2 = position_masks(k, repr(self)) if self._average else (None, None)
        if p1 is not None:
            assert p2 is not None, "position_masks gives both sides"
            return self._masked_average(k, p1, p2)
        for name, t, nd in _fields(k):
            dims = tuple(range(nd, t.dim()))
            out[name] = t.mean(dims) if self._average else t.sum(dims)
        for name in ("mean1", "mean2"):
            m = getattr(k, name)
            if m is not None:
                dims = tuple(range(1, m.dim()))
                out[name] = m.mean(dims) if self._average else m.sum(dims)
        return k.replace(**out, shape1=k.shape1[:2], shape2=k.shape2[:2], diagonal_spatial=True)

    def _masked_average(self, k: Kernel, p1: Tensor, p2: Tensor) -> Kernel:
        """NT's masked mean (``mean_and_var(..., mask=)``): the sum over all pixel pairs divided by the number of
        pairs whose pixels are both unmasked, ``K' = Σ_{y, y'} K[y, y'] / max(n_1 n_2, 1)`` (``n``: a sample's
        unmasked positions; the masked ones are zero in ``K``)."""
        n1 = (~p1).reshape(p1.shape[0], -1).sum(-1).to(k.dtype)
        n2 = (~p2).reshape(p2.shape[0], -1).sum(-1).to(k.dtype)
        n12 = n1[:, None] * n2[None, :]
        count = {"nngp": n12, "ntk": n12, "cov1": n1 * n1, "cov2": n2 * n2}
        out = {}
        for name, t, nd in _fields(k):
            out[name] = t.sum(tuple(range(nd, t.dim()))) / count[name].clamp_min(1)
        for name, n in (("mean1", n1), ("mean2", n2)):
            m = getattr(k, name)
            if m is not None:
                out[name] = m.sum(tuple(range(1, m.dim()))) / n.clamp_min(1)
        return k.replace(**out, shape1=k.shape1[:2], shape2=k.shape2[:2], diagonal_spatial=True)

    def build(self, in_shape, width, generator, readout):
        s = single_shape(in_shape, self)
        if len(s) < 2:
            raise LayerError(
                f"{type(self).__name__} pools spatial axes but its input has per-sample shape "
                f"{tuple(s)} (no spatial axes)."
            )
        red = torch.mean if self._average else torch.sum
        return Lambda(lambda x: red(x, dim=tuple(range(2, x.dim()))), repr(self)), (s[0],)

    def random_features(self, spec: FeatureSpec, generator: torch.Generator) -> tuple[FeatureMap, FeatureSpec]:
        """``f' = mean_y f[y]`` (or the sum), ``θ'`` alike: ``f'·f'' = mean_{y,y'} K[y, y']`` exactly."""
        if not spec.spatial:
            raise LayerError(f"{type(self).__name__} pools spatial axes but its random features have none.")
        average = self._average

        def red(x: Tensor) -> Tensor:
            dims = tuple(range(2, x.dim()))
            return x.mean(dims) if average else x.sum(dims)

        def fmap(feats: Features) -> Features:
            feats = feats.resolved()
            return Features(red(feats.f), None if feats.theta is None else red(feats.theta))

        return fmap, dataclasses.replace(spec, spatial=())

    def __repr__(self):
        return f"{type(self).__name__}()"


class GlobalAvgPool(_GlobalPool):
    """Mean over all spatial axes, ``(N, C, *S) → (N, C)``: ``K' = mean_{y, y'} K[y, y']``."""


class GlobalSumPool(_GlobalPool):
    """Sum over all spatial axes, ``(N, C, *S) → (N, C)``: ``K' = Σ_{y, y'} K[y, y']``."""

    _average = False


class Flatten(Layer):
    """``(N, C, *S) → (N, C·|S|)`` (channels-first, as ``torch.nn.Flatten``); identity on ``(N, d)``.

    Kernel: ``K' = mean_y K[y, y]`` (the same-pixel covariance averaged over pixels); the result is not
    Gaussian with i.i.d. entries (pixels differ), so a Dense layer must follow before a nonlinearity.
    """

    tracks_means = True

    def kernel(self, k):
        k = single(k, self)
        if k.spatial_ndim == 0:
            return k
        out = {}
        for name, t, nd in _fields(k):
            if not k.diagonal_spatial:
                for _ in range(k.spatial_ndim):
                    t = torch.diagonal(t, dim1=nd, dim2=nd + 1)  # the pair (a, a') -> its diagonal, last
            out[name] = t.mean(tuple(range(nd, t.dim())))
        for name in ("mean1", "mean2"):  # flattened channel (c, p) has the mean of pixel p: they differ
            m = getattr(k, name)
            if m is not None:
                out[name] = m.mean(tuple(range(1, m.dim())))
        kind = k.mean_kind if (k.mean1 is None or k.mean_kind == "unknown") else "varying"
        c = math.prod(k.shape1[1:])
        return k.replace(
            **out,
            shape1=(k.shape1[0], c),
            shape2=(k.shape2[0], c),
            diagonal_spatial=True,
            is_gaussian=False,
            mean_kind=kind,
        )

    def build(self, in_shape, width, generator, readout):
        s = single_shape(in_shape, self)
        return nn.Flatten(), (math.prod(s),)

    def random_features(self, spec: FeatureSpec, generator: torch.Generator) -> tuple[FeatureMap, FeatureSpec]:
        """``f' = flatten(f)/√|S|`` (``θ'`` alike): ``f'·f'' = mean_y K[y, y]``, the rule above, exactly."""
        if not spec.spatial:
            return (lambda feats: feats), spec
        size = math.prod(spec.spatial)
        root = math.sqrt(size)

        def fmap(feats: Features) -> Features:
            feats = feats.resolved()
            theta = None if feats.theta is None else feats.theta.flatten(1) / root
            return Features(feats.f.flatten(1) / root, theta)

        out = dataclasses.replace(spec, dim=spec.dim * size, ntk_dim=spec.ntk_dim * size, spatial=(), gaussian=False)
        return fmap, out

    def __repr__(self):
        return "Flatten()"


# ---------------------------------------------------------------------------------------------------
# lift: torch pooling modules
# ---------------------------------------------------------------------------------------------------
@lift_rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _lift_avg_pool(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.AvgPool{1,2,3}d`` -> ``AvgPool`` (torch's default stride is the window, as ``m.stride`` holds)."""
    rank = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]

    def tup(v) -> tuple:
        return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * rank

    if getattr(m, "ceil_mode", False) or getattr(m, "divisor_override", None) is not None:
        raise unsupported(m, "ceil_mode=True and divisor_override have no kernel rule; use the defaults.")
    pad = tup(m.padding)
    return AvgPool(
        tup(m.kernel_size),
        strides=tup(m.stride or m.kernel_size),
        padding=pad if any(pad) else "VALID",
        normalize_edges=not m.count_include_pad and any(pad),
    )


@lift_rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _lift_adaptive_avg_pool(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.AdaptiveAvgPool{1,2,3}d(1)`` -> ``GlobalAvgPool`` (other output sizes are not supported)."""
    out = m.output_size
    size = out if isinstance(out, (tuple, list)) else (out,)
    if any(s != 1 for s in size):
        raise unsupported(m, "only output_size=1 (global average pooling) is supported.")
    return GlobalAvgPool()


@lift_rule(nn.Flatten)
def _lift_flatten(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.Flatten)
    if m.start_dim != 1 or m.end_dim != -1:
        raise unsupported(m, "only nn.Flatten(start_dim=1, end_dim=-1) is supported.")
    return Flatten()
