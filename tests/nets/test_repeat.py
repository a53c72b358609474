"""``repeat(layer, n)`` (issue #14): NT's ``stax.repeat`` = ``serial(*[layer] * n)``, natively and in ``ntkit.stax``;
independent parameters per copy in the finite twin; NT 0.6.5 parity (``repeat_fc``, ``repeat_conv``)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_reference, rel_err
from nt_nets import reference_net, zoo_errors

import ntkit as nk
from ntkit import stax

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _block() -> nk.Net:
    return nk.serial(nk.Dense(6, 1.3, 0.1), nk.Relu())


def test_kernel_is_the_unrolled_serial():
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    x2 = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    block = _block()
    for n in (0, 1, 3):
        rep = nk.serial(nk.repeat(block, n), nk.Dense(1))
        unrolled = nk.serial(*([block] * n), nk.Dense(1))
        for get in ("nngp", "ntk"):
            assert rel_err(rep.kernel_fn(x1, x2, get=get), unrolled.kernel_fn(x1, x2, get=get)) == 0
    # conv, with pooling (full pixel covariances, tiled on the self-covariance tape)
    im = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    cblock = nk.serial(nk.Conv(3, (2, 2), padding="SAME", b_std=0.1), nk.Relu())
    rep = nk.serial(nk.repeat(cblock, 2), nk.GlobalAvgPool(), nk.Dense(1))
    unrolled = nk.serial(cblock, cblock, nk.GlobalAvgPool(), nk.Dense(1))
    assert rel_err(rep.kernel_fn(im, get="ntk", tile_size=1), unrolled.kernel_fn(im, get="ntk")) < 1e-13


def test_twin_has_independent_copies():
    net = nk.serial(nk.repeat(_block(), 3), nk.Dense(1))
    mod = net.module((3,), seed=0, dtype=F64)
    weights = [p for name, p in mod.named_parameters() if name.endswith("weight")]
    assert len(weights) == 4  # three Dense(6) copies and the readout
    assert not torch.equal(weights[1], weights[2])  # same shape, different draws
    y = mod(torch.randn(5, 3, dtype=F64))
    assert y.shape == (5, 1)
    # hidden widths of every copy are overridden, the readout's is not
    wide = net.module((3,), width=16, seed=0, dtype=F64)
    shapes = [tuple(p.shape) for n, p in wide.named_parameters() if n.endswith("weight")]
    assert shapes == [(16, 3), (16, 16), (16, 16), (1, 16)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be an integer"):
        nk.repeat(_block(), -1)
    with pytest.raises(ValueError, match="n must be an integer"):
        nk.repeat(_block(), 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not an ntkit layer"):
        nk.repeat(torch.nn.ReLU(), 2)  # type: ignore[arg-type]


def test_stax_repeat_is_stax_serial():
    layer = stax.serial(stax.Dense(8, W_std=1.4, b_std=0.1), stax.Gelu())
    _, _, kf_rep = stax.serial(stax.repeat(layer, 3), stax.Dense(1))
    _, _, kf_ser = stax.serial(*([layer] * 3), stax.Dense(1))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert rel_err(kf_rep(x, None, "ntk"), kf_ser(x, None, "ntk")) == 0
    init_fn, apply_fn, _ = stax.repeat(layer, 2)
    out_shape, params = init_fn(0, (4, 5))
    assert tuple(out_shape) == (4, 8) and apply_fn(params, x).shape == (4, 8)


@pytest.mark.parametrize("name", ["repeat_fc", "repeat_conv"])
def test_nt_parity(name):
    """Measured 4e-16 / 1e-15 (x2 given, and x1 against itself off the diagonal); on the diagonal NT's ReLU
    arc-cosine at ρ = 1 carries 2e-9 of round-off."""
    errors = zoo_errors(name, load_reference(name), net=reference_net(name))
    assert errors["12"] < 1e-12 and errors["11_off"] < 1e-12 and errors["11_diag"] < 1e-8, errors
