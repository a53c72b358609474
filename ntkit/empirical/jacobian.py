"""``implementation="jacobian"``: per-sample Jacobians of every selected parameter, contracted pair by pair."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ntkit.empirical._model import single_fn
from ntkit.empirical._spec import OutSpec
from ntkit.empirical.protocol import Implementation, split_params

__all__ = ["Jacobian"]


class Jacobian(Implementation):
    """Per-sample Jacobians ``J[i, *O, p]`` of every selected parameter, contracted pair by pair."""

    name = "jacobian"

    def __init__(self, model, params, spec: OutSpec, pr, x1=None):
        self.params, self.spec = params, spec
        self._f = single_fn(model)
        self.fixed: dict = {}
        self.m = math.prod(spec.O)
        self.P = sum(p.numel() for p in params.values())
        self.itemsize = next(iter(params.values())).element_size()
        self.pr = pr

    def feature_bytes(self) -> float:  # per sample: the Jacobian and the vmapped backward passes
        return self.itemsize * self.m * (self.P + self.pr.saved_bytes / self.itemsize + 1)

    def pair_bytes(self) -> float:
        return self.itemsize * self.spec.per_pair

    def features(self, x: Tensor, params: Optional[dict] = None):
        """Per-sample Jacobians of the selected parameters; ``params`` may give other values (and extra
        entries, e.g. buffers, held fixed)."""
        sel, rest = split_params(self.params, params, self.fixed)
        f = self._f
        jac = torch.func.vmap(torch.func.jacrev(lambda q, xi: f({**rest, **q}, xi)), in_dims=(None, 0))(sel, x)
        n = x.shape[0]
        return [j.reshape((n,) + self.spec.O + (-1,)) for j in jac.values()]

    def pair(self, f1, f2) -> Tensor:
        out = None
        for a, b in zip(f1, f2):
            c = self.spec.contract(a, b)
            out = c if out is None else out.add_(c)
        assert out is not None, "resolve_params selects at least one parameter, so there is one Jacobian block"
        return out

    def feature_flops(self) -> float:  # per sample: forward and one backward pass per output entry
        return (1 + 2 * self.m) * max(self.pr.flops, 2.0 * self.P)

    def pair_flops(self) -> float:  # per (i, j)
        return 2.0 * self.spec.q * self.P
