"""The DMFT of μP training (ntkit.feature_learning.dmft) against its two limits: the NTK flow at γ₀ → 0, and wide
μP networks written here from the paper's equations (Bordelon & Pehlevan 2022), trained by gradient descent."""

from __future__ import annotations

import math

import pytest
import torch

import ntkit as nt
from ntkit import predict
from ntkit.feature_learning import dmft, quadrature_weights

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _data(P=8, D=5, Q=0, out=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, D, generator=g, dtype=F64)
    y = torch.sign(torch.randn(P, out, generator=g, dtype=F64))
    xq = torch.randn(Q, D, generator=g, dtype=F64) if Q else None
    return x, (y[:, 0] if out == 1 else y), xq


def _fc(depth, phi, width=64, W_std=1.0, b_std=None, out=1):
    layers = []
    for _ in range(depth):
        layers += [nt.Dense(width, W_std=W_std, b_std=b_std), phi]
    return nt.serial(*layers, nt.Dense(out, W_std=W_std, b_std=b_std))


# ---------------------------------------------------------------------------------------------------------
# the lazy limit: γ₀ → 0 is NTK gradient flow (bar 1)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "depth, phi, W_std, b_std, out",
    [
        (1, nt.Relu(), 1.0, None, 1),
        (2, nt.Erf(), 1.3, 0.2, 1),
        (2, nt.Relu(), 1.4, 0.1, 2),
        (3, nt.Gelu(), 1.2, None, 1),
    ],
)
def test_gamma_to_zero_is_the_ntk_flow(depth, phi, W_std, b_std, out):
    x, y, xq = _data(P=6, Q=3, out=out)
    net = _fc(depth, phi, W_std=W_std, b_std=b_std, out=out)
    times = torch.tensor([0.3, 1.0, 2.5, 6.0], dtype=F64)
    eta = 0.7
    res = dmft(net, x, y, gamma=1e-6, times=times, x_test=xq, learning_rate=eta, samples=256)
    ntk = net.kernel_fn(x, None, "ntk")
    # ntkit's MSE is normalised by all P·out targets: η = η₀·out gives η/(P·out) = η₀/P
    flow = predict.gradient_descent_mse(ntk, y if out > 1 else y[:, None], learning_rate=eta * out)
    f_tr, f_te = flow(times, fx_train_0=0.0, fx_test_0=0.0, k_test_train=net.kernel_fn(xq, x, "ntk"))
    assert res.f_train.shape == (4, 6, out) and res.f_test is not None and res.f_test.shape == (4, 3, out)
    for got, want in ((res.f_train, f_tr), (res.f_test, f_te)):
        want = want.reshape(got.shape)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    # and the kernel driving the outputs is the NTK, on train and test points
    k_all = net.kernel_fn(torch.cat([x, xq]), None, "ntk")
    got_k = res.ntk[-1][..., 0, 0]
    assert float((got_k - k_all).abs().max() / k_all.abs().max()) < 1e-6


def test_gamma_zero_exactly_and_initial_kernels():
    x, y, _ = _data(P=5)
    net = _fc(2, nt.Erf(), W_std=1.2, b_std=0.1)
    res = dmft(net, x, y, gamma=0.0, times=[0.5, 1.0], samples=64)
    assert res.iterations == 1 and res.converged
    # Φ^L(t, t) is the NNGP after the last nonlinearity: the output's NNGP is W_std² Φ^L + b_std²
    k = net.kernel_fn(x, None, "nngp")
    assert torch.allclose(1.2**2 * res.feature_kernels[-1][0] + 0.1**2, k, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# wide μP networks, written from the paper's equations, converge to the DMFT (bar 2)
# ---------------------------------------------------------------------------------------------------------
def _train_plain_mup_1layer(x, y, times, gamma, width, seeds, dt, eta=1.0):
    """Written from the paper's equations, not from ntkit: ``f = w·relu(W x/√D)/(γ₀N)`` with ``W, w ~ N(0, 1)``,
    trained by the gradient flow ``dθ/dt = −η₀γ₀²N ∇L``, ``L = (1/2P) Σ_μ (f_μ − f_μ(0) − y_μ)²``, i.e. with
    ``Δ = y − f_c``::

        dw_i/dt = (η₀γ₀/P) Σ_μ Δ_μ relu(h_iμ),     dW_i/dt = (η₀γ₀/(P√D)) Σ_μ Δ_μ w_i 1[h_iμ > 0] x_μ

    integrated by classical Runge–Kutta (RK4) with steps ``≤ dt``, for ``seeds`` independent networks at once.
    Returns the centred outputs ``(seeds, T, P)``."""
    P, D = x.shape
    g = torch.Generator().manual_seed(width)
    W = torch.randn(seeds, width, D, generator=g, dtype=F64)
    w = torch.randn(seeds, width, generator=g, dtype=F64)

    def forward(W, w):
        h = W @ x.T / math.sqrt(D)  # (seeds, N, P)
        return h, torch.einsum("snp,sn->sp", torch.relu(h), w) / (gamma * width)

    f0 = forward(W, w)[1]

    def rhs(W, w):
        h, f = forward(W, w)
        delta = y - (f - f0)
        dw = eta * gamma / P * torch.einsum("snp,sp->sn", torch.relu(h), delta)
        dW = eta * gamma / (P * math.sqrt(D)) * torch.einsum("snp,sp,pd->snd", (h > 0).to(F64), delta, x)
        return dW * w[..., None], dw

    t, outs = 0.0, []
    for target in times.tolist():
        n = max(1, math.ceil((target - t) / dt - 1e-9))
        s = (target - t) / n
        for _ in range(n):
            k1 = rhs(W, w)
            k2 = rhs(W + s / 2 * k1[0], w + s / 2 * k1[1])
            k3 = rhs(W + s / 2 * k2[0], w + s / 2 * k2[1])
            k4 = rhs(W + s * k3[0], w + s * k3[1])
            W = W + s / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            w = w + s / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        t = target
        outs.append(forward(W, w)[1] - f0)
    return torch.stack(outs, 1)


def test_wide_mup_networks_converge_to_the_dmft_as_one_over_sqrt_width():
    """Bar 2: at γ₀ = 1, plain μP nets at widths 256, 1024, 4096 approach the DMFT, the rms error halving per 4x
    width (finite-width fluctuations are O(1/√N)). The DMFT's own errors are kept well below the width-4096 error:
    Monte Carlo (rms standard error ~5e-4 with 16384 QMC samples) and time grid (step 0.125, second order)."""
    x, y, _ = _data()
    gamma = 1.0
    times = torch.linspace(0.5, 3.0, 6, dtype=F64)
    net = _fc(1, nt.Relu())
    res = dmft(net, x, y, gamma=gamma, times=times, samples=16384, max_step=0.125, damping=1.0, tol=1e-5)
    assert res.converged
    ref = res.f_train[:, :, 0]
    assert float(res.std_error.max()) < 2.5e-3 and float(res.std_error.pow(2).mean().sqrt()) < 1e-3
    errs = {}
    # the same compute per width: seeds ∝ 1/width (the error is an rms over seeds, times and points)
    for width, seeds in ((256, 64), (1024, 16), (4096, 4)):
        fN = _train_plain_mup_1layer(x, y, times, gamma, width, seeds, dt=0.25)
        errs[width] = float(((fN - ref) ** 2).mean().sqrt())
    r1, r2 = errs[256] / errs[1024], errs[1024] / errs[4096]
    assert 1.3 < r1 < 2.7 and 1.3 < r2 < 2.7, errs
    # feature learning is visible at this γ₀: the rich outputs differ from the lazy (NTK) ones by much more
    lazy = predict.gradient_descent_mse(net.kernel_fn(x, None, "ntk"), y[:, None])(times, fx_train_0=0.0)[..., 0]
    assert float(((ref - lazy) ** 2).mean().sqrt()) > 5 * errs[4096], errs


# ---------------------------------------------------------------------------------------------------------
# the discretisation
# ---------------------------------------------------------------------------------------------------------
def test_quadrature_weights_are_explicit_and_second_order():
    grid = torch.tensor([0.0, 0.1, 0.3, 0.4, 0.8, 1.0], dtype=F64)
    W = quadrature_weights(grid)
    assert torch.equal(W, torch.tril(W, -1))  # strictly causal
    # exact for linear integrands (from the second step on; the first is the left rule)
    assert torch.allclose((W @ (2 + 3 * grid))[2:], (2 * grid + 1.5 * grid**2)[2:], atol=1e-14)
    errs = []
    for T in (11, 21, 41):
        g = torch.linspace(0, 1, T, dtype=F64)
        errs.append(float((quadrature_weights(g) @ torch.exp(g) - (torch.exp(g) - 1)).abs().max()))
    assert 3.0 < errs[0] / errs[1] < 5.0 and 3.0 < errs[1] / errs[2] < 5.0


def test_refining_the_grid_converges():
    x, y, _ = _data(P=6)
    net = _fc(1, nt.Erf())
    times = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    kw = dict(gamma=1.5, times=times, samples=1024, damping=1.0, tol=1e-6)
    f = {s: dmft(net, x, y, max_step=s, **kw).f_train for s in (0.5, 0.25, 0.125)}
    e1 = float((f[0.5] - f[0.125]).abs().max())
    e2 = float((f[0.25] - f[0.125]).abs().max())
    assert e2 < 1e-2 and e1 / e2 > 2.5  # second order: (4 − 1)/(1 − 1/4)·... ≈ 5 for the pair


def test_deterministic_and_reported_error_is_honest():
    x, y, _ = _data(P=6)
    net = _fc(1, nt.Relu())
    kw = dict(gamma=1.0, times=[1.0, 3.0], samples=4096)
    a, b = dmft(net, x, y, **kw), dmft(net, x, y, **kw)
    assert torch.equal(a.f_train, b.f_train)
    c = dmft(net, x, y, seed=7, **kw)
    diff = (a.f_train - c.f_train).abs()
    assert float(diff.max()) > 0
    # two independent estimates differ by ~√2 standard errors; 6 is a loose bound
    assert bool((diff <= 6 * torch.sqrt(a.std_error[:, :6] ** 2 + c.std_error[:, :6] ** 2) + 1e-9).all())


def test_samples_chosen_from_the_tolerance():
    x, y, _ = _data(P=6)
    net = _fc(1, nt.Relu())
    loose = dmft(net, x, y, gamma=1.0, times=[2.0], mc_tol=5e-2, min_samples=1024)
    tight = dmft(net, x, y, gamma=1.0, times=[2.0], mc_tol=4e-3, min_samples=1024, max_samples=1 << 15)
    assert tight.samples > loose.samples == 1024
    assert float(tight.std_error.max()) <= 4e-3 * 1.5 or tight.samples == 1 << 15


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    x, y, _ = _data(P=4)
    with pytest.raises(nt.LayerError, match="Dense layer belongs|elementwise nonlinearity belongs"):
        dmft(nt.serial(nt.Dense(8), nt.Relu(), nt.Relu(), nt.Dense(1)), x, y, gamma=1.0, times=[1.0])
    with pytest.raises(nt.LayerError, match="parameterization='ntk'"):
        dmft(nt.serial(nt.Dense(8, parameterization="standard"), nt.Relu(), nt.Dense(1)), x, y, gamma=1.0, times=[1])
    with pytest.raises(ValueError, match="gamma"):
        dmft(_fc(1, nt.Relu()), x, y, gamma=-1.0, times=[1.0])
    with pytest.raises(ValueError, match="out_features"):
        dmft(_fc(1, nt.Relu(), out=2), x, y, gamma=1.0, times=[1.0])
    with pytest.raises(ValueError, match="increasing"):
        dmft(_fc(1, nt.Relu()), x, y, gamma=1.0, times=[2.0, 1.0])


def _train_plain_mup_2layer(x, y, times, gamma, width, seeds, dt, act=torch.erf):
    """``f = w·φ(W¹φ(W⁰x/√D)/√N)/(γ₀N)``, all ``N(0, 1)``; the gradient flow ``dθ/dt = −η₀γ₀²N ∇L`` (η₀ = 1,
    gradients by autograd) integrated by RK4 with steps ``≤ dt``, ``seeds`` networks at once."""
    P, D = x.shape
    g = torch.Generator().manual_seed(width)
    theta = [
        torch.randn(seeds, width, D, generator=g, dtype=F64),
        torch.randn(seeds, width, width, generator=g, dtype=F64),
        torch.randn(seeds, width, generator=g, dtype=F64),
    ]

    def f(W0, W1, w):
        h1 = torch.einsum("pd,snd->spn", x, W0) / math.sqrt(D)
        h2 = torch.einsum("spn,smn->spm", act(h1), W1) / math.sqrt(width)
        return (act(h2) * w[:, None, :]).sum(-1) / (gamma * width)

    f0 = f(*theta)

    def rhs(params):
        ps = [p.detach().requires_grad_(True) for p in params]
        loss = 0.5 * ((f(*ps) - f0 - y) ** 2).mean(1).sum()  # summed over seeds: independent gradients
        return [-(gamma**2) * width * gr for gr in torch.autograd.grad(loss, ps)]

    def add(ps, ks, s):
        return [p + s * k for p, k in zip(ps, ks)]

    t, outs = 0.0, []
    for target in times.tolist():
        n = max(1, math.ceil((target - t) / dt - 1e-9))
        s = (target - t) / n
        for _ in range(n):
            k1 = rhs(theta)
            k2 = rhs(add(theta, k1, s / 2))
            k3 = rhs(add(theta, k2, s / 2))
            k4 = rhs(add(theta, k3, s))
            theta = [p + s / 6 * (a + 2 * b + 2 * c + d) for p, a, b, c, d in zip(theta, k1, k2, k3, k4)]
        t = target
        with torch.no_grad():
            outs.append(f(*theta) - f0)
    return torch.stack(outs, 1)


def test_two_hidden_layers_need_the_response_functions():
    """With two hidden layers the forward and backward fields share W¹(0): the response functions A, B. Wide
    nets converge to the DMFT with them, and stay a fixed distance from it without them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=F64)
    y = torch.sign(torch.randn(6, generator=g, dtype=F64))
    times = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=F64)
    gamma = 2.0
    net = _fc(2, nt.Erf())
    kw = dict(gamma=gamma, times=times, samples=2048, max_step=0.25, damping=0.8, tol=1e-4, response_samples=256)
    full = dmft(net, x, y, **kw)
    cut = dmft(net, x, y, responses=False, **kw)
    assert full.converged and cut.converged
    err, err_cut = {}, {}
    for width, seeds in ((64, 64), (256, 16)):
        fN = _train_plain_mup_2layer(x, y, times, gamma, width, seeds, dt=0.125)
        err[width] = float(((fN - full.f_train[..., 0]) ** 2).mean().sqrt())
        err_cut[width] = float(((fN - cut.f_train[..., 0]) ** 2).mean().sqrt())
    # with the responses the error shrinks ~2x per 4x width (measured 1.8); without, it levels off (1.26)
    assert err[64] / err[256] > 1.6, err
    assert err_cut[64] / err_cut[256] < 1.4 and err_cut[256] > 1.5 * err[256], (err, err_cut)
