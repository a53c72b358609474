"""Multiplication by a constant tensor: ``DotGeneral`` (NT's ``stax.DotGeneral``, i.e. ``lax.dot_general``).

``DotGeneral(rhs=R, dimension_numbers=((x_c, R_c), (x_b, R_b)))`` is ``lax.dot_general(x, R, ...)`` on
activations ``x`` ``(N, C, *spatial)`` (``lhs=L`` for ``lax.dot_general(L, x, ...)``), with ``x``'s axes counted in
ntkit's channels-first layout (0 the batch, 1 the channels, 2.. the spatial axes). ``lax.dot_general`` lays its
output out as (batch dimensions, the lhs's free axes, the rhs's free axes); ntkit then moves the activations'
batch and channel axes to the front, so the output is again ``(N, C, *spatial')`` with ``spatial'`` the other
output axes in ``lax.dot_general``'s order — the order NT's kernels have too (NT tracks where its batch and
channel axes end up; its kernels list the remaining axes in that order). Only spatial axes can be contracted
or be dot-batch dimensions: the channels are infinite (NT refuses them too) and the batch axis is per sample
(NT allows contracting it, after which no layer can follow).

Kernel rule (no parameters; the map acts on each channel alike): with ``A`` the constant, every output entry
is ``Σ_x A[y, x] v[x]``, so on each pixel side::

    K'[i, j, y, y'] = Σ_{x, x'} A[y, x] K[i, j, x, x'] A[y', x'],        Θ' likewise

(NT 0.6.5 ``Kernel.dot_general``, one ``einsum`` of the constant, the kernel and the constant). Contracting a
spatial axis mixes its pixels and needs the full pixel-pixel covariances (``needs_full_spatial``); without
contractions (scalars, dot-batch dimensions, the constant's free axes) the map is diagonal in the pixels and
works on either layout: ``K'[i, j, y] = A[y]² K[i, j, x(y)]``. ``DotGeneral()`` (no constant) is the identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Lambda, Layer, LayerError, single, single_shape
from ntkit.layers.index import check_layout

__all__ = ["DotGeneral", "DotGeneralModule"]

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]
_LETTERS = "abdefghklmopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # every letter but c, i, j, n


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Einsum subscripts of one input rank: ``left``/``right`` the x1/x2 letters of each spatial axis of ``x``,
    ``o_left``/``o_right`` the constant's subscripts on each side, ``out_left``/``out_right`` the output's spatial
    letters, ``sizes`` the output's spatial sizes, ``contracts`` whether a spatial axis is summed."""

    left: str
    right: str
    o_left: str
    o_right: str
    out_left: str
    out_right: str
    sizes: tuple[int, ...]
    contracts: bool

    def pairs(self, a: str, b: str) -> str:
        return "".join(x + y for x, y in zip(a, b))


def _axes(v: Any, what: str) -> tuple[int, ...]:
    try:
        out = tuple(v)
    except TypeError:
        raise LayerError(f"DotGeneral: {what} must be a sequence of ints, got {v!r}.") from None
    if any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in out):
        raise LayerError(f"DotGeneral: {what} must be a sequence of ints, got {v!r}.")
    return tuple(int(a) for a in out)


class DotGeneralModule(nn.Module):
    """Finite twin of :class:`DotGeneral`: one ``einsum`` of the activations with the constant (a buffer)."""

    other: Tensor

    def __init__(self, other: Tensor, equation: str, x_first: bool, text: str):
        super().__init__()
        self.register_buffer("other", other)
        self.equation, self.x_first, self.text = equation, x_first, text

    def forward(self, x: Tensor) -> Tensor:
        o = self.other.to(dtype=x.dtype, device=x.device)
        return torch.einsum(self.equation, x, o) if self.x_first else torch.einsum(self.equation, o, x)

    def extra_repr(self) -> str:
        return self.text


class DotGeneral(Layer):
    """``DotGeneral(*, lhs=None, rhs=None, dimension_numbers=(((), ()), ((), ())), precision=None, batch_axis=0,
    channel_axis=1)``: NT's ``stax.DotGeneral``, multiplication by the constant ``lhs`` or ``rhs``.

    Args:
      lhs, rhs: the constant (a tensor, array or number), on the left or the right of the activations; at most
        one. Neither: the identity.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))`` as
        ``lax.dot_general``'s, the activations' axes counted in ntkit's layout ``(N, C, *spatial)``; only
        spatial axes (``>= 2``, or negative) may appear.
      precision: accepted for NT's signature; torch computes in the activations' dtype at full precision.
      batch_axis, channel_axis: fixed to ``0`` and ``1`` in ntkit's native layers (see :class:`Index`).

    The output layout and the kernel rule: the module docstring.
    """

    tracks_means = True

    def __init__(
        self,
        *,
        lhs: Any = None,
        rhs: Any = None,
        dimension_numbers: DimensionNumbers = (((), ()), ((), ())),
        precision: Any = None,
        batch_axis: int = 0,
        channel_axis: int = 1,
    ):
        check_layout(type(self).__name__, batch_axis, channel_axis)
        if lhs is not None and rhs is not None:
            raise LayerError(
                "DotGeneral: give at most one of lhs and rhs; the other factor is the layer's input (NT's rule)."
            )
        self.is_lhs = rhs is None
        const = lhs if self.is_lhs else rhs
        self.other: Optional[Tensor] = None
        if const is not None:
            try:
                t = torch.as_tensor(np.asarray(const) if not isinstance(const, Tensor) else const.detach())
            except (TypeError, ValueError, RuntimeError):
                raise LayerError(
                    f"DotGeneral: the constant must be a tensor, an array or a number, got {const!r}."
                ) from None
            if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.bool)):
                raise LayerError(f"DotGeneral: the constant must be real, got dtype {t.dtype}.")
            t = t.to(device="cpu", dtype=torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise LayerError("DotGeneral: the constant has Inf or NaN entries.")
            self.other = t
        try:
            (lc, rc), (lb, rb) = dimension_numbers
        except (TypeError, ValueError):
            raise LayerError(
                f"DotGeneral(dimension_numbers={dimension_numbers!r}): give ((lhs_contracting, rhs_contracting), "
                f"(lhs_batch, rhs_batch)), four sequences of axes."
            ) from None
        lc, rc, lb, rb = (_axes(v, w) for v, w in ((lc, "lhs_contracting"), (rc, "rhs_contracting"),
                                                    (lb, "lhs_batch"), (rb, "rhs_batch")))  # fmt: skip
        if len(lc) != len(rc) or len(lb) != len(rb):
            raise LayerError(
                f"DotGeneral(dimension_numbers={dimension_numbers!r}): the lhs and rhs lists of contracting and "
                f"of batch dimensions must have equal lengths."
            )
        self.dimension_numbers = ((lc, rc), (lb, rb))
        self.precision = precision
        # (the activations' axes, the constant's axes)
        self._x_c, self._o_c = (rc, lc) if self.is_lhs else (lc, rc)
        self._x_b, self._o_b = (rb, lb) if self.is_lhs else (lb, rb)
        if self.other is None:
            if lc or rc or lb or rb:
                raise LayerError("DotGeneral: dimension_numbers name axes, but there is no constant (lhs or rhs).")
        else:
            nd = self.other.dim()
            o_axes = []
            for a in self._o_c + self._o_b:
                if not -nd <= a < nd:
                    raise LayerError(f"DotGeneral: axis {a} is out of range for the constant of shape "
                                     f"{tuple(self.other.shape)}.")  # fmt: skip
                o_axes.append(a % nd)
            if len(set(o_axes)) != len(o_axes):
                raise LayerError(f"DotGeneral: the constant's axes {o_axes} in dimension_numbers repeat.")
            self._o_c = tuple(a % nd for a in self._o_c)
            self._o_b = tuple(a % nd for a in self._o_b)
        self.needs_full_spatial = bool(self._x_c)

    # -- the plan --------------------------------------------------------------------------------------
    def _plan(self, shape: Sequence[int]) -> _Plan:
        """Subscripts for activations of per-sample shape ``shape`` ``(C, *spatial)``."""
        assert self.other is not None
        ndim = len(shape) + 1
        full_shape = (-1,) + tuple(shape)
        x_c: list[int] = []
        x_b: list[int] = []
        for axes, out in ((self._x_c, x_c), (self._x_b, x_b)):
            for a in axes:
                if not -ndim <= a < ndim:
                    raise LayerError(
                        f"{self!r}: axis {a} is out of range for activations of rank {ndim} (N, C, *spatial)."
                    )
                a %= ndim
                if a in (0, 1):
                    raise LayerError(
                        f"{self!r}: axis {a} of the activations is the "
                        + (
                            "batch axis, which is per sample: the kernel is computed pair by pair of samples. "
                            if a == 0
                            else "channel axis, which is infinitely wide in the kernel limit (NT refuses it too). "
                        )
                        + "Contract or batch spatial axes only (>= 2: the layout is (N, C, *spatial))."
                    )
                out.append(a)
        if len(set(x_c + x_b)) != len(x_c + x_b):
            raise LayerError(f"{self!r}: the activations' axes {x_c + x_b} in dimension_numbers repeat.")
        o_shape = tuple(self.other.shape)
        for xa, oa in zip(x_c + x_b, self._o_c + self._o_b):
            if full_shape[xa] != o_shape[oa]:
                raise LayerError(
                    f"{self!r}: axis {xa} of the activations (size {full_shape[xa]}) is paired with axis {oa} of "
                    f"the constant (size {o_shape[oa]}); their sizes must be equal."
                )
        n_sp = ndim - 2
        letters = iter(_LETTERS)
        left = [next(letters) for _ in range(n_sp)]
        right = [next(letters) for _ in range(n_sp)]
        o_left, o_right, free_o = [], [], []
        for b in range(len(o_shape)):
            if b in self._o_c or b in self._o_b:
                xa = (x_c + x_b)[(self._o_c + self._o_b).index(b)]
                o_left.append(left[xa - 2])
                o_right.append(right[xa - 2])
            else:
                p, q = next(letters), next(letters)
                o_left.append(p)
                o_right.append(q)
                free_o.append(b)
        # lax.dot_general's order: batch dims, the lhs's free axes, the rhs's free axes (N and C then go first)
        batch = [("x", xa) for xa in x_b]
        x_free = [("x", a) for a in range(2, ndim) if a not in x_c and a not in x_b]
        o_free = [("o", b) for b in free_o]
        rest = batch + (o_free + x_free if self.is_lhs else x_free + o_free)
        out_l, out_r, sizes = [], [], []
        for kind, a in rest:
            if kind == "x":
                out_l.append(left[a - 2])
                out_r.append(right[a - 2])
                sizes.append(full_shape[a])
            else:
                out_l.append(o_left[a])
                out_r.append(o_right[a])
                sizes.append(o_shape[a])
        return _Plan(
            left="".join(left),
            right="".join(right),
            o_left="".join(o_left),
            o_right="".join(o_right),
            out_left="".join(out_l),
            out_right="".join(out_r),
            sizes=tuple(sizes),
            contracts=bool(x_c),
        )

    # -- Layer protocol --------------------------------------------------------------------------------
    def kernel(self, k: Any) -> Kernel:
        k = single(k, self)
        if self.other is None:
            return k
        plan = self._plan(k.shape1[1:])
        full = not k.diagonal_spatial and k.spatial_ndim > 0
        if plan.contracts and not full:
            raise LayerError(
                f"{self!r} contracts a spatial axis and needs the full pixel-pixel covariance, but the kernel "
                f"tracks only the diagonal. Call it through a network (serial(...).kernel_fn), which tracks the "
                f"full covariance whenever a layer needs it."
            )
        o = self.other.to(dtype=k.dtype, device=k.device)
        if full:
            kin, kout = plan.pairs(plan.left, plan.right), plan.pairs(plan.out_left, plan.out_right)
            o2 = plan.o_right
        else:  # no contraction: the same letters on both pixel sides (A[y]² on the same pixel)
            kin, kout, o2 = plan.left, plan.out_left, plan.o_left

        def both(t: Optional[Tensor], batch: str) -> Optional[Tensor]:
            # einsum contracts from the left: the x1 side first, then the x2 side
            return None if t is None else torch.einsum(f"{plan.o_left},{batch}{kin},{o2}->{batch}{kout}", o, t, o)

        out: dict[str, Any] = dict(
            nngp=both(k.nngp, "ij"), ntk=both(k.ntk, "ij"), cov1=both(k.cov1, "i"), cov2=both(k.cov2, "i")
        )
        for name in ("mean1", "mean2"):  # E[A z] = A E[z], on one side
            m = getattr(k, name)
            out[name] = None if m is None else torch.einsum(f"{plan.o_left},i{plan.left}->i{plan.out_left}", o, m)
        for name in ("var1", "var2"):  # same-pixel variances: a function of themselves only without contraction
            v = getattr(k, name)
            if v is None or plan.contracts:
                out[name] = None
            else:
                eq = f"{plan.o_left},i{plan.left},{plan.o_left}->i{plan.out_left}"
                out[name] = torch.einsum(eq, o, v, o)
        res = k.replace(
            **out,
            shape1=tuple(k.shape1[:2]) + plan.sizes,
            shape2=tuple(k.shape2[:2]) + plan.sizes,
            diagonal_spatial=k.diagonal_spatial or not plan.sizes,
        )
        return res.with_exact_diagonal()

    def build(
        self, in_shape: Any, width: Optional[int], generator: torch.Generator, readout: bool
    ) -> tuple[nn.Module, tuple[int, ...]]:
        s = single_shape(in_shape, self)
        if self.other is None:
            return Lambda(lambda x: x, repr(self)), tuple(s)
        plan = self._plan(s)
        xs, os_ = f"nc{plan.left}", plan.o_left
        eq = f"{xs},{os_}->nc{plan.out_left}" if not self.is_lhs else f"{os_},{xs}->nc{plan.out_left}"
        return DotGeneralModule(self.other.clone(), eq, not self.is_lhs, repr(self)), (s[0],) + plan.sizes

    def __repr__(self) -> str:
        if self.other is None:
            return "DotGeneral()"
        shape = tuple(self.other.shape)
        const = f"{float(self.other)}" if not shape else f"<tensor {shape}>"
        return f"DotGeneral({'lhs' if self.is_lhs else 'rhs'}={const}, dimension_numbers={self.dimension_numbers})"
