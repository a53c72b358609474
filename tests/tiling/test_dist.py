"""torchrun with 2 CPU processes (gloo, loopback only) gives the same kernel store as 1 process, bit for bit,
splits the tiles of a resumed store across ranks, and runs distributed CG to the same solution."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("zarr")

REPO = Path(__file__).resolve().parents[1]

SETUP = r"""
import torch
import ntkit
g = torch.Generator().manual_seed(7)
x = torch.randn(157, 5, generator=g, dtype=torch.float64)
y = torch.randn(157, 2, generator=g, dtype=torch.float64)
net = ntkit.serial(ntkit.Dense(64, 1.2, 0.3), ntkit.Erf(), ntkit.Dense(64, 1.2, 0.3), ntkit.Relu(),
                   ntkit.Dense(1, 1.2, 0.3))
"""

JOB = (
    SETUP
    + r"""
import sys
from ntkit.tiling import context, kernel_matrix
from ntkit.linalg import cg
torch.set_num_threads(1)
ctx = context()  # joins the gloo group torchrun describes
assert ctx.world_size == 2
resumed = kernel_matrix(net.kernel_fn, x, None, ("nngp", "ntk"), store=sys.argv[1])
fresh = kernel_matrix(net.kernel_fn, x, None, ("nngp", "ntk"), tile_size=23, store=sys.argv[2])
mem = kernel_matrix(net.kernel_fn, x, None, "ntk", tile_size=23)
res = cg(fresh.matrix("ntk"), y, 1e-3, tol=1e-10)
if ctx.rank == 0:
    torch.save({"mem": mem, "x": res.x, "it": res.iterations}, sys.argv[3])
"""
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun_equals_one_process(tmp_path):
    import json

    from ntkit.linalg import cg
    from ntkit.tiling import KernelStore, kernel_matrix

    ns: dict = {}
    exec(SETUP, ns)
    net, x, y = ns["net"], ns["x"], ns["y"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # a store that crashed after 20 of 28 tiles (7 x 7 grid, upper triangle), to be resumed by 2 ranks
        class Crash(Exception):
            pass

        count = [0]

        def crash_after_20(t):
            count[0] += 1
            if count[0] == 20:
                raise Crash

        with pytest.raises(Crash):
            kernel_matrix(
                net.kernel_fn,
                x,
                None,
                ("nngp", "ntk"),
                tile_size=23,
                store=tmp_path / "resumed",
                on_tile=crash_after_20,
            )
        one = kernel_matrix(net.kernel_fn, x, None, ("nngp", "ntk"), tile_size=23, store=tmp_path / "one")
        one_mem = kernel_matrix(net.kernel_fn, x, None, "ntk", tile_size=23)
        one_cg = cg(one.matrix("ntk"), y, 1e-3, tol=1e-10)
    finally:
        torch.set_num_threads(threads)

    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        str(script),
        str(tmp_path / "resumed"),
        str(tmp_path / "two"),
        str(tmp_path / "out.pt"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=180)
    assert res.returncode == 0, res.stderr.decode()[-3000:]

    two, resumed = KernelStore(tmp_path / "two"), KernelStore(tmp_path / "resumed")
    for name in ("nngp", "ntk"):
        assert torch.equal(two.to_tensor(name), one.to_tensor(name))
        assert torch.equal(resumed.to_tensor(name), one.to_tensor(name))
    ranks = [json.loads(p.read_text())["rank"] for p in (tmp_path / "two" / "tiles").iterdir()]
    assert sorted(set(ranks)) == [0, 1] and len(ranks) == 28  # both ranks worked (stealing may unbalance)
    recs = [json.loads(p.read_text()) for p in (tmp_path / "resumed" / "tiles").iterdir()]
    by_run = Counter(r["run"] for r in recs)
    assert sorted(by_run.values()) == [8, 20]  # 20 tiles before the crash, the 8 missing ones after
    second = min(by_run, key=by_run.get)
    assert {r["rank"] for r in recs if r["run"] == second} == {0, 1}  # shared by both ranks
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["mem"], one_mem)
    # the all-reduce sums partial products in another order: equal up to CG's amplified round-off
    assert float((out["x"] - one_cg.x).abs().max() / one_cg.x.abs().max()) < 1e-6
    assert abs(out["it"] - one_cg.iterations) <= 3
