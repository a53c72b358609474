"""Linearisation and Taylor expansion of a torch model around its parameters (as trainable modules)."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from ntkit.empirical._model import ParamsLike, resolve_params
from ntkit.empirical.protocol import EmpiricalError

__all__ = ["linearize", "taylor_expand"]


class _Expanded(nn.Module):
    """``f_lin(x) = Σ_{k≤degree} (1/k!) D^k f(θ0)[θ − θ0]^k``, with ``θ`` trainable parameters of this module."""

    def __init__(self, model: nn.Module, params0: dict[str, Tensor], degree: int):
        super().__init__()
        self._model = [model]  # not a submodule: its parameters must not be trained through this module
        self.degree = degree
        self._names = list(params0)
        self._keys = [n.replace(".", "__") for n in self._names]
        for k, v in zip(self._keys, params0.values()):
            self.register_buffer(f"_p0_{k}", v.detach().clone())
        # an OrderedDict keeps the model's parameter order (a plain dict would be sorted by ParameterDict)
        self.params = nn.ParameterDict(
            OrderedDict((k, nn.Parameter(v.detach().clone())) for k, v in zip(self._keys, params0.values()))
        )

    def params0(self) -> dict[str, Tensor]:
        return {n: getattr(self, f"_p0_{k}") for n, k in zip(self._names, self._keys)}

    def current(self) -> dict[str, Tensor]:
        return {n: self.params[k] for n, k in zip(self._names, self._keys)}

    def forward(self, *args, **kwargs):
        model = self._model[0]
        p0 = self.params0()
        dp = {n: self.params[k] - p0[n] for n, k in zip(self._names, self._keys)}

        def f(p):
            return torch.func.functional_call(model, p, args, kwargs, tie_weights=True)

        return _taylor(f, p0, dp, self.degree)

    def extra_repr(self) -> str:
        return f"degree={self.degree}, params={len(self._names)}"


def _taylor(f, p0, dp, degree):
    """``Σ_{k=0}^{degree} D^k f(p0)[dp]^k / k!`` by nested forward-mode derivatives along ``dp``.

    With ``g(t) = f(p0 + t·dp)``, the k-th term is ``g^{(k)}(0)/k!``; derivatives of ``g`` come from JVPs of
    JVPs (NT's ``taylor_expand`` does the same).
    """

    def g_derivs(p, order):
        # returns [f(p), D f(p)[dp], ..., D^order f(p)[dp]^order]
        if order == 0:
            return [f(p)]
        jvp_out = torch.func.jvp(lambda q: tuple(g_derivs(q, order - 1)), (p,), (dp,))
        primal, tangent = jvp_out[0], jvp_out[1]  # (primal, tangent): no has_aux
        return [primal[0]] + list(tangent)

    terms = g_derivs(p0, degree)
    out = terms[0]
    for k in range(1, degree + 1):
        out = out + terms[k] / math.factorial(k)
    return out


def _expanded(model: nn.Module, params0, degree: int) -> _Expanded:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not (isinstance(degree, int) and degree >= 0):
        raise EmpiricalError(f"degree={degree!r} must be an int >= 0.")
    p0 = resolve_params(model, params0)
    return _Expanded(model, p0, degree)


def linearize(model: nn.Module, params0: ParamsLike = None) -> nn.Module:
    """First-order Taylor expansion ``f_lin(θ, x) = f(θ0, x) + J(θ0, x)(θ − θ0)`` as a trainable module.

    The returned module's parameters ``θ`` start at ``θ0`` (the model's current parameters, or a selection
    or mapping as in :func:`empirical_ntk`'s ``params``; unselected parameters stay fixed) and can be trained
    with any torch optimizer: tangent-space fine-tuning (Ortiz-Jiménez et al. 2023). One forward costs a
    forward and a JVP of the model. The model itself is not modified.
    """
    return _expanded(model, params0, 1)


def taylor_expand(model: nn.Module, params0: ParamsLike = None, degree: int = 1) -> nn.Module:
    """Taylor expansion of order ``degree`` around ``θ0``: ``Σ_k D^k f(θ0)[θ−θ0]^k / k!`` (nested JVPs).

    ``degree=0`` is the constant ``f(θ0, x)``, ``1`` is :func:`linearize`.
    """
    return _expanded(model, params0, degree)
