"""Every torch activation lifted: each rule against nested adaptive scipy quadrature (tests/data/
activation_reference.json, made by tests/data/make_activation_reference.py) to the bound its docstring states,
and the lift of a small MLP per activation against Monte Carlo over wide PyTorch-initialised instances."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO
from torch import nn

import ntkit as nt
from ntkit.layers.activations import Piecewise, Smooth
from ntkit.layers.base import LiftOptions
from ntkit.lift import SUPPORTED, LiftError, lift

REF = json.loads((REPO / "tests" / "data" / "activation_reference.json").read_text())

#: reference name -> (module, stated relative error bound of K' and K̇)
MODULES = {
    "relu6": (nn.ReLU6(), 1e-9),
    "hardtanh": (nn.Hardtanh(), 1e-9),
    "hardtanh(-0.5,2)": (nn.Hardtanh(-0.5, 2.0), 1e-9),
    "hardswish": (nn.Hardswish(), 1e-9),
    "hardsigmoid": (nn.Hardsigmoid(), 1e-9),
    "softshrink": (nn.Softshrink(), 1e-9),
    "hardshrink": (nn.Hardshrink(), 1e-9),
    "threshold(0.3,-0.2)": (nn.Threshold(0.3, -0.2), 1e-9),
    "elu": (nn.ELU(), 1e-9),
    "elu(2)": (nn.ELU(2.0), 1e-9),
    "celu(0.5)": (nn.CELU(0.5), 1e-9),
    "selu": (nn.SELU(), 1e-9),
    "tanh": (nn.Tanh(), 1e-8),
    "sigmoid": (nn.Sigmoid(), 1e-8),
    "silu": (nn.SiLU(), 1e-8),
    "mish": (nn.Mish(), 1e-8),
    "softplus": (nn.Softplus(), 1e-8),
    "softplus(2,5)": (nn.Softplus(2.0, 5.0), 1e-8),
    "logsigmoid": (nn.LogSigmoid(), 1e-8),
    "softsign": (nn.Softsign(), 1e-8),
    "tanhshrink": (nn.Tanhshrink(), 1e-8),
}


def _rule(m: nn.Module):
    return SUPPORTED[type(m)](m, LiftOptions(deg=0))


def _triples():
    t = torch.tensor(REF["triples"], dtype=torch.float64)
    q11, q22, rho = t[:, 0], t[:, 1], t[:, 2]
    return rho * torch.sqrt(q11 * q22), q11, q22


@pytest.mark.parametrize("name", sorted(MODULES))
def test_activation_kernel_matches_quadrature_reference(name):
    m, bound = MODULES[name]
    layer = _rule(m)
    assert isinstance(layer, (Piecewise, Smooth))
    q12, q11, q22 = _triples()
    nngp, dot = layer.rule(q12, q11, q22, True)
    ref = REF["kernels"][name]
    r, rd = torch.tensor(ref["nngp"], dtype=torch.float64), torch.tensor(ref["dot"], dtype=torch.float64)
    err = ((nngp - r).abs() / torch.maximum(r.abs(), torch.sqrt(q11 * q22))).max()
    err_dot = ((dot - rd).abs() / rd.abs().clamp_min(1e-3)).max()
    assert err < bound and err_dot < bound, (float(err), float(err_dot))
    # symmetric in the two inputs, and the twin applies the very function the pieces describe
    nngp_t, _ = layer.rule(q12, q22, q11, False)
    assert torch.equal(nngp, nngp_t)
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    assert torch.allclose(layer.fn(x), m(x), atol=1e-12, rtol=0)
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(xg).sum(), xg)
    kinks = torch.tensor([-6.0, -3.0, -1.0, -0.5, 0.0, 0.3, 0.5, 1.0, 2.0, 2.5, 3.0, 6.0], dtype=torch.float64)
    away = (x[:, None] - kinks).abs().min(1).values > 1e-9
    assert torch.allclose(layer.derivative(x)[away], g[away], atol=1e-7, rtol=0)  # torch: 1/6 in float32


@pytest.mark.parametrize("name", ["relu6", "elu", "tanh", "softsign", "hardswish"])
def test_means_and_variances(name):
    """E[φ(u)] (the means a residual sum needs) and E[φ(u)²] against the 1-D reference (ρ = 1 rows)."""
    m, bound = MODULES[name]
    layer = _rule(m)
    q = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    w = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    phi = m(torch.sqrt(q)[:, None] * z)
    mean_ref = (w * phi).sum(-1)
    var_ref = (w * phi * phi).sum(-1)  # fine trapezoid grid: error ~1e-8 at the kinks
    assert torch.allclose(layer.mean_fn(q), mean_ref, atol=1e-6 * float(q.max()), rtol=1e-6)
    assert torch.allclose(layer.var_fn(q), var_ref, atol=1e-6, rtol=1e-6)


def test_closed_form_activations():
    """ReLU, LeakyReLU, PReLU (one or equal slopes), RReLU (eval), GELU map to closed forms."""
    assert isinstance(_rule(nn.ReLU()), nt.Relu)
    p = nn.PReLU(4)
    layer = _rule(p)
    assert isinstance(layer, nt.LeakyRelu) and layer.alpha == pytest.approx(0.25)
    assert _rule(nn.RReLU(0.1, 0.3).eval()).alpha == pytest.approx(0.2)
    assert isinstance(_rule(nn.GELU(approximate="tanh")), nt.Gelu)
    with torch.no_grad():
        p.weight[1] = 0.5
    with pytest.raises(LiftError, match=r"per-channel slopes differ.*Fix"):
        lift(nn.Sequential(nn.Linear(3, 4), p))
    with pytest.raises(LiftError, match=r"RReLU.*train mode.*model\.eval\(\)"):
        lift(nn.Sequential(nn.Linear(3, 4), nn.RReLU()))
    with pytest.raises(ValueError, match="deg="):
        lift(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), deg=1)
    # lift(deg=...) keeps Gauss–Hermite for the smooth ones
    assert isinstance(lift(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), deg=30).layers[1], nt.Elementwise)


def test_functional_forms_map_to_the_module_rules():
    class Net(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)
            self.act = act

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pairs = [
        (lambda h: F.relu6(h), nn.ReLU6()),
        (lambda h: F.elu(h, 0.7), nn.ELU(0.7)),
        (lambda h: torch.selu(h), nn.SELU()),
        (lambda h: F.celu(h, alpha=0.5), nn.CELU(0.5)),
        (lambda h: F.hardtanh(h, -2.0, 0.5), nn.Hardtanh(-2.0, 0.5)),
        (lambda h: F.hardswish(h), nn.Hardswish()),
        (lambda h: F.hardsigmoid(h), nn.Hardsigmoid()),
        (lambda h: F.softshrink(h, 0.3), nn.Softshrink(0.3)),
        (lambda h: F.hardshrink(h), nn.Hardshrink()),
        (lambda h: F.threshold(h, 0.1, 2.0), nn.Threshold(0.1, 2.0)),
        (lambda h: F.softplus(h, beta=2.0), nn.Softplus(2.0)),
        (lambda h: F.mish(h), nn.Mish()),
        (lambda h: F.logsigmoid(h), nn.LogSigmoid()),
        (lambda h: F.softsign(h), nn.Softsign()),
        (lambda h: F.tanhshrink(h), nn.Tanhshrink()),
        (lambda h: F.leaky_relu(h, 0.3), nn.LeakyReLU(0.3)),
        (lambda h: F.gelu(h, approximate="tanh"), nn.GELU("tanh")),
        (lambda h: h.sigmoid(), nn.Sigmoid()),
    ]
    for fn, mod in pairs:

        class Act(nn.Module):
            def forward(self, h, fn=fn):
                return fn(h)

        a = lift(Net(Act()))
        b = lift(nn.Sequential(nn.Linear(3, 8), mod, nn.Linear(8, 2)))
        assert [repr(layer) for layer in a.layers] == [repr(layer) for layer in b.layers], mod
    # and one kernel through the traced graph
    k = lift(Net(Act())).kernel_fn(x[:2], None, "ntk")
    k_ref = lift(nn.Sequential(nn.Linear(3, 8), nn.Sigmoid(), nn.Linear(8, 2))).kernel_fn(x[:2], None, "ntk")
    assert torch.allclose(k, k_ref, rtol=1e-13, atol=0)


#: one MLP per activation: Linear(8, W) -> act -> Linear(W, W) -> act -> Linear(W, 64)
MC_ACTS = [
    nn.ReLU6(),
    nn.Hardtanh(),
    nn.Hardswish(),
    nn.Hardsigmoid(),
    nn.Softshrink(),
    nn.Hardshrink(),
    nn.Threshold(0.3, -0.2),
    nn.ELU(),
    nn.CELU(0.5),
    nn.SELU(),
    nn.Tanh(),
    nn.Sigmoid(),
    nn.SiLU(),
    nn.Mish(),
    nn.Softplus(),
    nn.LogSigmoid(),
    nn.Softsign(),
    nn.Tanhshrink(),
    nn.PReLU(),
    nn.GELU(),
]


@pytest.mark.parametrize("act", MC_ACTS, ids=lambda m: type(m).__name__)
def test_lifted_mlp_matches_monte_carlo(act):
    """NNGP within 0.03 + 3σ of E[f(x) f(x')] over 40 PyTorch-initialised instances of width 256 (×256 outputs;
    each instance re-drawn by the modules' own reset_parameters): the limit of the model's own init. The hidden
    layers have no bias here: theirs (variance 1/(3·256)) vanishes in the limit but is 9 % of Softsign's small
    kernel at width 256 (tests/lift/test_lift_graph.py checks that limit); the first layer's bias stays."""
    width, outs, n_models = 256, 256, 40
    kw = {"dtype": torch.float64}
    act = act.to(torch.float64)
    model = nn.Sequential(
        nn.Linear(8, width, **kw),
        act,
        nn.Linear(width, width, bias=False, **kw),
        act,
        nn.Linear(width, outs, bias=False, **kw),
    )
    x = 4 * torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # q ≈ 5: the kinks
    k = lift(model).kernel_fn(x, None, "nngp")
    torch.manual_seed(0)
    per = []
    with torch.no_grad():
        for _ in range(n_models):
            for m in model:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
            f = model(x)
            per.append(f @ f.T / outs)
    p = torch.stack(per)
    mc, se = p.mean(0), p.std(0) / math.sqrt(n_models)
    err = float((mc - k).abs().max() / k.abs().max())
    tol = 0.03 + 3 * float(se.max() / k.abs().max())
    print(f"{type(act).__name__}: MC error {err:.4f} (tolerance {tol:.4f})")
    assert err < tol
