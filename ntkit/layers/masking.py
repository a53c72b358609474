"""Masks (NT's ``kernel_fn(..., mask_constant=c)``): the helpers the layer rules share.

An input entry equal to ``c`` (``NaN`` matches ``NaN``) is *masked*: it is set to zero before anything is
computed, and the record carries boolean masks ``mask1``/``mask2`` (``True``: masked) of shape
``(N, C_m, *spatial)`` (:class:`~ntkit.kernel.Kernel`). NT's semantics (``neural_tangents/_src/stax``, version
0.6.5), which the finite network makes precise: before every layer the activations at masked entries are zeroed,
and each layer maps its input mask to an output mask (:mod:`ntkit.nets.masks` holds the rule of every layer).
In the infinite-width limit the channels are averaged, so a kernel can only carry masks that are the same for
every channel (*position masks*); per-channel masks exist only on the raw inputs (and are reduced by the first
Dense/Conv/attention layer: a position is masked when all its channels are, as in NT).

Here: zeroing the inputs (:func:`masked_inputs`), position masks of a record (:func:`position_masks`), zeroing
the kernel entries that involve a masked position (:func:`remask`), and the per-tile rows of the masks
(:class:`TileMasks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ntkit._inputs import to_tensor
from ntkit.kernel import Kernel
from ntkit.layers.base import LayerError

__all__ = [
    "masked_inputs",
    "position_mask",
    "position_masks",
    "channel_all_masks",
    "remask",
    "TileMasks",
    "NEG_INF",
]

#: the logit of a masked key in SOFTMAX attention (NT's ``_NEG_INF``: a finite value, so that a row whose keys
#: are all masked gives uniform weights rather than NaN)
NEG_INF = -1e20


def masked_inputs(x: Any, mask_constant: Any, name: str) -> tuple[Tensor, Tensor]:
    """``(x with masked entries zeroed, mask)`` for ``mask = (x == mask_constant)`` (``isnan(x)`` for a ``NaN``
    constant); ``x`` a tensor or numpy array (NT's ``_get_masked_array``)."""
    if isinstance(mask_constant, bool) or not isinstance(mask_constant, (int, float)):
        if not (isinstance(mask_constant, Tensor) and mask_constant.numel() == 1):
            raise TypeError(f"mask_constant={mask_constant!r} must be a number (the value that marks masked entries).")
        mask_constant = float(mask_constant)
    t = to_tensor(x, name, check_finite=False)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    mask = torch.isnan(t) if math.isnan(mask_constant) else (t == mask_constant)
    return torch.where(mask, torch.zeros((), dtype=t.dtype, device=t.device), t), mask


def position_mask(m: Optional[Tensor], who: str) -> Optional[Tensor]:
    """``(N, *s)``: the positions masked in every channel of ``m`` ``(N, C_m, *s)``; an error when channels
    differ (an infinite-width kernel averages the channels and cannot keep a per-channel mask; NT refuses too)."""
    if m is None:
        return None
    if m.shape[1] == 1 or bool((m == m[:, :1]).all()):
        return m[:, 0]
    raise LayerError(
        f"{who} got masks that differ between the channels of a position (mask_constant matched some channels "
        f"of a position but not all). Masks must be per position: put a Dense/Conv layer first (a position is "
        f"then masked when all its channels are, as in NT), or mark every channel of a masked position."
    )


def position_masks(k: Kernel, who: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(p1, p2)``: position masks ``(N, *s)`` of both sides (``p2`` is ``p1`` for ``x1_is_x2``; ``None``: no
    masks)."""
    p1 = position_mask(k.mask1, who)
    p2 = p1 if (k.x1_is_x2 or k.mask2 is None) else position_mask(k.mask2, who)
    return p1, p2


def channel_all_masks(k: Kernel) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(p1, p2)``: position masks ``(N, *s)``, a position masked iff all its channels are (NT's
    ``jnp.all(mask, channel_axis)``, as Dense and attention reduce per-channel masks); ``p2`` is ``p1`` for
    ``x1_is_x2``."""
    p1 = None if k.mask1 is None else k.mask1.all(1)
    p2 = p1 if (k.x1_is_x2 or k.mask2 is None) else k.mask2.all(1)
    return p1, p2


def keep_products(k: Kernel, p1: Tensor, p2: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Boolean ``keep`` tensors broadcast against ``nngp``/``ntk``, ``cov1`` and ``cov2``: ``True`` where
    neither entry's position is masked (NT's ``Kernel._get_mask_prods``, inverted)."""
    k1, k2 = ~p1, ~p2
    return k.outer_means(k1, k2, 0), k.outer_means(k1, k1, 1), k.outer_means(k2, k2, 2)


def _zero(t: Optional[Tensor], keep: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or keep is None:
        return t
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def remask(k: Kernel, p1: Optional[Tensor], p2: Optional[Tensor]) -> Kernel:
    """Zero every kernel entry that involves a masked position (``p1``/``p2``: position masks ``(N, *s)`` of the
    record's spatial shape), as the finite network does by zeroing masked activations before the next layer
    (NT's ``Kernel.mask``). Same-pixel variances (``var1``/``var2``) and means are zeroed there too."""
    if p1 is None:
        return k
    assert p2 is not None, "position_masks gives both sides"
    k12, k11, k22 = keep_products(k, p1, p2)
    return k.replace(
        nngp=_zero(k.nngp, k12),
        ntk=_zero(k.ntk, k12),
        cov1=_zero(k.cov1, k11),
        cov2=_zero(k.cov2, k22),
        var1=_zero(k.var1, ~p1),
        var2=_zero(k.var2, ~p2),
        mean1=_zero(k.mean1, ~p1),
        mean2=_zero(k.mean2, ~p2),
    )


def flat_keep(p: Optional[Tensor]) -> Optional[Tensor]:
    """``(N, P)`` float ``1 − mask`` over the positions in C order (``None`` for no mask)."""
    return None if p is None else (~p).reshape(p.shape[0], -1)


class TileMasks:
    """The masks of one ``kernel_fn`` call, handed to each tile with its samples' rows: the tiler then slices the
    sample numbers ``0..n1-1`` (x1) and ``n1..n1+n2-1`` (x2), as for :class:`~ntkit.layers.aggregate.SampleKwargs`
    (the same numbering, so both work together)."""

    def __init__(self, x1: Tensor, x2: Optional[Tensor], m1: Tensor, m2: Optional[Tensor]):
        self.x1, self.x2, self.n1 = x1, x2, x1.shape[0]
        self.all = m1 if m2 is None else torch.cat([m1, m2.to(m1.device)])

    def indices(self) -> tuple[Tensor, Optional[Tensor]]:
        dev = self.x1.device
        i1 = torch.arange(self.n1, device=dev)
        return i1, None if self.x2 is None else torch.arange(self.n1, self.n1 + self.x2.shape[0], device=dev)

    def rows(self, a: Tensor, b: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """The masks of the tile of sample numbers ``(a, b)``."""
        return self.all.index_select(0, a), None if b is None else self.all.index_select(0, b)

    def inputs(self, a: Tensor, b: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """The (zeroed) inputs of the tile of sample numbers ``(a, b)``."""
        xs = self.x1 if self.x2 is None else torch.cat([self.x1, self.x2])
        return xs.index_select(0, a), None if b is None else xs.index_select(0, b)


def center_pick(
    m: Tensor, lo: Sequence[int], size: Sequence[int], stride: Sequence[int], n_out: Sequence[int]
) -> Tensor:
    """The mask ``(N, C_m, *s_out)`` of a windowed layer (Conv, pooling): an output position is masked iff the
    centre pixel of its window is (NT's ``_pool_mask``: index ``−lo + (f − 1)//2 + σ·o`` along each axis)."""
    out = m
    for a in range(len(lo)):
        idx = -lo[a] + (size[a] - 1) // 2 + stride[a] * torch.arange(n_out[a], device=m.device)
        n_in = m.shape[2 + a]
        if bool((idx < 0).any()) or bool((idx >= n_in).any()):
            raise LayerError(
                f"masks: the window centres {idx.tolist()} of spatial axis {a} leave its {n_in} pixels (padding "
                f"{lo[a]}, window {size[a]}, stride {stride[a]}); NT has no mask rule for this window either."
            )
        out = out.index_select(2 + a, idx)
    return out
