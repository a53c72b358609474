"""ntkit.predict.gradient_descent: function-space ODE for any loss, with and without momentum."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch

import ntkit
from ntkit import predict

F64 = torch.float64


def mse(f, y):
    return 0.5 * ((f - y) ** 2).mean()


def cross_entropy(f, y):
    return -(torch.log_softmax(f, dim=-1) * y).mean()


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, dtype=F64, generator=g)
    xt = torch.randn(5, 4, dtype=F64, generator=g)
    net = ntkit.serial(ntkit.Dense(64, b_std=0.1), ntkit.Relu(), ntkit.Dense(3, b_std=0.1))
    labels = torch.randint(0, 3, (16,), generator=g)
    return dict(
        k=net.kernel_fn(x, None, "ntk"),
        kt=net.kernel_fn(xt, x, "ntk"),
        y=torch.randn(16, 3, dtype=F64, generator=g),
        onehot=torch.nn.functional.one_hot(labels, 3).to(F64),
        f0=0.2 * torch.randn(16, 3, dtype=F64, generator=g),
        ft0=0.2 * torch.randn(5, 3, dtype=F64, generator=g),
    )


def test_mse_loss_reproduces_closed_form(problem):
    p = problem
    ts = torch.tensor([3.0, 0.0, 0.7, 12.0], dtype=F64)  # any order, t = 0 included
    a_tr, a_te = predict.gradient_descent(mse, p["k"], p["y"], learning_rate=1.5)(ts, p["f0"], p["ft0"], p["kt"])
    b_tr, b_te = predict.gradient_descent_mse(p["k"], p["y"], learning_rate=1.5)(ts, p["f0"], p["ft0"], p["kt"])
    assert a_tr.shape == (4, 16, 3) and a_te.shape == (4, 5, 3)
    assert float((a_tr - b_tr).abs().max()) < 1e-7
    assert float((a_te - b_te).abs().max()) < 1e-7


def _momentum_closed_form(k, y, f0, eta, mu, ts):
    """Residual r = f - y per eigen-direction: r'' = -(λ/N) r - (1-μ)/sqrt(η) r', time in units of sqrt(η)."""
    lam, v = np.linalg.eigh(k)
    c0 = v.T @ (f0 - y)
    b, n = (1 - mu) / math.sqrt(eta), y.size
    out = []
    for t in ts:
        s = math.sqrt(eta) * t
        c = np.empty_like(c0)
        for i, li in enumerate(lam):
            m = scipy.linalg.expm(np.array([[0.0, 1.0], [-li / n, -b]]) * s)
            c[i] = m[0, 0] * c0[i]  # starts at rest: r'(0) = 0
        out.append(y + v @ c)
    return np.stack(out)


def test_momentum_matches_damped_oscillator_closed_form(problem):
    p = problem
    eta, mu = 0.5, 0.9
    ts = [0.0, 1.0, 4.0, 25.0]
    pf = predict.gradient_descent(mse, p["k"], p["y"], learning_rate=eta, momentum=mu)
    tr, te = pf(torch.tensor(ts, dtype=F64), p["f0"], p["ft0"], p["kt"])
    want = _momentum_closed_form(p["k"].numpy(), p["y"].numpy(), p["f0"].numpy(), eta, mu, ts)
    assert np.abs(tr.numpy() - want).max() < 1e-7
    # test outputs move with the train outputs through the kernel: f_te(t) - f_te(0) = K_td K⁻¹ Δf_tr(t)
    # (an invariant of the ODE for any loss, with or without momentum)
    pred = p["ft0"] + p["kt"] @ torch.linalg.solve(p["k"], tr - p["f0"])
    assert float((te - pred).abs().max()) < 1e-6


def test_momentum_state_resumes(problem):
    p = problem
    pf = predict.gradient_descent(mse, p["k"], p["y"], learning_rate=0.5, momentum=0.8)
    s1 = pf(2.0, predict.ODEState(p["f0"], p["ft0"]), None, p["kt"])
    assert isinstance(s1, predict.ODEState) and s1.qx_train.shape == (16, 3) and s1.qx_test.shape == (5, 3)
    assert float(s1.qx_train.abs().max()) > 1e-3  # the velocity is part of the state
    s2 = pf(3.0, s1, None, p["kt"])
    direct = pf(5.0, predict.ODEState(p["f0"], p["ft0"]), None, p["kt"])
    for a, b in ((s2.fx_train, direct.fx_train), (s2.fx_test, direct.fx_test), (s2.qx_train, direct.qx_train)):
        assert float((a - b).abs().max()) < 1e-7
    with pytest.raises(ValueError, match="momentum is None"):
        predict.gradient_descent(mse, p["k"], p["y"])(1.0, s1, None, p["kt"])


def test_cross_entropy_against_independent_integrator(problem):
    p = problem
    k, y, kt = p["k"], p["onehot"], p["kt"]
    eta = 2.0
    ts = [0.5, 5.0, 40.0]
    tr, te = predict.gradient_descent(cross_entropy, k, y, learning_rate=eta)(
        torch.tensor(ts, dtype=F64), p["f0"], p["ft0"], kt
    )

    # reference: hand-written softmax gradient, scipy LSODA, in numpy
    K, Y, f0 = k.numpy(), y.numpy(), p["f0"].numpy()

    def rhs(_t, f):
        f = f.reshape(Y.shape)
        e = np.exp(f - f.max(1, keepdims=True))
        grad = (e / e.sum(1, keepdims=True) - Y) / Y.size  # d/df of -mean(y·log_softmax(f))
        return (-eta * K @ grad).reshape(-1)

    sol = scipy.integrate.solve_ivp(rhs, (0, ts[-1]), f0.reshape(-1), method="LSODA", t_eval=ts, rtol=1e-10, atol=1e-12)
    want = sol.y.T.reshape(len(ts), *Y.shape)
    assert np.abs(tr.numpy() - want).max() < 1e-6
    losses = [float(cross_entropy(f, y)) for f in tr]
    assert losses[0] > losses[1] > losses[2]
    pred = p["ft0"] + kt @ torch.linalg.solve(k, tr - p["f0"])
    assert float((te - pred).abs().max()) < 1e-6


def test_ode_errors(problem):
    p = problem
    pf = predict.gradient_descent(cross_entropy, p["k"], p["onehot"])
    with pytest.raises(ValueError, match="finite times"):
        pf(None, p["f0"])
    with pytest.raises(ValueError, match="inf"):
        pf(math.inf, p["f0"])
    with pytest.raises(ValueError, match="t must be >= 0"):
        pf(-1.0, p["f0"])
    with pytest.raises(ValueError, match="scalar"):
        predict.gradient_descent(lambda f, y: (f - y) ** 2, p["k"], p["y"])(1.0, p["f0"])
    with pytest.raises(ValueError, match="momentum"):
        predict.gradient_descent(mse, p["k"], p["y"], momentum=1.5)
    with pytest.raises(ValueError, match="part of the ODEState"):
        pf(1.0, predict.ODEState(p["f0"]), p["ft0"], p["kt"])
    with pytest.raises(ValueError, match="k_test_train"):
        pf(1.0, p["f0"], p["ft0"])
