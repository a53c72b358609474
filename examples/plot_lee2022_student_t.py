"""
Lee et al. 2022: a scale mixture of NNGPs knows how uncertain it should be out of distribution
==============================================================================================

**The claim** (Lee, Yun, Kang, Kim, Kim & Lee 2022, "Scale mixtures of neural network Gaussian processes").
Putting an inverse-gamma prior on the variance of the last layer of an infinitely wide network turns its
NNGP into a Student-t process with a closed-form posterior. Its predictive variance is the GP's, rescaled by
how large the data turned out to be relative to the prior: far from the data, where the GP's variance
falls back to the prior's (whatever the scale of the targets), the Student-t's grows with the targets'
scale, and its heavier tails cover outliers. (For targets much smaller than the prior's scale the prior ``β``
dominates and the Student-t's variance levels off.) ``ntkit.predict.student_t_inference`` computes it.

**The figure.** A 1-d regression task (inputs embedded on a circle arc so that the FC NNGP is a function of
angle): noisy samples of a smooth function on ``[-1, 1]``, no data outside. Left and middle: the NNGP
posterior (``ntkit.predict.gp_inference``) and the Student-t posterior (prior ``InvGamma(2, 1)``) for targets of
scale 3, each with its ±2 standard-deviation band. Right: the predictive standard deviation far out of
distribution against the targets' scale: constant for the GP, proportional for the Student-t process.

Run ``python examples/plot_lee2022_student_t.py`` (a few seconds; ``--full`` uses more training points and
scales).
"""

# %%
import argparse

import matplotlib.pyplot as plt
import numpy as np
import torch

import ntkit
from ntkit import predict

parser = argparse.ArgumentParser(description="Lee et al. 2022: Student-t predictive variance out of distribution")
parser.add_argument("--full", action="store_true", help="more training points and target scales")
parser.add_argument("--save", default=None, help="also write the figure to this file")
args, _ = parser.parse_known_args()
N_TRAIN = 60 if args.full else 24
SCALES = np.geomspace(0.1, 30, 25 if args.full else 9)

gen = torch.Generator().manual_seed(0)
net = ntkit.serial(ntkit.Dense(1, W_std=1.5, b_std=0.2), ntkit.Relu(), ntkit.Dense(1, W_std=1.5, b_std=0.2))


def embed(s):
    """Scalar inputs to 2-d points on a circle arc (radius 2)."""
    return torch.stack([2 * torch.cos(s), 2 * torch.sin(s)], 1)


s_train = torch.rand(N_TRAIN, generator=gen, dtype=torch.float64) * 2 - 1
s_test = torch.linspace(-3, 3, 301, dtype=torch.float64)
clean = torch.sin(2.5 * s_train) + 0.5 * s_train
noise = 0.1 * torch.randn(N_TRAIN, generator=gen, dtype=torch.float64)
x_train, x_test = embed(s_train), embed(s_test)
k_dd = net.kernel_fn(x_train, None, "nngp")
k_td = net.kernel_fn(x_test, x_train, "nngp")
k_tt = net.kernel_fn(x_test, None, "nngp")
REG = 1e-2  # observation noise, relative to the mean of diag K


def posteriors(scale):
    y = (scale * (clean + noise))[:, None]
    gp = predict.gp_inference(k_dd, y, diag_reg=REG)("nngp", k_test_train=k_td, k_test_test=k_tt)
    st = predict.student_t_inference(k_dd, y, alpha=2.0, beta=1.0, diag_reg=REG)(k_td, k_tt)
    return y, gp, st


# %%
# Out-of-distribution standard deviation against the scale of the targets
# -------------------------------------------------------------------------
far = s_test.abs() >= 2.5
gp_sd, st_sd = [], []
for scale in SCALES:
    _, gp, st = posteriors(float(scale))
    gp_sd.append(float(gp.covariance.diagonal()[far].clamp(min=0).sqrt().mean()))
    st_sd.append(float(st.covariance.diagonal()[far].clamp(min=0).sqrt().mean()))
print(f"OOD std at scale {SCALES[0]:.2g}: GP {gp_sd[0]:.3g}, Student-t {st_sd[0]:.3g}")
print(f"OOD std at scale {SCALES[-1]:.2g}: GP {gp_sd[-1]:.3g}, Student-t {st_sd[-1]:.3g}")

# %%
# The figure: the posteriors for targets of scale 3, and the OOD standard deviation
# ---------------------------------------------------------------------------------
fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
y, gp, st = posteriors(3.0)
for ax, name, mean, var in (
    (axes[0], "NNGP posterior (gp_inference)", gp.mean[:, 0], gp.covariance.diagonal()),
    (axes[1], "Student-t posterior (student_t_inference)", st.mean[:, 0], st.covariance.diagonal()),
):
    sd = var.clamp(min=0).sqrt()
    ax.fill_between(s_test, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.25, label="±2 std")
    ax.plot(s_test, mean, "C0", label="mean")
    ax.plot(s_train, y[:, 0], "k.", label="training data (scale 3)")
    ax.axvspan(-1, 1, color="0.9", zorder=-1)
    ax.set(xlabel="input s (shaded: where the data is)", ylabel="f(s)", title=name, ylim=(-12, 12))
    ax.legend(fontsize=8, loc="lower right")
ax = axes[2]
ax.loglog(SCALES, gp_sd, "o-", label="NNGP")
ax.loglog(SCALES, st_sd, "s-", label="Student-t process")
ax.loglog(SCALES, SCALES * st_sd[-1] / SCALES[-1], ":", color="0.4", label="∝ scale")
ax.set(xlabel="scale of the targets", ylabel="predictive std at |s| ≥ 2.5", title="Out of distribution")
ax.legend(fontsize=8)
fig.tight_layout()
if args.save:
    fig.savefig(args.save, dpi=110)
plt.show()
