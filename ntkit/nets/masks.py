"""How each layer maps masks (NT's ``mask_constant``), applied by the tiler after every leaf layer.

The masks on a record (:attr:`~ntkit.kernel.Kernel.mask1`) say which entries of the finite network's activations
are masked: zeroed before the next layer (see :mod:`ntkit.layers.masking`). After a layer's kernel rule ran on
its input record, :func:`propagate_masks` gives the output record its masks and, where the layer can produce
non-zero activations at masked positions, zeroes the kernel entries involving them (*remask*). The rules are
NT 0.6.5's (``mask_fn`` of each layer in ``neural_tangents/_src/stax``):

=====================================================  ======================================================
layer                                                  output mask
=====================================================  ======================================================
Dense, GlobalSelfAttention                             masked iff masked in every channel; remask
Conv, ConvLocal, AvgPool, SumPool                      the mask of each window's centre pixel (strided); remask
elementwise layers, LayerNorm, BatchNormEval           unchanged; remask (see below)
Identity, Dropout, FanOut                              unchanged
Index                                                  the mask, indexed alike (NT's ``mask[idx]``)
GlobalAvgPool, GlobalSumPool, Flatten                  masked iff every position is (a per-sample mask)
FanInSum, FanInProd                                    masked iff masked in every branch
FanInConcat                                            the branches' masks, concatenated along the axis
=====================================================  ======================================================

Rules that read the masks themselves: ``GlobalSelfAttention`` (masked keys get no attention weight; its
positional-embedding covariance is zero at masked positions), ``GlobalAvgPool`` (averages over the unmasked
positions only) and ``LayerNorm`` over spatial axes (averages the variances over the unmasked positions).

One difference from NT: NT does not remask after some nonlinearities (ReLU, Gelu, Gabor, Monomial, Polynomial,
...); the finite network zeroes masked activations before the next layer whatever the nonlinearity, so ntkit
remasks after every one. The kernels agree wherever NT's are the limit of its own finite network (a nonlinearity
that maps zero variance to zero, such as ReLU), and differ only where they are not (e.g. ``Polynomial`` with a
constant term before a Conv). Layers without a mask rule here (``ConvTranspose``, ``Aggregate``,
``ImageResize``, ``DotGeneral``, ...) raise a :class:`~ntkit.layers.base.LayerError` when masks reach
them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ntkit.kernel import Kernel
from ntkit.layers.attention import GlobalSelfAttention
from ntkit.layers.base import Kernels, Layer, LayerError
from ntkit.layers.branching import FanInConcat, FanInProd, FanInSum, FanOut
from ntkit.layers.conv import Conv
from ntkit.layers.conv_variants import ConvTranspose
from ntkit.layers.dense import Dense, Identity
from ntkit.layers.dropout import Dropout
from ntkit.layers.elementwise import ElementwiseLayer
from ntkit.layers.index import Index, apply_plan, plan_index
from ntkit.layers.masking import center_pick, position_mask, position_masks, remask
from ntkit.layers.norm import BatchNormEval, LayerNorm
from ntkit.layers.pooling import Flatten, _GlobalPool, _Pool

__all__ = ["propagate_masks", "has_masks"]


def has_masks(k: Kernels) -> bool:
    """Whether a record (or any branch) carries masks."""
    return any(x.mask1 is not None or x.mask2 is not None for x in (k if isinstance(k, list) else [k]))


def _map(k: Kernel, fn) -> tuple[Optional[Tensor], Optional[Tensor]]:
    return (None if k.mask1 is None else fn(k.mask1)), (None if k.mask2 is None else fn(k.mask2))


def _channels_all(m: Tensor) -> Tensor:
    """``(N, 1, *s)``: masked iff every channel is (NT's ``jnp.all(mask, channel_axis, keepdims=True)``)."""
    return m.all(1, keepdim=True)


def _with(out: Kernel, m1: Optional[Tensor], m2: Optional[Tensor], do_remask: bool, who: str) -> Kernel:
    out = out.replace(mask1=m1, mask2=None if out.x1_is_x2 else m2)
    if not do_remask:
        return out
    if m1 is not None and m1.shape[1] != 1 and not bool((m1 == m1[:, :1]).all()):
        # a per-channel input mask reaching a channel-wise layer: nothing a channel-averaged kernel can zero
        # (the inputs' masked entries are zero already)
        return out
    p1, p2 = position_masks(out, who)
    return remask(out, p1, p2)


def _position(m: Tensor, who: str) -> Tensor:
    p = position_mask(m, who)
    assert p is not None, "a mask gives a position mask"
    return p


def _broadcast_channels(m: Tensor, c: int) -> Tensor:
    return m if m.shape[1] == c else m.expand(m.shape[0], c, *m.shape[2:])


def propagate_masks(layer: Layer, k_in: Kernels, out: Kernels) -> Kernels:
    """The output record(s) of ``layer`` with their masks (and remasked kernels), from the input record(s)
    ``k_in`` that ``out = layer.kernel(k_in)`` came from; see the module docstring for the rules."""
    if not has_masks(k_in):
        return out
    who = repr(layer)
    native = getattr(layer, "native", None)  # ntkit.stax's NT-axes wrappers: the rule is the native layer's
    if callable(native):
        layer = native(len((k_in[0] if isinstance(k_in, list) else k_in).shape1))
    if isinstance(layer, FanOut):
        return out
    if isinstance(layer, (FanInSum, FanInProd, FanInConcat)):
        assert isinstance(k_in, list) and isinstance(out, Kernel), "a FanIn layer merges branches"
        return _fan_in(layer, k_in, out)
    if isinstance(k_in, list) or isinstance(out, list):
        raise LayerError(f"masks (mask_constant) through {who} between FanOut and a FanIn are not supported.")
    k = k_in
    if isinstance(layer, ConvTranspose):
        raise LayerError(_unsupported(who, "ConvTranspose (NT's rule grows the mask over each output window)"))
    if isinstance(layer, (Conv, _Pool)):
        wins = layer._plan(k.shape1[1:])
        args = ([w.lo for w in wins], [w.size for w in wins], [w.stride for w in wins], [w.n_out for w in wins])
        if isinstance(layer, Conv):
            m1, m2 = _map(k, lambda m: center_pick(_channels_all(m), *args))
        else:
            m1, m2 = _map(k, lambda m: center_pick(_position(m, who).unsqueeze(1), *args))
        return _with(out, m1, m2, True, who)
    if isinstance(layer, _GlobalPool):
        m1, m2 = _map(k, lambda m: _position(m, who).reshape(m.shape[0], 1, -1).all(-1))
        return _with(out, m1, m2, False, who)
    if isinstance(layer, Flatten):
        if k.spatial_ndim == 0:
            return out
        # NT's mask is the input's, flattened: a following Dense reduces it to "every entry masked"
        m1, m2 = _map(k, lambda m: m.reshape(m.shape[0], -1).all(-1, keepdim=True))
        return _with(out, m1, m2, False, who)
    if isinstance(layer, (Dense, GlobalSelfAttention)):
        m1, m2 = _map(k, _channels_all)
        return _with(out, m1, m2, True, who)
    if isinstance(layer, Index):
        # NT's mask[idx]: the batch and channel entries are ':', so the spatial plan applies to every channel
        plan = plan_index(layer.idx, k.shape1[1:], who)

        def index(m: Tensor) -> Tensor:
            flat = apply_plan(m.reshape(m.shape[0] * m.shape[1], *m.shape[2:]), plan, 1, False)
            return flat.reshape(m.shape[0], m.shape[1], *flat.shape[1:])

        m1, m2 = _map(k, index)
        return _with(out, m1, m2, False, who)
    if isinstance(layer, (Identity, Dropout)):
        return _with(out, k.mask1, k.mask2, False, who)
    if isinstance(layer, (ElementwiseLayer, LayerNorm, BatchNormEval)):
        return _with(out, k.mask1, k.mask2, True, who)
    raise LayerError(_unsupported(who, f"{type(layer).__name__}"))


def _unsupported(who: str, what: str) -> str:
    return (
        f"masks (kernel_fn(..., mask_constant=...)) reached {who}: ntkit has no mask rule for {what}. Compute the "
        f"kernel without mask_constant (zero the padding yourself), or move the layer after a GlobalAvgPool/"
        f"Flatten, where masks end."
    )


def _fan_in(layer: Layer, ks: list[Kernel], out: Kernel) -> Kernel:
    who = repr(layer)
    sides: list[Optional[Tensor]] = []
    for side in (1, 2):
        ms = [x.mask1 if side == 1 else (x.mask1 if x.x1_is_x2 else x.mask2) for x in ks]
        if all(m is None for m in ms):
            sides.append(None)
            continue
        if isinstance(layer, FanInConcat):
            ax = layer._concat_axis(len(ks[0].shape1))
            shapes = [x.shape1 if side == 1 else x.shape2 for x in ks]
            full = [
                torch.zeros((s[0], 1, *s[2:]), dtype=torch.bool, device=out.device) if m is None else m
                for m, s in zip(ms, shapes)
            ]
            if ax == 1:
                if all(m.shape[1] == 1 for m in full) and all(torch.equal(m, full[0]) for m in full[1:]):
                    sides.append(full[0])
                else:
                    sides.append(torch.cat([_broadcast_channels(m, s[1]) for m, s in zip(full, shapes)], 1))
            else:
                c = max(m.shape[1] for m in full)
                if any(m.shape[1] not in (1, c) for m in full):
                    raise LayerError(f"{who}: the branches' masks have different channel counts.")
                sides.append(torch.cat([_broadcast_channels(m, c) for m in full], ax))
        else:
            # NT's _sum_masks: masked iff masked in every branch (a missing mask: that branch's own)
            present = [m for m in ms if m is not None]
            acc = present[0]
            for m in present[1:]:
                acc = acc & m
            sides.append(acc)
    return out.replace(mask1=sides[0], mask2=None if out.x1_is_x2 else sides[1])
