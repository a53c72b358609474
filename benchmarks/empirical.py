"""Empirical NTK benchmark (issue 6): ntkit's implementations vs NT 0.6.5's ``empirical_ntk_fn``, side by side.

MLP case (the issue's): 784→1024→1024→10, ReLU, no biases, NTK parameterisation, float32. The weights are
ntkit's finite twin (``net.module(784, seed=0)``, with ``nn.ReLU``) exported to NT as ``(in, out)``; ``x =
RandomState(0).randn(100, 784)`` for both; kernel of ``x`` against itself, traced (100×100, NT's
``trace_axes=(-1,)``) and untraced (100×100×10×10, ``trace_axes=()``). NT runs in its own venv
(``NTKIT_NT_PYTHON``) as ``jit(empirical_ntk_fn(f, trace_axes, vmap_axes=0, implementation=i))`` for
i = 1 (Jacobian contraction), 2 (NTK-vector products), 3 (structured derivatives), 0 (auto); compilation is
excluded (one warm-up call). ntkit runs ``empirical_ntk(model, x, implementation=...)`` after a warm-up on
2 samples. Times are medians of ``--repeats`` runs (one run when a run takes over 30 s).

ResNet-18 case: the CIFAR ResNet-18 (BasicBlocks 64-128-256-512, BatchNorm in eval mode, 11.2M parameters)
built from ``torch.nn``, 3×32×32 inputs, ``--resnet-n`` samples, traced; ntkit only (NT's stax has no
eval-mode BatchNorm with these weights to compare against).

    python benchmarks/empirical.py [--cases mlp,resnet18] [--impls jacobian,ntk_vp,structured,auto]
                                   [--nt-impls 1,2,3,0] [--traces traced,untraced] [--repeats 3] [--n 100]
                                   [--resnet-n 8] [--no-nt] [--nt-max-gib 12] [--threads 0]
                                   [--rounds 1] [--floor]

One JSON line per (case, side, implementation, trace) with ``seconds`` and the relative error against a
reference kernel (NT's structured derivatives for the MLP; for ResNet-18 the same kernel in float64), plus
``machine`` (with the load average: numbers taken under load say so). MLP rows carry their ``round`` and, where
NT's structured time of the same round is known, ``ratio_vs_nt_structured``. ``--rounds R`` runs NT's script and
ntkit's timings in turn R times and ends with a summary line per trace (median, least and largest of the
per-round ratios of ntkit's best implementation to NT's structured derivatives). ``--floor`` adds a
``torch-floor`` row: :func:`torch_floor`, the structured computation of this one model written out by hand in
plain torch (what no general implementation can beat by much on this machine).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import apply_tuning, emit, machine, round_summary, run_nt, tuning_flag

import ntkit
from ntkit.empirical import empirical_ntk

NT_SCRIPT = r"""
import json, sys, time
import numpy as np
import jax
import neural_tangents as nt
from neural_tangents import stax
path, traces, impls, repeats, max_gib = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(","), \
    int(sys.argv[4]), float(sys.argv[5])
z = np.load(path)
x = z["x"]
_, f, _ = stax.serial(stax.Dense(1024), stax.Relu(), stax.Dense(1024), stax.Relu(), stax.Dense(10))
params = [(z["W1"], None), (), (z["W2"], None), (), (z["W3"], None)]
n, P = x.shape[0], sum(z[k].size for k in ("W1", "W2", "W3"))
for trace in traces:
    axes = (-1,) if trace == "traced" else ()
    for i in impls:
        i = int(i)
        if i == 1 and n * 10 * P * 4 / 2**30 > max_gib:
            print(json.dumps({"trace": trace, "impl": i, "skipped": f"Jacobian needs > {max_gib} GiB"}))
            continue
        fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=axes, vmap_axes=0, implementation=i))
        t = time.perf_counter(); k = fn(x, None, params).block_until_ready(); first = time.perf_counter() - t
        ts = []
        for _ in range(repeats):
            t = time.perf_counter(); k = fn(x, None, params).block_until_ready(); ts.append(time.perf_counter() - t)
            if ts[-1] > 30:
                break
        if i == 3:
            np.save(path.replace(".npz", f"_{trace}.npy"), np.asarray(k))
        print(json.dumps({"trace": trace, "impl": i, "seconds": sorted(ts)[len(ts) // 2],
                          "first_call_seconds": first, "runs": len(ts)}), flush=True)
"""

NT_NAMES = {"0": "auto", "1": "jacobian", "2": "ntk_vp", "3": "structured"}


def _machine() -> dict:
    m = machine()
    m["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    m["loadavg_1min"] = round(os.getloadavg()[0], 2)
    m["under_load"] = m["loadavg_1min"] > 0.5 * (os.cpu_count() or 1)
    return m


def _time(fn, repeats: int) -> tuple[float, object, int]:
    ts, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
        if ts[-1] > 30:
            break
    return sorted(ts)[len(ts) // 2], out, len(ts)


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------------
def torch_floor(x: Tensor, weights: list[Tensor]) -> Tensor:
    """The traced NTK of the 784-1024-1024-10 ReLU MLP (NTK parameterisation, no biases) by structured
    derivatives written out by hand in plain torch: the work any structured implementation does (the forward
    pass; per layer the Gram of its inputs times the Gram of its output cotangents; the readout's cotangent
    pulled back through the middle layer for all ``n·10`` rows, the one large GEMM) and nothing else. Timed as
    the floor of the algorithm in torch on this machine, not as an implementation (it knows the model)."""
    W1, W2, W3 = weights
    s1, s2, s3 = (1.0 / math.sqrt(w.shape[1]) for w in weights)
    M = W3.shape[0]
    with torch.no_grad():
        z1 = (x @ W1.T) * s1
        h1 = torch.relu(z1)
        z2 = (h1 @ W2.T) * s2
        h2 = torch.relu(z2)
        d1, d2 = (z1 > 0).to(x.dtype), (z2 > 0).to(x.dtype)
        k = (h2 @ h2.T) * (s3 * s3 * M)  # readout: cotangent e_a, traced over the M outputs
        c = (W3 * W3).sum(0) * (s3 * s3)  # middle layer: Σ_a G_i·G_j = Σ_p d_i[p] d_j[p] Σ_a (s3 W3[a, p])²
        k += (h1 @ h1.T) * ((d2 * c) @ d2.T) * (s2 * s2)
        g2 = (W3 * s3).unsqueeze(0) * d2.unsqueeze(1)  # (n, M, h): the cotangent at the middle layer's output
        g1 = (g2.reshape(-1, W2.shape[0]) @ (W2 * s2)).reshape(x.shape[0], M, -1).mul_(d1.unsqueeze(1))
        g1 = g1.reshape(x.shape[0], -1)
        k += (x @ x.T) * (g1 @ g1.T) * (s1 * s1)
    return k / M


def bench_mlp(args) -> None:
    net = ntkit.serial(ntkit.Dense(1024), ntkit.Relu(), ntkit.Dense(1024), ntkit.Relu(), ntkit.Dense(10))
    twin = net.module(784, seed=0).float().eval()
    # the twin's Dense layers with torch's ReLU (ntkit's Relu twin computes a·min(x,0) + b·max(x,0): the same
    # function, in more elementwise passes)
    model = nn.Sequential(*[m if hasattr(m, "weight") else nn.ReLU() for m in twin]).eval()
    x = torch.from_numpy(np.random.RandomState(0).randn(args.n, 784).astype(np.float32))
    dense = [m for m in model.modules() if hasattr(m, "parameterization")]
    traces = args.traces.split(",")
    ratios: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        # NT and ntkit in turn, round by round: a ratio from one round holds when the machine's speed drifts
        refs: dict[str, np.ndarray] = {}
        nt_best: dict[str, float] = {}
        mach = _machine()
        if not args.no_nt:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "mlp.npz")
                np.savez(path, x=x.numpy(), **{f"W{k + 1}": m.weight.detach().numpy().T for k, m in enumerate(dense)})
                rows = run_nt(NT_SCRIPT, path, ",".join(traces), args.nt_impls, str(args.repeats), str(args.nt_max_gib))
                for tr in traces:
                    p = path.replace(".npz", f"_{tr}.npy")
                    if os.path.exists(p):
                        refs[tr] = np.load(p)
            for r in rows or [
                {"skipped": f"NT not found at {os.environ.get('NTKIT_NT_PYTHON', '/tmp/ntenv/bin/python')}"}
            ]:
                if r.get("seconds") is not None and str(r.get("impl")) == "3":
                    nt_best[r["trace"]] = r["seconds"]
                emit(
                    case="mlp",
                    side="nt",
                    implementation=NT_NAMES.get(str(r.get("impl")), r.get("impl")),
                    trace=r.get("trace"),
                    n=args.n,
                    dtype="float32",
                    round=rnd,
                    **{k: v for k, v in r.items() if k not in ("impl", "trace")},
                    machine=mach,
                )
        for tr in traces:
            axes = (-1,) if tr == "traced" else ()
            best = math.inf

            def emit_timed(head: dict, sec: float, runs: int, k: Tensor, tr: str = tr, **extra) -> None:
                """One timed row of this round and trace, with its error against NT's kernel and its ratio to
                NT's structured time where those are known."""
                row = dict(case="mlp", **head, trace=tr, n=args.n, dtype="float32", round=rnd)
                row.update(seconds=sec, runs=runs, **extra)
                if tr in refs:
                    row["rel_err_vs_nt_structured"] = _rel(k.numpy(), refs[tr])
                if tr in nt_best:
                    row["ratio_vs_nt_structured"] = round(sec / nt_best[tr], 3)
                emit(**row, machine=_machine())

            for impl in args.impls.split(","):
                empirical_ntk(model, x[:2], implementation=impl, trace_axes=axes)  # warm-up
                sec, k, runs = _time(
                    lambda: empirical_ntk(model, x, implementation=impl, trace_axes=axes), args.repeats
                )
                best = min(best, sec)
                emit_timed(dict(side="ntkit", implementation=impl), sec, runs, k, shape=list(k.shape))
            if tr == "traced" and args.floor:
                weights = [m.weight.detach() for m in dense]
                torch_floor(x[:2], weights)  # warm-up
                sec, k, runs = _time(lambda: torch_floor(x, weights), args.repeats)
                emit_timed(dict(side="torch-floor"), sec, runs, k)
            if tr in nt_best and math.isfinite(best):
                ratios.setdefault(tr, []).append(best / nt_best[tr])
    if args.rounds > 1:
        for tr, rs in ratios.items():
            emit(
                case="mlp_summary",
                trace=tr,
                rounds=len(rs),
                **round_summary("best_ntkit_vs_nt_structured", rs),
            )


# ---------------------------------------------------------------------------------------------------
# ResNet-18
# ---------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (He et al. 2016): 3×3 stem, four stages of two BasicBlocks, global average pool."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def bench_resnet(args) -> None:
    torch.manual_seed(0)
    model = ResNet18().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    x = torch.from_numpy(np.random.RandomState(0).randn(args.resnet_n, 3, 32, 32).astype(np.float32))
    n_params = sum(p.numel() for p in model.parameters())
    # reference: the same kernel in float64 (structured derivatives; all implementations agree to 1e-12
    # in float64, see tests/test_empirical.py)
    ref = empirical_ntk(copy.deepcopy(model).double(), x.double(), implementation="structured").numpy()
    for impl in args.impls.split(","):
        empirical_ntk(model, x[:1], implementation=impl)  # warm-up
        sec, k, runs = _time(lambda: empirical_ntk(model, x, implementation=impl), args.repeats)
        emit(
            case="resnet18",
            side="ntkit",
            implementation=impl,
            trace="traced",
            n=args.resnet_n,
            dtype="float32",
            params=n_params,
            seconds=sec,
            runs=runs,
            shape=list(k.shape),
            rel_err_vs_float64=_rel(k.numpy(), ref),
            machine=_machine(),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mlp,resnet18")
    ap.add_argument("--impls", default="jacobian,ntk_vp,structured,auto")
    ap.add_argument("--nt-impls", default="1,2,3,0")
    ap.add_argument("--traces", default="traced,untraced")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--resnet-n", type=int, default=8)
    ap.add_argument("--no-nt", action="store_true")
    ap.add_argument("--nt-max-gib", type=float, default=12.0)
    ap.add_argument("--rounds", type=int, default=1, help="MLP: NT then ntkit, this many times in turn (median ratio)")
    ap.add_argument(
        "--floor", action="store_true", help="MLP, traced: also time the hand-written structured computation in torch"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for both sides (0: each library's default). On a loaded machine use 1: "
        "oversubscribed thread pools measure contention, not the algorithms.",
    )
    tuning_flag(ap)
    args = ap.parse_args()
    apply_tuning(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
            f"intra_op_parallelism_threads={args.threads}"
        ).strip()
    for case in args.cases.split(","):
        {"mlp": bench_mlp, "resnet18": bench_resnet}[case](args)


if __name__ == "__main__":
    main()
