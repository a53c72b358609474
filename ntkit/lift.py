"""``lift``: turn a PyTorch model into the ntkit network whose infinite-width limit it is.

An ``nn.Sequential`` is mapped module by module (a ``serial`` net). Any other ``nn.Module`` is traced with
``torch.fx.symbolic_trace`` and its graph mapped node by node: modules through their ``@lift_rule``
(:data:`SUPPORTED`; modules refused with a reason: :data:`REFUSED`), the functional forms of every activation
(``F.*``/``torch.*``/``x.relu()``), ``F.avg_pool*d``/``F.adaptive_avg_pool*d``/``x.mean(spatial dims)``,
``F.dropout*``, ``F.layer_norm``, ``F.linear``/``F.conv*d``/``F.prelu`` on the model's own parameters (``get_attr``),
``torch.flatten``/``x.flatten(1)``/``x.view(x.size(0), -1)`` to the same layers as their modules, ``x + y`` /
``torch.add`` to ``FanInSum``, ``x * y`` to ``FanInProd``, ``torch.cat(..., 1)`` to ``FanInConcat``, a value used
several times to a ``FanOut`` (:class:`ntkit.nets.GraphNet`). The kernel is the infinite-width limit of that
architecture (Lee et al. 2018; Yang 2019 for arbitrary architectures as tensor programs).

Initialisation: the limit is the model's own init family with every hidden width → ∞. PyTorch's default
``nn.Linear``/``nn.Conv*`` init draws ``W, b ~ U(±1/sqrt(fan_in))``: weight variance ``W_std²/fan_in`` with
``W_std² = 1/3``, bias variance ``1/(3·fan_in)``. A *hidden* layer's fan-in grows with the width, so its bias
variance → 0 and the bias vanishes in the limit; the first parametric layer on each path from the input has a
fixed fan-in and keeps its bias ``b_std² = 1/(3·fan_in)`` (default ``b_std="init"``). ``init="weights"`` reads
the model as it is: ``W_std² = Var(W)·fan_in`` and ``b_std² = Var(b)`` per layer (a custom ``nn.init``). The
lifted kernels are the NNGP at initialisation and the expected NTK under PyTorch's gradients
(``parameterization="standard"``, Sohl-Dickstein et al. 2020).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import ntkit.layers
import ntkit.layers.activations  # noqa: F401  (every activation torch has: their lift rules)
from ntkit.layers.activations import Piecewise, Smooth
from ntkit.layers.attention import GlobalSelfAttention
from ntkit.layers.base import LIFT_RULES, Layer, LayerError, LiftError, LiftOptions, Std, single, single_shape
from ntkit.layers.branching import FanInConcat, FanInProd, FanInSum
from ntkit.layers.elementwise import ABRelu, Elementwise
from ntkit.layers.maxpool import MAX_POOL_CALLS, MaxPool, fuse_maxpool, fuse_maxpool_nodes
from ntkit.layers.pooling import GlobalAvgPool
from ntkit.lift_attention import SequenceGraph, as_traceable, is_sequence_model
from ntkit.nets import GraphNet, GraphNode, Net, serial
from ntkit.nets.tiler import leaf_paths

__all__ = ["lift", "LiftError", "SUPPORTED", "REFUSED", "INITS"]

#: torch module type -> lift rule; each layer's file registers its own (``@lift_rule`` in ntkit/layers/)
SUPPORTED = LIFT_RULES
#: the values of ``lift(init=...)``
INITS = ("default", "weights")

_FALLBACK = "or use ntkit.empirical.empirical_ntk for the finite-width NTK of any module"


def _supported_names() -> str:
    return ", ".join(sorted(t.__name__ for t in SUPPORTED))


def _mapped_calls() -> str:
    names = {t if isinstance(t, str) else getattr(t, "__name__", repr(t)) for t in (*_UNARY, *_PARAM_CALLS)}
    return ", ".join(sorted(names))


def _fetch_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class SpatialMean(GlobalAvgPool):
    """``x.mean(dims)`` / ``torch.mean(x, dims)`` over every spatial axis of ``(N, C, *spatial)``: the global
    average pool (exact). ``keepdim=True`` keeps size-1 spatial axes in torch; the lifted value is ``(N, C)``, so
    what follows must read features (``Flatten``, ``Linear``; a convolution after it is refused by its rank
    check). Any other set of axes raises ``LayerError`` naming the call when the kernel is computed (the input's
    rank is known only then)."""

    def __init__(self, dims: tuple[int, ...], keepdim: bool, where: str):
        self.dims, self.keepdim, self._where = tuple(int(d) for d in dims), bool(keepdim), where

    def _check(self, ndim: int) -> None:
        got = sorted({d % ndim for d in self.dims}) if all(-ndim <= d < ndim for d in self.dims) else None
        if ndim < 3 or got != list(range(2, ndim)):
            raise LayerError(
                f"{self._where}: mean over dims {self.dims} of a {ndim}-D (N, C, *spatial) value; only the mean over "
                f"all spatial axes {tuple(range(2, ndim))} (a global average pool) has a kernel rule — a mean over the "
                f"channels averages infinitely many centred channels (→ 0), one over some spatial axes only is not "
                f"mapped. Fix: average over every spatial axis, or use nn.AvgPool / nn.AdaptiveAvgPool."
            )

    def kernel(self, k: Any) -> Any:
        self._check(len(single(k, self).shape1))
        return super().kernel(k)

    def build(self, in_shape: Any, width: Optional[int], generator: torch.Generator, readout: bool) -> Any:
        self._check(len(single_shape(in_shape, self)) + 1)
        return super().build(in_shape, width, generator, readout)

    def __repr__(self) -> str:
        return f"GlobalAvgPool()  # mean{self.dims}" + (", keepdim" if self.keepdim else "")


# functional / method calls -> an equivalent module, lifted by that module's own rule
def _bind(names: tuple[tuple[str, Any], ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments after the input of a functional call, by name (``names``: (name, default) in torch's order)."""
    out = dict(names)
    if len(args) > len(names):
        raise TypeError(f"{len(args)} positional arguments, at most {len(names)} expected")
    for (k, _), v in zip(names, args):
        out[k] = v
    for k, v in kwargs.items():
        if k == "inplace":
            continue
        if k not in out:
            raise TypeError(f"unexpected keyword argument {k!r}")
        out[k] = v
    return out


def _call(ctor: Callable[..., nn.Module], *names: tuple[str, Any]) -> Callable[..., nn.Module]:
    """A call ``f(x, *args, **kwargs)`` -> ``ctor(**bound arguments)`` (``inplace`` is ignored)."""
    names = tuple(n for n in names if n[0] != "inplace") + (("inplace", False),)

    def make(*a: Any, **kw: Any) -> nn.Module:
        bound = _bind(names, a, kw)
        bound.pop("inplace", None)
        return ctor(**bound)

    return make


def _dropout_module(cls: type) -> Callable[..., nn.Module]:
    def make(p: float = 0.5, training: bool = True) -> nn.Module:
        m = cls(float(p))
        m.train(bool(training))
        return m

    return make


def _unary_calls() -> dict[Any, Callable[..., nn.Module]]:
    def act(mod: Callable[[], nn.Module]) -> Callable[..., nn.Module]:
        return _call(lambda: mod())

    def flatten(start_dim: int = 0, end_dim: int = -1) -> nn.Module:
        return nn.Flatten(start_dim, end_dim)

    def rrelu(lower: float = 1 / 8, upper: float = 1 / 3, training: bool = False) -> nn.Module:
        m = nn.RReLU(lower, upper)
        m.train(bool(training))
        return m

    def adaptive(cls: type) -> Callable[..., nn.Module]:
        return _call(lambda output_size: cls(output_size), ("output_size", None))

    def avg(cls: type) -> Callable[..., nn.Module]:
        args: tuple[tuple[str, Any], ...] = (("kernel_size", None), ("stride", None), ("padding", 0))
        args += (("ceil_mode", False),)
        args += (("count_include_pad", True),)
        if cls is not nn.AvgPool1d:
            args += (("divisor_override", None),)
        return _call(lambda **kw: cls(**kw), *args)

    table: dict[Any, Callable[..., nn.Module]] = {}
    acts: list[tuple[tuple[Any, ...], Callable[..., nn.Module]]] = [
        ((torch.relu, F.relu, torch.relu_, F.relu_, "relu", "relu_"), act(nn.ReLU)),
        ((F.relu6,), act(nn.ReLU6)),
        ((torch.tanh, F.tanh, "tanh"), act(nn.Tanh)),
        ((torch.sigmoid, F.sigmoid, "sigmoid"), act(nn.Sigmoid)),
        ((F.silu,), act(nn.SiLU)),
        ((F.mish,), act(nn.Mish)),
        ((F.hardswish,), act(nn.Hardswish)),
        ((F.hardsigmoid,), act(nn.Hardsigmoid)),
        ((F.softsign,), act(nn.Softsign)),
        ((F.logsigmoid,), act(nn.LogSigmoid)),
        ((F.tanhshrink,), act(nn.Tanhshrink)),
        ((torch.selu, F.selu), act(nn.SELU)),
        ((F.gelu,), _call(lambda approximate: nn.GELU(approximate=approximate), ("approximate", "none"))),
        ((F.leaky_relu,), _call(lambda negative_slope: nn.LeakyReLU(negative_slope), ("negative_slope", 0.01))),
        ((F.elu,), _call(lambda alpha: nn.ELU(alpha), ("alpha", 1.0))),
        ((torch.celu, F.celu), _call(lambda alpha: nn.CELU(alpha), ("alpha", 1.0))),
        (
            (F.softplus,),
            _call(lambda beta, threshold: nn.Softplus(beta, threshold), ("beta", 1.0), ("threshold", 20.0)),
        ),
        (
            (F.hardtanh,),
            _call(lambda min_val, max_val: nn.Hardtanh(min_val, max_val), ("min_val", -1.0), ("max_val", 1.0)),
        ),
        ((F.softshrink,), _call(lambda lambd: nn.Softshrink(lambd), ("lambd", 0.5))),
        ((F.hardshrink,), _call(lambda lambd: nn.Hardshrink(lambd), ("lambd", 0.5))),
        (
            (torch.threshold, F.threshold),
            _call(lambda threshold, value: nn.Threshold(threshold, value), ("threshold", None), ("value", None)),
        ),
        ((F.rrelu,), _call(rrelu, ("lower", 1 / 8), ("upper", 1 / 3), ("training", False))),
        ((torch.flatten, "flatten"), _call(flatten, ("start_dim", 0), ("end_dim", -1))),
        (("contiguous",), act(nn.Identity)),
        ((F.dropout,), _call(_dropout_module(nn.Dropout), ("p", 0.5), ("training", True))),
        ((F.dropout1d,), _call(_dropout_module(nn.Dropout1d), ("p", 0.5), ("training", True))),
        ((F.dropout2d,), _call(_dropout_module(nn.Dropout2d), ("p", 0.5), ("training", True))),
        ((F.dropout3d,), _call(_dropout_module(nn.Dropout3d), ("p", 0.5), ("training", True))),
        ((F.alpha_dropout,), _call(_dropout_module(nn.AlphaDropout), ("p", 0.5), ("training", False))),
        ((F.feature_alpha_dropout,), _call(_dropout_module(nn.FeatureAlphaDropout), ("p", 0.5), ("training", False))),
        ((F.avg_pool1d,), avg(nn.AvgPool1d)),
        ((F.avg_pool2d,), avg(nn.AvgPool2d)),
        ((F.avg_pool3d,), avg(nn.AvgPool3d)),
        ((F.adaptive_avg_pool1d,), adaptive(nn.AdaptiveAvgPool1d)),
        ((F.adaptive_avg_pool2d,), adaptive(nn.AdaptiveAvgPool2d)),
        ((F.adaptive_avg_pool3d,), adaptive(nn.AdaptiveAvgPool3d)),
        (
            (torch.softmax, F.softmax, "softmax"),
            _call(lambda dim, _stacklevel, dtype: nn.Softmax(dim), ("dim", None), ("_stacklevel", 3), ("dtype", None)),
        ),
        (
            (torch.log_softmax, F.log_softmax, "log_softmax"),
            _call(
                lambda dim, _stacklevel, dtype: nn.LogSoftmax(dim), ("dim", None), ("_stacklevel", 3), ("dtype", None)
            ),
        ),
        (
            (F.softmin,),
            _call(lambda dim, _stacklevel, dtype: nn.Softmin(dim), ("dim", None), ("_stacklevel", 3), ("dtype", None)),
        ),
    ]
    for targets, make in acts:
        for t in targets:
            table[t] = make
    table.update(MAX_POOL_CALLS)
    return table


#: parametric functional calls whose parameters forward reads with get_attr: (x, weight, bias, ...) -> module
def _param_calls() -> dict[Any, Callable[..., nn.Module]]:
    def linear(weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> nn.Module:
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        _set_params(m, weight, bias)
        return m

    def conv(cls: type) -> Callable[..., nn.Module]:
        def make(
            weight: torch.Tensor,
            bias: Optional[torch.Tensor] = None,
            stride: Any = 1,
            padding: Any = 0,
            dilation: Any = 1,
            groups: int = 1,
        ) -> nn.Module:
            out_c, in_per_group = weight.shape[:2]
            m = cls(
                in_per_group * groups,
                out_c,
                tuple(weight.shape[2:]),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=bias is not None,
            )
            _set_params(m, weight, bias)
            return m

        return make

    def layer_norm(normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> nn.Module:
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        m = nn.LayerNorm(shape, eps=eps, elementwise_affine=weight is not None, bias=bias is not None)
        if weight is not None:
            _set_params(m, weight, bias)
        return m

    def prelu(weight: torch.Tensor) -> nn.Module:
        m = nn.PReLU(weight.numel())
        _set_params(m, weight, None)
        return m

    return {
        F.linear: linear,
        F.conv1d: conv(nn.Conv1d),
        F.conv2d: conv(nn.Conv2d),
        F.conv3d: conv(nn.Conv3d),
        F.layer_norm: layer_norm,
        F.prelu: prelu,
    }


def _set_params(m: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    with torch.no_grad():
        w.copy_(weight.detach().reshape(w.shape))
        if bias is not None:
            b = m.bias
            assert isinstance(b, torch.Tensor)
            b.copy_(bias.detach().reshape(b.shape))


_UNARY = _unary_calls()
_PARAM_CALLS = _param_calls()
_SUMS = (operator.add, operator.iadd, torch.add)
_PRODS = (operator.mul, operator.imul, torch.mul)


@dataclasses.dataclass
class _Row:
    node: str
    torch_op: str
    layer: str
    init: str
    kernel: str = "exact"


def kernel_note(layer: Layer, after_sum: bool = False) -> str:
    """The explain table's ``kernel`` column: how the layer's kernel is computed (``exact``: closed form or exact
    recursion), with the numerical rules' methods and stated errors; ``after_sum``: the layer's input is a sum."""
    parts = [leaf for _, leaf in leaf_paths(layer)]
    if any(isinstance(x, MaxPool) for x in parts):
        return "numerical: randomized QMC, per-entry error estimate"
    if any(isinstance(x, GlobalSelfAttention) and x.attention_mechanism == "SOFTMAX" for x in parts):
        return "numerical: QMC over Gaussian logits (softmax_tol); NNGP only"
    if isinstance(layer, Smooth):
        return "numerical: graded Gauss–Legendre, error ≤ 1e-8"
    if isinstance(layer, Piecewise):
        return "exact pieces, error ≤ 1e-9"
    if isinstance(layer, Elementwise):
        return "numerical: Gauss–Hermite (lift(deg=)), no error bound"
    if isinstance(layer, ABRelu) and after_sum:
        return "closed form; of a non-Gaussian sum: residual-stream law, error ≤ 1e-3 (per-entry estimate)"
    return "exact"


class _Tracer(torch.fx.Tracer):
    """Modules with a lift rule (and torch's own modules) stay leaves; custom modules are traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in SUPPORTED or super().is_leaf_module(m, module_qualified_name)


def _is_fan_in_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


def _options(m: nn.Module, opts: LiftOptions, init: str, hidden: bool) -> tuple[LiftOptions, str]:
    """The options a parametric module is lifted with, and the init column of the explain table."""
    if not _is_fan_in_layer(m):
        return opts, ""
    weight = getattr(m, "weight")
    bias = getattr(m, "bias", None)
    fan_in = nn.init._calculate_fan_in_and_fan_out(weight)[0]
    W, b = opts.W_std, opts.b_std
    if init == "weights":
        with torch.no_grad():
            if W == "init":
                W = math.sqrt(float(weight.detach().double().var(correction=0)) * fan_in)
            if b == "init" and bias is not None:
                b = math.sqrt(float(bias.detach().double().var(correction=0)))
        note = "read from the weights"
    elif b == "init" and hidden:
        b = 0.0
        note = "default init; hidden bias var 1/(3·fan_in) → 0"
    else:
        note = "default init" if (W == "init" and b == "init") else "given"
    new = dataclasses.replace(opts, W_std=W, b_std=b)
    wv = new.weight_std(weight, fan_in)
    bv = new.bias_std(bias, fan_in)
    bs = "None" if bv is None else f"{bv:.4g}"
    return new, f"W_std={wv:.4g}, b_std={bs} ({note})"


_SOFTMAX_WHY = (
    "over the feature (channel) axis it normalises across all infinitely many channels of a sample, so every output "
    "→ 0 (LogSoftmax: → −∞) and no nontrivial kernel remains; over the batch it would couple samples. Fix: use "
    "softmax only inside attention (nn.MultiheadAttention, whose softmax ntkit has), or apply it to the model's "
    "outputs outside the lifted module (the kernel is that of the logits)"
)
#: modules with no infinite-width kernel (or none in ntkit), and why
REFUSED: dict[type, str] = {
    nn.Softmax: _SOFTMAX_WHY,
    nn.LogSoftmax: _SOFTMAX_WHY,
    nn.Softmin: _SOFTMAX_WHY,
    nn.Softmax2d: _SOFTMAX_WHY,
    nn.GLU: (
        "GLU splits the channels into two halves a, b and returns a·σ(b); lift has no rule for that split. Fix: "
        "write it as two nn.Linear layers and x * torch.sigmoid(y) in forward (FanInProd and the sigmoid rule)"
    ),
    nn.Unflatten: (
        "Unflatten turns features into channels and positions; after a Dense layer those positions would be "
        "independent, a layout ntkit's spatial kernels do not represent. Fix: keep the model's spatial axes from "
        "the input (convolutions), or lift the part after the Unflatten on its own inputs"
    ),
    nn.Bilinear: (
        "Bilinear's output is a product of two inputs through one weight tensor; lift has no rule for it. Fix: "
        "write it as two nn.Linear layers and a product (FanInProd)"
    ),
    nn.LSTM: "recurrent layers are not mapped (their kernel needs the recursion unrolled over the sequence). Fix: "
    "write the recursion with nn.Linear layers in forward (a fixed sequence length)",
    nn.GRU: "recurrent layers are not mapped (their kernel needs the recursion unrolled over the sequence). Fix: "
    "write the recursion with nn.Linear layers in forward (a fixed sequence length)",
    nn.RNN: "recurrent layers are not mapped (their kernel needs the recursion unrolled over the sequence). Fix: "
    "write the recursion with nn.Linear layers in forward (a fixed sequence length)",
}


def _lift_module(m: nn.Module, qualname: str, opts: LiftOptions) -> Layer:
    rule = SUPPORTED.get(type(m))
    if rule is None and type(m) in REFUSED:
        raise LiftError(f"{qualname} ({type(m).__name__}: {m!r}) has no infinite-width rule: {REFUSED[type(m)]}.")
    if rule is None:
        raise LiftError(
            f"{qualname} ({type(m).__name__}: {m!r}) has no infinite-width rule in ntkit (yet). Fix: replace it by "
            f"a supported module ({_supported_names()}), {_FALLBACK}."
        )
    try:
        return rule(m, opts)
    except LiftError as e:
        raise LiftError(f"{qualname} ({type(m).__name__}): {e}") from None


def _flatten_sequential(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        # _modules, not named_children(): that skips a module registered twice (nn.Sequential(fc, act, fc2, act)
        # applies the shared act twice)
        for name, child in model._modules.items():
            if child is not None:
                out += _flatten_sequential(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix or type(model).__name__, model)]


def _lift_sequential(model: nn.Module, opts: LiftOptions, init: str, rows: list[_Row]) -> Net:
    layers = []
    after_param = False
    for qualname, m in _flatten_sequential(model, ""):
        o, note = _options(m, opts, init, after_param)
        layer = _lift_module(m, qualname, o)
        rows.append(_Row(qualname, type(m).__name__, repr(layer), note, kernel_note(layer)))
        layers.append(layer)
        after_param = after_param or _is_fan_in_layer(m)
    return serial(*fuse_maxpool(layers))  # ReLU -> MaxPool: the pool sees the Gaussian pre-activations


def _call_name(n: torch.fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _is_batch_size(a: Any) -> bool:
    """``x.size(0)``, ``x.shape[0]`` or ``x.size()[0]`` in the trace."""
    if not isinstance(a, torch.fx.Node):
        return False
    if a.op == "call_method" and a.target == "size":
        return bool(tuple(a.args[1:]) == (0,) or a.kwargs.get("dim") == 0)
    if a.op == "call_function" and a.target is operator.getitem and a.args[1] == 0:
        src = a.args[0]
        return isinstance(src, torch.fx.Node) and (
            (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
            or (src.op == "call_method" and src.target == "size" and len(src.args) == 1)
        )
    return False


def _lift_traced(model: nn.Module, opts: LiftOptions, init: str, rows: list[_Row]) -> Net:
    try:
        gm_graph = _Tracer().trace(model)
    except Exception as e:  # any tracing failure: data-dependent control flow, unsupported calls
        raise LiftError(
            f"{type(model).__name__} could not be traced with torch.fx ({type(e).__name__}: {e}). lift reads the "
            f"architecture from a symbolic trace, which cannot follow control flow that depends on tensor values "
            f"(if/for/while on a tensor, .item(), data-dependent shapes). Fix: make forward's control flow "
            f"independent of the data, or write the model as an nn.Sequential of supported modules, {_FALLBACK}."
        ) from None
    placeholders = [n for n in gm_graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise LiftError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs; lift needs exactly one tensor "
            f"input (a kernel is a function of pairs of single inputs). Fix: wrap the model so forward takes one "
            f"tensor, {_FALLBACK}."
        )
    input_name = placeholders[0].name
    nodes: list[GraphNode] = []
    after_param: dict[str, bool] = {input_name: False}
    output: Optional[str] = None
    value_names = {input_name}
    layer_of: dict[str, Layer] = {}
    calls: dict[str, int] = {}

    def where(n: torch.fx.Node) -> str:
        return f"{n.target}" if n.op == "call_module" else f"{_call_name(n)} (graph node {n.name!r})"

    attrs: dict[str, Any] = {}  # get_attr nodes: tensors forward reads directly (F.linear's weight, ...)

    def tensor_arg(n: torch.fx.Node, a: Any) -> str:
        if isinstance(a, torch.fx.Node) and a.name in attrs:
            raise LiftError(
                f"{where(n)} uses the tensor attribute {a.target!r} read directly in forward; lift maps such "
                f"tensors only as the weight/bias of F.linear, F.conv1d/2d/3d, F.layer_norm and F.prelu (a fixed "
                f"tensor added to or multiplying activations has no infinite-width limit of its own). Fix: use a "
                f"module (nn.Linear, ...) or one of those calls, {_FALLBACK}."
            )
        if not isinstance(a, torch.fx.Node) or a.name not in value_names:
            raise LiftError(
                f"{where(n)}: argument {a!r} is not a tensor value ntkit tracks (a constant, a size, or a call "
                f"lift does not map). Fix: compute it with supported modules/calls, {_FALLBACK}."
            )
        return a.name

    def add(n: torch.fx.Node, layer: Layer, inputs: list[str], torch_op: str, note: str = "") -> None:
        after_sum = any(isinstance(layer_of.get(i), FanInSum) for i in inputs)
        nodes.append(GraphNode(n.name, layer, tuple(inputs)))
        layer_of[n.name] = layer
        value_names.add(n.name)
        label = str(n.target) if n.op == "call_module" else n.name  # modules by their qualified name
        calls[label] = calls.get(label, 0) + 1
        label += f" (call {calls[label]})" if calls[label] > 1 else ""  # a module called again (BasicBlock's relu)
        rows.append(_Row(label, torch_op, repr(layer), note, kernel_note(layer, after_sum)))

    def operands(n: torch.fx.Node, kinds: tuple) -> list[Any]:
        """Operands of a chain ``a + b + c`` (an inner sum used only here is merged into one n-ary sum)."""
        out: list[Any] = []
        for a in n.args[:2]:
            if (
                isinstance(a, torch.fx.Node)
                and a.op == "call_function"
                and a.target in kinds
                and len(a.users) == 1
                and not a.kwargs
            ):
                out += operands(a, kinds)
            else:
                out.append(a)
        return out

    seq = SequenceGraph(model, opts, init)  # sequence models: the torch layout of every value (lift_attention)
    for n in gm_graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            if not isinstance(n.args[0], torch.fx.Node):
                raise LiftError(
                    f"{type(model).__name__}.forward returns {type(n.args[0]).__name__}, not one tensor; lift needs "
                    f"a single tensor output. Fix: return one tensor (e.g. the logits), {_FALLBACK}."
                )
            output = tensor_arg(n, n.args[0])
            continue
        if n.op == "get_attr":
            attrs[n.name] = _fetch_attr(model, str(n.target))  # used by F.linear/F.conv*/... (refused elsewhere)
            continue
        s = seq.translate(n, after_param)  # attention, Embedding, layout-dependent calls (ntkit.lift_attention)
        if s is not None:
            add(n, s.layer, [tensor_arg(n, a) for a in s.inputs], s.torch_op, s.note)
            after_param[n.name] = s.widens or any(after_param[i] for i in nodes[-1].inputs)
            continue
        if n.op == "call_module":
            m = model.get_submodule(str(n.target))
            if len(n.args) != 1 or n.kwargs:
                raise LiftError(
                    f"{n.target} ({type(m).__name__}) is called with several arguments; lift maps "
                    f"single-tensor calls only. Fix: call it on one tensor, {_FALLBACK}."
                )
            src = tensor_arg(n, n.args[0])
            hidden = after_param[src]
            o, note = _options(m, opts, init, hidden)
            add(n, _lift_module(m, str(n.target), o), [src], type(m).__name__, note)
            after_param[n.name] = hidden or _is_fan_in_layer(m)
            continue
        # call_function / call_method
        t = n.target
        if _is_batch_size(n) or (n.op == "call_method" and t == "size") or (t is getattr and n.args[1] == "shape"):
            continue  # shape bookkeeping for view/reshape, checked where used
        if t in _SUMS or t in _PRODS:
            kinds = _SUMS if t in _SUMS else _PRODS
            if n.kwargs:
                raise LiftError(
                    f"{where(n)} with {dict(n.kwargs)}: only a plain sum/product of tensors lifts. "
                    f"Fix: drop the keyword arguments, {_FALLBACK}."
                )
            ins = [tensor_arg(n, a) for a in operands(n, kinds)]
            layer: Layer = FanInSum() if kinds is _SUMS else FanInProd()
            add(n, layer, ins, _call_name(n))
        elif t is torch.cat:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            ins = [tensor_arg(n, a) for a in n.args[0]]
            add(n, FanInConcat(int(dim)), ins, "cat")
        elif n.op == "call_method" and t in ("view", "reshape"):
            shape = (
                tuple(n.args[1:])
                if not (len(n.args) == 2 and isinstance(n.args[1], (tuple, list)))
                else tuple(n.args[1])
            )
            if not (len(shape) == 2 and _is_batch_size(shape[0]) and shape[1] == -1):
                raise LiftError(
                    f"{where(n)}{shape}: only x.{t}(x.size(0), -1) (a Flatten) has a kernel rule; other reshapes "
                    f"mix the batch, channel and spatial axes. Fix: use torch.flatten(x, 1), {_FALLBACK}."
                )
            add(n, _lift_module(nn.Flatten(), where(n), opts), [tensor_arg(n, n.args[0])], f"{t}(N, -1)")
        elif t in _PARAM_CALLS and n.op == "call_function":
            src = tensor_arg(n, n.args[0] if n.args else n.kwargs.get("input"))

            def param(a: Any, n: torch.fx.Node = n) -> Any:
                if isinstance(a, torch.fx.Node):
                    if a.name not in attrs:
                        raise LiftError(
                            f"{where(n)}: its weight/bias {a.name!r} is computed in forward, not a parameter of the "
                            f"model; lift reads the parameters of F.linear/F.conv*/F.layer_norm/F.prelu as they are "
                            f"stored. Fix: pass self.weight / self.bias directly, or use the module, {_FALLBACK}."
                        )
                    return attrs[a.name]
                return a

            rest = [param(a) for a in n.args[1:]]
            kw = {k: param(v) for k, v in n.kwargs.items() if k != "input"}
            try:
                m = _PARAM_CALLS[t](*rest, **kw)
            except (TypeError, ValueError) as e:
                raise LiftError(f"{where(n)}: arguments not understood ({e}).") from None
            hidden = after_param[src]
            o, note = _options(m, opts, init, hidden)
            add(n, _lift_module(m, where(n), o), [src], f"{_call_name(n)} -> {type(m).__name__}", note)
            after_param[n.name] = hidden or _is_fan_in_layer(m)
            continue
        elif t in ("mean", torch.mean) and n.op in ("call_function", "call_method"):
            src = tensor_arg(n, n.args[0] if n.args else n.kwargs.get("input"))
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            keep = bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
            if dim is None or n.kwargs.get("dtype") is not None:
                raise LiftError(
                    f"{where(n)}: a mean over every axis (or with a dtype) averages the channels of a sample, which "
                    f"has no infinite-width kernel (the mean of infinitely many centred channels is 0). Fix: average "
                    f"over the spatial axes only, x.mean((2, 3)), {_FALLBACK}."
                )
            dims = (dim,) if isinstance(dim, int) else tuple(dim)
            add(n, SpatialMean(dims, keep, where(n)), [src], f"mean{dims}", "over the spatial axes")
        elif t in _UNARY and n.op in ("call_function", "call_method"):
            src = tensor_arg(n, n.args[0])
            try:
                m = _UNARY[t](*n.args[1:], **n.kwargs)
            except TypeError as e:
                raise LiftError(f"{where(n)}: arguments {n.args[1:]} {n.kwargs} not understood ({e}).") from None
            add(n, _lift_module(m, where(n), opts), [src], _call_name(n))
        else:
            raise LiftError(
                f"{where(n)} ({n.op} {n.format_node()}) has no infinite-width rule in ntkit (yet). Mapped calls: "
                f"{_mapped_calls()}, view/reshape(N, -1), x.mean(spatial dims), +, *, torch.cat; modules: "
                f"{_supported_names()}. Fix: use one of those, {_FALLBACK}."
            )
        after_param[n.name] = any(after_param.get(i, False) for i in nodes[-1].inputs)
    assert output is not None
    if output == input_name:
        return serial()
    chain = all(len(g.inputs) == 1 for g in nodes) and all(
        sum(i in g.inputs for g in nodes) <= 1 for i in [input_name, *(g.name for g in nodes)]
    )
    net = GraphNet(fuse_maxpool_nodes(nodes, output), input_name, output)  # ReLU -> MaxPool fused
    return seq.wrap(serial(*net.sublayers()) if chain and nodes[-1].name == output else net)


def format_table(rows: list[_Row]) -> str:
    """The explain table: torch node (a module by its qualified name) -> ntkit layer, how its kernel is computed,
    and the init read."""
    head = ("torch node", "torch op", "ntkit layer", "kernel", "init")
    cells = [head] + [(r.node, r.torch_op, r.layer, r.kernel, r.init) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(4)) + ("  " + c[4] if c[4] else "") for c in cells)


def lift(
    model: nn.Module,
    *,
    init: str = "default",
    W_std: Std = "init",
    b_std: Std = "init",
    parameterization: str = "standard",
    deg: Optional[int] = None,
    explain: bool = False,
) -> Net:
    """The ntkit network of a torch model (see the module docstring for the mapping and the init semantics).

    Args:
      model: an ``nn.Sequential`` of supported modules (``ntkit.lift.SUPPORTED``), or any ``nn.Module`` whose
        ``forward`` ``torch.fx`` can trace symbolically, taking and returning one tensor.
      init: ``"default"`` (the limit of PyTorch's default init: hidden biases vanish, the first layer's stays) or
        ``"weights"`` (``W_std² = Var(W)·fan_in``, ``b_std² = Var(b)`` read from each layer as it is).
      W_std, b_std: ``"init"`` (follow ``init``), ``"empirical"`` (root mean square of the current parameters,
        scaled by ``sqrt(fan_in)`` for weights) or a float applied to every layer. Layers without bias get
        ``b_std=None``.
      parameterization: ``"standard"`` (what a PyTorch model is) or ``"ntk"``.
      deg: ``None`` (default): every activation gets its own rule — a closed form, the exact-piece rule of
        piecewise ones (ReLU6, Hardtanh, ELU, ...; error ≤ 1e-9) or graded Gauss–Legendre for smooth ones (Tanh,
        Sigmoid, SiLU, Mish, ...; error ≤ 1e-8, about 10 ms per kernel entry on one core) — see
        :mod:`ntkit.layers.activations`. An int: 2-D Gauss–Hermite of that degree for the smooth activations
        instead (``Elementwise``; much faster on large kernels, but its error grows with the variance: at
        ``q = 20`` the Tanh NTK is 15 % off at ``deg=100``).
      explain: print the mapping table (torch node -> ntkit layer, how its kernel is computed — exact, or the
        numerical rule and its stated error — and the init read); it is also kept as the returned net's
        ``lift_explanation`` attribute.

    Raises:
      LiftError: naming the module or call, its qualified name in the model, why it has no kernel, and the fix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lift takes a torch.nn.Module, got {type(model).__name__}.")
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {INITS}.")
    if deg is not None and not (isinstance(deg, int) and not isinstance(deg, bool) and deg >= 2):
        raise ValueError(f"deg={deg!r}: give None (each activation's own rule) or an int >= 2 (Gauss–Hermite nodes).")
    opts = LiftOptions(W_std=W_std, b_std=b_std, parameterization=parameterization, deg=0 if deg is None else deg)
    rows: list[_Row] = []
    model = as_traceable(model)  # a bare nn.MultiheadAttention/Embedding/...: traced as a one-module graph
    if (isinstance(model, nn.Sequential) or type(model) in SUPPORTED) and not is_sequence_model(model):
        net = _lift_sequential(model, opts, init, rows)
    else:
        net = _lift_traced(model, opts, init, rows)
    table = format_table(rows)
    setattr(net, "lift_explanation", table)
    if explain:
        print(table)
    return net
