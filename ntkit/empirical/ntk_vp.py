"""``implementation="ntk_vp"``: NTK-vector products; row ``(j, b)`` of the kernel is ``J(x1) (J(x2)[j, b])ᵀ``,
one VJP and one JVP, never a Jacobian."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ntkit._memory import memory_budget
from ntkit.empirical._model import single_fn
from ntkit.empirical._spec import OutSpec
from ntkit.empirical.protocol import Implementation, split_params

__all__ = ["NtkVp"]


class NtkVp(Implementation):
    """NTK-vector products: row ``(j, b)`` of the kernel is ``J(x1) (J(x2)[j, b])ᵀ``, one VJP and one JVP."""

    name = "ntk_vp"

    def __init__(self, model, params, spec: OutSpec, pr, x1=None):
        self.model, self.params, self.spec, self.pr = model, params, spec, pr
        self.budget = memory_budget(next(iter(params.values())).device)
        self.fixed: dict = {}
        self.f = single_fn(model)
        self.m = math.prod(spec.O)
        self.P = sum(p.numel() for p in params.values())
        self.itemsize = next(iter(params.values())).element_size()

    def feature_bytes(self) -> float:
        return 0.0

    def pair_bytes(self) -> float:  # per (i, j): the full (*O, *O) block before tracing (the VJP/JVP work
        return self.itemsize * self.m * self.m * 2  # is chunked within the budget in pair())

    def features(self, x: Tensor, params: Optional[dict] = None):
        return x, (self.params if params is None else params)

    def pair(self, f1, f2) -> Tensor:
        (x1, allp), (x2, _) = f1, f2
        params, rest = split_params(self.params, allp, self.fixed)
        O, m = self.spec.O, self.m
        model, fs = self.model, self.f

        def f(p, x):
            return fs({**p, **rest}, x)

        def f_x1(p):
            return torch.func.functional_call(model, {**p, **rest}, (x1,), tie_weights=True)

        eye = torch.eye(m, dtype=next(iter(params.values())).dtype, device=x1.device).reshape((m,) + O)
        # each direction holds a parameter-sized tangent and a JVP over the x1 block
        self.pr.refine()
        per_dir = self.itemsize * (self.P + x1.shape[0] * (self.pr.saved_bytes / self.itemsize + m))
        chunk = max(1, int(self.budget // max(per_dir, 1)))

        def per_sample(x):
            vjp_fn = torch.func.vjp(lambda p: f(p, x), params)[1]  # (output, vjp_fn): no has_aux

            def per_dir_fn(cot):
                (t,) = vjp_fn(cot)
                return torch.func.jvp(f_x1, (params,), (t,))[1]

            return torch.func.vmap(per_dir_fn, chunk_size=min(chunk, m))(eye)

        rows = torch.func.vmap(per_sample, chunk_size=max(1, chunk // m))(x2)  # (n2, m, n1, *O)
        rows = rows.reshape((x2.shape[0], *O, x1.shape[0], *O))  # the direction axis as the output axes
        nd = 1 + len(O)
        full = rows.permute(list(range(nd, 2 * nd)) + list(range(nd)))  # (n1, *O, n2, *O)
        return torch.einsum(f"{self.spec.s1}{self.spec.s2}->{self.spec.out}", full)

    def feature_flops(self) -> float:
        return 0.0

    def pair_flops(self) -> float:  # per (i, j): a share of the VJP, and a JVP per output entry of x2
        return 3.0 * self.m * max(self.pr.flops, 2.0 * self.P)

    def flops(self, n1: int, n2: int, x2_none: bool) -> float:
        return n2 * self.m * 3 * max(self.pr.flops, 2.0 * self.P) + n1 * n2 * self.pair_flops()
