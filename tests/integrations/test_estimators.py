"""ntkit.sklearn: estimator contract (check_estimator), closed forms, and agreement with scikit-learn's own
kernel machines fed the same kernels."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

pytest.importorskip("sklearn")
from sklearn.base import clone
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.kernel_ridge import KernelRidge
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

import ntkit as nt
from ntkit.architectures import fc_net
from ntkit.integrations.estimators import NTKSVC, NNGPRegressor, NTKClassifier, NTKRegressor, kernel

# Every check passes; none is excluded. depth=1 keeps them fast.
ESTIMATORS = [NTKRegressor(depth=1), NTKClassifier(depth=1), NNGPRegressor(depth=1), NTKSVC(depth=1)]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_contract(estimator, check):
    check(estimator)


def _data(n=40, d=5, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(n, d)
    y = np.sin(x @ rs.randn(d) / np.sqrt(d)) + 0.1 * rs.randn(n)
    return x, y


def _k(net, a, b=None, get="ntk"):
    return net.kernel_fn(torch.from_numpy(a), None if b is None else torch.from_numpy(b), get).numpy()


NET = nt.serial(
    nt.Dense(64, W_std=1.5, b_std=0.1),
    nt.Erf(),
    nt.Dense(64, W_std=1.5, b_std=0.1),
    nt.Relu(),
    nt.Dense(1, W_std=1.0, b_std=0.1),
)


def test_ntk_regressor_is_kernel_ridge_regression():
    x, y = _data()
    xt, _ = _data(15, seed=1)
    reg = NTKRegressor(net=NET, diag_reg=1e-3).fit(x, y)
    k = _k(NET, x)
    alpha = np.linalg.solve(k + 1e-3 * np.mean(np.diag(k)) * np.eye(len(k)), y)
    np.testing.assert_allclose(reg.predict(xt), _k(NET, xt, x) @ alpha, rtol=1e-9, atol=1e-12)


def test_ntk_regressor_finite_time_matches_matrix_exponential():
    # f_t(X*) = Θ* Θ⁻¹ (I - exp(-η t Θ / N)) y from zero initial outputs; N = y.size (NT's loss normalisation)
    x, y = _data()
    xt, _ = _data(10, seed=2)
    t, lr = 25.0, 0.5
    reg = NTKRegressor(net=NET, t=t, learning_rate=lr).fit(x, y)
    k = _k(NET, x)
    decay = np.eye(len(k)) - scipy.linalg.expm(-lr * t * k / y.size)
    expected = _k(NET, xt, x) @ np.linalg.solve(k, decay @ y)
    np.testing.assert_allclose(reg.predict(xt), expected, rtol=1e-6, atol=1e-9)
    # very long training converges to kernel regression
    late = NTKRegressor(net=NET, t=1e9).fit(x, y).predict(xt)
    np.testing.assert_allclose(late, NTKRegressor(net=NET).fit(x, y).predict(xt), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="t=-1"):
        NTKRegressor(net=NET, t=-1).fit(x, y)


def test_ntk_classifier_targets_and_probabilities():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data[:400] / 16, d.target[:400]
    clf = NTKClassifier(depth=2).fit(x[:300], y[:300])
    # interpolation of the centred one-hot targets of Arora et al. 2019: 0.9 for the class, -0.1 elsewhere
    s = clf.decision_function(x[:300])
    np.testing.assert_allclose(s, np.eye(10)[y[:300]] - 0.1, atol=1e-5)
    assert clf.score(x[300:], y[300:]) >= 0.9
    p = clf.predict_proba(x[300:])
    assert p.shape == (100, 10) and np.all(p >= 0) and np.allclose(p.sum(1), 1)
    assert np.mean(p.argmax(1) == np.searchsorted(clf.classes_, clf.predict(x[300:]))) >= 0.99


def test_nngp_regressor_matches_sklearn_gaussian_process():
    x, y = _data(30)
    xt, _ = _data(12, seed=3)
    net = fc_net(2, b_std=0.2)
    reg = NNGPRegressor(net=net, diag_reg=1e-2).fit(x, y)
    mean, std = reg.predict(xt, return_std=True)
    noise = 1e-2 * np.mean(np.diag(_k(net, x, get="nngp")))
    gpr = GaussianProcessRegressor(kernel=kernel(net, "nngp"), alpha=noise, optimizer=None).fit(x, y)
    m2, s2 = gpr.predict(xt, return_std=True)
    np.testing.assert_allclose(mean, m2, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(std, s2, rtol=1e-6, atol=1e-9)
    _, cov = reg.predict(xt, return_cov=True)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), std, rtol=1e-10)


def test_ntk_svc_equals_precomputed_and_callable_svc():
    x, _ = _data(60)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    xt, _ = _data(20, seed=4)
    svc = NTKSVC(net=NET, C=3.0).fit(x, y)
    ref = SVC(kernel="precomputed", C=3.0).fit(_k(NET, x), y)
    np.testing.assert_allclose(svc.decision_function(xt), ref.decision_function(_k(NET, xt, x)), rtol=1e-8)
    cal = SVC(kernel=kernel(NET), C=3.0).fit(x, y)  # the kernel object used directly by SVC
    np.testing.assert_array_equal(cal.predict(xt), svc.predict(xt))


def test_kernel_object_in_kernel_ridge_and_its_diagonal():
    x, y = _data(25)
    kr = KernelRidge(alpha=0.1, kernel=kernel(NET, "nngp")).fit(x, y)
    k = _k(NET, x, get="nngp")
    np.testing.assert_allclose(kr.dual_coef_, np.linalg.solve(k + 0.1 * np.eye(len(k)), y), rtol=1e-8)
    np.testing.assert_allclose(kernel(NET).diag(x), np.diag(_k(NET, x)), rtol=1e-12)


def test_pipeline_grid_search_clone_and_pickle():
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), NTKClassifier())
    gs = GridSearchCV(pipe, {"ntkclassifier__depth": [1, 3], "ntkclassifier__diag_reg": [1e-4, 1e-1]}, cv=3)
    gs.fit(x, y)
    assert gs.best_params_["ntkclassifier__depth"] in (1, 3) and gs.best_score_ > 0.85
    est = clone(NTKSVC(net=NET, C=2.0))
    assert est.get_params()["C"] == 2.0 and est.net is not NET  # deep-copied, as clone does
    back = pickle.loads(pickle.dumps(gs.best_estimator_))
    np.testing.assert_array_equal(back.predict(x), gs.predict(x))


def test_bad_net_and_dtype():
    x, y = _data(10)
    with pytest.raises(TypeError, match="ntkit network"):
        NTKRegressor(net="fc3").fit(x, y)
    with pytest.raises(ValueError, match="dtype='float16'"):
        NTKRegressor(dtype="float16").fit(x, y)
