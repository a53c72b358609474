"""
Simon et al. 2023: eigenlearning predicts the test error of kernel regression
=============================================================================

**The claim** (Simon, Dickens, Karkada & DeWeese 2023, "The eigenlearning framework: a conservation law
perspective on kernel ridge regression and wide neural networks"). Kernel ridge regression with ``n`` samples
learns each eigenmode ``φᵢ`` of its kernel by a fraction ``Lᵢ = λᵢ / (λᵢ + κ)`` (its *learnability*), where a
single number ``κ`` is fixed by a conservation law, ``Σᵢ Lᵢ + δ/κ = n``. From the kernel's eigenvalues and the
target's coefficients alone this predicts the test MSE, ``E₀ (Σᵢ (1 − Lᵢ)² vᵢ² + ε²)`` with
``E₀ = n / (n − Σᵢ Lᵢ²)``, before any regression is run. Because a wide network trained on the MSE loss *is*
kernel regression with its NTK, the same numbers predict its generalisation.

**The figure.** The task: inputs uniform on the sphere of radius √8 in 8 dimensions (M samples as the
population), the NTK of a two-hidden-layer ReLU net, a polynomial target of degrees 1-3 and label noise of
variance 0.1. ``ntkit.theory.eigensystem`` gives the operator's eigensystem from the kernel on the M points;
``ntkit.theory.eigenlearning`` predicts the learning curve (lines), measured by KRR on ``n`` random points,
tested on all M, averaged over draws (markers, ± standard error), for three ridges: they agree to a few per cent, the
largest gaps (~10 %) at zero ridge where ``n`` is a sizeable fraction of the M points. Right: the learnability
of each mode against its eigenvalue at a few ``n``: modes with ``λ ≫ κ`` are learnt, those below are not.

Run ``python examples/plot_simon2023_eigenlearning.py`` (M = 1500, 10 draws, about 20 s) or with ``--full``
(M = 4000, 30 draws, larger n; minutes).
"""

# %%
import argparse
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import ntkit
from ntkit.theory import eigenlearning, eigensystem

parser = argparse.ArgumentParser(description="Simon et al. 2023: eigenlearning vs measured KRR test error")
parser.add_argument("--full", action="store_true", help="a larger population, more draws and n")
parser.add_argument("--save", default=None, help="also write the figure to this file")
args, _ = parser.parse_known_args()
M, DRAWS = (4000, 30) if args.full else (1500, 10)
NS = [4, 8, 16, 32, 64, 128, 256] + ([512, 1000] if args.full else [])
RIDGES, D, NOISE = (0.0, 1.0, 10.0), 8, 0.1

gen = torch.Generator().manual_seed(0)
x = torch.randn(M, D, generator=gen, dtype=torch.float64)
x = x / x.norm(dim=1, keepdim=True) * math.sqrt(D)
net = ntkit.serial(
    ntkit.Dense(1, W_std=1.5, b_std=0.1),
    ntkit.Relu(),
    ntkit.Dense(1, W_std=1.5, b_std=0.1),
    ntkit.Relu(),
    ntkit.Dense(1),
)
k = net.kernel_fn(x, None, "ntk")
f = x[:, 0] + x[:, 1] * x[:, 2] + 0.5 * (x[:, 3] ** 2 - 1) + 0.3 * x[:, 4] * x[:, 5] * x[:, 6]
lam, v = eigensystem(k, f)

# %%
# Predicted and measured learning curves
# --------------------------------------
measured = {r: [] for r in RIDGES}
for ridge in RIDGES:
    for n in NS:
        errs = []
        for _ in range(DRAWS):
            idx = torch.randperm(M, generator=gen)[:n]
            y = f[idx] + math.sqrt(NOISE) * torch.randn(n, generator=gen, dtype=torch.float64)
            alpha = torch.linalg.solve(k[idx][:, idx] + ridge * torch.eye(n, dtype=torch.float64), y)
            errs.append(float(((k[:, idx] @ alpha - f) ** 2).mean()) + NOISE)
        measured[ridge].append((np.mean(errs), np.std(errs) / math.sqrt(DRAWS)))

fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
ax = axes[0]
n_fine = np.unique(np.geomspace(NS[0], NS[-1], 60).astype(int))
for i, ridge in enumerate(RIDGES):
    pred = [eigenlearning(lam, v, int(n), ridge=ridge, noise=NOISE).test_mse for n in n_fine]
    ax.plot(n_fine, pred, color=f"C{i}", label=f"eigenlearning, ridge δ = {ridge:g}")
    m = np.array(measured[ridge])
    ax.errorbar(
        NS, m[:, 0], yerr=m[:, 1], fmt="o", color=f"C{i}", ms=4, capsize=2, label=f"measured KRR, δ = {ridge:g}"
    )
ax.axhline(NOISE, color="0.5", ls=":", label="noise floor ε²")
ax.set(xscale="log", yscale="log", xlabel="training samples n", ylabel="test MSE", title="Learning curves")
ax.legend(fontsize=7, ncol=2, loc="lower left")

ax = axes[1]
for i, n in enumerate((8, 64, 256)):
    r = eigenlearning(lam, v, n, ridge=0.0, noise=NOISE)
    ax.semilogx(lam[lam > 0], r.learnabilities[lam > 0], color=f"C{i + 3}", label=f"n = {n}: κ = {r.kappa:.2g}")
    ax.axvline(r.kappa, color=f"C{i + 3}", ls=":", lw=1)
ax.set(xlabel="eigenvalue λᵢ", ylabel="learnability Lᵢ = λᵢ / (λᵢ + κ)", title="Which modes are learnt (δ = 0)")
ax.legend(fontsize=8)
fig.tight_layout()
if args.save:
    fig.savefig(args.save, dpi=110)
for ridge in RIDGES:
    worst = max(
        abs(eigenlearning(lam, v, n, ridge=ridge, noise=NOISE).test_mse / m[0] - 1) for n, m in zip(NS, measured[ridge])
    )
    print(f"ridge {ridge:g}: largest relative gap between prediction and measurement {worst:.1%}")
plt.show()
