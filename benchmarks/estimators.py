"""scikit-learn estimators (issue 16 item 10): quality of the defaults against the 0.1 defaults.

Data and protocol: scikit-learn's ``load_diabetes`` (regression, 442 × 10), ``load_digits`` (10 classes,
1797 × 64) and ``load_breast_cancer`` (2 classes, 569 × 30); ``train_test_split(test_size=0.25, random_state=0)``;
inputs standardised by ``StandardScaler`` in a ``Pipeline``; the default network
(``fc_net(3, √2, 0.05)``). Cases:

* ``legacy``: the 0.1 defaults, ``normalize_y=False, diag_reg=1e-6`` (the classifier's probabilities by the 0.1
  rule: outputs + 1/K clipped to [0, 1] and renormalised, recomputed here from ``decision_function``);
* ``default``: the estimators as constructed with no arguments (``normalize_y=True``, ``diag_reg="auto"``,
  tempered-softmax probabilities);
* ``reference``: the brief's yardstick for diabetes, scikit-learn's ``KernelRidge`` on the precomputed NTK with
  standardised targets (``TransformedTargetRegressor``) and ``alpha`` chosen by ``GridSearchCV`` (5-fold) over
  ``DIAG_REG_GRID × mean(diag K)``; and ``RidgeCV`` (linear) for context.

One JSON line per case: R² (regression) or accuracy, log-loss (``sklearn.metrics.log_loss``, which clips at
float64 eps) and the fraction of probabilities that are exactly 0 or 1 (classification), the chosen ridge /
temperature, and the wall time of fit + predict.

    python benchmarks/estimators.py
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from _common import emit, machine
from sklearn.compose import TransformedTargetRegressor
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import RidgeCV
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, KFold, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ntkit.architectures import fc_net
from ntkit.integrations.estimators import DIAG_REG_GRID, NNGPRegressor, NTKClassifier, NTKRegressor, kernel


def _final(pipe: Pipeline) -> Any:
    return pipe.steps[-1][1]


def regression() -> None:
    X, y = load_diabetes(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    cases: list[tuple[str, str, Any]] = [
        ("ntk-regressor", "legacy", NTKRegressor(normalize_y=False, diag_reg=1e-6)),
        ("ntk-regressor", "default", NTKRegressor()),
        ("nngp-regressor", "legacy", NNGPRegressor(normalize_y=False, diag_reg=1e-6)),
        ("nngp-regressor", "default", NNGPRegressor()),
    ]
    for name, case, est in cases:
        t0 = time.perf_counter()
        pipe = make_pipeline(StandardScaler(), est).fit(xtr, ytr)
        r2 = pipe.score(xte, yte)
        wall = time.perf_counter() - t0
        final = _final(pipe)
        emit(
            dataset="diabetes",
            estimator=name,
            case=case,
            r2_test=round(r2, 4),
            r2_train=round(pipe.score(xtr, ytr), 4),
            diag_reg=getattr(final, "diag_reg_", final.diag_reg),
            wall_s=round(wall, 3),
        )

    # reference: KernelRidge on the same NTK, standardised targets, alpha by 5-fold GridSearchCV
    t0 = time.perf_counter()
    sc = StandardScaler().fit(xtr)
    ktr = kernel(fc_net())(sc.transform(xtr))
    kte = kernel(fc_net())(sc.transform(xte), sc.transform(xtr))
    alphas = np.asarray(DIAG_REG_GRID) * float(np.mean(np.diag(ktr)))
    gs = GridSearchCV(KernelRidge(kernel="precomputed"), {"alpha": alphas}, cv=KFold(5), scoring="r2")
    ref = TransformedTargetRegressor(regressor=gs, transformer=StandardScaler()).fit(ktr, ytr)
    r2 = ref.score(kte, yte)
    best = ref.regressor_.best_params_["alpha"] / float(np.mean(np.diag(ktr)))
    emit(
        dataset="diabetes",
        estimator="kernel-ridge-ntk",
        case="reference",
        r2_test=round(r2, 4),
        diag_reg=float(best),
        wall_s=round(time.perf_counter() - t0, 3),
    )
    t0 = time.perf_counter()
    lin = make_pipeline(StandardScaler(), RidgeCV(alphas=np.geomspace(1e-3, 1e3, 25))).fit(xtr, ytr)
    emit(
        dataset="diabetes",
        estimator="ridge-cv (linear)",
        case="reference",
        r2_test=round(lin.score(xte, yte), 4),
        wall_s=round(time.perf_counter() - t0, 3),
    )


def classification() -> None:
    for dataset, loader in (("digits", load_digits), ("breast_cancer", load_breast_cancer)):
        X, y = loader(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
        for case, est in (("legacy", NTKClassifier(diag_reg=1e-6)), ("default", NTKClassifier())):
            t0 = time.perf_counter()
            pipe = make_pipeline(StandardScaler(), est).fit(xtr, ytr)
            acc = pipe.score(xte, yte)
            clf = _final(pipe)
            xs = pipe[:-1].transform(xte)
            if case == "legacy":
                scores = clf._scores(xs)  # the raw (n, K) outputs, also for two classes
                p = np.clip(scores + 1.0 / scores.shape[1], 0.0, 1.0)
                p = p / p.sum(axis=1, keepdims=True)
            else:
                p = pipe.predict_proba(xte)
            wall = time.perf_counter() - t0
            emit(
                dataset=dataset,
                estimator="ntk-classifier",
                case=case,
                accuracy_test=round(acc, 4),
                log_loss_test=round(log_loss(yte, p, labels=clf.classes_), 4),
                frac_proba_exactly_0_or_1=round(float(np.mean((p == 0) | (p == 1))), 4),
                argmax_proba_equals_predict=bool(np.all(clf.classes_[p.argmax(1)] == pipe.predict(xte))),
                diag_reg=clf.diag_reg_,
                temperature=round(clf.temperature_, 5) if case == "default" else None,
                wall_s=round(wall, 3),
            )


def main() -> None:
    emit(machine=machine())
    regression()
    classification()


if __name__ == "__main__":
    main()
