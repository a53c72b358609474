"""ImageResize (NT's ``stax.ImageResize``, ``jax.image.resize``): its weights against torch's interpolation, the rule
on both layouts, refusals, and NT 0.6.5 parity (with NT's 2-D bug: it resizes the axes of a reversed kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import load_reference, rel_err
from nt_nets import ZOO_RESIZE, _zoo_conv, _zoo_head, zoo_errors

import ntkit as nk
from ntkit.layers import LayerError
from ntkit.layers.resize import nearest_positions, resize_weights

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
PRE = [nk.Conv(3, (3, 3), padding="SAME", W_std=1.2, b_std=0.1)]


def _x(n, seed=0):
    return torch.randn(n, 2, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("m, n", [(5, 3), (6, 4), (5, 8), (6, 11), (5, 2)])
@pytest.mark.parametrize("antialias", [True, False])
def test_linear_weights_are_torchs_half_pixel_interpolation(m, n, antialias):
    """jax.image.resize's triangle filter (antialiased when downsampling) is torch's linear interpolation with
    align_corners=False (antialias=True: torch's antialiased bilinear), to round-off."""
    eye = torch.eye(m * m, dtype=F64).reshape(m * m, 1, m, m)
    w = F.interpolate(eye, size=(n, n), mode="bilinear", align_corners=False, antialias=antialias)
    W = resize_weights(m, m if m == n else n, antialias)
    assert rel_err(w.reshape(m * m, n * n).T, torch.kron(W, W)) < 1e-14


def test_nearest_positions():
    assert nearest_positions(5, 7).tolist() == [0, 1, 1, 2, 3, 3, 4]  # ⌊(y + ½)·5/7⌋
    assert nearest_positions(6, 4).tolist() == [0, 2, 3, 5]


def test_rule_is_W_K_Wt_and_nearest_works_on_the_diagonal_layout():
    x1, x2 = _x(3), _x(2, 1)
    k0 = nk.serial(*PRE, nk.AvgPool((1, 1))).kernel_fn(x1, x2)
    k = nk.serial(*PRE, nk.ImageResize((-1, -1, 3, 8), "linear"), nk.AvgPool((1, 1))).kernel_fn(x1, x2)
    Wh, Ww = resize_weights(5, 3, True), resize_weights(6, 8, True)
    for g in ("nngp", "ntk"):
        expect = torch.einsum("ya,zb,ijabcd,uc,vd->ijyzuv", Wh, Wh, getattr(k0, g), Ww, Ww)
        assert rel_err(getattr(k, g), expect) < 1e-14
    diag = nk.serial(*PRE, nk.ImageResize((-1, -1, 7, 4), "nearest")).kernel_fn(x1, x2)
    full = nk.serial(*PRE, nk.ImageResize((-1, -1, 7, 4), "nearest"), nk.AvgPool((1, 1))).kernel_fn(x1, x2)
    assert rel_err(diag.nngp, torch.diagonal(torch.diagonal(full.nngp, 0, 2, 3), 0, 2, 3)) < 1e-14


@pytest.mark.parametrize(
    "args, words",
    [
        (((-1, -1, 4, 4), "cubic"), "no kernel rule"),
        (((-1, -1, 4, 4), "spline"), "unknown method"),
        (((2, -1, 4, 4), "linear"), "batch and channel entries"),
        (((-1, -1, 0, 4), "linear"), "size >= 1"),
    ],
)
def test_refusals(args, words):
    with pytest.raises(LayerError, match=words):
        nk.ImageResize(*args)


def test_wrong_rank_and_layout():
    with pytest.raises(LayerError, match="2 spatial axes"):
        nk.serial(nk.Conv(2, (3,)), nk.ImageResize((-1, -1, 3, 3), "linear")).kernel_fn(torch.ones(2, 1, 5, dtype=F64))
    with pytest.raises(LayerError, match="ntkit.stax.ImageResize"):
        nk.ImageResize((-1, 3, 3, -1), "linear", channel_axis=-1)


#: NT 0.6.5's ImageResize.kernel_fn ignores Kernel.is_reversed: after a Conv (which reverses the kernel's spatial
#: axes) it resizes H by W's target and W by H's (its apply_fn resizes correctly). Its 2-D kernels are ntkit's with
#: the two targets swapped (the heads that follow are symmetric in H and W).
NT_BUGS = {t for t, v in ZOO_RESIZE.items() if v[4] == "im"}


@pytest.mark.parametrize("tag", sorted(set(ZOO_RESIZE) - NT_BUGS))
def test_nt_parity_1d(tag):
    name = f"resize_{tag}"
    err = zoo_errors(name, load_reference(name))
    assert err["12"] < 1e-13 and err["11_off"] < 1e-13 and err["11_diag"] < 1e-7, err


@pytest.mark.parametrize("tag", sorted(NT_BUGS))
def test_nt_2d_is_ntkit_with_the_targets_swapped(tag):
    """Measured ≤ 4e-16: NT's bug, modelled exactly; the correct kernel differs from NT's by 0.5-17 %."""
    name = f"resize_{tag}"
    ref = load_reference(name)
    _, shape, method, antialias, kind, head = ZOO_RESIZE[tag]
    h, w = (s if s != -1 else d for s, d in zip(shape[2:], (5, 6)))
    swapped = _zoo_conv([nk.ImageResize((-1, -1, w, h), method, antialias=antialias)], _zoo_head(head), kind)
    err = zoo_errors(name, ref, net=swapped)
    assert err["12"] < 1e-13 and err["11_off"] < 1e-13, err
    assert zoo_errors(name, ref)["12"] > 1e-3
    assert np.isfinite(ref["nngp_12"]).all()
