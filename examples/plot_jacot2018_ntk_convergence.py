"""
Jacot et al. 2018: the NTK of finite networks converges, and stays put during training
======================================================================================

**The claim** (Jacot, Gabriel & Hongler 2018, "Neural tangent kernel: convergence and generalization in neural
networks", Figs. 1 and 2). Under the NTK parameterisation the tangent kernel of a finite network
``Θ(x, x') = ∂f(x)/∂θ · ∂f(x')/∂θ`` is random at initialisation, but as the width grows it converges to a
deterministic limit, the NTK, and it stays (nearly) constant while the network is trained: a wide network is
trained by kernel gradient descent with a fixed kernel.

**The figure.** As in the paper, inputs are points ``x = (cos γ, sin γ)`` on the unit circle and the network is
a four-layer ReLU net. Left: ``Θ(x₀, x)`` against the angle γ to ``x₀ = (1, 0)`` for a few random
initialisations of two widths, at initialisation (solid) and after full-batch gradient descent on a small
regression task (dashed), with the infinite-width NTK of ``net.kernel_fn`` (black). The wide nets cluster
on the limit and barely move during training; the narrow ones scatter and drift. Right: the relative
distance to the limit and the relative change during training, against width, both falling as
``1/√width``.

Run ``python examples/plot_jacot2018_ntk_convergence.py`` (small: widths 64-512, 4 seeds, about
20 s) or with ``--full`` (the paper's widths 500 and 10 000 and a sweep up to 8192, 10 seeds, some minutes).
"""

# %%
import argparse
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

import ntkit
from ntkit.empirical import empirical_ntk

parser = argparse.ArgumentParser(description="Jacot et al. 2018: NTK convergence in width and during training")
parser.add_argument("--full", action="store_true", help="the paper's widths and more seeds (minutes)")
parser.add_argument("--save", default=None, help="also write the figure to this file")
args, _ = parser.parse_known_args()

if args.full:
    SHOWN, SWEEP, SEEDS, STEPS = (500, 10_000), (64, 128, 256, 512, 1024, 2048, 4096, 8192), 10, 200
else:
    SHOWN, SWEEP, SEEDS, STEPS = (64, 512), (64, 128, 256, 512), 4, 200
torch.manual_seed(0)
# small matrices: one thread is ~10x faster than two competing ones (restored at the end)
THREADS = torch.get_num_threads()
torch.set_num_threads(1)

# %%
# The network and its limit
# -------------------------
# ``W_std=1`` and ``b_std=0.1`` as in the paper (β = 0.1); four ReLU layers (three hidden).
net = ntkit.serial(
    ntkit.Dense(1, W_std=1.0, b_std=0.1),
    ntkit.Relu(),
    ntkit.Dense(1, W_std=1.0, b_std=0.1),
    ntkit.Relu(),
    ntkit.Dense(1, W_std=1.0, b_std=0.1),
    ntkit.Relu(),
    ntkit.Dense(1, W_std=1.0, b_std=0.1),
)
gamma = torch.linspace(-math.pi, math.pi, 61 if not args.full else 121, dtype=torch.float64)
x_eval = torch.stack([torch.cos(gamma), torch.sin(gamma)], 1)
x0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
limit = net.kernel_fn(x0, x_eval, "ntk")[0]

# a small regression task to train on: 4 points on the circle (as the paper's Fig. 2)
g_train = torch.tensor([-2.0, -0.6, 0.8, 2.2], dtype=torch.float64)
x_train = torch.stack([torch.cos(g_train), torch.sin(g_train)], 1)
y_train = torch.tensor([[-0.4], [0.3], [0.5], [-0.2]], dtype=torch.float64)
lr = 1.0


def ntk_rows(model):
    """Θ(x₀, ·) on the evaluation grid and Θ on the grid itself (for the distance to the limit)."""
    return empirical_ntk(model, x0, x_eval)[0], empirical_ntk(model, x_eval[::3])


limit_grid = net.kernel_fn(x_eval[::3], None, "ntk")


def train(model, steps):
    """Full-batch gradient descent on 0.5 · mean((f - y)²)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((model(x_train) - y_train) ** 2).mean()).backward()
        opt.step()
    return model


curves, stats = {}, {w: {"init": [], "moved": []} for w in SWEEP}
for width in sorted(set(SWEEP) | set(SHOWN)):
    for seed in range(SEEDS):
        model = net.module(2, width=width, seed=seed).double()
        row0, grid0 = ntk_rows(model)
        train(model, STEPS)
        row1, grid1 = ntk_rows(model)
        if width in SHOWN:
            curves.setdefault(width, []).append((row0, row1))
        if width in SWEEP:
            stats[width]["init"].append(float((grid0 - limit_grid).norm() / limit_grid.norm()))
            stats[width]["moved"].append(float((grid1 - grid0).norm() / grid0.norm()))

# %%
# The figure
# ----------
fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
ax = axes[0]
for i, width in enumerate(SHOWN):
    for j, (row0, row1) in enumerate(curves[width]):
        ax.plot(gamma, row0, color=f"C{i}", lw=1, alpha=0.8, label=f"width {width}, at init" if j == 0 else None)
        ax.plot(gamma, row1, "--", color=f"C{i}", lw=1, alpha=0.8, label=f"width {width}, trained" if j == 0 else None)
ax.plot(gamma, limit, "k", lw=2.5, label="infinite width (ntkit)")
ax.set(xlabel="angle γ between x₀ and x", ylabel="Θ(x₀, x)", title=f"NTK at init and after {STEPS} GD steps")
ax.legend(fontsize=8)

ax = axes[1]
w = np.array(SWEEP, dtype=float)
for key, label, color in (("init", "‖Θ_init − Θ_∞‖ / ‖Θ_∞‖", "C0"), ("moved", "‖Θ_trained − Θ_init‖ / ‖Θ_init‖", "C3")):
    m = np.array([np.mean(stats[s][key]) for s in SWEEP])
    sd = np.array([np.std(stats[s][key]) for s in SWEEP])
    ax.errorbar(w, m, yerr=sd, fmt="o-", color=color, capsize=3, label=label)
ref = np.array([np.mean(stats[s]["init"]) for s in SWEEP])
ax.plot(w, ref[0] * np.sqrt(w[0] / w), ":", color="0.4", label="∝ 1/√width")
ax.set(xscale="log", yscale="log", xlabel="width", ylabel="relative Frobenius distance", title="Convergence in width")
ax.set_xticks(w, [str(int(v)) for v in w])  # the widths themselves, not powers of ten
ax.xaxis.set_minor_locator(plt.NullLocator())
ax.legend(fontsize=8)
fig.tight_layout()
if args.save:
    fig.savefig(args.save, dpi=110)

for s in SWEEP:
    print(
        f"width {s:5d}: distance to the limit {np.mean(stats[s]['init']):.3f}, "
        f"change in training {np.mean(stats[s]['moved']):.4f}"
    )
torch.set_num_threads(THREADS)
plt.show()
