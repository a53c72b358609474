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


# -- the limits a process runs under (issue #16, item 8) ------------------------------------------------------
RLIMIT_JOB = r"""
import resource, sys, torch, ntkit as nt
from ntkit._memory import _proc_status
resource.setrlimit(resource.RLIMIT_AS, (_proc_status()["VmSize"] + (768 << 20), resource.RLIM_INFINITY))
net = nt.serial(nt.Dense(64), nt.Relu(), nt.Dense(1))
x = torch.randn(12000, 3, dtype=torch.float64)
try:
    net.kernel_fn(x)  # two 12000 x 12000 float64 kernels: 2.1 GiB, more than the 768 MiB left
except MemoryError as e:
    print("MemoryError:", e)
    sys.exit(3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_ulimit_v_is_honoured_before_allocating():
    """Under ``ulimit -v`` a kernel that cannot fit is refused by ntkit, naming the limit and the fix (before,
    the allocation started and torch's raw allocator error came out)."""
    r = subprocess.run([sys.executable, "-c", RLIMIT_JOB], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    msg = r.stdout
    assert "RLIMIT_AS (ulimit -v" in msg and "2.1 GiB" in msg
    assert "ulimit -v unlimited" in msg and "kernel_matrix(..., store=path)" in msg  # both fixes
    assert "DefaultCPUAllocator" not in r.stdout + r.stderr


def _tree(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_cgroup_v2_limits_at_every_level(tmp_path):
    from ntkit._memory import cgroup_limits

    root = tmp_path / "cg"
    _tree(
        root,
        {
            "user.slice/memory.max": "8000000\n",
            "user.slice/memory.current": "1000000\n",
            "user.slice/job/memory.max": "3000000\n",
            "user.slice/job/memory.current": "2000000\n",
            "user.slice/job/memory.stat": "anon 1500000\ninactive_file 500000\nactive_file 1\n",
            "memory.max": "max\n",  # the root: no limit
            "memory.current": "5\n",
        },
    )
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/job\n")
    lims = cgroup_limits(proc, root)
    assert [(lim.name, lim.available) for lim in lims] == [
        ("cgroup v2 memory.max", 3_000_000 - (2_000_000 - 500_000)),  # reclaimable page cache counts as free
        ("cgroup v2 memory.max", 8_000_000 - 1_000_000),
    ]
    assert lims[0].limit == 3_000_000 and lims[0].used == 1_500_000 and "job" in lims[0].where
    # in a cgroup namespace the process's own cgroup is the mounted root
    proc.write_text("0::/not/visible/here\n")
    _tree(root, {"memory.max": "4096\n", "memory.current": "1024\n"})
    assert [lim.available for lim in cgroup_limits(proc, root)] == [3072]
    proc.write_text("0::/\n")
    (root / "memory.max").write_text("max\n")
    assert cgroup_limits(proc, root) == []  # no limit anywhere


def test_cgroup_v1_limits_hierarchy_and_unlimited(tmp_path):
    from ntkit._memory import cgroup_limits

    root = tmp_path / "cg"
    unlimited = str(9223372036854771712)
    _tree(
        root,
        {
            "memory/memory.limit_in_bytes": unlimited + "\n",
            "memory/memory.usage_in_bytes": "100\n",
            "memory/docker/memory.limit_in_bytes": "6000000\n",
            "memory/docker/memory.usage_in_bytes": "2500000\n",
            "memory/docker/abc/memory.limit_in_bytes": unlimited + "\n",
            "memory/docker/abc/memory.usage_in_bytes": "2000000\n",
            "memory/docker/abc/memory.stat": "hierarchical_memory_limit 5000000\ntotal_inactive_file 400000\n",
        },
    )
    proc = tmp_path / "cgroup"
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    lims = cgroup_limits(proc, root)
    assert sorted(lim.available for lim in lims) == [3_400_000, 3_500_000]
    assert all(lim.name == "cgroup v1 memory.limit_in_bytes" for lim in lims)
    (root / "memory/docker/abc/memory.stat").write_text("total_inactive_file 0\n")
    (root / "memory/docker/memory.limit_in_bytes").write_text(unlimited + "\n")
    assert cgroup_limits(proc, root) == []  # unlimited at every level


def test_a_binding_cgroup_limit_is_named_in_the_refusal(monkeypatch):
    import ntkit._memory as M

    fake = M.MemoryLimit("cgroup v2 memory.max", 200 << 20, 1 << 30, 824 << 20, "/sys/fs/cgroup/job", "raise it")
    monkeypatch.setattr(M, "cgroup_limits", lambda: [fake])
    assert M.available_bytes("cpu") == 200 << 20 and M.binding_limit("cpu") is fake
    assert M.memory_budget("cpu") == int(M.BUDGET_FRACTION * (200 << 20))
    import ntkit as nt

    net = nt.serial(nt.Dense(8), nt.Relu(), nt.Dense(1))
    with pytest.raises(MemoryError) as err:
        net.kernel_fn(torch.randn(6000, 2, dtype=torch.float64), None, "nngp")  # 275 MiB > 0.9 x 200 MiB
    msg = str(err.value)
    assert "cgroup v2 memory.max of 1.0 GiB with 824.0 MiB in use (/sys/fs/cgroup/job)" in msg
    assert "200.0 MiB can be allocated" in msg and "raise it" in msg and "store=path" in msg


def test_rlimit_limits_read_this_process(tmp_path):
    import resource

    from ntkit._memory import rlimit_limits

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmSize:\t  1000 kB\nVmData:\t   500 kB\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, hard))
        (lim,) = [x for x in rlimit_limits(status) if x.name.startswith("RLIMIT_DATA")]
        assert lim.available == (4 << 30) - 500 * 1024 and lim.used == 500 * 1024 and "ulimit -d" in lim.fix
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    if soft == resource.RLIM_INFINITY:  # no limit: no entry
        assert not [x for x in rlimit_limits(status) if x.name.startswith("RLIMIT_DATA")]


def test_small_requests_and_working_sets_skip_the_limit_reading(monkeypatch):
    """A result of at most SMALL_REQUEST bytes, and a kernel whose largest tile's working set is at most
    SMALL_WORKING_SET, do not read the limits (a reading costs 0.1-0.2 ms); larger ones still do and are
    refused under a binding limit."""
    import ntkit._memory as M

    reads = []
    tight = M.MemoryLimit("cgroup v2 memory.max", 4 << 20, 1 << 30, 1020 << 20, "/sys/fs/cgroup/job", "raise it")

    def limits(device):
        reads.append(device)
        return [tight]

    monkeypatch.setattr(M, "memory_limits", limits)
    monkeypatch.delenv(M.BUDGET_ENV, raising=False)
    M.check_fits(M.SMALL_REQUEST, "cpu", "a small result", "fix")
    assert M.memory_budget("cpu", need=M.SMALL_WORKING_SET) == M.SMALL_WORKING_SET
    import ntkit as nt

    net = nt.serial(nt.Dense(8), nt.Relu(), nt.Dense(1))
    k = net.kernel_fn(torch.randn(50, 3, dtype=torch.float64), None, "nngp")  # 50² pairs: a tiny working set
    assert k.shape == (50, 50) and reads == []
    with pytest.raises(MemoryError, match="4.0 MiB can be allocated"):
        M.check_fits(M.SMALL_REQUEST + 1, "cpu", "a larger result", "fix")
    assert M.memory_budget("cpu", need=M.SMALL_WORKING_SET + 1) == int(M.BUDGET_FRACTION * (4 << 20))
    assert len(reads) == 2
