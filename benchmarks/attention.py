"""GlobalSelfAttention kernel benchmark (issue 14): ntkit vs NT 0.6.5 (jit'd ``kernel_fn``) side by side on the
same inputs, in one run.

Nets (2-D images ``RandomState(0).randn(n, H, W, 3)``, NHWC for NT, NCHW for ntkit; SOFTMAX, linear scaling):

* ``attn``:  Conv(8, 3×3, SAME) – GlobalSelfAttention(8, 8, 8, 2) – GlobalAvgPool – Dense(1)
* ``attn2``: Conv – ReLU – Attn(SUM embeddings, exp decay, val_pos_emb) – ReLU – Attn – GlobalAvgPool – Dense(1)

Each case computes ``kernel_fn(x, None, ("nngp", "ntk"))`` (x against itself). NT runs in its own venv
(``NTKIT_NT_PYTHON``) as ``jax.jit(kernel_fn, static_argnames="get")``, compiled by one untimed call on the same
inputs and pinned to ``--threads`` cores; ntkit uses ``torch.set_num_threads(--threads)`` and is warmed up by one call
too. The two sides alternate ``--rounds`` times (so that load from other
processes hits both alike), each round timing ``--repeats`` calls; one JSON line per side and round, then a
summary line with the best times, their ratio (``ntkit_over_nt``, < 1: ntkit faster) and the relative error
between the two results.

    python benchmarks/attention.py [--n 20] [--hw 8] [--dtype float64] [--threads 2] [--rounds 3] [--repeats 5]
                                   [--nets attn,attn2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine, run_nt

NT_SCRIPT = r"""
import json, sys, time
n, hw, dtype, threads, repeats, net_name, out = sys.argv[1:8]
n, hw, repeats = int(n), int(hw), int(repeats)
import os
os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: int(threads)]))  # XLA's pool on `threads` cores
import warnings; warnings.filterwarnings("ignore")
import jax
if dtype == "float64":
    jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
from neural_tangents import stax
conv = lambda: stax.Conv(8, (3, 3), padding="SAME")
if net_name == "attn":
    layers = [conv(), stax.GlobalSelfAttention(8, 8, 8, 2), stax.GlobalAvgPool(), stax.Dense(1)]
else:
    emb = stax.GlobalSelfAttention(8, 8, 8, 2, pos_emb_type="SUM", pos_emb_decay_fn=lambda d: jnp.exp(-d),
                                   val_pos_emb=True)
    layers = [conv(), stax.Relu(), emb, stax.Relu(), stax.GlobalSelfAttention(8, 8, 8, 2), stax.GlobalAvgPool(),
              stax.Dense(1)]
kfn = jax.jit(stax.serial(*layers)[2], static_argnames="get")
x = jnp.asarray(np.random.RandomState(0).randn(n, hw, hw, 3).astype(dtype))
k = kfn(x, None, get=("nngp", "ntk")); k.ntk.block_until_ready()  # compile
ts = []
for _ in range(repeats):
    t = time.perf_counter()
    k = kfn(x, None, get=("nngp", "ntk")); k.ntk.block_until_ready()
    ts.append(time.perf_counter() - t)
np.savez(out, nngp=np.asarray(k.nngp), ntk=np.asarray(k.ntk))
print(json.dumps({"times": ts}))
"""


def ntkit_net(name: str):
    import torch

    import ntkit as nk

    conv = nk.Conv(8, (3, 3), padding="SAME")
    if name == "attn":
        return nk.serial(conv, nk.GlobalSelfAttention(8, 8, 8, 2), nk.GlobalAvgPool(), nk.Dense(1))
    emb = nk.GlobalSelfAttention(
        8, 8, 8, 2, pos_emb_type="SUM", pos_emb_decay_fn=lambda d: torch.exp(-d), val_pos_emb=True
    )
    return nk.serial(
        conv, nk.Relu(), emb, nk.Relu(), nk.GlobalSelfAttention(8, 8, 8, 2), nk.GlobalAvgPool(), nk.Dense(1)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--hw", type=int, default=8)
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nets", default="attn,attn2")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    emit(machine=machine(), load_average=os.getloadavg())
    x = torch.from_numpy(
        np.ascontiguousarray(
            np.random.RandomState(0).randn(args.n, args.hw, args.hw, 3).astype(args.dtype).transpose(0, 3, 1, 2)
        )
    )
    common = dict(n=args.n, hw=args.hw, dtype=args.dtype, threads=args.threads)
    for name in args.nets.split(","):
        net = ntkit_net(name)
        k = net.kernel_fn(x)  # warm-up
        best = {"ntkit": float("inf"), "nt": float("inf")}
        nt_k = None
        for r in range(args.rounds):
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                k = net.kernel_fn(x)
                ts.append(time.perf_counter() - t)
            best["ntkit"] = min(best["ntkit"], *ts)
            emit(side="ntkit", net=name, round=r, s_min=min(ts), s_median=sorted(ts)[len(ts) // 2], **common)
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, "k.npz")
                rows = run_nt(
                    NT_SCRIPT, str(args.n), str(args.hw), args.dtype, str(args.threads), str(args.repeats), name, out
                )
                if rows is None:
                    emit(side="nt", net=name, skipped="NT's venv is absent or NT failed (see stderr)")
                    break
                nt_ts = rows[-1]["times"]
                with np.load(out) as z:
                    nt_k = {g: z[g] for g in ("nngp", "ntk")}
            best["nt"] = min(best["nt"], *nt_ts)
            emit(side="nt", net=name, round=r, s_min=min(nt_ts), s_median=sorted(nt_ts)[len(nt_ts) // 2], **common)
        summary = dict(net=name, ntkit_best_s=best["ntkit"], nt_best_s=best["nt"], **common)
        if nt_k is not None:
            summary["ntkit_over_nt"] = best["ntkit"] / best["nt"]
            summary["rel_err_vs_nt"] = max(
                float(np.abs(getattr(k, g).numpy() - nt_k[g]).max() / np.abs(nt_k[g]).max()) for g in ("nngp", "ntk")
            )
        print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
