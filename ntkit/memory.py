"""Memory planning: how much memory is free, and how large a tile of sample pairs may be.

Kernels are computed tile by tile (blocks of x1 × blocks of x2) so that no step allocates more than a budget,
whatever the number of samples. The budget defaults to a fraction of the memory available now
(``MemAvailable`` on Linux, ``torch.cuda.mem_get_info`` on CUDA devices).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import Optional

import torch

__all__ = ["available_bytes", "default_budget", "format_bytes", "plan_tile"]

#: fraction of currently available memory a kernel computation may use by default
BUDGET_FRACTION = 0.25
#: live full-size temporaries per kernel entry while a tile runs through the layers (nngp, ntk, the
#: variances and a rule's intermediates; measured on ReLU/Erf/conv stacks, rounded up)
WORK_FACTOR = 12
#: tiles of FC kernels are kept around this many entries so that a rule's passes stay in cache
CACHE_TILE_ENTRIES = 1 << 18


def available_bytes(device: torch.device) -> int:
    """Bytes that can be allocated now on ``device`` (best effort; falls back to 4 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_budget(device: torch.device) -> int:
    return int(BUDGET_FRACTION * available_bytes(device))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def plan_tile(n1: int, n2: int, entries_per_pair: int, element_size: int, budget: int,
              tile_size: Optional[int] = None) -> int:
    """Number of samples per tile side.

    The working set of a ``T × T`` tile is about ``T² · entries_per_pair · element_size · WORK_FACTOR``
    bytes; ``T`` is the largest size within ``budget``, capped for cache efficiency so that a tile holds
    about ``CACHE_TILE_ENTRIES`` kernel entries (at least one pair). Raises ``MemoryError`` when even one pair does not fit.
    """
    per_pair = entries_per_pair * element_size * WORK_FACTOR
    if per_pair > budget:
        raise MemoryError(
            f"one pair of inputs needs about {format_bytes(per_pair)} of working memory (a full pixel-by-pixel "
            f"covariance of {entries_per_pair} entries), more than the budget of {format_bytes(budget)}. "
            f"Raise memory_budget, use smaller images, or a net without pooling (diagonal covariances).")
    if tile_size is not None:
        if not (isinstance(tile_size, int) and tile_size > 0):
            raise ValueError(f"tile_size={tile_size!r} must be a positive int or None.")
        t = tile_size
    else:
        t = int(math.isqrt(budget // per_pair))
        # keep a tile's kernels near CACHE_TILE_ENTRIES entries so that a rule's passes run in cache:
        # measured 3x faster for Myrtle-5 on 8x8 images (tile 8 vs 50) and 2x for FC nets
        t = min(t, max(1, int(math.isqrt(CACHE_TILE_ENTRIES // entries_per_pair))))
    return max(1, min(t, max(n1, n2)))


# ---------------------------------------------------------------------------------------------------
# large output buffers
# ---------------------------------------------------------------------------------------------------
_HUGE = 1 << 21  # 2 MiB: the x86-64/arm64 transparent huge page
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=None)
def _libc():
    """The C library through ctypes on Linux (``None`` elsewhere or if it cannot be loaded)."""
    if os.name != "posix" or os.uname().sysname != "Linux":
        return None
    try:
        lib = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if hasattr(lib, "madvise"):
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


def _madvise_hugepage(ptr: int, nbytes: int) -> None:
    """Best effort ``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned interior of ``[ptr, ptr + nbytes)``."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None:
        return
    start = (ptr + _HUGE - 1) & ~(_HUGE - 1)
    end = (ptr + nbytes) & ~(_HUGE - 1)
    if end > start:
        madvise(start, end - start, _MADV_HUGEPAGE)  # failure only means small pages


def empty_output(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``like``'s dtype and device for a large result.

    On Linux CPUs, buffers of 8 MiB or more are marked for transparent huge pages before they are first
    touched: filling a fresh 32 MB kernel then takes 16 page faults instead of 8000 (measured 6x less time
    to allocate and fill; ``benchmarks/fc.py`` spends ~15% of its time there otherwise).
    """
    out = like.new_empty(shape)
    nbytes = out.numel() * out.element_size()
    if out.device.type == "cpu" and nbytes >= 4 * _HUGE:
        _madvise_hugepage(out.data_ptr(), nbytes)
    return out


# ---------------------------------------------------------------------------------------------------
# allocator tuning (glibc)
# ---------------------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: freed blocks below this size stay in the heap for reuse instead of being unmapped
MMAP_THRESHOLD = 32 << 20
#: the heap top is returned to the OS only beyond this much free memory
TRIM_THRESHOLD = 512 << 20
_TUNED: Optional[bool] = None  # decided on the first call


def tune_allocator() -> bool:
    """Keep tile-sized temporaries in glibc's heap between tiles (decided once per process; Linux/glibc).

    A kernel runs tile after tile through the same layers, so it allocates and frees the same few MB-sized
    temporaries thousands of times. With glibc's defaults, freed memory at the top of the heap is returned
    to the OS and the next tile page-faults it back in: measured 20% of ``benchmarks/fc.py``'s time.
    This sets ``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to 512 MiB (process-wide: up to that
    much freed memory is retained for reuse). Opt out with the environment variable ``NTKIT_MALLOC_TUNING=0``
    (before the first kernel call). Returns whether the tuning is in effect.
    """
    global _TUNED
    if _TUNED is None:
        mallopt = getattr(_libc(), "mallopt", None)
        _TUNED = (os.environ.get("NTKIT_MALLOC_TUNING", "1") != "0" and mallopt is not None
                  and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                  and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _TUNED
