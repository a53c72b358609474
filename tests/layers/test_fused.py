"""ntkit.compiled(): Conv → ReLU pairs in one compiled pass (ntkit.layers.fused) give the eager kernels, are taken
where they apply (and fall back to the two layers elsewhere), and leave residual nets alone."""

from __future__ import annotations

import pytest
import torch

import ntkit
from ntkit.architectures import myrtle
from ntkit.layers import (
    Abs,
    AvgPool,
    Conv,
    Dense,
    Erf,
    FanInSum,
    FanOut,
    Flatten,
    GlobalAvgPool,
    Identity,
    LeakyRelu,
    Relu,
    SumPool,
)
from ntkit.layers.fused import ConvActivation, _geometry, fuse_conv_activations
from ntkit.nets import parallel, serial

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside torch.compile


def _fused_in(calls: list) -> bool:
    return any(c.startswith("_conv_abrelu_fused") for c in calls)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _x(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _compare(net, x, x2=None, tol=1e-12, **kw):
    ref = net.kernel_fn(x, x2, ("nngp", "ntk"), **kw)
    with ntkit.compiled():
        got = net.kernel_fn(x, x2, ("nngp", "ntk"), **kw)
    assert _rel(got.nngp, ref.nngp) < tol and _rel(got.ntk, ref.ntk) < tol
    assert _rel(got.cov1, ref.cov1) < tol
    return got


@pytest.mark.parametrize("tile", [None, 3])
def test_myrtle_matches_eager(tile, count):
    # 7 images: tiles of 3 give recorded diagonal tiles, pair-only tiles and ragged ones below MIN_NUMEL (eager)
    net, x, x2 = myrtle(5), _x(7, 3, 8, 8), _x(3, 3, 8, 8, seed=1)
    kw = {} if tile is None else {"tile_size": tile}
    _compare(net, x, **kw)
    _compare(net, x, x2, **kw)
    assert _fused_in(count) and any(c.startswith("_tiled_pool_fused") for c in count)


def test_geometry_table_is_the_window():
    # the table has a 1 exactly where a joint shift keeps both pixels inside the image, and the offsets are
    # the shifts in the flattened (h, h', w, w') axis: T(K) from them equals the eager window sum
    from ntkit.layers.conv import plan_windows

    wins = plan_windows((5, 4), (3, 2), None, "SAME", "zeros", "t")
    offsets, pad, table = _geometry(wins, (5, 4), torch.float64, torch.device("cpu"))
    assert table.shape == (6, 400) and pad == max(abs(o) for o in offsets)
    k = _x(400)
    kp = torch.nn.functional.pad(k, (pad, pad))
    fused = sum(kp[pad + o : pad + o + 400] * table[i] for i, o in enumerate(offsets))
    h, w = 5, 4
    kk = k.view(h, h, w, w)
    ref = torch.zeros_like(kk)
    for dh in (-1, 0, 1):
        for dw in (0, 1):  # SAME with an even filter: the extra pixel at the end (lo = 0)
            for a in range(h):
                for b in range(h):
                    for c in range(w):
                        for d in range(w):
                            if 0 <= a + dh < h and 0 <= b + dh < h and 0 <= c + dw < w and 0 <= d + dw < w:
                                ref[a, b, c, d] += kk[a + dh, b + dh, c + dw, d + dw]
    assert _rel(fused.view(h, h, w, w), ref) < 1e-15


@pytest.mark.parametrize(
    "conv, act",
    [
        (Conv(16, (3, 3), padding="SAME", W_std=1.3, b_std=0.4), Relu()),
        (Conv(16, (3, 3), padding="SAME", W_std=1.3, b_std=0.4, parameterization="standard"), LeakyRelu(0.2)),
        (Conv(16, (2, 2), padding="SAME", W_std=1.1, b_std=None), Abs()),
        (Conv(16, (3, 3), padding=1, W_std=1.2, b_std=0.1), Relu()),
    ],
    ids=["ntk_bias", "standard_leaky", "even_filter_abs", "explicit_padding"],
)
def test_variants_match_eager(conv, act, count):
    net = serial(
        Conv(8, (3, 3), padding="SAME", W_std=1.5, b_std=0.2), Relu(), conv, act, AvgPool((2, 2)), Flatten(), Dense(1)
    )
    _compare(net, _x(5, 2, 8, 8), tile_size=3)
    _compare(net, _x(5, 2, 8, 8), _x(4, 2, 8, 8, seed=2), tile_size=3)
    assert sum(c.startswith("_conv_abrelu_fused") for c in count) >= 4


@pytest.mark.parametrize("shape", [(6, 2, 64), (4, 2, 4, 4, 4)], ids=["1d", "3d"])
def test_other_ranks_match_eager(shape, count):
    d = len(shape) - 2
    net = serial(
        Conv(8, (3,) * d, padding="SAME", W_std=1.4),
        Relu(),
        Conv(8, (3,) * d, padding="SAME"),
        Relu(),
        GlobalAvgPool(),
        Dense(1),
    )
    _compare(net, _x(*shape))
    assert _fused_in(count)


def test_where_it_does_not_apply_the_layers_run_one_after_the_other(count):
    # strided and VALID convolutions, a float32 tile below MIN_NUMEL, Erf: no fused pass, the same kernels
    net = serial(
        Conv(8, (3, 3), strides=2, padding="SAME"), Relu(), Conv(8, (3, 3), padding="VALID"), Relu(),
        Conv(8, (3, 3), padding="SAME"), Erf(), GlobalAvgPool(), Dense(1),
    )  # fmt: skip
    _compare(net, _x(5, 2, 12, 12), tile_size=2)
    assert not _fused_in(count)
    small = serial(Conv(8, (3, 3), padding="SAME"), Relu(), GlobalAvgPool(), Dense(1))
    _compare(small, _x(2, 2, 4, 4))  # 4·256 entries < MIN_NUMEL
    assert not _fused_in(count)


def test_float32_and_nngp_only(count):
    net = myrtle(5)
    x = _x(4, 3, 8, 8, dtype=torch.float32)
    ref = net.kernel_fn(x, None, "ntk")
    with ntkit.compiled():
        got = net.kernel_fn(x, None, "ntk")
        nngp = net.kernel_fn(x.double(), None, "nngp")
    assert got.dtype == torch.float32 and _rel(got, ref) < 1e-5
    assert _rel(nngp, net.kernel_fn(x.double(), None, "nngp")) < 1e-12
    assert _fused_in(count)


def test_autograd_stays_eager(count):
    net = serial(
        Conv(8, (3, 3), padding="SAME"), Relu(), Conv(8, (3, 3), padding="SAME"), Relu(), GlobalAvgPool(), Dense(1)
    )
    x = _x(3, 2, 8, 8).requires_grad_(True)
    with ntkit.compiled():
        g = torch.autograd.grad(net.kernel_fn(x, None, "ntk").sum(), x)[0]
    assert not _fused_in(count)
    g_ref = torch.autograd.grad(net.kernel_fn(x, None, "ntk").sum(), x)[0]
    assert _rel(g, g_ref) < 1e-12


def test_rewrite_keeps_residual_programs_and_the_last_pair():
    conv, relu = Conv(8, 3, padding="SAME"), Relu()
    # a ReLU before another nonlinearity, a combinator, or at the end of its serial keeps its residual-stream
    # program: not fused
    kept = [conv, relu, Relu(), conv, relu, FanOut(2), conv, relu]
    out = fuse_conv_activations(kept)
    assert not any(isinstance(layer, ConvActivation) for layer in out)
    out = fuse_conv_activations([conv, relu, GlobalAvgPool(), Dense(1)])
    assert isinstance(out[0], ConvActivation) and len(out) == 3


def test_residual_net_matches_eager():
    block = serial(Conv(8, (3, 3), padding="SAME"), Relu(), Conv(8, (3, 3), padding="SAME"))
    net = serial(
        Conv(8, (3, 3), padding="SAME"), Relu(), FanOut(2), parallel(block, Identity()), FanInSum(), Relu(),
        AvgPool((2, 2)), Conv(8, (3, 3), padding="SAME"), Relu(), GlobalAvgPool(), Dense(1),
    )  # fmt: skip
    _compare(net, _x(5, 2, 8, 8), tile_size=2)


def test_outside_the_block_nothing_is_fused(count):
    myrtle(5).kernel_fn(_x(3, 3, 8, 8), None, "ntk")
    assert count == []


def test_retile_after_the_first_pool():
    # inside ntkit.compiled() the layers after Myrtle's first pool run on all pairs at once when they fit
    from ntkit.nets.combinators import RETILE_ENTRIES, _fused_layers, _retile_point

    net = _fused_layers(myrtle(5))
    head, tail = _retile_point(net, (3, 8, 8), 7, 7)
    assert isinstance(head.layers[-1], AvgPool) and isinstance(tail.layers[0], ConvActivation)
    assert len(head.layers) + len(tail.layers) == len(net.layers)
    big = int((RETILE_ENTRIES / 256) ** 0.5) + 1  # the tail's 4×4 covariances of big² pairs do not fit
    assert _retile_point(net, (3, 8, 8), big, big) is None
    flat = serial(Conv(8, 3, padding="SAME"), Relu(), AvgPool((2, 2)), Flatten(), Dense(1))
    assert _retile_point(_fused_layers(flat), (3, 8, 8), 7, 7) is None  # the tail must start with a Conv


@pytest.mark.parametrize(
    "pool, size",
    [
        (AvgPool((2, 2), (2, 2)), 8),
        (SumPool((3, 3), (3, 3)), 9),
        (AvgPool((3, 3), (3, 3)), 9),
        (AvgPool((2, 2), (1, 1)), 8),
    ],
    ids=["avg2", "sum3", "avg3", "overlapping"],
)
def test_tiled_pools_compiled_match_eager(pool, size, count):
    # pools whose windows tile the image run as one compiled call inside ntkit.compiled() (the overlapping
    # one stays eager); 1/9 is not a power of 2, so the scale is rounded as in the eager passes' last one
    net = serial(Conv(8, (3, 3), padding="SAME", W_std=1.3), Erf(), pool, Flatten(), Dense(1))
    _compare(net, _x(5, 2, size, size))
    used = any(c.startswith("_tiled_pool_fused") for c in count)
    assert used == (pool.strides == pool.window_shape)
