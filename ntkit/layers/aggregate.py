"""Graph aggregation: ``Aggregate`` (NT's ``stax.Aggregate``; Du et al. 2019, "Graph Neural Tangent Kernel"),
and the per-sample keyword arguments of ``kernel_fn`` that carry its graphs.

Each sample ``x[n]`` ``(C, *spatial)`` comes with a graph over its positions on the aggregated axes (by default
every spatial axis; ``aggregate_axis`` counts axes in ntkit's layout ``(N, C, *spatial)``, so ``2`` is the first
spatial axis). Every vertex is replaced by the weighted sum of its predecessors::

    y[n, c, j] = Σ_i x[n, c, i] P[n, i, j]          (P[n, i, j]: the weight of the edge i -> j of sample n)

with ``i, j`` multi-indices over the aggregated axes (other axes are carried along). The pattern ``P`` is given

* ``implementation="DENSE"``: as ``to_dense(p)`` of shape ``(N, X_1..X_K, X_1..X_K)`` (``to_dense`` defaults to
  the identity: ``p`` is the dense adjacency), or
* ``implementation="SPARSE"``: as integer edges ``p`` of shape ``(N, E, K, 2)`` (or ``(N, E, 2)`` for ``K = 1``):
  ``p[n, e, :, 0]`` the tail, ``p[n, e, :, 1]`` the head of edge ``e``, each of weight 1 (repeated edges add up).
  An edge whose head has a negative coordinate is padding and ignored (NT's convention). An edge with a valid
  head but a negative tail is refused (NT 0.6.5 reads such a tail as the *last* vertex, silently), and so is a
  coordinate past the end of its axis (NT wraps it around). NT 0.6.5's SPARSE ``kernel_fn`` over two or more axes
  has a bug that ntkit does not reproduce: it ignores ``Kernel.is_reversed``, so after a ``Conv`` it reads vertex
  ``(h, w)`` as the pixel at flat position ``h·W + w`` of the reversed ``(W, H)`` layout (a scrambled graph; its
  DENSE path, its ``apply_fn`` and 1-D graphs are right): ntkit's SPARSE kernel equals NT's DENSE one on the same
  edges (``tests/layers/test_aggregate.py``).

Kernel rule (linear in the activations with sample-dependent weights; NT 0.6.5 ``stax.Aggregate``)::

    K'[n1, n2, j, j'] = Σ_{i, i'} P1[n1, i, j] K[n1, n2, i, i'] P2[n2, i', j'],        Θ' likewise

``cov1`` with ``P1`` on both sides, ``cov2`` with ``P2``; the means ``m'[n, j] = Σ_i P[n, i, j] m[n, i]``. It mixes
positions: the layer needs the full pixel-pixel covariances (``needs_full_spatial``).

Where the graphs come from
--------------------------
* per sample, at call time, as NT: ``net.kernel_fn(x1, x2, pattern=(p1, p2))`` (``p1`` for the samples of ``x1``,
  ``p2`` for those of ``x2``; with ``x2=None``, ``pattern=(p1, None)`` or ``(p1, p1)``), and for the finite twin
  ``with layer_kwargs(pattern=p): y = model(x)`` (NT's ``apply_fn(params, x, pattern=p)``). ``pattern=(None,
  None)`` is the identity (NT's default when no pattern is given; here a missing pattern is an error, not a
  silent identity);
* one graph for every sample: ``Aggregate(shared_pattern=A)``, ``A`` the per-sample pattern without its batch
  axis (``(X.., X..)`` dense, ``(E, K, 2)`` sparse); such a layer takes no call-time pattern.

The mechanism (generic: any layer may take per-sample keyword arguments)
----------------------------------------------------------------------
A layer declares the keyword arguments of ``kernel_fn`` it reads in ``kernel_kwargs`` (a tuple of names).
``Net.kernel_fn(x1, x2, ..., **kwargs)`` checks the names against its layers and builds a
:class:`SampleKwargs`; the tiler then slices *sample numbers* in place of the inputs, and every tile runs with the
rows of its samples of each value (:meth:`SampleKwargs.tile`), which a layer reads with :func:`tile_kwargs` — so a
tile of samples ``r0:r1`` against ``c0:c1`` gets ``(p1[r0:r1], p2[c0:c1])``, as NT's ``nt.batch`` slices them.
Without keyword arguments ``kernel_fn`` runs exactly as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError, single, single_shape
from ntkit.layers.index import check_layout

__all__ = [
    "Aggregate",
    "AggregateModule",
    "IMPLEMENTATIONS",
    "SampleKwargs",
    "layer_kwargs",
    "tile_kwargs",
    "declared_kwargs",
    "dense_pattern",
]

#: the values of ``Aggregate(implementation=...)`` (NT's ``AggregateImplementation``)
IMPLEMENTATIONS = ("DENSE", "SPARSE")

Pair = tuple[Optional[Tensor], Optional[Tensor]]

# ---------------------------------------------------------------------------------------------------
# per-sample keyword arguments: kernel_fn(..., pattern=(p1, p2)) -> the tiles; layer_kwargs(...) -> the twins
# ---------------------------------------------------------------------------------------------------
_TILE: contextvars.ContextVar[Optional[Mapping[str, Pair]]] = contextvars.ContextVar("ntkit_tile_kwargs", default=None)
_FORWARD: contextvars.ContextVar[Optional[Mapping[str, Any]]] = contextvars.ContextVar(
    "ntkit_forward_kwargs", default=None
)
_MISSING = object()


def declared_kwargs(layer: Layer) -> dict[str, list[str]]:
    """The per-sample keyword arguments the layers of ``layer`` read (their ``kernel_kwargs``): name -> layers."""
    out: dict[str, list[str]] = {}
    for name in getattr(layer, "kernel_kwargs", ()):
        out.setdefault(name, []).append(type(layer).__name__)
    for sub in layer.sublayers():
        for name, who in declared_kwargs(sub).items():
            out.setdefault(name, []).extend(who)
    return out


def tile_kwargs() -> Mapping[str, Pair]:
    """The per-sample keyword arguments of the tile being computed: name -> ``(v1, v2)``, the rows of the tile's
    samples of x1 and of x2 (``v2`` is ``None`` on a tile of x1 against itself). Empty outside ``kernel_fn``."""
    return _TILE.get() or {}


def _as_value(v: Any, what: str) -> Tensor:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    raise LayerError(
        f"{what} is a {type(v).__name__}; per-sample keyword arguments of kernel_fn are tensors or numpy arrays "
        f"whose leading axis runs over the samples."
    )


class SampleKwargs:
    """The per-sample keyword arguments of one ``Net.kernel_fn`` call, handed to each tile with its samples' rows.

    Built by :meth:`of`; the tiler slices :meth:`indices` (sample numbers: ``0..n1-1`` for x1, ``n1..n1+n2-1``
    for x2) in place of the inputs, and :meth:`tile` turns a tile's numbers back into its inputs and activates
    the rows of its samples for :func:`tile_kwargs`.
    """

    def __init__(self, values: dict[str, tuple[Optional[Tensor], Optional[Tensor]]], x1: Tensor, x2: Optional[Tensor]):
        self.values, self.x1, self.x2 = values, x1, x2
        self.n1 = x1.shape[0]

    @classmethod
    def of(cls, net: Layer, kwargs: Mapping[str, Any], x1: Tensor, x2: Optional[Tensor]) -> Optional[SampleKwargs]:
        """Check ``kernel_fn``'s keyword arguments against the layers of ``net``; ``None`` when there are none."""
        if not kwargs:
            return None
        declared = declared_kwargs(net)
        unknown = sorted(set(kwargs) - set(declared))
        if unknown:
            takes = ", ".join(f"{n} ({', '.join(sorted(set(w)))})" for n, w in sorted(declared.items())) or "none"
            raise TypeError(
                f"kernel_fn() got unexpected keyword argument(s) {unknown}; the layers of this network take: {takes}."
            )
        values: dict[str, tuple[Optional[Tensor], Optional[Tensor]]] = {}
        n1, n2 = x1.shape[0], None if x2 is None else x2.shape[0]
        for name, v in kwargs.items():
            if not (isinstance(v, (tuple, list)) and len(v) == 2):
                raise LayerError(
                    f"kernel_fn({name}=...) takes a pair ({name}1, {name}2), one value for the samples of x1 and "
                    f"one for those of x2, as NT (x2=None: ({name}1, None)); got a {type(v).__name__}."
                )
            a = None if v[0] is None else _as_value(v[0], f"{name}[0]")
            b = None if v[1] is None else _as_value(v[1], f"{name}[1]")
            if x2 is None and b is not None:
                same = b is a or (
                    a is not None and a.shape == b.shape and a.layout == b.layout and bool(torch.equal(a, b))
                )
                if not same:
                    raise LayerError(
                        f"kernel_fn(x1, None, {name}=({name}1, {name}2)): x2 is None, so {name}2 must be None or "
                        f"{name}1 (the samples of x2 are those of x1)."
                    )
                b = None
            for t, n, side in ((a, n1, "x1"), (b, n2, "x2")):
                if t is not None and (t.dim() == 0 or t.shape[0] != n):
                    raise LayerError(
                        f"kernel_fn({name}=...): the value for {side} has shape {tuple(t.shape)}, but its leading "
                        f"axis must run over the {n} samples of {side}."
                    )
            if x2 is not None and (a is None) != (b is None):
                raise LayerError(
                    f"kernel_fn({name}=({name}1, {name}2)): give both values or neither (None, None); got one."
                )
            values[name] = (
                None if a is None else a.to(x1.device),
                None if b is None else b.to(x1.device),
            )
        return cls(values, x1, x2)

    def indices(self) -> tuple[Tensor, Optional[Tensor]]:
        """What the tiler slices in place of ``(x1, x2)``: the sample numbers of x1 and of x2."""
        dev = self.x1.device
        i1 = torch.arange(self.n1, device=dev)
        return i1, None if self.x2 is None else torch.arange(self.n1, self.n1 + self.x2.shape[0], device=dev)

    def _side(self, idx: Tensor) -> tuple[int, Tensor]:
        lo, hi = (int(v) for v in idx[[0, -1]].tolist())
        if hi < self.n1:
            return 1, idx
        if lo >= self.n1 and self.x2 is not None:
            return 2, idx - self.n1
        raise AssertionError(f"a tile mixes the samples of x1 and x2 ({lo}..{hi}, n1 = {self.n1})")

    @contextlib.contextmanager
    def tile(self, a: Tensor, b: Optional[Tensor]) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        """The inputs of the tile of sample numbers ``(a, b)``, with its rows of every value active."""
        sa, ra = self._side(a)
        xa = (self.x1 if sa == 1 else self.x2).index_select(0, ra)  # type: ignore[union-attr]
        xb: Optional[Tensor] = None
        if b is not None:
            sb, rb = self._side(b)
            xb = (self.x1 if sb == 1 else self.x2).index_select(0, rb)  # type: ignore[union-attr]
        rows: dict[str, Pair] = {}
        for name, (v1, v2) in self.values.items():
            va = v1 if sa == 1 else v2
            vb = None if b is None else (v1 if sb == 1 else v2)
            rows[name] = (
                None if va is None else va.index_select(0, ra),
                None if (vb is None or b is None) else vb.index_select(0, rb),
            )
        token = _TILE.set(rows)
        try:
            yield xa, xb
        finally:
            _TILE.reset(token)


@contextlib.contextmanager
def layer_kwargs(**kwargs: Any) -> Iterator[None]:
    """Keyword arguments for the finite twins of layers that take them, during the block: ``with
    layer_kwargs(pattern=p): y = model(x)`` is NT's ``apply_fn(params, x, pattern=p)`` (a ``torch.nn.Sequential``
    cannot pass keyword arguments to its modules). Blocks nest; the innermost value of a name wins."""
    outer = _FORWARD.get() or {}
    token = _FORWARD.set({**outer, **kwargs})
    try:
        yield
    finally:
        _FORWARD.reset(token)


# ---------------------------------------------------------------------------------------------------
# patterns
# ---------------------------------------------------------------------------------------------------
def _axes_of(aggregate_axis: Union[int, Sequence[int], None], ndim: int, where: str) -> tuple[int, ...]:
    """The aggregated axes of activations of rank ``ndim``, in increasing order."""
    if aggregate_axis is None:
        return tuple(range(2, ndim))
    raw = (aggregate_axis,) if isinstance(aggregate_axis, int) else tuple(aggregate_axis)
    out = []
    for a in raw:
        if not -ndim <= a < ndim:
            raise LayerError(f"{where}: aggregate_axis {a} is out of range for activations of rank {ndim}.")
        a %= ndim
        if a in (0, 1):
            raise LayerError(
                f"{where}: aggregate_axis {a} is the {'batch' if a == 0 else 'channel'} axis; aggregate spatial "
                f"axes only (>= 2: the layout is (N, C, *spatial))."
            )
        out.append(a)
    if len(set(out)) != len(out) or not out:
        raise LayerError(f"{where}: aggregate_axis {aggregate_axis!r} must name distinct spatial axes.")
    return tuple(sorted(out))  # NT sorts them too: the dense pattern's axes follow the increasing order


def dense_pattern(
    p: Tensor, sizes: Sequence[int], implementation: str, to_dense: Optional[Callable[[Any], Any]], where: str
) -> Tensor:
    """The dense pattern ``(N, *sizes, *sizes)`` of a per-sample pattern ``p`` (leading axis: the samples), in
    ``p``'s batch order; float64 for the sparse form, ``to_dense(p)``'s dtype for the dense one."""
    sizes = tuple(sizes)
    n = p.shape[0]
    if implementation == "DENSE":
        d = p if to_dense is None else to_dense(p)
        if isinstance(d, np.ndarray):
            d = torch.from_numpy(d)
        if not isinstance(d, Tensor):
            raise LayerError(f"{where}: to_dense(pattern) must return a tensor, got {type(d).__name__}.")
        if d.is_sparse:
            d = d.to_dense()
        if tuple(d.shape) != (n,) + sizes + sizes:
            raise LayerError(
                f"{where}: the dense pattern has shape {tuple(d.shape)}, expected (batch, *X, *X) = "
                f"{(n,) + sizes + sizes} for the aggregated axes of sizes {sizes}"
                + ("" if to_dense is None else " (after to_dense)")
                + "."
            )
        if d.dtype == torch.bool:
            d = d.to(torch.float64)
        return d
    tail, head, ok = sparse_edges(p, sizes, where)
    v = math.prod(sizes)
    out = torch.zeros(n, v * v, dtype=torch.float64, device=p.device)
    out.scatter_add_(1, tail * v + head, ok.to(torch.float64))  # P[n, tail, head] += 1 per edge
    return out.reshape((n,) + sizes + sizes)


def sparse_edges(p: Tensor, sizes: Sequence[int], where: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(tail, head, ok)`` ``(N, E)`` of integer edges ``p`` ``(N, E, K, 2)`` (or ``(N, E, 2)`` for ``K = 1``):
    flat (row-major) vertex numbers, 0 for padding edges, and ``ok`` false for those. Refuses what NT would read
    silently otherwise (see the module docstring)."""
    sizes = tuple(sizes)
    k = len(sizes)
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
        raise LayerError(f"{where}: a SPARSE pattern holds integer vertex coordinates, got dtype {p.dtype}.")
    e = p.unsqueeze(2) if (k == 1 and p.dim() == 3) else p
    if e.dim() != 4 or e.shape[2] != k or e.shape[3] != 2:
        raise LayerError(
            f"{where}: a SPARSE pattern has shape (batch, n_edges, K, 2) with K = {k} aggregated axes"
            + (" (or (batch, n_edges, 2))" if k == 1 else "")
            + f"; got {tuple(p.shape)}."
        )
    e = e.to(torch.int64)
    tails, heads = e[..., 0], e[..., 1]  # (N, E, K)
    size = torch.tensor(sizes, dtype=torch.int64, device=e.device)
    if bool((e >= size[:, None]).any()):
        raise LayerError(
            f"{where}: a SPARSE pattern has a coordinate past the end of its axis (sizes {sizes}); NT 0.6.5 would "
            f"wrap it around. Give coordinates 0 <= c < size, and -1 for padding edges."
        )
    ok = (heads >= 0).all(-1)
    if bool((ok & ~(tails >= 0).all(-1)).any()):
        raise LayerError(
            f"{where}: a SPARSE pattern has an edge with a valid head but a negative tail. Padding edges need a "
            f"negative head (-1 on both ends is clearest); NT 0.6.5 would read such a tail as the last vertex."
        )
    stride = torch.tensor([math.prod(sizes[i + 1 :]) for i in range(k)], dtype=torch.int64, device=e.device)
    zero = torch.zeros((), dtype=torch.int64, device=e.device)
    return torch.where(ok, (tails * stride).sum(-1), zero), torch.where(ok, (heads * stride).sum(-1), zero), ok


def _letters(ndim: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """Einsum letters of each spatial axis: x1 side, x2 side, and the aggregated axes' outputs on each side."""
    pool = "abdefghklmopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    n = ndim - 2
    if 4 * n > len(pool):
        raise LayerError(f"Aggregate supports at most {len(pool) // 4} spatial axes, got {n}.")
    left, right, out_l, out_r = (list(pool[q * n : (q + 1) * n]) for q in range(4))
    return left, right, out_l, out_r


class AggregateModule(nn.Module):
    """Finite twin of :class:`Aggregate`: ``y[n, c, j] = Σ_i x[n, c, i] P[n, i, j]`` (the sparse form by a
    gather and a scatter-add, ``O(V + E)``). The pattern comes from ``forward(x, pattern)``, else
    :func:`layer_kwargs`, else the layer's ``shared_pattern``."""

    def __init__(self, layer: Aggregate, ndim: int):
        super().__init__()
        self.layer_repr = repr(layer)
        self.axes = _axes_of(layer.aggregate_axis, ndim, self.layer_repr)
        self.implementation, self.to_dense = layer.implementation, layer.to_dense
        self.shared: Optional[Tensor]
        self.register_buffer("shared", None if layer.shared_pattern is None else layer.shared_pattern.clone())

    def _pattern(self, x: Tensor, pattern: Any) -> Optional[Tensor]:
        if pattern is _MISSING:
            pattern = (_FORWARD.get() or {}).get("pattern", _MISSING)
        if pattern is _MISSING:
            if self.shared is None:
                raise LayerError(
                    f"{self.layer_repr} needs each sample's graph: run the model inside "
                    f"`with ntkit.layers.layer_kwargs(pattern=p):` (p's leading axis over the samples), or call "
                    f"this module as module(x, pattern=p); pattern=None is the identity."
                )
            return self.shared.expand((x.shape[0],) + tuple(self.shared.shape))
        if pattern is None:
            return None
        p = _as_value(pattern, "pattern")
        if p.dim() == 0 or p.shape[0] != x.shape[0]:
            raise LayerError(
                f"{self.layer_repr}: the pattern has shape {tuple(p.shape)}, but its leading axis must run over the "
                f"{x.shape[0]} samples of the batch."
            )
        return p.to(x.device)

    def forward(self, x: Tensor, pattern: Any = _MISSING) -> Tensor:
        p = self._pattern(x, pattern)
        if p is None:
            return x
        sizes = tuple(x.shape[a] for a in self.axes)
        k = len(self.axes)
        rest = [a for a in range(2, x.dim()) if a not in self.axes]
        xm = x.permute([0, 1, *rest, *self.axes])  # (N, C, *rest, *X)
        lead = xm.shape[: xm.dim() - k]
        v = math.prod(sizes)
        if self.implementation == "DENSE":
            d = dense_pattern(p, sizes, "DENSE", self.to_dense, self.layer_repr).to(dtype=x.dtype, device=x.device)
            y = torch.einsum("nmi,nij->nmj", xm.reshape(x.shape[0], -1, v), d.reshape(x.shape[0], v, v))
        else:
            t, h, ok = (q.to(x.device) for q in sparse_edges(p, sizes, self.layer_repr))
            xf = xm.reshape(x.shape[0], -1, v)  # (N, M, V)
            msgs = xf.gather(2, t[:, None, :].expand(-1, xf.shape[1], -1)) * ok[:, None, :].to(x.dtype)
            y = torch.zeros_like(xf).scatter_add_(2, h[:, None, :].expand(-1, xf.shape[1], -1), msgs)
        y = y.reshape(tuple(lead) + sizes)
        inv = [0] * x.dim()
        for i, a in enumerate([0, 1, *rest, *self.axes]):
            inv[a] = i
        return y.permute(inv)

    def extra_repr(self) -> str:
        return self.layer_repr


class Aggregate(Layer):
    """``Aggregate(aggregate_axis=None, batch_axis=0, channel_axis=1, to_dense=None, implementation="DENSE",
    shared_pattern=None)``: NT's ``stax.Aggregate``, on activations ``(N, C, *spatial)``.

    Args:
      aggregate_axis: the spatial axes the graph is over (an int or a sequence, counted in ``(N, C, *spatial)``;
        ``None``: every spatial axis); the dense pattern's axes follow them in increasing order (NT's).
      batch_axis, channel_axis: fixed to ``0`` and ``1`` in ntkit's native layers (see :class:`Index`).
      to_dense: ``"DENSE"`` only: a function turning a pattern (its rows for the samples being computed) into the
        dense ``(N, *X, *X)`` adjacency; ``None``: the pattern is dense already (NT's ``lambda p: p``).
      implementation: ``"DENSE"`` or ``"SPARSE"`` (integer edges), see the module docstring. The kernel works on
        the dense form in both (``O(V²)`` memory per sample, as the kernel itself).
      shared_pattern: one pattern for every sample (without the batch axis); the layer then takes no
        call-time ``pattern``.

    Kernel rule and where patterns come from: the module docstring.
    """

    needs_full_spatial = True
    tracks_means = True

    def __init__(
        self,
        aggregate_axis: Union[int, Sequence[int], None] = None,
        batch_axis: int = 0,
        channel_axis: int = 1,
        to_dense: Optional[Callable[[Any], Any]] = None,
        implementation: str = "DENSE",
        shared_pattern: Any = None,
    ):
        check_layout(type(self).__name__, batch_axis, channel_axis)
        impl = getattr(implementation, "value", implementation)  # NT's AggregateImplementation enum
        if not isinstance(impl, str) or impl.upper() not in IMPLEMENTATIONS:
            raise LayerError(f"Aggregate(implementation={implementation!r}): choose 'DENSE' or 'SPARSE'.")
        self.implementation = impl.upper()
        if aggregate_axis is not None:
            raw = (aggregate_axis,) if isinstance(aggregate_axis, int) else tuple(aggregate_axis)
            if not raw or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in raw):
                raise LayerError(
                    f"Aggregate(aggregate_axis={aggregate_axis!r}): give None, an int or a sequence of ints."
                )
            aggregate_axis = int(raw[0]) if isinstance(aggregate_axis, int) else tuple(int(a) for a in raw)
        self.aggregate_axis = aggregate_axis
        if to_dense is not None and not callable(to_dense):
            raise LayerError(f"Aggregate(to_dense={to_dense!r}) must be a function of the pattern, or None.")
        if to_dense is not None and self.implementation == "SPARSE":
            raise LayerError("Aggregate: to_dense is for implementation='DENSE'; a SPARSE pattern is integer edges.")
        self.to_dense = to_dense
        self.shared_pattern: Optional[Tensor] = None
        if shared_pattern is not None:
            sp = _as_value(shared_pattern, "shared_pattern")
            self.shared_pattern = sp.to(torch.float64) if sp.is_floating_point() else sp.clone()
        #: the per-sample keyword arguments of kernel_fn this layer reads (ntkit.layers.aggregate)
        self.kernel_kwargs: tuple[str, ...] = () if shared_pattern is not None else ("pattern",)

    def _where(self) -> str:
        return repr(self)

    def _patterns(self, k: Kernel) -> Optional[tuple[Tensor, Tensor]]:
        """``(P1, P2)`` for this record (``None``: the identity)."""
        n1, n2 = k.shape1[0], k.shape2[0]
        if self.shared_pattern is not None:
            s = self.shared_pattern.to(k.device)
            return s.expand((n1,) + tuple(s.shape)), s.expand((n2,) + tuple(s.shape))
        got = tile_kwargs().get("pattern")
        if got is None:
            raise LayerError(
                f"{self._where()} needs each sample's graph: net.kernel_fn(x1, x2, pattern=(p1, p2)) (x2=None: "
                f"pattern=(p1, None)); pattern=(None, None) is the identity (NT's default). For one graph shared by "
                f"every sample use Aggregate(shared_pattern=A). (ntkit.tiling and other callers that do not forward "
                f"kernel_fn's keyword arguments cannot run per-sample graphs yet.)"
            )
        p1, p2 = got
        if p1 is None and (p2 is None or k.x1_is_x2):
            return None
        if k.x1_is_x2:
            p2 = p1
        if p1 is None or p2 is None:
            raise LayerError(f"{self._where()}: give a pattern for both x1 and x2, or (None, None) for the identity.")
        for p, n, side in ((p1, n1, "x1"), (p2, n2, "x2")):
            if p.shape[0] != n:
                raise AssertionError(f"the tile's {side} pattern has {p.shape[0]} rows for {n} samples")
        return p1, p2

    def kernel(self, k: Any) -> Kernel:
        k = single(k, self)
        where = self._where()
        if k.spatial_ndim == 0:
            raise LayerError(
                f"{where} aggregates spatial axes but its input has none (per-sample shape {k.shape1[1:]}): the "
                f"graph's vertices are positions of a spatial axis, channels first (N, C, *spatial)."
            )
        if k.diagonal_spatial:
            raise LayerError(
                f"{where} needs the full pixel-pixel covariance, but the kernel tracks only the diagonal. Call it "
                f"through a network (serial(...).kernel_fn), which tracks the full covariance whenever a layer "
                f"needs it."
            )
        pats = self._patterns(k)
        if pats is None:
            return k
        ndim = len(k.shape1)
        axes = _axes_of(self.aggregate_axis, ndim, where)
        sizes = tuple(k.shape1[a] for a in axes)
        d1 = dense_pattern(pats[0], sizes, self.implementation, self.to_dense, where).to(k.dtype)
        d2 = d1 if pats[1] is pats[0] else dense_pattern(pats[1], sizes, self.implementation, self.to_dense, where)
        d2 = d2.to(k.dtype)
        left, right, out_l, out_r = _letters(ndim)
        sp = [a - 2 for a in axes]
        kin = "".join(l + r for l, r in zip(left, right))
        ol = [out_l[a] if a in sp else left[a] for a in range(ndim - 2)]
        orr = [out_r[a] if a in sp else right[a] for a in range(ndim - 2)]
        kout = "".join(l + r for l, r in zip(ol, orr))
        pl = "".join(left[a] for a in sp) + "".join(out_l[a] for a in sp)
        pr = "".join(right[a] for a in sp) + "".join(out_r[a] for a in sp)

        def both(t: Optional[Tensor], batch: str, a: Tensor, b: Tensor) -> Optional[Tensor]:
            if t is None:
                return None
            b1, b2 = batch[0], batch[-1]
            t = torch.einsum(f"{b1}{pl},{batch}{kin}->{batch}{kin.translate(_swap(left, out_l, sp))}", a, t)
            return torch.einsum(f"{b2}{pr},{batch}{_mid(kin, left, out_l, sp)}->{batch}{kout}", b, t)

        out: dict[str, Any] = dict(
            nngp=both(k.nngp, "ij", d1, d2),
            ntk=both(k.ntk, "ij", d1, d2),
            cov1=both(k.cov1, "i", d1, d1),
            cov2=None if k.cov2 is None else both(k.cov2, "i", d2, d2),
        )
        ml = "".join(left)
        mo = "".join(ol)
        out["mean1"] = None if k.mean1 is None else torch.einsum(f"i{pl},i{ml}->i{mo}", d1, k.mean1)
        out["mean2"] = None if k.mean2 is None else torch.einsum(f"i{pl},i{ml}->i{mo}", d2, k.mean2)
        out["var1"] = out["var2"] = None  # not functions of the same-pixel variances; the tiler's tape replaces them
        return k.replace(**out).with_exact_diagonal()

    def build(
        self, in_shape: Any, width: Optional[int], generator: torch.Generator, readout: bool
    ) -> tuple[nn.Module, Any]:
        s = single_shape(in_shape, self)
        if len(s) < 2:
            raise LayerError(f"{self._where()} aggregates spatial axes but its input has per-sample shape {tuple(s)}.")
        return AggregateModule(self, len(s) + 1), s

    def __repr__(self) -> str:
        args = []
        if self.aggregate_axis is not None:
            args.append(f"aggregate_axis={self.aggregate_axis!r}")
        if self.to_dense is not None:
            args.append(f"to_dense={getattr(self.to_dense, '__name__', 'fn')}")
        if self.implementation != "DENSE":
            args.append(f"implementation={self.implementation!r}")
        if self.shared_pattern is not None:
            args.append(f"shared_pattern=<{tuple(self.shared_pattern.shape)}>")
        return f"Aggregate({', '.join(args)})"


def _swap(left: list[str], out_l: list[str], sp: list[int]) -> dict[int, str]:
    """``str.translate`` table: the x1-side letters of the aggregated axes -> their output letters."""
    return {ord(left[a]): out_l[a] for a in sp}


def _mid(kin: str, left: list[str], out_l: list[str], sp: list[int]) -> str:
    """The kernel's subscripts after the x1 side has been aggregated."""
    return kin.translate(_swap(left, out_l, sp))
