"""ConvTranspose and ConvLocal (issue #14): Monte Carlo of the finite twins' outputs against the NNGP, ConvLocal's
zero off-diagonal pixel covariances, tiled == untiled, twin shapes against torch, and clear errors. NT parity:
the conv_transpose_* / conv_local_* cases of tests/data/nt (tests/test_stax.py, test_contract.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err

import ntkit as nk
from ntkit.layers import LayerError

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n, shape=(2, 4, 5), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


LAYERS = [
    lambda: nk.ConvTranspose(3, (3, 3), strides=(2, 1), padding="SAME", W_std=1.3, b_std=0.2),
    lambda: nk.ConvTranspose(3, (3, 2), strides=(2, 2), padding="VALID", b_std=0.1, parameterization="standard"),
    lambda: nk.ConvTranspose(3, (3, 3), strides=(2, 1), padding="CIRCULAR"),
    lambda: nk.ConvLocal(3, (3, 2), strides=(1, 2), padding="SAME", W_std=1.3, b_std=0.2),
]


@pytest.mark.parametrize("i", range(len(LAYERS)))
def test_nngp_is_the_twins_output_covariance(i):
    """Full pixel covariance of one layer on fixed inputs: the twin's empirical E[z z'] over 300 seeds (3 output
    channels each) within 0.01 + 3 standard errors (relative Frobenius)."""
    net = nk.serial(LAYERS[i](), nk.AvgPool((1, 1)))  # the identity pool: full pixel covariances
    x = _x(2)
    exact = net.kernel_fn(x).nngp.detach()  # (2, 2, H, H', W, W')
    samples = []
    for seed in range(300):
        y = net.module(tuple(x.shape[1:]), seed=seed, dtype=F64)(x)  # (2, 3, H, W)
        samples.append(torch.einsum("ichw,jcgv->ijhgwv", y, y) / y.shape[1])
    s = torch.stack(samples).reshape(300, -1)
    mean, se = s.mean(0), s.std(0) / math.sqrt(300)
    e = exact.reshape(-1)
    err, noise = float((mean - e).norm() / e.norm()), float(se.norm() / e.norm())
    assert err < 0.01 + 3 * noise, (err, noise)


def test_conv_local_has_no_cross_pixel_covariance():
    k = nk.serial(nk.ConvLocal(3, (3, 3), padding="SAME", b_std=0.3), nk.AvgPool((1, 1))).kernel_fn(_x(2)).nngp
    eye = torch.eye(4, dtype=torch.bool)[:, :, None, None] & torch.eye(5, dtype=torch.bool)
    assert float(k[:, :, ~eye].abs().max()) == 0.0
    diag = nk.serial(nk.ConvLocal(3, (3, 3), padding="SAME", b_std=0.3)).kernel_fn(_x(2)).nngp
    conv = nk.serial(nk.Conv(3, (3, 3), padding="SAME", b_std=0.3)).kernel_fn(_x(2)).nngp
    assert rel_err(diag, conv) < 1e-14  # same-pixel entries: the Conv rule


@pytest.mark.parametrize("i", range(len(LAYERS)))
def test_tiled_equals_untiled(i):
    net = nk.serial(
        nk.Conv(3, (2, 2), padding="SAME", b_std=0.1), nk.Relu(), LAYERS[i](), nk.Relu(), nk.GlobalAvgPool()
    )
    x1, x2 = _x(3), _x(2, seed=1)
    for b in (None, x2):
        whole = net.kernel_fn(x1, b)
        for ts in (1, 2):
            tiled = net.kernel_fn(x1, b, tile_size=ts)
            for g in ("nngp", "ntk"):
                assert rel_err(getattr(tiled, g), getattr(whole, g)) < 1e-12, (g, ts, b is None)


@pytest.mark.parametrize(
    "kernel, stride, padding, n, expect",
    [
        ((3,), (2,), "VALID", 5, 11),
        ((2,), (3,), "VALID", 5, 15),
        ((3,), (2,), "SAME", 5, 10),
        ((4,), (2,), "CIRCULAR", 5, 10),
    ],
)
def test_transpose_twin_shape(kernel, stride, padding, n, expect):
    """lax.conv_transpose sizes: n·σ + max(f − σ, 0) (VALID), n·σ (SAME/CIRCULAR); torch's own (n − 1)σ + f."""
    layer = nk.ConvTranspose(2, kernel, strides=stride, padding=padding)
    mod, shape = layer.build((3, n), None, torch.Generator().manual_seed(0), True)
    y = mod(_x(2, (3, n)))
    assert tuple(y.shape) == (2, 2, expect) == (2, *shape)
    torch_len = torch.nn.ConvTranspose1d(3, 2, kernel, stride)(torch.zeros(1, 3, n)).shape[-1]
    assert torch_len == (n - 1) * stride[0] + kernel[0]


def test_local_twin_shape():
    mod, shape = nk.ConvLocal(4, (2, 3), strides=(2, 1)).build((3, 6, 7), None, torch.Generator(), True)
    ref = torch.nn.Conv2d(3, 4, (2, 3), (2, 1))(torch.zeros(1, 3, 6, 7)).shape
    assert tuple(mod(_x(2, (3, 6, 7))).shape) == (2, *shape) == (2, *ref[1:])


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(LayerError, match="VALID"):
        nk.ConvTranspose(2, (3, 3), padding=1)
    with pytest.raises((LayerError, ValueError)):  # a 1-D input to a 2-D filter
        nk.serial(nk.ConvTranspose(2, (3, 3))).kernel_fn(_x(2, (2, 5)))
    with pytest.raises(ValueError, match="padding"):
        nk.ConvLocal(2, (3,), padding="FULL")
