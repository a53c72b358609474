"""The one memory budget and the one tile planner.

Kernels are computed tile by tile (blocks of x1 × blocks of x2) so that no step allocates more than a budget,
whatever the number of samples. Every part of ntkit that sizes work — a network's ``kernel_fn``,
:func:`ntkit.tiling.kernel_matrix`, the empirical NTK, Monte-Carlo kernels — takes its budget from
:func:`memory_budget` and its tile from :func:`plan_tile`, and checks that a result fits with
:func:`check_fits`:

* budget: an explicit ``memory_budget`` argument, else the environment variable ``NTKIT_MEMORY_BUDGET`` (bytes),
  else :data:`BUDGET_FRACTION` of the memory available now;
* a result (an output kernel, a prediction table) must fit in :data:`OUTPUT_FRACTION` of the memory available.

"Available" (:func:`available_bytes`) is the tightest of every limit the process runs under
(:func:`memory_limits`): on CUDA devices ``torch.cuda.mem_get_info``; on the CPU ``MemAvailable`` of
``/proc/meminfo``, the memory cgroup (v2 ``memory.max`` − ``memory.current``, v1 ``memory.limit_in_bytes`` −
``memory.usage_in_bytes``, at every level up the hierarchy, reclaimable page cache counted as free), and the
resource limits ``RLIMIT_AS`` (``ulimit -v``) − ``VmSize`` and ``RLIMIT_DATA`` (``ulimit -d``) − ``VmData``.
A result that does not fit is refused before anything is allocated, naming the binding limit and its fix.

Process-wide allocator tuning is never done implicitly: :func:`tune_allocator` is an explicit opt-in (public
as :func:`ntkit.memory.tune_allocator`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = [
    "available_bytes",
    "memory_limits",
    "binding_limit",
    "cgroup_limits",
    "rlimit_limits",
    "MemoryLimit",
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
    "FUSED_TILE_ENTRIES",
    "BUDGET_ENV",
    "SMALL_REQUEST",
    "SMALL_WORKING_SET",
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
#: the same for the fused Conv → ReLU passes of ``ntkit.compiled()`` (one read of the tile per layer): Myrtle-5
#: NTK, 50 images 8×8, float64, 2 threads, tiles of 8 / 13 / 17 / 25 samples: 0.117 / 0.082 / 0.076 / 0.080 s
#: (fastest of 7 calls; a script outside the repository), so about 17² pairs of 4096 pixel pairs
FUSED_TILE_ENTRIES = 1 << 21
#: the environment variable that sets the default budget (bytes; e.g. ``NTKIT_MEMORY_BUDGET=2e9``)
BUDGET_ENV = "NTKIT_MEMORY_BUDGET"
#: a result of at most this many bytes is not checked against the memory limits (:func:`check_fits`), and a
#: working set of at most :data:`SMALL_WORKING_SET` is planned without reading them (:func:`memory_budget`):
#: a reading takes 0.1-0.2 ms (procfs and cgroup files), several times per kernel or prediction call, and where
#: less than this is free the interpreter itself cannot run
SMALL_REQUEST = 8 << 20
#: a kernel whose largest tile's working set is at most this many bytes is planned without reading the limits
SMALL_WORKING_SET = 32 << 20

Device = Union[str, torch.device]


#: cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything above this is unlimited
_UNLIMITED = 1 << 60
_FALLBACK = 4 << 30


@dataclasses.dataclass(frozen=True)
class MemoryLimit:
    """One limit on the memory this process can still allocate.

    ``name`` names it (``"MemAvailable"``, ``"cgroup v2 memory.max"``, ``"RLIMIT_AS"``, ...), ``available`` is
    the bytes it still allows, ``limit``/``used`` its size and current use when it has them, ``where`` the file
    or call it was read from, and ``fix`` how to raise it.
    """

    name: str
    available: int
    limit: Optional[int] = None
    used: Optional[int] = None
    where: str = ""
    fix: str = ""

    def describe(self) -> str:
        """E.g. ``"RLIMIT_AS (ulimit -v, address space) of 2.0 GiB with 1.1 GiB in use (VmSize)"``."""
        if self.limit is None:
            return f"{self.name}: {format_bytes(self.available)}"
        used = "" if self.used is None else f" with {format_bytes(self.used)} in use"
        at = f" ({self.where})" if self.where else ""
        return f"{self.name} of {format_bytes(self.limit)}{used}{at}"


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_stat(path: Path, *keys: str) -> Optional[int]:
    """The first of ``keys`` found in a ``key value`` file (``memory.stat``)."""
    found = _read_stats(path, keys)
    for k in keys:
        if k in found:
            return found[k]
    return None


def _read_stats(path: Path, keys: Sequence[str]) -> dict[str, int]:
    """Those of ``keys`` found in a ``key value`` file (``memory.stat``), read once; unparsable values are left
    out."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in keys:
            try:
                out[key] = int(value.strip())
            except ValueError:
                pass
    return out


def _ancestors(start: Path, root: Path) -> list[Path]:
    """``start`` and its parents up to and including ``root``."""
    out = [start]
    while start != root and root in start.parents:
        start = start.parent
        out.append(start)
    return out


def _cgroup_dirs(proc_cgroup: Path, root: Path) -> tuple[Optional[Path], Optional[Path]]:
    """The process's cgroup v2 directory and v1 memory-controller directory (``None`` where absent)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    v2: Optional[Path] = None
    v1: Optional[Path] = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if controllers == "":
            base = root
            d = base / rel
            v2 = d if d.is_dir() else base  # in a cgroup namespace the own cgroup is mounted as the root
        elif "memory" in controllers.split(","):
            base = root / "memory"
            if not base.is_dir():
                base = root / controllers
            d = base / rel
            v1 = d if d.is_dir() else base
    return v2, v1


def cgroup_limits(proc_cgroup: Union[str, Path] = "/proc/self/cgroup", root: Union[str, Path] = "/sys/fs/cgroup"):
    """The memory limits of the cgroups this process is in, v2 and v1, at every level of the hierarchy (a
    parent's limit binds its children). Page cache the kernel can reclaim (``inactive_file``) counts as free.
    ``proc_cgroup``/``root`` exist for tests (fake trees)."""
    proc_cgroup, root = Path(proc_cgroup), Path(root)
    v2, v1 = _cgroup_dirs(proc_cgroup, root)
    out: list[MemoryLimit] = []
    fix = "raise the container's or cgroup's memory limit (e.g. docker --memory, systemd MemoryMax=)"
    if v2 is not None:
        for d in _ancestors(v2, root):
            limit = _read_int(d / "memory.max")
            if limit is None or limit >= _UNLIMITED:  # "max": nothing more to read at this level
                continue
            current = _read_int(d / "memory.current")
            if current is None:
                continue
            free_cache = _read_stat(d / "memory.stat", "inactive_file") or 0
            used = max(0, current - free_cache)
            out.append(MemoryLimit("cgroup v2 memory.max", max(0, limit - used), limit, used, str(d), fix))
    if v1 is not None:
        base = v1
        while base.parent != base and (base.parent / "memory.limit_in_bytes").exists():
            base = base.parent
        for d in _ancestors(v1, base):
            limit = _read_int(d / "memory.limit_in_bytes")
            if limit is None:
                continue
            stats = _read_stats(
                d / "memory.stat", ("hierarchical_memory_limit", "total_inactive_file", "inactive_file")
            )
            hier = stats.get("hierarchical_memory_limit")
            if hier is not None and hier < limit:
                limit = hier
            if limit >= _UNLIMITED:
                if hier is not None and d == v1:
                    break  # the leaf's hierarchical limit is the least of its ancestors': none binds
                continue
            usage = _read_int(d / "memory.usage_in_bytes")
            if usage is None:
                continue
            free_cache = stats.get("total_inactive_file", stats.get("inactive_file", 0))
            used = max(0, usage - free_cache)
            out.append(MemoryLimit("cgroup v1 memory.limit_in_bytes", max(0, limit - used), limit, used, str(d), fix))
    return out


def _proc_status(path: Union[str, Path] = "/proc/self/status") -> dict[str, int]:
    """``VmSize``, ``VmData``, ... of this process in bytes (empty where ``/proc`` is absent)."""
    out: dict[str, int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        k, _, v = line.partition(":")
        parts = v.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[k] = int(parts[0]) * 1024
    return out


def rlimit_limits(status: Union[str, Path] = "/proc/self/status") -> list[MemoryLimit]:
    """``RLIMIT_AS`` (``ulimit -v``: virtual address space, against ``VmSize``) and ``RLIMIT_DATA``
    (``ulimit -d``: data segments, against ``VmData``) when set."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return []
    vm: Optional[dict[str, int]] = None  # /proc/self/status, read only when a limit is set
    out = []
    for res, name, key, ulimit, flag in (
        ("RLIMIT_AS", "RLIMIT_AS (ulimit -v, address space)", "VmSize", "ulimit -v", "--as"),
        ("RLIMIT_DATA", "RLIMIT_DATA (ulimit -d, data segment)", "VmData", "ulimit -d", "--data"),
    ):
        rid = getattr(resource, res, None)
        if rid is None:
            continue
        soft, _ = resource.getrlimit(rid)
        if soft == resource.RLIM_INFINITY or soft < 0 or soft >= _UNLIMITED:
            continue
        if vm is None:
            vm = _proc_status(status)
        used = vm.get(key)
        if used is None:
            continue
        fix = f"raise the limit ({ulimit} unlimited in the shell, or prlimit {flag}=<bytes> --pid <pid>)"
        out.append(MemoryLimit(name, max(0, soft - used), soft, used, key, fix))
    return out


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_limits(device: Device) -> list[MemoryLimit]:
    """Every limit on what can be allocated on ``device`` now (at least one entry).

    CUDA: the device's free memory (``torch.cuda.mem_get_info``). CPU: ``MemAvailable`` (free RAM plus
    reclaimable cache), the cgroup limits (:func:`cgroup_limits`) and the resource limits
    (:func:`rlimit_limits`). Where none can be read, a fallback of 4 GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return [
            MemoryLimit(
                f"free memory of {device}",
                int(free),
                int(total),
                int(total - free),
                "torch.cuda.mem_get_info",
                "free GPU memory (other processes, cached tensors: torch.cuda.empty_cache()) or use another GPU",
            )
        ]
    out: list[MemoryLimit] = []
    avail = _meminfo_available()
    if avail is not None:
        out.append(MemoryLimit("MemAvailable", int(avail), where="/proc/meminfo", fix="free memory on this machine"))
    out.extend(cgroup_limits())
    out.extend(rlimit_limits())
    if not out:
        out.append(MemoryLimit("fallback (no memory information found)", _FALLBACK))
    return out


def binding_limit(device: Device) -> MemoryLimit:
    """The tightest of :func:`memory_limits`: what bounds an allocation on ``device`` now."""
    return min(memory_limits(device), key=lambda lim: lim.available)


def available_bytes(device: Device) -> int:
    """Bytes that can be allocated now on ``device``: the tightest of :func:`memory_limits` (MemAvailable,
    cgroup v1/v2 limits, ``RLIMIT_AS``/``RLIMIT_DATA``; free GPU memory on CUDA)."""
    return int(binding_limit(device).available)


def default_budget(device: Device) -> int:
    """:data:`BUDGET_FRACTION` of the memory available on ``device`` now."""
    return int(BUDGET_FRACTION * available_bytes(device))


def memory_budget(device: Device, budget: Optional[float] = None, need: Optional[float] = None) -> int:
    """Bytes a computation may hold at once: ``budget`` if given, else ``$NTKIT_MEMORY_BUDGET``, else
    :func:`default_budget` — or, when the caller's largest working set ``need`` is at most
    :data:`SMALL_WORKING_SET`, that much without reading the limits. One error for a budget that is not a
    positive number."""
    if budget is None:
        env = os.environ.get(BUDGET_ENV)
        if not env:
            if need is not None and need <= SMALL_WORKING_SET:
                return SMALL_WORKING_SET
            return default_budget(device)
        try:
            budget = float(env)
        except ValueError:
            raise ValueError(f"${BUDGET_ENV}={env!r} is not a number of bytes (e.g. 2e9).") from None
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"memory budget {budget!r} must be a positive number of bytes.")
    return int(budget)


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with one decimal: ``format_bytes(3 * 2**30) == "3.0 GiB"``."""
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
    available on ``device``; the error names ``what`` needs it, the limit that binds (free memory, a cgroup
    limit, ``ulimit -v``) and ``fix``. Results of at most :data:`SMALL_REQUEST` bytes are not checked."""
    if nbytes <= SMALL_REQUEST:
        return
    lim = binding_limit(device)
    avail = lim.available
    if nbytes > OUTPUT_FRACTION * avail:
        if lim.limit is None:
            where = f"only {format_bytes(avail)} is available on {torch.device(device)} ({lim.name})"
            also = ""
        else:
            where = f"only {format_bytes(avail)} can be allocated on {torch.device(device)} under {lim.describe()}"
            also = f" Or {lim.fix}." if lim.fix else ""
        raise MemoryError(f"{what} needs {format_bytes(nbytes)} but {where}; {fix}{also}")


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
