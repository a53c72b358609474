"""Figures for the ``ntkit fit`` report (matplotlib, written as PNG files).

Each function takes plain arrays (already computed), draws one figure, saves it to ``path`` and returns the
path. Nothing here computes kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["plot_spectrum", "plot_loss_curve", "plot_finite_vs_infinite", "plot_learning_curve"]

PathLike = Union[str, Path]
_COLORS = {"ntk": "C0", "nngp": "C1", "finite": "C3"}


def _figure(figsize: tuple[float, float]):
    """A matplotlib ``Figure`` with one axes, drawn by the Agg canvas of the figure itself: no pyplot, so the
    process-wide backend and pyplot's figure list are left as the user has them."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "figures need matplotlib; install it with `pip install matplotlib` (or `pip install 'ntkit[cli]'`)."
        ) from None
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)  # a Figure without a canvas gets Agg's for .png
    return path


def plot_spectrum(eigenvalues: Mapping[str, np.ndarray], path: PathLike, title: str = "") -> Path:
    """Eigenvalues of train-train kernels, largest first, on log-log axes.

    Under gradient flow the residual along eigenvector ``i`` decays as ``exp(-η λ_i t / N)``, so this is also
    the spectrum of learning speeds.
    """
    fig, ax = _figure((5.5, 4))
    for name, ev in eigenvalues.items():
        ev = np.sort(np.asarray(ev, dtype=np.float64))[::-1]
        pos = ev[ev > 0]
        ax.loglog(
            np.arange(1, len(pos) + 1),
            pos,
            label=f"{name.upper()}  (cond {pos[0] / pos[-1]:.2g})",
            color=_COLORS.get(name),
        )
    ax.set_xlabel("eigenvalue index i")
    ax.set_ylabel("eigenvalue λ_i of K(X_train, X_train)")
    ax.set_title(title or "Kernel spectrum")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_loss_curve(
    steps: np.ndarray, actual: np.ndarray, t_pred: np.ndarray, predicted: np.ndarray, path: PathLike, title: str = ""
) -> Path:
    """Train loss of the finite network under gradient descent vs the NTK prediction at the same times."""
    fig, ax = _figure((5.5, 4))
    ax.plot(np.asarray(steps) + 1, actual, color=_COLORS["finite"], lw=2, label="finite network (actual)")
    ax.plot(
        np.asarray(t_pred) + 1, predicted, color=_COLORS["ntk"], ls="--", lw=2, label="infinite width, NTK (predicted)"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gradient-descent step t + 1")
    ax.set_ylabel("train loss  ||f - y||² / (2 N)")
    ax.set_title(title or "Train loss: prediction vs reality")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_finite_vs_infinite(predicted: np.ndarray, actual: np.ndarray, path: PathLike, title: str = "") -> Path:
    """Scatter of test outputs: finite trained network (y) against the infinite-width prediction (x)."""
    p = np.asarray(predicted, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    corr = float(np.corrcoef(p, a)[0, 1]) if p.size > 1 else float("nan")
    rel = float(np.linalg.norm(a - p) / max(np.linalg.norm(p), 1e-300))
    fig, ax = _figure((4.8, 4.5))
    ax.scatter(p, a, s=3, alpha=0.3, color=_COLORS["finite"], rasterized=True)
    lo, hi = float(min(p.min(), a.min())), float(max(p.max(), a.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=1)
    ax.set_xlabel("infinite-width prediction (NTK)")
    ax.set_ylabel("finite network output")
    ax.set_title(title or "Test outputs: finite vs infinite width")
    ax.text(
        0.03,
        0.97,
        f"corr {corr:.3f}\nrel. error {rel:.3f}",
        transform=ax.transAxes,
        va="top",
        bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"),
    )
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_learning_curve(
    ns: Sequence[int], accuracies: Mapping[str, Sequence[float]], path: PathLike, title: str = ""
) -> Path:
    """Test accuracy against the number of training samples, one line per model."""
    fig, ax = _figure((5.5, 4))
    for name, acc in accuracies.items():
        key = name.split("-")[0]
        ax.plot(ns, 100 * np.asarray(acc), marker="o", label=name, color=_COLORS.get(key))
    ax.set_xscale("log")
    ax.set_xlabel("training samples n")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Learning curve")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)
