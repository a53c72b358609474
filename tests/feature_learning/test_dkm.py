"""Deep kernel machines (Aitchison et al. 2023): ν → ∞ is NNGP regression; finite ν learns representations."""

from __future__ import annotations

import pytest
import torch

import ntkit as nt
from ntkit import predict
from ntkit.feature_learning import dkm
from ntkit.feature_learning._kernels import affine_map, nonlinear_map

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _data(P=24, Q=8, D=3, out=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, D, generator=g, dtype=F64)
    xq = torch.randn(Q, D, generator=g, dtype=F64)
    w = torch.randn(D, out, generator=g, dtype=F64)
    y = torch.sin(2 * x @ w) + 0.1 * torch.randn(P, out, generator=g, dtype=F64)
    return x, (y[:, 0] if out == 1 else y), xq


NETS = {
    "relu-1": nt.serial(nt.Dense(32, W_std=1.4, b_std=0.1), nt.Relu(), nt.Dense(1, W_std=1.4, b_std=0.1)),
    "erf-2": nt.serial(nt.Dense(32, W_std=1.5), nt.Erf(), nt.Dense(32, W_std=1.5), nt.Erf(), nt.Dense(1)),
    "relu-3": nt.serial(*[m for _ in range(3) for m in (nt.Dense(32, W_std=1.4, b_std=0.05), nt.Relu())], nt.Dense(1)),
}


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("out", [1, 2])
def test_infinite_nu_is_nngp_gp_inference(name, out):
    net = NETS[name]
    x, y, xq = _data(out=out)
    fit = dkm(net, x, y, nu=1e8, noise_var=0.05, x_test=xq)
    k = net.kernel_fn(x, None, "nngp")
    gp = predict.gp_inference(k, y if out > 1 else y[:, None], diag_reg=0.05, diag_reg_absolute_scale=True)
    post = gp("nngp", k_test_train=net.kernel_fn(xq, x, "nngp"), k_test_test=net.kernel_fn(xq, None, "nngp"))
    assert fit.mean is not None and fit.variance is not None
    mean = post.mean.reshape(fit.mean.shape)
    var = torch.diagonal(post.covariance)  # (Q, Q): the kernel is shared by the outputs (trace_axes)
    assert float((fit.mean - mean).abs().max() / mean.abs().max()) < 1e-6
    assert float((fit.variance - var).abs().max() / var.abs().max()) < 1e-6
    # and the (barely moved) Grams are the NNGP's
    for g, g0 in zip(fit.train_grams, fit.nngp_train_grams):
        assert float((g - g0).abs().max() / g0.abs().max()) < 1e-6


def test_finite_nu_learns_the_representation():
    net = NETS["erf-2"]
    x, y, xq = _data(P=30)
    fit = dkm(net, x, y, nu=1.0, noise_var=0.05, x_test=xq)
    assert fit.objective > fit.objective_nngp + 1e-3  # the optimiser improved on the NNGP
    for g, g0 in zip(fit.train_grams, fit.nngp_train_grams):
        assert float((g - g0).norm() / g0.norm()) > 1e-2  # the learned Gram matrices moved
        assert float(torch.linalg.eigvalsh(g).min()) > -1e-10  # and stay PSD
    # the NNGP Grams of the fit are the layer rules applied in turn (ntkit's own rules)
    G = x @ x.T / x.shape[1]
    G = affine_map(net.layers[0], G)
    assert torch.allclose(fit.nngp_train_grams[0], G, atol=1e-12)
    G2 = affine_map(net.layers[2], nonlinear_map(net.layers[1], G)[0])
    assert torch.allclose(fit.nngp_train_grams[1], G2, atol=1e-12)
    # larger ν moves the Grams less (ν → ∞ pins them)
    fit10 = dkm(net, x, y, nu=100.0, noise_var=0.05)
    move = lambda f: float((f.train_grams[-1] - f.nngp_train_grams[-1]).norm())
    assert move(fit10) < move(fit)
    # predict(nngp=True) is NNGP regression whatever was learned
    m0, _ = fit.predict(xq, nngp=True)
    k = net.kernel_fn(x, None, "nngp")
    gp_mean = predict.gp_inference(k, y[:, None], diag_reg=0.05, diag_reg_absolute_scale=True)(
        "nngp", k_test_train=net.kernel_fn(xq, x, "nngp")
    )
    assert torch.allclose(m0, gp_mean, rtol=1e-8, atol=1e-10)


def test_inducing_points_all_training_points_is_the_exact_dkm():
    net = NETS["relu-1"]
    x, y, xq = _data(P=20)
    exact = dkm(net, x, y, nu=2.0, noise_var=0.05, x_test=xq)
    same = dkm(net, x, y, nu=2.0, noise_var=0.05, x_test=xq, inducing=x)
    assert exact.mean is not None and same.mean is not None
    assert torch.allclose(exact.mean, same.mean, atol=1e-8)
    sub = dkm(net, x, y, nu=2.0, noise_var=0.05, x_test=xq, num_inducing=10)
    assert sub.grams[0].shape == (10, 10) and sub.train_grams[0].shape == (20, 20)
    assert sub.mean is not None and torch.isfinite(sub.mean).all()


def test_kernel_maps_are_differentiable():
    x = torch.randn(6, 3, dtype=F64)
    G = (x @ x.T / 3).requires_grad_(True)
    for phi in (nt.Relu(), nt.Erf(), nt.Gelu()):
        k, _ = nonlinear_map(phi, G)
        (gr,) = torch.autograd.grad(k.sum(), G)
        assert torch.isfinite(gr).all()
    Gd = G.detach()
    assert torch.autograd.gradcheck(lambda g: nonlinear_map(nt.Erf(), (g + g.T) / 2)[0], (Gd.clone().requires_grad_(),))


def test_dkm_errors():
    x, y, _ = _data(P=6)
    net = NETS["relu-1"]
    with pytest.raises(ValueError, match="nu"):
        dkm(net, x, y, nu=[1.0, 2.0], noise_var=0.1)
    with pytest.raises(ValueError, match="noise_var"):
        dkm(net, x, y, nu=1.0, noise_var=0.0)
    with pytest.raises(ValueError, match="not both"):
        dkm(net, x, y, nu=1.0, noise_var=0.1, inducing=x, num_inducing=3)
