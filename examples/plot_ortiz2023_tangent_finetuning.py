"""
Ortiz-Jiménez et al. 2023: fine-tuning in the tangent space makes task vectors add up
=====================================================================================

**The claim** (Ortiz-Jiménez, Favero & Frossard 2023, "Task arithmetic in the tangent space: improved editing
of pre-trained models"). Fine-tuning a pre-trained model on a task moves its weights by a *task vector*
``τ = θ_task − θ₀``; adding several task vectors to ``θ₀`` should give one model that does all the tasks
("task arithmetic"), but for ordinary (non-linear) fine-tuning the tasks interfere. Fine-tuning the
*linearised* model ``f(θ₀) + J(θ₀)(θ − θ₀)`` instead, in the tangent space, makes the task vectors'
effects add (weight disentanglement), so the merged model keeps more of each task's accuracy, at some cost
in single-task accuracy.

**The figure.** A small torch MLP on scikit-learn's digits, pre-trained on another task (is the digit ≥ 5,
from noisy, masked images, with its own head), then fine-tuned end to end on two tasks: digits 0-4 (its first
five logits) and digits 5-9 (the last five), either normally or in its tangent space with
``ntkit.empirical.linearize(model)`` (a trainable module whose parameters start at ``θ₀``). Left: each task's
test accuracy for ``θ₀`` and both fine-tunings. Right: the merged model ``θ₀ + α (τ₁ + τ₂)``, its accuracy on
each task relative to the task's own fine-tuned model, averaged over the two tasks, against the scaling ``α``.

Run ``python examples/plot_ortiz2023_tangent_finetuning.py`` (about 20 s) or with ``--full`` (wider net,
longer fine-tuning, three seeds).
"""

# %%
import argparse

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from ntkit import datasets
from ntkit.empirical import linearize

parser = argparse.ArgumentParser(description="Ortiz-Jiménez et al. 2023: tangent-space fine-tuning")
parser.add_argument("--full", action="store_true", help="wider net, longer fine-tuning, three seeds")
parser.add_argument("--save", default=None, help="also write the figure to this file")
args, _ = parser.parse_known_args()
WIDTH, STEPS, SEEDS = (512, 400, 3) if args.full else (128, 150, 1)
ALPHAS = np.linspace(0.2, 1.6, 15)
THREADS = torch.get_num_threads()
torch.set_num_threads(1)  # small matrices: one thread is ~10x faster than two competing ones (restored below)

x, y = datasets.load_digits()
x = x.double()
x = (x - x.mean(0)) / (x.std(0) + 1e-3)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
x, y = x[perm], y[perm]
x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
TASKS = {"digits 0-4": [0, 1, 2, 3, 4], "digits 5-9": [5, 6, 7, 8, 9]}


def task_data(classes, xs, ys):
    keep = torch.isin(ys, torch.tensor(classes))
    return xs[keep], ys[keep] - classes[0]


def accuracy(model, classes):
    xs, ys = task_data(classes, x_test, y_test)
    with torch.no_grad():
        return float((model(xs)[:, classes].argmax(1) == ys).double().mean())


def fit(model, classes, steps, lr=3e-3):
    """Adam on the cross-entropy of the task's own logits (full batch)."""
    xs, ys = task_data(classes, x_train, y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs)[:, classes], ys).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def with_params(model, values):
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)
    return model


results = []
for seed in range(SEEDS):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(64, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU()).double()
    # pre-training, on another task: "is the digit ≥ 5?" from corrupted images (noise, half the pixels masked),
    # with its own two-way head; the ten-way head of the fine-tuning tasks stays at its random initialisation
    aux = nn.Linear(WIDTH, 2).double()
    opt = torch.optim.Adam([*backbone.parameters(), *aux.parameters()], lr=1e-3)
    for _ in range(200):
        corrupt = (x_train + 1.5 * torch.randn_like(x_train)) * (torch.rand_like(x_train) > 0.5)
        opt.zero_grad()
        nn.functional.cross_entropy(aux(backbone(corrupt)), (y_train >= 5).long()).backward()
        opt.step()
    model = nn.Sequential(backbone, nn.Linear(WIDTH, 10).double())
    theta0 = [p.detach().clone() for p in model.parameters()]

    res = {"θ₀": {t: accuracy(model, c) for t, c in TASKS.items()}}
    for mode in ("non-linear", "tangent space"):
        taus, single = [], {}
        for t, classes in TASKS.items():
            m = with_params(model, theta0) if mode == "non-linear" else linearize(with_params(model, theta0))
            theta = fit(m, classes, STEPS)
            single[t] = accuracy(m, classes)
            taus.append([a - b for a, b in zip(theta, theta0)])
        res[mode] = single
        curve = []
        for alpha in ALPHAS:
            merged = [p0 + alpha * (a + b) for p0, a, b in zip(theta0, *taus)]
            m = (
                with_params(model, merged)
                if mode == "non-linear"
                else with_params(linearize(with_params(model, theta0)), merged)
            )
            curve.append(np.mean([accuracy(m, c) / single[t] for t, c in TASKS.items()]))
        res[mode + " merged"] = curve
    results.append(res)
torch.set_num_threads(THREADS)

# %%
# The figure
# ----------
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
ax = axes[0]
names = ["θ₀", "non-linear", "tangent space"]
for i, name in enumerate(names):
    vals = [100 * np.mean([r[name][t] for r in results]) for t in TASKS]
    ax.bar(np.arange(len(TASKS)) + (i - 1) * 0.27, vals, 0.27, label=name if i else "pre-trained θ₀", color=f"C{i}")
    for j, v in enumerate(vals):
        ax.text(j + (i - 1) * 0.27, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
ax.set(xticks=range(len(TASKS)), xticklabels=list(TASKS), ylabel="test accuracy (%)", ylim=(0, 105))
ax.set_title("Single-task accuracy after fine-tuning")
ax.legend(fontsize=8, loc="lower right")

ax = axes[1]
for i, mode in enumerate(("non-linear", "tangent space")):
    curve = 100 * np.mean([r[mode + " merged"] for r in results], axis=0)
    ax.plot(ALPHAS, curve, "o-", color=f"C{i + 1}", label=f"{mode}: best {curve.max():.1f} %")
ax.set(
    xlabel="scaling α of the summed task vectors",
    ylabel="normalised accuracy of θ₀ + α(τ₁ + τ₂) (%)",
    title="Task addition",
)
ax.legend(fontsize=8)
fig.tight_layout()
if args.save:
    fig.savefig(args.save, dpi=110)
for mode in ("non-linear", "tangent space"):
    best = 100 * np.mean([r[mode + " merged"] for r in results], axis=0).max()
    print(f"{mode}: single-task {[round(100 * results[0][mode][t], 1) for t in TASKS]}, merged (best α) {best:.1f} %")
plt.show()
