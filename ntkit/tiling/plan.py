"""Tile plans, memory budgets and the identity of a kernel job.

A kernel matrix ``K(X1, X2)`` of ``n1 x n2`` entries is cut into tiles of ``tile_size x tile_size`` samples
(:class:`~ntkit._tiles.TilePlan`, re-exported here); with ``x2=None`` only tiles on or above the block diagonal
are computed. Tile sizes come from the one planner, :func:`ntkit._memory.plan_tile`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ntkit._memory import WORK_FACTOR, memory_budget, plan_tile
from ntkit._tiles import Tile, TilePlan
from ntkit.layers.base import Layer
from ntkit.tiling.fingerprint import describe_callable_code, fingerprint

__all__ = [
    "Tile",
    "TilePlan",
    "choose_tile_size",
    "entries_per_pair",
    "describe_kernel_fn",
    "input_digest",
    "compute_tile",
    "extract_kernels",
]


# ---------------------------------------------------------------------------------------------------
# memory (the estimates of ntkit._memory, shared with Net.kernel_fn's own tiling)
# ---------------------------------------------------------------------------------------------------
def entries_per_pair(kernel_fn: Callable, x: Tensor) -> int:
    """Covariance entries one (x1, x2) pair carries inside the kernel: 1 for FC inputs, one per pixel
    (diagonal spatial covariance) or one per pixel pair (full covariance, when an ntkit net pools)."""
    if x.dim() <= 2:
        return 1
    pixels = int(math.prod(x.shape[2:]))
    net = getattr(kernel_fn, "__self__", kernel_fn)
    full = bool(getattr(net, "requires_full_spatial", lambda: False)())
    return pixels * pixels if full else pixels


def choose_tile_size(
    kernel_fn: Callable,
    x: Tensor,
    n1: int,
    n2: int,
    n_get: int,
    budget: Optional[int] = None,
    device: Optional[torch.device] = None,
    cap: int = 4096,
) -> int:
    """Largest square tile whose working set ``t² · entries · itemsize · WORK_FACTOR · n_get`` fits the
    budget (default: :func:`ntkit._memory.memory_budget`), at most ``cap`` and ``max(n1, n2)``. Large tiles
    suit stores (fewer chunk files); an ntkit net still runs each tile in cache-sized pieces itself."""
    budget = memory_budget(device or x.device, budget)
    item = max(torch.empty((), dtype=x.dtype).element_size(), 4)
    per_pair = entries_per_pair(kernel_fn, x) * item * WORK_FACTOR * max(1, n_get)
    return plan_tile(n1, n2, pair_bytes=per_pair, budget=budget, cap=cap)


# ---------------------------------------------------------------------------------------------------
# identity of a job: what the kernel is and what it was computed on
# ---------------------------------------------------------------------------------------------------
def describe_kernel_fn(kernel_fn: Callable, description: Optional[str] = None) -> str:
    """The identity of a kernel, recorded in a store and compared on resume (see :mod:`ntkit.tiling.fingerprint`).

    * an ntkit net (or its bound ``kernel_fn``): ``"ntkit:"`` and the fingerprint of the resolved net — every
      layer, every hyper-parameter, and for user functions inside layers (``Elementwise(lambda ...)``) the
      SHA-256 of their code with their closure values, defaults and the globals they read. ``description``
      only stands for parts that cannot be fingerprinted (then it is part of the identity); otherwise it is
      not needed and not part of it.
    * any other callable without ``description``: its fingerprint (library functions by name, user functions
      by code, closure cells and globals; callable objects by their attributes).
    * any other callable with ``description``: the description (which must name the kernel and its
      hyper-parameters) and the digest of the function's own code, so an edited function is not resumed.

    Raises :class:`~ntkit.tiling.fingerprint.FingerprintError` (a ``ValueError``) naming the part that cannot be
    fingerprinted, when no ``description`` is given.
    """
    owner = getattr(kernel_fn, "__self__", None)
    net = kernel_fn if isinstance(kernel_fn, Layer) else owner if isinstance(owner, Layer) else None
    if net is not None:
        text, unnamed = fingerprint(net, lenient=description is not None)
        method = getattr(kernel_fn, "__name__", "kernel_fn") if net is not kernel_fn else "kernel_fn"
        text = f"ntkit:{text}" + ("" if method == "kernel_fn" else f".{method}")
        return f"{description} | {text}" if unnamed else text
    if description is not None:
        code = describe_callable_code(kernel_fn)
        return str(description) + ("" if code is None else f" | code sha256:{code}")
    text, _ = fingerprint(kernel_fn)
    return text


def input_digest(x: Optional[Tensor]) -> Optional[dict[str, Any]]:
    """Shape, dtype and SHA-256 of the input's bytes (C order, on the CPU)."""
    if x is None:
        return None
    arr = x.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    flat = arr.reshape(-1).view(torch.uint8) if arr.numel() else arr.reshape(-1)
    step = 1 << 26
    for i in range(0, flat.numel(), step):
        h.update(flat[i : i + step].numpy().tobytes())
    return {"shape": list(arr.shape), "dtype": str(arr.dtype).replace("torch.", ""), "sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------------------
# one tile
# ---------------------------------------------------------------------------------------------------
def compute_tile(
    kernel_fn: Callable,
    x1: Tensor,
    x2: Optional[Tensor],
    tile: Tile,
    names: Sequence[str],
    device: Optional[torch.device] = None,
) -> dict[str, Tensor]:
    """``K(x1[r0:r1], x2[c0:c1])`` for each name in ``names``.

    ``x2=None`` means the symmetric matrix ``K(x1, x1)``: a diagonal tile is computed as ``kernel_fn(block,
    None)`` (exactly symmetric, exact diagonal), the others as ``kernel_fn(rows, cols)``.
    """
    a = x1[tile.r0 : tile.r1]
    if x2 is None and tile.diagonal:
        b = None
    else:
        b = (x1 if x2 is None else x2)[tile.c0 : tile.c1]
    if device is not None:
        a = a.to(device)
        b = None if b is None else b.to(device)
    out = kernel_fn(a, b, names[0] if len(names) == 1 else tuple(names))
    return extract_kernels(out, names)


def extract_kernels(out: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """The requested kernels from what a ``kernel_fn`` returned: a tensor (one name), a mapping, or a record
    with attributes (``ntkit.Kernel``)."""
    if isinstance(out, Tensor):
        if len(names) != 1:
            raise TypeError(f"kernel_fn returned a single tensor but {tuple(names)} were requested.")
        return {names[0]: out}
    res = {}
    for n in names:
        v = out[n] if isinstance(out, Mapping) else getattr(out, n, None)
        if not isinstance(v, Tensor):
            raise TypeError(f"kernel_fn's result has no tensor {n!r} (got {type(out).__name__}).")
        res[n] = v
    return res
