"""Gradients of the kernels: every public layer's NNGP and NTK pass ``torch.autograd.gradcheck`` (float64) in the
inputs and in the hyper-parameters (``Net.with_hyperparameters`` with tensors, as the GPyTorch kernels use them).

One :data:`CASES` entry per layer exported by ``ntkit.layers`` (a new layer without one fails
``test_every_public_layer_has_a_gradient_case``): the layer inside a small fully-connected net (``fc``) and/or a
small image net that pools (``img``: full pixel-pixel covariances), with a bias everywhere so that every
``W_std``/``b_std`` has an effect. Each case is checked on ``x2`` given (random pairs, away from the kinks of
the arc-cosine kernels) and on ``x2 = None`` (the diagonal, where correlations are exactly 1).

Issue #16, item 1: the NTK's gradients through ``Elementwise`` were off by 7–38 % (``derivative`` and
``d_nngp_fn`` detached their inputs, so ``K̇ = E[φ'(u) φ'(v)]`` was differentiated as a constant).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Optional

import pytest
import torch
from torch.autograd import gradcheck

import ntkit as nk
import ntkit.layers
from ntkit.layers import Layer

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass
class GradCase:
    """``make`` builds the layer; ``fc``/``img``: ``(before, after)`` layer lists around it (``None``: not
    applicable to that kind of input). The image nets must pool (full pixel covariances)."""

    make: Callable[[], Layer]
    fc: Optional[tuple[list, list]]
    img: Optional[tuple[list, list]]


def D(n=3, w=1.3, b=0.2):
    return nk.Dense(n, W_std=w, b_std=b)


def C(n=2, w=1.3, b=0.2):
    return nk.Conv(n, (2, 2), padding="SAME", W_std=w, b_std=b)


FC = ([D()], [D(1, 0.9, 0.1)])
IMG = ([C()], [C(), nk.GlobalAvgPool(), D(1, 0.9, 0.1)])


def act(make):
    return GradCase(make, FC, IMG)


CASES: dict[str, GradCase] = {
    "Relu": act(nk.Relu),
    "LeakyRelu": act(lambda: nk.LeakyRelu(0.1)),
    "ABRelu": act(lambda: nk.ABRelu(-0.5, 1.5)),
    "Abs": act(nk.Abs),
    "Sign": act(nk.Sign),
    "RectifiedMonomial": act(lambda: nk.RectifiedMonomial(2)),
    "Erf": act(lambda: nk.Erf(2.0, 0.5, 0.3)),
    "Sigmoid_like": act(nk.Sigmoid_like),
    "Gelu": act(nk.Gelu),
    "Sin": act(lambda: nk.Sin(2.0, 0.7, 0.4)),
    "Cos": act(nk.Cos),
    "Gabor": act(nk.Gabor),
    "Rbf": act(lambda: nk.Rbf(0.5)),
    "Gaussian": act(lambda: nk.Gaussian(0.7, -0.4)),
    "Exp": act(lambda: nk.Exp(1.0, 0.5)),
    "ExpNormalized": act(lambda: nk.ExpNormalized(1.0)),
    "Monomial": act(lambda: nk.Monomial(3)),
    "Polynomial": act(lambda: nk.Polynomial([0.5, -1.0, 0.25])),
    "Hermite": GradCase(
        lambda: nk.Hermite(2),
        ([D(), nk.LayerNorm()], [D(1, 0.9, 0.1)]),
        ([C(), nk.LayerNorm(axis=1)], [C(), nk.GlobalAvgPool(), D(1, 0.9, 0.1)]),
    ),
    # the generic paths: quadrature for K' and K̇ (φ' by autograd), and a closed form with K̇ by autograd
    "Elementwise": act(lambda: nk.Elementwise(torch.tanh, deg=12)),
    "Dense": GradCase(D, ([], [nk.Relu(), D(1, 0.9, 0.1)]), ([C()], [nk.Relu(), nk.GlobalAvgPool(), D(1)])),
    "Conv": GradCase(C, None, ([], [nk.Relu(), C(), nk.AvgPool((2, 2)), nk.Flatten(), D(1, 0.9, 0.1)])),
    "LayerNorm": GradCase(
        nk.LayerNorm, ([D()], [nk.Relu(), D(1)]), ([C()], [nk.Relu(), C(), nk.GlobalAvgPool(), D(1)])
    ),
    "Identity": GradCase(nk.Identity, ([D()], [nk.Relu(), D(1)]), ([C()], [nk.Relu(), nk.GlobalAvgPool(), D(1)])),
    "FanOut": GradCase(
        lambda: nk.FanOut(2),
        ([D()], [nk.parallel(nk.serial(nk.Relu(), D()), nk.Identity()), nk.FanInSum(), nk.Erf(), D(1)]),
        ([C()], [nk.parallel(nk.serial(nk.Relu(), C()), nk.Identity()), nk.FanInSum(), nk.GlobalAvgPool(), D(1)]),
    ),
    # two ReLU branches: the cross terms of their means enter the kernel (issue #16, item 3)
    "FanInSum": GradCase(
        nk.FanInSum,
        ([nk.FanOut(2), nk.parallel(nk.serial(D(), nk.Relu()), nk.serial(D(3, 0.9, 0.1), nk.Relu()))], [D(1)]),
        (
            [nk.FanOut(2), nk.parallel(nk.serial(C(), nk.Relu()), nk.serial(C(2, 0.9, 0.1), nk.Gelu()))],
            [nk.GlobalAvgPool(), D(1)],
        ),
    ),
    "FanInConcat": GradCase(
        nk.FanInConcat,
        ([nk.FanOut(2), nk.parallel(nk.serial(D(), nk.Relu()), nk.serial(D(2), nk.Erf()))], [D(1)]),
        ([nk.FanOut(2), nk.parallel(nk.serial(C(), nk.Relu()), C(1))], [C(), nk.GlobalAvgPool(), D(1)]),
    ),
    "FanInProd": GradCase(
        nk.FanInProd,
        ([nk.FanOut(2), nk.parallel(nk.serial(D(), nk.Relu()), D())], [D(1)]),
        ([nk.FanOut(2), nk.parallel(nk.serial(C(), nk.Relu()), C())], [C(), nk.GlobalAvgPool(), D(1)]),
    ),
    "AvgPool": GradCase(lambda: nk.AvgPool((2, 2), strides=(1, 1), padding="SAME"), None, IMG),
    "SumPool": GradCase(lambda: nk.SumPool((2, 2)), None, ([C()], [nk.Relu(), nk.Flatten(), D(1)])),
    "GlobalAvgPool": GradCase(nk.GlobalAvgPool, None, ([C()], [nk.Relu(), D(1)])),
    "GlobalSumPool": GradCase(nk.GlobalSumPool, None, ([C(w=0.5)], [nk.Relu(), D(1)])),
    "Flatten": GradCase(nk.Flatten, None, ([C(), nk.AvgPool((2, 2), padding="SAME")], [D(), nk.Relu(), D(1)])),
    "GlobalSelfAttention": GradCase(
        lambda: ntkit.layers.GlobalSelfAttention(2, 2, 2, 2, W_key_std=1.2, b_std=0.1),
        None,
        ([C()], [nk.Relu(), C(), nk.GlobalAvgPool(), D(1)]),
    ),
    # the layer zoo (issue #14): no tunables of their own; the gradients flow through their rules
    "Dropout": GradCase(
        lambda: nk.Dropout(0.6),
        ([D()], [D(), nk.Relu(), D(1, 0.9, 0.1)]),
        ([C()], [C(), nk.Relu(), nk.GlobalAvgPool(), D(1)]),
    ),
    "Index": GradCase(lambda: nk.Index(nk.Slice[:, :, ::-1, 1:]), None, IMG),
    "ImageResize": GradCase(lambda: nk.ImageResize((-1, -1, 4, 2), "linear"), None, IMG),
    "DotGeneral": GradCase(
        lambda: nk.DotGeneral(
            rhs=torch.tensor([[0.5, -1.0], [1.5, 0.3], [-0.7, 0.8]], dtype=F64),
            dimension_numbers=(((3,), (0,)), ((), ())),
        ),
        None,
        IMG,
    ),
    "ConvTranspose": GradCase(
        lambda: nk.ConvTranspose(2, (2, 2), strides=(2, 1), padding="SAME", W_std=1.1, b_std=0.3),
        None,
        ([C()], [nk.Relu(), nk.GlobalAvgPool(), D(1)]),
    ),
    "ConvLocal": GradCase(
        lambda: nk.ConvLocal(2, (2, 2), padding="SAME", W_std=1.1, b_std=0.3),
        None,
        ([C()], [nk.Relu(), nk.GlobalAvgPool(), D(1)]),
    ),
    "Aggregate": GradCase(
        lambda: nk.Aggregate(shared_pattern=torch.rand(3, 3, 3, 3, generator=torch.Generator().manual_seed(4))),
        None,
        IMG,
    ),
}

ABSTRACT = {"Layer", "ElementwiseLayer"}

#: numerical (quasi-Monte-Carlo) rules, whose sample counts adapt to the values: they refuse autograd with a
#: LayerError instead of returning the gradient of one sample set (tested below)
NO_GRADIENTS = {"MaxPool": lambda: nk.serial(C(), ntkit.layers.MaxPool(2, activation=nk.Relu()), nk.Flatten(), D(1))}


def public_layers() -> set[str]:
    return {
        n
        for n in ntkit.layers.__all__
        if isinstance(getattr(ntkit.layers, n), type) and issubclass(getattr(ntkit.layers, n), Layer)
    } - ABSTRACT


def test_every_public_layer_has_a_gradient_case():
    missing = public_layers() - set(CASES) - set(NO_GRADIENTS)
    assert not missing, f"add a GradCase to tests/layers/test_gradients.py for {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(NO_GRADIENTS))
def test_numerical_rules_refuse_autograd(name):
    net = NO_GRADIENTS[name]()
    x = torch.randn(2, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    with pytest.raises(ntkit.layers.LayerError):
        net.kernel_fn(x, None, "nngp")


def _inputs(where: str):
    g = torch.Generator().manual_seed(1)
    if where == "fc":
        return torch.randn(3, 3, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)
    return torch.randn(2, 1, 3, 3, generator=g, dtype=F64), torch.randn(1, 1, 3, 3, generator=g, dtype=F64)


def _check(net, x1, x2):
    """gradcheck of (nngp, ntk) in x1, x2 (if given) and every hyper-parameter of ``net``."""
    names = sorted(net.hyperparameters())
    hp = [torch.tensor(float(net.hyperparameters()[n]), dtype=F64, requires_grad=True) for n in names]
    xs = [x1.clone().requires_grad_(True)] + ([] if x2 is None else [x2.clone().requires_grad_(True)])

    def f(*args):
        a, b = args[0], (args[1] if x2 is not None else None)
        vals = args[len(xs) :]
        k = net.with_hyperparameters(dict(zip(names, vals))).kernel_fn(a, b)
        return k.nngp, k.ntk

    assert gradcheck(f, (*xs, *hp), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("where", ["fc", "img"])
def test_gradcheck_inputs_and_hyperparameters(name, where):
    case = CASES[name]
    emb = case.fc if where == "fc" else case.img
    if emb is None:
        pytest.skip(f"{name} has no {where} embedding")
    before, after = emb
    net = nk.serial(*before, case.make(), *after)
    x1, x2 = _inputs(where)
    for b in (x2, None):
        _check(net, x1, b)


def _ntk_grad_case():
    net = nk.serial(nk.Dense(8, 1.3, 0.2), nk.Elementwise(torch.tanh), nk.Dense(1, 1.1, 0.1))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    return net, x


def test_elementwise_ntk_gradient_matches_finite_differences():
    """The issue's defect, in numbers: d NTK/d W_std through Elementwise(tanh) by autograd against a central
    difference (before the fix autograd gave a gradient 7–38 % off; the NNGP's was right)."""
    net, x = _ntk_grad_case()

    def ntk_sum(w) -> torch.Tensor:
        return net.with_hyperparameters({"0.W_std": w}).kernel_fn(x, get="ntk").sum()

    w = torch.tensor(1.3, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(ntk_sum(w), w)
    h = 1e-5
    fd = (ntk_sum(torch.tensor(1.3 + h, dtype=F64)) - ntk_sum(torch.tensor(1.3 - h, dtype=F64))) / (2 * h)
    assert abs(float(g) - float(fd)) < 1e-7 * abs(float(fd))


def test_generic_derivative_paths_are_differentiable():
    """``ElementwiseLayer.derivative`` and ``d_nngp_fn`` (autograd defaults) keep the graph when autograd records
    through their arguments, and stay plain tensors otherwise (no graph in a kernel_fn without gradients)."""
    layer = nk.Elementwise(torch.tanh, nngp_fn=lambda a, b, c: a * torch.exp(-b - c), name="toy")
    q = torch.tensor([0.3, 0.5], dtype=F64, requires_grad=True)
    v = torch.tensor([1.0, 2.0], dtype=F64)
    d2 = layer.d_nngp_fn(q, v, v)  # = exp(-b-c), independent of q12 but not of the variances
    assert not d2.requires_grad
    vv = v.clone().requires_grad_(True)
    d3 = layer.d_nngp_fn(q.detach(), vv, vv)
    (gv,) = torch.autograd.grad(d3.sum(), vv)
    assert torch.allclose(gv, -2 * torch.exp(-2 * v))
    x = torch.tensor([0.2, -0.7], dtype=F64, requires_grad=True)
    dphi = layer.derivative(x)
    (g2,) = torch.autograd.grad(dphi.sum(), x)  # φ'' of tanh: −2 tanh (1 − tanh²)
    t = torch.tanh(x.detach())
    assert torch.allclose(g2, -2 * t * (1 - t * t))
    with torch.no_grad():
        assert not layer.derivative(x).requires_grad
    assert not layer.derivative(x.detach()).requires_grad


def test_kernel_without_gradients_builds_no_graph():
    net, x = _ntk_grad_case()
    k = net.kernel_fn(x)
    assert not k.ntk.requires_grad and not k.nngp.requires_grad


def test_user_derivative_aliasing_its_input_is_not_modified_in_place():
    """A user's ``d_nngp_fn`` may return its input (φ = identity: K̇ = 1 is fine, K̇ = q12 for φ(x) = x²/√2 is
    ``q12`` itself, shared with the record): the NTK product must not write into it."""
    lin = nk.Elementwise(lambda t: t * t / math.sqrt(2), nngp_fn=lambda a, b, c: a * a + b * c / 2, name="sq")
    lin._d_nngp = lambda a, b, c: a * 2  # a fresh tensor: in place is fine
    net = nk.serial(nk.Dense(4, 1.2, 0.3), lin, nk.Dense(1))
    alias = nk.Elementwise(lin.fn, nngp_fn=lin._nngp, d_nngp_fn=lambda a, b, c: a, name="alias")
    twice = nk.serial(nk.Dense(4, 1.2, 0.3), alias, nk.Dense(1))
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    k1, k2 = net.kernel_fn(x, x + 0.1), twice.kernel_fn(x, x + 0.1)
    # K̇ = q12 vs 2 q12: the NNGPs agree, the NTKs differ only by the K̇ factor in the second Dense's Θ term
    assert torch.equal(k1.nngp, k2.nngp)
    pre = nk.serial(nk.Dense(4, 1.2, 0.3)).kernel_fn(x, x + 0.1)
    assert torch.allclose(k1.ntk - k1.nngp, 2 * (k2.ntk - k2.nngp))
    assert torch.allclose(k2.ntk - k2.nngp, pre.nngp * pre.ntk)
