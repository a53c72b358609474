"""Dropout: NT's ``stax.Dropout(rate, mode)``, with ``rate`` the *keep* probability (as NT and JAX's stax).

``mode="train"``: each entry is kept with probability ``rate`` and scaled by ``1/rate``, ``z' = m z/rate`` with
``m ~ Bernoulli(rate)`` i.i.d. over samples, channels and pixels. Then ``E[m m'] = 1`` for two different
entries and ``E[m²]/rate² = 1/rate`` for the same entry, so (Srivastava et al. 2014; NT 0.6.5
``stax.Dropout``, ``_diag_mul``)::

    K'[i, j, y, y'] = K[i, j, y, y'] · (1/rate if (i, y) = (j, y') is one entry else 1),   Θ' likewise

— the same sample *and* the same pixel: in the diagonal layout the batch diagonal ``K[i, i, y]``, in the full
layout ``K[i, i, y, y]``; the self-covariances ``cov1``/``cov2`` on their same-pixel entries. "The same sample"
is ``x2 = None`` (the record's ``x1_is_x2``): ``kernel_fn(x1, x2)`` is the kernel of two forward passes with
independent masks and has no factor (NT 0.6.5 also applies it when ``x2`` equals ``x1`` numerically). The
output is not Gaussian (``is_gaussian = False``: a Dense/Conv must follow before a nonlinearity); its means
are unchanged (``E[m z/rate] = E[z]``). On the raw inputs the rule is exact as well (NT refuses that in
words but not in code: its check never fires).

``mode="test"`` is the identity (NT's). ``rate = 1`` keeps everything: the identity in both modes.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Lambda, Layer, LayerError, LiftOptions, lift_rule, single, single_shape, unsupported

__all__ = ["Dropout", "DropoutModule", "MODES"]

#: the values of ``Dropout(mode=...)``
MODES = ("train", "test")

_M32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """``(h · c) mod 2³²`` for int64 ``h`` in ``[0, 2³²)``, without int64 overflow (two 16-bit halves of ``c``)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32") on int64 tensors holding values in ``[0, 2³²)``."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def coarse_bits(z: Tensor) -> Tensor:
    """A coarse fingerprint of every entry of ``z``: the sign, the exponent and the 3 leading mantissa bits of its
    float32 value (1/8 relative resolution; ``-0`` read as ``+0``), as int64 in ``[0, 2¹²)``.

    Coarse, so that a sample computed alone or inside a batch — whose activations may differ in their last bits
    (batched matrix products round differently) — almost always has the same fingerprint: an entry flips only
    when its rounding noise crosses one of the 8 boundaries per octave (relative noise δ: probability ~ 8δ per
    entry; δ ~ 1e-16 in float64)."""
    b = (z.detach().to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    return (b >> 20) & 0xFFF


def keep_mask(z: Tensor, seed: Tensor, rate: float) -> Tensor:
    """The dropout mask of activations ``z`` ``(N, ...)``: entry ``e`` of sample ``n`` is kept iff
    ``H(fp_n, e, seed) < rate · 2³²``, with ``fp_n`` a hash of the sample's activations (:func:`coarse_bits`).

    A pure function of (``seed``, the sample, the position): no random-number generator is involved, so it runs
    under ``torch.func.vmap``/``jacrev`` (where torch's random ops raise), a sample keeps its mask wherever it
    is in a batch and in every pass at the same parameters (the per-sample passes of an empirical NTK see the
    mask of the batched pass), and different samples — or other parameters — get independent masks."""
    bits = coarse_bits(z)
    n = z.shape[0]
    flat = bits.reshape(n, -1)
    pos = torch.arange(flat.shape[1], device=z.device, dtype=torch.int64)
    s = seed.to(device=z.device, dtype=torch.int64) & _M32
    salt = _mix32(pos ^ s)  # (numel,): the position's key
    fp = (_mix32(flat ^ salt).sum(1, keepdim=True) & _M32) ^ _mix32(s ^ 0x9E3779B9)  # (n, 1): the sample's key
    h = _mix32(_mix32(fp ^ salt) ^ (pos * 0x2545 & _M32))
    threshold = min(math.floor(rate * 2**32), 2**32)
    return (h < threshold).reshape(z.shape)


class DropoutModule(nn.Module):
    """Finite twin of ``Dropout(rate, mode="train")``: ``x · m / rate`` with the mask of :func:`keep_mask`.

    The mask is a deterministic function of the module's ``seed`` buffer, the sample and the position (as NT's
    ``apply_fn(params, x, rng=key)`` is of its key): the same input and parameters give the same output, any
    other input or parameter values fresh masks (so a training loop sees new masks at every step). It is
    applied whatever ``module.training`` — the module is the twin of the train-mode kernel (Monte Carlo runs
    twins in eval mode); ``Dropout(rate, mode="test")`` builds the identity. A sample that occurs twice (in one
    batch, or in both ``x1`` and ``x2``) gets the same mask both times, where the kernel's rule has independent
    masks for different samples (see :mod:`ntkit.layers.dropout`).
    """

    seed: Tensor

    def __init__(self, rate: float, seed: int):
        super().__init__()
        self.rate = float(rate)
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        keep = keep_mask(x, self.seed, self.rate)
        return torch.where(keep, x / self.rate, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def _scale_diagonal(t: Tensor, factor: float, batch_pair: bool, spatial_ndim: int, full: bool) -> Tensor:
    """A copy of ``t`` with its same-entry diagonal multiplied by ``factor``: the batch diagonal (when
    ``batch_pair``: ``(N, N, ...)``) and, for the full layout, the diagonal of every spatial pair."""
    out = t.clone()
    v = torch.diagonal(out, 0, 0, 1) if batch_pair else out  # the batch diagonal goes last
    if full:
        start = 0 if batch_pair else 1
        for _ in range(spatial_ndim):  # the next pair (s, s') is now at (start, start + 1)
            v = torch.diagonal(v, 0, start, start + 1)
    v.mul_(factor)
    return out


class Dropout(Layer):
    """``Dropout(rate, mode="train")``: NT's ``stax.Dropout``; ``rate`` is the keep probability, ``0 < rate ≤ 1``.

    Kernel rule and conventions: the module docstring. The finite twin is :class:`DropoutModule` (``"train"``)
    or the identity (``"test"``).
    """

    tracks_means = True  # E[m z/rate] = E[z]: the means (and their kind) are unchanged

    def __init__(self, rate: float, mode: str = "train"):
        if mode not in MODES:
            raise LayerError(f"Dropout(mode={mode!r}): choose 'train' (dropout's kernel) or 'test' (the identity).")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 < rate <= 1.0):
            raise LayerError(
                f"Dropout(rate={rate!r}): rate is the keep probability (NT's convention), a number with "
                f"0 < rate <= 1 (rate=1 keeps every entry)."
            )
        self.rate = float(rate)
        self.mode = mode

    def _identity(self) -> bool:
        return self.mode == "test" or self.rate == 1.0

    def kernel(self, k: Any) -> Kernel:
        k = single(k, self)
        if self._identity():
            return k
        f = 1.0 / self.rate
        full = not k.diagonal_spatial and k.spatial_ndim > 0
        s = k.spatial_ndim
        out: dict[str, Any] = {}
        for name in ("nngp", "ntk"):
            t = getattr(k, name)
            if t is not None and k.x1_is_x2:
                out[name] = _scale_diagonal(t, f, True, s, full)
        for name in ("cov1", "cov2"):
            t = getattr(k, name)
            if t is not None:
                out[name] = _scale_diagonal(t, f, False, s, full) if full else t * f
        for name in ("var1", "var2"):  # same-pixel variances of a pair-only record
            t = getattr(k, name)
            if t is not None:
                out[name] = t * f
        return k.replace(**out, is_gaussian=False, is_input=False)

    def build(
        self, in_shape: Any, width: Optional[int], generator: torch.Generator, readout: bool
    ) -> tuple[nn.Module, Any]:
        s = single_shape(in_shape, self)
        if self._identity():
            return Lambda(lambda x: x, repr(self)), s
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return DropoutModule(self.rate, seed), s

    def __repr__(self) -> str:
        return f"Dropout({self.rate}" + ("" if self.mode == "train" else f", mode={self.mode!r}") + ")"


# ---------------------------------------------------------------------------------------------------
# lift: torch's dropout modules
# ---------------------------------------------------------------------------------------------------
@lift_rule(nn.Dropout)
def _lift_dropout(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.Dropout(p)``: the identity in eval mode; in train mode :class:`Dropout` with keep rate ``1 − p``
    (torch's ``p`` is the drop probability, NT's ``rate`` the keep probability)."""
    assert isinstance(m, nn.Dropout)
    p = float(m.p)
    if not m.training or p == 0.0:
        return Dropout(1.0, mode="test")
    if p >= 1.0:
        raise unsupported(
            m,
            "in train mode with p=1 it zeroes every activation (the kernel is 0). Fix: model.eval(), or p < 1.",
        )
    return Dropout(1.0 - p, mode="train")


@lift_rule(nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
def _lift_dropout_variants(m: nn.Module, opts: LiftOptions) -> Layer:
    """Channel dropout and alpha dropout: the identity in eval mode; refused in train mode."""
    if not m.training or float(getattr(m, "p", 0.0)) == 0.0:
        return Dropout(1.0, mode="test")
    why = (
        "drops whole channels (one mask entry per channel, shared by all its positions), so the same-sample kernel "
        "is scaled at every pixel pair, not only on the same pixel as ntkit's Dropout rule does"
        if isinstance(m, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d))
        else "replaces dropped entries by SELU's negative saturation value and re-centres with an affine map; ntkit "
        "has no rule for that"
    )
    raise unsupported(m, f"in train mode it {why}. Fix: model.eval() (then it is the identity), or nn.Dropout.")
