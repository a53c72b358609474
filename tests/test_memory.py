"""The one memory budget and tile planner (ntkit._memory / ntkit.memory), the allocation helpers, and the cheap
finite check."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ntkit._inputs import all_finite
from ntkit.memory import CACHE_TILE_ENTRIES, WORK_FACTOR, empty_output, memory_budget, plan_tile


def _net_tile(n1, n2, entries, item, budget):
    """The tile a network's kernel_fn plans: working set per pair, capped near CACHE_TILE_ENTRIES entries."""
    cap = max(1, int((CACHE_TILE_ENTRIES // entries) ** 0.5))
    return plan_tile(n1, n2, pair_bytes=entries * item * WORK_FACTOR, budget=budget, cap=cap)


def test_tiles_hold_about_cache_tile_entries_on_every_layout():
    big = 1 << 40
    assert _net_tile(5000, 5000, 1, 8, big) == 512  # FC: 512 x 512 pairs
    assert _net_tile(500, 500, 64 * 64, 8, big) == 8  # 8x8 images, full covariance
    assert _net_tile(50, 50, 1024**2, 8, big) == 1  # 32x32: one pair per tile
    t = _net_tile(500, 500, 32 * 32, 8, big)  # 32x32 diagonal covariance
    assert t * t * 32 * 32 <= CACHE_TILE_ENTRIES < (t + 1) ** 2 * 32 * 32
    assert _net_tile(5000, 5000, 1, 8, 12 * 8 * 100**2) == 100  # the budget binds first
    assert _net_tile(3, 3, 1, 8, big) == 3  # never larger than the batch


def test_plan_tile_with_per_sample_memory_and_its_errors():
    # 2·T·f + T²·q <= budget: f = 100, q = 1, budget = 10_400 -> T = 52 (2·52·100 + 52² = 13_104 > budget: 51)
    t = plan_tile(10_000, 10_000, pair_bytes=1, sample_bytes=100, budget=10_400)
    assert 2 * t * 100 + t * t <= 10_400 < 2 * (t + 1) * 100 + (t + 1) ** 2
    with pytest.raises(MemoryError, match="more than the budget"):
        plan_tile(10, 10, pair_bytes=1000, budget=10)
    assert plan_tile(10, 10, pair_bytes=1000, budget=10, strict=False) == 1
    assert plan_tile(10, 10, pair_bytes=1, budget=1 << 30, tile_size=4) == 4
    with pytest.raises(ValueError, match="tile_size"):
        plan_tile(10, 10, pair_bytes=1, budget=1 << 30, tile_size=0)


def test_memory_budget_explicit_then_environment_then_free_memory(monkeypatch):
    monkeypatch.delenv("NTKIT_MEMORY_BUDGET", raising=False)
    free = memory_budget("cpu")
    assert free > 0
    assert memory_budget("cpu", 12345) == 12345
    monkeypatch.setenv("NTKIT_MEMORY_BUDGET", "2e6")
    assert memory_budget("cpu") == 2_000_000 and memory_budget("cpu", 7) == 7
    monkeypatch.setenv("NTKIT_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="NTKIT_MEMORY_BUDGET"):
        memory_budget("cpu")
    with pytest.raises(ValueError, match="positive"):
        memory_budget("cpu", -1)


def test_the_budget_variable_is_honoured_by_kernel_fn(monkeypatch):
    """One variable for every computation: a budget too small for one pair fails the network's kernel_fn."""
    import ntkit as nt

    net = nt.serial(nt.Conv(4, (3, 3), padding="SAME"), nt.Relu(), nt.GlobalAvgPool(), nt.Dense(1))
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    monkeypatch.setenv("NTKIT_MEMORY_BUDGET", "1000")
    with pytest.raises(MemoryError, match="budget"):
        net.kernel_fn(x)


def test_all_finite_fast_path_and_overflow_fallback():
    x = torch.randn(100, 10, dtype=torch.float64)
    assert all_finite(x)
    huge = torch.full((4,), 1e308, dtype=torch.float64)  # finite, but its sum overflows
    assert not bool(torch.isfinite(huge.sum())) and all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3, 4] = bad
        assert not all_finite(y)
    z = huge.clone()
    z[0] = float("nan")
    assert not all_finite(z)


def test_empty_output_shape_dtype_device_and_large_buffers():
    like = torch.zeros(2, dtype=torch.float32)
    small = empty_output((3, 4), like)
    assert small.shape == (3, 4) and small.dtype == torch.float32 and small.device == like.device
    large = empty_output((2048, 2048), like.double())  # 32 MiB: marked for huge pages if tuned
    large.fill_(1.5)
    assert large.dtype == torch.float64 and float(large.sum()) == 1.5 * 2048**2


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_no_process_wide_tuning_unless_asked():
    """A kernel call leaves the allocator alone; tune_allocator() is the explicit opt-in."""
    untouched = _run(
        "import ntkit as nt, torch, ntkit._memory as m; "
        "nt.serial(nt.Dense(4), nt.Relu(), nt.Dense(1)).kernel_fn(torch.randn(3, 2).double()); "
        "print(m._Tuning.malloc, m._Tuning.huge_pages)"
    )
    assert untouched == "False False"
    tuned = _run("import ntkit.memory as m; print(m.tune_allocator())")
    if sys.platform.startswith("linux"):
        import platform

        if platform.libc_ver()[0] == "glibc":
            assert tuned == "{'malloc': True, 'huge_pages': True}"
