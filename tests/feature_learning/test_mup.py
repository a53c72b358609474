"""μP finite twins (net.module(..., parameterization="mup", gamma=γ₀)) and their training helper."""

from __future__ import annotations

import math

import pytest
import torch

import ntkit as nt
from ntkit.feature_learning import dmft, train_mup

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _dense_params(mod):
    return [(m.weight, m.bias) for m in mod.modules() if hasattr(m, "W_std") and hasattr(m, "parameterization")]


@pytest.mark.parametrize("depth", [1, 2])
def test_twin_is_the_papers_network(depth):
    """h¹ = σW⁰x/√D + βb⁰, h^{ℓ+1} = σW^ℓφ(h^ℓ)/√N + βb^ℓ, f = (σ w·φ(h^L)/√N + βb)/(γ₀√N); parameters N(0, 1)."""
    D, N, gamma, s, b = 5, 64, 0.7, 1.3, 0.2
    layers = []
    for _ in range(depth):
        layers += [nt.Dense(N, W_std=s, b_std=b), nt.Erf()]
    net = nt.serial(*layers, nt.Dense(2, W_std=s, b_std=b))
    mod = net.module(D, parameterization="mup", gamma=gamma, seed=3, dtype=F64)
    assert mod.mup_gamma == gamma and mod.mup_width == N
    params = _dense_params(mod)
    # the same seed gives the same N(0, 1) draws as the NTK-parameterised twin
    ntk_mod = net.module(D, seed=3, dtype=F64)
    for (w1, _), (w2, _) in zip(params, _dense_params(ntk_mod)):
        assert torch.equal(w1, w2)
    x = torch.randn(7, D, dtype=F64)
    h = x
    for i, (W, bias) in enumerate(params[:-1]):
        fan = W.shape[1]
        h = torch.erf(s * h @ W.T / math.sqrt(fan) + b * bias) if i < depth else h
    W, bias = params[-1]
    f = (s * h @ W.T / math.sqrt(N) + b * bias) / (gamma * math.sqrt(N))
    assert torch.allclose(mod(x), f, rtol=1e-12, atol=1e-14)
    assert torch.allclose(mod(x), ntk_mod(x) / (gamma * math.sqrt(N)), rtol=1e-12, atol=1e-14)


def test_module_errors():
    net = nt.serial(nt.Dense(8), nt.Relu(), nt.Dense(1))
    with pytest.raises(ValueError, match="gamma"):
        net.module(3, parameterization="mup")
    with pytest.raises(ValueError, match="parameterization='mup'"):
        net.module(3, gamma=1.0)
    with pytest.raises(ValueError, match="choose None"):
        net.module(3, parameterization="mean-field", gamma=1.0)
    std = nt.serial(nt.Dense(8, parameterization="standard"), nt.Relu(), nt.Dense(1))
    with pytest.raises(nt.LayerError, match="NTK parameterisation"):
        std.module(3, parameterization="mup", gamma=1.0)
    conv = nt.serial(nt.Conv(4, (3, 3)), nt.Relu(), nt.Flatten(), nt.Dense(1))
    with pytest.raises(nt.LayerError, match="fully-connected"):
        conv.module((1, 5, 5), parameterization="mup", gamma=1.0)


def test_train_mup_is_plain_gradient_descent_with_the_mup_learning_rate():
    D, N, gamma, eta, dt = 4, 32, 0.5, 0.8, 0.05
    net = nt.serial(nt.Dense(N), nt.Relu(), nt.Dense(N), nt.Relu(), nt.Dense(1))
    x = torch.randn(6, D, dtype=F64)
    y = torch.randn(6, dtype=F64)
    mod = net.module(D, parameterization="mup", gamma=gamma, seed=0, dtype=F64)
    ref = net.module(D, parameterization="mup", gamma=gamma, seed=0, dtype=F64)
    traj = train_mup(mod, x, y, times=[0.1, 0.25], learning_rate=eta, step=dt)
    assert traj.steps == 5  # 0.1 = 2 steps, then 3 more to 0.25
    with torch.no_grad():
        f0 = ref(x)
    params = list(ref.parameters())
    outs = []
    for n_steps in (2, 3):
        for _ in range(n_steps):
            loss = 0.5 * ((ref(x) - f0 - y[:, None]) ** 2).sum() / 6
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= dt * eta * gamma**2 * N * g
        with torch.no_grad():
            outs.append(ref(x) - f0)
    assert torch.allclose(traj.f_train, torch.stack(outs), rtol=1e-10, atol=1e-13)
    assert torch.allclose(traj.train_loss, 0.5 * ((torch.stack(outs) - y[:, None]) ** 2).sum((1, 2)) / 6)


def test_ntkit_twin_trained_by_train_mup_approaches_the_dmft():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    y = torch.sign(torch.randn(6, generator=g, dtype=F64))
    xq = torch.randn(3, 3, generator=g, dtype=F64)
    net = nt.serial(nt.Dense(1), nt.Erf(), nt.Dense(1, b_std=0.1))  # widths are set by module(width=...)
    times = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    res = dmft(net, x, y, gamma=2.0, times=times, x_test=xq, samples=4096, max_step=0.25, damping=1.0, tol=1e-5)
    lazy = dmft(net, x, y, gamma=0.0, times=times, x_test=xq, samples=64)
    assert res.f_test is not None and lazy.f_test is not None
    rms = lambda a: float((a**2).mean().sqrt())
    gap = rms(torch.cat([res.f_train - lazy.f_train, res.f_test - lazy.f_test], 1))
    errs = []
    for seed in range(2):
        mod = net.module(3, width=1024, parameterization="mup", gamma=2.0, seed=seed, dtype=F64)
        traj = train_mup(mod, x, y, times=times, x_test=xq)
        assert traj.f_test is not None
        errs.append(rms(torch.cat([traj.f_train - res.f_train, traj.f_test - res.f_test], 1)))
    # width 1024: O(1/√N) deviations, a small fraction of the rich-vs-lazy difference (test points included)
    assert sum(errs) / len(errs) < 0.3 * gap, (errs, gap)
