"""ntkit.gpytorch: analytic kernels with learnable W_std / b_std (skipped when gpytorch is absent)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

gpytorch = pytest.importorskip("gpytorch")

import ntkit as nt
from ntkit.integrations.gp_kernels import NNGPKernel, NTKKernel

NET = nt.serial(
    nt.Dense(64, W_std=1.5, b_std=0.2),
    nt.Relu(),
    nt.Dense(64, W_std=1.3, b_std=0.3),
    nt.Erf(),
    nt.Dense(1, W_std=0.9, b_std=0.1),
)


def _x(n, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cls", [NNGPKernel, NTKKernel])
def test_values_equal_kernel_fn(cls):
    k = cls(NET).double()
    x, z = _x(7), _x(4, seed=1)
    get = "nngp" if cls is NNGPKernel else "ntk"
    torch.testing.assert_close(k(x).to_dense(), NET.kernel_fn(x, None, get), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(k(x, z).to_dense(), NET.kernel_fn(x, z, get), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(k(x, diag=True), torch.diagonal(NET.kernel_fn(x, None, get)), rtol=1e-12, atol=1e-14)
    assert k.W_std.detach().tolist() == pytest.approx([1.5, 1.3, 0.9], rel=1e-14)


@pytest.mark.parametrize("cls", [NNGPKernel, NTKKernel])
def test_gradcheck_in_float64(cls):
    k = cls(NET)
    x, z = _x(5), _x(3, seed=2)
    w = k.W_std.detach().clone().requires_grad_()
    b = k.b_std.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w, b: k.kernel_matrix(x, None, w, b), (w, b))
    assert torch.autograd.gradcheck(lambda w, b: k.kernel_matrix(x, z, w, b), (w, b))


def test_gradient_closed_form_for_homogeneous_relu_net():
    # without biases a ReLU net's NNGP is prod_i W_std_i² × (a function of x): d log K / d W_std_i = 2 / W_std_i
    net = nt.serial(nt.Dense(8, W_std=1.2), nt.Relu(), nt.Dense(8, W_std=0.7), nt.Relu(), nt.Dense(1, W_std=1.9))
    k = NNGPKernel(net)
    x = _x(6)
    w = k.W_std.detach().clone().requires_grad_()
    kk = k.kernel_matrix(x, None, w, k.b_std)
    kk.sum().backward()
    torch.testing.assert_close(w.grad, 2 * kk.sum().detach() / w.detach(), rtol=1e-12, atol=0)


def test_marginal_likelihood_tuning_beats_the_true_hyperparameters():
    # data drawn from the GP prior with known (W_std, b_std); the tuned marginal likelihood must reach at
    # least the value at the truth, starting from far away.
    truth = nt.serial(nt.Dense(1, W_std=1.6, b_std=0.5), nt.Relu(), nt.Dense(1, W_std=1.6, b_std=0.5))
    x = _x(60, d=2, seed=3)
    noise = 1e-2
    cov = truth.kernel_fn(x, None, "nngp") + noise * torch.eye(60, dtype=torch.float64)
    y = torch.linalg.cholesky(cov) @ torch.randn(60, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    class GP(gpytorch.models.ExactGP):
        def __init__(self, net, lik):
            super().__init__(x, y, lik)
            self.mean = gpytorch.means.ZeroMean()
            self.cov = NNGPKernel(net)

        def forward(self, a):
            return gpytorch.distributions.MultivariateNormal(self.mean(a), self.cov(a))

    def mll_of(net, train: int):
        lik = gpytorch.likelihoods.GaussianLikelihood()
        lik.noise = noise
        lik.raw_noise.requires_grad_(False)
        model = GP(net, lik).double()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if train:
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=train, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = -mll(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        with torch.no_grad():
            return float(mll(model(x), y)), model

    at_truth, _ = mll_of(truth, 0)
    start = nt.serial(nt.Dense(1, W_std=0.5, b_std=2.0), nt.Relu(), nt.Dense(1, W_std=0.5, b_std=2.0))
    at_start, _ = mll_of(start, 0)
    tuned, model = mll_of(start, 25)
    assert at_start < at_truth - 0.5  # the start is clearly worse ...
    assert tuned >= at_truth - 0.02  # ... and tuning reaches the truth's likelihood (or better)
    assert all(math.isfinite(v) for v in model.cov.W_std.tolist() + model.cov.b_std.tolist())


def test_copy_pickle_and_errors():
    k = NTKKernel(NET)
    x = _x(4)
    k(x).to_dense()
    k2 = pickle.loads(pickle.dumps(copy.deepcopy(k)))
    torch.testing.assert_close(k2(x).to_dense(), k(x).to_dense())
    assert NET.layers[0].W_std == 1.5  # the user's net is never modified
    with pytest.raises(TypeError, match="ntkit network"):
        NNGPKernel("fc3")
    with pytest.raises(ValueError, match="no layer with a W_std"):
        NNGPKernel(nt.serial(nt.Relu()))
    fixed = NNGPKernel(NET, learn_W_std=False, learn_b_std=False)
    assert not list(fixed.parameters())
