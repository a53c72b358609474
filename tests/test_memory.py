"""Memory planning and the allocation helpers (ntkit.memory), and the cheap finite check."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ntkit.kernel import all_finite
from ntkit.memory import CACHE_TILE_ENTRIES, empty_output, plan_tile


def test_tiles_hold_about_cache_tile_entries_on_every_layout():
    big = 1 << 40
    assert plan_tile(5000, 5000, 1, 8, big) == 512                      # FC: 512 x 512 pairs
    assert plan_tile(500, 500, 64 * 64, 8, big) == 8                    # 8x8 images, full covariance
    assert plan_tile(50, 50, 1024 ** 2, 8, big) == 1                    # 32x32: one pair per tile
    t = plan_tile(500, 500, 32 * 32, 8, big)                            # 32x32 diagonal covariance
    assert t * t * 32 * 32 <= CACHE_TILE_ENTRIES < (t + 1) ** 2 * 32 * 32
    assert plan_tile(5000, 5000, 1, 8, 12 * 8 * 100 ** 2) == 100        # the budget binds first
    assert plan_tile(3, 3, 1, 8, big) == 3                              # never larger than the batch


def test_all_finite_fast_path_and_overflow_fallback():
    x = torch.randn(100, 10, dtype=torch.float64)
    assert all_finite(x)
    huge = torch.full((4,), 1e308, dtype=torch.float64)                 # finite, but its sum overflows
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
    large = empty_output((2048, 2048), like.double())                   # 32 MiB: marked for huge pages
    large.fill_(1.5)
    assert large.dtype == torch.float64 and float(large.sum()) == 1.5 * 2048 ** 2


@pytest.mark.parametrize("env, expect", [("0", "False"), ("1", None)])
def test_allocator_tuning_opt_out(env, expect):
    code = ("import ntkit.memory as m, torch, ntkit as nt; "
            "k = nt.serial(nt.Dense(4), nt.Relu(), nt.Dense(1)).kernel_fn(torch.randn(3, 2).double()); "
            "print(m._TUNED)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"NTKIT_MALLOC_TUNING": env, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    tuned = out.stdout.strip().splitlines()[-1]
    if expect is not None:
        assert tuned == expect
    else:  # tuned on Linux/glibc, silently untouched elsewhere
        assert tuned in ("True", "False")
        if sys.platform.startswith("linux"):
            import platform
            if platform.libc_ver()[0] == "glibc":
                assert tuned == "True"
