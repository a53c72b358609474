"""A seeded differential fuzz of the kernel core (issue #16's standing guard): a few hundred small random
architectures over every layer family, each computed several ways that must agree.

* tiled (a random tile size, so the self-covariance tape and pair-only records run for nets that pool) vs one
  block, for ``x2 = None`` and ``x2`` given: 1e-12 (relative to the largest entry);
* ``x2 = x1.clone()`` vs ``x2 = None`` (different code paths: cov2, no exact diagonal, snapping of ρ = 1 − O(eps)):
  1e-9;
* float32 vs float64: 2e-3 (float32 carries ~1e-7 per operation, amplified near ρ = ±1 and through deep nets);
* every kernel finite, the ``x2 = None`` kernels exactly symmetric (to 1e-14 for nets with pixel-pixel
  covariances, whose pooling sums the pairs of ``(i, j)`` and ``(j, i)`` in different orders);
* against Monte Carlo for a sample of the fully-connected nets (where a closed form is in doubt, e.g. sums of
  non-Gaussian branches): the NNGP of wide finite twins within 1 % + 3 standard errors.

Architectures are drawn from ``random.Random(seed)``; a failure prints the net, so it can be replayed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch
from helpers import rel_err

import ntkit as nk
import ntkit.layers
from ntkit.monte_carlo import monte_carlo_kernel_fn

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

ACTIVATIONS: list[Callable[[], nk.Layer]] = [
    nk.Relu,
    lambda: nk.LeakyRelu(0.2),
    lambda: nk.ABRelu(-0.3, 1.1),
    nk.Abs,
    nk.Sign,
    lambda: nk.RectifiedMonomial(0),
    lambda: nk.RectifiedMonomial(2),
    lambda: nk.Erf(1.2, 0.8, 0.2),
    nk.Sigmoid_like,
    nk.Gelu,
    lambda: nk.Gelu(approximate=True),
    lambda: nk.Sin(1.1, 0.9, 0.3),
    nk.Cos,
    lambda: nk.Rbf(0.4),
    lambda: nk.Gaussian(0.8, -0.5),
    lambda: nk.Exp(1.0, 0.4),
    lambda: nk.ExpNormalized(0.8),
    lambda: nk.Monomial(2),
    lambda: nk.Polynomial([0.2, 1.0, 0.3]),
    lambda: nk.Elementwise(torch.tanh, deg=8),
]


class Gen:
    """Random architectures: FC on (N, 4) inputs or CNNs on (N, 2, 4, 4) images, blocks of affine layer +
    nonlinearity, normalisation, residual sums, products and concatenations of independent branches, pooling."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def std(self) -> tuple[float, float]:
        return self.r.uniform(0.6, 1.4), self.r.choice([0.0, 0.1, 0.3])

    def affine(self, img: bool, width: int = 3, param: str = "ntk") -> nk.Layer:
        w, b = self.std()
        bb = None if b == 0.0 else b
        if img:
            k = self.r.choice([(2, 2), (3, 3), (1, 1)])
            return nk.Conv(
                width, k, padding=self.r.choice(["SAME", "CIRCULAR"]), W_std=w, b_std=bb, parameterization=param
            )
        return nk.Dense(width, W_std=w, b_std=bb, parameterization=param)

    def act(self) -> nk.Layer:
        return self.r.choice(ACTIVATIONS)()

    def block(self, img: bool, param: str) -> list[nk.Layer]:
        kind = self.r.choice(["act", "act", "norm", "residual", "residual2", "prod", "concat"])
        a = lambda: self.affine(img, 3, param)
        if kind == "act":
            return [a(), self.act()]
        if kind == "norm":
            return [a(), nk.LayerNorm(), self.r.choice([nk.Hermite(2), nk.Relu(), nk.Identity()])]
        if kind == "residual":  # x + f(x), x Gaussian or not
            return [
                a(),
                *([self.act()] if self.r.random() < 0.5 else []),
                nk.FanOut(2),
                nk.parallel(nk.serial(a(), self.act()), nk.Identity()),
                nk.FanInSum(),
            ]
        if kind == "residual2":  # two nonlinearity branches: the cross terms of their means
            return [
                a(),
                nk.FanOut(2),
                nk.parallel(nk.serial(a(), self.act()), nk.serial(a(), self.act())),
                nk.FanInSum(),
            ]
        if kind == "prod":
            return [a(), nk.FanOut(2), nk.parallel(nk.serial(a(), self.act()), a()), nk.FanInProd()]
        return [
            a(),
            nk.FanOut(2),
            nk.parallel(
                nk.serial(self.affine(img, 2, param), self.act()), nk.serial(self.affine(img, 1, param), self.act())
            ),
            nk.FanInConcat(),
        ]

    def net(self) -> tuple[nk.Net, bool]:
        img = self.r.random() < 0.5
        param = self.r.choice(["ntk", "ntk", "standard"])
        layers: list[nk.Layer] = []
        for _ in range(self.r.randint(1, 3)):
            layers += self.block(img, param)
            if img and self.r.random() < 0.3:
                layers += [
                    self.affine(img, 3, param),
                    self.r.choice(
                        [
                            nk.AvgPool((2, 2), (1, 1), "SAME"),
                            nk.SumPool((2, 2), (1, 1), "SAME"),
                            nk.AvgPool((2, 2), padding="SAME", normalize_edges=True),
                        ]
                    ),
                ]
            if img and self.r.random() < 0.1 and hasattr(ntkit.layers, "GlobalSelfAttention"):
                layers += [self.affine(img, 3, param), ntkit.layers.GlobalSelfAttention(2, 2, 2, 1, b_std=0.1)]
        if img:
            layers += [
                self.affine(img, 3, param),
                self.r.choice([nk.GlobalAvgPool(), nk.GlobalSumPool(), nk.Flatten()]),
            ]
        w, b = self.std()
        layers.append(nk.Dense(2, W_std=w, b_std=None if b == 0.0 else b, parameterization=param))
        return nk.serial(*layers), img


def inputs(img: bool, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 4, 4) if img else (n, 4)
    return torch.randn(shape, generator=g, dtype=F64) * 0.8


N_NETS, CHUNK = 240, 12


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str, net) -> None:
    assert bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()), (what, net)
    assert rel_err(a, b.detach().numpy()) < tol, (what, rel_err(a, b.detach().numpy()), net)


@pytest.mark.parametrize("chunk", range(N_NETS // CHUNK))
def test_differential_fuzz(chunk):
    for seed in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        gen = Gen(seed)
        net, img = gen.net()
        x1, x2 = inputs(img, 4, seed), inputs(img, 3, seed + 10_000)
        tile = gen.r.randint(1, 3)
        k11 = net.kernel_fn(x1)
        for f in ("nngp", "ntk"):
            t = getattr(k11, f)
            if img:  # pooled pixel pairs are summed in another order for (j, i): symmetric to round-off only
                _close(t, t.T, 1e-14, f"symmetry {f}", net)
            else:
                assert torch.equal(t, t.T), (f, net)
        k11t = net.kernel_fn(x1, tile_size=tile)
        for f in ("nngp", "ntk"):
            _close(getattr(k11t, f), getattr(k11, f), 1e-12, f"tiled x2=None {f}", net)
        k12 = net.kernel_fn(x1, x2)
        k12t = net.kernel_fn(x1, x2, tile_size=tile)
        for f in ("nngp", "ntk"):
            _close(getattr(k12t, f), getattr(k12, f), 1e-12, f"tiled x2 {f}", net)
        kc = net.kernel_fn(x1, x1.clone())
        for f in ("nngp", "ntk"):
            _close(getattr(kc, f), getattr(k11, f), 1e-9, f"clone {f}", net)
        k32 = net.kernel_fn(x1.float(), x2.float())
        for f in ("nngp", "ntk"):
            _close(getattr(k32, f).double(), getattr(k12, f), 2e-3, f"float32 {f}", net)


def _mc_candidate(seed: int) -> bool:
    net, img = Gen(seed).net()
    return not img and "FanInSum" in repr(net)  # sums of branches: where the cross terms enter


MC_SEEDS = [s for s in range(N_NETS) if _mc_candidate(s)][:4]


@pytest.mark.parametrize("seed", MC_SEEDS)
def test_fuzz_against_monte_carlo(seed):
    """The NNGP of wide finite twins (fully-connected nets of the fuzz) against the closed forms."""
    net, _ = Gen(seed).net()
    x = inputs(False, 4, seed)
    exact = net.kernel_fn(x, get="nngp").reshape(-1)
    n = 256
    s = monte_carlo_kernel_fn(net, n_samples=n, width=128, seed=seed, get="nngp").samples(x)["nngp"].reshape(n, -1)
    mean, se = s.mean(0), s.std(0) / math.sqrt(n)
    err, noise = float((mean - exact).norm() / exact.norm()), float(se.norm() / exact.norm())
    # finite-width bias: O(1/width) per hidden layer (≤ 3 blocks of 1–2 layers at width 128)
    assert err < 0.04 + 3 * noise, (err, noise, net)
