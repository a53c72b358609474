"""Combinators ``serial`` and ``parallel``, and :class:`Net`: one description, two objects.

``net.kernel_fn(x1, x2=None, get=("nngp", "ntk"))`` gives the exact infinite-width kernels;
``net.module(in_features, width=None, seed=None)`` gives the finite ``torch.nn.Module`` whose limit they are.
"""
from __future__ import annotations

import contextvars
import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel, check_get, kernel_from_inputs, validate_inputs
from ntkit.memory import available_bytes, default_budget, empty_output, format_bytes, plan_tile, tune_allocator
from ntkit.layers.base import Layer, LayerError

__all__ = ["Net", "serial", "parallel"]


class _ParallelModule(nn.Module):
    def __init__(self, branches: Sequence[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, xs):
        if not isinstance(xs, (tuple, list)) or len(xs) != len(self.branches):
            raise ValueError(f"parallel of {len(self.branches)} branches needs as many inputs (use FanOut).")
        return tuple(m(x) for m, x in zip(self.branches, xs))


class Net(Layer):
    """A network: a layer that can also compute kernels from inputs and build its finite twin."""

    def kernel_fn(self, x1: Any, x2: Any = None,
                  get: Union[str, Sequence[str], None] = ("nngp", "ntk"), *,
                  tile_size: Optional[int] = None, memory_budget: Optional[int] = None) -> Union[Kernel, Tensor]:
        """Infinite-width kernels of this network between ``x1`` and ``x2``.

        Args:
          x1: ``(N1, features)`` or ``(N1, C, *spatial)`` float tensor (numpy accepted).
          x2: same per-sample shape, or ``None`` for ``x1`` against itself: then only the upper tiles are
            computed, ``cov2`` is ``None`` and the kernels are exactly symmetric.
          get: ``"nngp"``, ``"ntk"`` or a tuple of them. A single name returns a tensor, a tuple a
            :class:`Kernel` whose unrequested fields are ``None``.
          tile_size: samples per tile side (default: planned from ``memory_budget`` and cache size).
          memory_budget: bytes the working set of one tile may take (default: a quarter of the memory
            available now, see :mod:`ntkit.memory`).

        The layers run tile by tile over blocks of samples, so the working memory is bounded by the budget
        whatever ``N1, N2``; only the output itself is ``N1 x N2`` (checked against free memory first).
        Returns kernels of shape ``(N1, N2)`` (traced over output channels, as NT) in ``x1``'s dtype, on its
        device.
        """
        names, single_out = check_get(get)
        x1, x2, out_dtype = validate_inputs(x1, x2)
        if x1.device.type == "cpu":
            tune_allocator()
        expected = self.input_rank()
        if expected is not None and x1.dim() != expected:
            raise LayerError(
                f"this network expects {expected}-D inputs (batch, channels{', spatial' * (expected - 2)}) "
                f"but x1 has shape {tuple(x1.shape)}.")
        diagonal = not self.requires_full_spatial()
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        pixels = math.prod(x1.shape[2:])
        entries = pixels if diagonal else pixels * pixels
        budget = default_budget(x1.device) if memory_budget is None else int(memory_budget)
        tile = plan_tile(n1, n2, entries, x1.element_size(), budget, tile_size)

        def run(a: Tensor, b: Optional[Tensor], pair_only: bool = False) -> Kernel:
            k = kernel_from_inputs(a, b, diagonal_spatial=diagonal, compute_ntk="ntk" in names,
                                   pair_only=pair_only)
            out = self.kernel(k)
            if isinstance(out, list):
                raise LayerError(f"the network ends with {len(out)} branches; merge them with a FanIn layer.")
            return _finish(out)

        if tile >= n1 and tile >= n2:
            out = run(x1, x2)
        else:
            # full pixel covariances: propagate each sample's self-covariance once, not once per tile
            use_tape = (not diagonal and pixels > 1 and _tape_pays(n1, None if x2 is None else n2, tile)
                        and _tape_bytes(self, pixels, x1, n1 + (0 if x2 is None else n2)) <= budget)
            out = _run_tiled(run, x1, x2, tile, names, use_tape)
        res = out.replace(nngp=_cast(out.nngp, out_dtype) if "nngp" in names else None,
                          ntk=_cast(out.ntk, out_dtype) if "ntk" in names else None,
                          cov1=_cast(out.cov1, out_dtype), cov2=_cast(out.cov2, out_dtype))
        return getattr(res, names[0]) if single_out else res

    def __call__(self, x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = ("nngp", "ntk")):
        return self.kernel_fn(x1, x2, get)

    def input_rank(self) -> Optional[int]:
        """Rank the inputs must have, if a layer fixes it (None: any)."""
        for layer in self.sublayers():
            r = getattr(layer, "input_rank", None)
            r = r() if callable(r) else r
            if r is not None:
                return r
        return None

    def module(self, in_features: Union[int, Sequence[int]], width: Optional[int] = None,
               seed: Optional[int] = None, dtype: Optional[torch.dtype] = None,
               device: Union[str, torch.device, None] = None) -> nn.Module:
        """The finite network this kernel describes (same parameterisation, W_std/b_std; N(0,1) parameters
        under the NTK parameterisation).

        Args:
          in_features: input features, or the per-sample input shape ``(C, *spatial)``.
          width: if given, overrides every hidden width (the readout keeps its size).
          seed: seeds the parameters' initialisation (``None``: torch's global generator state).
          dtype, device: of the parameters (default: torch's default dtype, CPU). Parameters are drawn on the
            CPU in float64 and then cast, so a seed gives the same network on every device and dtype.
        """
        in_shape = (in_features,) if isinstance(in_features, int) else tuple(int(s) for s in in_features)
        if width is not None and not (isinstance(width, int) and width > 0):
            raise ValueError(f"width={width!r} must be a positive int or None.")
        gen = torch.Generator()
        if seed is None:
            gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
        else:
            gen.manual_seed(int(seed))
        with _default_dtype(torch.float64):
            mod, _ = self.build(in_shape, width, gen, readout=True)
        return mod.to(dtype=dtype or torch.get_default_dtype(), device=device)


class _default_dtype:
    """Context manager setting torch's default dtype (parameters are drawn in float64, then cast)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _swap_pair(t: Tensor, k: Kernel) -> Tensor:
    """The kernel block of (x2, x1) from that of (x1, x2): swap the batch axes, and each (s, s') pair of a
    full spatial layout."""
    perm = [1, 0]
    if not k.diagonal_spatial and k.spatial_ndim:
        for a in range(k.spatial_ndim):
            perm += [3 + 2 * a, 2 + 2 * a]
    else:
        perm += list(range(2, t.dim()))
    return t.permute(perm)


class _Tape:
    """Same-pixel variances after every leaf layer: recorded while a block of samples runs against itself
    (a diagonal tile), replayed into the pair-only records of the off-diagonal tiles (see
    :mod:`ntkit.kernel`). A nonlinearity needs from the self-covariances only these variances, so with a tape
    an off-diagonal tile propagates its cross-covariances alone — at 32×32 images, where a tile is one pair
    of images, that is a third of the work of propagating both images' full self-covariances as well."""

    def __init__(self, replay: Optional[tuple[list, list]] = None):
        self.steps: list = []
        self.replay = replay
        self.i = 0

    def step(self, out):
        outs = out if isinstance(out, list) else [out]
        if self.replay is None:
            self.steps.append(tuple(x.same_pixel_variances()[0].clone() for x in outs))
            return out
        a, b = self.replay[0][self.i], self.replay[1][self.i]
        self.i += 1
        new = [x.replace(var1=va, var2=vb) for x, va, vb in zip(outs, a, b)]
        return new if isinstance(out, list) else new[0]


_TAPE: contextvars.ContextVar[Optional[_Tape]] = contextvars.ContextVar("ntkit_tape", default=None)


def _apply(layer: Layer, k):
    """``layer.kernel(k)``, recorded on / replayed from the active tape for leaf layers."""
    out = layer.kernel(k)
    tape = _TAPE.get()
    return tape.step(out) if tape is not None and not isinstance(layer, Net) else out


def _taped(fn, tape: _Tape):
    token = _TAPE.set(tape)
    try:
        return fn()
    finally:
        _TAPE.reset(token)


def _run_tiled(run, x1: Tensor, x2: Optional[Tensor], tile: int, names: Sequence[str],
               use_tape: bool) -> Kernel:
    """Run ``run(a, b, pair_only)`` on tiles of samples and assemble the kernels (upper tiles only when
    ``x2`` is None).

    With ``use_tape`` the self-covariances are propagated once per block: on the diagonal tiles (``x2`` is
    None) or on each block of ``x1`` and of ``x2`` against itself, recording their same-pixel variances
    (:class:`_Tape`); every other tile is pair-only and replays them."""
    sym = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if sym else x2.shape[0]
    b1 = [(s, min(s + tile, n1)) for s in range(0, n1, tile)]
    b2 = b1 if sym else [(s, min(s + tile, n2)) for s in range(0, n2, tile)]
    outs: dict[str, Tensor] = {}
    rows_of: dict[tuple, Tensor] = {}
    tapes: dict[tuple[int, int], list] = {}
    first: Optional[Kernel] = None

    def rows(key: tuple, n: int, a0: int, a1: int, t: Tensor) -> Tensor:
        """Copy ``t`` into rows ``a0:a1`` of the ``(n, ...)`` buffer ``key`` (allocated on first use) and
        return those rows. Self-covariances and tapes live in such buffers: thousands of small tensors kept
        alive between the tiles' large temporaries would fragment the heap (RSS grew with n)."""
        if key not in rows_of:
            rows_of[key] = t.new_empty((n,) + tuple(t.shape[1:]))
        return rows_of[key][a0:a1].copy_(t)

    def put(k: Kernel, a0, a1, c0, c1, mirror: bool) -> None:
        nonlocal first
        if first is None:
            first = k
            per = [getattr(k, g)[0, 0].numel() for g in names]
            need = sum(n1 * n2 * p for p in per) * k.nngp.element_size()
            avail = available_bytes(x1.device)
            if need > 0.9 * avail:
                raise MemoryError(
                    f"the output kernels need {format_bytes(need)} but only {format_bytes(avail)} is "
                    f"available; compute them to disk with ntkit.tiling.kernel_matrix(..., store=path).")
            for g in names:
                t = getattr(k, g)
                outs[g] = empty_output((n1, n2) + tuple(t.shape[2:]), t)
        for g in names:
            t = getattr(k, g)
            outs[g][a0:a1, c0:c1] = t
            if mirror:
                # a contiguous transposed copy first: writing a transposed view into a strided block
                # directly is ~4x slower
                outs[g][c0:c1, a0:a1] = _swap_pair(t, k).contiguous()

    def record(x: Tensor, side: int, i: int, a0: int, a1: int, n: int) -> Kernel:
        tape = _Tape()
        k = _taped(lambda: run(x[a0:a1], None, False), tape)
        tapes[side, i] = [tuple(rows(("tape", side, s, b), n, a0, a1, t) for b, t in enumerate(step))
                          for s, step in enumerate(tape.steps)]
        rows(("cov", side), n, a0, a1, k.cov1)
        return k

    if use_tape:
        for i, (a0, a1) in enumerate(b1):
            k = record(x1, 1, i, a0, a1, n1)
            if sym:
                put(k, a0, a1, a0, a1, False)
        if not sym:
            for j, (c0, c1) in enumerate(b2):
                record(x2, 2, j, c0, c1, n2)
    for i, (a0, a1) in enumerate(b1):
        for j, (c0, c1) in enumerate(b2):
            if sym and j < i or (use_tape and sym and i == j):
                continue
            other = None if (sym and i == j) else (x1 if sym else x2)[c0:c1]
            if use_tape:
                tape = _Tape((tapes[1, i], tapes[1 if sym else 2, j]))
                k = _taped(lambda: run(x1[a0:a1], other, True), tape)
            else:
                k = run(x1[a0:a1], other, False)
                if j == (i if sym else 0):
                    rows(("cov", 1), n1, a0, a1, k.cov1)
                if not sym and i == 0:
                    rows(("cov", 2), n2, c0, c1, k.cov2)
            put(k, a0, a1, c0, c1, sym and i != j)
    assert first is not None
    return first.replace(nngp=outs.get("nngp"), ntk=outs.get("ntk"), cov1=rows_of["cov", 1], cov2=rows_of.get(("cov", 2)),
                         shape1=(n1,) + tuple(first.shape1[1:]), shape2=(n2,) + tuple(first.shape2[1:]),
                         x1_is_x2=sym, var1=None, var2=None)


def _tape_bytes(net: "Net", pixels: int, x: Tensor, n: int) -> int:
    """Upper bound on the tapes of ``n`` samples: one same-pixel variance map per leaf layer (twice the
    input's pixels, for paddings that grow the image)."""
    def leaves(layer: Layer) -> int:
        return sum(leaves(s) for s in layer.sublayers()) if isinstance(layer, Net) else 1
    return 2 * leaves(net) * pixels * x.element_size() * n


def _tape_pays(n1: int, n2: Optional[int], tile: int) -> bool:
    """Whether recording the self-covariances once per block beats recomputing them in every tile, in units
    of one pair's covariance: a tile recomputes ``2·tile`` self-covariances; a block run against itself
    (needed anyway on the diagonal when ``x2`` is None) costs ``tile² + tile``."""
    if n2 is None:
        return n1 > tile
    return (n1 + n2) * (tile + 1) < 2 * n1 * n2 / tile


def _finish(k: Kernel) -> Kernel:
    """Reduce remaining spatial axes for the output: NT's convention is that a kernel with spatial axes left
    is returned as is (e.g. a conv net without a readout), so nothing is done for FC nets."""
    return k


class Serial(Net):
    """Layers applied one after another."""

    def __init__(self, layers: Sequence[Layer]):
        for i, l in enumerate(layers):
            if not isinstance(l, Layer):
                raise TypeError(f"serial(...) argument {i} is {type(l).__name__}, not an ntkit layer.")
        self.layers = tuple(layers)

    def sublayers(self):
        return self.layers

    def kernel(self, k):
        for layer in self.layers:
            k = _apply(layer, k)
        return k

    def build(self, in_shape, width, generator, readout):
        last = max((i for i, l in enumerate(self.layers) if l.contains_params()), default=-1)
        mods, shape = [], in_shape
        for i, layer in enumerate(self.layers):
            m, shape = layer.build(shape, width, generator, readout and i == last)
            mods.append(m)
        return nn.Sequential(*mods), shape

    def __repr__(self):
        return "serial(" + ", ".join(map(repr, self.layers)) + ")"


class Parallel(Net):
    """Branch ``i`` applied to the ``i``-th input branch (after ``FanOut``)."""

    def __init__(self, layers: Sequence[Layer]):
        for i, l in enumerate(layers):
            if not isinstance(l, Layer):
                raise TypeError(f"parallel(...) argument {i} is {type(l).__name__}, not an ntkit layer.")
        self.layers = tuple(layers)

    def sublayers(self):
        return self.layers

    def kernel(self, k):
        if not isinstance(k, list) or len(k) != len(self.layers):
            got = len(k) if isinstance(k, list) else 1
            raise LayerError(f"parallel of {len(self.layers)} layers got {got} branch(es); "
                             f"put FanOut({len(self.layers)}) before it.")
        return [_apply(layer, x) for layer, x in zip(self.layers, k)]

    def build(self, in_shape, width, generator, readout):
        if not isinstance(in_shape, list) or len(in_shape) != len(self.layers):
            raise LayerError(f"parallel of {len(self.layers)} layers needs FanOut({len(self.layers)}) before it.")
        built = [layer.build(s, width, generator, readout) for layer, s in zip(self.layers, in_shape)]
        return _ParallelModule([m for m, _ in built]), [s for _, s in built]

    def __repr__(self):
        return "parallel(" + ", ".join(map(repr, self.layers)) + ")"


def serial(*layers: Layer) -> Net:
    """Compose layers in sequence; the result is itself a layer and a :class:`Net`."""
    return Serial(layers)


def parallel(*layers: Layer) -> Net:
    """Apply ``layers[i]`` to branch ``i`` (use after ``FanOut(len(layers))``)."""
    return Parallel(layers)


def __getattr__(name: str):
    """Ready-made architectures (Myrtle, CNTK, WRN) live in ntkit/architectures.py and are re-exported here
    lazily (that module builds on serial/parallel, so it cannot be imported at the top of this one)."""
    from ntkit import architectures

    if name in architectures.__all__:
        return getattr(architectures, name)
    raise AttributeError(f"module 'ntkit.nets' has no attribute {name!r}")
