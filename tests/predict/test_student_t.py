"""ntkit.predict.student_t_inference: scale mixture of NNGPs with an inverse-gamma prior (Lee et al. 2022)."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

import ntkit
from ntkit import predict

F64 = torch.float64
NET = ntkit.serial(
    ntkit.Dense(256, b_std=0.1), ntkit.Relu(), ntkit.Dense(256, b_std=0.1), ntkit.Relu(), ntkit.Dense(1, b_std=0.1)
)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, dtype=F64, generator=g)
    xt = torch.randn(6, 4, dtype=F64, generator=g)
    y = 3.0 * torch.sin(x @ torch.randn(4, 1, dtype=F64, generator=g))  # larger than the unit-variance prior
    return dict(
        x=x,
        xt=xt,
        y=y,
        k=NET.kernel_fn(x, None, "nngp"),
        kt=NET.kernel_fn(xt, x, "nngp"),
        ktt=NET.kernel_fn(xt, None, "nngp"),
    )


def test_posterior_matches_numerical_integration(problem):
    """Integrate σ² out by quadrature: marginal predictive density of one test output and E[σ² | y]."""
    p = problem
    alpha, beta, reg = 3.0, 2.0, 1e-2
    st = predict.student_t_inference(p["k"], p["y"], alpha=alpha, beta=beta, diag_reg=reg)
    out = st(p["kt"], p["ktt"])
    gp = predict.gp_inference(p["k"], p["y"], diag_reg=reg)("nngp", p["kt"], p["ktt"])
    assert torch.allclose(out.mean, gp.mean, atol=1e-12)

    # unnormalised log posterior of σ²: InvGamma(α, β) prior times N(y; 0, σ²(K + rI))
    kr = p["k"].numpy() + reg * np.mean(np.diag(p["k"].numpy())) * np.eye(20)
    y = p["y"].numpy()[:, 0]
    q = float(y @ np.linalg.solve(kr, y))
    n = y.size

    def log_post(s):
        return -(alpha + 1) * np.log(s) - beta / s - 0.5 * n * np.log(s) - 0.5 * q / s

    mode = (beta + q / 2) / (alpha + n / 2 + 1)
    c = log_post(mode)
    w = lambda s: np.exp(log_post(s) - c)

    def integral(fn):  # split at the mode, where the mass concentrates
        return sum(
            scipy.integrate.quad(fn, a, b, limit=200, epsrel=1e-11)[0]
            for a, b in ((0, mode), (mode, 10 * mode), (10 * mode, np.inf))
        )

    z = integral(w)
    e_s2 = integral(lambda s: s * w(s)) / z
    assert st.beta / (st.alpha - 1) == pytest.approx(e_s2, rel=1e-7)
    assert st.df == pytest.approx(2 * alpha + n) and st.beta == pytest.approx(beta + q / 2, rel=1e-10)
    # the predictive covariance is E[σ² | y]·Σ_gp
    assert torch.allclose(out.covariance, e_s2 * gp.covariance, rtol=1e-7, atol=1e-12)

    # the marginal density of test output 0 is a Student-t(df, mean, sqrt(scale)) at several values
    mu, s2_gp = float(out.mean[0, 0]), float(gp.covariance[0, 0])
    for f in (mu - 2.0, mu, mu + 0.7):
        dens = integral(lambda s: w(s) / z * scipy.stats.norm.pdf(f, mu, math.sqrt(s * s2_gp)))
        want = scipy.stats.t.pdf(f, st.df, mu, math.sqrt(float(out.scale[0, 0])))
        assert dens == pytest.approx(want, rel=1e-6)


def test_variance_grows_faster_than_nngp_out_of_distribution(problem):
    """Lee et al. 2022: the t-process adapts its scale to the data, so predictive variance rises faster
    away from the data than under the Gaussian NNGP (here both share the prior mean scale E[σ²] = 1)."""
    p = problem
    u = torch.tensor([[1.0, -0.5, 0.25, 2.0]], dtype=F64)
    scales = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=F64)
    xo = scales[:, None] * u  # moving out of the data's range along a ray
    kt, ktt = NET.kernel_fn(xo, p["x"], "nngp"), NET.kernel_fn(xo, None, "nngp")
    st = predict.student_t_inference(p["k"], p["y"], alpha=2.0, beta=1.0, diag_reg=1e-3)
    var_t = torch.diagonal(st(kt, ktt).covariance)
    var_gp = torch.diagonal(predict.gp_inference(p["k"], p["y"], diag_reg=1e-3)("nngp", kt, ktt).covariance)
    assert torch.all(var_gp[1:] > var_gp[:-1]) and torch.all(var_t[1:] > var_t[:-1])
    growth_t, growth_gp = var_t[1:] - var_t[0], var_gp[1:] - var_gp[0]
    assert torch.all(growth_t > 2.0 * growth_gp), (growth_t, growth_gp)
    # the ratio is the posterior scale factor, the same at every input: E[σ² | y] = β'/(α' - 1)
    assert torch.allclose(var_t / var_gp, torch.full_like(var_t, st.beta / (st.alpha - 1)), rtol=1e-8)


def test_gaussian_limit_and_errors(problem):
    p = problem
    s = 2.5
    a = 1e9
    st = predict.student_t_inference(p["k"], p["y"], alpha=a, beta=a * s, diag_reg=1e-2)
    out = st(p["kt"], p["ktt"])
    gp = predict.gp_inference(p["k"], p["y"], diag_reg=1e-2)("nngp", p["kt"], p["ktt"])
    assert torch.allclose(out.covariance, s * gp.covariance, rtol=1e-6)
    assert st(p["kt"]).scale is None and st(p["kt"]).mean.shape == (6, 1)
    with pytest.raises(ValueError, match="alpha"):
        predict.student_t_inference(p["k"], p["y"], alpha=0.0)
    low = predict.student_t_inference(p["k"][:1, :1], p["y"][:1], alpha=0.25, beta=1.0)(p["kt"][:, :1], p["ktt"])
    assert low.df == pytest.approx(1.5)
    with pytest.raises(ValueError, match="no finite covariance"):
        _ = low.covariance
