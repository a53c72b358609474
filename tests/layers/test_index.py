"""Index / Slice (NT's ``stax.Index``, ``stax.Slice``): the rule on both layouts, the twin, refusals, NT parity."""

from __future__ import annotations

import pytest
import torch
from helpers import load_reference
from nt_nets import ZOO_INDEX, zoo_errors

import ntkit as nk
from ntkit.layers import LayerError

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
PRE = [nk.Conv(3, (3, 3), padding="SAME", W_std=1.2, b_std=0.1)]


def _x(n, seed=0):
    return torch.randn(n, 2, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_slice_helper():
    assert nk.Slice[1:3, ::-1] == (slice(1, 3), slice(None, None, -1))
    assert nk.Slice(slice(None), 2) == nk.Slice[:, 2] and nk.Slice[..., 0] == (Ellipsis, 0)


@pytest.mark.parametrize("full", [False, True])
def test_rule_indexes_each_axis_and_its_twin(full):
    """K'[i, j, y, y'] = K[i, j, s(y), s(y')] (full) / K'[i, j, y] = K[i, j, s(y)] (diagonal); an int drops the axis."""
    x1, x2 = _x(3), _x(2, 1)
    tail = [nk.AvgPool((1,))] if full else []
    k0 = nk.serial(*PRE, *([nk.AvgPool((1, 1))] if full else [])).kernel_fn(x1, x2)
    k = nk.serial(*PRE, nk.Index(nk.Slice[:, :, 3, 5:0:-2]), *tail).kernel_fn(x1, x2)
    cols = [5, 3, 1]
    for g in ("nngp", "ntk"):
        a = getattr(k0, g)
        expect = a[:, :, 3, 3][:, :, cols][:, :, :, cols] if full else a[:, :, 3][:, :, cols]
        assert torch.equal(getattr(k, g), expect)


def test_twin_is_x_of_idx():
    x = _x(2)
    mod = nk.serial(nk.Index(nk.Slice[..., ::-2, 1])).module((2, 5, 6), seed=0, dtype=F64)
    assert torch.equal(mod(x), x.flip(2)[:, :, ::2, 1])


@pytest.mark.parametrize(
    "idx, words",
    [
        (nk.Slice[0], "batch axis"),
        (nk.Slice[1:], "batch axis"),
        (nk.Slice[:, 0], "channel axis"),
        (nk.Slice[:, :, None], "not supported"),
        (nk.Slice[:, :, True], "not supported"),
        (nk.Slice[:, :, ::0], "step 0"),
        (nk.Slice[..., 0, ...], "only one"),
    ],
)
def test_refused_at_construction(idx, words):
    with pytest.raises(LayerError, match=words):
        nk.Index(idx)


@pytest.mark.parametrize(
    "idx, words",
    [
        (nk.Slice[:, :, 7], "out of range"),
        (nk.Slice[:, :, 4:2], "selects no position"),
        (nk.Slice[:, :, :, :, 0], "indexes 5 axes"),
        (nk.Slice[:, 0:1], "channel axis"),
    ],
)
def test_refused_on_the_activations(idx, words):
    with pytest.raises(LayerError, match=words):
        nk.serial(*PRE, nk.Index(idx)).kernel_fn(_x(2))


def test_layout_arguments():
    with pytest.raises(LayerError, match="ntkit.stax.Index"):
        nk.Index(nk.Slice[:, :, 1:], channel_axis=-1)


@pytest.mark.parametrize("tag", sorted(ZOO_INDEX))
def test_nt_parity(tag):
    """Measured ≤ 2e-15 off NT's diagonal (NT's diagonal: arc-cosine round-off ≤ 1e-9)."""
    name = f"index_{tag}"
    err = zoo_errors(name, load_reference(name))
    assert err["12"] < 1e-13 and err["11_off"] < 1e-13 and err["11_diag"] < 1e-7, err
