"""A convolution and the ReLU-family nonlinearity after it in one compiled pass (``ntkit.compiled()``, issue 17).

In a convolutional net that tracks pixel-pixel covariances (every net that pools), almost all of the time goes
into two layers repeated at full resolution: the joint-shift window sum of :class:`~ntkit.layers.conv.Conv`
(``T(K)[y, y'] = (1/|F|) Σ_d K[y + d, y' + d]``, see :mod:`ntkit.layers.conv`) over every pixel pair of ``K`` and
``Θ``, and the arc-cosine rule of :class:`~ntkit.layers.elementwise.ABRelu` on its result. Eagerly, the window
sums take ``2·(f − 1)`` passes per tensor for an ``f × f`` filter and the rule its own passes; inside
``ntkit.compiled()`` the pair ``Conv → ABRelu`` is evaluated here as one generated loop that reads every tap
of ``K`` and ``Θ`` once per output entry and writes ``K''`` and ``Θ''`` once:

    K'  = (W_std²/|F|) Σ_d K[y + d, y' + d] + b_std²,        Θ' = (W_std²/|F|) Σ_d Θ[y + d, y' + d] + K'
    K'' = K̇ K' + (a − b)²/(2π) · √(q'₁ q'₂) sin ψ,           Θ'' = K̇ Θ'

(NTK parameterisation; the standard one has ``Θ' = C Σ_d K + (W_std²/|F|) Σ_d Θ [+ 1]``, see
:meth:`ConvActivation._coefficients`),
with ``ψ = arccos(−ρ)``, ``K̇ = ab + (a − b)²ψ/(2π)`` and the same snapping as the eager rule. The same-pixel
variances ``q'`` after the convolution are window sums of those before it (``N·pixels`` numbers), so the
convolution's full output is never stored. Each tap is a constant offset in the flattened pixel-pair axis
(stride 1, zero padding that keeps the size), read from a flat buffer with zeros at both ends (the one the
previous fused layer wrote its output into, or a copy of the tile) and kept only where a small static table
says the shifted pixels lie inside the image.

:func:`fuse_conv_activations` rewrites a layer list (``Net.kernel_fn`` does so inside ``ntkit.compiled()``); a
fused layer falls back to the two layers one after the other wherever the fused pass does not apply (small
tiles, autograd, variances outside the fast range, strides, circular padding), with the same numbers up to
round-off (tests/layers/test_fused.py: 1e-12 relative).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ntkit import _compile
from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, single
from ntkit.layers.conv import AxisWindow, Conv, _shift_mask, window_sums
from ntkit.layers.elementwise import ABRelu, ElementwiseLayer, _abrelu_fused, _within

__all__ = ["ConvActivation", "fuse_conv_activations"]

#: the fused pass keeps a 0/1 table of (taps × pixel pairs) entries; larger ones (images above 16×16 with a
#: 3×3 filter) stay on the eager window sums
MAX_TABLE = 1 << 20

_TABLES: dict = {}


def _geometry(
    wins: Sequence[AxisWindow], spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[tuple, int, Tensor]:
    """``(offsets, pad, table)`` of a stride-1 zero-padded window over full pixel-pair covariances laid out as
    ``(s_1, s_1', s_2, s_2', ...)``: the memory offset of every joint shift ``d``, the largest ``|offset|``,
    and the ``(taps, P)`` 0/1 table (in ``dtype``) of where both shifted pixels ``y + d`` and ``y' + d`` lie
    inside the image (``P = Π s_a²``). Cached (small, reused by every tile and layer)."""
    key = (tuple(wins), spatial, dtype, device)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    sizes = tuple(n for n in spatial for _ in range(2))  # (s_1, s_1', s_2, s_2', ...)
    strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
    offsets, rows = [], []
    for d in itertools.product(*[range(-w.lo, w.size - w.lo) for w in wins]):
        offsets.append(sum(da * (strides[2 * a] + strides[2 * a + 1]) for a, da in enumerate(d)))
        # both pixels of axis a shifted by d_a inside the image: the masks of the eager SAME window sums
        row = torch.ones((math.prod(sizes), 1), dtype=dtype, device=device)
        for a, da in enumerate(d):
            row = row * _shift_mask(sizes, (2 * a, 2 * a + 1), da, 1, dtype, device)
        rows.append(row[:, 0])
    out = (tuple(offsets), max(abs(o) for o in offsets), torch.stack(rows))
    if len(_TABLES) > 64:
        _TABLES.clear()
    _TABLES[key] = out
    return out


def _conv_abrelu_fused(
    kp: Tensor, tp: Optional[Tensor], pad: int, ok: Tensor, ot: Optional[Tensor], opad: int, table: Tensor,
    r1: Tensor, r2: Tensor, offsets: tuple,
    ws: float, b2: float, tt: float, u: float, v: float, lo: float, ang: float, ab: float, alpha: float,
) -> None:  # fmt: skip
    """The window sums of ``K`` (and ``Θ``), the convolution's affine map and :func:`_abrelu_fused`, compiled as
    one pass by :func:`ntkit._compile.fused`.

    ``kp``/``tp``: the tile's entries flattened, with ``pad`` zeros at both ends (a tap that leaves a pixel pair
    reads a neighbouring pair or a zero, and the 0/1 ``table`` multiplies it by 0; the entries are finite:
    covariances bounded by their variances, which are checked after every layer). ``r1``/``r2``: the roots of
    the variances after the convolution, ``(n1, 1, P)``/``(1, n2, P)`` (or both ``(n, P)`` for a
    self-covariance). ``K' = ws·ΣK + b2``, ``Θ' = tt·ΣΘ + u·ΣK + v`` when ``ot`` is given (``tp`` is ``None``
    for the inputs' zero ``Θ``). The results are written into ``ok``/``ot`` between ``opad`` entries at both
    ends, where a following fused layer reads them without a copy (:func:`_view`). A 0/1 factor, not a
    ``where`` on a boolean table: TorchInductor vectorises the product better (3.2 against 9.4 ns per entry
    for 3×3 taps on 8×8 images, measured with a script outside the repository)."""
    p = table.shape[-1]
    shape = (r1.shape[0], r2.shape[1], p) if r1.dim() == 3 else (r1.shape[0], p)
    m = kp.shape[0] - 2 * pad
    s: Optional[Tensor] = None
    t: Optional[Tensor] = None
    for i, o in enumerate(offsets):
        ks = kp[pad + o : pad + o + m].view(shape) * table[i]
        s = ks if s is None else s + ks
        if tp is not None:
            ts = tp[pad + o : pad + o + m].view(shape) * table[i]
            t = ts if t is None else t + ts
    assert s is not None
    q12 = s * ws + b2
    ntk = None if ot is None else (s * u + v if t is None else t * tt + s * u + v)
    nngp, ntk = _abrelu_fused(q12, ntk, r1, r2, lo, ang, ab, alpha)
    ok[opad : opad + m].view(shape).copy_(nngp)
    if ot is not None and ntk is not None:
        ot[opad : opad + m].view(shape).copy_(ntk)


class ConvActivation(Layer):
    """``Conv`` followed by an ``ABRelu``-family layer (see the module docstring): one leaf layer whose kernel
    is that of the two layers in a row. Made by :func:`fuse_conv_activations` for ``ntkit.compiled()``."""

    has_params = True
    tracks_means = True

    def __init__(self, conv: Conv, act: ABRelu):
        self.conv, self.act = conv, act

    def __repr__(self) -> str:
        return f"ConvActivation({self.conv!r}, {self.act!r})"

    def build(self, in_shape, width, generator, readout):
        raise NotImplementedError("ConvActivation exists only inside Net.kernel_fn; build the net it came from.")

    # -- the rule ----------------------------------------------------------------------------------
    def kernel(self, k):
        k = single(k, self)
        wins = self.conv._plan(k.shape1[1:])
        self.conv._check_channels(k.width)
        v = None
        if self._fusable(k, wins):
            v = self._variances(k, wins)
            lo, hi = self.act.fused_variance_range(v[0].dtype)
            if all(_within(x, lo, hi) for x in v if x is not None):
                return self._fused(k, wins, *v)
        mid = self.conv.kernel(k)
        if mid.cov1 is None:  # pair-only: the variances after the convolution (the tape has no step between)
            v1, v2 = self._variances(k, wins) if v is None else v
            mid = mid.replace(var1=v1, var2=v2)
        return self.act.kernel(mid).replace(law=None)

    def _variances(self, k: Kernel, wins: Sequence[AxisWindow]) -> tuple[Tensor, Optional[Tensor]]:
        d1, d2 = k.same_pixel_variances()
        return self.conv_variances(d1, wins), (None if d2 is None else self.conv_variances(d2, wins))

    def conv_variances(self, d: Tensor, wins: Sequence[AxisWindow]) -> Tensor:
        """Same-pixel variances ``(N, *s)`` after the convolution from those before it: ``W²/|F| T(d) + b²``
        with ``T`` the windowed sum of the convolution's rule on the diagonal (:mod:`ntkit.layers.conv`)."""
        f_size = math.prod(w.size for w in wins)
        w2 = self.conv.W_std * self.conv.W_std
        b2 = 0.0 if self.conv.b_std is None else self.conv.b_std * self.conv.b_std
        d = window_sums(d, wins, 1, False, w2 / f_size)
        return d.add(b2) if b2 else d

    def _fusable(self, k: Kernel, wins: Sequence[AxisWindow]) -> bool:
        """Whether the fused pass applies (before the variance range, checked on the variances after the
        convolution): compiled mode, an unmodified ``ABRelu`` rule, full pixel-pair covariances in float32/64,
        stride-1 windows with zero padding that keeps the size, a table within :data:`MAX_TABLE`, at least
        ``MIN_NUMEL`` entries, float hyper-parameters, no autograd recording."""
        act, conv, q = self.act, self.conv, k.nngp
        if not (_compile.compile_enabled() and q is not None):
            return False
        if type(act).rule is not ABRelu.rule or not isinstance(act, ABRelu):
            return False
        if k.diagonal_spatial or k.spatial_ndim == 0:
            return False
        if not all(w.stride == 1 and not w.circular and w.n_out == w.n_in and 0 <= w.lo < w.size for w in wins):
            return False
        pixels = math.prod(k.spatial_shape)
        if math.prod(w.size for w in wins) * pixels * pixels > MAX_TABLE:
            return False
        others = [t for t in (k.ntk, k.cov1, k.cov2, k.var1, k.var2) if t is not None]
        return (
            _compile.worth_compiling(q, *others)
            and isinstance(conv.W_std, float)
            and not isinstance(conv.b_std, Tensor)
        )

    def _coefficients(self, k: Kernel, f_size: int) -> tuple[float, float, float, float, float]:
        """``(ws, b2, tt, u, v)`` of ``K' = ws·ΣK + b2`` and ``Θ' = tt·ΣΘ + u·ΣK + v`` (the rule of
        :class:`~ntkit.layers.conv.Conv`); ``tt = 0`` for the inputs' zero ``Θ``."""
        conv = self.conv
        w2 = conv.W_std * conv.W_std
        b2 = 0.0 if conv.b_std is None else conv.b_std * conv.b_std
        ws = w2 / f_size
        tt = 0.0 if k.is_input else ws
        if conv.parameterization == "ntk":  # Θ' = W² T(Θ) + K'
            return ws, b2, tt, ws, b2
        # standard: Θ' = C|F| T(K) + W² T(Θ) + [1 with a bias]
        return ws, b2, tt, float(k.width), 1.0 if conv.b_std is not None else 0.0

    def _fused(self, k: Kernel, wins: Sequence[AxisWindow], v1: Tensor, v2: Optional[Tensor]) -> Kernel:
        assert k.nngp is not None
        spatial = k.spatial_shape
        offsets, pad, table = _geometry(wins, spatial, k.nngp.dtype, k.nngp.device)
        p = table.shape[-1]
        coef = self._coefficients(k, table.shape[0])
        consts = self.act.fused_consts(k.nngp.dtype)
        mid = self.conv._output_record(k, None, None, None, None, spatial)
        r1, r2 = torch.sqrt(v1), torch.sqrt(v1 if v2 is None else v2)

        def padded(t: Tensor, exact: Optional[int] = None) -> tuple[Tensor, int]:
            """``t`` flattened with at least ``pad`` zeros at both ends (exactly ``exact`` if given), and their
            number: the buffer a fused layer wrote ``t`` into (:func:`_view`), or a copy."""
            held = getattr(t, _PADDED, None)
            if held is not None and t.is_contiguous() and held[0].numel() == t.numel() + 2 * held[1]:
                buf, have = held
                fits = have >= pad if exact is None else have == exact
                if fits and t.data_ptr() == buf.data_ptr() + have * buf.element_size():
                    return buf, have
            want = pad if exact is None else exact
            buf = _buffer(t.numel(), want, t)
            buf[want : want + t.numel()].view(t.shape).copy_(t)
            return buf, want

        def run(
            x: Tensor, th: Optional[Tensor], want_ntk: bool, ra: Tensor, rb: Tensor, batch: int
        ) -> tuple[Tensor, Optional[Tensor]]:
            kp, have = padded(x)
            # Θ is read with the same offsets (the inputs' Θ is 0: not read)
            tp = None if (th is None or coef[2] == 0.0) else padded(th, exact=have)[0]
            # the roots broadcast to (..., P), materialised (N·P entries, a fraction of the tile)
            a = ra.expand(ra.shape[:batch] + tuple(x.shape[batch:])).reshape(ra.shape[:batch] + (p,))
            b = rb.expand(rb.shape[:batch] + tuple(x.shape[batch:])).reshape(rb.shape[:batch] + (p,))
            ok = _buffer(x.numel(), pad, x)
            ot = _buffer(x.numel(), pad, x) if want_ntk else None
            _compile.fused(
                _conv_abrelu_fused, kp, tp, have, ok, ot, pad, table, a, b, offsets, *coef, *consts,
                batch_dims=batch, static=(6,), one_loop=True,
            )  # fmt: skip
            return _view(ok, pad, x.shape), (None if ot is None else _view(ot, pad, x.shape))

        nngp, ntk = run(k.nngp, k.ntk, k.ntk is not None, k._outer_view(r1, 0, True), k._outer_view(r2, 1, True), 2)
        covs: list[Optional[Tensor]] = []
        for cov, r in ((k.cov1, r1), (k.cov2, None if v2 is None else r2)):
            if cov is None or r is None:
                covs.append(None)
            elif k.x1_is_x2 and torch.equal(torch.diagonal(k.nngp, 0, 0, 1), cov.movedim(0, -1)):
                # a block against itself whose pairs (i, i) are its self-covariances (the exact diagonal of
                # every rule): those pairs of the output are the output's self-covariances, no second pass
                covs.append(torch.diagonal(nngp, 0, 0, 1).movedim(-1, 0).contiguous())
            else:
                covs.append(run(cov, None, False, k._outer_view(r, 0, False), k._outer_view(r, 1, False), 1)[0])
        # the output record takes its means from the variances after the convolution (a pair-only record
        # carries them; a record with self-covariances keeps its own var1/var2, None)
        out = self.act.output_record(mid.replace(var1=v1, var2=v2), nngp, ntk, covs[0], covs[1])
        return out if k.cov1 is None else out.replace(var1=k.var1, var2=k.var2)


#: attribute of a fused layer's output tensors: ``(buffer, pad)`` whose middle they are (see :func:`_view`)
_PADDED = "_ntkit_padded"


def _buffer(m: int, pad: int, like: Tensor) -> Tensor:
    """A flat buffer of ``m`` entries with ``pad`` zeros at both ends."""
    buf = like.new_empty((m + 2 * pad,))
    buf[:pad].zero_()
    buf[pad + m :].zero_()
    return buf


def _view(buf: Tensor, pad: int, shape: Sequence[int]) -> Tensor:
    """The entries of ``buf`` between its pads as a tensor of ``shape``, which remembers the buffer: a following
    fused layer whose offsets are at most ``pad`` reads it in place. (Nothing else can reach the pads, so they
    stay zero; in-place edits of the tensor, such as the exact diagonal, are edits of the buffer.)"""
    t = buf[pad : buf.numel() - pad].view(tuple(shape))
    setattr(t, _PADDED, (buf, pad))
    return t


def fuse_conv_activations(layers: Sequence[Layer]) -> list[Layer]:
    """``[..., Conv, act, nxt, ...]`` -> ``[..., ConvActivation(Conv, act), nxt, ...]`` for an ``ABRelu``-family
    ``act`` followed by a layer that neither keeps the residual-stream program (``carries_law``: the fused
    layer does not build one) nor is a combinator or another nonlinearity. Other layers are kept."""
    out: list[Layer] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if (
            isinstance(layer, Conv)
            and type(layer) is Conv
            and i + 2 < len(layers)
            and isinstance(layers[i + 1], ABRelu)
            and not isinstance(layers[i + 2], ElementwiseLayer)
            and not layers[i + 2].carries_law
            and not layers[i + 2].is_combinator
        ):
            out.append(ConvActivation(layer, layers[i + 1]))  # type: ignore[arg-type]
            i += 2
            continue
        out.append(layer)
        i += 1
    return out
