"""CNN kernel benchmark (issues 5, 17): the Myrtle-5 NTK of x against itself, ntkit vs NT 0.6.5 side by side.

Myrtle-5 (Shankar et al. 2020): [Conv 3×3 SAME (W_std √2, b_std 0), ReLU] ×2, AvgPool 2×2/2, [Conv, ReLU],
AvgPool 2×2/2, [Conv, ReLU], global average pool, Dense(10). Inputs ``RandomState(0).randn(n, H, W, 3)``
(NHWC for NT, transposed to NCHW for ntkit). Cases: 8×8 with n = 50, 200 and 32×32 with n = 10, 50, in
float32 and float64. NT is timed as its docs recommend: ``nt.batch(jax.jit(kernel_fn, static_argnames="get"),
batch_size=25, store_on_device=False)(x, None, "ntk")`` with the same net written in NT's stax, in its own
venv (``NTKIT_NT_PYTHON``). Both sides make one untimed call on the whole ``x`` first (NT's jit compiles its
25×25 blocks there; with ``--compiled`` ntkit runs inside ``ntkit.compiled()`` and compiles its fused rules
there), reported as ``*_first_s``; then ``--repeats`` timed calls, of which the median is ``*_s``. Every
measurement runs in a fresh process, so ``peak_rss_mb`` is that case's own high-water mark. One JSON line per
case (with ``rel_err_vs_nt`` when both ran).

    python benchmarks/cnn.py [--cases 8:50,8:200,32:10,32:50] [--dtypes float32,float64] [--no-nt]
                             [--compiled] [--repeats 3] [--nt-timeout 3600] [--nt-max-gib 12] [--tile N]
                             [--threads N]

NT is skipped (and the reason recorded) when its estimated working set for one 25×25 batch exceeds
``--nt-max-gib`` (its 32×32, n = 50 blocks hold 625 pairs × 32⁴ pixel pairs per tensor, ~2.5 GiB each in
float32): measuring it would risk the machine, not inform.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import NT_PYTHON, apply_tuning, emit, machine, tuning_flag

NT_SCRIPT = r"""
import json, resource, sys, time
import jax
n, hw, dtype, out, repeats = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
if dtype == "float64":
    jax.config.update("jax_enable_x64", True)
import numpy as np
import neural_tangents as nt
from neural_tangents import stax
r2 = 2 ** 0.5
conv = lambda: stax.Conv(1, (3, 3), W_std=r2, b_std=0.0, padding="SAME")
block = lambda k: [conv(), stax.Relu()] * k
_, _, kfn = stax.serial(*(block(2) + [stax.AvgPool((2, 2), (2, 2))] + block(1) + [stax.AvgPool((2, 2), (2, 2))]
                          + block(1) + [stax.GlobalAvgPool(), stax.Dense(10, r2, 0.0)]))
x = np.random.RandomState(0).randn(n, hw, hw, 3).astype(dtype)
f = nt.batch(jax.jit(kfn, static_argnames="get"), batch_size=25, store_on_device=False)
t = time.perf_counter()
np.asarray(f(x, None, "ntk"))                      # warm-up: jit compiles the 25x25 blocks
first = time.perf_counter() - t
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ts = []
for _ in range(repeats):
    t = time.perf_counter()
    k = np.asarray(f(x, None, "ntk"))
    ts.append(time.perf_counter() - t)
np.save(out, k)
print(json.dumps({"s": float(np.median(ts)), "first_s": first, "runs_s": ts,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mb": rss0 / 1024}))
"""


def _worker(n: int, hw: int, dtype: str, out: str, tile: int, compiled: bool, repeats: int) -> None:
    """One ntkit measurement in this (fresh) process."""
    import resource

    import torch

    import ntkit
    from ntkit.architectures import myrtle

    x = torch.from_numpy(
        np.ascontiguousarray(np.random.RandomState(0).randn(n, hw, hw, 3).astype(dtype).transpose(0, 3, 1, 2))
    )
    net = myrtle(5)
    kw = {} if tile <= 0 else {"tile_size": tile}
    with ntkit.compiled(compiled):
        t = time.perf_counter()
        net.kernel_fn(x, None, "ntk", **kw)  # warm-up (with --compiled: compiles the fused rules)
        first = time.perf_counter() - t
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ts, cpus = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            cpu = time.process_time()
            k = net.kernel_fn(x, None, "ntk", **kw)
            cpus.append(time.process_time() - cpu)
            ts.append(time.perf_counter() - t)
    np.save(out, k.numpy())
    print(
        json.dumps(
            {
                "s": float(np.median(ts)),
                "first_s": first,
                "runs_s": ts,
                "cpu_s": float(np.median(cpus)),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_before_mb": rss0 / 1024,
                "threads": torch.get_num_threads(),
            }
        )
    )


def _run(cmd: list, timeout: float, env=None) -> dict:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return {"error": tail[-300:]}
    return json.loads(lines[-1])


def _nt_block_gib(n: int, hw: int, dtype: str) -> float:
    """NT's working set for one batch of min(n, 25)² pairs: ~8 live full-covariance tensors of (hw²)² entries
    per pair (its measured peak RSS for hw = 32, n = 10, float32 is 3.9 GiB; this estimate gives 3.0)."""
    return 8 * min(n, 25) ** 2 * hw**4 * (4 if dtype == "float32" else 8) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="8:50,8:200,32:10,32:50", help="comma list of size:n")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--no-nt", action="store_true")
    ap.add_argument("--nt-timeout", type=float, default=3600)
    ap.add_argument("--nt-max-gib", type=float, default=12.0)
    ap.add_argument("--tile", type=int, default=0, help="ntkit tile_size (0: ntkit's own plan)")
    ap.add_argument("--compiled", action="store_true", help="ntkit inside ntkit.compiled() (fused rules)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per side after the warm-up (median)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads for both sides (0: each library's default; 1 is robust on a shared machine)",
    )
    ap.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    tuning_flag(ap)
    args = ap.parse_args()
    apply_tuning(args)
    if args.worker:
        n, hw, dtype, out, tile, threads, comp, reps = args.worker
        if int(threads) > 0:
            import torch

            torch.set_num_threads(int(threads))
        _worker(int(n), int(hw), dtype, out, int(tile), comp == "1", int(reps))
        return
    info = machine()
    have_nt = os.path.exists(NT_PYTHON) and not args.no_nt
    nt_env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    if args.threads > 0:
        info["torch_threads"] = args.threads
        nt_env["XLA_FLAGS"] = (
            nt_env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
            f"intra_op_parallelism_threads={args.threads}"
        ).strip()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            hw, n = (int(v) for v in case.split(":"))
            for dtype in args.dtypes.split(","):
                ours_path, nt_path = os.path.join(tmp, "ours.npy"), os.path.join(tmp, "nt.npy")
                info["loadavg_at_start"] = os.getloadavg()
                ours = _run(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--worker",
                        str(n),
                        str(hw),
                        dtype,
                        ours_path,
                        str(args.tile),
                        str(args.threads),
                        "1" if args.compiled else "0",
                        str(args.repeats),
                    ],
                    timeout=args.nt_timeout,
                )
                if not have_nt:
                    theirs = {"skipped": "NT venv absent" if not args.no_nt else "--no-nt"}
                elif _nt_block_gib(n, hw, dtype) > args.nt_max_gib:
                    theirs = {
                        "skipped": f"estimated {_nt_block_gib(n, hw, dtype):.0f} GiB per 25x25 batch "
                        f"> --nt-max-gib {args.nt_max_gib:g}"
                    }
                else:
                    theirs = _run(
                        [NT_PYTHON, "-c", NT_SCRIPT, str(n), str(hw), dtype, nt_path, str(args.repeats)],
                        timeout=args.nt_timeout,
                        env=nt_env,
                    )
                row = dict(
                    bench="cnn_myrtle5_ntk",
                    hw=hw,
                    n=n,
                    dtype=dtype,
                    compiled=args.compiled,
                    ntkit_s=round(ours["s"], 3) if "s" in ours else None,
                    ntkit_first_s=round(ours["first_s"], 3) if "first_s" in ours else None,
                    ntkit_runs_s=[round(v, 3) for v in ours.get("runs_s", [])] or None,
                    ntkit_cpu_s=round(ours["cpu_s"], 3) if "cpu_s" in ours else None,
                    ntkit_peak_rss_mb=round(ours.get("peak_rss_mb", 0), 1) or None,
                    nt_s=round(theirs["s"], 3) if "s" in theirs else None,
                    nt_first_s=round(theirs["first_s"], 3) if "first_s" in theirs else None,
                    nt_runs_s=[round(v, 3) for v in theirs.get("runs_s", [])] or None,
                    nt_peak_rss_mb=round(theirs.get("peak_rss_mb", 0), 1) or None,
                )
                if "s" in ours and "s" in theirs:
                    row["speedup_vs_nt"] = round(theirs["s"] / ours["s"], 2)
                    row["ntkit_over_nt"] = round(ours["s"] / theirs["s"], 3)
                    a, b = np.load(ours_path), np.load(nt_path)
                    row["rel_err_vs_nt"] = float(np.abs(a - b).max() / np.abs(b).max())
                for side, r in (("ntkit", ours), ("nt", theirs)):
                    for key in ("error", "skipped"):
                        if key in r:
                            row[f"{side}_{key}"] = r[key]
                row["machine"] = dict(info)
                emit(**row)


if __name__ == "__main__":
    main()
