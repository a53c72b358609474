"""
Jacot et al. 2018: the spectral view of training
================================================

**The claim** (Jacot, Gabriel & Hongler 2018, Sec. 5; Lee et al. 2019). Under gradient flow on the MSE loss an
infinitely wide network moves in function space as kernel gradient descent with its NTK ``Θ``, so the
training residual along each eigenvector of ``Θ`` decays as ``exp(-η λ t / N)``: the top principal
components of the kernel are learnt first, the small ones late ("early stopping learns the top of the
spectrum").

**The figure.** Inputs are 64 points on the unit circle, so the NTK of any fully-connected net is a
circulant matrix whose eigenvectors are Fourier modes: eigen-direction = frequency. The target mixes
frequencies 1, 4 and 12.

* Left: per frequency, how much of the training residual is left at time ``t``, predicted at infinite width
  by ``ntkit.predict.gradient_descent_mse(...).residual_modes`` (lines) and measured on finite twins trained
  by full-batch gradient descent (markers). The top of the spectrum matches already at the smaller width;
  the tail (frequency 12, eigenvalue ~1e-3 of the largest) is where finite width shows: the empirical
  NTK's fluctuations, O(1/√width) of its scale, are comparable to the gaps between small eigenvalues, so
  those directions mix with slower ones and are learnt later; the wider net is closer.
* Middle: the NTK spectrum, each eigenvalue labelled by its frequency.
* Right: the network function at a few times: low frequencies are learnt first.

Run ``python examples/plot_jacot2018_spectral_dynamics.py`` (small: widths 512 and 2048, about a minute)
or with ``--full`` (widths 2048 and 8192, a few minutes on 2 cores).
"""

# %%
import argparse
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import ntkit
from ntkit import predict

parser = argparse.ArgumentParser(description="Jacot et al. 2018: the spectral view of training")
parser.add_argument("--full", action="store_true", help="widths 2048 and 8192 (a few minutes)")
parser.add_argument("--save", default=None, help="also write the figure to this file")
args, _ = parser.parse_known_args()

N, FREQS, T_MAX = 64, (1, 4, 12), 3000
WIDTHS = (2048, 8192) if args.full else (512, 2048)
# these small matrices train ~10x faster on one thread than on two competing ones (restored at the end)
THREADS = torch.get_num_threads()
torch.set_num_threads(1)


def main():
    torch.manual_seed(0)
    theta = torch.arange(N, dtype=torch.float64) * (2 * math.pi / N)
    x = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    y = (torch.sin(theta) + 0.5 * torch.sin(4 * theta) + 0.3 * torch.cos(12 * theta))[:, None]

    # one hidden ReLU layer (cheap to train at width 2048); its circulant NTK has eigenvalue ~0 at odd
    # frequencies >= 3 (a property of ReLU), so the target uses frequencies 1, 4 and 12
    net = ntkit.serial(ntkit.Dense(WIDTHS[0], b_std=0.1), ntkit.Relu(), ntkit.Dense(1, b_std=0.1))
    ntk = net.kernel_fn(x, None, "ntk")
    # a = η λ_max / N = 0.2: discrete steps follow the continuous-time law to ~1 % on the fastest direction
    eta = 0.1 * predict.max_learning_rate(ntk, y.numel())

    # finite twins, trained by full-batch GD on 0.5·mean((f - y)²) (NT's normalisation: step k <-> t = k)
    checkpoints = np.unique(np.round(np.logspace(0, math.log10(T_MAX), 12)).astype(int))
    finite, f0s = {}, {}
    for width in WIDTHS:
        model = net.module(2, width=width, seed=0).double()
        with torch.no_grad():
            f0s[width] = model(x)
        outs, step = [], 0
        params = list(model.parameters())
        for stop in checkpoints:
            while step < stop:
                loss = 0.5 * ((model(x) - y) ** 2).mean()
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p -= eta * g
                step += 1
            with torch.no_grad():
                outs.append(model(x))
        finite[width] = outs
    f0 = f0s[WIDTHS[0]]

    pf = predict.gradient_descent_mse(ntk, y, learning_rate=eta)
    lam, vec = pf.eigenvalues, pf.eigenvectors  # largest first
    freq = np.abs(np.fft.rfft(vec.numpy(), axis=0)).argmax(0)  # frequency of each eigen-direction
    ts = torch.logspace(-1, math.log10(T_MAX), 200, dtype=torch.float64)

    def share(m, k, start):  # residual left at frequency k (its cos and sin directions), relative to t = 0
        sel = torch.from_numpy(freq == k)
        r0 = (vec.T @ (start - y)[:, 0])[sel].norm()
        return (m[:, sel].norm(dim=1) / r0).numpy()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    markers = {WIDTHS[0]: "o", WIDTHS[1]: "x"}
    modes = pf.residual_modes(ts, f0)[..., 0]  # (times, directions): v_iᵀ (f_t - y)
    for i, k in enumerate(FREQS):
        rate = float(pf.rates[torch.from_numpy(freq == k)][0])
        ax.plot(ts.numpy(), share(modes, k, f0), color=f"C{i}", label=f"frequency {k}: rate ηλ/N = {rate:.2g}")
        for width in WIDTHS:
            fin = torch.stack([vec.T @ (f - y)[:, 0] for f in finite[width]])
            ax.plot(checkpoints, share(fin, k, f0s[width]), markers[width], color=f"C{i}", ms=4)
    for width in WIDTHS:
        ax.plot([], [], markers[width], color="k", ms=4, label=f"finite net, width {width}")
    ax.set(
        xscale="log",
        xlabel="t (gradient-descent steps)",
        ylabel="residual left |P_k (f_t - y)| / |P_k (f_0 - y)|",
        title="Residual per eigen-direction (lines: infinite width)",
        ylim=(-0.02, 1.1),
    )
    ax.legend(fontsize=8, loc="lower left")

    ax = axes[1]
    lv = lam.numpy()
    ax.semilogy(np.arange(N), np.maximum(lv, 1e-12), ".", color="0.4")
    for i, k in enumerate(FREQS):
        j = np.flatnonzero(freq == k)
        ax.semilogy(j, lv[j], "o", color=f"C{i}", label=f"frequency {k}")
    ax.set(xlabel="eigen-direction (largest first)", ylabel="NTK eigenvalue λ", title="NTK spectrum = Fourier modes")
    ax.legend(fontsize=8)

    ax = axes[2]
    order = torch.argsort(theta)
    ax.plot(theta[order], y[order, 0], "k", lw=2, label="target")
    snap = [5, 100, T_MAX]
    preds = pf(torch.tensor(snap, dtype=torch.float64), f0)
    for i, t in enumerate(snap):
        ax.plot(theta[order], preds[i][order, 0], color=plt.cm.viridis(i / (len(snap) - 1)), label=f"t = {t}")
    ax.set(xlabel="angle θ", ylabel="f(θ)", title="Low frequencies are learnt first")
    ax.legend(fontsize=8)

    fig.tight_layout()
    if args.save:
        fig.savefig(args.save, dpi=110)
    for k in FREQS:
        rate = float(pf.rates[torch.from_numpy(freq == k)][0])
        print(f"frequency {k:2d}: rate {rate:.3g}/step, half of its residual gone after t = {math.log(2) / rate:.3g}")


main()
torch.set_num_threads(THREADS)
plt.show()
