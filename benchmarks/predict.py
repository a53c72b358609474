"""predict benchmark (issue 4): infinite-ensemble predictions of serial(Dense(512), Relu()) x3 + Dense(1).

NT's case: x_train ~ RandomState(0).randn(500, 16), x_test ~ randn(200, 16), y = sin(x·w/√d) + 0.05·noise,
``gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, diag_reg=1e-4)`` called with t = None and t = 10,
``get=("nngp", "ntk")``, ``compute_cov=True``, float64. Two timings per t (median of ``--repeats`` after a warm-up,
same for NT):

* ``fresh``: a new predictor (train kernels, their factorisation, test kernels, the solve);
* ``cached``: a second call on the same predictor (test kernels and the solve; train side cached).

NT 0.6.5 runs side by side in its own venv (NTKIT_NT_PYTHON, default /tmp/ntenv/bin/python) with its kernel_fn
jitted and warm, i.e. at its best; the largest relative difference between the two outputs is reported too.

    python benchmarks/predict.py [--n-train 500] [--n-test 200] [--threads N] [--repeats 11] [--rounds 1]

``--rounds R`` runs NT's script and ntkit's timings in turn R times and ends with one summary line per case:
the median, least and largest of the R per-round ratios (each round's ratio is taken minutes apart at most, so
it holds when the shared machine's speed drifts).

``--threads N`` pins both libraries to N intra-op threads (torch.set_num_threads; XLA's Eigen pool for NT), which
keeps timings meaningful on a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from _common import apply_tuning, emit, machine, median_time, round_summary, run_nt, tuning_flag

import ntkit as nt
from ntkit import predict

NT_SCRIPT = r"""
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import neural_tangents as nt
from neural_tangents import stax
n_train, n_test, out, repeats = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rs = np.random.RandomState(0)
xtr, xte = rs.randn(n_train, 16), rs.randn(n_test, 16)
w = rs.randn(16, 1)
ytr = np.sin(xtr @ w / 4.0) + 0.05 * rs.randn(n_train, 1)
_, _, kfn = stax.serial(*([stax.Dense(512), stax.Relu()] * 3), stax.Dense(1))
kfn = jax.jit(kfn, static_argnames=("get",))
def fresh(t):
    pf = nt.predict.gradient_descent_mse_ensemble(kfn, xtr, ytr, diag_reg=1e-4)
    return pf, jax.block_until_ready(pf(t, xte, ("nngp", "ntk"), compute_cov=True))
def med(fn):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[repeats // 2]
arrays = {}
for t in (None, 10.0):
    tag = "inf" if t is None else "10"
    f_s = med(lambda: fresh(t))
    pf, res = fresh(t)
    c_s = med(lambda: jax.block_until_ready(pf(t, xte, ("nngp", "ntk"), compute_cov=True)))
    for g in ("nngp", "ntk"):
        arrays[f"{g}_mean_{tag}"] = np.asarray(getattr(res, g).mean)
        arrays[f"{g}_cov_{tag}"] = np.asarray(getattr(res, g).covariance)
    print(json.dumps({"t": tag, "fresh_s": f_s, "cached_s": c_s}))
np.savez(out, **arrays)
"""


def data(n_train: int, n_test: int):
    rs = np.random.RandomState(0)
    xtr, xte = rs.randn(n_train, 16), rs.randn(n_test, 16)
    w = rs.randn(16, 1)
    ytr = np.sin(xtr @ w / 4.0) + 0.05 * rs.randn(n_train, 1)
    return torch.from_numpy(xtr), torch.from_numpy(xte), torch.from_numpy(ytr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=11, help="timed runs per case (median reported), both sides")
    ap.add_argument("--rounds", type=int, default=1, help="NT then ntkit, this many times in turn (median ratio)")
    tuning_flag(ap)
    args = ap.parse_args()
    apply_tuning(args)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
            f"intra_op_parallelism_threads={args.threads}"
        ).strip()
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    xtr, xte, ytr = data(args.n_train, args.n_test)
    net = nt.serial(*([nt.Dense(512), nt.Relu()] * 3), nt.Dense(1))
    info = machine()

    ratios: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        # NT and ntkit in turn, round by round: a ratio from one round holds when the machine's speed drifts
        with tempfile.TemporaryDirectory() as tmp:
            nt_file = os.path.join(tmp, "nt.npz")
            nt_rows = run_nt(NT_SCRIPT, str(args.n_train), str(args.n_test), nt_file, str(args.repeats))
            nt_arrays = dict(np.load(nt_file)) if nt_rows else None
        nt_by_t = {r["t"]: r for r in nt_rows} if nt_rows else {}

        for t in (None, 10.0):
            tag = "inf" if t is None else "10"

            def fresh():
                pf = predict.gradient_descent_mse_ensemble(net.kernel_fn, xtr, ytr, diag_reg=1e-4)
                return pf, pf(t, xte, ("nngp", "ntk"), compute_cov=True)

            fresh_s = median_time(fresh, repeats=args.repeats)
            pf, res = fresh()
            fresh_method = (
                {g: [v.get("method"), v.get("degree"), v.get("float32_from")] for g, v in pf.last_method.items()}
                if t is not None
                else None
            )
            vs_eigh = None
            if t is not None:  # the fresh call's path against ntkit's own eigendecomposition path
                pe = predict.gradient_descent_mse_ensemble(net.kernel_fn, xtr, ytr, diag_reg=1e-4)
                pe.method = "eigh"
                ref_e = pe(t, xte, ("nngp", "ntk"), compute_cov=True)
                vs_eigh = max(
                    float((getattr(getattr(res, g), part) - getattr(getattr(ref_e, g), part)).abs().max())
                    / float(getattr(getattr(ref_e, g), part).abs().max())
                    for g in ("nngp", "ntk")
                    for part in ("mean", "covariance")
                )
            cached_s = median_time(lambda: pf(t, xte, ("nngp", "ntk"), compute_cov=True), repeats=args.repeats)
            diff = None
            if nt_arrays is not None:
                diff = 0.0
                for g in ("nngp", "ntk"):
                    for part, key in (("mean", "mean"), ("covariance", "cov")):
                        ref = nt_arrays[f"{g}_{key}_{tag}"]
                        got = getattr(getattr(res, g), part).numpy()
                        diff = max(diff, float(np.abs(got - ref).max() / np.abs(ref).max()))
            ntr = nt_by_t.get(tag)
            for kind, ours in (("fresh", fresh_s), ("cached", cached_s)):
                theirs = None if ntr is None else ntr[f"{kind}_s"]
                if theirs is not None:
                    ratios.setdefault((tag, kind), []).append(ours / theirs)
                emit(
                    bench="predict_ensemble",
                    n_train=args.n_train,
                    n_test=args.n_test,
                    t=tag,
                    call=kind,
                    dtype="float64",
                    round=rnd,
                    ntkit_s=round(ours, 4),
                    nt_s=None if theirs is None else round(theirs, 4),
                    ratio_vs_nt=None if theirs is None else round(ours / theirs, 3),
                    max_rel_diff_vs_nt=None if diff is None else float(f"{diff:.2e}"),
                    max_rel_diff_vs_eigh=None if vs_eigh is None else float(f"{vs_eigh:.2e}"),
                    method=fresh_method if kind == "fresh" else "eigh (cached)" if t is not None else None,
                    machine=info,
                )
    if args.rounds > 1:
        for (tag, kind), rs in ratios.items():
            emit(
                bench="predict_ensemble_summary",
                t=tag,
                call=kind,
                rounds=len(rs),
                **round_summary("ratio_vs_nt", rs),
            )


if __name__ == "__main__":
    main()
