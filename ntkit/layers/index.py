"""Indexing the spatial axes: ``Index`` (NT's ``stax.Index``) and the ``Slice`` helper.

``Index(idx)`` is ``x[idx]`` on activations ``(N, C, *spatial)`` (ntkit's channels-first layout: ``idx[0]`` is the
batch axis, ``idx[1]`` the channel axis, ``idx[2:]`` the spatial axes). Write ``idx`` with :data:`Slice`:
``Index(Slice[:, :, 1:5, ::-1])`` crops the first spatial axis to 1..4 and reverses the second;
``Index(Slice[..., 0])`` keeps the first position of the last spatial axis and removes that axis.

Kernel rule (no parameters, a selection of entries): with ``s_a`` the index of spatial axis ``a`` (an int,
which removes the axis, or a slice of either sign of step)::

    diagonal layout:  K'[i, j, y]     = K[i, j, s(y)]
    full layout:      K'[i, j, y, y'] = K[i, j, s(y), s(y')]          (each spatial axis and its twin)

the same on ``cov1``/``cov2``, the same-pixel variances and the means; ``Θ'`` likewise. Source: NT 0.6.5
``Kernel.__getitem__`` (``_src/utils/kernel.py``), which indexes each spatial axis and its twin the same way.

Differences from NT, both refused with an error rather than computed: the batch axis cannot be indexed (the
kernel is computed pair by pair of samples, tile by tile — select the samples of the inputs instead; NT allows
slices of it), and, as in NT, the channel axis (infinite in the limit) cannot either. ``None`` (new axes),
boolean and array indices are not supported (NT's neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import EllipsisType
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError, single, single_shape
from ntkit.layers.conv import spatial_axes

__all__ = ["Index", "Slice", "IndexModule"]

IndexItem = Union[int, slice, EllipsisType]
IndexArg = Union[IndexItem, tuple[IndexItem, ...]]
#: one spatial axis of a plan: ("int", i) removes the axis, ("slice", start, stop, step) with step > 0 is a
#: view, ("take", positions) a gather (negative steps: torch slices cannot step backwards)
AxisOp = tuple[Any, ...]


class _Slice:
    """``Slice[1:10, :, ::-1]`` is ``(slice(1, 10), slice(None), slice(None, None, -1))``: the index of an
    :class:`Index` layer, written as one would index an array (NT's ``stax.Slice``). ``Slice(a, b)`` is the
    same as ``Slice[a, b]``."""

    def __getitem__(self, idx: IndexArg) -> IndexArg:
        return idx

    def __call__(self, *idx: IndexItem) -> IndexArg:
        return idx[0] if len(idx) == 1 else tuple(idx)

    def __repr__(self) -> str:
        return "Slice"


#: the index helper: ``Index(Slice[:, :, 1:5, ::-1])`` (NT's ``stax.Slice``); see :class:`_Slice`
Slice = _Slice()


def _fmt_item(s: Any) -> str:
    if s is Ellipsis:
        return "..."
    if isinstance(s, slice):
        parts = ["" if v is None else str(v) for v in (s.start, s.stop)]
        return ":".join(parts) + ("" if s.step is None else f":{s.step}")
    return repr(s)


def format_index(idx: IndexArg) -> str:
    """``Slice[...]`` source text of an index (for reprs and messages)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return "Slice[" + ", ".join(_fmt_item(s) for s in items) + "]"


def _check_items(idx: Any, where: str) -> tuple[IndexItem, ...]:
    """The index as a tuple of ints, slices and at most one Ellipsis; anything else is refused."""
    items = idx if isinstance(idx, tuple) else (idx,)
    for s in items:
        if s is Ellipsis:
            continue
        if isinstance(s, bool) or not isinstance(s, (int, slice)):
            raise LayerError(
                f"{where}: index entry {s!r} is not supported; use ints, slices and '...' (e.g. "
                f"Slice[:, :, 1:4, ::-1]). New axes (None), boolean and array indices have no kernel rule."
            )
        if isinstance(s, slice):
            for v in (s.start, s.stop, s.step):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                    raise LayerError(f"{where}: slice {s!r} must have int (or empty) start, stop and step.")
            if s.step == 0:
                raise LayerError(f"{where}: slice {s!r} has step 0; give a nonzero step.")
    if sum(s is Ellipsis for s in items) > 1:
        raise LayerError(f"{where}: an index can have only one '...' (got {format_index(idx)}).")
    return items


def canonical_index(idx: IndexArg, ndim: int, where: str) -> tuple[Union[int, slice], ...]:
    """``idx`` with its ``...`` expanded and padded with ``:`` to ``ndim`` entries (NT's ``canonicalize_idx``)."""
    items = _check_items(idx, where)
    if Ellipsis in items:
        i = items.index(Ellipsis)
        fill = ndim - (len(items) - 1)
        if fill < 0:
            raise LayerError(f"{where}: {format_index(idx)} has more entries than the activations' {ndim} axes.")
        items = items[:i] + (slice(None),) * fill + items[i + 1 :]
    if len(items) > ndim:
        raise LayerError(
            f"{where}: {format_index(idx)} indexes {len(items)} axes but the activations have {ndim} "
            f"(batch, channels{', ' + str(ndim - 2) + ' spatial' if ndim > 2 else ''})."
        )
    out = items + (slice(None),) * (ndim - len(items))
    return tuple(s for s in out if s is not Ellipsis)  # (no Ellipsis is left; the filter is for the types)


def _is_everything(s: Union[int, slice], n: Optional[int]) -> bool:
    """The entry selects a whole axis, in order (``:``; with the size known, any slice equivalent to it)."""
    if not isinstance(s, slice):
        return False
    if n is None:
        return s.start in (None, 0) and s.stop is None and s.step in (None, 1)
    return s.indices(n) == (0, n, 1)


def _check_batch_channel(items: Sequence[Union[int, slice]], channels: Optional[int], where: str) -> None:
    if len(items) > 0 and not _is_everything(items[0], None):
        raise LayerError(
            f"{where}: the batch axis (entry 0) cannot be indexed: the kernel is computed pair by pair of "
            f"samples, tile by tile. Select the samples of the inputs instead (x[{_fmt_item(items[0])}]) and "
            f"index the other axes, e.g. Slice[:, :, ...]."
        )
    if len(items) > 1 and not _is_everything(items[1], channels):
        raise LayerError(
            f"{where}: the channel axis (entry 1) cannot be indexed: it is infinitely wide in the kernel limit "
            f"(NT refuses it too). Leave it ':'; activations are channels-first (N, C, *spatial)."
        )


def plan_index(idx: IndexArg, shape: Sequence[int], where: str) -> list[AxisOp]:
    """One :data:`AxisOp` per spatial axis of activations of per-sample shape ``shape`` (``(C, *spatial)``)."""
    items = canonical_index(idx, len(shape) + 1, where)
    _check_batch_channel(items, shape[0], where)
    plan: list[AxisOp] = []
    for a, (s, n) in enumerate(zip(items[2:], shape[1:])):
        if isinstance(s, int):
            i = s + n if s < 0 else s
            if not 0 <= i < n:
                raise LayerError(f"{where}: index {s} is out of range for spatial axis {a} of size {n}.")
            plan.append(("int", i))
            continue
        start, stop, step = s.indices(n)
        positions = range(start, stop, step)
        if len(positions) == 0:
            raise LayerError(f"{where}: {_fmt_item(s)} selects no position of spatial axis {a} (size {n}).")
        if step > 0:
            plan.append(("slice", start, stop, step))
        else:
            plan.append(("take", tuple(positions)))
    return plan


def out_spatial(plan: Sequence[AxisOp], spatial: Sequence[int]) -> tuple[int, ...]:
    """The spatial shape after the plan."""
    out: list[int] = []
    for op in plan[: len(spatial)]:
        if op[0] == "slice":
            out.append(len(range(op[1], op[2], op[3])))
        elif op[0] == "take":
            out.append(len(op[1]))
    return tuple(out)


def _take(t: Tensor, dim: int, op: AxisOp) -> Tensor:
    if op[0] == "int":
        return t.select(dim, op[1])
    if op[0] == "slice":
        return t[(slice(None),) * dim + (slice(op[1], op[2], op[3]),)]
    return t.index_select(dim, torch.tensor(op[1], device=t.device))


def apply_plan(t: Tensor, plan: Sequence[AxisOp], batch_ndim: int, full: bool) -> Tensor:
    """Index the spatial axes of ``t`` (``batch_ndim`` leading batch axes; each spatial axis paired with its
    twin when ``full``). Axes are taken from the last one, so that removed axes do not move the others."""
    for a in reversed(range(len(plan))):
        for d in reversed(spatial_axes(batch_ndim, a, full)):
            t = _take(t, d, plan[a])
    return t


class IndexModule(nn.Module):
    """Finite twin of :class:`Index`: ``x[idx]`` on ``(N, C, *spatial)`` (negative steps by a gather)."""

    def __init__(self, plan: Sequence[AxisOp], text: str):
        super().__init__()
        self.plan, self.text = list(plan), text

    def forward(self, x: Tensor) -> Tensor:
        return apply_plan(x, self.plan, 2, False)

    def extra_repr(self) -> str:
        return self.text


class Index(Layer):
    """``x[idx]`` on activations ``(N, C, *spatial)``: NT's ``stax.Index(idx, batch_axis, channel_axis)``.

    Args:
      idx: an index of the activations in ntkit's channels-first layout, written with :data:`Slice`
        (``Slice[:, :, 1:5, ::-1]``, ``Slice[..., 0]``); ints remove their axis. Entries 0 (batch) and 1
        (channels) must be ``:`` (see the module docstring).
      batch_axis, channel_axis: the layout, fixed in ntkit's native layers to ``0`` and ``1`` (accepted for NT's
        signature; NT's own layouts are translated by :mod:`ntkit.stax`).

    Kernel rule: the module docstring.
    """

    tracks_means = True

    def __init__(self, idx: IndexArg, batch_axis: int = 0, channel_axis: int = 1):
        check_layout(type(self).__name__, batch_axis, channel_axis)
        self.idx = idx
        self._text = format_index(idx)
        where = f"Index({self._text})"
        items = _check_items(idx, where)
        head = [s for s in (items[: items.index(Ellipsis)] if Ellipsis in items else items) if s is not Ellipsis]
        # what is known before the activations' rank: the batch entry, and an int channel entry
        _check_batch_channel(head[:1], None, where)
        if len(head) > 1 and isinstance(head[1], int):
            _check_batch_channel(head[:2], None, where)

    def _where(self) -> str:
        return f"Index({self._text})"

    def kernel(self, k: Any) -> Kernel:
        k = single(k, self)
        plan = plan_index(self.idx, k.shape1[1:], self._where())
        full = not k.diagonal_spatial and k.spatial_ndim > 0
        out: dict[str, Any] = {}
        for name, nd in (("nngp", 2), ("ntk", 2), ("cov1", 1), ("cov2", 1)):
            t = getattr(k, name)
            out[name] = None if t is None else apply_plan(t, plan, nd, full)
        for name in ("var1", "var2", "mean1", "mean2"):  # same-pixel maps (N, *s)
            t = getattr(k, name)
            out[name] = None if t is None else apply_plan(t, plan, 1, False)
        spatial = out_spatial(plan, k.spatial_shape)
        return k.replace(
            **out,
            shape1=tuple(k.shape1[:2]) + spatial,
            shape2=tuple(k.shape2[:2]) + spatial,
            diagonal_spatial=k.diagonal_spatial or not spatial,
        )

    def build(
        self, in_shape: Any, width: Optional[int], generator: torch.Generator, readout: bool
    ) -> tuple[nn.Module, tuple[int, ...]]:
        s = single_shape(in_shape, self)
        plan = plan_index(self.idx, s, self._where())
        return IndexModule(plan, self._text), (s[0],) + out_spatial(plan, s[1:])

    def __repr__(self) -> str:
        return f"Index({self._text})"


def check_layout(name: str, batch_axis: Any, channel_axis: Any) -> None:
    """ntkit's native layers take activations ``(N, C, *spatial)``: ``batch_axis=0``, ``channel_axis=1``."""
    if batch_axis != 0 or channel_axis != 1 or isinstance(batch_axis, bool) or isinstance(channel_axis, bool):
        raise LayerError(
            f"{name}(batch_axis={batch_axis!r}, channel_axis={channel_axis!r}): ntkit's layers take activations "
            f"(N, C, *spatial), batch_axis=0 and channel_axis=1; write the other axis arguments in that layout. "
            f"For NT's layouts (channels last: (N, H, W, C)) use ntkit.stax.{name}, which translates them."
        )
