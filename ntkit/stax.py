"""NT's ``stax`` on top of ntkit: NT's layer names, signatures, keyword names, defaults and layouts.

``from ntkit import stax`` in place of ``from neural_tangents import stax`` runs NT code unchanged apart from its
arrays: every layer returns NT's triple ``(init_fn, apply_fn, kernel_fn)``; inputs are in NT's layout (channels
last by default: ``(N, H, W, C)``; ``batch_axis``/``channel_axis``/``dimension_numbers`` as in NT), as numpy
arrays or torch tensors; ``kernel_fn(x1, x2=None, get=None, *, diagonal_batch=True, diagonal_spatial=False,
**kwargs)`` returns an ntkit :class:`~ntkit.kernel.Kernel` (``get=None``), one tensor (a name) or a namedtuple in
the order asked (a tuple of names), as NT does.

Each layer is the ntkit layer of the same name (``.layer`` of the triple), so a stax network is an ntkit
network: ``stax.serial(...).layer.kernel_fn`` / ``.module(...)`` are the native API. The translation is the
only thing done here:

* layouts: inputs are moved to PyTorch's ``(N, C, *spatial)`` (the spatial axes keep their order, so kernels
  come back in NT's layout: ``(N1, N2)``, ``(N1, N2, H, W)`` or ``(N1, N2, H, H', W, W')``);
* keyword names: ``out_dim``/``out_chan``/``filter_shape`` → ``out_features``/``out_channels``/``kernel_size``;
* ``init_fn(rng, input_shape)`` returns ``(output_shape, params)`` with ``params`` the finite twin, a
  ``torch.nn.Module`` drawn with seed ``rng`` (an int or a ``torch.Generator``: NT's ``PRNGKey`` has no torch
  counterpart), and ``apply_fn(params, x)`` runs it on NT-layout inputs and returns NT-layout outputs.

NT behaviours ntkit does not reproduce (NT bugs): ``Sign`` on full pixel covariances, ``ExpNormalized``'s shape
propagation and ``RectifiedMonomial``'s NaNs at ρ = ±1 give the mathematically right kernels here; see the
migration guide in the documentation.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ntkit import layers as L
from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError
from ntkit.layers.index import Slice
from ntkit.nets import Net
from ntkit.nets import parallel as _parallel
from ntkit.nets import serial as _serial
from ntkit.nets.combinators import KERNEL_FIELDS

__all__ = [
    "Padding",
    "StaxLayer",
    "ABRelu",
    "Abs",
    "AvgPool",
    "Conv",
    "Cos",
    "Dense",
    "Elementwise",
    "ElementwiseNumerical",
    "Erf",
    "Exp",
    "ExpNormalized",
    "FanInConcat",
    "FanInProd",
    "FanInSum",
    "FanOut",
    "Flatten",
    "Gaussian",
    "Gelu",
    "GlobalAvgPool",
    "GlobalSumPool",
    "Hermite",
    "Identity",
    "LayerNorm",
    "LeakyRelu",
    "Monomial",
    "Polynomial",
    "Rbf",
    "RectifiedMonomial",
    "Relu",
    "Sigmoid_like",
    "Sign",
    "Sin",
    "SumPool",
    "GlobalSelfAttention",
    "Aggregate",
    "AggregateImplementation",
    "AttentionMechanism",
    "PositionalEmbedding",
    "DotGeneral",
    "Dropout",
    "ConvTranspose",
    "ConvLocal",
    "Index",
    "Gabor",
    "repeat",
    "Slice",
    "ImageResize",
    "parallel",
    "serial",
]


class Padding(enum.Enum):
    """NT's padding names."""

    CIRCULAR = "CIRCULAR"
    SAME = "SAME"
    VALID = "VALID"


# ---------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the batch and channel axes of NT-layout activations are (``None``: the layer does not say)."""

    batch_axis: Optional[int] = None
    channel_axis: Optional[int] = None

    def known(self) -> bool:
        return self.batch_axis is not None or self.channel_axis is not None

    def merged(self, other: _Layout) -> _Layout:
        """The layout of a network from its layers' (the first layer that says decides; others must agree)."""
        if not self.known():
            return other
        if other.known() and (other.batch_axis, other.channel_axis) != (self.batch_axis, self.channel_axis):
            if not _same(self, other):
                raise ValueError(
                    f"layers use different layouts (batch_axis, channel_axis) = {(self.batch_axis, self.channel_axis)} "
                    f"and {(other.batch_axis, other.channel_axis)}; ntkit.stax needs one layout for the whole network "
                    f"(give every layer the same batch_axis/channel_axis/dimension_numbers)."
                )
        return self

    def to_torch(self, x: Tensor) -> Tensor:
        """NT layout -> ``(N, C, *spatial)``."""
        if x.dim() <= 2:
            return x if (self.batch_axis or 0) % max(x.dim(), 1) == 0 else x.T
        b = (0 if self.batch_axis is None else self.batch_axis) % x.dim()
        c = (-1 if self.channel_axis is None else self.channel_axis) % x.dim()
        rest = [a for a in range(x.dim()) if a not in (b, c)]
        return x.permute(b, c, *rest).contiguous()

    def from_torch(self, y: Tensor) -> Tensor:
        """``(N, C, *spatial)`` -> NT layout (for the finite twin's outputs)."""
        if y.dim() <= 2:
            return y
        b = (0 if self.batch_axis is None else self.batch_axis) % y.dim()
        c = (-1 if self.channel_axis is None else self.channel_axis) % y.dim()
        order: list[Optional[int]] = [None] * y.dim()
        order[b], order[c] = 0, 1
        rest = iter(range(2, y.dim()))
        perm = [next(rest) if o is None else o for o in order]
        return y.permute(*perm).contiguous()


def _same(a: _Layout, b: _Layout) -> bool:
    return (a.batch_axis or 0, -1 if a.channel_axis is None else a.channel_axis) == (
        b.batch_axis or 0,
        -1 if b.channel_axis is None else b.channel_axis,
    )


def _layout_of_dimension_numbers(dimension_numbers: Optional[tuple[str, str, str]], rank: int) -> _Layout:
    """``('NHWC', 'HWIO', 'NHWC')``-style conv dimension numbers -> the activations' layout."""
    if dimension_numbers is None:
        return _Layout(0, -1)
    lhs, _, out = dimension_numbers
    if lhs != out:
        raise ValueError(
            f"dimension_numbers={dimension_numbers!r}: ntkit.stax needs the same input and output "
            f"layout (e.g. ('NHWC', 'HWIO', 'NHWC'))."
        )
    if len(lhs) != rank + 2 or "N" not in lhs or "C" not in lhs:
        raise ValueError(
            f"dimension_numbers={dimension_numbers!r} do not describe {rank}-D convolutions "
            f"(e.g. {('N' + 'DHW'[3 - rank :] + 'C', 'DHW'[3 - rank :] + 'IO', 'N' + 'DHW'[3 - rank :] + 'C')})."
        )
    spatial = [ch for ch in lhs if ch not in "NC"]
    if spatial != sorted(spatial, key="DHW".index) and set(spatial) <= set("DHW"):
        raise ValueError(f"dimension_numbers={dimension_numbers!r}: spatial axes must keep their order (D, H, W).")
    return _Layout(lhs.index("N"), lhs.index("C") - len(lhs))


# ---------------------------------------------------------------------------------------------------
# the triple
# ---------------------------------------------------------------------------------------------------
def _as_tensor(x: Any) -> Any:
    if x is None or isinstance(x, (Tensor, Kernel)):
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_as_tensor(v) for v in x)
    return torch.from_numpy(np.array(x))


def _package(k: Any, names: tuple[str, ...], single: bool) -> Any:
    if single:
        return getattr(k, names[0]) if isinstance(k, Kernel) else k
    return collections.namedtuple("Kernel", names)(*(getattr(k, n) for n in names))


def _get_names(get: Union[str, Sequence[str], None]) -> tuple[tuple[str, ...], bool]:
    if get is None:
        return (), False
    single = isinstance(get, str)
    names = (get,) if isinstance(get, str) else tuple(get)
    bad = [g for g in names if g not in KERNEL_FIELDS]
    if bad:
        raise ValueError(f"get={get!r}: choose from {KERNEL_FIELDS} (a name or a tuple of names).")
    return names, single


class StaxLayer(tuple):
    """NT's layer triple ``(init_fn, apply_fn, kernel_fn)``; ``.layer`` is the ntkit layer, ``.layout`` the NT
    layout its inputs are read in."""

    layer: Layer
    layout: _Layout

    def __new__(cls, layer: Layer, layout: _Layout = _Layout()) -> StaxLayer:
        self = super().__new__(cls, (_init_fn(layer, layout), _apply_fn(layer, layout), _kernel_fn(layer, layout)))
        self.layer, self.layout = layer, layout
        return self


def _net(layer: Layer) -> Net:
    return layer if isinstance(layer, Net) else _serial(layer)


def _kernel_fn(layer: Layer, layout: _Layout) -> Callable:
    net = _net(layer)

    def kernel_fn(
        x1: Any,
        x2: Any = None,
        get: Union[str, Sequence[str], None] = None,
        *,
        diagonal_batch: bool = True,
        diagonal_spatial: bool = False,
        **kwargs: Any,
    ) -> Any:
        """NT's ``kernel_fn``: inputs in NT's layout (see :mod:`ntkit.stax`), or ntkit Kernel records."""
        names, single = _get_names(get)
        if isinstance(x1, Kernel) or (isinstance(x1, list) and x1 and isinstance(x1[0], Kernel)):
            k = layer.kernel(x1)
            return k if not names else _package(k, names, single)
        a, b = _as_tensor(x1), _as_tensor(x2)
        a = [layout.to_torch(v) for v in a] if isinstance(a, (list, tuple)) else layout.to_torch(a)
        if b is not None:
            b = [layout.to_torch(v) for v in b] if isinstance(b, (list, tuple)) else layout.to_torch(b)
        want = tuple(g for g in names if g in ("nngp", "ntk")) or ("nngp", "ntk")
        out = net.kernel_fn(a, b, get=want, diagonal_spatial=diagonal_spatial, **kwargs)
        if not diagonal_batch and (not names or {"cov1", "cov2"} & set(names)):
            assert isinstance(out, Kernel), "a tuple get gives a Kernel"
            out = _full_batch_covariances(net, out, a, b, diagonal_spatial, kwargs)
        return out if not names else _package(out, names, single)

    return kernel_fn


def _full_batch_covariances(
    net: Net, out: Kernel, a: Any, b: Any, diagonal_spatial: bool, kwargs: dict[str, Any]
) -> Kernel:
    """NT's ``diagonal_batch=False``: ``cov1``/``cov2`` hold the covariances between all samples of x1 (of x2),
    ``(N1, N1, ...)``: the NNGP of x1 against itself. Only the layout of ``cov1``/``cov2`` differs (NT computes
    the same ``nngp``/``ntk`` either way); per-sample keyword arguments ``(v1, v2)`` go with their side."""

    def side(i: int) -> dict[str, Any]:
        return {k: (v[i], None) if isinstance(v, (tuple, list)) and len(v) == 2 else v for k, v in kwargs.items()}

    def full(x: Any, i: int) -> Tensor:
        k = net.kernel_fn(x, None, get="nngp", diagonal_spatial=diagonal_spatial, **side(i))
        assert isinstance(k, Tensor), "one name gives a tensor"
        return k

    cov1 = out.nngp if (b is None and out.nngp is not None) else full(a, 0)
    return out.replace(cov1=cov1, cov2=None if b is None else full(b, 1))


def _torch_shape(layout: _Layout, input_shape: Any) -> Any:
    if isinstance(input_shape, list):
        return [_torch_shape(layout, s) for s in input_shape]
    shape = tuple(int(s) for s in input_shape)
    if len(shape) <= 2:
        return shape[1:]
    b = (0 if layout.batch_axis is None else layout.batch_axis) % len(shape)
    c = (-1 if layout.channel_axis is None else layout.channel_axis) % len(shape)
    return (shape[c],) + tuple(s for i, s in enumerate(shape) if i not in (b, c))


def _nt_shape(layout: _Layout, shape: Any, batch: int) -> Any:
    if isinstance(shape, list):
        return [_nt_shape(layout, s, batch) for s in shape]
    full = (batch,) + tuple(shape)
    if len(full) <= 2:
        return full
    b = (0 if layout.batch_axis is None else layout.batch_axis) % len(full)
    c = (-1 if layout.channel_axis is None else layout.channel_axis) % len(full)
    out: list = [None] * len(full)
    out[b], out[c] = full[0], full[1]
    rest = iter(full[2:])
    return tuple(next(rest) if o is None else o for o in out)


def _init_fn(layer: Layer, layout: _Layout) -> Callable:
    net = _net(layer)

    def init_fn(rng: Any, input_shape: Any) -> tuple[Any, nn.Module]:
        """``(output_shape, params)``: ``params`` is the finite twin (a ``torch.nn.Module``) drawn with seed
        ``rng`` (an int or a ``torch.Generator``); shapes in NT's layout (batch entry kept as given)."""
        if isinstance(rng, torch.Generator):
            seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        elif isinstance(rng, (int, np.integer)):
            seed = int(rng)
        else:
            raise TypeError(
                f"rng must be an int seed or a torch.Generator, got {type(rng).__name__} (NT's PRNGKey "
                f"has no torch counterpart: pass e.g. 0)."
            )
        in_shape = _torch_shape(layout, input_shape)
        gen = torch.Generator().manual_seed(seed)
        module, out_shape = net.build(in_shape, None, gen, readout=True)
        batch = input_shape[0][0] if isinstance(input_shape, list) else input_shape[0]
        return _nt_shape(layout, out_shape, batch), module.double()

    return init_fn


def _apply_fn(layer: Layer, layout: _Layout) -> Callable:
    def apply_fn(params: nn.Module, inputs: Any, **kwargs: Any) -> Any:
        """The finite twin ``params`` on NT-layout ``inputs`` (NT-layout outputs)."""
        if kwargs.get("mask_constant") is not None:
            raise NotImplementedError(
                "apply_fn(..., mask_constant=...): masked finite networks are not supported by ntkit.stax (only "
                "kernel_fn masks). Zero the masked entries yourself; the finite attention twin takes a mask "
                "directly: GlobalSelfAttentionModule.forward(x, mask=...)."
            )
        x = _as_tensor(inputs)
        if isinstance(x, (list, tuple)):
            x = type(x)(layout.to_torch(v) for v in x)
        else:
            x = layout.to_torch(x)
        p = next(params.parameters(), None)
        if p is not None:
            x = x.to(p.dtype) if isinstance(x, Tensor) else type(x)(v.to(p.dtype) for v in x)
        y = params(x)
        return type(y)(layout.from_torch(v) for v in y) if isinstance(y, (list, tuple)) else layout.from_torch(y)

    return apply_fn


def _wrap(layer: Layer, layout: _Layout = _Layout()) -> StaxLayer:
    return StaxLayer(layer, layout)


def _check_layers(layers: Sequence[Any], who: str) -> list[StaxLayer]:
    for i, l in enumerate(layers):
        if not isinstance(l, StaxLayer):
            raise TypeError(
                f"{who}(...) argument {i} is a {type(l).__name__}, not an ntkit.stax layer: custom "
                f"(init_fn, apply_fn, kernel_fn) triples written for NT cannot be combined; write them "
                f"as ntkit layers (see ntkit/layers/base.py)."
            )
    return list(layers)


# ---------------------------------------------------------------------------------------------------
# combinators
# ---------------------------------------------------------------------------------------------------
def serial(*layers: StaxLayer) -> StaxLayer:
    """NT's ``stax.serial``: the layers in sequence."""
    ls = _check_layers(layers, "serial")
    layout = _Layout()
    for l in ls:
        layout = layout.merged(l.layout)
    return _wrap(_serial(*(l.layer for l in ls)), layout)


def parallel(*layers: StaxLayer) -> StaxLayer:
    """NT's ``stax.parallel``: layer ``i`` on branch ``i`` (after ``FanOut``, or on a tuple of inputs)."""
    ls = _check_layers(layers, "parallel")
    layout = _Layout()
    for l in ls:
        layout = layout.merged(l.layout)
    return _wrap(_parallel(*(l.layer for l in ls)), layout)


def FanOut(num: int) -> StaxLayer:
    """NT's ``stax.FanOut(num)``."""
    return _wrap(L.FanOut(num))


def FanInSum() -> StaxLayer:
    """NT's ``stax.FanInSum()``."""
    return _wrap(L.FanInSum())


def FanInProd() -> StaxLayer:
    """NT's ``stax.FanInProd()``."""
    return _wrap(L.FanInProd())


def FanInConcat(axis: int = -1) -> StaxLayer:
    """NT's ``stax.FanInConcat(axis=-1)``: ``axis`` in NT's layout (``-1``: channels, ``1``: the first spatial axis
    of NHWC activations, ...), translated to ``(N, C, *spatial)``; along a spatial axis the branches must be
    independent zero-mean Gaussians (:class:`ntkit.layers.FanInConcat`, NT's rule)."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"FanInConcat(axis={axis!r}): axis must be an int.")

    def make(ndim: int) -> Layer:
        return L.FanInConcat(_torch_axis(axis, ndim, 0, -1, f"FanInConcat(axis={axis})"))

    return _wrap(_NTAxes(make, f"FanInConcat(axis={axis!r})", False))


def Identity() -> StaxLayer:
    """NT's ``stax.Identity()``."""
    return _wrap(L.Identity())


# ---------------------------------------------------------------------------------------------------
# linear layers
# ---------------------------------------------------------------------------------------------------
def _check_s(s: tuple[int, int]) -> None:
    if tuple(s) != (1, 1):
        raise NotImplementedError(f"s={s!r}: the standard parameterisation's width scales s are not supported yet.")


def Dense(
    out_dim: int,
    W_std: float = 1.0,
    b_std: Optional[float] = None,
    batch_axis: int = 0,
    channel_axis: int = -1,
    parameterization: str = "ntk",
    s: tuple[int, int] = (1, 1),
) -> StaxLayer:
    """NT's ``stax.Dense`` (``out_dim`` is ntkit's ``out_features``; ``s`` as :class:`ntkit.layers.Dense`'s)."""
    return _wrap(L.Dense(out_dim, W_std, b_std, parameterization, s=s), _Layout(batch_axis, channel_axis))


def _padding(padding: Union[str, Padding]) -> str:
    return padding.name if isinstance(padding, Padding) else str(padding)


def Conv(
    out_chan: int,
    filter_shape: Sequence[int],
    strides: Optional[Sequence[int]] = None,
    padding: Union[str, Padding] = "VALID",
    W_std: float = 1.0,
    b_std: Optional[float] = None,
    dimension_numbers: Optional[tuple[str, str, str]] = None,
    parameterization: str = "ntk",
    s: tuple[int, int] = (1, 1),
) -> StaxLayer:
    """NT's ``stax.Conv`` (``out_chan``/``filter_shape`` are ntkit's ``out_channels``/``kernel_size``)."""
    layout = _layout_of_dimension_numbers(dimension_numbers, len(filter_shape))
    layer = L.Conv(
        out_chan,
        tuple(filter_shape),
        None if strides is None else tuple(strides),
        _padding(padding),
        W_std,
        b_std,
        parameterization,
        s=s,
    )
    return _wrap(layer, layout)


def AvgPool(
    window_shape: Sequence[int],
    strides: Optional[Sequence[int]] = None,
    padding: Union[str, Padding] = "VALID",
    normalize_edges: bool = False,
    batch_axis: int = 0,
    channel_axis: int = -1,
) -> StaxLayer:
    """NT's ``stax.AvgPool``."""
    return _wrap(
        L.AvgPool(tuple(window_shape), None if strides is None else tuple(strides), _padding(padding), normalize_edges),
        _Layout(batch_axis, channel_axis),
    )


def SumPool(
    window_shape: Sequence[int],
    strides: Optional[Sequence[int]] = None,
    padding: Union[str, Padding] = "VALID",
    batch_axis: int = 0,
    channel_axis: int = -1,
) -> StaxLayer:
    """NT's ``stax.SumPool``."""
    return _wrap(
        L.SumPool(tuple(window_shape), None if strides is None else tuple(strides), _padding(padding)),
        _Layout(batch_axis, channel_axis),
    )


def GlobalAvgPool(batch_axis: int = 0, channel_axis: int = -1) -> StaxLayer:
    """NT's ``stax.GlobalAvgPool``."""
    return _wrap(L.GlobalAvgPool(), _Layout(batch_axis, channel_axis))


def GlobalSumPool(batch_axis: int = 0, channel_axis: int = -1) -> StaxLayer:
    """NT's ``stax.GlobalSumPool``."""
    return _wrap(L.GlobalSumPool(), _Layout(batch_axis, channel_axis))


def Flatten(batch_axis: int = 0, batch_axis_out: int = 0) -> StaxLayer:
    """NT's ``stax.Flatten`` (its kernel does not depend on the order of the flattened features)."""
    if batch_axis_out != 0:
        raise NotImplementedError(f"Flatten(batch_axis_out={batch_axis_out}): ntkit keeps the batch axis first.")
    return _wrap(L.Flatten(), _Layout(batch_axis, None))


def LayerNorm(
    axis: Union[int, Sequence[int]] = -1, eps: float = 1e-12, batch_axis: int = 0, channel_axis: int = -1
) -> StaxLayer:
    """NT's ``stax.LayerNorm``: ``axis`` in NT's layout, translated to ntkit's ``(N, C, *spatial)``."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return _wrap(_NTAxesLayerNorm(axes, eps, batch_axis, channel_axis), _Layout(batch_axis, channel_axis))


class _NTAxesLayerNorm(L.LayerNorm):
    """``LayerNorm`` whose ``axis`` is given in NT's layout; translated on first use, when the rank is known."""

    def __init__(self, nt_axes: tuple[int, ...], eps: float, batch_axis: int, channel_axis: int):
        super().__init__(1, eps)
        self.nt_axes, self.batch_axis, self.channel_axis = nt_axes, batch_axis, channel_axis

    def _translated(self, ndim: int) -> L.LayerNorm:
        b, c = self.batch_axis % ndim, self.channel_axis % ndim
        rest = [a for a in range(ndim) if a not in (b, c)]
        where = {c: 1, **{a: 2 + i for i, a in enumerate(rest)}, b: 0}
        return L.LayerNorm(tuple(where[a % ndim] for a in self.nt_axes), self.eps)

    def kernel(self, k):
        return self._translated(len(k.shape1)).kernel(k)

    def build(self, in_shape, width, generator, readout):
        return self._translated(len(in_shape) + 1).build(in_shape, width, generator, readout)

    def __repr__(self) -> str:
        return (
            f"LayerNorm(axis={self.nt_axes}, eps={self.eps}, batch_axis={self.batch_axis}, "
            f"channel_axis={self.channel_axis})"
        )


# ---------------------------------------------------------------------------------------------------
# nonlinearities (NT's arguments; do_stabilize is NT's numerical trick and has no effect here)
# ---------------------------------------------------------------------------------------------------
def Relu(do_stabilize: bool = False) -> StaxLayer:
    """NT's ``stax.Relu``."""
    return _wrap(L.Relu())


def LeakyRelu(alpha: float, do_stabilize: bool = False) -> StaxLayer:
    """NT's ``stax.LeakyRelu``."""
    return _wrap(L.LeakyRelu(alpha))


def ABRelu(a: float, b: float, do_stabilize: bool = False) -> StaxLayer:
    """NT's ``stax.ABRelu``."""
    return _wrap(L.ABRelu(a, b))


def Abs(do_stabilize: bool = False) -> StaxLayer:
    """NT's ``stax.Abs``."""
    return _wrap(L.Abs())


def Sign() -> StaxLayer:
    """NT's ``stax.Sign``."""
    return _wrap(L.Sign())


def Erf(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> StaxLayer:
    """NT's ``stax.Erf``."""
    return _wrap(L.Erf(a, b, c))


def Sigmoid_like() -> StaxLayer:
    """NT's ``stax.Sigmoid_like``."""
    return _wrap(L.Sigmoid_like())


def Gelu(approximate: bool = False) -> StaxLayer:
    """NT's ``stax.Gelu``."""
    return _wrap(L.Gelu(approximate))


def Sin(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> StaxLayer:
    """NT's ``stax.Sin``."""
    return _wrap(L.Sin(a, b, c))


def Cos(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> StaxLayer:
    """NT's ``stax.Cos``."""
    return _wrap(L.Cos(a, b, c))


def Rbf(gamma: float = 1.0) -> StaxLayer:
    """NT's ``stax.Rbf``."""
    return _wrap(L.Rbf(gamma))


def Gaussian(a: float = 1.0, b: float = -1.0) -> StaxLayer:
    """NT's ``stax.Gaussian``."""
    return _wrap(L.Gaussian(a, b))


def Exp(a: float = 1.0, b: float = 1.0) -> StaxLayer:
    """NT's ``stax.Exp``."""
    return _wrap(L.Exp(a, b))


def ExpNormalized(gamma: float = 1.0, shift: float = -1.0, do_clip: bool = False) -> StaxLayer:
    """NT's ``stax.ExpNormalized``."""
    return _wrap(L.ExpNormalized(gamma, shift, do_clip))


def Hermite(degree: int) -> StaxLayer:
    """NT's ``stax.Hermite``."""
    return _wrap(L.Hermite(degree))


def Monomial(degree: int) -> StaxLayer:
    """NT's ``stax.Monomial``."""
    return _wrap(L.Monomial(degree))


def RectifiedMonomial(degree: int) -> StaxLayer:
    """NT's ``stax.RectifiedMonomial``."""
    return _wrap(L.RectifiedMonomial(degree))


def Polynomial(coef: Sequence[float]) -> StaxLayer:
    """NT's ``stax.Polynomial``."""
    return _wrap(L.Polynomial(coef))


def Elementwise(
    fn: Optional[Callable[[Tensor], Tensor]] = None,
    nngp_fn: Optional[Callable] = None,
    d_nngp_fn: Optional[Callable] = None,
) -> StaxLayer:
    """NT's ``stax.Elementwise``: ``fn`` a torch function (the finite twin), ``nngp_fn(cov12, var1, var2)`` its
    kernel; without ``nngp_fn`` the kernel is computed by quadrature (NT requires ``nngp_fn`` here)."""
    if fn is None:
        raise ValueError("Elementwise needs fn (a torch function; the finite network applies it).")
    return _wrap(L.Elementwise(fn, nngp_fn=nngp_fn, d_nngp_fn=d_nngp_fn))


def ElementwiseNumerical(fn: Callable[[Tensor], Tensor], deg: int, df: Optional[Callable] = None) -> StaxLayer:
    """NT's ``stax.ElementwiseNumerical``: Gauss–Hermite quadrature with ``deg`` nodes per axis (``df``, NT's
    derivative, is not needed: autograd gives it)."""
    return _wrap(L.Elementwise(fn, deg=deg))


# ---------------------------------------------------------------------------------------------------
# layers whose arguments name axes: translated from NT's layout to ntkit's (N, C, *spatial)
# ---------------------------------------------------------------------------------------------------
class AggregateImplementation(enum.Enum):
    """NT's ``stax.AggregateImplementation``."""

    DENSE = "DENSE"
    SPARSE = "SPARSE"


class AttentionMechanism(enum.Enum):
    """NT's ``stax.AttentionMechanism`` names."""

    SOFTMAX = "SOFTMAX"
    IDENTITY = "IDENTITY"
    ABS = "ABS"
    RELU = "RELU"


class PositionalEmbedding(enum.Enum):
    """NT's ``stax.PositionalEmbedding`` names."""

    NONE = "NONE"
    SUM = "SUM"
    CONCAT = "CONCAT"


def _name(v: Any) -> Any:
    return v.name if isinstance(v, enum.Enum) else v


def _torch_axis(axis: int, ndim: int, batch_axis: int, channel_axis: int, who: str) -> int:
    """An axis of NT-layout activations of rank ``ndim`` -> the same axis in ``(N, C, *spatial)``."""
    if not -ndim <= axis < ndim:
        raise LayerError(f"{who}: axis {axis} is out of range for {ndim}-D activations (NT's layout).")
    a, b, c = axis % ndim, batch_axis % ndim, channel_axis % ndim
    if a == b:
        return 0
    if a == c:
        return 1
    rest = [i for i in range(ndim) if i not in (b, c)]
    return 2 + rest.index(a)


def _torch_order(entries: Sequence[Any], batch_axis: int, channel_axis: int) -> list[Any]:
    """Per-axis entries in NT's layout -> the same entries in ``(N, C, *spatial)`` order."""
    n = len(entries)
    b, c = batch_axis % n, channel_axis % n
    return [entries[b], entries[c]] + [e for i, e in enumerate(entries) if i not in (b, c)]


class _NTAxes(Layer):
    """A native ntkit layer whose axis arguments are written in NT's layout: ``make(ndim)`` builds it for
    activations of rank ``ndim`` (known only when the layer is applied), once per rank.

    ``needs_full_spatial`` and the keyword arguments read by ``kernel_fn`` do not depend on the rank and are
    given by the wrapper."""

    tracks_means = True

    def __init__(
        self,
        make: Callable[[int], Layer],
        text: str,
        needs_full_spatial: bool,
        kernel_kwargs: tuple[str, ...] = (),
        has_params: bool = False,
    ):
        self._make, self._text = make, text
        self._built: dict[int, Layer] = {}
        self.needs_full_spatial = needs_full_spatial
        self.kernel_kwargs = kernel_kwargs
        self.has_params = has_params

    def native(self, ndim: int) -> Layer:
        """The ntkit layer for activations of rank ``ndim`` (batch and channel axes included)."""
        if ndim not in self._built:
            self._built[ndim] = self._make(ndim)
        return self._built[ndim]

    def kernel(self, k: Any) -> Any:
        first = k[0] if isinstance(k, list) else k
        return self.native(len(first.shape1)).kernel(k)

    def build(self, in_shape: Any, width: Optional[int], generator: torch.Generator, readout: bool) -> Any:
        first = in_shape[0] if isinstance(in_shape, list) else in_shape
        return self.native(len(first) + 1).build(in_shape, width, generator, readout)

    def __repr__(self) -> str:
        return self._text


def GlobalSelfAttention(
    n_chan_out: int,
    n_chan_key: int,
    n_chan_val: int,
    n_heads: int,
    linear_scaling: bool = True,
    W_key_std: float = 1.0,
    W_value_std: float = 1.0,
    W_query_std: float = 1.0,
    W_out_std: float = 1.0,
    b_std: Optional[float] = None,
    attention_mechanism: Union[str, AttentionMechanism] = "SOFTMAX",
    pos_emb_type: Union[str, PositionalEmbedding] = "NONE",
    pos_emb_p_norm: float = 2,
    pos_emb_decay_fn: Optional[Callable[[Any], Any]] = None,
    n_chan_pos_emb: Optional[int] = None,
    W_pos_emb_std: float = 1.0,
    val_pos_emb: bool = False,
    batch_axis: int = 0,
    channel_axis: int = -1,
) -> StaxLayer:
    """NT's ``stax.GlobalSelfAttention`` (Hron et al. 2020); the layer is :class:`ntkit.layers.GlobalSelfAttention`.
    ``pos_emb_decay_fn`` is called on torch tensors of distances (``jnp.exp`` becomes ``torch.exp``)."""
    layer = L.GlobalSelfAttention(
        n_chan_out,
        n_chan_key,
        n_chan_val,
        n_heads,
        linear_scaling,
        W_key_std,
        W_value_std,
        W_query_std,
        W_out_std,
        b_std,
        _name(attention_mechanism),
        _name(pos_emb_type),
        pos_emb_p_norm,
        pos_emb_decay_fn,
        n_chan_pos_emb,
        W_pos_emb_std,
        val_pos_emb,
    )
    return _wrap(layer, _Layout(batch_axis, channel_axis))


def Aggregate(
    aggregate_axis: Union[int, Sequence[int], None] = None,
    batch_axis: int = 0,
    channel_axis: int = -1,
    to_dense: Optional[Callable[[Any], Any]] = lambda p: p,
    implementation: Union[str, AggregateImplementation] = "DENSE",
) -> StaxLayer:
    """NT's ``stax.Aggregate`` (graph aggregation, Du et al. 2019): ``aggregate_axis`` in NT's layout; the
    graphs are ``kernel_fn(x1, x2, pattern=(p1, p2))`` and ``apply_fn(params, x, pattern=p)``, as in NT."""
    impl = str(_name(implementation)).upper()
    dense = None if impl == "SPARSE" else to_dense

    def make(ndim: int) -> Layer:
        axes: Union[int, tuple[int, ...], None]
        if aggregate_axis is None:
            axes = None
        elif isinstance(aggregate_axis, int):
            axes = _torch_axis(aggregate_axis, ndim, batch_axis, channel_axis, "Aggregate")
        else:
            axes = tuple(_torch_axis(a, ndim, batch_axis, channel_axis, "Aggregate") for a in aggregate_axis)
        return L.Aggregate(axes, to_dense=dense, implementation=impl)

    text = f"Aggregate(aggregate_axis={aggregate_axis!r}, implementation={impl!r})"
    return _wrap(_NTAxes(make, text, True, ("pattern",)), _Layout(batch_axis, channel_axis))


def DotGeneral(
    *,
    lhs: Any = None,
    rhs: Any = None,
    dimension_numbers: Any = (((), ()), ((), ())),
    precision: Any = None,
    batch_axis: int = 0,
    channel_axis: int = -1,
) -> StaxLayer:
    """NT's ``stax.DotGeneral``: multiplication by a constant ``lhs`` or ``rhs``; the activations' axes in
    ``dimension_numbers`` are counted in NT's layout."""
    (lc, rc), (lb, rb) = dimension_numbers
    x_contract = lc if lhs is None else rc
    mixes = bool(tuple(x_contract))  # batch axes pair pixels one to one; contracting ones mix them

    def make(ndim: int) -> Layer:
        def tr(axes: Sequence[int]) -> tuple[int, ...]:
            return tuple(_torch_axis(int(a), ndim, batch_axis, channel_axis, "DotGeneral") for a in axes)

        if lhs is None:  # the activations are the left factor
            dn = ((tr(lc), tuple(rc)), (tr(lb), tuple(rb)))
        else:
            dn = ((tuple(lc), tr(rc)), (tuple(lb), tr(rb)))
        return L.DotGeneral(lhs=lhs, rhs=rhs, dimension_numbers=dn, precision=precision)

    text = f"DotGeneral(dimension_numbers={dimension_numbers!r}, {'rhs' if lhs is None else 'lhs'}=...)"
    return _wrap(_NTAxes(make, text, mixes), _Layout(batch_axis, channel_axis))


def Dropout(rate: float, mode: str = "train") -> StaxLayer:
    """NT's ``stax.Dropout`` (``rate`` is the keep rate, as NT's)."""
    return _wrap(L.Dropout(rate, mode))


def Index(idx: Any, batch_axis: int = 0, channel_axis: int = -1) -> StaxLayer:
    """NT's ``stax.Index``: ``idx`` (written with :data:`Slice`) indexes NT-layout activations."""
    items = idx if isinstance(idx, tuple) else (idx,)

    def make(ndim: int) -> Layer:
        if sum(1 for i in items if i is Ellipsis) > 1:
            raise LayerError(f"Index({idx!r}): at most one Ellipsis.")
        if Ellipsis in items:
            at = items.index(Ellipsis)
            fill = ndim - (len(items) - 1)
            full = list(items[:at]) + [slice(None)] * max(fill, 0) + list(items[at + 1 :])
        else:
            full = list(items) + [slice(None)] * (ndim - len(items))
        if len(full) != ndim:
            raise LayerError(f"Index({idx!r}): {len(items)} entries for {ndim}-D activations.")
        return L.Index(tuple(_torch_order(full, batch_axis, channel_axis)))

    return _wrap(_NTAxes(make, f"Index({idx!r})", False), _Layout(batch_axis, channel_axis))


def ImageResize(
    shape: Sequence[int],
    method: Any,
    antialias: bool = True,
    precision: Any = "highest",
    batch_axis: int = 0,
    channel_axis: int = -1,
) -> StaxLayer:
    """NT's ``stax.ImageResize``: ``shape`` per axis of the NT-layout activations (``-1`` keeps an axis)."""
    sizes = list(shape)
    layer = L.ImageResize(tuple(_torch_order(sizes, batch_axis, channel_axis)), _name(method), antialias, precision)
    return _wrap(layer, _Layout(batch_axis, channel_axis))


# ---------------------------------------------------------------------------------------------------
# convolution variants (ConvTranspose, ConvLocal)
# ---------------------------------------------------------------------------------------------------
def _conv_variant(
    make: Any,
    out_chan: int,
    filter_shape: Sequence[int],
    strides: Optional[Sequence[int]],
    padding: Union[str, Padding],
    W_std: float,
    b_std: Optional[float],
    dimension_numbers: Optional[tuple[str, str, str]],
    parameterization: str,
    s: tuple[int, int],
) -> StaxLayer:
    """A ConvTranspose/ConvLocal layer from NT's arguments, translated as :func:`Conv`'s."""
    _check_s(s)
    layout = _layout_of_dimension_numbers(dimension_numbers, len(filter_shape))
    layer = make(
        out_chan,
        tuple(filter_shape),
        None if strides is None else tuple(strides),
        _padding(padding),
        W_std,
        b_std,
        parameterization,
    )
    return _wrap(layer, layout)


def ConvTranspose(
    out_chan: int,
    filter_shape: Sequence[int],
    strides: Optional[Sequence[int]] = None,
    padding: Union[str, Padding] = "VALID",
    W_std: float = 1.0,
    b_std: Optional[float] = None,
    dimension_numbers: Optional[tuple[str, str, str]] = None,
    parameterization: str = "ntk",
    s: tuple[int, int] = (1, 1),
) -> StaxLayer:
    """NT's ``stax.ConvTranspose`` (:class:`ntkit.layers.ConvTranspose`; ``lax.conv_transpose`` semantics)."""
    args = (out_chan, filter_shape, strides, padding, W_std, b_std, dimension_numbers, parameterization, s)
    return _conv_variant(L.ConvTranspose, *args)


def ConvLocal(
    out_chan: int,
    filter_shape: Sequence[int],
    strides: Optional[Sequence[int]] = None,
    padding: Union[str, Padding] = "VALID",
    W_std: float = 1.0,
    b_std: Optional[float] = None,
    dimension_numbers: Optional[tuple[str, str, str]] = None,
    parameterization: str = "ntk",
    s: tuple[int, int] = (1, 1),
) -> StaxLayer:
    """NT's ``stax.ConvLocal`` (:class:`ntkit.layers.ConvLocal`: unshared filters, one per output pixel)."""
    args = (out_chan, filter_shape, strides, padding, W_std, b_std, dimension_numbers, parameterization, s)
    return _conv_variant(L.ConvLocal, *args)


# (end of convolution variants)


# ---------------------------------------------------------------------------------------------------
# Gabor, repeat
# ---------------------------------------------------------------------------------------------------
def Gabor() -> StaxLayer:
    """NT's ``stax.Gabor``: ``exp(−x²)·sin(x)`` (:class:`ntkit.layers.Gabor`, closed-form kernel)."""
    return _wrap(L.Gabor())


def repeat(layer: StaxLayer, n: int) -> StaxLayer:
    """NT's ``stax.repeat(layer, n)`` = ``serial(*[layer] * n)`` (as :func:`ntkit.nets.repeat`; each copy has
    its own parameters in the finite twin, as in NT's ``serial``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"repeat(layer, n={n!r}): n must be an integer >= 0.")
    (l,) = _check_layers([layer], "repeat")
    return _wrap(_serial(*([l.layer] * n)), l.layout)


# (end of Gabor, repeat)
