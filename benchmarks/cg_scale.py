"""CG vs Nyström-preconditioned CG on a full-rank NNGP kernel with n = 20 000, streamed from a kernel store.

    python benchmarks/cg_scale.py                 # n = 20000 (a 1.6 GB float64 store, upper triangle)
    python benchmarks/cg_scale.py --n 5000        # quick

Kernel: serial(Dense, Relu) x depth + Dense (W_std 1.4, b_std 0.1) on x ~ RandomState-style N(0, 1) in d = 16,
y = sin(x·w/√d) with 4 right-hand sides; ridge λ = diag_reg · mean diag K. Prints one JSON line per solver
(plain CG, Nyström-PCG with uniform centres, Nyström-PCG with ridge-leverage centres): iterations, true relative
residual, seconds, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch
from _common import apply_tuning, tuning_flag

import ntkit
from ntkit.linalg import cg, make_preconditioner
from ntkit.tiling import kernel_matrix

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--tile-size", type=int, default=2000)
    p.add_argument("--diag-reg", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--rank", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=HERE / "logs")
    tuning_flag(p)
    a = p.parse_args(argv)
    apply_tuning(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.n, a.d, generator=g, dtype=torch.float64)
    w = torch.randn(a.d, 4, generator=g, dtype=torch.float64)
    y = torch.sin(x @ w / a.d**0.5)
    layers = []
    for _ in range(a.depth):
        layers += [ntkit.Dense(512, 1.4, 0.1), ntkit.Relu()]
    net = ntkit.serial(*layers, ntkit.Dense(1, 1.4, 0.1))
    a.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = kernel_matrix(
        net.kernel_fn, x, None, "nngp", tile_size=a.tile_size, store=a.workdir / f"cg_scale_{a.n}_{a.d}_{a.depth}.zarr"
    )
    t_kernel = time.perf_counter() - t0
    k = store.matrix()
    lam = a.diag_reg * float(k.diagonal().mean())
    mach = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    for name, kind, sampling in (
        ("cg", None, None),
        ("nystrom_pcg_uniform", "nystrom", "uniform"),
        ("nystrom_pcg_rls", "nystrom", "rls"),
    ):
        t0 = time.perf_counter()
        pre = None if kind is None else make_preconditioner(k, lam, kind, a.rank, 0, sampling)
        t_pre = time.perf_counter() - t0
        res = cg(k, y, lam, tol=a.tol, preconditioner=pre, maxiter=3000)
        t = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "benchmark": "cg_scale",
                    "solver": name,
                    "n": a.n,
                    "d": a.d,
                    "depth": a.depth,
                    "diag_reg": a.diag_reg,
                    "rank": a.rank if kind else 0,
                    "tol": a.tol,
                    "iterations": res.iterations,
                    "rel_residual": float(res.residual.max()),
                    "converged": res.converged,
                    "seconds": round(t, 1),
                    "seconds_preconditioner": round(t_pre, 1),
                    "seconds_kernel_store": round(t_kernel, 1),
                    "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                    "machine": mach,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
