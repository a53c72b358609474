"""
Zandieh et al. 2021: random features of the NTK, error against feature count
============================================================================

**The claim** (Zandieh, Han, Avron, Shoham, Kim & Shin 2021, "Scaling neural tangent kernels via sketching and
random features"). The NNGP and NTK of a fully-connected ReLU net can be approximated by explicit random
features ``Φ`` with ``Φ Φᵀ ≈ K``, so kernel regression costs ``O(n D²)`` instead of ``O(n³)``; the
approximation error falls as ``1/√D`` in the number of features ``D``, and a few thousand features are enough
for the regression to match the exact kernel's.

**The figure.** Left: the relative error ``‖Φ Φᵀ − K‖_F / ‖K‖_F`` of ``ntkit.random_features`` against the
feature dimension, for the NNGP and the NTK of a two-hidden-layer ReLU net on digits (scikit-learn's 8×8
images), averaged over seeds, with the ``1/√D`` slope. Right: test accuracy of ridge regression on the random
features against ``D``, and of the exact kernels (dashed, dotted; here they coincide).

Run ``python examples/plot_zandieh2021_random_features.py`` (500 training images, up to 2048 random
features per layer, about 30 s) or with ``--full`` (all 1797 digits in a 1200/597 split, up to 16 384 features).
"""

# %%
import argparse

import matplotlib.pyplot as plt
import numpy as np
import torch

import ntkit
from ntkit import datasets, predict
from ntkit.random_features import RandomFeatures

parser = argparse.ArgumentParser(description="Zandieh et al. 2021: random-feature error vs feature count")
parser.add_argument("--full", action="store_true", help="all digits and up to 16384 features")
parser.add_argument("--save", default=None, help="also write the figure to this file")
args, _ = parser.parse_known_args()
N_TRAIN, N_TEST = (1200, 597) if args.full else (500, 300)
FEATURES = [2**k for k in range(6, 15 if args.full else 12)]
SEEDS = 3 if args.full else 2

x, y = datasets.load_digits()
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
x, y = x[perm].double(), y[perm]
x = (x - x.mean(0)) / (x.std(0) + 1e-3)  # standardised pixels
x_train, y_train, x_test, y_test = (
    x[:N_TRAIN],
    y[:N_TRAIN],
    x[N_TRAIN : N_TRAIN + N_TEST],
    y[N_TRAIN : N_TRAIN + N_TEST],
)
targets = torch.nn.functional.one_hot(y_train, 10).double() - 0.1

net = ntkit.serial(
    ntkit.Dense(1, W_std=1.4, b_std=0.1),
    ntkit.Relu(),
    ntkit.Dense(1, W_std=1.4, b_std=0.1),
    ntkit.Relu(),
    ntkit.Dense(1),
)
exact = net.kernel_fn(x_train, None)
k_test = net.kernel_fn(x_test, x_train)
RIDGE = 1e-2  # relative to the mean of diag K

# %%
# Kernel error and accuracy against the number of features
# --------------------------------------------------------
errors = {g: [] for g in ("nngp", "ntk")}
accuracy = {g: [] for g in ("nngp", "ntk")}
dims = {g: [] for g in ("nngp", "ntk")}
for get in ("nngp", "ntk"):
    k = getattr(exact, get)
    lam = RIDGE * float(k.diagonal().mean())
    for m in FEATURES:
        errs, accs = [], []
        for seed in range(SEEDS):
            rf = RandomFeatures(net, x.shape[1], num_features=m, get=get, seed=seed)
            phi, phi_test = rf(x_train), rf(x_test)
            k_hat = phi @ phi.T
            errs.append(float((k_hat - k).norm() / k.norm()))
            # ridge regression on the features, in its dual form (n < D here): (ΦΦᵀ + λI)⁻¹ y
            alpha = torch.linalg.solve(k_hat + lam * torch.eye(len(k_hat), dtype=k_hat.dtype), targets)
            accs.append(float(((phi_test @ (phi.T @ alpha)).argmax(1) == y_test).double().mean()))
        dims[get].append(rf.dim)
        errors[get].append(np.mean(errs))
        accuracy[get].append(np.mean(accs))

exact_acc = {}
for get in ("nngp", "ntk"):
    gp = predict.gp_inference(getattr(exact, get), targets, diag_reg=RIDGE)
    exact_acc[get] = float((gp(get, k_test_train=getattr(k_test, get)).argmax(1) == y_test).double().mean())

fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
ax = axes[0]
for i, get in enumerate(("nngp", "ntk")):
    ax.loglog(dims[get], errors[get], "o-", color=f"C{i}", label=get.upper())
d = np.array(dims["ntk"], dtype=float)
ax.loglog(d, errors["ntk"][0] * np.sqrt(d[0] / d), ":", color="0.4", label="∝ 1/√D")
ax.set(xlabel="feature dimension D", ylabel="‖ΦΦᵀ − K‖ / ‖K‖", title="Kernel approximation error")
ax.legend(fontsize=8)
ax = axes[1]
for i, get in enumerate(("nngp", "ntk")):
    ax.semilogx(dims[get], 100 * np.array(accuracy[get]), "o-", color=f"C{i}", label=f"{get.upper()} random features")
    ax.axhline(100 * exact_acc[get], ls=("--", ":")[i], color=f"C{i}", label=f"{get.upper()} exact kernel")
ax.set(xlabel="feature dimension D", ylabel="test accuracy (%)", title=f"Ridge regression, {N_TRAIN} digits")
ax.legend(fontsize=8)
fig.tight_layout()
if args.save:
    fig.savefig(args.save, dpi=110)
for get in ("nngp", "ntk"):
    print(f"{get}: error {errors[get][0]:.3f} at D={dims[get][0]} -> {errors[get][-1]:.3f} at D={dims[get][-1]}")
plt.show()
