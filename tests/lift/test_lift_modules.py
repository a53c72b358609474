"""lift of functional calls, normalisation/dropout/container modules, refusals that name the module and the fix,
and two held-out kinds against Monte Carlo: a residual MLP and a GPT-2-style custom init (init="weights")."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn

import ntkit as nt
from ntkit.layers.base import LayerError
from ntkit.lift import LiftError, lift


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _same(a: nn.Module, b: nn.Module, x, get="ntk", tol=1e-13, **kw):
    ka, kb = lift(a, **kw).kernel_fn(x, None, get), lift(b, **kw).kernel_fn(x, None, get)
    assert rel_err(ka, kb) < tol, rel_err(ka, kb)


# --- functional calls ----------------------------------------------------------------------------------
class _Fn(nn.Module):
    def __init__(self, body, **mods):
        super().__init__()
        self.body = body
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.body(self, x)


def test_functional_pools_and_means():
    x = _x(3, 2, 6, 6)
    conv = lambda: nn.Conv2d(2, 8, 3, padding=1)
    ref = nn.Sequential(conv(), nn.ReLU(), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    f = _Fn(
        lambda s, x: s.fc(torch.flatten(F.adaptive_avg_pool2d(F.avg_pool2d(F.relu(s.c(x)), 2), 1), 1)),
        c=conv(),
        fc=nn.Linear(8, 3),
    )
    _same(f, ref, x)
    g = _Fn(lambda s, x: s.fc(F.avg_pool2d(F.relu(s.c(x)), kernel_size=2).mean((2, 3))), c=conv(), fc=nn.Linear(8, 3))
    _same(g, ref, x)
    h = _Fn(
        lambda s, x: s.fc(torch.mean(F.avg_pool2d(F.relu(s.c(x)), 2), dim=(-1, -2), keepdim=True).flatten(1)),
        c=conv(),
        fc=nn.Linear(8, 3),
    )
    _same(h, ref, x)
    c1 = _Fn(
        lambda s, x: s.fc(F.avg_pool1d(torch.relu(s.c(x)), 2, 2).mean(-1)), c=nn.Conv1d(2, 8, 3), fc=nn.Linear(8, 3)
    )
    r1 = nn.Sequential(
        nn.Conv1d(2, 8, 3), nn.ReLU(), nn.AvgPool1d(2, 2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 3)
    )
    _same(c1, r1, _x(3, 2, 9))
    # a mean over the channels (or over some spatial axes only) is refused when the kernel is computed
    bad = _Fn(lambda s, x: s.fc(F.relu(s.c(x)).mean((1, 2)).flatten(1)), c=conv(), fc=nn.Linear(6, 3))
    with pytest.raises(LayerError, match=r"mean \(graph node.*only the mean over all spatial axes"):
        lift(bad).kernel_fn(x)
    with pytest.raises(LiftError, match="mean over every axis"):
        lift(_Fn(lambda s, x: s.c(x).mean(), c=conv()))


def test_functional_linear_conv_layer_norm_read_parameters():
    class FLin(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.empty(16, 5)), nn.Parameter(torch.empty(16))
            self.w2 = nn.Parameter(torch.empty(3, 16))
            self.ln_w, self.ln_b = nn.Parameter(torch.ones(16)), nn.Parameter(torch.zeros(16))
            nn.init.normal_(self.w1, std=0.3)
            nn.init.normal_(self.b1, std=0.2)
            nn.init.normal_(self.w2, std=0.1)

        def forward(self, x):
            h = F.linear(x, self.w1, self.b1)
            h = F.layer_norm(h, (16,), self.ln_w, self.ln_b, 1e-5)
            return F.linear(F.gelu(h), self.w2)

    m = FLin()
    ref = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3, bias=False))
    with torch.no_grad():
        ref[0].weight.copy_(m.w1), ref[0].bias.copy_(m.b1), ref[3].weight.copy_(m.w2)
    x = _x(4, 5)
    _same(m, ref, x, init="weights")
    _same(m, ref, x)  # default init: PyTorch's for a Linear of these shapes
    net = lift(m, init="weights", explain=False)
    assert "read from the weights" in net.lift_explanation and "linear -> Linear" in net.lift_explanation

    class FConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 8, 3, padding=1, stride=2)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            h = F.conv2d(x, self.c.weight, self.c.bias, stride=2, padding=1)
            return self.fc(F.relu(h).mean((2, 3)))

    mc = FConv()
    rc = nn.Sequential(mc.c, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), mc.fc)
    _same(mc, rc, _x(3, 2, 6, 6), init="weights")

    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return F.linear(x, torch.tanh(self.w))

    with pytest.raises(LiftError, match=r"tensor attribute 'w'.*F\.linear"):
        lift(Computed())

    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.shift = nn.Linear(3, 3), nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.fc(x) + self.shift

    with pytest.raises(LiftError, match=r"tensor attribute 'shift'.*F\.linear"):
        lift(Offset())


def test_dropout_modules_and_calls():
    x = _x(4, 3)
    base = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    for d in (nn.Dropout(0.3), nn.AlphaDropout(0.2), nn.Dropout1d(0.1), nn.FeatureAlphaDropout(0.2)):
        _same(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), d.eval(), nn.Linear(8, 2)), base, x)
    train = lift(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.25), nn.Linear(8, 2)))
    drop = [l for l in train.layers if isinstance(l, nt.Dropout)]
    assert len(drop) == 1 and drop[0].rate == 0.75 and drop[0].mode == "train"
    hand = nt.serial(*base_layers(base)[:2], nt.Dropout(0.75), *base_layers(base)[2:])
    assert rel_err(train.kernel_fn(x, None, "nngp"), hand.kernel_fn(x, None, "nngp")) < 1e-14
    # F.dropout's training flag (default True: dropout even in eval mode, as torch does)
    fd = _Fn(lambda s, x: s.b(F.dropout(F.relu(s.a(x)), 0.25)), a=nn.Linear(3, 8), b=nn.Linear(8, 2))
    assert rel_err(lift(fd).kernel_fn(x, None, "nngp"), train.kernel_fn(x, None, "nngp")) < 1e-14
    fe = _Fn(lambda s, x: s.b(F.dropout(F.relu(s.a(x)), p=0.25, training=False)), a=nn.Linear(3, 8), b=nn.Linear(8, 2))
    _same(fe, base, x)
    with pytest.raises(LiftError, match=r"2 \(Dropout2d.*drops whole channels.*model\.eval\(\)"):
        lift(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Dropout2d(0.1)))
    with pytest.raises(LiftError, match="AlphaDropout.*train mode"):
        lift(nn.Sequential(nn.Linear(3, 4), nn.AlphaDropout(0.1)))


def base_layers(m: nn.Module):
    return list(lift(m).layers)


def test_layernorm_groupnorm_instancenorm():
    x = _x(4, 3)
    ln = lift(nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)))
    hand = nt.serial(
        nt.Dense(8, math.sqrt(1 / 3), math.sqrt(1 / 9), "standard"),
        nt.LayerNorm(axis=1, eps=1e-5),
        nt.Relu(),
        nt.Dense(2, math.sqrt(1 / 3), 0.0, "standard"),
    )
    assert rel_err(ln.kernel_fn(x, None, "ntk"), hand.kernel_fn(x, None, "ntk")) < 1e-14
    img = _x(3, 2, 5, 5)
    conv = nn.Conv2d(2, 8, 3, padding=1)
    over_all = lambda norm: nn.Sequential(conv, norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    hand_img = nt.serial(
        *lift(nn.Sequential(conv)).layers,
        nt.LayerNorm(axis=(1, 2, 3), eps=1e-5),
        nt.Relu(),
        nt.GlobalAvgPool(),
        nt.Flatten(),
        nt.Dense(2, math.sqrt(1 / 3), 0.0, "standard"),
    )
    for norm in (nn.LayerNorm([8, 5, 5]), nn.GroupNorm(2, 8), nn.GroupNorm(1, 8)):
        assert rel_err(lift(over_all(norm)).kernel_fn(img, None, "ntk"), hand_img.kernel_fn(img, None, "ntk")) < 1e-13
    # GroupNorm's twin normalises over channels and positions too
    twin = lift(over_all(nn.GroupNorm(2, 8))).module(img.shape[1:], width=16, seed=0, dtype=torch.float64)
    assert twin(img).shape == (3, 2)
    with pytest.raises(LayerError, match="channel axis 1"):
        lift(over_all(nn.LayerNorm(5))).kernel_fn(img)  # over the last axis only: W, not the channels
    with pytest.raises(LiftError, match=r"1 \(GroupNorm.*num_groups == num_channels.*InstanceNorm.*Fix"):
        lift(over_all(nn.GroupNorm(8, 8)))
    with pytest.raises(LiftError, match=r"InstanceNorm2d.*own positions.*Fix"):
        lift(over_all(nn.InstanceNorm2d(8)))
    g = nn.GroupNorm(2, 8)
    with torch.no_grad():
        g.weight.mul_(2)
    with pytest.raises(LiftError, match=r"affine weight/bias differ.*reset_parameters"):
        lift(over_all(g))


def test_containers_nested_modules_and_refusals():
    class Block(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(w, w), nn.Linear(w, w)

        def forward(self, x):
            return x + self.fc2(F.relu(self.fc1(F.relu(x))))

    class Net(nn.Module):
        def __init__(self, w=16):
            super().__init__()
            self.inp = nn.Linear(3, w)
            self.blocks = nn.ModuleList([Block(w) for _ in range(2)])
            self.heads = nn.ModuleDict({"main": nn.Linear(w, 2)})
            self.id = nn.Identity()

        def forward(self, x):
            h = self.inp(torch.flatten(x, 1))
            for b in self.blocks:
                h = b(h)
            return self.heads["main"](self.id(h))

    net = lift(Net())
    x = _x(4, 3)
    s3 = math.sqrt(1 / 3)
    block = lambda: nt.serial(
        nt.FanOut(2),
        nt.parallel(
            nt.Identity(),
            nt.serial(nt.Relu(), nt.Dense(16, s3, 0.0, "standard"), nt.Relu(), nt.Dense(16, s3, 0.0, "standard")),
        ),
        nt.FanInSum(),
    )
    hand = nt.serial(nt.Dense(16, s3, math.sqrt(1 / 9), "standard"), block(), block(), nt.Dense(2, s3, 0.0, "standard"))
    assert rel_err(net.kernel_fn(x, None, "ntk"), hand.kernel_fn(x, None, "ntk")) < 1e-13

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer3 = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1)))

        def forward(self, x):
            return self.layer3(x)

    for model, pattern in (
        (Deep(), r"layer3\.1\.1 \(Softmax.*no infinite-width rule.*feature \(channel\) axis.*Fix"),
        (nn.Sequential(nn.Linear(3, 12), nn.Unflatten(1, (3, 4))), r"1 \(Unflatten.*no infinite-width rule.*Fix"),
        (nn.Sequential(nn.Linear(3, 4), nn.GLU()), r"1 \(GLU.*Fix"),
        (_Fn(lambda s, x: torch.log_softmax(s.a(x), -1), a=nn.Linear(3, 3)), r"log_softmax \(graph node.*Fix"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), r"1 \(BatchNorm1d.*train mode.*couples.*model\.eval\(\)"),
        (_Fn(lambda s, x: torch.exp(s.a(x)), a=nn.Linear(3, 3)), r"exp \(graph node.*no infinite-width rule.*Fix"),
        (nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4)), r"1 \(LSTM.*recurrent.*Fix"),
    ):
        with pytest.raises(LiftError, match=pattern):
            lift(model)


# --- held-out kinds against Monte Carlo -----------------------------------------------------------------
def _mc(model: nn.Module, reinit, x, seconds: float, max_models: int = 2000):
    """E[f(x) f(x')] (per output) over as many fresh draws of ``model`` (``reinit(model)``: its own init, in
    place) as fit in ``seconds``; mean, standard error, count."""
    torch.manual_seed(0)
    per = []
    t0 = time.perf_counter()
    with torch.no_grad():
        while len(per) < max_models and (len(per) < 50 or time.perf_counter() - t0 < seconds):
            reinit(model)
            f = model(x)
            per.append(f @ f.T / f.shape[1])
    p = torch.stack(per)
    return p.mean(0), p.std(0) / math.sqrt(len(per)), len(per)


def _reset(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()


def _check(k, mc, se, n, what):
    err, tol = rel_err(mc, k), 0.03 + 3 * float(se.max() / k.abs().max())
    print(f"{what}: {n} instances, MC error {err:.4f} (tolerance {tol:.4f})")
    assert err < tol


class ResidualMLP(nn.Module):
    """Pre-activation residual MLP: h ← h + W2 relu(W1 relu(h)), three blocks."""

    def __init__(self, d=6, width=512, outs=1024, blocks=3):
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(blocks)
        )
        self.out = nn.Linear(width, outs)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(F.relu(h))


def test_residual_mlp_nngp_matches_monte_carlo():
    x = 3 * _x(4, 6, seed=5)
    t0 = time.process_time()  # CPU seconds: other agents' load does not count
    k = lift(ResidualMLP()).kernel_fn(x, None, "nngp")
    assert time.process_time() - t0 < 20  # the bar: < 10 s wall on 2 cores
    mc, se, n = _mc(ResidualMLP().double(), _reset, x, seconds=10)
    _check(k, mc, se, n, "residual MLP")


class PostActivationMLP(nn.Module):
    """A post-activation residual block on vectors, h ← relu(h + W2 relu(W1 h)) with h a ReLU output: the sum is
    not Gaussian (torchvision's BasicBlock on vectors; the rule is ntkit/layers/residual_law.py's)."""

    def __init__(self, d=6, width=512, outs=1024):
        super().__init__()
        self.inp, self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, outs)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = F.relu(h + self.fc2(F.relu(self.fc1(h))))
        return self.out(h)


def test_post_activation_residual_mlp_matches_monte_carlo():
    x = 3 * _x(4, 6, seed=5)
    t0 = time.process_time()  # CPU seconds: other agents' load does not count
    k = lift(PostActivationMLP()).kernel_fn(x, None, "nngp")
    assert time.process_time() - t0 < 20  # the bar: < 10 s wall on 2 cores
    mc, se, n = _mc(PostActivationMLP().double(), _reset, x, seconds=8)
    _check(k, mc, se, n, "post-activation residual MLP")


class GPT2MLP(nn.Module):
    """GPT-2-style blocks on vectors: x ← x + W2 gelu(W1 LN(x)), weights N(0, 0.02²), biases 0, then LN and a head."""

    def __init__(self, d=8, width=512, outs=1024, blocks=2):
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.ln = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks + 1))
        self.fc = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.proj = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.head = nn.Linear(width, outs, bias=False)
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.inp.weight, std=0.5)

    def forward(self, x):
        h = self.inp(x)
        for ln, fc, proj in zip(self.ln, self.fc, self.proj):
            h = h + proj(F.gelu(fc(ln(h))))
        return self.head(self.ln[-1](h))


def test_custom_init_gpt2_style_matches_monte_carlo():
    x = _x(4, 8, seed=6)
    t0 = time.process_time()  # CPU seconds: other agents' load does not count
    net = lift(GPT2MLP(), init="weights")
    k = net.kernel_fn(x, None, "nngp")
    assert time.process_time() - t0 < 20  # the bar: < 10 s wall on 2 cores
    assert "read from the weights" in net.lift_explanation
    mc, se, n = _mc(GPT2MLP().double(), GPT2MLP.init_weights, x, seconds=10)
    _check(k, mc, se, n, "GPT-2-style init (init='weights')")
    # the default init would be far off: this model is not PyTorch's default
    k0 = lift(GPT2MLP()).kernel_fn(x, None, "nngp")
    assert rel_err(k0, mc) > 0.1
