"""Convolution ``Conv`` in 1-D, 2-D and 3-D (PyTorch layouts NCW / NCHW / NCDHW), and the windowed-sum
primitive that convolutions and poolings share.

Kernel rule (Novak et al. 2019, "Bayesian deep CNNs with many channels are Gaussian processes";
Garriga-Alonso et al. 2019; Arora et al. 2019, "On exact computation with an infinitely wide neural net").
For a filter of spatial shape ``F`` (``|F|`` pixels), strides ``σ`` and ``C`` input channels, let ``T`` be
the *patch mean over joint shifts*::

    T(K)[y, y'] = (1/|F|) Σ_{d ∈ F} K[σy + d, σy' + d]

(``K`` is zero outside the image for zero padding, indices wrap for CIRCULAR). Then

* NTK parameterisation: ``nngp' = W_std² T(nngp) + b_std²`` and ``ntk' = W_std² T(ntk) + nngp'``;
* standard parameterisation: ``nngp'`` as above and ``ntk' = C|F| T(nngp) + W_std² T(ntk) + [1 if bias]``.

With only the diagonal pixel covariance tracked (``y = y'``), ``T`` is a windowed mean of ``K[y, y]``.

``T`` is separable: the joint shift over a ``f_1 × f_2`` filter is a joint shift of the ``(y_1, y'_1)`` axis
pair followed by one of ``(y_2, y'_2)``, so a 3×3 convolution costs 3 + 3 shifted additions per entry of
the covariance, not 9 (and no multiplications by the zeros of an identity filter). Each addition is one
tensor op over the whole tile of input pairs. For stride 1 and SAME padding (the common case) a joint shift
is a constant offset in memory: the op runs over long contiguous stretches, with a small cached 0/1 mask
dropping the terms that fall outside the image (1.9× faster per conv layer than strided views on 8×8
images, 1.2× on 32×32); scale factors and the NTK's ``+ nngp'`` are folded into the first and last passes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import (
    FeatureMap,
    Features,
    FeatureSpec,
    Layer,
    LayerError,
    LiftOptions,
    LinearUse,
    PendingAffine,
    gaussian,
    lift_rule,
    single,
    single_shape,
    unsupported,
)
from ntkit.layers.dense import check_parameterization, check_s, check_std

__all__ = [
    "Conv",
    "ConvModule",
    "AxisWindow",
    "plan_windows",
    "window_sum",
    "window_sums",
    "pad_spatial",
    "patches",
    "conv_cotangents",
    "PADDINGS",
]

PADDINGS = ("VALID", "SAME", "CIRCULAR")

IntOrTuple = Union[int, Sequence[int]]
PaddingArg = Union[str, int, Sequence[int]]


# ---------------------------------------------------------------------------------------------------
# argument checking and per-axis window plans
# ---------------------------------------------------------------------------------------------------
@overload
def _as_tuple(v: IntOrTuple, name: str, layer: str, allow_zero: bool = False) -> tuple: ...
@overload
def _as_tuple(v: Optional[IntOrTuple], name: str, layer: str, allow_zero: bool = False) -> Optional[tuple]: ...
def _as_tuple(v: Optional[IntOrTuple], name: str, layer: str, allow_zero: bool = False) -> Optional[tuple]:
    if v is None:
        return None
    vals = (v,) if isinstance(v, int) else tuple(v)
    low = 0 if allow_zero else 1
    if not vals or len(vals) > 3 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in vals):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(
            f"{layer}: {name}={v!r} must be a {kind} int or a tuple of 1 to 3 {kind} ints (one per spatial axis)."
        )
    return vals


def check_padding(padding: PaddingArg, padding_mode: str, layer: str) -> tuple[Union[str, tuple], str]:
    """Normalise ``padding`` to ``"VALID"|"SAME"|"CIRCULAR"`` or a tuple of explicit symmetric pads."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in PADDINGS:
            raise ValueError(
                f"{layer}: padding={padding!r}; choose 'VALID', 'SAME', 'CIRCULAR' or explicit "
                f"non-negative ints (pixels added on both sides, as torch.nn.Conv2d)."
            )
        out: Union[str, tuple] = p
    else:
        out = _as_tuple(padding, "padding", layer, allow_zero=True)
    mode = padding_mode.lower()
    if mode not in ("zeros", "circular"):
        raise ValueError(
            f"{layer}: padding_mode={padding_mode!r}; choose 'zeros' or 'circular' "
            f"(the kernel rules of 'reflect'/'replicate' are not implemented)."
        )
    return out, mode


@dataclasses.dataclass(frozen=True)
class AxisWindow:
    """How one spatial axis is windowed: ``n_out`` windows of ``size`` pixels, ``stride`` apart, over the
    input padded by ``lo``/``hi`` pixels (zeros, or wrapped around when ``circular``)."""

    size: int
    stride: int
    lo: int
    hi: int
    circular: bool
    n_in: int
    n_out: int

    @property
    def trivial(self) -> bool:
        return self.size == 1 and self.stride == 1 and self.lo == 0 and self.hi == 0


def _expand(v: Optional[tuple], n: int, default: int, name: str, layer: str) -> tuple:
    if v is None:
        return (default,) * n
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise LayerError(f"{layer}: {name} has {len(v)} entries but the input has {n} spatial axes.")
    return v


def plan_windows(
    spatial: Sequence[int],
    window: tuple,
    strides: Optional[tuple],
    padding: Union[str, tuple],
    padding_mode: str,
    layer: str,
) -> list[AxisWindow]:
    """Per-axis windows with the padding rules of ``lax.padtype_to_pads`` (NT) and ``torch.nn.Conv*``.

    SAME: ``n_out = ceil(n / σ)``, total padding ``max((n_out − 1)σ + f − n, 0)``, the extra pixel at the end.
    VALID: ``n_out = floor((n − f)/σ) + 1``. CIRCULAR: SAME's padding, filled by wrapping around.
    Explicit ``p``: ``p`` pixels on both sides, ``n_out = floor((n + 2p − f)/σ) + 1``.
    """
    n = len(spatial)
    if isinstance(padding, int):
        padding = (padding,)
    window = _expand(window, n, 1, "the window/kernel size", layer)
    strides = _expand(strides, n, 1, "strides", layer)
    explicit = None if isinstance(padding, str) else _expand(padding, n, 0, "padding", layer)
    out = []
    for a, (size, f, s) in enumerate(zip(spatial, window, strides)):
        circular = padding == "CIRCULAR" or (explicit is not None and padding_mode == "circular")
        if explicit is not None:
            lo = hi = explicit[a]
            if 2 * lo + size < f:
                raise LayerError(
                    f"{layer}: window {f} is larger than spatial axis {a} of size {size} plus padding "
                    f"{lo}+{lo}; the output would be empty. Use more padding, 'SAME', or a smaller window."
                )
            n_out = (size + 2 * lo - f) // s + 1
        elif padding == "VALID":
            if f > size:
                raise LayerError(
                    f"{layer}: window {tuple(window)} is larger than the input's spatial shape "
                    f"{tuple(spatial)} with padding='VALID' (the output would be empty); use padding='SAME' "
                    f"or a smaller window."
                )
            lo = hi = 0
            n_out = (size - f) // s + 1
        else:  # SAME / CIRCULAR
            n_out = -(-size // s)
            total = max((n_out - 1) * s + f - size, 0)
            lo, hi = total // 2, total - total // 2
        out.append(AxisWindow(f, s, lo, hi, circular and (lo + hi) > 0, size, n_out))
    return out


# ---------------------------------------------------------------------------------------------------
# the windowed-sum primitive
# ---------------------------------------------------------------------------------------------------
def _wrap_pad(x: Tensor, axes: Sequence[int], lo: int, hi: int, n: int) -> Tensor:
    """Pad ``axes`` by wrapping around (any amount, also more than the axis length)."""
    idx = torch.arange(-lo, n + hi, device=x.device) % n
    for ax in axes:
        x = x.index_select(ax, idx)
    return x


# contiguous rows shorter than this are grouped (``k`` rows of the outer dimension into one) so that every
# tensor op runs over long contiguous stretches; masks stay this small
_MIN_ROW = 512
_GROUP_ROW = 8192
_MASKS: dict = {}
#: use the masked-offset fast path for stride-1 SAME windows (False: strided views only; for benchmarks/tests)
FAST_SAME = True


def _shift_mask(sizes: tuple, shifted: tuple, delta: int, k: int, dtype, device) -> Tensor:
    """0/1 mask ``(k·|block|, 1)`` over a block of dims ``sizes`` (tiled ``k`` times): 1 where every
    shifted index ``y`` satisfies ``0 <= y + delta < n``. Cached (masks are small and reused every layer)."""
    key = (sizes, shifted, delta, k, dtype, device)
    m = _MASKS.get(key)
    if m is None:
        m = torch.ones(sizes, dtype=torch.bool)
        for i in shifted:
            n = sizes[i]
            ok = (torch.arange(n) + delta >= 0) & (torch.arange(n) + delta < n)
            shape = [1] * len(sizes)
            shape[i] = n
            m = m & ok.reshape(shape)
        m = m.reshape(-1).repeat(k).to(dtype=dtype, device=device)[:, None]  # (k·|block|, 1)
        if len(_MASKS) > 256:
            _MASKS.clear()
        _MASKS[key] = m
    return m


def _window_sum_same(x: Tensor, axes: Sequence[int], w: AxisWindow, alpha: float, base: Optional[Tensor]) -> Tensor:
    """Fast path of :func:`window_sum` for stride 1 and zero padding that keeps the size (SAME).

    A joint shift by ``δ`` of the axes in ``axes`` is a constant offset ``δ·Σ strides`` in memory, so each
    term is one multiply-add of two long contiguous stretches and a small 0/1 mask that removes the terms
    falling outside the image (which wrap into neighbouring rows or blocks). No padding is materialised
    and no op runs over short strided rows.
    """
    # autograd records through x or base: no out= variants (the in-place updates of views below are fine)
    recording = torch.is_grad_enabled() and (x.requires_grad or (base is not None and base.requires_grad))
    if not x.is_contiguous():
        # e.g. the input Gram matrix (a permuted GEMM result): one copy, scaled on the way
        if recording:
            x = (x * alpha if alpha != 1.0 else x).contiguous()
        else:
            xc = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            x = torch.mul(x, alpha, out=xc) if alpha != 1.0 else xc.copy_(x)
        alpha = 1.0
    shape = tuple(x.shape)
    first, last = min(axes), max(axes)
    r = math.prod(shape[:first])
    shifted = tuple(ax - first for ax in axes)
    step = sum(x.stride(ax) for ax in axes)
    t = math.prod(shape[last + 1 :])
    k = 1
    if t >= _MIN_ROW:
        # block (m, t): the mask varies over the shifted dims only and broadcasts along t
        sizes = shape[first : last + 1]
        m, step = math.prod(sizes), step // t
    else:
        # mask the whole block from the first shifted dim on; group k outer rows into one long row
        sizes, t = shape[first:], 1
        m = math.prod(sizes)
        for cand in range(min(r, max(1, _GROUP_ROW // m)), 0, -1):
            if r % cand == 0:
                k = cand
                break
        r, m = r // k, m * k
    x3 = x.view(r, m, t)
    deltas = [d - w.lo for d in range(w.size) if d != w.lo and abs(d - w.lo) * step < m]
    if base is not None:
        out = torch.add(base, x, alpha=alpha)
    elif alpha != 1.0 or not deltas or recording:
        out = torch.mul(x, alpha)
    else:
        # the first shifted term in the same pass as the copy of the centre term
        out = torch.empty_like(x)
        o3, delta = out.view(r, m, t), deltas.pop(0)
        off = abs(delta) * step
        mask = _shift_mask(tuple(sizes), shifted, delta, k, x.dtype, x.device)
        if delta > 0:
            torch.addcmul(x3[:, : m - off], x3[:, off:], mask[: m - off], out=o3[:, : m - off])
            o3[:, m - off :].copy_(x3[:, m - off :])
        else:
            torch.addcmul(x3[:, off:], x3[:, : m - off], mask[off:], out=o3[:, off:])
            o3[:, :off].copy_(x3[:, :off])
    o3 = out.view(r, m, t)
    for delta in deltas:
        off = abs(delta) * step
        mask = _shift_mask(tuple(sizes), shifted, delta, k, x.dtype, x.device)
        if delta > 0:
            o3[:, : m - off].addcmul_(x3[:, off:], mask[: m - off], value=alpha)
        else:
            o3[:, off:].addcmul_(x3[:, : m - off], mask[off:], value=alpha)
    return out


def window_sum(
    x: Tensor, axes: Sequence[int], w: AxisWindow, alpha: float = 1.0, base: Optional[Tensor] = None
) -> Tensor:
    """``base + alpha · Σ_{d < f} x_pad[.., σy + d, ..]`` with the same ``y`` and ``d`` on every axis in
    ``axes`` (``base``: optional tensor of the output's shape, added in the same passes).

    One axis: a windowed sum (pooling, or a convolution of a diagonal-spatial kernel). Two axes ``(a, a')``:
    the sum over joint shifts of a full pixel-pixel covariance (a convolution). Zero padding is never
    materialised. Returns a new tensor (``x`` and ``base`` are not modified).
    """
    if w.trivial:
        return torch.add(base, x, alpha=alpha) if base is not None else torch.mul(x, alpha)
    if FAST_SAME and w.stride == 1 and not w.circular and w.n_out == w.n_in and 0 <= w.lo < w.size:
        return _window_sum_same(x, axes, w, alpha, base)
    lo, n = w.lo, w.n_in
    if w.circular:
        x = _wrap_pad(x, axes, w.lo, w.hi, w.n_in)
        lo, n = 0, w.n_in + w.lo + w.hi
    f, s, n_out = w.size, w.stride, w.n_out
    pieces = []
    for d in range(f):
        y0 = max(0, -((d - lo) // s))  # first y with σy + d − lo ≥ 0
        y1 = min(n_out, (n - 1 + lo - d) // s + 1)  # one past the last y with σy + d − lo ≤ n − 1
        if y1 > y0:
            start = s * y0 + d - lo
            pieces.append((y0, y1, slice(start, start + s * (y1 - y0 - 1) + 1, s)))

    def view(t, sl):
        idx = [slice(None)] * t.dim()
        for ax in axes:
            idx[ax] = sl
        return t[tuple(idx)]

    full = [p for p in pieces if p[0] == 0 and p[1] == n_out]
    for p in full[:2]:
        pieces.remove(p)
    srcs = [view(x, p[2]) for p in full[:2]]
    if base is not None:
        out = torch.add(base, srcs.pop(0), alpha=alpha) if srcs else base.clone()
    elif len(srcs) == 2 and alpha == 1.0:
        out = torch.add(srcs.pop(0), srcs.pop(0))
    elif srcs:
        out = torch.mul(srcs.pop(0), alpha)
    else:
        shape = list(x.shape)
        for ax in axes:
            shape[ax] = n_out
        out = x.new_zeros(shape)
    for src in srcs:
        out.add_(src, alpha=alpha)
    for y0, y1, sl in pieces:
        view(out, slice(y0, y1)).add_(view(x, sl), alpha=alpha)
    return out


def window_sums(
    x: Tensor, wins: Sequence[AxisWindow], batch_ndim: int, full: bool, alpha: float, base: Optional[Tensor] = None
) -> Tensor:
    """``base + alpha · |F| · T(x)``: a convolution's joint-shift window sums over every spatial axis (pairs of
    axes when ``full``, else the same-pixel axes), ``base`` added in the last pass. Strided axes go first (they
    shrink the tensor for the passes after them); the scale goes with the first pass, or with ``base`` into the
    last one (one pass fewer: a SAME window sum's first two terms are then one unscaled fused pass)."""
    order = sorted(range(len(wins)), key=lambda a: wins[a].n_out / wins[a].n_in)
    at = len(order) - 1 if base is not None else 0
    for i, a in enumerate(order):
        x = window_sum(
            x,
            spatial_axes(batch_ndim, a, full),
            wins[a],
            alpha if i == at else 1.0,
            base if i == len(order) - 1 else None,
        )
    return x


def spatial_axes(batch_ndim: int, a: int, full: bool) -> tuple[int, ...]:
    """Tensor axes of spatial axis ``a`` in the Kernel layout (its pair ``(a, a')`` when ``full``)."""
    return (batch_ndim + 2 * a, batch_ndim + 2 * a + 1) if full else (batch_ndim + a,)


def pad_spatial(x: Tensor, wins: Sequence[AxisWindow]) -> Tensor:
    """Pad the spatial axes of activations ``(N, C, *spatial)`` as the windows prescribe (finite twins)."""
    for a, w in enumerate(wins):
        if w.lo == 0 and w.hi == 0:
            continue
        ax = 2 + a
        if w.circular:
            x = _wrap_pad(x, (ax,), w.lo, w.hi, w.n_in)
        else:
            pads = [0, 0] * (x.dim() - ax - 1) + [w.lo, w.hi]
            x = F.pad(x, pads)
    return x


def patches(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int], groups: int
) -> Tensor:
    """Patches of an already padded input ``x (n, Cin, *S)``: ``(n, L, groups, Cin/groups · prod(kernel))``,
    ordered as a convolution weight ``(Cout, Cin/groups, *kernel)`` is (``L`` output pixels)."""
    d = len(kernel_size)
    for ax in range(d):
        k, st, dil = kernel_size[ax], stride[ax], dilation[ax]
        x = x.unfold(2 + ax, (k - 1) * dil + 1, st)
        if dil > 1:
            x = x[..., ::dil]
    # (n, Cin, *Lout, *k) -> (n, *Lout, Cin, *k)
    n, cin = x.shape[:2]
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return x.reshape(n, -1, groups, (cin // groups) * math.prod(kernel_size))


def conv_cotangents(G: Tensor, n: int, M: int, d: int, groups: int, cout: int) -> Tensor:
    """Output cotangents ``(n, M, ..., Cout, *Lout)`` of a ``d``-D convolution as ``(n, M, L, groups, Cout/groups)``."""
    g = G.reshape((n, M) + tuple(G.shape[-(d + 1) :]))  # (n, M, Cout, *Lout)
    return g.movedim(2, -1).reshape(n, M, -1, groups, cout // groups)


# ---------------------------------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------------------------------
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvModule(nn.Module):
    """Finite twin of :class:`Conv`. NTK parameterisation: ``W, b ~ N(0, 1)`` and
    ``z = W_std/sqrt(C·|F|) · (W ⋆ x) + b_std·b``; standard: ``W ~ N(0, W_std²/(C|F|))``, ``b ~ N(0, b_std²)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        wins: Sequence[AxisWindow],
        W_std: float,
        b_std: Optional[float],
        parameterization: str,
        generator: Optional[torch.Generator] = None,
        s_in: int = 1,
    ):
        super().__init__()
        self.wins = tuple(wins)
        ks = tuple(w.size for w in wins)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.stride = tuple(w.stride for w in wins)
        self.W_std, self.b_std, self.parameterization = W_std, b_std, parameterization
        self.s_in = s_in  # NT's width scale s[0] (standard parameterisation; see Dense)
        fan_in = in_channels * math.prod(ks)
        w = gaussian((out_channels, in_channels) + ks, generator)
        b = None if b_std is None else gaussian((out_channels,), generator)
        self.scale = W_std / math.sqrt(fan_in)
        if parameterization == "standard":
            w = w * (self.scale * math.sqrt(s_in))
            if b is not None:
                assert b_std is not None, "a bias is drawn only with a b_std"
                b = b * b_std
        self.weight = nn.Parameter(w)
        self.bias = None if b is None else nn.Parameter(b)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_spatial(x, self.wins)
        conv = _CONV_FNS[len(self.wins)]
        if self.parameterization == "ntk":
            y = conv(x, self.weight, None, self.stride) * self.scale
            if self.bias is not None:
                assert self.b_std is not None, "a bias exists only with a b_std"
                y = y + (self.b_std * self.bias).reshape((-1,) + (1,) * len(self.wins))
            return y
        if self.s_in != 1:
            y = conv(x, self.weight, None, self.stride) / math.sqrt(self.s_in)
            return y if self.bias is None else y + self.bias.reshape((-1,) + (1,) * len(self.wins))
        return conv(x, self.weight, self.bias, self.stride)

    def structured_uses(self, x: Tensor, G: Tensor, names: set[str]) -> dict:
        """Structured-derivative hook (:mod:`ntkit.empirical`): given this module's input ``x``
        ``(n, 1, C, *S)`` and output cotangents ``G`` ``(n, M, 1, Cout, *S')``, the weight is used on every
        padded input patch (positions ``t`` = output pixels), scaled by ``W_std/sqrt(C·|F|)`` under the NTK
        parameterisation; the bias cotangents are summed over pixels (times ``b_std``)."""
        n, M = G.shape[:2]
        d = len(self.kernel_size)
        ntk = self.parameterization == "ntk"
        Gt = conv_cotangents(G, n, M, d, 1, self.out_channels)
        out: dict = {}
        if "weight" in names:
            xp = pad_spatial(x.reshape((n,) + tuple(x.shape[-(d + 1) :])), self.wins)
            X = patches(xp, self.kernel_size, self.stride, (1,) * d, 1)
            out["weight"] = LinearUse(
                X * self.scale if ntk else (X / math.sqrt(self.s_in) if self.s_in != 1 else X), Gt
            )
        if "bias" in names:
            assert self.b_std is not None, "a bias exists only with a b_std"
            out["bias"] = Gt.sum(2).reshape(n, M, self.out_channels) * (self.b_std if ntk else 1.0)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, W_std={self.W_std}, b_std={self.b_std}, "
            f"parameterization={self.parameterization!r}"
        )


class Conv(Layer):
    """Convolution ``Conv(out_channels, kernel_size, strides=None, padding="VALID", W_std=1.0, b_std=None,
    parameterization="ntk")`` over 1, 2 or 3 spatial axes (NCW, NCHW, NCDHW). NT's ``stax.Conv``.

    Args:
      out_channels: channels of the finite twin (enters the kernel only through a following layer in the
        standard parameterisation).
      kernel_size: filter shape, a tuple of 1–3 ints (its length fixes the spatial rank) or an int for the
        same size along every spatial axis.
      strides: ``None`` (all 1), an int or a tuple.
      padding: ``"VALID"``, ``"SAME"`` (``lax``/NT convention: the extra pixel of odd padding at the end),
        ``"CIRCULAR"`` (SAME with wrap-around), or explicit ints as ``torch.nn.Conv2d(padding=...)``
        (filled with zeros, or wrapped around with ``padding_mode="circular"``).
      W_std, b_std: weight and bias standard deviations (``b_std=None``: no bias, NT's default).
      parameterization: ``"ntk"`` or ``"standard"``.
      in_channels: optional; if given, inputs with another channel count are refused with a clear error.

    Kernel rule: see the module docstring.
    """

    has_params = True
    tracks_means = True

    def __init__(
        self,
        out_channels: int,
        kernel_size: IntOrTuple,
        strides: Optional[IntOrTuple] = None,
        padding: PaddingArg = "VALID",
        W_std: float = 1.0,
        b_std: Optional[float] = None,
        parameterization: str = "ntk",
        *,
        padding_mode: str = "zeros",
        in_channels: Optional[int] = None,
        s: tuple[int, int] = (1, 1),
    ):
        if not (isinstance(out_channels, int) and out_channels > 0):
            raise ValueError(f"Conv: out_channels={out_channels!r} must be a positive int.")
        if in_channels is not None and not (isinstance(in_channels, int) and in_channels > 0):
            raise ValueError(f"Conv: in_channels={in_channels!r} must be None or a positive int.")
        check_std(W_std, b_std)
        self.out_channels = out_channels
        self.kernel_size = _as_tuple(kernel_size, "kernel_size", "Conv")
        self._int_kernel = isinstance(kernel_size, int)
        self.strides = _as_tuple(strides, "strides", "Conv")
        if not self._int_kernel and self.strides is not None and len(self.strides) not in (1, len(self.kernel_size)):
            raise ValueError(f"Conv: strides={strides!r} and kernel_size={kernel_size!r} have different lengths.")
        self.padding, self.padding_mode = check_padding(padding, padding_mode, "Conv")
        self.W_std = float(W_std)
        self.b_std = None if b_std is None else float(b_std)
        self.parameterization = check_parameterization(parameterization)
        self.in_channels = in_channels
        #: NT's width scales (s_in, s_out) of the standard parameterisation: the twin's channels, not the kernel
        #: (see :class:`~ntkit.layers.dense.Dense`)
        self.s = check_s(s, self.parameterization) if self.parameterization == "standard" else (1, 1)

    def input_rank(self) -> Optional[int]:
        return None if self._int_kernel else len(self.kernel_size) + 2

    def _plan(self, shape: Sequence[int]) -> list[AxisWindow]:
        """Windows for activations of per-sample shape ``(C, *spatial)``; checks rank and channels."""
        spatial = tuple(shape[1:])
        rank = self.input_rank()
        if not spatial or (rank is not None and len(spatial) != rank - 2):
            want = f"{rank - 2}-D" if rank is not None else "1-D to 3-D"
            names = {1: "(N, C, W)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
            hint = names.get(rank - 2, "") if rank is not None else "(N, C, *spatial)"
            raise LayerError(
                f"Conv(kernel_size={self.kernel_size}) is {want} and needs activations {hint}, but got "
                f"per-sample shape {tuple(shape)} ({len(spatial)} spatial axes). Give inputs in PyTorch's "
                f"channels-first layout with the right number of spatial axes, or change kernel_size."
            )
        if len(spatial) > 3:
            raise LayerError(f"Conv supports 1 to 3 spatial axes; got per-sample shape {tuple(shape)}.")
        return plan_windows(
            spatial,
            self.kernel_size,
            self.strides,
            self.padding,
            self.padding_mode,
            f"Conv(kernel_size={self.kernel_size}, padding={self.padding!r})",
        )

    def _check_channels(self, c: int) -> None:
        if self.in_channels is not None and c != self.in_channels:
            raise LayerError(
                f"Conv(in_channels={self.in_channels}) got activations with {c} channels; "
                f"the channel axis is axis 1 (PyTorch layout). Fix the input or in_channels."
            )

    def kernel(self, k):
        k = single(k, self)
        wins = self._plan(k.shape1[1:])
        self._check_channels(k.width)
        full = not k.diagonal_spatial
        f_size = math.prod(w.size for w in wins)
        w2 = self.W_std * self.W_std  # inf rather than OverflowError for absurd W_std (see dense.affine_rule)
        b2 = 0.0 if self.b_std is None else self.b_std * self.b_std

        def T(x: Optional[Tensor], batch_ndim: int, alpha: float, base: Optional[Tensor] = None) -> Optional[Tensor]:
            return None if x is None else window_sums(x, wins, batch_ndim, full, alpha, base)

        if isinstance(w2, Tensor) or isinstance(b2, Tensor):
            nngp, ntk, cov1, cov2 = self._tensor_rule(k, T, w2, b2, f_size)
        else:
            nngp, ntk, cov1, cov2 = self._rule(k, T, w2, b2, f_size)
        return self._output_record(k, nngp, ntk, cov1, cov2, tuple(w.n_out for w in wins))

    def _output_record(
        self,
        k: Kernel,
        nngp: Optional[Tensor],
        ntk: Optional[Tensor],
        cov1: Optional[Tensor],
        cov2: Optional[Tensor],
        spatial: tuple[int, ...],
    ) -> Kernel:
        """The record after this layer: its kernels, ``out_channels`` channels over ``spatial``, and zero-mean
        Gaussian outputs of fresh weights (independent of every other branch, ``Kernel.fresh``)."""
        return k.replace(
            nngp=nngp,
            ntk=ntk,
            cov1=cov1,
            cov2=cov2,
            shape1=(k.shape1[0], self.out_channels) + spatial,
            shape2=(k.shape2[0], self.out_channels) + spatial,
            is_gaussian=True,
            is_input=False,
            mean1=None,
            mean2=None,
            mean_kind="exact",
            fresh=(True,) * len(k.fresh),
        )

    def _rule(self, k: Kernel, T, w2: float, b2: float, f_size: int):
        """The rule with float hyper-parameters: scale factors and ``+ nngp'`` folded into the window passes."""

        def affine(x: Optional[Tensor], batch_ndim: int) -> Optional[Tensor]:
            x = T(x, batch_ndim, w2 / f_size)
            return x.add_(b2) if (x is not None and b2) else x

        cov1, cov2 = affine(k.cov1, 1), affine(k.cov2, 1)
        ntk = None
        if self.parameterization == "ntk":
            nngp = affine(k.nngp, 2)
            if k.ntk is not None:
                assert nngp is not None, "the NTK recursion needs the NNGP"
                # Θ' = W² T(Θ) + K' (the inputs carry Θ = 0)
                ntk = nngp.clone() if k.is_input else T(k.ntk, 2, w2 / f_size, base=nngp)
        else:
            mean = T(k.nngp, 2, 1.0 / f_size)  # T(nngp)
            nngp = torch.mul(mean, w2)
            if b2:
                nngp.add_(b2)
            if k.ntk is not None:
                fan_in = float(k.width * f_size)
                ntk = mean.mul_(fan_in) if k.is_input else T(k.ntk, 2, w2 / f_size).add_(mean, alpha=fan_in)
                if self.b_std is not None:
                    ntk.add_(1.0)
        return nngp, ntk, cov1, cov2

    def _tensor_rule(self, k: Kernel, T, w2, b2, f_size: int):
        """The same rule with tensor hyper-parameters (:meth:`with_tunables`): out-of-place, differentiable."""

        def affine(x: Optional[Tensor], batch_ndim: int) -> Optional[Tensor]:
            return None if x is None else T(x, batch_ndim, 1.0 / f_size) * w2 + b2

        cov1, cov2 = affine(k.cov1, 1), affine(k.cov2, 1)
        ntk = None
        if self.parameterization == "ntk":
            nngp = affine(k.nngp, 2)
            if k.ntk is not None:
                assert nngp is not None, "the NTK recursion needs the NNGP"
                ntk = nngp.clone() if k.is_input else nngp + w2 * T(k.ntk, 2, 1.0 / f_size)
        else:
            mean = T(k.nngp, 2, 1.0 / f_size)
            nngp = mean * w2 + b2
            if k.ntk is not None:
                fan_in = float(k.width * f_size)
                ntk = mean * fan_in if k.is_input else w2 * T(k.ntk, 2, 1.0 / f_size) + mean * fan_in
                if self.b_std is not None:
                    ntk = ntk + 1.0
        return nngp, ntk, cov1, cov2

    def build(self, in_shape, width, generator, readout):
        s = single_shape(in_shape, self)
        wins = self._plan(s)
        if width is None:
            self._check_channels(s[0])
        out = self.out_channels * self.s[1] if (width is None or readout) else width
        return self._twin(s[0], out, wins, generator), (out,) + tuple(w.n_out for w in wins)

    def _twin(self, in_channels: int, out: int, wins: Sequence[AxisWindow], generator: torch.Generator) -> nn.Module:
        """The finite module of :meth:`build` (subclasses with their own module override this)."""
        p = self.parameterization
        return ConvModule(in_channels, out, wins, self.W_std, self.b_std, p, generator, s_in=self.s[0])

    def __repr__(self):
        extra = "" if self.in_channels is None else f", in_channels={self.in_channels}"
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (
            f"Conv({self.out_channels}, {self.kernel_size if not self._int_kernel else self.kernel_size[0]}, "
            f"strides={self.strides}, padding={self.padding!r}, W_std={self.W_std}, b_std={self.b_std}, "
            f"parameterization={self.parameterization!r}{mode}{extra}"
            + ("" if getattr(self, "s", (1, 1)) == (1, 1) else f", s={self.s!r}")
            + ")"
        )

    def tunables(self) -> dict:
        return {"W_std": self.W_std} if self.b_std is None else {"W_std": self.W_std, "b_std": self.b_std}

    def random_features(self, spec: FeatureSpec, generator: torch.Generator) -> tuple[FeatureMap, FeatureSpec]:
        """Random features of the convolution, exact given its input features (the CNTK recursion of Arora et
        al. 2019 in the feature form of Zandieh et al. 2021, "Scaling neural tangent kernels via sketching and
        random features"): with ``P(f)[y]`` the (zero-padded or wrapped) patch of ``f`` under the filter at
        output pixel ``y`` (``dim·|F|`` entries),

            ``g[y] = [W_std/√|F| · P(f)[y], b_std]``:  ``g[y]·g'[y'] = W_std² T(K)[y, y'] + b_std²``
            ``θ'[y] = [W_std/√|F| · P(θ)[y], g[y]]``:  ``θ'[y]·θ''[y'] = W_std² T(Θ)[y, y'] + K'[y, y']``

        (``T`` the patch mean over joint shifts of the module docstring). The patches are kept unapplied
        (:class:`ConvPatches`): a following nonlinearity's projection ``G g`` is one convolution of ``f`` with
        ``m`` random filters (``m x dim x F``); any other following layer gets them materialized."""
        if type(self).kernel is not Conv.kernel:  # a variant with its own rule (ConvTranspose, ConvLocal)
            raise LayerError(
                f"{type(self).__name__} has no random-feature map; compute its kernel with "
                f"ntkit.tiling.kernel_matrix (or approximate it with ntkit.linalg.nystrom) instead."
            )
        if spec.get == "ntk" and self.parameterization != "ntk":
            raise LayerError("NTK random features need Conv(..., parameterization='ntk').")
        wins = self._plan((spec.dim,) + tuple(spec.spatial))
        f_size = math.prod(w.size for w in wins)
        b = self.b_std
        bias = None if (b is None or (not isinstance(b, Tensor) and b == 0.0)) else b
        dim_g = spec.dim * f_size + (bias is not None)
        ntk = spec.get == "ntk"
        ntk_dim = ((spec.ntk_dim * f_size + dim_g) if spec.ntk_dim else dim_g) if ntk else 0
        pending = ConvPatches(wins, self.W_std / math.sqrt(f_size), bias, ntk)

        def fmap(feats: Features) -> Features:
            feats = feats.resolved()
            if ntk and spec.ntk_dim and feats.theta is None:
                raise LayerError("Conv: NTK random features lost their theta part (an internal error).")
            return Features(feats.f, feats.theta if ntk else None, pending)

        out = dataclasses.replace(spec, dim=dim_g, ntk_dim=ntk_dim, gaussian=True, spatial=tuple(w.n_out for w in wins))
        return fmap, out


class ConvPatches(PendingAffine):
    """The random features of a :class:`Conv` before its patches are taken (see ``Conv.random_features``).

    ``Features.f``/``theta`` hold the convolution's inputs; the true features are
    ``g = [scale·P(f), bias]`` and, for the NTK, ``θ' = [scale·P(θ), g]`` (``= g`` when the input has no
    ``θ``), each patch flattened in a convolution weight's ``(channels, *F)`` order. ``project`` applies an
    ``m x dim`` matrix laid out that way as ``m`` filters: ``scale·(W ⋆ x) + bias·w_b``, never forming ``P``.
    """

    def __init__(self, wins: Sequence[AxisWindow], scale, bias, ntk: bool):
        self.wins = tuple(wins)
        self.kernel_size = tuple(w.size for w in self.wins)
        self.stride = tuple(w.stride for w in self.wins)
        self.out_spatial = tuple(w.n_out for w in self.wins)
        self.scale, self.bias, self.ntk = scale, bias, ntk

    def _input(self, feats: Features, which: str) -> Tensor:
        if which == "f" or feats.theta is None:
            return feats.f
        return torch.cat([feats.theta, feats.f], 1)  # P([θ, f]) flattened = [P(θ), P(f)]

    def project(self, feats: Features, weight: Tensor, which: str) -> Tensor:
        if which == "theta" and not self.ntk:
            raise LayerError("Conv: NTK features were asked of NNGP-only random features (an internal error).")
        x = self._input(feats, which)
        c, fs = x.shape[1], math.prod(self.kernel_size)
        if weight.shape[1] != c * fs + (self.bias is not None):
            raise LayerError(
                f"Conv random features: a projection of width {weight.shape[1]} does not match the patches "
                f"({c} channels x {fs} filter pixels{' + bias' if self.bias is not None else ''})."
            )
        filters = weight[:, : c * fs].reshape((weight.shape[0], c) + self.kernel_size)
        u = _CONV_FNS[len(self.wins)](pad_spatial(x, self.wins), filters, None, self.stride) * self.scale
        if self.bias is not None:
            u = u + self.bias * weight[:, c * fs].reshape((1, -1) + (1,) * len(self.wins))
        return u

    def _patches(self, x: Tensor, bias: bool) -> Tensor:
        d = len(self.wins)
        p = patches(pad_spatial(x, self.wins), self.kernel_size, self.stride, (1,) * d, 1)  # (n, L, 1, C·|F|)
        p = p.reshape((x.shape[0],) + self.out_spatial + (-1,)).movedim(-1, 1) * self.scale
        if bias and self.bias is not None:
            ones = torch.ones((x.shape[0], 1) + self.out_spatial, dtype=p.dtype, device=p.device)
            p = torch.cat([p, ones * self.bias], 1)
        return p

    def materialize(self, feats: Features) -> Features:
        g = self._patches(feats.f, True)
        theta = None
        if self.ntk:
            theta = g if feats.theta is None else torch.cat([self._patches(feats.theta, False), g], 1)
        return Features(g, theta)


@lift_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _lift_conv(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.Conv{1,2,3}d`` -> ``Conv`` (standard parameterisation; fan-in = in_channels × Π kernel_size)."""
    assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if m.groups != 1 or any(d != 1 for d in m.dilation):
        raise unsupported(m, "grouped or dilated convolutions have no kernel rule in ntkit; use groups=1, dilation=1.")
    if m.padding_mode not in ("zeros", "circular"):
        raise unsupported(m, f"padding_mode={m.padding_mode!r} is not supported; use 'zeros' or 'circular'.")
    padding: PaddingArg
    if isinstance(m.padding, str):
        padding = m.padding.upper()  # torch's 'same'/'valid' are lax's SAME/VALID (extra pixel at the end)
        if m.padding_mode == "circular" and padding == "SAME":
            padding = "CIRCULAR"
    else:
        padding = tuple(int(p) for p in m.padding)
    fan_in = m.in_channels * math.prod(m.kernel_size)
    return Conv(
        m.out_channels,
        tuple(m.kernel_size),
        strides=tuple(m.stride),
        padding=padding,
        W_std=opts.weight_std(m.weight, fan_in),
        b_std=opts.bias_std(m.bias, fan_in),
        parameterization=opts.parameterization,
        padding_mode=m.padding_mode,
        in_channels=m.in_channels,
    )
