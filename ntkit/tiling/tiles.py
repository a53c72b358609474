"""``kernel_matrix``: a kernel matrix of any size, tile by tile, in memory or into a resumable store.

Tiles have any size (the last row/column of tiles is ragged: no divisibility constraint between the batch
and ``n``), are sized to a memory budget, and for ``x2=None`` only the upper block triangle is computed.
Under ``torchrun`` the tiles are split across ranks: a static round-robin over the unfinished tiles, then
each rank that runs out steals unclaimed tiles from the tail of the others' lists. Independent processes
started on one store (by hand, by a scheduler) share it the same way: the first creates the store (atomically),
the others join it. Every tile is claimed in the store's ``claims/`` folder before it is computed
(:class:`~ntkit.tiling.store.Claims`), so no tile is computed twice while its claimant lives; a final pass
computes whatever is left, taking over the claims of processes that died. Every writer returns the complete
store.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from ntkit._inputs import as_batch, check_pair
from ntkit._tiles import Assembler, Tile, TilePlan
from ntkit._version import __version__
from ntkit.distributed import DistContext, all_reduce_, barrier, broadcast_object, context
from ntkit.kernel import normalize_get
from ntkit.tiling.plan import choose_tile_size, compute_tile, describe_kernel_fn, input_digest
from ntkit.tiling.store import FORMAT, Claims, CorruptStoreError, Heartbeat, KernelStore

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["kernel_matrix"]


def kernel_matrix(
    kernel_fn: Callable,
    x1: Any,
    x2: Any = None,
    get: Union[str, Sequence[str]] = "ntk",
    tile_size: Optional[int] = None,
    store: Union[str, os.PathLike, KernelStore, None] = None,
    memory_budget: Optional[int] = None,
    *,
    description: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: Optional[bool] = None,
    verify: bool = True,
    on_tile: Optional[Callable[[Tile], None]] = None,
    label: Optional[str] = None,
):
    """``K(x1, x2)`` of any ``kernel_fn(x1, x2, get)`` (an ntkit net's ``kernel_fn``, or an empirical one),
    computed in tiles.

    Args:
      kernel_fn: called as ``kernel_fn(a, b, get)`` on blocks of samples; ``b=None`` for diagonal blocks of a
        symmetric matrix. Returns a tensor (one name) or a record/mapping with the requested kernels.
      x1, x2: input batches ``(N, ...)``; ``x2=None`` for ``K(x1, x1)`` (upper triangle computed only).
      get: ``"nngp"``, ``"ntk"`` or a tuple of both.
      tile_size: samples per tile side (any positive int); default: the largest tile whose working set fits
        ``memory_budget`` (capped at 4096). When resuming a store, its tile size is used.
      store: ``None`` to return tensors; a directory path (or :class:`KernelStore`) to write a resumable
        on-disk store, returned when complete. Re-running the same call resumes it: finished tiles are never
        recomputed. A store made for other inputs or another kernel is refused. Several processes may fill
        one store at once (torchrun ranks or independent processes): they share the tiles.
      memory_budget: bytes a tile may use while computed (default: a quarter of free memory).
      description: a name for the kernel, recorded in the store. Not needed for ntkit nets, which are
        identified by the fingerprint of the whole resolved net (every layer, hyper-parameter and the code of
        user functions inside it), nor for functions whose code, closure and globals can be fingerprinted; when
        given for other callables it *is* their identity (with their code's digest), so it must name the
        kernel and its hyper-parameters. See :func:`ntkit.tiling.plan.describe_kernel_fn`.
      dtype: stored dtype (default: the kernel's, i.e. ``x1``'s). E.g. compute in float64, store float32.
      device: where tiles are computed (default: ``x1``'s device; under torchrun ``cuda:LOCAL_RANK`` if CUDA).
      progress: show a progress bar with tiles/s and ETA (default: when stderr is a terminal; rank 0 only).
      verify: on resume, re-check every finished tile's checksum and recompute damaged tiles.
      on_tile: called with each :class:`Tile` after it is durably finished (by this process).
      label: a note for people, recorded in the store's manifest (e.g. the command that made it); never part
        of its identity.

    Returns:
      without ``store``: a tensor for a single ``get``, else a dict ``{name: tensor}``, on ``x1``'s device;
      with ``store``: the complete :class:`KernelStore` (``.to_tensor()``, ``.matrix()`` for solvers).
    """
    names, single = normalize_get(get)
    x1 = as_batch(x1, "x1")
    if x2 is not None:
        x2 = as_batch(x2, "x2")
        check_pair(x1, x2)
    if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 1):
        raise ValueError(f"tile_size={tile_size!r} must be a positive int (any value: no divisibility needed).")
    ctx = context(device)
    if device is None and not ctx.active:
        ctx = DistContext(ctx.rank, ctx.world_size, x1.device)
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    show = progress if progress is not None else (ctx.is_main and _isatty())
    show = bool(show) and ctx.is_main

    if store is None:
        ts = tile_size or _auto_tile(kernel_fn, x1, n1, n2, len(names), memory_budget, ctx)
        plan = TilePlan(n1, n2, ts, symmetric=x2 is None)
        out = _in_memory(kernel_fn, x1, x2, names, plan, ctx, dtype, show, on_tile)
        return out[names[0]] if single else out

    path = Path(store.path if isinstance(store, KernelStore) else store)
    kdesc = describe_kernel_fn(kernel_fn, description)
    note = label if label is not None else description
    ks = _open_store(path, kernel_fn, kdesc, note, x1, x2, names, tile_size, memory_budget, dtype, verify, ctx)
    _fill_store(ks, kernel_fn, x1, x2, names, ctx, show, on_tile)
    return ks


# ---------------------------------------------------------------------------------------------------
def _isatty() -> bool:
    try:
        return os.isatty(2)
    except OSError:  # pragma: no cover
        return False


def _auto_tile(kernel_fn, x1, n1, n2, n_get, memory_budget, ctx) -> int:
    return choose_tile_size(kernel_fn, x1, n1, n2, n_get, memory_budget, ctx.device)


def _probe(kernel_fn, x1, x2, names, device) -> tuple[tuple[int, ...], torch.dtype]:
    """Trailing axes and dtype of the kernels (one pair of samples)."""
    t = Tile(0, 0 if x2 is None else 1, 0, 1, 0, 1)
    out = compute_tile(kernel_fn, x1[:1], None if x2 is None else x2[:1], t, names, device)
    v = out[names[0]]
    return tuple(v.shape[2:]), v.dtype


def _in_memory(kernel_fn, x1, x2, names, plan: TilePlan, ctx: DistContext, dtype, show, on_tile):
    trailing, kdtype = _probe(kernel_fn, x1, x2, names, ctx.device)
    out = Assembler(
        plan,
        names,
        lambda t: t.transpose(0, 1),
        device=x1.device,
        dtype=dtype or kdtype,
        zeros=ctx.active,
        what="the kernel matrix",
        fix="pass store='some/dir' to compute it out of core (solvers read it lazily), or use float32.",
    )
    out.allocate(dict.fromkeys(names, trailing), dtype or kdtype, x1.device)
    tiles = [t for i, t in enumerate(plan) if i % ctx.world_size == ctx.rank]
    with _Progress(show, len(plan), 0) as bar:
        for t in tiles:
            out.put(t, compute_tile(kernel_fn, x1, x2, t, names, ctx.device))
            if on_tile is not None:
                on_tile(t)
            bar.advance(ctx.world_size)
    for n in names:
        all_reduce_(out.outputs[n])  # every entry written by exactly one rank: the sum is exact
    return out.outputs


def _manifest(kdesc, label, x1, x2, names, tile_size, trailing, dtype) -> dict:
    return {
        "format": FORMAT,
        "kernel": kdesc,
        "label": label,
        "get": list(names),
        "dtype": str(dtype).replace("torch.", ""),
        "n1": x1.shape[0],
        "n2": (x1 if x2 is None else x2).shape[0],
        "symmetric": x2 is None,
        "tile_size": int(tile_size),
        "trailing": list(trailing),
        "x1": input_digest(x1),
        "x2": input_digest(x2),
        "ntkit_version": __version__,
        "torch_version": torch.__version__,
    }


def _recover_tile_size(path: Path) -> Optional[int]:
    """The tile size of a store whose manifest is damaged: from an array's zarr metadata, else a marker."""
    for meta in sorted(path.glob("*/zarr.json")):
        try:
            return int(json.loads(meta.read_text())["chunk_grid"]["configuration"]["chunk_shape"][0])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
    try:
        rows = json.loads((path / "tiles" / "0_0.json").read_text())["rows"]
        return int(rows[1]) - int(rows[0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _open_store(
    path, kernel_fn, kdesc, label, x1, x2, names, tile_size, memory_budget, dtype, verify, ctx: DistContext
) -> KernelStore:
    """Rank 0 makes, joins or checks the store (and repairs damage); every rank then opens it. An error on
    rank 0 is raised on every rank. Independent processes each run this (each is a rank 0): one creates the
    store, the others join it."""
    err = None
    if ctx.is_main:
        try:
            old = None
            if (path / "manifest.json").exists():
                try:
                    old = KernelStore(path)
                except CorruptStoreError:
                    old = None  # rebuilt from this job below, if its tiles agree
            if old is not None:  # resume: no probe, the store knows the kernel's trailing axes and dtype
                tile_size = tile_size or old.plan.tile_size
                trailing, kdtype = old.trailing, old.dtype
            else:
                trailing, kdtype = _probe(kernel_fn, x1, x2, names, ctx.device)
                if (path / "tiles").is_dir():
                    tile_size = tile_size or _recover_tile_size(path)
            n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
            ts = tile_size or _auto_tile(kernel_fn, x1, n1, n2, len(names), memory_budget, ctx)
            man = _manifest(kdesc, label, x1, x2, names, ts, trailing, dtype or kdtype)
            ks = KernelStore.open_or_create(path, man)
            ks.clean_partials()
            if verify:
                for t in ks.verify():
                    ks.invalidate(t)
        except Exception as e:
            err = e
    msg = broadcast_object(None if err is None else (type(err).__name__, str(err)))
    if err is not None:
        raise err
    if msg is not None:
        raise RuntimeError(f"rank 0 could not open the store: {msg[0]}: {msg[1]}")
    barrier()
    return KernelStore(path)


def _fill_store(ks: KernelStore, kernel_fn, x1, x2, names, ctx: DistContext, show, on_tile) -> None:
    """Compute the store's missing tiles, sharing them with every other process that fills it (claims), then
    wait for (or take over) the tiles others hold until the store is complete."""
    todo_keys = broadcast_object([t.key for t in ks.missing_tiles()] if ctx.is_main else None)
    run_id = broadcast_object(uuid.uuid4().hex if ctx.is_main else None)
    by_key = {t.key: t for t in ks.plan}
    todo = [by_key[k] for k in todo_keys]
    own = todo[ctx.rank :: ctx.world_size]
    steal: list[Tile] = []  # other ranks' tiles, from the tail of their lists
    for r in range(1, ctx.world_size):
        steal.extend(reversed(todo[(ctx.rank + r) % ctx.world_size :: ctx.world_size]))
    claims = Claims(ks.path / "claims", run=run_id)
    done0 = len(ks.plan) - len(todo)

    with _Progress(show, len(ks.plan), done0) as bar, Heartbeat(claims):

        def work(t: Tile) -> bool:
            """Compute tile ``t`` if it is unfinished and this process gets its claim."""
            if ks.is_finished(t) or not claims.take(t.key):
                return False
            try:
                if ks.is_finished(t):  # finished between the check and the claim
                    return False
                t0 = time.perf_counter()
                vals = compute_tile(kernel_fn, x1, x2, t, names, ctx.device)
                ks.write_tile(t, vals, rank=ctx.rank, seconds=round(time.perf_counter() - t0, 4), run=run_id)
            finally:
                claims.release(t.key)
            if on_tile is not None:
                on_tile(t)
            if show:
                bar.update(len(ks.finished()))
            return True

        for t in own + steal:
            work(t)
        # the final pass: tiles still missing are held by other live processes (wait for them) or by dead
        # ones (their claims go stale and are taken over here)
        pause = 0.02
        while True:
            missing = ks.missing_tiles()
            if not missing:
                break
            worked = [work(t) for t in missing]  # every one: a list, not a short-circuiting any()
            if any(worked):
                pause = 0.02
            else:
                time.sleep(pause)
                pause = min(2 * pause, 1.0)
            if show:
                bar.update(len(ks.finished()))
    barrier()
    if ctx.is_main:
        ks.finish()


class _Progress:
    """A rich progress bar (tiles done/total, tiles/s, ETA) or nothing."""

    def __init__(self, show: bool, total: int, done: int):
        self.show, self.total, self.done = show, total, done
        self.bar: Optional[Progress] = None

    def __enter__(self):
        if self.show:
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    ProgressColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
                from rich.text import Text

                class _Rate(ProgressColumn):
                    def render(self, task):
                        return Text(f"{task.speed:.2f} tiles/s" if task.speed else "-- tiles/s")

                self.bar = Progress(
                    TextColumn("kernel tiles"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    _Rate(),
                    TimeElapsedColumn(),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                )
                self.bar.start()
                self.task = self.bar.add_task("tiles", total=self.total, completed=self.done)
            except ImportError:  # rich is optional
                self.bar = None
        return self

    def advance(self, k: int = 1):
        if self.bar is not None:
            self.bar.advance(self.task, k)

    def update(self, completed: Optional[int] = None):
        if self.bar is None:
            return
        if completed is None:
            self.bar.advance(self.task, 1)
        else:
            self.bar.update(self.task, completed=completed)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
