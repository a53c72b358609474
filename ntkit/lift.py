"""``lift``: turn a plain ``torch.nn.Sequential`` into the ntkit network whose infinite-width limit it is.

Widths are read from the modules. A PyTorch ``nn.Linear``/``nn.Conv*`` is a *standard*-parameterised layer:
its default initialisation draws ``W ~ U(±1/sqrt(fan_in))`` and ``b ~ U(±1/sqrt(fan_in))``, i.e. weight variance
``W_std²/fan_in`` with ``W_std² = 1/3`` and bias variance ``1/(3·fan_in)``. ``lift`` therefore defaults to
``parameterization="standard"`` with exactly those variances (the limit's Gaussian has the same second moments
as the uniform draw), so the lifted kernels describe that very model: its NNGP at initialisation, and the
expected NTK under PyTorch's gradients (Sohl-Dickstein et al. 2020). ``W_std``/``b_std`` may be given instead,
``"empirical"`` measures them from the module's current parameters, and ``parameterization="ntk"`` gives the
NTK-parameterised limit (finite NTK as width → ∞).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import nn

from ntkit import layers as L
from ntkit.nets import Net, serial

__all__ = ["lift", "LiftError", "SUPPORTED"]

Std = Union[float, str, None]


class LiftError(ValueError):
    """A module that ``lift`` cannot map; the message lists what is supported."""


def _std(value: Std, kind: str, param: Optional[torch.Tensor], fan_in: int) -> Optional[float]:
    """Resolve W_std / b_std: a float, "init" (PyTorch's default init), or "empirical" (measured)."""
    if param is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value == "init":
        return math.sqrt(1 / 3) if kind == "W" else math.sqrt(1 / (3 * fan_in))
    if value == "empirical":
        p = param.detach().double()
        if kind == "W":
            return float(p.pow(2).mean().sqrt() * math.sqrt(fan_in))
        return float(p.pow(2).mean().sqrt())
    raise ValueError(f"{kind}_std={value!r}: give a float, 'init' or 'empirical'.")


def _linear(m: nn.Linear, opts: dict) -> L.Layer:
    fan_in = m.in_features
    return L.Dense(m.out_features, W_std=_std(opts["W_std"], "W", m.weight, fan_in),
                   b_std=_std(opts["b_std"], "b", m.bias, fan_in), parameterization=opts["parameterization"])


def _gelu(m: nn.GELU, opts: dict) -> L.Layer:
    return L.Gelu(approximate=(m.approximate == "tanh"))


#: module type -> builder(module, options) -> ntkit layer (the conv/pooling family is added below).
SUPPORTED: dict[type, Callable[[nn.Module, dict], L.Layer]] = {
    nn.Linear: _linear,
    nn.ReLU: lambda m, o: L.Relu(),
    nn.LeakyReLU: lambda m, o: L.LeakyRelu(m.negative_slope),
    nn.GELU: _gelu,
    nn.Tanh: lambda m, o: L.Elementwise(torch.tanh, name="tanh", deg=o["deg"]),
    nn.Sigmoid: lambda m, o: L.Elementwise(torch.sigmoid, name="sigmoid", deg=o["deg"]),
    nn.SiLU: lambda m, o: L.Elementwise(nn.functional.silu, name="silu", deg=o["deg"]),
    nn.Identity: lambda m, o: L.Identity(),
}


def _unsupported(m: nn.Module, why: str) -> "LiftError":
    return LiftError(f"{m!r}: {why}")


def _conv(m: nn.Module, opts: dict) -> L.Layer:
    """``nn.Conv{1,2,3}d`` -> ``Conv`` (standard parameterisation; fan-in = in_channels × Π kernel_size)."""
    if m.groups != 1 or any(d != 1 for d in m.dilation):
        raise _unsupported(m, "grouped or dilated convolutions have no kernel rule in ntkit; use groups=1, "
                              "dilation=1.")
    if m.padding_mode not in ("zeros", "circular"):
        raise _unsupported(m, f"padding_mode={m.padding_mode!r} is not supported; use 'zeros' or 'circular'.")
    if isinstance(m.padding, str):
        padding = m.padding.upper()  # torch's 'same'/'valid' are lax's SAME/VALID (extra pixel at the end)
        if m.padding_mode == "circular" and padding == "SAME":
            padding = "CIRCULAR"
    else:
        padding = tuple(int(p) for p in m.padding)
    fan_in = m.in_channels * math.prod(m.kernel_size)
    return L.Conv(m.out_channels, tuple(m.kernel_size), strides=tuple(m.stride), padding=padding,
                  W_std=_std(opts["W_std"], "W", m.weight, fan_in), b_std=_std(opts["b_std"], "b", m.bias, fan_in),
                  parameterization=opts["parameterization"], padding_mode=m.padding_mode,
                  in_channels=m.in_channels)


def _avg_pool(m: nn.Module, opts: dict) -> L.Layer:
    """``nn.AvgPool{1,2,3}d`` -> ``AvgPool`` (torch's default stride is the window, as ``m.stride`` holds)."""
    rank = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
    tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * rank
    if m.ceil_mode or getattr(m, "divisor_override", None) is not None:
        raise _unsupported(m, "ceil_mode=True and divisor_override have no kernel rule; use the defaults.")
    pad = tup(m.padding)
    return L.AvgPool(tup(m.kernel_size), strides=tup(m.stride or m.kernel_size),
                     padding=pad if any(pad) else "VALID",
                     normalize_edges=not m.count_include_pad and any(pad))


def _adaptive_avg_pool(m: nn.Module, opts: dict) -> L.Layer:
    """``nn.AdaptiveAvgPool{1,2,3}d(1)`` -> ``GlobalAvgPool`` (other output sizes are not supported)."""
    size = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,)
    if any(s != 1 for s in size):
        raise _unsupported(m, "only output_size=1 (global average pooling) is supported.")
    return L.GlobalAvgPool()


def _flatten(m: nn.Flatten, opts: dict) -> L.Layer:
    if m.start_dim != 1 or m.end_dim != -1:
        raise _unsupported(m, "only nn.Flatten(start_dim=1, end_dim=-1) is supported.")
    return L.Flatten()


SUPPORTED.update({nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
                  nn.AvgPool1d: _avg_pool, nn.AvgPool2d: _avg_pool, nn.AvgPool3d: _avg_pool,
                  nn.AdaptiveAvgPool1d: _adaptive_avg_pool, nn.AdaptiveAvgPool2d: _adaptive_avg_pool,
                  nn.AdaptiveAvgPool3d: _adaptive_avg_pool, nn.Flatten: _flatten})


def _flatten_sequential(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        out: list[nn.Module] = []
        for child in model:
            out += _flatten_sequential(child)
        return out
    return [model]


def lift(model: nn.Module, *, W_std: Std = "init", b_std: Std = "init", parameterization: str = "standard",
         deg: int = 25) -> Net:
    """The ntkit network of a ``torch.nn.Sequential`` (nested Sequentials are flattened).

    Args:
      model: an ``nn.Sequential`` of supported modules (``ntkit.lift.SUPPORTED`` lists them).
      W_std, b_std: ``"init"`` (PyTorch's default initialisation, see module docstring), ``"empirical"``
        (root-mean-square of the module's current parameters, scaled by ``sqrt(fan_in)`` for weights) or a
        float applied to every layer. Layers without bias get ``b_std=None`` whatever is given.
      parameterization: ``"standard"`` (what a PyTorch model is) or ``"ntk"``.
      deg: quadrature degree for activations without a closed form (Tanh, Sigmoid, SiLU).

    Raises:
      LiftError: for a module that is not supported (the message lists the supported ones), or a model that is
        not an ``nn.Sequential`` (use ``ntkit.empirical`` for the finite-width NTK of any module).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lift takes a torch.nn.Module, got {type(model).__name__}.")
    opts = dict(W_std=W_std, b_std=b_std, parameterization=parameterization, deg=deg)
    names = ", ".join(sorted(t.__name__ for t in SUPPORTED))
    if not isinstance(model, nn.Sequential) and type(model) not in SUPPORTED:
        raise LiftError(
            f"lift needs an nn.Sequential of supported layers, got {type(model).__name__} (its forward could do "
            f"anything). Rewrite it as nn.Sequential of: {names}; or use ntkit.empirical.empirical_ntk for the "
            f"finite-width NTK of any module.")
    layers = []
    for i, m in enumerate(_flatten_sequential(model)):
        build = SUPPORTED.get(type(m))
        if build is None:
            raise LiftError(f"layer {i} ({m!r}) has no infinite-width rule in ntkit. Supported modules: {names}.")
        layers.append(build(m, opts))
    return serial(*layers)
