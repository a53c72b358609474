"""``kernel_fn(x, None)`` of entrywise nets on blocks of the upper triangle (ntkit.nets.symmetric): the same
kernels as the full evaluation, exactly symmetric, with the diagonal equal to cov1; autograd; the paths that
must not take it."""

from __future__ import annotations

import pytest
import torch

import ntkit as nt
import ntkit.nets.symmetric as sym
from ntkit.nets.combinators import serial_leaves

NETS = {
    "relu": lambda: nt.serial(*([nt.Dense(512), nt.Relu()] * 3), nt.Dense(1)),
    "erf-gelu-bias": lambda: nt.serial(
        nt.Dense(64, W_std=1.5, b_std=0.3), nt.Erf(), nt.Dense(64, b_std=0.1), nt.Gelu(), nt.Dense(1)
    ),
    "standard": lambda: nt.serial(
        nt.Dense(64, parameterization="standard", b_std=0.2),
        nt.LeakyRelu(0.1),
        nt.Dense(3, parameterization="standard"),
    ),
    "nested": lambda: nt.serial(nt.serial(nt.Dense(10), nt.Abs()), nt.Dense(10), nt.Sin(), nt.Identity(), nt.Dense(2)),
}


def _full(net, x, get=("nngp", "ntk")):
    """The kernels by the full evaluation (blocks switched off)."""
    old = sym.BLOCKED_MIN_N
    sym.BLOCKED_MIN_N = 10**9
    try:
        return net.kernel_fn(x, None, get)
    finally:
        sym.BLOCKED_MIN_N = old


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("n", [256, 333, 601])
def test_blocks_equal_the_full_evaluation(name, n):
    net = NETS[name]()
    x = torch.randn(n, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert sym.symmetric_blocks(n) is not None  # the blocked path runs for these sizes
    got, ref = net.kernel_fn(x, None, ("nngp", "ntk")), _full(net, x)
    for g in ("nngp", "ntk"):
        assert _rel(getattr(got, g), getattr(ref, g)) < 1e-14, g
        assert torch.equal(getattr(got, g), getattr(got, g).T), f"{g} exactly symmetric"
        assert getattr(got, g).is_contiguous()
    assert torch.equal(got.nngp.diagonal(), got.cov1), "the diagonal is cov1, bit for bit"
    assert _rel(got.cov1, ref.cov1) < 1e-14 and got.cov2 is None and got.x1_is_x2
    assert got.shape1 == ref.shape1 and got.nngp.dtype == torch.float64


def test_blocks_float32_and_single_kernels():
    net = NETS["relu"]()
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(1))
    for get in ("nngp", "ntk"):
        got, ref = net.kernel_fn(x, None, get), _full(net, x, get)
        assert got.dtype == torch.float32 and _rel(got, ref) < 1e-6


def test_blocks_group_count():
    assert sym.symmetric_blocks(sym.BLOCKED_MIN_N - 1) is None
    assert sym.symmetric_blocks(500) == 10  # n / BLOCK_SIZE groups of 50
    assert sym.symmetric_blocks(512) == 8  # the divisor nearest 512 / 50 with groups of 32 to 80
    assert sym.symmetric_blocks(601) == 12  # a prime: round(601 / 50) groups, the last one padded


def test_blocks_gradients():
    """Autograd through the blocks (inputs and hyper-parameters), float64 gradcheck on a small case."""
    net = NETS["erf-gelu-bias"]()
    old = sym.BLOCKED_MIN_N, sym.BLOCK_SIZE
    sym.BLOCKED_MIN_N, sym.BLOCK_SIZE = 8, 4  # 13 samples: 3 groups of 5, with one padded sample
    try:
        x = torch.randn(13, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)

        def of_x(x):
            k = net.kernel_fn(x, None)
            return k.nngp, k.ntk

        assert torch.autograd.gradcheck(of_x, (x,))
        w = torch.tensor([1.3, 0.4], dtype=torch.float64, requires_grad=True)

        def kernels(w):
            k = net.with_hyperparameters({"0.W_std": w[0], "0.b_std": w[1]}).kernel_fn(x.detach(), None)
            return k.nngp, k.ntk

        assert torch.autograd.gradcheck(kernels, (w,))
    finally:
        sym.BLOCKED_MIN_N, sym.BLOCK_SIZE = old


def test_paths_that_keep_the_full_evaluation(monkeypatch):
    """x2 given, a net with a non-entrywise layer, and spatial inputs never run on blocks."""
    calls = []
    real = sym.blocked_symmetric
    monkeypatch.setattr("ntkit.nets.combinators.blocked_symmetric", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(300, 6, dtype=torch.float64)
    NETS["relu"]().kernel_fn(x, x[:260])
    nt.serial(nt.Dense(8), nt.LayerNorm(), nt.Relu(), nt.Dense(1)).kernel_fn(x, None)
    nt.serial(nt.Dense(8), nt.Dropout(0.5, mode="train"), nt.Dense(1)).kernel_fn(x, None)
    assert not calls
    NETS["relu"]().kernel_fn(x, None)
    assert calls == [1]
    branched = nt.serial(nt.FanOut(2), nt.parallel(nt.Dense(1), nt.Dense(1)), nt.FanInSum())
    assert type(serial_leaves(branched)).__name__ == "Parallel"
    assert not sym.entrywise_leaves([nt.LayerNorm()]) and sym.entrywise_leaves([nt.Dense(1), nt.Erf()])


def test_blocks_name_a_non_finite_layer():
    """A variance that overflows in the blocks is diagnosed as in the full evaluation."""
    net = nt.serial(nt.Dense(8, W_std=1e200), nt.Relu(), nt.Dense(1, W_std=1e200))
    x = torch.randn(300, 4, dtype=torch.float64)
    with pytest.raises(Exception) as blocked:
        net.kernel_fn(x, None)
    with pytest.raises(Exception) as full:
        _full(net, x)
    assert type(blocked.value) is type(full.value) and str(blocked.value) == str(full.value)
