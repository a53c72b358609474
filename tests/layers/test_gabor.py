"""Gabor, ``φ(x) = exp(−x²)·sin(x)`` (issue #14): the closed-form rule against Gauss–Hermite quadrature, the
finite twin by Monte Carlo, and NT 0.6.5 (``fc_gabor_*``)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from helpers import load_reference, random_triples, rel_err
from nt_nets import reference_inputs, reference_net

import ntkit as nk
from ntkit.monte_carlo import monte_carlo_kernel_fn

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _triples() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random PSD triples (ρ = ±1 and 0 included) plus small variances."""
    q12, q11, q22 = random_triples(24)
    t = lambda *v: torch.tensor(v, dtype=F64)
    e12, e11, e22 = t(1e-6, -3e-7, 0.0), t(1e-6, 1e-6, 1e-8), t(1e-6, 1e-6, 2e-8)
    return torch.cat([q12, e12]), torch.cat([q11, e11]), torch.cat([q22, e22])


@functools.cache
def _legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.as_tensor(a, dtype=F64) for a in np.polynomial.legendre.leggauss(n))  # type: ignore[return-value]


def _box_expectation(f, q12: float, q11: float, q22: float, n: int = 240, half: float = 8.0) -> float:
    """``E[f(u) f(v)]`` for a non-degenerate ``(u, v) ~ N(0, Σ)`` by a tensor Gauss–Legendre rule on the box
    ``[−half, half]²`` against the density itself (φ decays like ``exp(−x²)``: the box loses < 1e-30); accurate
    at large variances, where Gauss–Hermite rules in the standardised variables fail."""
    x, w = _legendre(n)
    x, w = x * half, w * half
    u, v = torch.meshgrid(x, x, indexing="ij")
    det = q11 * q22 - q12 * q12
    dens = torch.exp(-(q22 * u * u - 2 * q12 * u * v + q11 * v * v) / (2 * det)) / (2 * math.pi * math.sqrt(det))
    return float((w[:, None] * w[None, :] * dens * f(u) * f(v)).sum())


def test_rule_matches_quadrature():
    """K' = E[φ(u)φ(v)] and K̇ = E[φ'(u)φ'(v)] against a 200×200-node Gauss–Hermite rule (the 100-node one is
    off by 1e-7 at variance 2: the integrand exp(−2q z²) is narrow), and the diagonal closed form."""
    g = nk.Gabor()
    q12, q11, q22 = _triples()
    quad = nk.Elementwise(g.fn, deg=200)
    nngp, dot = g.rule(q12, q11, q22, True)
    assert rel_err(nngp, quad.nngp_fn(q12, q11, q22)) < 1e-12
    assert rel_err(dot, quad.d_nngp_fn(q12, q11, q22)) < 1e-12
    assert (nngp - quad.nngp_fn(q12, q11, q22)).abs().max() < 1e-14
    assert torch.allclose(g.var_fn(q11), g.rule(q11, q11, q11, False)[0], rtol=1e-14, atol=0)
    # the derivative closed form and zero mean (φ odd)
    x = torch.linspace(-3, 3, 41, dtype=F64)
    assert torch.allclose(g.derivative(x), nk.Elementwise(g.fn).derivative(x), rtol=0, atol=1e-14)
    assert g.mean_fn(q11) is None


@pytest.mark.parametrize("q12, q11, q22", [(5.0, 5.0, 6.0), (-3.0, 4.0, 4.0), (0.5, 9.0, 3.0), (2.0, 3.0, 2.0)])
def test_rule_at_large_variance(q12, q11, q22):
    """At variances 2–9 (pre-activations far wider than φ's bump) against a box rule on the density."""
    g = nk.Gabor()
    t = lambda v: torch.tensor(v, dtype=F64)
    nngp, dot = g.rule(t(q12), t(q11), t(q22), True)
    assert abs(float(nngp) - _box_expectation(g.fn, q12, q11, q22)) < 1e-13
    assert abs(float(dot) - _box_expectation(g.derivative, q12, q11, q22)) < 1e-13


def test_small_correlation_has_no_cancellation():
    """K' ≈ q12·E[φ'(u)]² for tiny q12: the expm1 form keeps full relative accuracy."""
    g = nk.Gabor()
    q = torch.tensor(0.5, dtype=F64)
    q12 = torch.tensor(1e-12, dtype=F64)
    nngp, dot = g.rule(q12, q, q, True)
    # E[φ'(u)] = E[cos(u)·exp(−u²)·...] at q12 → 0: K' = q12·K̇(0) to first order
    _, dot0 = g.rule(torch.zeros((), dtype=F64), q, q, True)
    assert abs(float(nngp) / (1e-12 * float(dot0)) - 1) < 1e-10
    assert abs(float(dot) / float(dot0) - 1) < 1e-10


def test_monte_carlo_twin():
    """The finite twin's average kernels (width 256) within 1 % + 3 standard errors of the rule."""
    net = nk.serial(nk.Dense(64, 1.5, 0.2), nk.Gabor(), nk.Dense(64, 1.2, 0.1), nk.Gabor(), nk.Dense(1))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = net.kernel_fn(x)
    for get, n in (("nngp", 512), ("ntk", 64)):
        s = monte_carlo_kernel_fn(net, n_samples=n, width=256, seed=7, get=get).samples(x)[get].reshape(n, -1)
        mean, se = s.mean(0), s.std(0) / math.sqrt(n)
        e = getattr(exact, get).reshape(-1)
        err, noise = float((mean - e).norm() / e.norm()), float(se.norm() / e.norm())
        assert err < 0.01 + 3 * noise, (get, err, noise)


@pytest.mark.parametrize("name", [f"fc_gabor_{p}_b{b}" for p in ("ntk", "standard") for b in ("None", "0.3")])
def test_nt_parity(name):
    ref = load_reference(name)
    x1, x2 = reference_inputs(ref)
    net = reference_net(name)
    k12, k11 = net.kernel_fn(x1, x2), net.kernel_fn(x1)
    for get in ("nngp", "ntk"):
        assert rel_err(getattr(k12, get), ref[f"{get}_12"]) < 1e-12
        assert rel_err(getattr(k11, get), ref[f"{get}_11"]) < 1e-12
