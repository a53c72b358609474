"""Choosing an implementation, and computing an empirical kernel block by block within a memory budget."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ntkit._memory import plan_tile
from ntkit._tiles import Assembler, TilePlan
from ntkit.empirical._model import Probe
from ntkit.empirical._spec import OutSpec
from ntkit.empirical.jacobian import Jacobian
from ntkit.empirical.ntk_vp import NtkVp
from ntkit.empirical.protocol import EmpiricalError, Implementation
from ntkit.empirical.structured import Structured, _Chain

__all__ = ["make", "choose", "run_blocks"]


def make(
    name: str,
    model: nn.Module,
    params: dict[str, Tensor],
    spec: OutSpec,
    pr: Probe,
    x1: Tensor,
    fixed: Optional[dict] = None,
    chain: Optional[_Chain] = None,
) -> Implementation:
    """The implementation ``name`` ("jacobian", "ntk_vp" or "structured") for this model and output spec
    (``chain``: the model's chain analysis, :func:`~ntkit.empirical.structured.plan_chain`, if it has one)."""
    impl: Implementation
    if name == "jacobian":
        impl = Jacobian(model, params, spec, pr)
    elif name == "ntk_vp":
        impl = NtkVp(model, params, spec, pr)
    elif name == "structured":
        impl = Structured(model, params, spec, pr, x1, fixed, chain)
    else:
        raise EmpiricalError(f"implementation={name!r}: choose 'jacobian', 'ntk_vp' or 'structured'.")
    impl.fixed = fixed or {}
    return impl


def choose(
    model: nn.Module,
    params: dict[str, Tensor],
    spec: OutSpec,
    pr: Probe,
    x1: Tensor,
    n2: int,
    x2_none: bool,
    fixed: Optional[dict] = None,
    chain: Optional[_Chain] = None,
) -> Implementation:
    """``"auto"``: structured derivatives when the model has structured parameters (they are Jacobian
    contraction for every other parameter, and cheaper for these), else Jacobian contraction; NTK-vector
    products instead when their FLOP estimate is under half of that (all three are exact)."""
    n1 = x1.shape[0]
    best = make("structured", model, params, spec, pr, x1, fixed, chain)
    if not best.has_structure():
        best = make("jacobian", model, params, spec, pr, x1, fixed)
    vp = make("ntk_vp", model, params, spec, pr, x1, fixed)
    return vp if vp.flops(n1, n2, x2_none) < 0.5 * best.flops(n1, n2, x2_none) else best


def _block_sizes(impl: Any, n1: int, n2: int, block_size, budget: int) -> tuple[int, int]:
    if block_size is not None:
        sizes = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
        if len(sizes) != 2 or not all(isinstance(v, int) and v > 0 for v in sizes):
            raise EmpiricalError(f"block_size={block_size!r} must be a positive int or a pair of them.")
        return min(sizes[0], n1), min(sizes[1], n2)

    def fit() -> int:  # largest b with 2 b f + b² q <= budget (at least one sample)
        return plan_tile(
            n1, n2, pair_bytes=impl.pair_bytes(), sample_bytes=impl.feature_bytes(), budget=budget, strict=False
        )

    b = fit()
    if b < max(n1, n2) and impl.pr.refine():  # the first estimate was an upper bound: measure, then refit
        b = fit()
    return min(b, n1), min(b, n2)


# below this many pairwise FLOPs, splitting K(x, x) into upper blocks saves less than its overhead
_SPLIT_MIN_FLOPS = 1e9


def _slice(feats: Any, s: int, e: int) -> Any:
    """Samples ``s:e`` of block features (tensors are batch-first; parameter dicts and None pass through)."""
    if isinstance(feats, Tensor):
        return feats[s:e]
    if isinstance(feats, (list, tuple)):
        return type(feats)(_slice(f, s, e) for f in feats)
    return feats


def _assemble(impl: Implementation, plan: TilePlan, spec: OutSpec, row, col) -> Tensor:
    """Every tile of ``plan`` as ``impl.pair(row(i, r0, r1), col(j, c0, c1))`` (the diagonal tiles of a symmetric
    plan pair a block with itself), placed and mirrored by the one :class:`~ntkit._tiles.Assembler`."""
    perm = spec.swap_perm()
    out = Assembler(
        plan,
        ("k",),
        lambda t: t.permute(perm),
        what="the empirical kernel",
        fix="trace output axes (trace_axes), take diagonals (diagonal_axes) or pass fewer samples.",
    )
    current: list = [None, None]  # the features of the current row block (tiles come row by row)
    for t in plan:
        if current[0] != t.bi:
            current[:] = [t.bi, row(t.bi, t.r0, t.r1)]
        fa = current[1]
        fb = fa if plan.symmetric and t.diagonal else col(t.bj, t.c0, t.c1)
        out.put(t, {"k": impl.pair(fa, fb)})
    return out.outputs["k"]


def run_blocks(
    impl: Implementation, x1: Tensor, x2: Optional[Tensor], spec: OutSpec, block_size, budget: int
) -> Tensor:
    """Kernel of ``x1`` vs ``x2`` block by block. For ``x2=None`` only upper blocks are computed (the lower
    ones are their mirrors); even when everything fits, 32+ samples are split into 2 or 4 blocks so that
    the pairwise work falls to 3/4 or 10/16."""
    same = x2 is None
    xb = x1 if x2 is None else x2
    n1, n2 = x1.shape[0], xb.shape[0]
    if spec.batch_diag and n1 != n2:
        raise EmpiricalError(
            f"diagonal_axes contains the batch axis 0, which needs as many samples in x2 ({n2}) as in x1 ({n1})."
        )
    b1, b2 = _block_sizes(impl, n1, n2, block_size, budget)
    if same or spec.batch_diag:
        b1 = b2 = min(b1, b2)

    def finish(k: Tensor) -> Tensor:
        return k if spec.trace_size == 1 else k.div_(spec.trace_size)

    if b1 >= n1 and b2 >= n2:
        fa = impl.features(x1)
        if (
            same
            and not spec.batch_diag
            and block_size is None
            and n1 >= 32
            and n1 * n1 * impl.pair_flops() > _SPLIT_MIN_FLOPS
        ):
            # upper blocks of a 4x4 (or 2x2) split of the features at hand: pairwise work 10/16 (3/4)
            b = -(-n1 // (4 if n1 >= 64 else 2))
            whole = TilePlan(n1, n1, b, symmetric=True)
            return finish(
                _assemble(impl, whole, spec, lambda i, s, e: _slice(fa, s, e), lambda j, s, e: _slice(fa, s, e))
            )
        return finish(impl.pair(fa, fa if same else impl.features(xb)))
    if spec.batch_diag:
        blocks = []
        for s in range(0, n1, b1):
            fa = impl.features(x1[s : s + b1])
            blocks.append(impl.pair(fa, fa if same else impl.features(xb[s : s + b1])))
        return finish(torch.cat(blocks, 0))

    cache = impl.feature_bytes() * n2 <= budget / 2
    feats: dict[int, Any] = {}  # column-block features (x2's, or x1's when x2 is None)

    def col(j: int, c0: int, c1: int) -> Any:
        if j in feats:
            return feats[j]
        f = impl.features(xb[c0:c1])
        if cache:
            feats[j] = f
        return f

    def row(i: int, r0: int, r1: int) -> Any:
        return col(i, r0, r1) if same else impl.features(x1[r0:r1])

    plan = TilePlan(n1, n2, b1, symmetric=same, col_size=None if same else b2)
    return finish(_assemble(impl, plan, spec, row, col))
