"""Dropout (NT's ``stax.Dropout``): the same-entry factor 1/rate in closed form (FC, diagonal and full pixel layouts),
the identities, refused arguments, the finite twin's masks, tiles, and NT 0.6.5 parity."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import load_reference, rel_err
from nt_nets import ZOO_DROPOUT, zoo_errors

import ntkit as nk
from ntkit.kernel import kernel_from_inputs
from ntkit.layers import LayerError
from ntkit.layers.dropout import keep_mask

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_fc_closed_form_same_sample_factor():
    """K' = K + (1/rate − 1)·diag(K) for x2 = None (the same sample, the same entry: E[m²]/rate² = 1/rate); no
    factor between different batches (independent masks, E[m m'] = 1)."""
    x, y = _x(5, 4), _x(3, 4, seed=1)
    pre = nk.serial(nk.Dense(8, 1.3, 0.2))
    net = nk.serial(nk.Dense(8, 1.3, 0.2), nk.Dropout(0.7))
    k0, k = pre.kernel_fn(x), net.kernel_fn(x)
    for g in ("nngp", "ntk"):
        a, b = getattr(k0, g), getattr(k, g)
        expect = a + torch.diag(torch.diagonal(a)) * (1 / 0.7 - 1)
        assert rel_err(b, expect) < 1e-15
    assert rel_err(k.cov1, k0.cov1 / 0.7) < 1e-15
    k12, k012 = net.kernel_fn(x, y), pre.kernel_fn(x, y)
    assert rel_err(k12.nngp, k012.nngp) < 1e-15 and rel_err(k12.cov2, k012.cov2 / 0.7) < 1e-15


@pytest.mark.parametrize("full", [False, True])
def test_image_factor_on_same_sample_same_pixel_only(full):
    """Diagonal layout: K[i, i, y] scaled; full layout: K[i, i, y, y] scaled, K[i, i, y, y'] (y ≠ y') not."""
    x = _x(3, 2, 4, 4)
    tail = [nk.AvgPool((1, 1))] if full else []
    k0 = nk.serial(nk.Conv(3, (3, 3), padding="SAME"), *tail).kernel_fn(x, get="nngp")
    k = nk.serial(nk.Conv(3, (3, 3), padding="SAME"), nk.Dropout(0.4), *tail).kernel_fn(x, get="nngp")
    factor = torch.ones_like(k0)
    if full:
        eye = torch.eye(4, dtype=F64)
        same = torch.eye(3, dtype=F64)[:, :, None, None, None, None] * eye[:, :, None, None] * eye
        factor = factor + same * (1 / 0.4 - 1)
    else:
        factor = factor + torch.eye(3, dtype=F64)[:, :, None, None] * (1 / 0.4 - 1)
    assert rel_err(k, k0 * factor) < 1e-15


def test_test_mode_and_rate_one_are_the_identity():
    x = _x(4, 3)
    base = nk.serial(nk.Dense(6, 1.1, 0.1)).kernel_fn(x)
    for layer in (nk.Dropout(0.5, mode="test"), nk.Dropout(1.0)):
        k = nk.serial(nk.Dense(6, 1.1, 0.1), layer).kernel_fn(x)
        assert torch.equal(k.nngp, base.nngp) and torch.equal(k.ntk, base.ntk)
        y = nk.serial(layer).module((3,), seed=0, dtype=F64)(x)
        assert torch.equal(y, x)


@pytest.mark.parametrize(
    "args, words",
    [((0.0,), "keep probability"), ((1.5,), "0 < rate <= 1"), ((True,), "rate="), ((0.5, "eval"), "'train'")],
)
def test_bad_arguments(args, words):
    with pytest.raises(LayerError, match=words):
        nk.Dropout(*args)


def test_output_is_not_gaussian_a_nonlinearity_needs_a_dense_first():
    k = nk.Dropout(0.5).kernel(kernel_from_inputs(_x(2, 3)))
    assert not k.is_gaussian


def test_twin_keeps_a_fraction_rate_and_rescales():
    """Keep fraction within 4 binomial standard deviations of rate (n = 60 000 entries); kept entries are x/rate."""
    x = _x(30, 2000)
    mod = nk.serial(nk.Dropout(0.3)).module((2000,), seed=1, dtype=F64)
    y = mod(x)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.double().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert torch.equal(y[kept], x[kept] / 0.3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_twin_mask_is_per_sample(dtype):
    """A sample's output is the same alone and inside a batch (as the empirical NTK needs); different samples, and
    different seeds, get different masks (agreement ≈ rate² + (1−rate)² = 0.5 for independent masks)."""
    net = nk.serial(nk.Dense(64, 1.0, 0.1), nk.Relu(), nk.Dropout(0.5))
    mod = net.module((5,), seed=2, dtype=dtype)
    x = _x(8, 5).to(dtype)
    y = mod(x)
    for i in range(8):
        assert torch.equal(mod(x[i : i + 1])[0] != 0, y[i] != 0)
    z = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=dtype)
    m = keep_mask(z.expand(2, 64), torch.tensor(5), 0.5)
    assert torch.equal(m[0], m[1])
    other = keep_mask(z[None], torch.tensor(6), 0.5)[0]
    assert 0.25 < (other == m[0]).double().mean().item() < 0.75


@pytest.mark.parametrize("x2", [False, True])
def test_tiles_equal_untiled(x2):
    net = nk.serial(nk.Dense(8, 1.3, 0.2), nk.Relu(), nk.Dropout(0.6), nk.Dense(8), nk.Relu(), nk.Dense(1))
    a, b = _x(5, 3), (_x(4, 3, seed=1) if x2 else None)
    whole, tiled = net.kernel_fn(a, b), net.kernel_fn(a, b, tile_size=2)
    assert rel_err(tiled.nngp, whole.nngp) < 1e-14 and rel_err(tiled.ntk, whole.ntk) < 1e-14


@pytest.mark.parametrize("name", ZOO_DROPOUT)
def test_nt_parity(name):
    """NT 0.6.5 applies the factor where x1 is x2 (the same samples) and on the same-pixel entries; measured
    ≤ 5e-16 off NT's diagonal, 7e-9 on it (NT's arc-cosine round-off at ρ = 1)."""
    err = zoo_errors(name, load_reference(name))
    assert err["12"] < 1e-13 and err["11_off"] < 1e-13 and err["11_diag"] < 1e-7, err
