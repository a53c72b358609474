"""The one memory budget and the one tile planner.

Kernels are computed tile by tile (blocks of x1 × blocks of x2) so that no step allocates more than a budget,
whatever the number of samples. Every part of ntkit that sizes work — a network's ``kernel_fn``,
:func:`ntkit.tiling.kernel_matrix`, the empirical NTK, Monte-Carlo kernels — takes its budget from
:func:`memory_budget` and its tile from :func:`plan_tile`, and checks that a result fits with
:func:`check_fits`:

* budget: an explicit ``memory_budget`` argument, else the environment variable ``NTKIT_MEMORY_BUDGET`` (bytes),
  else :data:`BUDGET_FRACTION` of the memory available now (``MemAvailable`` on Linux,
  ``torch.cuda.mem_get_info`` on CUDA devices);
* a result (an output kernel, a prediction table) must fit in :data:`OUTPUT_FRACTION` of the memory available.

Process-wide allocator tuning is never done implicitly: :func:`tune_allocator` is an explicit opt-in (public
as :func:`ntkit.memory.tune_allocator`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from collections.abc import Sequence
from typing import Optional, Union

import torch

__all__ = [
    "available_bytes",
    "memory_budget",
    "default_budget",
    "format_bytes",
    "bytes_of",
    "check_fits",
    "plan_tile",
    "empty_output",
    "tune_allocator",
    "BUDGET_FRACTION",
    "OUTPUT_FRACTION",
    "WORK_FACTOR",
    "CACHE_TILE_ENTRIES",
    "BUDGET_ENV",
]

#: fraction of currently available memory a kernel computation may use by default
BUDGET_FRACTION = 0.25
#: fraction of currently available memory a result may take
OUTPUT_FRACTION = 0.9
#: live full-size temporaries per kernel entry while a tile runs through the layers (nngp, ntk, the
#: variances and a rule's intermediates; measured on ReLU/Erf/conv stacks, rounded up)
WORK_FACTOR = 12
#: tiles of kernels are kept around this many entries so that a rule's passes stay in cache
CACHE_TILE_ENTRIES = 1 << 18
#: the environment variable that sets the default budget (bytes; e.g. ``NTKIT_MEMORY_BUDGET=2e9``)
BUDGET_ENV = "NTKIT_MEMORY_BUDGET"

Device = Union[str, torch.device]


def available_bytes(device: Device) -> int:
    """Bytes that can be allocated now on ``device`` (best effort; falls back to 4 GiB)."""
    device = torch.device(device)
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


def default_budget(device: Device) -> int:
    """:data:`BUDGET_FRACTION` of the memory available on ``device`` now."""
    return int(BUDGET_FRACTION * available_bytes(device))


def memory_budget(device: Device, budget: Optional[float] = None) -> int:
    """Bytes a computation may hold at once: ``budget`` if given, else ``$NTKIT_MEMORY_BUDGET``, else
    :func:`default_budget`. One error for a budget that is not a positive number."""
    if budget is None:
        env = os.environ.get(BUDGET_ENV)
        if not env:
            return default_budget(device)
        try:
            budget = float(env)
        except ValueError:
            raise ValueError(f"${BUDGET_ENV}={env!r} is not a number of bytes (e.g. 2e9).") from None
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"memory budget {budget!r} must be a positive number of bytes.")
    return int(budget)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def bytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes a tensor of this shape and dtype occupies."""
    return int(math.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def check_fits(nbytes: float, device: Device, what: str, fix: str) -> None:
    """Refuse, before allocating, a result of ``nbytes`` larger than :data:`OUTPUT_FRACTION` of the memory
    available on ``device``; the error names ``what`` needs it and ``fix``."""
    avail = available_bytes(device)
    if nbytes > OUTPUT_FRACTION * avail:
        raise MemoryError(
            f"{what} needs {format_bytes(nbytes)} but only {format_bytes(avail)} is available on "
            f"{torch.device(device)}; {fix}"
        )


def plan_tile(
    n1: int,
    n2: int,
    *,
    pair_bytes: float,
    budget: int,
    sample_bytes: float = 0.0,
    cap: Optional[int] = None,
    tile_size: Optional[int] = None,
    strict: bool = True,
    what: str = "one pair of inputs",
    fix: str = "raise memory_budget or use smaller inputs.",
) -> int:
    """Samples per tile side: the largest ``T`` with ``2·T·sample_bytes + T²·pair_bytes <= budget``.

    ``pair_bytes`` is the working memory of one ``(x1, x2)`` pair, ``sample_bytes`` that of one sample's own
    features (empirical kernels hold both sides'). ``T`` is at most ``cap`` (cache-sized tiles, or few
    chunk files for stores) and ``max(n1, n2)``, at least 1; an explicit ``tile_size`` is validated and used.
    With ``strict``, a budget that cannot hold even one pair raises ``MemoryError`` naming ``what`` and ``fix``.
    """
    if tile_size is not None:
        if isinstance(tile_size, bool) or not (isinstance(tile_size, int) and tile_size > 0):
            raise ValueError(f"tile_size={tile_size!r} must be a positive int or None.")
        return max(1, min(tile_size, max(n1, n2)))
    one = 2 * sample_bytes + pair_bytes
    if strict and one > budget:
        raise MemoryError(
            f"{what} needs about {format_bytes(one)} of working memory, more than the budget of "
            f"{format_bytes(budget)}; {fix}"
        )
    if pair_bytes > 0 and sample_bytes == 0:
        t = math.isqrt(int(budget // pair_bytes))
    elif pair_bytes > 0:
        f, q = sample_bytes, pair_bytes
        t = int((-f + math.sqrt(f * f + q * budget)) / q)
    else:
        t = int(budget / max(2 * sample_bytes, 1))
    if cap is not None:
        t = min(t, cap)
    return max(1, min(t, max(n1, n2)))


# ---------------------------------------------------------------------------------------------------
# large output buffers
# ---------------------------------------------------------------------------------------------------
_HUGE = 1 << 21  # 2 MiB: the x86-64/arm64 transparent huge page
_MADV_HUGEPAGE = 14
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: freed blocks below this size stay in the heap for reuse instead of being unmapped
MMAP_THRESHOLD = 32 << 20
#: the heap top is returned to the OS only beyond this much free memory
TRIM_THRESHOLD = 512 << 20


class _Tuning:
    """What :func:`tune_allocator` switched on (nothing until it is called)."""

    malloc = False
    huge_pages = False


@functools.cache
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

    After :func:`tune_allocator` (``huge_pages=True``), buffers of 8 MiB or more on Linux CPUs are marked for
    transparent huge pages before they are first touched: filling a fresh 32 MB kernel then takes 16 page
    faults instead of 8000.
    """
    out = like.new_empty(shape)
    nbytes = out.numel() * out.element_size()
    if _Tuning.huge_pages and out.device.type == "cpu" and nbytes >= 4 * _HUGE:
        _madvise_hugepage(out.data_ptr(), nbytes)
    return out


def tune_allocator(malloc: bool = True, huge_pages: bool = True) -> dict[str, bool]:
    """Opt in to process-wide memory tuning for long kernel jobs (Linux/glibc; a no-op elsewhere).

    ntkit never does this by itself: it changes the allocator of the whole process.

    * ``malloc``: glibc's ``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to 512 MiB, so the
      MB-sized temporaries of one tile are reused by the next instead of being returned to the OS and
      page-faulted back in (the process then keeps up to 512 MiB of freed memory for reuse);
    * ``huge_pages``: large output buffers (:func:`empty_output`) are marked for transparent huge pages.

    Measured effect (``benchmarks/fc.py``, BENCHMARKS.md): about 20 % of an FC kernel's time on this
    project's 2-core machine. Returns what is in effect, e.g. ``{"malloc": True, "huge_pages": True}``.
    """
    lib = _libc()
    if malloc and not _Tuning.malloc:
        mallopt = getattr(lib, "mallopt", None)
        _Tuning.malloc = bool(
            mallopt is not None
            and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        )
    if huge_pages:
        _Tuning.huge_pages = getattr(lib, "madvise", None) is not None
    return {"malloc": _Tuning.malloc, "huge_pages": _Tuning.huge_pages}
