"""``lift``: turn a PyTorch model into the ntkit network whose infinite-width limit it is.

An ``nn.Sequential`` is mapped module by module (a ``serial`` net). Any other ``nn.Module`` is traced with
``torch.fx.symbolic_trace`` and its graph mapped node by node: modules through their ``@lift_rule``
(:data:`SUPPORTED`), ``torch.relu``/``F.relu``/``F.gelu``/``torch.tanh``/``torch.sigmoid``/``F.silu``/
``F.leaky_relu``/``torch.flatten``/``x.flatten(1)``/``x.view(x.size(0), -1)`` to the same layers, ``x + y`` /
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

import ntkit.layers  # noqa: F401  (every layer family registers its lift rules on import)
from ntkit.layers.base import LIFT_RULES, Layer, LiftError, LiftOptions, Std
from ntkit.layers.branching import FanInConcat, FanInProd, FanInSum
from ntkit.nets import GraphNet, GraphNode, Net, serial

__all__ = ["lift", "LiftError", "SUPPORTED", "INITS"]

#: torch module type -> lift rule; each layer's file registers its own (``@lift_rule`` in ntkit/layers/)
SUPPORTED = LIFT_RULES
#: the values of ``lift(init=...)``
INITS = ("default", "weights")

_FALLBACK = "or use ntkit.empirical.empirical_ntk for the finite-width NTK of any module"


def _supported_names() -> str:
    return ", ".join(sorted(t.__name__ for t in SUPPORTED))


# functional / method calls -> an equivalent module, lifted by that module's own rule
def _unary_calls() -> dict[Any, Callable[..., nn.Module]]:
    def act(mod: Callable[[], nn.Module]) -> Callable[..., nn.Module]:
        return lambda *a, **kw: mod()

    def gelu(*a: Any, approximate: str = "none", **kw: Any) -> nn.Module:
        return nn.GELU(approximate=approximate)

    def leaky(*a: Any, negative_slope: float = 0.01, **kw: Any) -> nn.Module:
        return nn.LeakyReLU(a[0] if a else negative_slope)

    def flatten(*a: Any, start_dim: int = 0, end_dim: int = -1) -> nn.Module:
        return nn.Flatten(a[0] if a else start_dim, a[1] if len(a) > 1 else end_dim)

    def method_flatten(*a: Any, start_dim: int = 0, end_dim: int = -1) -> nn.Module:
        return flatten(*a, start_dim=start_dim, end_dim=end_dim)

    return {
        torch.relu: act(nn.ReLU),
        F.relu: act(nn.ReLU),
        "relu": act(nn.ReLU),
        F.gelu: gelu,
        torch.tanh: act(nn.Tanh),
        F.tanh: act(nn.Tanh),
        "tanh": act(nn.Tanh),
        torch.sigmoid: act(nn.Sigmoid),
        F.sigmoid: act(nn.Sigmoid),
        "sigmoid": act(nn.Sigmoid),
        F.silu: act(nn.SiLU),
        F.leaky_relu: leaky,
        torch.flatten: flatten,
        "flatten": method_flatten,
        "contiguous": act(nn.Identity),
    }


_UNARY = _unary_calls()
_SUMS = (operator.add, operator.iadd, torch.add)
_PRODS = (operator.mul, operator.imul, torch.mul)


@dataclasses.dataclass
class _Row:
    node: str
    torch_op: str
    layer: str
    init: str


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


def _lift_module(m: nn.Module, qualname: str, opts: LiftOptions) -> Layer:
    rule = SUPPORTED.get(type(m))
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
        for name, child in model.named_children():
            out += _flatten_sequential(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix or type(model).__name__, model)]


def _lift_sequential(model: nn.Module, opts: LiftOptions, init: str, rows: list[_Row]) -> Net:
    layers = []
    after_param = False
    for qualname, m in _flatten_sequential(model, ""):
        o, note = _options(m, opts, init, after_param)
        layer = _lift_module(m, qualname, o)
        rows.append(_Row(qualname, type(m).__name__, repr(layer), note))
        layers.append(layer)
        after_param = after_param or _is_fan_in_layer(m)
    return serial(*layers)


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

    def where(n: torch.fx.Node) -> str:
        return f"{n.target}" if n.op == "call_module" else f"{_call_name(n)} (graph node {n.name!r})"

    def tensor_arg(n: torch.fx.Node, a: Any) -> str:
        if not isinstance(a, torch.fx.Node) or a.name not in value_names:
            raise LiftError(
                f"{where(n)}: argument {a!r} is not a tensor value ntkit tracks (a constant, a size, or a call "
                f"lift does not map). Fix: compute it with supported modules/calls, {_FALLBACK}."
            )
        return a.name

    def add(n: torch.fx.Node, layer: Layer, inputs: list[str], torch_op: str, note: str = "") -> None:
        nodes.append(GraphNode(n.name, layer, tuple(inputs)))
        value_names.add(n.name)
        rows.append(_Row(n.name, torch_op, repr(layer), note))

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
            raise LiftError(
                f"graph node {n.name!r} reads the tensor attribute {n.target!r} directly in forward; ntkit lifts "
                f"parameters only through modules (nn.Linear, nn.Conv*). Fix: use a module for it, {_FALLBACK}."
            )
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
                f"relu, gelu, tanh, sigmoid, silu, leaky_relu, flatten, view/reshape(N, -1), +, *, torch.cat; "
                f"modules: {_supported_names()}. Fix: use one of those, {_FALLBACK}."
            )
        after_param[n.name] = any(after_param.get(i, False) for i in nodes[-1].inputs)
    assert output is not None
    if output == input_name:
        return serial()
    chain = all(len(g.inputs) == 1 for g in nodes) and all(
        sum(i in g.inputs for g in nodes) <= 1 for i in [input_name, *(g.name for g in nodes)]
    )
    net = GraphNet(nodes, input_name, output)
    return serial(*net.sublayers()) if chain and nodes[-1].name == output else net


def format_table(rows: list[_Row]) -> str:
    """The explain table: torch node -> ntkit layer, and the init read."""
    head = ("torch node", "torch op", "ntkit layer", "init")
    cells = [head] + [(r.node, r.torch_op, r.layer, r.init) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(3)) + ("  " + c[3] if c[3] else "") for c in cells)


def lift(
    model: nn.Module,
    *,
    init: str = "default",
    W_std: Std = "init",
    b_std: Std = "init",
    parameterization: str = "standard",
    deg: int = 25,
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
      deg: quadrature degree for activations without a closed form (Tanh, Sigmoid, SiLU).
      explain: print the mapping table (torch node -> ntkit layer, init read); it is also kept as the returned
        net's ``lift_explanation`` attribute.

    Raises:
      LiftError: naming the module or call, its qualified name in the model, why it has no kernel, and the fix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lift takes a torch.nn.Module, got {type(model).__name__}.")
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {INITS}.")
    opts = LiftOptions(W_std=W_std, b_std=b_std, parameterization=parameterization, deg=deg)
    rows: list[_Row] = []
    if isinstance(model, nn.Sequential) or type(model) in SUPPORTED:
        net = _lift_sequential(model, opts, init, rows)
    else:
        net = _lift_traced(model, opts, init, rows)
    table = format_table(rows)
    setattr(net, "lift_explanation", table)
    if explain:
        print(table)
    return net
