"""Finite-``t`` ensemble predictions without ``eigh`` (issue #17 item 3): ``g_τ(Θ) = Θ⁻¹(I - exp(-τΘ))`` applied
by a Chebyshev polynomial of ``Θ`` with an a priori error bound (:mod:`ntkit.predict._matfun`). The polynomial
path, forced on, is compared with the eigendecomposition path in float64 (1e-10), its bound is checked against
the actual error on known spectra, and the automatic choice is checked to fall back to ``eigh`` where the
polynomial cannot be trusted (a kernel that is not positive definite, infinite times, huge ``τ λ_max``)."""

from __future__ import annotations

import math

import pytest
import torch

import ntkit
from ntkit import predict
from ntkit.predict._matfun import MAX_REL_ERROR, _phi, apply_plan, phi_plan, spectrum_bound, usable

F64 = torch.float64
NET = ntkit.serial(ntkit.Dense(64, b_std=0.1), ntkit.Relu(), ntkit.Dense(64), ntkit.Relu(), ntkit.Dense(2))


def _data(n=40, m=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(n, 3, dtype=F64, generator=g), torch.randn(m, 3, dtype=F64, generator=g)
    return x, xt, torch.randn(n, 2, dtype=F64, generator=g)


def _rel(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


@pytest.mark.parametrize("lr_t", [0.5, 10.0, 120.0])
def test_polynomial_bound_holds_on_known_spectra(lr_t):
    """``max |p(λ) - g_τ(λ)|`` over a dense grid of ``[0, b]`` is within the a priori bound (plus the
    round-off estimate), and the plan's relative error is what ``usable`` admits."""
    b = 50.0
    plan = phi_plan(lr_t / 40.0, b)
    assert usable(plan) == (plan.rel_bound + plan.rel_round_off <= MAX_REL_ERROR)
    assert plan.rel_bound <= 1e-13
    lam = torch.linspace(0, b, 301, dtype=F64)
    got = apply_plan(torch.diag(lam), torch.eye(lam.numel(), dtype=F64), plan).diagonal()
    ref = plan.tau * _phi(plan.tau * lam)
    err = float((got - ref).abs().max())
    assert err <= plan.bound + plan.round_off
    assert err / float(ref.min()) < 1e-11


def test_spectrum_bound_is_an_upper_bound():
    a = NET.kernel_fn(_data()[0], None, "ntk")
    assert spectrum_bound(a) >= float(torch.linalg.eigvalsh(a)[-1])


@pytest.mark.parametrize("t", [0.0, 3.0, 40.0, [[1.0, 7.0], [0.5, 20.0]]])
@pytest.mark.parametrize("compute_cov", [True, False])
def test_forced_chebyshev_matches_eigh(t, compute_cov):
    x, xt, y = _data()
    out = {}
    for method in ("eigh", "chebyshev"):
        pf = predict.gradient_descent_mse_ensemble(NET.kernel_fn, x, y, diag_reg=1e-3, learning_rate=2.0)
        pf.method = method
        out[method] = pf(t, xt, ("nngp", "ntk"), compute_cov=compute_cov)
        assert {v["method"] for v in pf.last_method.values()} == {method}
        if method == "chebyshev":
            assert all(v["rel_bound"] < 1e-12 for v in pf.last_method.values())
    for g in ("nngp", "ntk"):
        a, b = getattr(out["chebyshev"], g), getattr(out["eigh"], g)
        if compute_cov:
            assert a.mean.shape == b.mean.shape and a.covariance.shape == b.covariance.shape
            assert _rel(a.mean, b.mean) < 1e-10 and _rel(a.covariance, b.covariance) < 1e-10
        else:
            assert a.shape == b.shape and _rel(a, b) < 1e-10


def test_auto_uses_the_polynomial_once_then_eigh():
    x, xt, y = _data(n=120, m=30)
    pf = predict.gradient_descent_mse_ensemble(NET.kernel_fn, x, y, diag_reg=1e-3)
    first = pf(5.0, xt, "ntk", compute_cov=True)
    assert pf.last_method["ntk"]["method"] == "chebyshev"
    second = pf(5.0, xt, "ntk", compute_cov=True)  # a second call: eigh, computed once and cached
    assert pf.last_method["ntk"]["method"] == "eigh"
    assert _rel(first.mean, second.mean) < 1e-10 and _rel(first.covariance, second.covariance) < 1e-10


def test_falls_back_where_the_polynomial_cannot_be_trusted():
    x, xt, y = _data()
    # infinite time needs the pseudo-inverse: eigh
    pf = predict.gradient_descent_mse_ensemble(NET.kernel_fn, x, y, diag_reg=1e-3)
    pf.method = "chebyshev"
    pf([1.0, math.inf], xt, "ntk")
    assert pf.last_method["ntk"]["method"] == "eigh"
    # a singular kernel (duplicated points, no regulariser): not positive definite, eigh decides
    xd, yd = torch.cat([x, x[:5]]), torch.cat([y, y[:5]])
    pf = predict.gradient_descent_mse_ensemble(NET.kernel_fn, xd, yd)
    pf.method = "chebyshev"
    pf(2.0, xt, "ntk")
    assert pf.last_method["ntk"]["method"] == "eigh"
    # τ λ_max so large that no admissible degree exists
    pf = predict.gradient_descent_mse_ensemble(NET.kernel_fn, x, y, diag_reg=1e-3)
    pf.method = "chebyshev"
    pf(1e7, xt, "ntk")
    assert pf.last_method["ntk"]["method"] == "eigh"
    with pytest.raises(ValueError, match="method"):
        pf.method = "krylov"
        pf(1.0, xt, "ntk")
