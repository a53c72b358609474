"""Implementations of the empirical NTK and the block driver behind :func:`ntkit.empirical.empirical_ntk`.

Every implementation offers ``features(x_block, params=None)`` (per-sample quantities of a block of inputs)
and ``pair(features1, features2)`` (the kernel block, traced axes summed but not yet averaged), with
per-sample/per-pair byte and FLOP estimates that size the blocks and let ``auto`` choose.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
from torch import Tensor

from ntkit._empirical_core import EmpiricalError, OutSpec, memory_budget, single_fn

__all__ = ["make_impl", "choose", "run_blocks", "Jacobian", "NtkVp"]


# ---------------------------------------------------------------------------------------------------
# implementations: each offers features(x_block) and pair(feat1, feat2) -> kernel block (spec applied,
# not yet divided by the trace size), with memory estimates to size the blocks
# ---------------------------------------------------------------------------------------------------
class Jacobian:
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

    def active(self):
        return contextlib.nullcontext(self)

    def feature_bytes(self) -> float:  # per sample: the Jacobian and the vmapped backward passes
        return self.itemsize * self.m * (self.P + self.pr.saved_bytes / self.itemsize + 1)

    def pair_bytes(self) -> float:
        return self.itemsize * self.spec.per_pair

    def features(self, x: Tensor, params: Optional[dict] = None):
        """Per-sample Jacobians of the selected parameters; ``params`` may give other values (and extra
        entries, e.g. buffers, held fixed)."""
        sel, rest = _split(self.params, params, self.fixed)
        f = self._f
        jac = torch.func.vmap(torch.func.jacrev(lambda q, xi: f({**rest, **q}, xi)), in_dims=(None, 0))(sel, x)
        n = x.shape[0]
        return [j.reshape((n,) + self.spec.O + (-1,)) for j in jac.values()]

    def pair(self, f1, f2) -> Tensor:
        out = None
        for a, b in zip(f1, f2):
            c = self.spec.contract(a, b)
            out = c if out is None else out.add_(c)
        return out

    def feature_flops(self) -> float:  # per sample: forward and one backward pass per output entry
        return (1 + 2 * self.m) * max(self.pr.flops, 2.0 * self.P)

    def pair_flops(self) -> float:  # per (i, j)
        return 2.0 * self.spec.q * self.P

    def flops(self, n1: int, n2: int, x2_none: bool) -> float:
        nf = n1 if x2_none else n1 + n2
        pairs = n1 * (n1 + 1) / 2 if x2_none else n1 * n2
        return nf * self.feature_flops() + pairs * self.pair_flops()


class NtkVp:
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

    def active(self):
        return contextlib.nullcontext(self)

    def feature_bytes(self) -> float:
        return 0.0

    def pair_bytes(self) -> float:  # per (i, j): the full (*O, *O) block before tracing (the VJP/JVP work
        return self.itemsize * self.m * self.m * 2  # is chunked within the budget in pair())

    def features(self, x: Tensor, params: Optional[dict] = None):
        return x, (self.params if params is None else params)

    def pair(self, f1, f2) -> Tensor:
        (x1, allp), (x2, _) = f1, f2
        params, rest = _split(self.params, allp, self.fixed)
        O, m = self.spec.O, self.m
        model, fs = self.model, self.f

        def f(p, x):
            return fs({**p, **rest}, x)

        def f1(p):
            return torch.func.functional_call(model, {**p, **rest}, (x1,), tie_weights=True)

        eye = torch.eye(m, dtype=next(iter(params.values())).dtype, device=x1.device).reshape((m,) + O)
        # each direction holds a parameter-sized tangent and a JVP over the x1 block
        self.pr.refine()
        per_dir = self.itemsize * (self.P + x1.shape[0] * (self.pr.saved_bytes / self.itemsize + m))
        chunk = max(1, int(self.budget // max(per_dir, 1)))

        def per_sample(x):
            _, vjp_fn = torch.func.vjp(lambda p: f(p, x), params)

            def per_dir_fn(cot):
                (t,) = vjp_fn(cot)
                return torch.func.jvp(f1, (params,), (t,))[1]

            return torch.func.vmap(per_dir_fn, chunk_size=min(chunk, m))(eye)

        rows = torch.func.vmap(per_sample, chunk_size=max(1, chunk // m))(x2)  # (n2, *O, n1, *O)
        nd = 1 + len(O)
        full = rows.permute(list(range(nd, 2 * nd)) + list(range(nd)))  # (n1, *O, n2, *O)
        return torch.einsum(f"{self.spec.s1}{self.spec.s2}->{self.spec.out}", full)

    def feature_flops(self) -> float:
        return 0.0

    def pair_flops(self) -> float:  # per (i, j): a share of the VJP, and a JVP per output entry of x2
        return 3.0 * self.m * max(self.pr.flops, 2.0 * self.P)

    def flops(self, n1: int, n2: int, x2_none: bool) -> float:
        return n2 * self.m * 3 * max(self.pr.flops, 2.0 * self.P) + n1 * n2 * self.pair_flops()


def _split(selected: dict, given: Optional[dict], fixed: dict) -> tuple[dict, dict]:
    """Values of the selected parameters, and everything held fixed (other parameters, given extras)."""
    if given is None:
        return selected, fixed
    return {k: given[k] for k in selected}, {**fixed, **{k: v for k, v in given.items() if k not in selected}}


def make_impl(name: str, model, params, spec, pr, x1, fixed=None):
    if name == "jacobian":
        impl = Jacobian(model, params, spec, pr)
    elif name == "ntk_vp":
        impl = NtkVp(model, params, spec, pr)
    else:
        from ntkit._structured import Structured
        impl = Structured(model, params, spec, pr, x1, fixed)
    impl.fixed = fixed or {}
    return impl


def choose(model, params, spec, pr, x1, n2, x2_none, fixed=None):
    """``"auto"``: structured derivatives when the model has structured parameters (they are Jacobian
    contraction for every other parameter, and cheaper for these), else Jacobian contraction; NTK-vector
    products instead when their FLOP estimate is under half of that (all three are exact)."""
    n1 = x1.shape[0]
    best = make_impl("structured", model, params, spec, pr, x1, fixed)
    if not best.has_structure():
        best = make_impl("jacobian", model, params, spec, pr, x1, fixed)
    vp = make_impl("ntk_vp", model, params, spec, pr, x1, fixed)
    return vp if vp.flops(n1, n2, x2_none) < 0.5 * best.flops(n1, n2, x2_none) else best


# ---------------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------------
def _block_sizes(impl, n1: int, n2: int, block_size, budget: int) -> tuple[int, int]:
    if block_size is not None:
        b = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
        if len(b) != 2 or not all(isinstance(v, int) and v > 0 for v in b):
            raise EmpiricalError(f"block_size={block_size!r} must be a positive int or a pair of them.")
        return min(b[0], n1), min(b[1], n2)
    def fit() -> int:  # largest b with 2 b f + b² q <= budget
        f, q = impl.feature_bytes(), impl.pair_bytes()
        b = (-2 * f + math.sqrt(4 * f * f + 4 * q * budget)) / (2 * q) if q > 0 else budget / max(2 * f, 1)
        return max(1, int(b))

    b = fit()
    if b < max(n1, n2) and impl.pr.refine():  # the first estimate was an upper bound: measure, then refit
        b = fit()
    return min(b, n1), min(b, n2)


# below this many pairwise FLOPs, splitting K(x, x) into upper blocks saves less than its overhead
_SPLIT_MIN_FLOPS = 1e9


def _slice(feats, s: int, e: int):
    """Samples ``s:e`` of block features (tensors are batch-first; parameter dicts and None pass through)."""
    if isinstance(feats, Tensor):
        return feats[s:e]
    if isinstance(feats, (list, tuple)):
        return type(feats)(_slice(f, s, e) for f in feats)
    return feats


def _symmetric_pairs(impl, feats, n: int, spec: OutSpec) -> Tensor:
    """``K(x, x)`` from features of all of ``x``: upper blocks of a 4×4 (or 2×2) split only, lower blocks
    mirrored; the pairwise work falls to 10/16 (3/4)."""
    b = -(-n // (4 if n >= 64 else 2))
    parts = [_slice(feats, s, s + b) for s in range(0, n, b)]
    perm = spec.swap_perm()
    out = None
    for i, fa in enumerate(parts):
        for j in range(i, len(parts)):
            blk = impl.pair(fa, parts[j])
            if out is None:
                out = torch.empty(spec.shape(n, n), dtype=blk.dtype, device=blk.device)
            out[i * b:(i + 1) * b, j * b:(j + 1) * b] = blk
            if j != i:
                out[j * b:(j + 1) * b, i * b:(i + 1) * b] = blk.permute(perm)
    return out


def run_blocks(impl, x1: Tensor, x2: Optional[Tensor], spec: OutSpec, block_size, budget) -> Tensor:
    """Kernel of ``x1`` vs ``x2`` block by block. For ``x2=None`` only upper blocks are computed (the lower
    ones are their mirrors); even when everything fits, 32+ samples are split into 2 or 4 blocks so that
    the pairwise work falls to 3/4 or 10/16."""
    same = x2 is None
    xb = x1 if same else x2
    n1, n2 = x1.shape[0], xb.shape[0]
    if spec.batch_diag and n1 != n2:
        raise EmpiricalError(f"diagonal_axes contains the batch axis 0, which needs as many samples in x2 "
                             f"({n2}) as in x1 ({n1}).")
    b1, b2 = _block_sizes(impl, n1, n2, block_size, budget)
    if same or spec.batch_diag:
        b1 = b2 = min(b1, b2)

    def finish(k: Tensor) -> Tensor:
        return k if spec.trace_size == 1 else k.div_(spec.trace_size)

    if b1 >= n1 and b2 >= n2:
        fa = impl.features(x1)
        if same and not spec.batch_diag and block_size is None and n1 >= 32 \
                and n1 * n1 * impl.pair_flops() > _SPLIT_MIN_FLOPS:
            return finish(_symmetric_pairs(impl, fa, n1, spec))
        return finish(impl.pair(fa, fa if same else impl.features(xb)))
    if spec.batch_diag:
        blocks = []
        for s in range(0, n1, b1):
            fa = impl.features(x1[s:s + b1])
            blocks.append(impl.pair(fa, fa if same else impl.features(xb[s:s + b1])))
        return finish(torch.cat(blocks, 0))

    out = None
    cache = impl.feature_bytes() * n2 <= budget / 2
    feats: dict[int, Any] = {}  # column-block features (x2's, or x1's when x2 is None)

    def col(s2: int):
        if s2 in feats:
            return feats[s2]
        f = impl.features(xb[s2:s2 + b2])
        if cache:
            feats[s2] = f
        return f

    perm = spec.swap_perm()
    for s1 in range(0, n1, b1):
        fa = col(s1) if same else impl.features(x1[s1:s1 + b1])
        for s2 in range(s1 if same else 0, n2, b2):
            blk = impl.pair(fa, fa if same and s2 == s1 else col(s2))
            if out is None:
                out = torch.empty(spec.shape(n1, n2), dtype=blk.dtype, device=blk.device)
            out[s1:s1 + b1, s2:s2 + b2] = blk
            if same and s2 != s1:
                out[s2:s2 + b2, s1:s1 + b1] = blk.permute(perm)
    return finish(out)
