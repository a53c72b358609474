"""DotGeneral (NT's ``stax.DotGeneral``, ``lax.dot_general`` with a constant): closed forms, the output layout, the
twin against torch, refusals, NT 0.6.5 parity."""

from __future__ import annotations

import pytest
import torch
from helpers import load_reference, rel_err
from nt_nets import ZOO_DOT_GENERAL, zoo_errors

import ntkit as nk
from ntkit.layers import LayerError

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
PRE = [nk.Conv(3, (3, 3), padding="SAME", W_std=1.2, b_std=0.1)]


def _x(n, seed=0):
    return torch.randn(n, 2, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _c(*shape, seed=9):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_scalar_and_identity():
    x = _x(3)
    k0 = nk.serial(*PRE).kernel_fn(x)
    k = nk.serial(*PRE, nk.DotGeneral(rhs=-1.5)).kernel_fn(x)
    assert rel_err(k.nngp, 2.25 * k0.nngp) < 1e-15 and rel_err(k.ntk, 2.25 * k0.ntk) < 1e-15
    assert torch.equal(nk.serial(*PRE, nk.DotGeneral()).kernel_fn(x).nngp, k0.nngp)


def test_contraction_is_A_K_At():
    """lhs A (4, 6) contracting the width: output (N, C, 4, 5) (lax.dot_general's order: the lhs's free axis first,
    then x's free axes), K'[(a, h), (a', h')] = Σ A[a, w] K[h, w, h', w'] A[a', w']."""
    x1, x2, A = _x(3), _x(2, 1), _c(4, 6)
    k0 = nk.serial(*PRE, nk.AvgPool((1, 1))).kernel_fn(x1, x2)
    layer = nk.DotGeneral(lhs=A, dimension_numbers=(((1,), (3,)), ((), ())))
    k = nk.serial(*PRE, layer, nk.AvgPool((1, 1))).kernel_fn(x1, x2)
    assert k.shape1[2:] == (4, 5)
    for g in ("nngp", "ntk"):
        expect = torch.einsum("aw,ijhgwv,bv->ijabhg", A, getattr(k0, g), A)
        assert rel_err(getattr(k, g), expect) < 1e-14


def test_twin_matches_torch():
    x, R = _x(2), _c(5, 3)
    mod = nk.serial(nk.DotGeneral(rhs=R, dimension_numbers=(((2,), (0,)), ((), ())))).module(
        (2, 5, 6), seed=0, dtype=F64
    )
    assert rel_err(mod(x), torch.einsum("nchw,hk->ncwk", x, R)) < 1e-15
    B = _c(5, 3)  # a dot-batch dimension: y[n, c, h, w, k] = x[n, c, h, w] B[h, k]
    modb = nk.serial(nk.DotGeneral(rhs=B, dimension_numbers=(((), ()), ((2,), (0,))))).module(
        (2, 5, 6), seed=0, dtype=F64
    )
    assert rel_err(modb(x), torch.einsum("nchw,hk->nchwk", x, B)) < 1e-15


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(lhs=1.0, rhs=2.0), "at most one"),
        (dict(rhs=torch.ones(3, dtype=torch.complex128)), "real"),
        (dict(rhs=torch.tensor([1.0, float("nan")])), "Inf or NaN"),
        (dict(rhs=torch.ones(3), dimension_numbers=(((0,),), ((), ()))), "four sequences"),
        (dict(rhs=torch.ones(3), dimension_numbers=(((2,), ()), ((), ()))), "equal lengths"),
        (dict(rhs=torch.ones(3), dimension_numbers=(((2,), (1,)), ((), ()))), "out of range"),
        (dict(dimension_numbers=(((2,), (0,)), ((), ()))), "no constant"),
        (dict(rhs=torch.ones(3), channel_axis=-1), "ntkit.stax.DotGeneral"),
    ],
)
def test_refused_at_construction(kwargs, words):
    with pytest.raises(LayerError, match=words):
        nk.DotGeneral(**kwargs)


@pytest.mark.parametrize(
    "dn, shape, words",
    [
        ((((1,), (0,)), ((), ())), (2,), "channel axis"),
        ((((0,), (0,)), ((), ())), (2,), "batch axis"),
        ((((2,), (0,)), ((), ())), (4,), "sizes must be equal"),
    ],
)
def test_refused_on_the_activations(dn, shape, words):
    with pytest.raises(LayerError, match=words):
        nk.serial(*PRE, nk.DotGeneral(rhs=torch.ones(shape), dimension_numbers=dn)).kernel_fn(_x(2))


@pytest.mark.parametrize("tag", sorted(ZOO_DOT_GENERAL))
def test_nt_parity(tag):
    """Measured ≤ 2e-15 off NT's diagonal, raw full-pixel kernels included (NT's diagonal: arc-cosine round-off)."""
    name = f"dot_general_{tag}"
    ref = load_reference(name)
    kw = {}
    if ZOO_DOT_GENERAL[tag][5] == "none_diag":  # NT's kernel_fn(..., diagonal_spatial=True): ntkit's diagonal layout
        kw = dict(kwargs12={}, kwargs11={})
    err = zoo_errors(name, ref, **kw)
    assert err["12"] < 1e-13 and err["11_off"] < 1e-13 and err["11_diag"] < 1e-7, err
