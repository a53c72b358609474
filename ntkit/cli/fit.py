"""``ntkit fit``: infinite-width kernels against the finite network they describe, on one data set.

Steps (each timed): load and split the data; compute the NNGP and NTK of the architecture on train-train and
test-train pairs; fit kernel regression with each (``ntk-krr``, ``nngp-krr``: the infinitely wide network
trained to convergence on centred one-hot targets, Arora et al. 2019) and an SVM on the NTK (``ntk-svm``, C by
3-fold cross-validation on the training set); train the finite twin by gradient descent on the same MSE loss with
the whole training set as the batch (``finite-sgd``) and compare its train-loss curve and test outputs with
what the NTK predicts for it
(:func:`ntkit.predict.gradient_descent_mse` from the network's own initial outputs); a learning curve from
nested subsets of the training kernel. Writes ``results.json``, ``details.json`` and PNG figures.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from ntkit import datasets, plots
from ntkit.cli.archs import ArchError, resolve_arch
from ntkit.integrations.estimators import compute_kernels
from ntkit.predict import gp_inference, gradient_descent_mse, max_learning_rate

__all__ = ["FitOptions", "run_fit", "split_dataset", "machine_info"]

DEFAULT_MAX_TRAIN = 5000
DEFAULT_MAX_TEST = 2000
SVM_C_GRID = (0.1, 1.0, 10.0, 100.0)


@dataclass
class FitOptions:
    data: str = "digits"
    arch: str = "fc3"
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    dtype: str = "float64"
    device: str = "cpu"
    out: Path = Path("runs/fit")
    seed: int = 0
    width: int = 512
    steps: int = 500
    diag_reg: float = 0.0
    finite: bool = True
    figures: bool = True
    progress: bool = True


class Step(Protocol):
    """Progress reporting: ``start(name, total)`` returns ``advance(k=1)``; ``done()`` closes the step."""

    show_tiles: bool

    def start(self, name: str, total: Optional[int]) -> Callable[..., None]: ...

    def done(self) -> None: ...

    def log(self, msg: str) -> None: ...


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _subsample(x, y, n: Optional[int], cap: int, gen: torch.Generator):
    limit = min(len(x), cap) if n is None else n
    if limit > len(x):
        raise ValueError(f"asked for {limit} samples but the split has only {len(x)}; lower --n-train/--n-test.")
    if limit < 2:
        raise ValueError(f"need at least 2 samples per split, got {limit}.")
    if limit == len(x):
        return x, y
    idx = torch.randperm(len(x), generator=gen)[:limit]
    return x[idx], y[idx]


def split_dataset(ds: datasets.Dataset, n_train: Optional[int], n_test: Optional[int], seed: int):
    """Train/test tensors: the source's own split when it has one, else a stratified 75/25 split; each side
    subsampled at random to ``n_train``/``n_test`` (default: at most 5000 / 2000)."""
    gen = torch.Generator().manual_seed(seed)
    if ds.x_test is not None:
        xtr, ytr, xte, yte = ds.x, ds.y, ds.x_test, ds.y_test
    else:
        from sklearn.model_selection import train_test_split

        y = ds.y.numpy()
        counts = np.bincount(y)
        strat = y if counts[counts > 0].min() >= 2 else None
        itr, ite = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=strat)
        xtr, ytr, xte, yte = ds.x[itr], ds.y[itr], ds.x[ite], ds.y[ite]
    xtr, ytr = _subsample(xtr, ytr, n_train, DEFAULT_MAX_TRAIN, gen)
    xte, yte = _subsample(xte, yte, n_test, DEFAULT_MAX_TEST, gen)
    return xtr, ytr, xte, yte


def _one_hot(y: torch.Tensor, k: int) -> torch.Tensor:
    """Centred one-hot targets (Arora et al. 2019): ``1 - 1/K`` for the class, ``-1/K`` elsewhere."""
    return torch.nn.functional.one_hot(y, k).to(torch.float64) - 1.0 / k


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(-1).cpu() == y.cpu()).double().mean())


def _condition(ev: torch.Tensor) -> float:
    ev = ev.double()
    lo = float(ev.min())
    return float("inf") if lo <= 0 else float(ev.max()) / lo


def _prepare(opts: FitOptions, log):
    ds = datasets.load(opts.data)
    n_classes = ds.n_classes
    if n_classes < 2:
        raise datasets.DataError(f"{opts.data} has a single class; classification needs at least two.")
    arch = resolve_arch(opts.arch, n_classes)
    if arch.images and ds.image_shape is None:
        raise ArchError(
            f"--arch {opts.arch} is convolutional and needs image data (digits, mnist, "
            f"fashion-mnist, cifar10:<dir>, or an npz with image-shaped x); {opts.data} is a table."
        )
    xtr, ytr, xte, yte = split_dataset(ds, opts.n_train, opts.n_test, opts.seed)
    if ds.image_shape is None:  # tables: standardise with the training statistics
        mu, sd = xtr.mean(0), xtr.std(0)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    if arch.images:
        assert ds.image_shape is not None, "image architectures were refused above for table data"
        xtr, xte = xtr.reshape(len(xtr), *ds.image_shape), xte.reshape(len(xte), *ds.image_shape)
    log(
        f"data {ds.name}: {len(xtr)} train / {len(xte)} test, {n_classes} classes, "
        f"input {tuple(xtr.shape[1:])}; arch {arch.name}"
    )
    return ds, arch, n_classes, xtr, ytr, xte, yte


def run_fit(opts: FitOptions, step: Step) -> dict[str, Any]:
    """Run the whole job; returns ``{"rows": [...], "details": {...}}`` and writes the report folder."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    tick = step.start("loading data", None)
    ds, arch, K, xtr, ytr, xte, yte = _prepare(opts, step.log)
    tick(1)
    step.done()
    dev = torch.device(opts.device)
    Y = _one_hot(ytr, K).to(dev)
    details: dict[str, Any] = {
        "options": {k: str(v) for k, v in asdict(opts).items()},
        "machine": machine_info(),
        "n_train": len(xtr),
        "n_test": len(xte),
        "n_classes": K,
        "arch": repr(arch.net),
    }

    # -- kernels --------------------------------------------------------------------------------------------
    step.log("computing NNGP and NTK (train-train, test-train)")
    t0 = time.perf_counter()
    kd = compute_kernels(arch.net, xtr, None, ("nngp", "ntk"), opts.dtype, dev, progress=step.show_tiles)
    kt = compute_kernels(arch.net, xte, xtr, ("nngp", "ntk"), opts.dtype, dev, progress=step.show_tiles)
    t_kernel = time.perf_counter() - t0
    details["kernel_seconds"] = t_kernel

    rows: list[dict[str, Any]] = []
    spectra: dict[str, np.ndarray] = {}
    tick = step.start("kernel regression (NTK, NNGP)", 2)
    for g in ("ntk", "nngp"):
        t0 = time.perf_counter()
        mean = gp_inference(kd[g], Y, diag_reg=opts.diag_reg)(g, kt[g])
        seconds = time.perf_counter() - t0
        ev = torch.linalg.eigvalsh(kd[g].double())  # spectrum and condition number of the kernel itself
        spectra[g] = ev.cpu().numpy()
        rows.append(
            {
                "model": f"{g}-krr",
                "accuracy": _accuracy(mean, yte),
                "seconds": t_kernel + seconds,
                "kernel_seconds": t_kernel,
                "condition_number": _condition(ev),
            }
        )
        tick(1)
    step.done()

    # -- NTK-SVM ----------------------------------------------------------------------------------------------
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import SVC

    tick = step.start("NTK-SVM (C by 3-fold CV)", 1)
    t0 = time.perf_counter()
    ktr_np, kte_np = kd["ntk"].double().cpu().numpy(), kt["ntk"].double().cpu().numpy()
    counts = np.bincount(ytr.numpy())
    folds = int(min(3, counts[counts > 0].min()))
    if folds >= 2:
        svm = GridSearchCV(
            SVC(kernel="precomputed"),
            {"C": list(SVM_C_GRID)},
            cv=StratifiedKFold(folds, shuffle=True, random_state=opts.seed),
        ).fit(ktr_np, ytr.numpy())
        best_c = svm.best_params_["C"]
    else:
        svm, best_c = SVC(kernel="precomputed", C=1.0).fit(ktr_np, ytr.numpy()), 1.0
    acc = float((svm.predict(kte_np) == yte.numpy()).mean())
    rows.append(
        {
            "model": "ntk-svm",
            "accuracy": acc,
            "seconds": t_kernel + time.perf_counter() - t0,
            "kernel_seconds": t_kernel,
            "condition_number": rows[0]["condition_number"],
            "C": best_c,
        }
    )
    tick(1)
    step.done()

    # -- the finite twin ----------------------------------------------------------------------------------------
    figures = {}
    if opts.finite:
        rows.append(_train_finite(opts, arch, xtr, Y, xte, yte, kd, kt, step, details, dev))
    # -- learning curve -------------------------------------------------------------------------------------------
    ns, curve = _learning_curve(kd, kt, Y, yte, opts, step)
    details["learning_curve"] = {"n": ns, **curve}
    details["rows"] = rows

    if opts.figures:
        tick = step.start("figures", 4)
        title = f"{ds.name}, {arch.name}"
        figures["spectrum"] = plots.plot_spectrum(spectra, out / "spectrum.png", f"Kernel spectrum ({title})")
        tick(1)
        if opts.finite:
            fc = details["finite"]
            figures["loss_curve"] = plots.plot_loss_curve(
                np.arange(len(fc["loss"])),
                fc["loss"],
                np.asarray(fc["t_pred"]),
                fc["loss_pred"],
                out / "loss_curve.png",
                f"Train loss ({title}, width {opts.width})",
            )
            tick(1)
            figures["finite_vs_infinite"] = plots.plot_finite_vs_infinite(
                fc.pop("_pred_test"),
                fc.pop("_actual_test"),
                out / "finite_vs_infinite.png",
                f"Test outputs after {opts.steps} steps ({title})",
            )
            tick(1)
        figures["learning_curve"] = plots.plot_learning_curve(
            ns, curve, out / "learning_curve.png", f"Learning curve ({title})"
        )
        tick(1)
        step.done()
    details.get("finite", {}).pop("_pred_test", None)
    details.get("finite", {}).pop("_actual_test", None)
    details["figures"] = {k: str(v) for k, v in figures.items()}
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=2, default=float) + "\n")
    return {"rows": rows, "details": details, "out": out}


def _train_finite(opts, arch, xtr, Y, xte, yte, kd, kt, step: Step, details, dev) -> dict[str, Any]:
    """Full-batch gradient descent ``θ ← θ - η ∇L`` on ``L = ||f - Y||² / (2 N)`` (``N = Y.numel()``, the
    normalisation under which :func:`ntkit.predict.gradient_descent_mse` measures time in steps)."""
    t0 = time.perf_counter()
    net_mod = arch.net.module(tuple(xtr.shape[1:]), width=opts.width, seed=opts.seed).to(dev)
    x_tr, x_te = xtr.to(dev, torch.float32), xte.to(dev, torch.float32)
    y32 = Y.to(torch.float32)
    lr = 0.5 * max_learning_rate(kd["ntk"], Y.numel())
    params = [p for p in net_mod.parameters() if p.requires_grad]
    with torch.no_grad():
        f0_tr, f0_te = net_mod(x_tr).double(), net_mod(x_te).double()
    losses = []
    tick = step.start(f"finite twin: {opts.steps} GD steps (width {opts.width})", opts.steps)
    for _ in range(opts.steps):
        loss = 0.5 * ((net_mod(x_tr) - y32) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=lr)
        losses.append(float(loss.detach()))
        tick(1)
    step.done()
    with torch.no_grad():
        f_te = net_mod(x_te).double()
        losses.append(float(0.5 * ((net_mod(x_tr) - y32) ** 2).mean()))
    seconds = time.perf_counter() - t0
    # what the NTK predicts for this very network (its own initial outputs), at every step
    pred = gradient_descent_mse(kd["ntk"], Y, learning_rate=lr)
    ts = np.unique(np.round(np.geomspace(1, opts.steps, 60)).astype(int))
    ts = np.concatenate([[0], ts]).astype(np.float64)
    tr_t = pred(torch.as_tensor(ts), f0_tr, None)
    loss_pred = (0.5 * ((tr_t - Y) ** 2).mean(dim=(-2, -1))).cpu().numpy()
    _, te_T = pred(float(opts.steps), f0_tr, f0_te, kt["ntk"])
    rel = float(torch.linalg.norm(f_te - te_T) / torch.linalg.norm(te_T))
    details["finite"] = {
        "width": opts.width,
        "steps": opts.steps,
        "learning_rate": lr,
        "loss": losses,
        "t_pred": ts.tolist(),
        "loss_pred": loss_pred.tolist(),
        "ntk_predicted_accuracy": _accuracy(te_T, yte),
        "output_rel_error": rel,
        "_pred_test": te_T.cpu().numpy(),
        "_actual_test": f_te.cpu().numpy(),
    }
    return {
        "model": "finite-sgd",
        "accuracy": _accuracy(f_te, yte),
        "seconds": seconds,
        "kernel_seconds": 0.0,
        "condition_number": None,
        "width": opts.width,
        "steps": opts.steps,
        "ntk_predicted_accuracy": _accuracy(te_T, yte),
        "output_rel_error_vs_ntk": rel,
    }


def _learning_curve(kd, kt, Y, yte, opts: FitOptions, step: Step):
    """Accuracy of NTK / NNGP regression on nested random subsets of the training set (kernels reused)."""
    n = Y.shape[0]
    lo = min(n, 10 * Y.shape[1])
    ns = sorted({int(v) for v in np.geomspace(lo, n, 8)})
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed + 1)).to(Y.device)
    curve: dict[str, list[float]] = {"ntk-krr": [], "nngp-krr": []}
    tick = step.start("learning curve", len(ns))
    for m in ns:
        idx = perm[:m]
        for g in ("ntk", "nngp"):
            k = kd[g][idx][:, idx]
            mean = gp_inference(k, Y[idx], diag_reg=opts.diag_reg)(g, kt[g][:, idx])
            curve[f"{g}-krr"].append(_accuracy(mean, yte))
        tick(1)
    step.done()
    return ns, curve
