"""The tiler of a network's ``kernel_fn``, and the self-covariance tape.

``Net.kernel_fn`` runs the whole layer stack tile by tile over blocks of samples (:class:`~ntkit._tiles.TilePlan`,
sized by :func:`~ntkit._memory.plan_tile`), so that the working memory is bounded whatever ``N1, N2``; the tiles
are placed into the output by the one :class:`~ntkit._tiles.Assembler`. With ``x2=None`` only the upper tiles
run.

Nets that pool carry each pair's full pixel-pixel covariance, and a tile then also needs every sample's own
(self) covariance, as large as a pair's. Rather than recomputing those in every tile, the diagonal tiles (or,
for ``x2`` given, each block against itself) record the only thing the other tiles need from them — the
same-pixel variances after every leaf layer, a few KB per image (:class:`Tape`) — and the off-diagonal tiles
run on cross-covariances alone (*pair-only* records, see :mod:`ntkit.layers.base`), replaying them.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from ntkit._inputs import all_finite
from ntkit._tiles import Assembler, Tile, TilePlan
from ntkit.kernel import Kernel, swap_pair
from ntkit.layers.base import Kernels, Layer, NonFiniteKernelError
from ntkit.nets.masks import has_masks, propagate_masks

__all__ = [
    "Tape",
    "apply_layer",
    "run_tiled",
    "tape_pays",
    "tape_bytes",
    "swap_pair",
    "NonFinite",
    "variances_finite",
    "leaf_paths",
    "diagnose_non_finite",
    "untracked_means",
]


class Tape:
    """Same-pixel variances after every leaf layer: recorded while a block of samples runs against itself
    (a diagonal tile), replayed into the pair-only records of the off-diagonal tiles (see
    :mod:`ntkit.kernel`). A nonlinearity needs from the self-covariances only these variances, so with a tape
    an off-diagonal tile propagates its cross-covariances alone — at 32×32 images, where a tile is one pair
    of images, that is a third of the work of propagating both images' full self-covariances as well."""

    def __init__(self, replay: Optional[tuple[list, list]] = None):
        self.steps: list = []
        self.replay = replay
        self.i = 0

    def step(self, out: Kernels) -> Kernels:
        outs = out if isinstance(out, list) else [out]
        if self.replay is None:
            self.steps.append(tuple(x.same_pixel_variances()[0].clone() for x in outs))
            return out
        a, b = self.replay[0][self.i], self.replay[1][self.i]
        self.i += 1
        new = [x.replace(var1=va, var2=vb) for x, va, vb in zip(outs, a, b)]
        return new if isinstance(out, list) else new[0]


_TAPE: contextvars.ContextVar[Optional[Tape]] = contextvars.ContextVar("ntkit_tape", default=None)


def apply_layer(layer: Layer, k: Kernels) -> Kernels:
    """``layer.kernel(k)``, recorded on / replayed from the active tape for leaf (non-combinator) layers.

    After every leaf layer the same-pixel variances of its output are checked to be finite (``N·pixels``
    numbers per side: negligible next to the rule). A variance that overflowed would otherwise be able to turn
    into a finite but wrong kernel further on (``exp(−∞) = 0``); :class:`NonFinite` makes ``Net.kernel_fn``
    diagnose the tile (:func:`diagnose_non_finite`)."""
    out = layer.kernel(k)
    if layer.is_combinator:
        return out
    if out is not k and not layer.carries_law:
        out = drop_law(out)
    if has_masks(k):  # NT's mask_constant: the output's masks, and its kernels zeroed at masked positions
        out = propagate_masks(layer, k, out)
    if not layer.tracks_means:
        out = untracked_means(out)
    tape = _TAPE.get()
    if tape is not None:
        out = tape.step(out)
    diagnosis = _DIAGNOSIS.get()
    if diagnosis is not None:
        diagnosis.check(layer, out)
    elif not variances_finite(out):
        raise NonFinite()
    return out


def drop_law(out: Kernels) -> Kernels:
    """The output of a layer that does not keep :attr:`~ntkit.kernel.Kernel.law` (the residual-stream program,
    kept only by layers with ``carries_law``, and by layers that return their input unchanged): without it."""

    def fix(x: Kernel) -> Kernel:
        return x if x.law is None else x.replace(law=None)

    return [fix(x) for x in out] if isinstance(out, list) else fix(out)


def untracked_means(out: Kernels) -> Kernels:
    """The output of a layer whose rule does not track means (:attr:`~ntkit.layers.base.Layer.tracks_means`):
    a Gaussian output is zero-mean and fresh (a parametric layer's), any other has unknown means."""

    def fix(x: Kernel) -> Kernel:
        if x.is_gaussian:
            return x.replace(mean1=None, mean2=None, mean_kind="exact", fresh=(True,) * len(x.fresh))
        return x.replace(mean1=None, mean2=None, mean_kind="unknown")

    return [fix(x) for x in out] if isinstance(out, list) else fix(out)


# ---------------------------------------------------------------------------------------------------
# non-finite kernels: a cheap check everywhere, a layer-by-layer diagnosis only when it fires
# ---------------------------------------------------------------------------------------------------
class NonFinite(Exception):
    """Internal signal: a tile's kernels or variances are not finite (``Net.kernel_fn`` then diagnoses it)."""


def variances_finite(out: Kernels) -> bool:
    """The same-pixel variances of a record (or of every branch) are finite."""
    for x in out if isinstance(out, list) else [out]:
        for v in x.same_pixel_variances():
            if v is not None and not all_finite(v.detach()):
                return False
    return True


_FIELDS = ("nngp", "ntk", "cov1", "cov2", "var1", "var2", "mean1", "mean2")


def _bad_fields(k: Kernels) -> list[str]:
    ks = k if isinstance(k, list) else [k]
    return [f for x in ks for f in _FIELDS if getattr(x, f) is not None and not all_finite(getattr(x, f).detach())]


def leaf_paths(net: Layer, prefix: str = "") -> list[tuple[str, Layer]]:
    """``(path, layer)`` of every leaf layer in the order a kernel computation applies them (depth first, as in
    :meth:`ntkit.nets.Net.hyperparameters`: ``"3"``, ``"2.1.0"``)."""
    if not net.is_combinator:
        return [(prefix.rstrip("."), net)]
    out: list[tuple[str, Layer]] = []
    for i, sub in enumerate(net.sublayers()):
        out += leaf_paths(sub, f"{prefix}{i}.")
    return out


class _Diagnosis:
    """Checks every field of every leaf layer's output, in order, and raises at the first non-finite one."""

    def __init__(self, net: Layer, hint: str):
        self.leaves, self.hint, self.i = leaf_paths(net), hint, 0

    def check(self, layer: Layer, out: Kernels) -> None:
        path = self.leaves[self.i][0] if self.i < len(self.leaves) else "?"
        self.i += 1
        bad = _bad_fields(out)
        if bad:
            raise NonFiniteKernelError(
                f"the kernel is not finite (Inf/NaN in {', '.join(sorted(set(bad)))}) after layer {path}, "
                f"{layer!r}: its output overflowed or left the range of its rule. {self.hint}"
            )


_DIAGNOSIS: contextvars.ContextVar[Optional[_Diagnosis]] = contextvars.ContextVar("ntkit_diagnosis", default=None)


def diagnose_non_finite(net: Layer, inputs: Kernel, x1: Tensor, x2: Optional[Tensor]) -> NonFiniteKernelError:
    """The error for a tile whose kernels came out non-finite: re-run it (``inputs``: its input record, not
    pair-only, no tape) checking every layer's output, and name the first layer whose output is not finite."""
    scale = max(float(x1.detach().abs().max()), 0.0 if x2 is None else float(x2.detach().abs().max()))
    hint = (
        f"Fix: scale the inputs down (standardize the features; here max |x| = {scale:.3g}), use smaller "
        f"W_std/b_std" + (", or compute in float64 (its range is 1.8e308)." if inputs.dtype != torch.float64 else ".")
    )
    bad = _bad_fields(inputs)
    if bad:
        return NonFiniteKernelError(
            f"the input covariances x1·x2ᵀ/C are not finite (Inf/NaN in {', '.join(bad)}): the inputs are too "
            f"large for {inputs.dtype}. {hint}"
        )
    diagnosis = _Diagnosis(net, hint)
    tape_token, diag_token = _TAPE.set(None), _DIAGNOSIS.set(diagnosis)
    try:
        out = net.kernel(inputs)
    except NonFiniteKernelError as e:
        return e
    finally:
        _TAPE.reset(tape_token)
        _DIAGNOSIS.reset(diag_token)
    return NonFiniteKernelError(
        f"the kernel is not finite (Inf/NaN in {', '.join(_bad_fields(out)) or 'a tile'}) but a re-run of the tile "
        f"layer by layer was finite (a non-deterministic rule?). {hint}"
    )


def _taped(fn: Callable[[], Kernel], tape: Tape) -> Kernel:
    token = _TAPE.set(tape)
    try:
        return fn()
    finally:
        _TAPE.reset(token)


Run = Callable[[Tensor, Optional[Tensor], bool], Kernel]


def run_tiled(run: Run, x1: Tensor, x2: Optional[Tensor], tile: int, names: Sequence[str], use_tape: bool) -> Kernel:
    """Run ``run(a, b, pair_only)`` on tiles of samples and assemble the kernels (upper tiles only when
    ``x2`` is None).

    With ``use_tape`` the self-covariances are propagated once per block: on the diagonal tiles (``x2`` is
    None) or on each block of ``x1`` and of ``x2`` against itself, recording their same-pixel variances
    (:class:`Tape`); every other tile is pair-only and replays them."""
    sym = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    plan = TilePlan(n1, n2, tile, symmetric=sym)
    rows_of: dict[tuple, Tensor] = {}
    tapes: dict[tuple[int, int], list] = {}
    first: list[Kernel] = []
    out = Assembler(plan, names, lambda t: swap_pair(t, first[0]), device=x1.device)

    def rows(key: tuple, n: int, a0: int, a1: int, t: Tensor) -> Tensor:
        """Copy ``t`` into rows ``a0:a1`` of the ``(n, ...)`` buffer ``key`` (allocated on first use) and
        return those rows. Self-covariances and tapes live in such buffers: thousands of small tensors kept
        alive between the tiles' large temporaries would fragment the heap (RSS grew with n)."""
        if key not in rows_of:
            rows_of[key] = t.new_empty((n,) + tuple(t.shape[1:]))
        return rows_of[key][a0:a1].copy_(t)

    def put(t: Tile, k: Kernel) -> None:
        if not first:
            first.append(k)
        out.put(t, {g: getattr(k, g) for g in names})

    def record(x: Tensor, side: int, i: int, a0: int, a1: int, n: int) -> Kernel:
        tape = Tape()
        k = _taped(lambda: run(x[a0:a1], None, False), tape)
        tapes[side, i] = [
            tuple(rows(("tape", side, s, b), n, a0, a1, t) for b, t in enumerate(step))
            for s, step in enumerate(tape.steps)
        ]
        assert k.cov1 is not None, "a block run against itself carries cov1"
        rows(("cov", side), n, a0, a1, k.cov1)
        return k

    if use_tape:
        for i, (a0, a1) in enumerate(plan.row_blocks()):
            k = record(x1, 1, i, a0, a1, n1)
            if sym:
                put(plan.tile(i, i), k)
        if x2 is not None:
            for j, (c0, c1) in enumerate(plan.col_blocks()):
                record(x2, 2, j, c0, c1, n2)
    for t in plan:
        i, j = t.bi, t.bj
        if use_tape and sym and t.diagonal:
            continue
        other = None if (sym and t.diagonal) else (x1 if x2 is None else x2)[t.c0 : t.c1]
        if use_tape:
            tape = Tape((tapes[1, i], tapes[1 if sym else 2, j]))
            k = _taped(functools.partial(run, x1[t.r0 : t.r1], other, True), tape)
        else:
            k = run(x1[t.r0 : t.r1], other, False)
            if j == (i if sym else 0):
                assert k.cov1 is not None, "a tile that is not pair-only carries cov1"
                rows(("cov", 1), n1, t.r0, t.r1, k.cov1)
            if not sym and i == 0:
                assert k.cov2 is not None, "a tile against x2 that is not pair-only carries cov2"
                rows(("cov", 2), n2, t.c0, t.c1, k.cov2)
        put(t, k)
    k0 = first[0]
    return k0.replace(
        nngp=out.outputs.get("nngp"),
        ntk=out.outputs.get("ntk"),
        cov1=rows_of["cov", 1],
        cov2=rows_of.get(("cov", 2)),
        shape1=(n1,) + tuple(k0.shape1[1:]),
        shape2=(n2,) + tuple(k0.shape2[1:]),
        x1_is_x2=sym,
        var1=None,
        var2=None,
        law=None,  # the first tile's residual-stream program, not the assembled kernel's
    )


def tape_bytes(net: Layer, pixels: int, x: Tensor, n: int) -> int:
    """Upper bound on the tapes of ``n`` samples: one same-pixel variance map per leaf layer (twice the
    input's pixels, for paddings that grow the image)."""

    def leaves(layer: Layer) -> int:
        return sum(leaves(s) for s in layer.sublayers()) if layer.is_combinator else 1

    return 2 * leaves(net) * pixels * x.element_size() * n


def tape_pays(n1: int, n2: Optional[int], tile: int) -> bool:
    """Whether recording the self-covariances once per block beats recomputing them in every tile, in units
    of one pair's covariance: a tile recomputes ``2·tile`` self-covariances; a block run against itself
    (needed anyway on the diagonal when ``x2`` is None) costs ``tile² + tile``."""
    if n2 is None:
        return n1 > tile
    return (n1 + n2) * (tile + 1) < 2 * n1 * n2 / tile
