"""FC kernel benchmark (issue 3): serial(Dense(512), Relu()) x3 + Dense(1), x = RandomState(0).randn(2000, 784),
nngp + ntk of x against itself, float32 and float64, median of 3 (``--repeats``) after a warm-up; NT 0.6.5 (jit)
side by side
when its venv exists (NTKIT_NT_PYTHON, default /tmp/ntenv/bin/python).

    python benchmarks/fc.py [--n 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import apply_tuning, emit, machine, median_time, run_nt, tuning_flag

import ntkit as nt

NT_SCRIPT = r"""
import json, sys, time
import jax
n, dtype, reps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if dtype == "float64":
    jax.config.update("jax_enable_x64", True)
import numpy as np
from neural_tangents import stax
x = jax.numpy.asarray(np.random.RandomState(0).randn(n, 784).astype(dtype))
_, _, kfn = stax.serial(*([stax.Dense(512), stax.Relu()] * 3), stax.Dense(1))
kfn = jax.jit(kfn, static_argnames=("get",))
jax.block_until_ready(kfn(x, None, ("nngp", "ntk")))
ts = []
for _ in range(reps):
    t = time.perf_counter(); jax.block_until_ready(kfn(x, None, ("nngp", "ntk"))); ts.append(time.perf_counter() - t)
print(json.dumps({"median_s": sorted(ts)[len(ts) // 2]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    tuning_flag(ap)
    args = ap.parse_args()
    apply_tuning(args)
    x64 = torch.from_numpy(np.random.RandomState(0).randn(args.n, 784))
    net = nt.serial(*([nt.Dense(512), nt.Relu()] * 3), nt.Dense(1))
    info = machine()
    for dtype in ("float32", "float64"):
        x = x64.to(getattr(torch, dtype))
        t = median_time(lambda: net.kernel_fn(x, None, ("nngp", "ntk")), repeats=args.repeats)
        ntr = run_nt(NT_SCRIPT, str(args.n), dtype, str(args.repeats))
        nt_t = ntr[0]["median_s"] if ntr else None
        emit(
            bench="fc",
            n=args.n,
            dtype=dtype,
            ntkit_s=round(t, 4),
            nt_s=None if nt_t is None else round(nt_t, 4),
            ratio_vs_nt=None if nt_t is None else round(t / nt_t, 3),
            repeats=args.repeats,
            machine=info,
        )


if __name__ == "__main__":
    main()
