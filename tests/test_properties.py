"""Property-based tests (hypothesis) of kernel invariants, over random small networks and inputs:

* ``x2 = None``: exactly symmetric (fully-connected nets), and positive semi-definite (NNGP and NTK);
* swapping the batches transposes the kernel: ``K(x2, x1) = K(x1, x2)ᵀ``;
* permuting the samples permutes the kernel;
* positive homogeneity: for activations with ``φ(c·x) = c^n φ(x)`` (``c > 0``) and no biases,
  ``K(c·x1, c·x2) = c^(2n) K(x1, x2)`` (for the NTK too);
* tiles of any size give the kernel of one block.

Deterministic (``derandomize=True``) and bounded (``max_examples``), so the suite stays fast and reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import ntkit as nk

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)

ACTS: dict[str, Callable[[], nk.Layer]] = {
    "relu": nk.Relu,
    "leaky": lambda: nk.LeakyRelu(0.3),
    "abrelu": lambda: nk.ABRelu(-0.4, 1.2),
    "abs": nk.Abs,
    "sign": nk.Sign,
    "rect2": lambda: nk.RectifiedMonomial(2),
    "erf": lambda: nk.Erf(1.1, 0.7, 0.2),
    "gelu": nk.Gelu,
    "sin": lambda: nk.Sin(1.0, 0.8, 0.3),
    "rbf": lambda: nk.Rbf(0.5),
    "gaussian": lambda: nk.Gaussian(0.9, -0.6),
    "exp": lambda: nk.Exp(1.0, 0.3),
    "expnorm": lambda: nk.ExpNormalized(0.7),
    "poly": lambda: nk.Polynomial([0.1, 1.0, 0.4]),
    "tanh": lambda: nk.Elementwise(torch.tanh, deg=10),
}
#: positively homogeneous activations and their degree n: φ(c x) = c^n φ(x) for c > 0
HOMOGENEOUS = {"relu": 1, "leaky": 1, "abrelu": 1, "abs": 1, "sign": 0, "rect2": 2}


def make_net(acts: list[str], widths: list[int], bias: bool, residual: bool) -> nk.Net:
    b = 0.2 if bias else None
    layers: list[nk.Layer] = []
    for name, w in zip(acts, widths):
        layers += [nk.Dense(w, W_std=1.2, b_std=b), ACTS[name]()]
    if residual:
        layers += [
            nk.Dense(3, W_std=0.9, b_std=b),
            nk.FanOut(2),
            nk.parallel(nk.serial(nk.Dense(3, W_std=1.1, b_std=b), ACTS[acts[0]]()), nk.Identity()),
            nk.FanInSum(),
        ]
    return nk.serial(*layers, nk.Dense(2, W_std=0.8, b_std=b))


nets = st.builds(
    make_net,
    acts=st.lists(st.sampled_from(sorted(ACTS)), min_size=1, max_size=3),
    widths=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    bias=st.booleans(),
    residual=st.booleans(),
)


def data(seed: int, n: int, d: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


@SETTINGS
@given(net=nets, seed=st.integers(0, 10**6), n=st.integers(1, 6), d=st.integers(1, 4))
def test_symmetric_and_psd(net, seed, n, d):
    k = net.kernel_fn(data(seed, n, d))
    for t in (k.nngp, k.ntk):
        assert torch.equal(t, t.T)
        assert float(torch.linalg.eigvalsh(t).min()) >= -1e-10 * float(t.diagonal().sum()) - 1e-300


@SETTINGS
@given(net=nets, seed=st.integers(0, 10**6), n1=st.integers(1, 5), n2=st.integers(1, 5), d=st.integers(1, 4))
def test_swapping_the_batches_transposes(net, seed, n1, n2, d):
    x1, x2 = data(seed, n1, d), data(seed + 1, n2, d)
    a, b = net.kernel_fn(x1, x2), net.kernel_fn(x2, x1)
    for f in ("nngp", "ntk"):
        assert rel_err(getattr(b, f).T, getattr(a, f)) < 1e-13


@SETTINGS
@given(net=nets, seed=st.integers(0, 10**6), n=st.integers(2, 6), d=st.integers(1, 4), perm_seed=st.integers(0, 1000))
def test_permuting_samples_permutes_the_kernel(net, seed, n, d, perm_seed):
    x = data(seed, n, d)
    p = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    k, kp = net.kernel_fn(x), net.kernel_fn(x[p])
    for f in ("nngp", "ntk"):
        assert rel_err(getattr(kp, f), getattr(k, f)[p][:, p]) < 1e-13


@SETTINGS
@given(
    act=st.sampled_from(sorted(HOMOGENEOUS)),
    depth=st.integers(1, 2),
    seed=st.integers(0, 10**6),
    c=st.floats(0.05, 20.0),
)
def test_positive_homogeneity(act, depth, seed, c):
    """No biases: each Dense is linear, each activation homogeneous of degree n, so the NNGP and the NTK scale
    by c^(2·n^depth)."""
    layers: list[nk.Layer] = []
    for _ in range(depth):
        layers += [nk.Dense(4, W_std=1.3), ACTS[act]()]
    net = nk.serial(*layers, nk.Dense(1))
    x1, x2 = data(seed, 4, 3), data(seed + 7, 3, 3)
    power = 2 * HOMOGENEOUS[act] ** depth
    k, kc = net.kernel_fn(x1, x2), net.kernel_fn(c * x1, c * x2)
    for f in ("nngp", "ntk"):
        if power == 0 and f == "ntk":
            continue  # Sign: K̇ = 0 (NT's convention), the NTK is that of the last layer alone
        assert rel_err(getattr(kc, f), c**power * getattr(k, f)) < 1e-12


@SETTINGS
@given(net=nets, seed=st.integers(0, 10**6), n=st.integers(2, 7), tile=st.integers(1, 4), given_x2=st.booleans())
def test_tiles_of_any_size(net, seed, n, tile, given_x2):
    x1 = data(seed, n, 3)
    x2 = data(seed + 3, n - 1 if n > 2 else 2, 3) if given_x2 else None
    whole, part = net.kernel_fn(x1, x2), net.kernel_fn(x1, x2, tile_size=tile)
    for f in ("nngp", "ntk"):
        assert rel_err(getattr(part, f), getattr(whole, f)) < 1e-13
