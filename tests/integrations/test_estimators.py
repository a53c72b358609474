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
    reg = NTKRegressor(net=NET, diag_reg=1e-3, normalize_y=False).fit(x, y)
    k = _k(NET, x)
    alpha = np.linalg.solve(k + 1e-3 * np.mean(np.diag(k)) * np.eye(len(k)), y)
    np.testing.assert_allclose(reg.predict(xt), _k(NET, xt, x) @ alpha, rtol=1e-9, atol=1e-12)
    assert reg.diag_reg_ == 1e-3 and reg.cv_results_ is None
    # normalize_y (the default): standardise, regress, undo
    reg = NTKRegressor(net=NET, diag_reg=1e-3).fit(x, 5.0 + 3.0 * y)
    m, sd = np.mean(5.0 + 3.0 * y), np.std(5.0 + 3.0 * y)
    alpha = np.linalg.solve(k + 1e-3 * np.mean(np.diag(k)) * np.eye(len(k)), (5.0 + 3.0 * y - m) / sd)
    np.testing.assert_allclose(reg.predict(xt), m + sd * (_k(NET, xt, x) @ alpha), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([reg.y_mean_[0], reg.y_std_[0]], [m, sd], rtol=1e-12)


def test_ntk_regressor_finite_time_matches_matrix_exponential():
    # f_t(X*) = Θ* Θ⁻¹ (I - exp(-η t Θ / N)) y from zero initial outputs; N = y.size (NT's loss normalisation)
    x, y = _data()
    xt, _ = _data(10, seed=2)
    t, lr = 25.0, 0.5
    reg = NTKRegressor(net=NET, t=t, learning_rate=lr, diag_reg=0.0, normalize_y=False).fit(x, y)
    k = _k(NET, x)
    decay = np.eye(len(k)) - scipy.linalg.expm(-lr * t * k / y.size)
    expected = _k(NET, xt, x) @ np.linalg.solve(k, decay @ y)
    np.testing.assert_allclose(reg.predict(xt), expected, rtol=1e-6, atol=1e-9)
    # very long training converges to kernel regression (same ridge)
    late = NTKRegressor(net=NET, t=1e9, diag_reg=1e-6).fit(x, y).predict(xt)
    np.testing.assert_allclose(late, NTKRegressor(net=NET, diag_reg=1e-6).fit(x, y).predict(xt), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="t=-1"):
        NTKRegressor(net=NET, t=-1).fit(x, y)


def test_ntk_classifier_targets_and_probabilities():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data[:400] / 16, d.target[:400]
    clf = NTKClassifier(depth=2, diag_reg=1e-6).fit(x[:300], y[:300])
    # interpolation of the centred one-hot targets of Arora et al. 2019: 0.9 for the class, -0.1 elsewhere
    s = clf.decision_function(x[:300])
    np.testing.assert_allclose(s, np.eye(10)[y[:300]] - 0.1, atol=1e-5)
    assert clf.score(x[300:], y[300:]) >= 0.9
    p = clf.predict_proba(x[300:])
    assert p.shape == (100, 10) and np.all(p > 0) and np.all(p < 1) and np.allclose(p.sum(1), 1, atol=1e-12)
    np.testing.assert_array_equal(clf.classes_[p.argmax(1)], clf.predict(x[300:]))


def test_nngp_regressor_matches_sklearn_gaussian_process():
    x, y = _data(30)
    xt, _ = _data(12, seed=3)
    net = fc_net(2, b_std=0.2)
    noise = 1e-2 * np.mean(np.diag(_k(net, x, get="nngp")))
    for normalize in (False, True):
        yy = 10.0 + 4.0 * y  # an offset and a scale, which normalize_y undoes
        reg = NNGPRegressor(net=net, diag_reg=1e-2, normalize_y=normalize).fit(x, yy)
        mean, std = reg.predict(xt, return_std=True)
        gpr = GaussianProcessRegressor(kernel=kernel(net, "nngp"), alpha=noise, optimizer=None, normalize_y=normalize)
        gpr.fit(x, yy)
        m2, s2 = gpr.predict(xt, return_std=True)
        np.testing.assert_allclose(mean, m2, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(std, s2, rtol=1e-6, atol=1e-9)
        _, cov = reg.predict(xt, return_cov=True)
        np.testing.assert_allclose(cov, gpr.predict(xt, return_cov=True)[1], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.sqrt(np.diag(cov)), std, rtol=1e-10)
        np.testing.assert_allclose(reg.log_marginal_likelihood_value_, gpr.log_marginal_likelihood_value_, rtol=1e-9)


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


# -----------------------------------------------------------------------------------------------------
# issue 16 item 10: normalize_y, diag_reg="auto", calibrated probabilities
# -----------------------------------------------------------------------------------------------------
def _brute_loo_mse(k, y, lam):
    """Leave-one-out MSE of kernel ridge regression with the absolute ridge ``lam``, by ``n`` refits."""
    n = len(y)
    res = []
    for i in range(n):
        keep = np.arange(n) != i
        a = np.linalg.solve(k[np.ix_(keep, keep)] + lam * np.eye(n - 1), y[keep])
        res.append(y[i] - k[i, keep] @ a)
    return np.mean(np.square(res))


def test_auto_ridge_is_the_exact_leave_one_out_minimiser():
    x, y = _data(30)
    k = _k(NET, x)
    md = np.mean(np.diag(k))
    grid = [1e-4, 1e-2, 1e-1, 1.0, 10.0]
    reg = NTKRegressor(net=NET, diag_reg=grid, normalize_y=False).fit(x, y)
    brute = [_brute_loo_mse(k, y, r * md) for r in grid]
    np.testing.assert_allclose(reg.cv_results_["loo_mse"], brute, rtol=1e-8)
    np.testing.assert_array_equal(reg.cv_results_["diag_reg"], grid)
    assert reg.diag_reg_ == grid[int(np.argmin(brute))]
    # the fitted predictor is kernel ridge regression with the chosen ridge
    alpha = np.linalg.solve(k + reg.diag_reg_ * md * np.eye(len(k)), y)
    np.testing.assert_allclose(reg.predict(x[:5]), k[:5] @ alpha, rtol=1e-9, atol=1e-12)
    # the default grid: 1e-6 ... 1e1, four per decade; the choice is interior here and deterministic
    auto = NTKRegressor(net=NET).fit(x, y)
    assert len(auto.cv_results_["diag_reg"]) == 29 and auto.cv_results_["diag_reg"][0] == pytest.approx(1e-6)
    assert auto.cv_results_["diag_reg"][-1] == pytest.approx(10.0)
    assert auto.diag_reg_ == NTKRegressor(net=NET).fit(x, y).diag_reg_
    assert auto.get_params()["diag_reg"] == "auto" and auto.get_params()["normalize_y"] is True


def test_auto_ridge_finite_time_uses_the_smoother_leave_one_out():
    # at finite t the train-input predictions are H y, H = K (K+λI)⁻¹ (I - exp(-c (K+λI))), c = η t / N;
    # the LOO MSE is mean(((y - H y) / (1 - diag H))²)
    x, y = _data(30)
    t, lr = 40.0, 0.5
    grid = [1e-3, 0.1, 1.0]
    reg = NTKRegressor(net=NET, t=t, learning_rate=lr, diag_reg=grid, normalize_y=False).fit(x, y)
    k = _k(NET, x)
    md, n = np.mean(np.diag(k)), len(y)
    expected = []
    for r in grid:
        kr = k + r * md * np.eye(n)
        h = k @ np.linalg.solve(kr, np.eye(n) - scipy.linalg.expm(-lr * t * kr / n))
        expected.append(np.mean(((y - h @ y) / (1 - np.diag(h))) ** 2))
    np.testing.assert_allclose(reg.cv_results_["loo_mse"], expected, rtol=1e-7)
    assert reg.diag_reg_ == grid[int(np.argmin(expected))]


@pytest.mark.parametrize("make", [lambda: NTKRegressor(net=NET), lambda: NTKRegressor(net=NET, t=30.0)])
def test_regressor_predictions_invariant_to_shift_and_equivariant_to_scale(make):
    x, y = _data(40)
    xt, _ = _data(12, seed=5)
    base = make().fit(x, y).predict(xt)
    shifted = make().fit(x, y + 1234.5).predict(xt)
    np.testing.assert_allclose(shifted - 1234.5, base, rtol=1e-10, atol=1e-10 * np.abs(base).max())
    scaled = make().fit(x, -37.0 * y).predict(xt)
    np.testing.assert_allclose(scaled, -37.0 * base, rtol=1e-10, atol=1e-10 * 37 * np.abs(base).max())
    # without normalize_y a shift is not undone (the test above can fail)
    raw = make().set_params(normalize_y=False)
    off = raw.fit(x, y + 1234.5).predict(xt) - 1234.5
    assert np.max(np.abs(off - base)) > 1e-3


def test_nngp_shift_and_scale_and_auto_noise_by_marginal_likelihood():
    x, y = _data(30)
    xt, _ = _data(10, seed=6)
    net = fc_net(2, b_std=0.2)
    m0, s0 = NNGPRegressor(net=net).fit(x, y).predict(xt, return_std=True)
    m1, s1 = NNGPRegressor(net=net).fit(x, 3.0 * y - 50.0).predict(xt, return_std=True)
    np.testing.assert_allclose(m1, 3.0 * m0 - 50.0, rtol=1e-10)
    np.testing.assert_allclose(s1, 3.0 * s0, rtol=1e-10)
    # "auto" maximises scikit-learn's log marginal likelihood (standardised targets) over the grid
    grid = [1e-3, 1e-2, 1e-1, 1.0]
    reg = NNGPRegressor(net=net, diag_reg=grid).fit(x, y)
    md = np.mean(np.diag(_k(net, x, get="nngp")))
    sk = [
        GaussianProcessRegressor(kernel=kernel(net, "nngp"), alpha=r * md, optimizer=None, normalize_y=True)
        .fit(x, y)
        .log_marginal_likelihood_value_
        for r in grid
    ]
    np.testing.assert_allclose(reg.cv_results_["log_marginal_likelihood"], sk, rtol=1e-9)
    assert reg.diag_reg_ == grid[int(np.argmax(sk))]
    assert reg.log_marginal_likelihood_value_ == pytest.approx(max(sk), rel=1e-9)


def test_nngp_multi_output_shapes_follow_sklearn():
    x, y = _data(25)
    Y = np.stack([y, 100.0 * y + 3.0], axis=1)  # outputs of different scales: each is standardised on its own
    xt, _ = _data(7, seed=7)
    net = fc_net(2, b_std=0.2)
    noise = 1e-2 * np.mean(np.diag(_k(net, x, get="nngp")))
    reg = NNGPRegressor(net=net, diag_reg=1e-2).fit(x, Y)
    gpr = GaussianProcessRegressor(kernel=kernel(net, "nngp"), alpha=noise, optimizer=None, normalize_y=True)
    gpr.fit(x, Y)
    mean, std = reg.predict(xt, return_std=True)
    m2, s2 = gpr.predict(xt, return_std=True)
    assert mean.shape == std.shape == (7, 2)
    np.testing.assert_allclose(mean, m2, rtol=1e-7)
    np.testing.assert_allclose(std, s2, rtol=1e-6)
    _, cov = reg.predict(xt, return_cov=True)
    assert cov.shape == (7, 7, 2)
    np.testing.assert_allclose(cov, gpr.predict(xt, return_cov=True)[1], rtol=1e-6, atol=1e-9)


def test_classifier_temperature_minimises_the_leave_one_out_log_loss():
    # LOO outputs by brute force (refits with the fixed absolute ridge), then the log-loss of softmax(f / T)
    x, y0 = _data(45)
    y = np.digitize(y0, [-0.3, 0.3])  # three classes
    clf = NTKClassifier(net=NET, diag_reg=0.1).fit(x, y)
    k = _k(NET, x)
    lam, n = 0.1 * np.mean(np.diag(k)), len(y)
    Y = np.eye(3)[y] - 1.0 / 3
    loo = np.empty_like(Y)
    for i in range(n):
        keep = np.arange(n) != i
        loo[i] = k[i, keep] @ np.linalg.solve(k[np.ix_(keep, keep)] + lam * np.eye(n - 1), Y[keep])

    def logloss(temp):
        z = loo / temp
        z = z - z.max(1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(n), y])

    temps = np.geomspace(1e-3, 1e3, 2001)
    assert logloss(clf.temperature_) <= min(logloss(t) for t in temps) + 1e-9
    p = clf.predict_proba(x)
    z = clf.decision_function(x) / clf.temperature_
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(p, (1 - 1e-9) * expected + 1e-9 / 3, rtol=1e-12, atol=1e-15)
    # far from the data a ReLU network's outputs grow and the softmax alone saturates (to exactly 0 and 1);
    # the floor keeps every probability inside (0, 1)
    relu = NTKClassifier(depth=2).fit(x, y)
    zf = relu.decision_function(1e4 * x) / relu.temperature_
    assert np.any(np.exp(zf - zf.max(1, keepdims=True)) == 0)
    far = relu.predict_proba(1e4 * x)
    assert np.all(far > 0) and np.all(far < 1) and far.min() == pytest.approx(1e-9 / 3, rel=1e-6)


def test_bad_diag_reg_names_the_choices():
    x, y = _data(10)
    for bad in ("bogus", -1.0, float("nan"), [], [0.0, 1.0], ["a"]):
        with pytest.raises(ValueError, match=r"diag_reg="):
            NTKRegressor(diag_reg=bad).fit(x, y)
    with pytest.raises(ValueError, match="'auto'"):
        NNGPRegressor(diag_reg="bogus").fit(x, y)
    with pytest.raises(ValueError, match="'auto'"):
        NTKClassifier(diag_reg="bogus").fit(x, y > 0)


def test_every_public_estimator_has_a_docstring():
    import ntkit.integrations.estimators as est

    for name in est.__all__:
        obj = getattr(est, name)
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"
    for cls in (NTKRegressor, NNGPRegressor):
        assert "normalize_y" in cls.__doc__ and "Default" in cls.__doc__ and '"auto"' in cls.__doc__
    assert "temperature" in NTKClassifier.__doc__ and "leave-one-out" in NTKClassifier.__doc__
