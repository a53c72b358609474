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
from ntkit.predict._matfun import MAX_REL_ERROR, apply_plan, phi_plan, spectrum_bound, usable

F64 = torch.float64
NET = ntkit.serial(ntkit.Dense(64, b_std=0.1), ntkit.Relu(), ntkit.Dense(64), ntkit.Relu(), ntkit.Dense(2))


def _data(n=40, m=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(n, 3, dtype=F64, generator=g), torch.randn(m, 3, dtype=F64, generator=g)
    return x, xt, torch.randn(n, 2, dtype=F64, generator=g)


def _phi(x):
    """The reference ``φ(x) = (1 − e^{−x})/x`` (``φ(0) = 1``), elementwise."""
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.ones_like(x), -torch.expm1(-safe) / safe)


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


def _spectrum_matrix(n=60, top=50.0, rest=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    lam = torch.cat([torch.tensor([top], dtype=F64), rest * torch.rand(n - 1, dtype=F64, generator=g)])
    a = (q * lam) @ q.T
    return (a + a.T) / 2, q, lam, torch.randn(n, 7, dtype=F64, generator=g)


@pytest.mark.parametrize("tau", [0.05, 0.3, 1.0])
def test_deflated_matfun_and_quad_form_match_the_eigendecomposition(tau):
    """The top eigenpair deflated (power iteration), ``g(Θ) B`` and ``Bᵀ g(Θ) B`` (half the products) agree
    with the eigendecomposition to 1e-13, with lower degrees than the whole spectrum needs."""
    from ntkit.predict._matfun import apply_matfun, deflate_top, deflated_plan, quad_form

    a, q, lam, b = _spectrum_matrix()
    g = (q * (-torch.expm1(-tau * lam) / lam)) @ q.T
    bound = spectrum_bound(a)
    defl = deflate_top(a, 1e-13)
    assert defl is not None and defl.resid < 1e-12 and abs(defl.theta - 50.0) < 1e-12
    assert defl.b < 3.0 * math.sqrt(59) and defl.b >= float(lam[1:].max())
    plan, full = deflated_plan(tau, defl, bound), phi_plan(tau, bound)
    assert plan.degree < full.degree and usable(plan)
    assert _rel(apply_matfun(a, b, plan, defl), g @ b) < 1e-13
    qf = quad_form(a, b, plan, defl)
    assert torch.equal(qf, qf.T) and _rel(qf, b.T @ g @ b) < 1e-13
    assert _rel(quad_form(a, b, full), b.T @ g @ b) < 1e-13


def test_deflation_error_bound_holds_for_an_inexact_eigenvector():
    """A deflation stopped early (large residual) reports ``rel_deflation`` ``τ‖r‖/(√2 φ(τb))``, and the actual
    error of ``g(θvvᵀ + PΘP) B`` against ``g(Θ) B`` is below it (relative to ``τ φ(τb) ‖B‖₂``)."""
    from ntkit.predict._matfun import _phi1, apply_matfun, deflate_top, deflated_plan

    a, q, lam, b = _spectrum_matrix(top=8.0, rest=4.0)
    tau = 0.4
    defl = deflate_top(a, 1e-3, steps=40)
    assert defl is not None and defl.resid > 1e-8
    bound = spectrum_bound(a)
    plan = deflated_plan(tau, defl, bound)
    g = (q * (-torch.expm1(-tau * lam) / lam)) @ q.T
    err = float(torch.linalg.matrix_norm(apply_matfun(a, b, plan, defl) - g @ b, 2))
    scale = tau * _phi1(tau * bound) * float(torch.linalg.matrix_norm(b, 2))
    assert err / scale <= plan.rel_deflation + plan.rel_bound + 1e-14
    assert plan.rel_deflation < 50 * err / scale  # and not vacuous


def test_certified_bound_is_an_upper_bound_and_refuses_below_the_spectrum():
    from ntkit.predict._matfun import certified_bound, deflate_top

    a, _, lam, _ = _spectrum_matrix()
    defl = deflate_top(a, 1e-13)
    top = float(torch.linalg.eigvalsh(defl.M)[-1])
    got = certified_bound(defl.M, 1.1 * top, defl.fro)
    assert got is not None and top <= got < 1.2 * top
    assert certified_bound(defl.M, 0.9 * top, defl.fro) is None


def test_series_bound_holds_and_is_tight():
    """The coefficient-series bound on the interpolant's error is above the measured error and within 100x."""
    from ntkit.predict._matfun import _coeffs, _series_bound

    s = torch.cos(torch.linspace(0, math.pi, 2001, dtype=F64))
    for L, d in ((0.1, 4), (0.35, 6), (1.4, 9)):
        c = torch.from_numpy(_coeffs(L, d))
        t = torch.stack([torch.cos(k * torch.arccos(s)) for k in range(d + 1)])
        err = float((c @ t - _phi(L * (1 + s) / 2)).abs().max())
        assert err <= _series_bound(L, d) < 100 * err


def test_benchmark_case_deflates_and_matches_eigh():
    """The predict benchmark's kernel (one eigenvalue far above the rest) takes the deflated path, at low degree,
    and agrees with the eigendecomposition path to 1e-12."""
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(120, 8, dtype=F64, generator=g), torch.randn(30, 8, dtype=F64, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    net = ntkit.serial(*([ntkit.Dense(64), ntkit.Relu()] * 3), ntkit.Dense(1))
    out = {}
    for method in ("eigh", "chebyshev"):
        pf = predict.gradient_descent_mse_ensemble(net.kernel_fn, x, y, diag_reg=1e-4)
        pf.method = method
        out[method] = pf(10.0, xt, ("nngp", "ntk"), compute_cov=True)
        if method == "chebyshev":
            assert all(v["deflated"] and max(v["degree"]) <= 8 for v in pf.last_method.values())
    for name in ("nngp", "ntk"):
        a, b = getattr(out["chebyshev"], name), getattr(out["eigh"], name)
        assert _rel(a.mean, b.mean) < 1e-12 and _rel(a.covariance, b.covariance) < 1e-12


@pytest.mark.parametrize("tau", [0.02, 0.1])
def test_float32_tail_within_its_round_off_estimate(tau):
    """The last terms of the recurrence in float32 (``ChebyshevPlan.float32_from``): the result differs from the
    all-float64 evaluation of the same polynomial by less than the tail's round-off estimate (at most
    ``FLOAT32_RTOL`` relative), and from the eigendecomposition by less than 1e-12; small matrices stay in
    float64."""
    import dataclasses

    from ntkit.predict._matfun import FLOAT32_MIN_N, FLOAT32_RTOL, _float32_round_off, _phi1

    n = 300
    a, q, lam, _ = _spectrum_matrix(n=n, top=6.0, rest=5.0, seed=1)
    b = torch.randn(n, 40, dtype=F64, generator=torch.Generator().manual_seed(4))
    bound = spectrum_bound(a)
    plan = phi_plan(tau, bound, n=n)
    k0 = plan.float32_from
    assert k0 is not None and 1 <= k0 <= plan.degree and usable(plan)
    assert phi_plan(tau, bound, n=FLOAT32_MIN_N - 1).float32_from is None
    est = _float32_round_off(plan.coeffs.numpy(), k0, n)
    assert est <= FLOAT32_RTOL * tau * _phi1(tau * bound)
    mixed = apply_plan(a, b, plan)
    full = apply_plan(a, b, dataclasses.replace(plan, float32_from=None))
    assert mixed.dtype == F64
    diff = float(torch.linalg.matrix_norm(mixed - full, 2)) / float(torch.linalg.matrix_norm(b, 2))
    assert 0.0 < diff <= est < 1000 * diff  # float32 did run, and stayed within the estimate (not vacuous)
    g = (q * (-torch.expm1(-tau * lam) / lam)) @ q.T
    assert _rel(mixed, g @ b) < 1e-12


def test_quad_form_float32_tail_within_its_round_off_estimate():
    """``quad_form`` with its ``X_j`` from ``quad_float32_from`` on in float32 differs from the all-float64 form
    by less than the tail's estimate (``_quad_float32_round_off``, relative to ``‖B‖₂²``), and from the
    eigendecomposition by less than 1e-12."""
    import dataclasses

    from ntkit.predict._matfun import FLOAT32_RTOL, _phi1, _quad_float32_round_off, quad_form

    n, tau = 300, 0.3
    a, q, lam, _ = _spectrum_matrix(n=n, top=6.0, rest=5.0, seed=2)
    b = torch.randn(n, 30, dtype=F64, generator=torch.Generator().manual_seed(5))
    bound = spectrum_bound(a)
    plan = phi_plan(tau, bound, n=n)
    j0 = plan.quad_float32_from
    assert j0 is not None and 2 <= j0 <= (plan.degree + 1) // 2 and usable(plan)
    est = _quad_float32_round_off(plan.coeffs.numpy(), j0, n)
    assert est <= FLOAT32_RTOL * tau * _phi1(tau * bound)
    mixed = quad_form(a, b, plan)
    full = quad_form(a, b, dataclasses.replace(plan, quad_float32_from=None))
    diff = float(torch.linalg.matrix_norm(mixed - full, 2)) / float(torch.linalg.matrix_norm(b, 2)) ** 2
    assert torch.equal(mixed, mixed.T) and 0.0 < diff <= est < 1000 * diff
    g = (q * (-torch.expm1(-tau * lam) / lam)) @ q.T
    assert _rel(mixed, b.T @ g @ b) < 1e-12
