"""Memory: the budget every kernel computation works within, and the opt-in allocator tuning.

Public face of :mod:`ntkit._memory` (see there for the rules): :func:`memory_budget` (explicit argument >
``$NTKIT_MEMORY_BUDGET`` > a quarter of the memory available), :func:`available_bytes` (the tightest of
:func:`memory_limits`: free memory, cgroup limits, ``ulimit -v``), :func:`plan_tile`,
and :func:`tune_allocator`, the one explicit, process-wide opt-in (glibc allocator thresholds and huge pages
for large outputs) that long kernel jobs may want.
"""

from ntkit._memory import (
    BUDGET_ENV,
    BUDGET_FRACTION,
    CACHE_TILE_ENTRIES,
    OUTPUT_FRACTION,
    SMALL_REQUEST,
    SMALL_WORKING_SET,
    WORK_FACTOR,
    MemoryLimit,
    available_bytes,
    binding_limit,
    cgroup_limits,
    check_fits,
    default_budget,
    empty_output,
    format_bytes,
    memory_budget,
    memory_limits,
    plan_tile,
    rlimit_limits,
    tune_allocator,
)

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
    "check_fits",
    "plan_tile",
    "empty_output",
    "tune_allocator",
    "BUDGET_ENV",
    "BUDGET_FRACTION",
    "OUTPUT_FRACTION",
    "WORK_FACTOR",
    "CACHE_TILE_ENTRIES",
    "SMALL_REQUEST",
    "SMALL_WORKING_SET",
]
