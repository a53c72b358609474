"""lift of any nn.Module through torch.fx: residual graphs, functional calls, BatchNorm (eval), init semantics,
refusals; Monte Carlo against wide PyTorch-initialised instances of the very torch models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn

import ntkit as nt
from ntkit.lift import LiftError, lift
from ntkit.nets import GraphNet


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mc_nngp(make, x, n_models, seed=0):
    """E[f(x) f(x')] over fresh default-initialised models, averaged over outputs, and its standard error."""
    torch.manual_seed(seed)
    with torch.no_grad():
        per = torch.stack([torch.einsum("io,jo->ij", f, f) / f.shape[1] for f in (make()(x) for _ in range(n_models))])
    return per.mean(0), per.std(0) / math.sqrt(n_models)


def _check_mc(k, mc, se, what):
    err, tol = rel_err(mc, k), 0.03 + 3 * float(se.max() / k.abs().max())
    print(f"{what}: MC error {err:.4f} (tolerance {tol:.4f})")
    assert err < tol


class ResMLP(nn.Module):
    def __init__(self, d=4, width=512, outs=8):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, outs)

    def forward(self, x):
        h = F.relu(self.fc0(x))
        h = torch.relu(self.fc2(torch.relu(self.fc1(h)))) + h  # a ReLU-output skip: the sum has mean cross terms
        return self.out(h.view(h.size(0), -1))


class SmallCNN(nn.Module):
    def __init__(self, width=256, outs=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(width, outs)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_residual_graph_equals_fanout_parallel_faninsum():
    model = ResMLP(width=32)
    net = lift(model)
    assert isinstance(net, GraphNet)
    s3, b0 = math.sqrt(1 / 3), math.sqrt(1 / 12)
    hand = nt.serial(
        nt.Dense(32, s3, b0, "standard"),
        nt.Relu(),
        nt.FanOut(2),
        nt.parallel(
            nt.serial(nt.Dense(32, s3, 0.0, "standard"), nt.Relu(), nt.Dense(32, s3, 0.0, "standard"), nt.Relu()),
            nt.Identity(),
        ),
        nt.FanInSum(),
        nt.Flatten(),
        nt.Dense(8, s3, 0.0, "standard"),
    )
    x1, x2 = _x(5, 4), _x(3, 4, seed=1)
    a, b = net.kernel_fn(x1, x2), hand.kernel_fn(x1, x2)
    assert rel_err(a.nngp, b.nngp) < 1e-13 and rel_err(a.ntk, b.ntk) < 1e-13
    twin = net.module(4, width=16, seed=0, dtype=torch.float64)
    assert twin(x1).shape == (5, 8)


def test_residual_mlp_nngp_matches_monte_carlo():
    x = _x(3, 4, seed=2)
    k = lift(ResMLP()).kernel_fn(x, None, "nngp")
    mc, se = _mc_nngp(lambda: ResMLP(outs=64).double(), x, 120)
    _check_mc(k, mc, se, "residual MLP")


def test_cnn_with_batchnorm_eval_nngp_matches_monte_carlo():
    # inputs of scale 10: the kernel (~0.2) dwarfs the finite readout bias 1/(3·256) that vanishes in the limit
    x = 10 * _x(3, 2, 4, 4, seed=3)
    k = lift(SmallCNN().eval()).kernel_fn(x, None, "nngp")
    mc, se = _mc_nngp(lambda: SmallCNN(outs=64).double().eval(), x, 80)
    _check_mc(k, mc, se, "CNN + BatchNorm(eval)")


def test_hidden_biases_vanish_in_the_limit_monte_carlo():
    """Default init: the first layer keeps its bias 1/(3 fan_in); hidden ones (1/(3 width) -> 0) vanish."""
    make = lambda: nn.Sequential(nn.Linear(2, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 64))
    net = lift(make())
    dense = [l for l in net.layers if isinstance(l, nt.Dense)]
    assert dense[0].b_std == pytest.approx(math.sqrt(1 / 6)) and dense[1].b_std == 0 and dense[2].b_std == 0
    x = _x(3, 2, seed=4) * 0.3  # small inputs: the first bias matters
    k = net.kernel_fn(x, None, "nngp")
    mc, se = _mc_nngp(lambda: make().double(), x, 80)
    _check_mc(k, mc, se, "MLP default init")


def test_init_weights_reads_the_model():
    model = nn.Sequential(nn.Linear(6, 200), nn.Tanh(), nn.Linear(200, 3))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.normal_(m.bias, std=0.1)
    d = [l for l in lift(model, init="weights").layers if isinstance(l, nt.Dense)]
    w0 = model[0].weight.detach().double().var(correction=0) * 6
    assert d[0].W_std == pytest.approx(float(w0.sqrt())) and abs(d[1].W_std - 0.02 * math.sqrt(200)) < 0.01
    assert abs(d[0].b_std - 0.1) < 0.04 and d[1].b_std == pytest.approx(
        float(model[2].bias.detach().double().std(correction=0))
    )
    with pytest.raises(ValueError, match="init="):
        lift(model, init="xavier")


def test_batchnorm_refusals_say_why_and_what_to_do():
    with pytest.raises(LiftError, match=r"bn1 .*train mode.*model\.eval\(\)"):
        lift(SmallCNN(8))  # train mode
    m = SmallCNN(8).eval()
    m.bn2.running_var.fill_(2.0)
    with pytest.raises(LiftError, match=r"bn2 .*running statistics.*reset_running_stats"):
        lift(m)
    bn = nn.BatchNorm1d(4).eval()
    k = lift(nn.Sequential(nn.Linear(3, 4), bn)).kernel_fn(_x(2, 3), None, "nngp")
    k0 = lift(nn.Sequential(nn.Linear(3, 4))).kernel_fn(_x(2, 3), None, "nngp")
    assert rel_err(k, k0 / (1 + bn.eps)) < 1e-14


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class _Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer3 = nn.Sequential(_Block(), _Block())

    def forward(self, x):
        return self.layer3(x)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def test_refusals_name_the_qualified_module_and_the_fix():
    with pytest.raises(LiftError, match=r"layer3\.0\.conv2 \(Conv2d\).*groups=1"):
        lift(_Deep())
    with pytest.raises(LiftError, match=r"could not be traced.*control flow.*Fix"):
        lift(_DataDependent())

    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 3), nn.Upsample(scale_factor=2))

        def forward(self, x):
            return self.body(x)

    with pytest.raises(LiftError, match=r"body\.1 \(Upsample.*no infinite-width rule.*Fix"):
        lift(Drop())

    class Softmax(nn.Module):
        def forward(self, x):
            return torch.softmax(x, 1)

    with pytest.raises(LiftError, match=r"softmax.*no infinite-width rule.*Fix"):
        lift(Softmax())


def test_explain_prints_the_mapping(capsys):
    net = lift(ResMLP(width=8), explain=True)
    out = capsys.readouterr().out
    assert "fc1" in out and "FanInSum" in out and "hidden bias" in out and out.strip() == net.lift_explanation


def test_explain_says_how_each_kernel_is_computed():
    """The kernel column: exact rows, the numerical rules with their stated errors, qualified module names and a
    module called twice (torchvision's BasicBlock calls its relu before and after the sum)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.body = nn.Sequential(nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1))
            self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)

        def forward(self, x):
            h = self.relu(self.stem(x))
            h = self.relu(self.conv(h) + h)
            return self.pool(self.body(h))

    rows = {line.split("  ")[0]: line for line in lift(Block()).lift_explanation.splitlines()[1:]}
    assert "exact" in rows["stem"] and "residual-stream law, error ≤ 1e-3" in rows["relu (call 2)"]
    assert "residual-stream" not in rows["relu"]
    assert "Gauss–Legendre, error ≤ 1e-8" in rows["body.0"] and "QMC" in rows["pool"]


def test_chain_module_lifts_to_serial_and_functional_calls():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.b(F.gelu(self.a(x.flatten(1))))

    net = lift(Chain())
    seq = lift(nn.Sequential(nn.Flatten(), nn.Linear(3, 16), nn.GELU(), nn.Linear(16, 2)))
    assert not isinstance(net, GraphNet)
    x = _x(4, 3)
    assert rel_err(net.kernel_fn(x, None, "ntk"), seq.kernel_fn(x, None, "ntk")) < 1e-14
