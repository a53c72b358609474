"""Empirical kernels: NT parity, convergence to the analytic NTK with width, NNGP/kernel_fn, linearize and
taylor_expand, and the errors bad input gets."""

from __future__ import annotations

import pytest
import torch
from helpers import load_reference, rel_err
from torch import nn

import ntkit
from ntkit.empirical import EmpiricalError, empirical_kernel_fn, empirical_nngp, empirical_ntk, linearize, taylor_expand

IMPLS = ("jacobian", "ntk_vp", "structured", "auto")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).double()


def _x(n, d=5, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# NT parity and the infinite-width limit
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_with_nt_empirical_mlp(impl):
    ref = load_reference("empirical_mlp")
    net = ntkit.serial(
        ntkit.Dense(32, b_std=0.1), ntkit.Relu(), ntkit.Dense(32, b_std=0.1), ntkit.Relu(), ntkit.Dense(4, b_std=0.1)
    )
    model = net.module(6, seed=0).double()
    dense = [m for m in model.modules() if hasattr(m, "parameterization")]
    with torch.no_grad():  # NT keeps Dense weights as (in, out) and biases as (1, out)
        for k, m in enumerate(dense):
            m.weight.copy_(torch.from_numpy(ref[f"param_{2 * k}"]).T)
            m.bias.copy_(torch.from_numpy(ref[f"param_{2 * k + 1}"])[0])
    x1, x2 = torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"])
    assert rel_err(empirical_ntk(model, x1, x2, implementation=impl), ref["ntk_traced"]) < 1e-12
    assert rel_err(empirical_ntk(model, x1, x2, implementation=impl, trace_axes=()), ref["ntk_full"]) < 1e-12


def test_wide_twin_approaches_analytic_ntk():
    """One network per width: the relative error falls like 1/sqrt(width) (16x wider: ~4x smaller)."""
    net = ntkit.serial(
        ntkit.Dense(8, W_std=1.4, b_std=0.2), ntkit.Erf(), ntkit.Dense(8, W_std=1.2), ntkit.Relu(), ntkit.Dense(2)
    )
    x = _x(4, 3, seed=4)
    ana = net.kernel_fn(x, get="ntk")
    errs = []
    for w in (16, 256, 4096):
        errs.append(
            sum(rel_err(empirical_ntk(net.module(3, width=w, seed=s).double(), x), ana.numpy()) for s in range(2)) / 2
        )
    assert errs[2] < errs[1] / 2 < errs[0] / 4
    assert errs[2] < 0.08


# ---------------------------------------------------------------------------------------------------
# NNGP and kernel_fn
# ---------------------------------------------------------------------------------------------------
def test_empirical_nngp_of_a_layer_and_of_the_output():
    model = _mlp()
    x1, x2 = _x(4), _x(3, seed=2)
    with torch.no_grad():
        h1, h2 = model[:2](x1), model[:2](x2)
        o1, o2 = model(x1), model(x2)
    torch.testing.assert_close(empirical_nngp(model, x1, x2, layer="1"), h1 @ h2.T / 12)
    torch.testing.assert_close(
        empirical_nngp(model, x1, x2, layer=model[1], trace_axes=()), torch.einsum("ia,jb->ijab", h1, h2)
    )
    torch.testing.assert_close(empirical_nngp(model, x1, x2), o1 @ o2.T / 3)
    torch.testing.assert_close(empirical_nngp(model, x1, diagonal_axes=(0,)), (o1 * o1).mean(1))


def test_empirical_kernel_fn_is_like_kernel_fn():
    model = _mlp()
    x1, x2 = _x(4), _x(3, seed=2)
    kfn = empirical_kernel_fn(model)
    k = kfn(x1, x2)
    assert isinstance(k, ntkit.Kernel) and k.nngp.shape == (4, 3) and k.ntk.shape == (4, 3)
    assert k.cov1.shape == (4,) and k.cov2.shape == (3,) and not k.x1_is_x2
    torch.testing.assert_close(k.ntk, empirical_ntk(model, x1, x2))
    torch.testing.assert_close(kfn(x1, get="ntk"), empirical_ntk(model, x1))
    k11 = kfn(x1)
    assert k11.cov2 is None and k11.x1_is_x2
    torch.testing.assert_close(k11.cov1, torch.diagonal(k11.nngp))


# ---------------------------------------------------------------------------------------------------
# linearize and taylor_expand
# ---------------------------------------------------------------------------------------------------
def _flat_jacobian(model, x):
    ps = list(model.parameters())
    out = model(x).reshape(-1)
    return torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, ps, retain_graph=True)]) for o in out]
    ).reshape(x.shape[0], -1, sum(p.numel() for p in ps))


def test_linearize_matches_model_at_theta0_and_moves_by_j_dtheta():
    model = _mlp()
    x, xt = _x(6), _x(4, seed=7)
    y = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lin = linearize(model)
    # output and parameter gradients agree with the model's at θ0
    torch.testing.assert_close(lin(xt), model(xt))
    g_lin = torch.autograd.grad(((lin(x) - y) ** 2).sum(), list(lin.parameters()))
    g_mod = torch.autograd.grad(((model(x) - y) ** 2).sum(), list(model.parameters()))
    for a, b in zip(g_lin, g_mod):
        torch.testing.assert_close(a, b)
    # a few optimiser steps: outputs move by exactly J(θ0)·Δθ
    opt = torch.optim.SGD(lin.parameters(), lr=0.05, momentum=0.5)
    for _ in range(5):
        opt.zero_grad()
        ((lin(x) - y) ** 2).mean().backward()
        opt.step()
    dtheta = torch.cat([(p - before[n]).reshape(-1) for n, p in lin.current().items()])
    assert float(dtheta.abs().max()) > 1e-3  # it did move
    expected = model(xt) + torch.einsum("iap,p->ia", _flat_jacobian(model, xt), dtheta)
    torch.testing.assert_close(lin(xt), expected, rtol=1e-10, atol=1e-12)
    # the model itself was not trained
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    # its NTK at θ0 is the model's
    torch.testing.assert_close(empirical_ntk(linearize(model), x), empirical_ntk(model, x))


def test_linearize_a_subset_keeps_the_rest_fixed():
    model = _mlp()
    lin = linearize(model, params0=list(model[4].parameters()))
    assert sum(p.numel() for p in lin.parameters()) == 12 * 3 + 3
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.1)
    x = _x(3)
    with torch.no_grad():
        h = model[:4](x)
        torch.testing.assert_close(lin(x), model(x) + 0.1 * h.sum(1, keepdim=True) + 0.1)


def test_taylor_expand_is_exact_for_polynomials_in_the_parameters():
    """A deep linear net is quadratic in its parameters: degree 2 reproduces it anywhere, degree 1 does not."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 2, bias=False)).double()
    x = _x(3, 4)
    t0, t1, t2 = (taylor_expand(model, None, d) for d in (0, 1, 2))
    with torch.no_grad():
        for t in (t0, t1, t2):
            for p in t.parameters():
                p.add_(0.3 * torch.randn_like(p, dtype=torch.float64))
            t.load_state_dict(t2.state_dict())
        moved = {n: p.detach() for n, p in t2.current().items()}
        truth = torch.func.functional_call(model, moved, (x,))
        torch.testing.assert_close(t2(x), truth, rtol=1e-12, atol=1e-12)
        assert rel_err(t1(x), truth) > 1e-3
        torch.testing.assert_close(t0(x), model(x))


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_get_one_clear_error():
    model = _mlp()
    x = _x(3)
    with pytest.raises(EmpiricalError, match="rejected inputs of per-sample shape"):
        empirical_ntk(model, _x(3, 4))
    with pytest.raises(EmpiricalError, match="per-sample shape"):
        empirical_ntk(model, x, _x(2, 6))
    with pytest.raises(EmpiricalError, match="params not in the model"):
        empirical_ntk(model, x, params=["9.weight"])
    with pytest.raises(EmpiricalError, match="not a parameter of the model"):
        empirical_ntk(model, x, params=[torch.zeros(3)])
    with pytest.raises(EmpiricalError, match="has shape"):
        empirical_ntk(model, x, params={"0.weight": torch.zeros(2, 2)})
    with pytest.raises(EmpiricalError, match="out of range"):
        empirical_ntk(model, x, trace_axes=(2,))
    with pytest.raises(EmpiricalError, match="batch axis"):
        empirical_ntk(model, x, trace_axes=(0,))
    with pytest.raises(EmpiricalError, match="both trace_axes and diagonal_axes"):
        empirical_ntk(model, x, trace_axes=(-1,), diagonal_axes=(1,))
    with pytest.raises(EmpiricalError, match="as many samples"):
        empirical_ntk(model, x, _x(2), diagonal_axes=(0,))
    with pytest.raises(EmpiricalError, match="implementation"):
        empirical_ntk(model, x, implementation="fast")
    with pytest.raises(EmpiricalError, match="NaN"):
        empirical_ntk(model, torch.full((2, 5), float("nan"), dtype=torch.float64))
    with pytest.raises(EmpiricalError, match="block_size"):
        empirical_ntk(model, x, block_size=0)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.1), nn.Linear(4, 2)).double()
    with pytest.raises(EmpiricalError, match=r"model\.eval\(\)"):
        empirical_ntk(bn, x)
    with pytest.raises(EmpiricalError, match="not a submodule"):
        empirical_nngp(model, x, layer="head")
    with pytest.raises(TypeError, match="nn.Module"):
        empirical_ntk(lambda t: t, x)


def test_scalar_outputs_need_trace_axes_empty():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double()
    x = _x(3)
    with pytest.raises(EmpiricalError, match="trace_axes=\\(\\)"):
        empirical_ntk(model, x)
    k = empirical_ntk(model, x, trace_axes=())
    assert k.shape == (3, 3)
