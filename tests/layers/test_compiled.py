"""ntkit.compiled(): the fused, torch.compile'd ReLU-family rule agrees with the eager rule, is taken where it
should be (and only there), and fails loudly (ntkit._compile)."""

from __future__ import annotations

import pytest
import torch

import ntkit
from ntkit import _compile
from ntkit.architectures import myrtle
from ntkit.layers import Abs, Dense, Erf, LeakyRelu, Relu, Sigmoid_like
from ntkit.nets import serial

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside torch.compile


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _x(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_myrtle_ntk_matches_eager(count):
    # 3 images of 8x8: the first two ReLUs see (3, 3, 8, 8, 8, 8) pixel-pair blocks (> MIN_NUMEL): fused
    net, x = myrtle(5), _x(3, 3, 8, 8)
    ref = net.kernel_fn(x, None, ("nngp", "ntk"))
    assert count == []  # outside the block: eager
    with ntkit.compiled():
        got = net.kernel_fn(x, None, ("nngp", "ntk"))
    assert "_conv_abrelu_fused_ntk" in count  # the Conv → ReLU pairs, fused (ntkit.layers.fused)
    assert _rel(got.nngp, ref.nngp) < 1e-12 and _rel(got.ntk, ref.ntk) < 1e-12
    x2 = _x(2, 3, 8, 8, seed=1)  # x1 != x2 and a different tile shape: the same compiled function, no new number
    ref2 = net.kernel_fn(x, x2, "ntk")
    with ntkit.compiled():
        got2 = net.kernel_fn(x, x2, "ntk")
    assert _rel(got2, ref2) < 1e-12


@pytest.mark.parametrize("act", [Relu(), LeakyRelu(0.1), Abs(), Erf(1.3, 0.7, 0.2), Sigmoid_like()], ids=repr)
def test_fc_matches_eager_with_snapping(act, count):
    # 200 inputs: (200, 200) covariances with broadcast variances (> MIN_NUMEL). Duplicated and negated inputs
    # give ρ = ±1 up to round-off, which both paths snap to exactly ±1 (K̇ exact there)
    net = serial(Dense(64, 1.5, 0.1), act, Dense(64, 1.3, 0.0), act, Dense(1))
    x = _x(200, 10)
    x[100:150] = x[:50]
    x[150:] = -x[:50]
    ref = net.kernel_fn(x, None, ("nngp", "ntk"))
    with ntkit.compiled():
        got = net.kernel_fn(x, None, ("nngp", "ntk"))
        nngp_only = net.kernel_fn(x, None, "nngp")
    name = "_erf_fused" if isinstance(act, Erf) else "_abrelu_fused"
    assert name + "_ntk" in count and name in count
    assert _rel(got.nngp, ref.nngp) < 1e-12 and _rel(got.ntk, ref.ntk) < 1e-12
    assert _rel(nngp_only, ref.nngp) < 1e-12


def test_erf_large_variances(count):
    # variances ~1e8 and nearly parallel inputs: the determinant needs Dekker's exact products (a product
    # form cancels); the fused pass must keep them (no reassociation by the compiler)
    net = serial(Dense(64, 1e4, 0.0), Erf(), Dense(1))
    x = _x(200, 10)
    x[100:] = x[:100] * (1 + 1e-9)
    ref = net.kernel_fn(x, None, ("nngp", "ntk"))
    with ntkit.compiled():
        got = net.kernel_fn(x, None, ("nngp", "ntk"))
    assert "_erf_fused_ntk" in count
    assert _rel(got.nngp, ref.nngp) < 1e-12 and _rel(got.ntk, ref.ntk) < 1e-12


def test_float32_matches_eager(count):
    net = serial(Dense(64, 1.5, 0.1), Relu(), Dense(1))
    x = _x(200, 10, dtype=torch.float32)
    ref = net.kernel_fn(x, None, "ntk")
    with ntkit.compiled():
        got = net.kernel_fn(x, None, "ntk")
    assert count and got.dtype == torch.float32
    assert _rel(got, ref) < 1e-5


def test_scoped_small_and_autograd_stay_eager(count):
    net = serial(Dense(64, 1.5, 0.1), Relu(), Dense(1))
    with ntkit.compiled():
        with ntkit.compiled(False):
            net.kernel_fn(_x(200, 10), None, "ntk")  # switched off in the inner scope
        net.kernel_fn(_x(20, 10), None, "ntk")  # 400 entries < MIN_NUMEL
        x = _x(200, 3).requires_grad_(True)
        k = net.kernel_fn(x, None, "ntk")  # recorded by autograd: the eager rule, with its exact gradients
        g = torch.autograd.grad(k.sum(), x)[0]
    assert count == []
    assert not _compile.compile_enabled()
    g_ref = torch.autograd.grad(net.kernel_fn(x, None, "ntk").sum(), x)[0]
    assert _rel(g, g_ref) < 1e-12


def test_compile_failure_is_an_error(monkeypatch):
    def broken(fn, layout=(), options=()):
        def call(*args):
            raise RuntimeError("no C++ compiler found")

        return call

    monkeypatch.setattr(_compile, "_compiled", broken)
    net = serial(Dense(64, 1.5, 0.1), Relu(), Dense(1))
    with ntkit.compiled(), pytest.raises(ntkit.CompileError, match=r"no C\+\+ compiler.*Run without ntkit\.compiled"):
        net.kernel_fn(_x(200, 10), None, "ntk")


def test_subclass_with_its_own_rule_stays_eager(count):
    class Doubled(Relu):
        def rule(self, q12, q11, q22, need_dot):
            nngp, dot = super().rule(q12, q11, q22, need_dot)
            return 2 * nngp, (None if dot is None else 2 * dot)

    net = serial(Dense(64, 1.5, 0.1), Doubled(), Dense(1))
    x = _x(200, 10)
    ref = net.kernel_fn(x, None, "ntk")
    with ntkit.compiled():
        got = net.kernel_fn(x, None, "ntk")
    assert count == [] and _rel(got, ref) == 0.0
