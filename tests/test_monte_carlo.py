"""Monte-Carlo kernels of sampled finite networks converge to the analytic kernels (Jacot et al.'s claim,
checked on ntkit's own rules), at the rates the central limit theorem predicts.

For a net with one hidden layer, the sampled output NNGP ``f(x1)·f(x2)/O`` is an unbiased estimate of the
analytic NNGP at any width, so its error must lie within a few standard errors ``σ/√S`` (``σ`` estimated from
the samples) and shrink as samples are added. The empirical NTK fluctuates by ``O(1/√width)`` around a
mean that is exact for one hidden layer (``O(1/width)`` off with normalisations), so its spread must fall
like ``1/√width`` and its mean lie within a few standard errors of the analytic NTK. Seeds are fixed: the
tests are deterministic, and every bound is one a wrong rule would break.
"""

from __future__ import annotations

import math

import pytest
import torch

import ntkit
from ntkit.monte_carlo import monte_carlo_kernel_fn

Z_MAX = 5.0  # standard errors allowed (max over the 15 distinct entries of a 5×5 kernel)
S_NNGP, W_NNGP = 256, 64
S_NTK, W_SMALL, W_LARGE = 16, 32, 512


def _x(n=5, d=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g, dtype=torch.float64)


ACTIVATIONS = {
    "relu": ntkit.Relu(),
    "leaky_relu": ntkit.LeakyRelu(0.2),
    "abrelu": ntkit.ABRelu(-0.4, 1.3),
    "abs": ntkit.Abs(),
    "erf": ntkit.Erf(1.2, 0.8, 0.1),
    "gelu": ntkit.Gelu(),
    "gelu_tanh": ntkit.Gelu(approximate=True),
    "sigmoid_like": ntkit.Sigmoid_like(),
    "sin": ntkit.Sin(1.0, 1.3, 0.2),
    "cos": ntkit.Cos(1.1, 0.9, 0.3),
    "rbf": ntkit.Rbf(0.6),
    "gaussian": ntkit.Gaussian(1.0, -0.5),
    "exp": ntkit.Exp(1.0, 0.5),
    "exp_normalized": ntkit.ExpNormalized(0.8, -0.7),
    "sign": ntkit.Sign(),
    "monomial": ntkit.Monomial(2),
    "rectified_monomial": ntkit.RectifiedMonomial(2),
    "polynomial": ntkit.Polynomial([0.1, 0.5, 0.3]),
    "hermite": ntkit.Hermite(2),
    "tanh": ntkit.Elementwise(torch.tanh),
}


def _net(act):
    pre = (ntkit.LayerNorm(),) if isinstance(act, ntkit.Hermite) else ()
    return ntkit.serial(ntkit.Dense(8, W_std=1.3, b_std=0.2), *pre, act, ntkit.Dense(4, W_std=1.1))


def _z(samples: torch.Tensor, target: torch.Tensor) -> float:
    """Largest |mean − target| in standard errors over the distinct entries of a symmetric kernel."""
    s = samples.shape[0]
    err = (samples.mean(0) - target).abs()
    # entries that do not fluctuate (sign(x)² = 1) must be exact up to round-off
    se = (samples.std(0) / math.sqrt(s)).clamp_min(1e-10 * float(target.abs().max()))
    iu = torch.triu_indices(err.shape[0], err.shape[1])
    return float((err / se)[iu[0], iu[1]].max())


def _check_nngp(net, x):
    ana = net.kernel_fn(x, get="nngp")
    s = monte_carlo_kernel_fn(net, S_NNGP, W_NNGP, seed=1, get="nngp").samples(x)["nngp"]
    assert _z(s, ana) <= Z_MAX
    # error shrinks as samples grow (16x more samples: 4x smaller expected error)
    err_few = torch.linalg.norm(s[: S_NNGP // 16].mean(0) - ana)
    err_all = torch.linalg.norm(s.mean(0) - ana)
    assert err_all < err_few


def _check_ntk(net, x):
    ana = net.kernel_fn(x, get="ntk")
    small = monte_carlo_kernel_fn(net, S_NTK, W_SMALL, seed=2, get="ntk").samples(x)["ntk"]
    large = monte_carlo_kernel_fn(net, S_NTK, W_LARGE, seed=2, get="ntk").samples(x)["ntk"]
    # CLT in the width: spread ∝ 1/√width, i.e. 1/4 from 32 to 512 (allow a factor 2 either way)
    ratio = float(large.std(0).mean() / small.std(0).mean())
    assert 0.125 <= ratio <= 0.5, ratio
    assert _z(large, ana) <= Z_MAX
    assert torch.linalg.norm(large.mean(0) - ana) < torch.linalg.norm(small.mean(0) - ana)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_monte_carlo_converges_for_every_activation(name):
    act = ACTIVATIONS[name]
    x = _x(scale=0.8)
    net = _net(act)
    _check_nngp(net, x)
    _check_ntk(net, x)


def test_monte_carlo_residual_branches():
    block = ntkit.serial(ntkit.Dense(8, W_std=1.2), ntkit.Erf())
    net = ntkit.serial(
        ntkit.Dense(8, W_std=1.5, b_std=0.1),
        ntkit.Relu(),
        ntkit.FanOut(2),
        ntkit.parallel(block, ntkit.Identity()),
        ntkit.FanInSum(),
        ntkit.Dense(3),
    )
    x = _x(seed=3)
    ana = net.kernel_fn(x)
    # two hidden layers: the NNGP is no longer unbiased at finite width (O(1/width)), so compare at 512
    mc = monte_carlo_kernel_fn(net, 64, 512, seed=4).samples(x)
    assert _z(mc["nngp"], ana.nngp) <= Z_MAX
    assert _z(mc["ntk"], ana.ntk) <= Z_MAX


def test_monte_carlo_standard_parameterisation():
    width = 256
    net = ntkit.serial(
        ntkit.Dense(width, W_std=1.4, b_std=0.3, parameterization="standard"),
        ntkit.Erf(),
        ntkit.Dense(3, W_std=1.1, b_std=0.2, parameterization="standard"),
    )
    x = _x(seed=5)
    ana = net.kernel_fn(x)  # depends on the width under the standard parameterisation
    mc = monte_carlo_kernel_fn(net, 64, None, seed=6).samples(x)
    assert _z(mc["nngp"], ana.nngp) <= Z_MAX
    assert _z(mc["ntk"], ana.ntk) <= Z_MAX
    # the NTK is O(width) here: a check that the width factor is right, not just the shape
    assert float(ana.ntk.diagonal().min()) > 0.25 * width


def test_monte_carlo_kernel_fn_returns_kernel_like_kernel_fn():
    net = _net(ntkit.Relu())
    x1, x2 = _x(4), _x(3, seed=9)
    mc = monte_carlo_kernel_fn(net, 3, 16, seed=0)
    k = mc(x1, x2)
    ref = net.kernel_fn(x1, x2)
    assert k.nngp.shape == ref.nngp.shape and k.ntk.shape == ref.ntk.shape
    assert k.cov1.shape == ref.cov1.shape and k.cov2.shape == ref.cov2.shape
    assert k.nngp.dtype == torch.float64
    # the mean over samples is what samples() averages, and single names return tensors
    s = mc.samples(x1, x2)
    torch.testing.assert_close(k.ntk, s["ntk"].mean(0))
    torch.testing.assert_close(mc(x1, x2, get="nngp"), s["nngp"].mean(0))
    # sample k is the network built with seed + k
    m1 = mc.model((3,), 1, torch.float64, x1.device)
    with torch.no_grad():
        torch.testing.assert_close(s["nngp"][1], m1(x1) @ m1(x2).T / 4)


def test_monte_carlo_bad_arguments():
    net = _net(ntkit.Relu())
    with pytest.raises(ValueError, match="n_samples"):
        monte_carlo_kernel_fn(net, 0, 8)
    with pytest.raises(ValueError, match="width"):
        monte_carlo_kernel_fn(net, 2, -3)
    with pytest.raises(ValueError, match="implementation"):
        monte_carlo_kernel_fn(net, 2, 8, implementation="fast")
    with pytest.raises(TypeError, match="ntkit network"):
        monte_carlo_kernel_fn(torch.nn.Linear(3, 2), 2, 8)
