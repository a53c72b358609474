"""``ntkit fit``: infinite-width kernels against the finite network they describe, on one data set.

Steps (each timed): load and split the data; compute the NNGP and NTK of the architecture on train-train and
test-train pairs; fit kernel regression with each (``ntk-krr``, ``nngp-krr``: the infinitely wide network
trained to convergence) and a support-vector model on the NTK (``ntk-svm`` for classification, ``ntk-svr`` for
regression; C by 3-fold cross-validation on the training set); train the finite twin by full-batch gradient
descent on the same MSE loss (``finite-gd``; called ``finite-sgd`` before 0.2, which it never was: every step
uses the whole training set) and compare its train-loss curve and test outputs with what the NTK predicts for it
(:func:`ntkit.predict.gradient_descent_mse` from the network's own initial outputs); a learning curve from
nested subsets of the training kernel. Writes ``results.json`` (``{"meta": ..., "rows": [...]}``: the rows and
what produced them — data set, task, architecture, seed, dtype, device, learning rate, ntkit and torch versions,
the command line), ``details.json`` and PNG figures.

Tasks: ``classification`` (centred one-hot targets, Arora et al. 2019; accuracy) or ``regression`` (targets
standardised with the training mean and deviation; RMSE, MAE and R² in the targets' own units). ``auto`` picks
regression for continuous targets: the ``diabetes`` set (scikit-learn's bundled diabetes progression data) and
CSV files whose label column holds non-integer numbers; classification otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from ntkit import datasets, plots
from ntkit._version import __version__
from ntkit.cli.archs import ArchError, resolve_arch
from ntkit.integrations.estimators import compute_kernels
from ntkit.predict import gp_inference, gradient_descent_mse, max_learning_rate

__all__ = ["FitOptions", "run_fit", "split_dataset", "machine_info", "load_task_data", "TASKS", "LR_FRACTION"]

TASKS = ("auto", "classification", "regression")
#: the default learning rate of the finite net: this fraction of the NTK's largest stable rate (2 N / λ_max)
LR_FRACTION = 0.5

DEFAULT_MAX_TRAIN = 5000
DEFAULT_MAX_TEST = 2000
SVM_C_GRID = (0.1, 1.0, 10.0, 100.0)


@dataclass
class FitOptions:
    """What ``ntkit fit`` runs (the command's options). ``lr=None``: :data:`LR_FRACTION` of the NTK's largest
    stable learning rate; ``task``: one of :data:`TASKS`; ``command``: the command line, recorded in the report."""

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
    lr: Optional[float] = None
    task: str = "auto"
    command: Optional[str] = None


class Step(Protocol):
    """Progress reporting: ``start(name, total)`` returns ``advance(k=1)``; ``done()`` closes the step."""

    show_tiles: bool

    def start(self, name: str, total: Optional[int]) -> Callable[..., None]: ...

    def done(self) -> None: ...

    def log(self, msg: str) -> None: ...


def machine_info() -> dict[str, Any]:
    """The machine a report was made on."""
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


def split_dataset(
    ds: datasets.Dataset, n_train: Optional[int], n_test: Optional[int], seed: int, stratify: bool = True
):
    """Train/test tensors: the source's own split when it has one, else a 75/25 split (stratified by class for
    classification); each side subsampled at random to ``n_train``/``n_test`` (default: at most 5000 / 2000)."""
    gen = torch.Generator().manual_seed(seed)
    if ds.x_test is not None:
        xtr, ytr, xte, yte = ds.x, ds.y, ds.x_test, ds.y_test
    else:
        from sklearn.model_selection import train_test_split

        strat = None
        if stratify:
            y = ds.y.numpy()
            counts = np.bincount(y)
            strat = y if counts[counts > 0].min() >= 2 else None
        itr, ite = train_test_split(np.arange(len(ds.y)), test_size=0.25, random_state=seed, stratify=strat)
        xtr, ytr, xte, yte = ds.x[itr], ds.y[itr], ds.x[ite], ds.y[ite]
    xtr, ytr = _subsample(xtr, ytr, n_train, DEFAULT_MAX_TRAIN, gen)
    xte, yte = _subsample(xte, yte, n_test, DEFAULT_MAX_TEST, gen)
    return xtr, ytr, xte, yte


# ---------------------------------------------------------------------------------------------------------------
# regression data (ntkit.datasets holds labelled classification sets; continuous targets are read here)
# ---------------------------------------------------------------------------------------------------------------
def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def _csv_rows(path: Path) -> list[list[str]]:
    """The rows of a CSV file without a header row (detected as :func:`ntkit.datasets.load_csv` does)."""
    if not path.is_file():
        raise datasets.DataError(f"CSV file {path} not found.")
    text = path.read_text()
    rows = [[f.strip() for f in r] for r in csv.reader(io.StringIO(text)) if r and any(f.strip() for f in r)]
    if len(rows) > 1:
        lc = len(rows[0]) - 1
        header = any(not _is_number(a) and _is_number(b) for j, (a, b) in enumerate(zip(rows[0], rows[1])) if j != lc)
        if header:
            rows = rows[1:]
    if not rows:
        raise datasets.DataError(f"{path} has no rows.")
    return rows


def _csv_regression(path: Path) -> datasets.Dataset:
    rows = _csv_rows(path)
    x, idx, values = datasets.table_to_arrays(rows, -1, str(path))
    if not all(_is_number(v) for v in values):
        bad = next(v for v in values if not _is_number(v))
        raise datasets.DataError(
            f"{path}: the label column holds {bad!r}, not a number; regression needs numeric targets "
            f"(use --task classification for class labels)."
        )
    y = np.asarray([float(values[i]) for i in idx])
    return datasets.Dataset(path.stem, torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y))


def _diabetes() -> datasets.Dataset:
    try:
        from sklearn.datasets import load_diabetes
    except ImportError:
        raise ImportError(
            "the diabetes data ships with scikit-learn; install it with `pip install scikit-learn`."
        ) from None
    d = load_diabetes()
    x = torch.from_numpy(np.ascontiguousarray(d.data, dtype=np.float32))
    return datasets.Dataset("diabetes", x, torch.from_numpy(np.asarray(d.target, dtype=np.float64)))


def load_task_data(spec: str, task: str) -> tuple[datasets.Dataset, str, str]:
    """The data set of a ``--data`` string, the task to run on it and why: ``(dataset, task, reason)``.

    ``diabetes`` (scikit-learn's bundled regression set) and, for ``--task regression`` or ``auto``, CSV files
    with numeric targets are read here (``y`` float); every other source through :func:`ntkit.datasets.load`
    (integer class labels). ``auto`` means regression for ``diabetes`` and for CSV targets with non-integer
    values, classification otherwise; ``regression`` on a classification source regresses on the label values.
    """
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}.")
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "diabetes" and not arg:
        if task == "classification":
            raise datasets.DataError(
                "diabetes has continuous targets (disease progression), not classes; use --task regression (or auto)."
            )
        return _diabetes(), "regression", "diabetes has continuous targets"
    if kind == "csv" and arg and task != "classification":
        path = Path(arg).expanduser()
        labels = [r[-1] for r in _csv_rows(path)]
        numeric = all(_is_number(v) for v in labels)
        fractional = numeric and any(not float(v).is_integer() for v in labels)
        if task == "regression" or fractional:
            why = "--task regression" if task == "regression" else "the label column holds non-integer numbers"
            return _csv_regression(path), "regression", why
    ds = datasets.load(spec)
    if task == "regression":
        ds = datasets.Dataset(
            ds.name,
            ds.x,
            ds.y.to(torch.float64),
            ds.x_test,
            None if ds.y_test is None else ds.y_test.to(torch.float64),
            ds.image_shape,
        )
        return ds, "regression", "--task regression (on the label values)"
    return ds, "classification", "--task classification" if task == "classification" else "integer class labels"


def _one_hot(y: torch.Tensor, k: int) -> torch.Tensor:
    """Centred one-hot targets (Arora et al. 2019): ``1 - 1/K`` for the class, ``-1/K`` elsewhere."""
    return torch.nn.functional.one_hot(y, k).to(torch.float64) - 1.0 / k


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(-1).cpu() == y.cpu()).double().mean())


def _condition(ev: torch.Tensor) -> float:
    ev = ev.double()
    lo = float(ev.min())
    return float("inf") if lo <= 0 else float(ev.max()) / lo


@dataclass
class _Task:
    """How targets are encoded and predictions scored for one task."""

    kind: str  # "classification" | "regression"
    n_classes: int  # classes (classification) or 1 (regression)
    y_mean: float = 0.0
    y_std: float = 1.0

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "r2"

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """The regression targets of the kernels and the finite net: centred one-hot, or standardised."""
        if self.kind == "classification":
            return _one_hot(y, self.n_classes)
        return ((y.to(torch.float64) - self.y_mean) / self.y_std)[:, None]

    def score(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Scores of outputs ``out`` (in target units) against labels/targets ``y``."""
        if self.kind == "classification":
            return {"accuracy": _accuracy(out, y)}
        pred = out.double().cpu()[:, 0] * self.y_std + self.y_mean
        yt = y.double().cpu()
        err = pred - yt
        ss = float(((yt - yt.mean()) ** 2).sum())
        return {
            "rmse": float(err.pow(2).mean().sqrt()),
            "mae": float(err.abs().mean()),
            "r2": float(1 - float(err.pow(2).sum()) / ss) if ss > 0 else float("nan"),
        }


def _prepare(opts: FitOptions, log):
    ds, task, reason = load_task_data(opts.data, opts.task)
    if task == "classification":
        n_classes = ds.n_classes
        if n_classes < 2:
            raise datasets.DataError(f"{opts.data} has a single class; classification needs at least two.")
        distinct = len(torch.unique(ds.y))
        if distinct > 50 and opts.task == "auto":
            log(
                f"note: {opts.data} has {distinct} distinct integer labels, treated as classes; pass --task "
                f"regression if they are measurements"
            )
    else:
        n_classes = 1
    arch = resolve_arch(opts.arch, n_classes)
    if arch.images and ds.image_shape is None:
        raise ArchError(
            f"--arch {opts.arch} is convolutional and needs image data (digits, mnist, "
            f"fashion-mnist, cifar10:<dir>, or an npz with image-shaped x); {opts.data} is a table."
        )
    xtr, ytr, xte, yte = split_dataset(ds, opts.n_train, opts.n_test, opts.seed, stratify=task == "classification")
    if ds.image_shape is None:  # tables: standardise with the training statistics
        mu, sd = xtr.mean(0), xtr.std(0)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    if arch.images:
        assert ds.image_shape is not None, "image architectures were refused above for table data"
        xtr, xte = xtr.reshape(len(xtr), *ds.image_shape), xte.reshape(len(xte), *ds.image_shape)
    if task == "classification":
        spec = _Task("classification", n_classes)
        what = f"{n_classes} classes"
    else:
        sd = float(ytr.double().std())
        spec = _Task("regression", 1, float(ytr.double().mean()), sd if sd > 0 else 1.0)
        what = f"regression, targets mean {spec.y_mean:.4g} sd {spec.y_std:.4g}"
    log(
        f"data {ds.name}: {len(xtr)} train / {len(xte)} test, {what} ({reason}), "
        f"input {tuple(xtr.shape[1:])}; arch {arch.name}"
    )
    return ds, arch, spec, reason, xtr, ytr, xte, yte


def _meta(opts: FitOptions, ds, arch, spec: _Task, reason: str, n_train: int, n_test: int) -> dict[str, Any]:
    """What produced a report: data, task, architecture, seed, numerics, versions, the command line."""
    return {
        "data": opts.data,
        "data_name": ds.name,
        "task": spec.kind,
        "task_reason": reason,
        "n_train": n_train,
        "n_test": n_test,
        "n_classes": spec.n_classes if spec.kind == "classification" else None,
        "arch": opts.arch,
        "net": repr(arch.net),
        "seed": opts.seed,
        "dtype": opts.dtype,
        "device": opts.device,
        "width": opts.width if opts.finite else None,
        "steps": opts.steps if opts.finite else None,
        "diag_reg": opts.diag_reg,
        "ntkit_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "command": opts.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_fit(opts: FitOptions, step: Step) -> dict[str, Any]:
    """Run the whole job; returns ``{"rows": [...], "meta": {...}, "details": {...}, "out": path}`` and writes
    the report folder (``results.json`` holds ``meta`` and ``rows``)."""
    if opts.lr is not None and not (isinstance(opts.lr, (int, float)) and math.isfinite(opts.lr) and opts.lr > 0):
        raise ValueError(f"--lr {opts.lr!r} must be a positive number (or leave it out for the automatic choice).")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    tick = step.start("loading data", None)
    ds, arch, spec, reason, xtr, ytr, xte, yte = _prepare(opts, step.log)
    tick(1)
    step.done()
    dev = torch.device(opts.device)
    Y = spec.targets(ytr).to(dev)
    meta = _meta(opts, ds, arch, spec, reason, len(xtr), len(xte))
    details: dict[str, Any] = {
        "options": {k: str(v) for k, v in asdict(opts).items()},
        "machine": machine_info(),
        "n_train": len(xtr),
        "n_test": len(xte),
        "n_classes": spec.n_classes,
        "task": spec.kind,
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
                **spec.score(mean, yte),
                "seconds": t_kernel + seconds,
                "kernel_seconds": t_kernel,
                "condition_number": _condition(ev),
            }
        )
        tick(1)
    step.done()

    # -- NTK-SVM / NTK-SVR ----------------------------------------------------------------------------------
    rows.append(_svm(spec, kd, kt, ytr, yte, Y, opts, step, t_kernel, rows[0]["condition_number"]))

    # -- the finite twin ----------------------------------------------------------------------------------------
    figures = {}
    if opts.finite:
        rows.append(_train_finite(opts, arch, xtr, Y, xte, yte, kd, kt, step, details, dev, spec))
        meta["learning_rate"] = details["finite"]["learning_rate"]
        meta["learning_rate_source"] = details["finite"]["learning_rate_source"]
    # -- learning curve -------------------------------------------------------------------------------------------
    ns, curve = _learning_curve(kd, kt, Y, yte, opts, step, spec)
    details["learning_curve"] = {"n": ns, "metric": spec.metric, **curve}
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
                f"Train loss ({title}, width {opts.width}, lr {fc['learning_rate']:.3g})",
            )
            tick(1)
            figures["finite_vs_infinite"] = plots.plot_finite_vs_infinite(
                fc.pop("_pred_test"),
                fc.pop("_actual_test"),
                out / "finite_vs_infinite.png",
                f"Test outputs after {opts.steps} steps ({title})",
            )
            tick(1)
        path = out / "learning_curve.png"
        if spec.kind == "classification":
            figures["learning_curve"] = plots.plot_learning_curve(ns, curve, path, f"Learning curve ({title})")
        else:
            figures["learning_curve"] = _plot_r2_curve(ns, curve, path, f"Learning curve ({title})")
        tick(1)
        step.done()
    details.get("finite", {}).pop("_pred_test", None)
    details.get("finite", {}).pop("_actual_test", None)
    details["figures"] = {k: str(v) for k, v in figures.items()}
    details["meta"] = meta
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=2, default=float) + "\n")
    return {"rows": rows, "meta": meta, "details": details, "out": out}


def _svm(spec: _Task, kd, kt, ytr, yte, Y, opts: FitOptions, step: Step, t_kernel: float, cond: float):
    """The NTK-SVM (classification; ``SVC``) or NTK-SVR (regression, standardised targets; ``SVR``), C by
    3-fold cross-validation on the training set."""
    from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
    from sklearn.svm import SVC, SVR

    name = "ntk-svm" if spec.kind == "classification" else "ntk-svr"
    tick = step.start(f"{name.upper()} (C by 3-fold CV)", 1)
    t0 = time.perf_counter()
    ktr_np, kte_np = kd["ntk"].double().cpu().numpy(), kt["ntk"].double().cpu().numpy()
    if spec.kind == "classification":
        counts = np.bincount(ytr.numpy())
        folds = int(min(3, counts[counts > 0].min()))
        if folds >= 2:
            cv = StratifiedKFold(folds, shuffle=True, random_state=opts.seed)
            svm = GridSearchCV(SVC(kernel="precomputed"), {"C": list(SVM_C_GRID)}, cv=cv).fit(ktr_np, ytr.numpy())
            best_c = svm.best_params_["C"]
        else:
            svm, best_c = SVC(kernel="precomputed", C=1.0).fit(ktr_np, ytr.numpy()), 1.0
        scores = {"accuracy": float((svm.predict(kte_np) == yte.numpy()).mean())}
    else:
        target = Y[:, 0].double().cpu().numpy()
        folds = min(3, len(target))
        cv = KFold(folds, shuffle=True, random_state=opts.seed)
        svr = GridSearchCV(SVR(kernel="precomputed"), {"C": list(SVM_C_GRID)}, cv=cv).fit(ktr_np, target)
        best_c = svr.best_params_["C"]
        scores = spec.score(torch.from_numpy(svr.predict(kte_np))[:, None], yte)
    row = {
        "model": name,
        **scores,
        "seconds": t_kernel + time.perf_counter() - t0,
        "kernel_seconds": t_kernel,
        "condition_number": cond,
        "C": best_c,
    }
    tick(1)
    step.done()
    return row


def _plot_r2_curve(ns, curve: dict[str, list[float]], path: Path, title: str) -> Path:
    """Test R² against the number of training samples (regression's learning curve)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    colors = {"ntk": "C0", "nngp": "C1"}
    for name, vals in curve.items():
        ax.plot(ns, vals, marker="o", label=name, color=colors.get(name.split("-")[0]))
    ax.set_xscale("log")
    ax.set_xlabel("training samples n")
    ax.set_ylabel("test R²")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _loss_spike(losses: list[float]) -> Optional[str]:
    """A description of a divergence or spike of the finite net's train loss, or ``None`` if it fell smoothly:
    non-finite values, or a step whose loss exceeds twice the lowest loss reached before it."""
    best = float("inf")
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            return f"the loss became {v} at step {i}"
        if v > 2 * best:
            return f"the loss rose from {best:.3g} to {v:.3g} at step {i}"
        best = min(best, v)
    return None


def _train_finite(opts, arch, xtr, Y, xte, yte, kd, kt, step: Step, details, dev, spec: _Task) -> dict[str, Any]:
    """Full-batch gradient descent ``θ ← θ - η ∇L`` on ``L = ||f - Y||² / (2 N)`` (``N = Y.numel()``, the
    normalisation under which :func:`ntkit.predict.gradient_descent_mse` measures time in steps). ``η`` is
    ``opts.lr``, or :data:`LR_FRACTION` of the NTK's largest stable rate."""
    t0 = time.perf_counter()
    net_mod = arch.net.module(tuple(xtr.shape[1:]), width=opts.width, seed=opts.seed).to(dev)
    x_tr, x_te = xtr.to(dev, torch.float32), xte.to(dev, torch.float32)
    y32 = Y.to(torch.float32)
    lr_max = max_learning_rate(kd["ntk"], Y.numel())
    if opts.lr is None:
        lr, source = LR_FRACTION * lr_max, f"auto: {LR_FRACTION} x the NTK's largest stable rate {lr_max:.4g}"
    else:
        lr, source = float(opts.lr), "--lr"
        if lr > lr_max:
            step.log(
                f"warning: --lr {lr:.4g} is above the infinite-width stability limit {lr_max:.4g} "
                f"(2 N / λ_max of the NTK); gradient descent will likely diverge"
            )
    params = [p for p in net_mod.parameters() if p.requires_grad]
    with torch.no_grad():
        f0_tr, f0_te = net_mod(x_tr).double(), net_mod(x_te).double()
    losses = []
    tick = step.start(f"finite twin: {opts.steps} GD steps (width {opts.width}, lr {lr:.3g})", opts.steps)
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
    spike = _loss_spike(losses)
    if spike is not None:
        step.log(f"warning: the finite net's training was unstable ({spike}); lower --lr (now {lr:.3g})")
    # what the NTK predicts for this very network (its own initial outputs), at every step
    pred = gradient_descent_mse(kd["ntk"], Y, learning_rate=lr)
    ts = np.unique(np.round(np.geomspace(1, opts.steps, 60)).astype(int))
    ts = np.concatenate([[0], ts]).astype(np.float64)
    tr_t = pred(torch.as_tensor(ts), f0_tr, None)
    loss_pred = (0.5 * ((tr_t - Y) ** 2).mean(dim=(-2, -1))).cpu().numpy()
    _, te_T = pred(float(opts.steps), f0_tr, f0_te, kt["ntk"])
    rel = float(torch.linalg.norm(f_te - te_T) / torch.linalg.norm(te_T))
    predicted = spec.score(te_T, yte)
    details["finite"] = {
        "width": opts.width,
        "steps": opts.steps,
        "learning_rate": lr,
        "learning_rate_source": source,
        "max_stable_learning_rate": lr_max,
        "unstable": spike,
        "loss": losses,
        "t_pred": ts.tolist(),
        "loss_pred": loss_pred.tolist(),
        **{f"ntk_predicted_{k}": v for k, v in predicted.items()},
        "output_rel_error": rel,
        "_pred_test": te_T.cpu().numpy(),
        "_actual_test": f_te.cpu().numpy(),
    }
    return {
        "model": "finite-gd",
        **spec.score(f_te, yte),
        "seconds": seconds,
        "kernel_seconds": 0.0,
        "condition_number": None,
        "width": opts.width,
        "steps": opts.steps,
        "learning_rate": lr,
        "unstable": spike,
        **{f"ntk_predicted_{k}": v for k, v in predicted.items()},
        "output_rel_error_vs_ntk": rel,
    }


def _learning_curve(kd, kt, Y, yte, opts: FitOptions, step: Step, spec: _Task):
    """The task's metric (accuracy or R²) of NTK / NNGP regression on nested random subsets of the training set
    (kernels reused)."""
    n = Y.shape[0]
    lo = min(n, max(10 * Y.shape[1], 10))
    ns = sorted({int(v) for v in np.geomspace(lo, n, 8)})
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed + 1)).to(Y.device)
    curve: dict[str, list[float]] = {"ntk-krr": [], "nngp-krr": []}
    tick = step.start("learning curve", len(ns))
    for m in ns:
        idx = perm[:m]
        for g in ("ntk", "nngp"):
            k = kd[g][idx][:, idx]
            mean = gp_inference(k, Y[idx], diag_reg=opts.diag_reg)(g, kt[g][:, idx])
            curve[f"{g}-krr"].append(spec.score(mean, yte)[spec.metric])
        tick(1)
    step.done()
    return ns, curve
