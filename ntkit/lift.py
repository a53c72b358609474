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

from torch import nn

import ntkit.layers  # noqa: F401  (every layer family registers its lift rules on import)
from ntkit.layers.base import LIFT_RULES, LiftError, LiftOptions, Std
from ntkit.nets import Net, serial

__all__ = ["lift", "LiftError", "SUPPORTED"]

#: torch module type -> lift rule; each layer's file registers its own (``@lift_rule`` in ntkit/layers/)
SUPPORTED = LIFT_RULES


def _flatten_sequential(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        out: list[nn.Module] = []
        for child in model:
            out += _flatten_sequential(child)
        return out
    return [model]


def lift(
    model: nn.Module, *, W_std: Std = "init", b_std: Std = "init", parameterization: str = "standard", deg: int = 25
) -> Net:
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
    opts = LiftOptions(W_std=W_std, b_std=b_std, parameterization=parameterization, deg=deg)
    names = ", ".join(sorted(t.__name__ for t in SUPPORTED))
    if not isinstance(model, nn.Sequential) and type(model) not in SUPPORTED:
        raise LiftError(
            f"lift needs an nn.Sequential of supported layers, got {type(model).__name__} (its forward could do "
            f"anything). Rewrite it as nn.Sequential of: {names}; or use ntkit.empirical.empirical_ntk for the "
            f"finite-width NTK of any module."
        )
    layers = []
    for i, m in enumerate(_flatten_sequential(model)):
        build = SUPPORTED.get(type(m))
        if build is None:
            raise LiftError(f"layer {i} ({m!r}) has no infinite-width rule in ntkit. Supported modules: {names}.")
        layers.append(build(m, opts))
    return serial(*layers)
