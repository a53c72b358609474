"""
Chen et al. 2021: the NTK-SVM is the wide network trained on the hinge loss
===========================================================================

**The claim** (Chen, Huang, Nguyen & Weng 2021, "On the equivalence between neural network and support vector
machine"). A network trained by (sub)gradient descent on the soft-margin loss
``λ/2 ‖θ − θ₀‖² + Σᵢ max(0, 1 − yᵢ g(xᵢ))``, with ``g = f(·; θ) − f(·; θ₀)`` (the output's change from
initialisation), converges as its width grows to the support vector machine with the network's NTK as kernel
and ``C = 1/λ``: in the tangent features ``∇_θ f``, ``‖θ − θ₀‖`` is the SVM's RKHS norm. The infinite-width
SVM is ``ntkit.integrations.estimators.NTKSVC``.

**The figure.** Two interleaved half-moons (40 points). Left: the decision boundary of finite networks of
two widths trained by gradient descent on the regularised hinge loss (with an unregularised scalar offset,
the SVM's intercept), and the boundary of ``NTKSVC(net, C=1/λ)``. Right: the trained networks' outputs
against the SVM's decision function on a grid of points. The boundaries agree where the data is; the
outputs lie along the diagonal, the wider net closer (at the small size the largest gap on the grid is about
12 % of the SVM's range for width 2048 and 15 % for width 256, growing with the size of the output, away
from the boundary: the nets are trained for a few thousand subgradient steps, and with a near-hard margin,
``C = 10``, small differences between a finite net's kernel and the limit move the solution visibly).

Run ``python examples/plot_chen2021_svm.py`` (widths 256 and 2048, about 30 s) or with ``--full`` (widths up to
16 384 and longer training).
"""

# %%
import argparse

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import make_moons

import ntkit
from ntkit.integrations.estimators import NTKSVC

parser = argparse.ArgumentParser(description="Chen et al. 2021: NTK-SVM vs the wide net on the hinge loss")
parser.add_argument("--full", action="store_true", help="wider nets, longer training")
parser.add_argument("--save", default=None, help="also write the figure to this file")
args, _ = parser.parse_known_args()
WIDTHS, STEPS = ((256, 2048, 16384), 12000) if args.full else ((256, 2048), 3000)
LAM = 0.1  # the network's weight-decay towards θ₀; the SVM's C = 1/λ
THREADS = torch.get_num_threads()
torch.set_num_threads(1)  # small matrices: one thread is ~10x faster than two competing ones (restored below)

x_np, y_np = make_moons(40, noise=0.15, random_state=0)
x_np = (x_np - x_np.mean(0)) / x_np.std(0)
x = torch.from_numpy(x_np)
y = torch.from_numpy(2.0 * y_np - 1.0)[:, None]  # labels ±1
grid_1d = np.linspace(-2.5, 2.5, 60)
gx, gy = np.meshgrid(grid_1d, grid_1d)
grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1))

net = ntkit.serial(ntkit.Dense(1, W_std=1.5, b_std=0.5), ntkit.Relu(), ntkit.Dense(1, W_std=1.5, b_std=0.5))

# %%
# The infinite-width SVM
# ----------------------
svm = NTKSVC(net=net, C=1.0 / LAM).fit(x_np, y_np)
svm_grid = svm.decision_function(grid.numpy())
print(f"NTK-SVM: {svm.svc_.n_support_.sum()} support vectors, train accuracy {svm.score(x_np, y_np):.3f}")


# %%
# Finite networks trained on the regularised hinge loss
# -----------------------------------------------------
def train(width):
    model = net.module(2, width=width, seed=0).double()
    params = list(model.parameters())
    theta0 = [p.detach().clone() for p in params]
    with torch.no_grad():
        f0_train, f0_grid = model(x), model(grid)
    offset = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    lr0 = 0.5 / len(x)
    for step in range(STEPS):
        lr = lr0 * min(1.0, 2.0 * (1 - step / STEPS) + 0.05)  # constant, then annealed (subgradient steps)
        g = model(x) - f0_train + offset
        loss = torch.clamp(1 - y * g, min=0).sum() + 0.5 * LAM * sum(
            ((p - p0) ** 2).sum() for p, p0 in zip(params, theta0)
        )
        grads = torch.autograd.grad(loss, [*params, offset])
        with torch.no_grad():
            for p, gr in zip([*params, offset], grads):
                p -= lr * gr
    with torch.no_grad():
        return (model(grid) - f0_grid + offset)[:, 0].numpy()


nets = {w: train(w) for w in WIDTHS}

fig, axes = plt.subplots(1, 2, figsize=(12, 5))
ax = axes[0]
ax.contourf(gx, gy, svm_grid.reshape(gx.shape), levels=[-100, 0, 100], colors=["#f4d6d6", "#d6e4f4"], alpha=0.8)
ax.contour(gx, gy, svm_grid.reshape(gx.shape), levels=[0], colors="k", linewidths=2.5)
ax.plot([], [], "k", lw=2.5, label="NTK-SVM (infinite width)")
for i, w in enumerate(WIDTHS):
    ax.contour(gx, gy, nets[w].reshape(gx.shape), levels=[0], colors=f"C{i + 1}", linestyles="--", linewidths=1.8)
    ax.plot([], [], "--", color=f"C{i + 1}", label=f"network, width {w}")
ax.scatter(x_np[:, 0], x_np[:, 1], c=y_np, cmap="coolwarm", edgecolors="k", s=30)
ax.set(xlabel="x₁", ylabel="x₂", title="Decision boundaries")
ax.legend(fontsize=8, loc="lower left")

ax = axes[1]
lim = float(np.abs(svm_grid).max())
ax.plot([-lim, lim], [-lim, lim], "k", lw=1)
for i, w in enumerate(WIDTHS):
    gap = np.abs(nets[w] - svm_grid).max() / np.abs(svm_grid).max()
    ax.plot(svm_grid, nets[w], ".", ms=2, color=f"C{i + 1}", label=f"width {w}: max gap {gap:.1%} of the range")
    print(f"width {w}: largest |network − SVM| on the grid = {gap:.1%} of max |SVM|")
ax.set(xlabel="NTK-SVM decision function", ylabel="trained network g(x) + offset", title="Outputs on the grid")
ax.legend(fontsize=8, markerscale=5)
fig.tight_layout()
if args.save:
    fig.savefig(args.save, dpi=110)
torch.set_num_threads(THREADS)
plt.show()
