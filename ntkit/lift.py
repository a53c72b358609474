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


#: module type -> builder(module, options) -> ntkit layer. Extended by the conv family below when present.
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
if hasattr(L, "Flatten"):
    SUPPORTED[nn.Flatten] = lambda m, o: L.Flatten()


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
