"""Aggregate (NT's ``stax.Aggregate``): per-sample graphs through ``kernel_fn(..., pattern=(p1, p2))`` and tiles,
closed forms, SPARSE == DENSE, the finite twin, refused inputs, and NT 0.6.5 parity (with NT's 2-D SPARSE bug)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_reference, rel_err
from nt_nets import ZOO_AGGREGATE, zoo_errors

import ntkit as nk
from ntkit.layers import LayerError, layer_kwargs

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _x(n, seed=0, shape=(2, 3, 4)):
    return torch.randn(n, *shape, generator=_g(seed), dtype=F64)


def _dense(n, seed):  # weighted adjacencies on 3 x 4 pixels, about half the edges
    a = torch.rand(n, 12, 12, generator=_g(seed), dtype=F64) * (torch.rand(n, 12, 12, generator=_g(seed + 50)) < 0.5)
    return a.reshape(n, 3, 4, 3, 4)


def _edges(n, seed, e=9):  # (n, e, 2, 2): [axis, tail/head]; the last edge is padding, edges 1 and 2 repeat
    g = _g(seed)
    p = torch.stack([torch.randint(0, 3, (n, e, 2), generator=g), torch.randint(0, 4, (n, e, 2), generator=g)], 2)
    p[:, 1] = p[:, 2]
    p[:, -1] = -1
    return p


def _to_dense(p):
    out = torch.zeros(p.shape[0], 3, 4, 3, 4, dtype=F64)
    for n in range(p.shape[0]):
        for (th, hh), (tw, hw) in p[n].tolist():
            if hh >= 0 and hw >= 0:
                out[n, th, tw, hh, hw] += 1
    return out


PRE = [nk.Conv(3, (3, 3), padding="SAME", W_std=1.2, b_std=0.1)]


def _net(**kw):
    agg = nk.Aggregate(**kw)
    return nk.serial(*PRE, agg, nk.Relu(), nk.Conv(3, (2, 2), padding="SAME"), agg, nk.Relu(), nk.GlobalAvgPool())


def test_closed_form_per_sample_graphs():
    """K'[n1, n2] = P1[n1]ᵀ K[n1, n2] P2[n2] (pixels flattened), Θ' likewise, cov1 with P1 on both sides."""
    x1, x2, p1, p2 = _x(3), _x(2, 1), _dense(3, 2), _dense(2, 3)
    tail = [nk.AvgPool((1, 1))]
    k0 = nk.serial(*PRE, *tail).kernel_fn(x1, x2)
    k = nk.serial(*PRE, nk.Aggregate(), *tail).kernel_fn(x1, x2, pattern=(p1, p2))

    def flat(t):  # (N1, N2, 3, 3', 4, 4') -> (N1, N2, 12, 12')
        return t.permute(0, 1, 2, 4, 3, 5).reshape(t.shape[0], t.shape[1], 12, 12)

    for g in ("nngp", "ntk"):
        expect = torch.einsum("iap,ijab,jbq->ijpq", p1.reshape(3, 12, 12), flat(getattr(k0, g)), p2.reshape(2, 12, 12))
        assert rel_err(flat(getattr(k, g)), expect) < 1e-14
    c0 = k0.cov1.permute(0, 1, 3, 2, 4).reshape(3, 12, 12)
    c = k.cov1.permute(0, 1, 3, 2, 4).reshape(3, 12, 12)
    assert rel_err(c, torch.einsum("iap,iab,ibq->ipq", p1.reshape(3, 12, 12), c0, p1.reshape(3, 12, 12))) < 1e-14


def test_identity_pattern_and_shared_pattern():
    x = _x(3)
    base = nk.serial(*PRE, nk.AvgPool((1, 1))).kernel_fn(x)
    k = nk.serial(*PRE, nk.Aggregate(), nk.AvgPool((1, 1))).kernel_fn(x, pattern=(None, None))
    assert torch.equal(k.nngp, base.nngp)
    p = _dense(1, 7)[0]
    shared = nk.serial(*PRE, nk.Aggregate(shared_pattern=p), nk.AvgPool((1, 1))).kernel_fn(x)
    per = nk.serial(*PRE, nk.Aggregate(), nk.AvgPool((1, 1))).kernel_fn(x, pattern=(p.expand(3, -1, -1, -1, -1), None))
    assert rel_err(shared.nngp, per.nngp) < 1e-15 and rel_err(shared.ntk, per.ntk) < 1e-15


def test_sparse_equals_dense_of_its_edges():
    """Repeated edges add up, padding edges (negative head) are ignored."""
    x1, x2, e1, e2 = _x(3), _x(2, 1), _edges(3, 4), _edges(2, 5)
    sparse = _net(implementation="SPARSE").kernel_fn(x1, x2, pattern=(e1, e2))
    dense = _net().kernel_fn(x1, x2, pattern=(_to_dense(e1), _to_dense(e2)))
    assert rel_err(sparse.nngp, dense.nngp) < 1e-14 and rel_err(sparse.ntk, dense.ntk) < 1e-14


@pytest.mark.parametrize("tile", [1, 2])
@pytest.mark.parametrize("impl", ["DENSE", "SPARSE"])
def test_tiles_get_their_samples_rows(tile, impl):
    """Tiles smaller than the batches (tile 1 runs pair-only records on the tape): each tile gets the rows of its
    samples of p1 and p2, so tiled == untiled for x2 = None and for x2 given."""
    x1, x2 = _x(5), _x(3, 1)
    p1, p2 = (_dense(5, 2), _dense(3, 3)) if impl == "DENSE" else (_edges(5, 2), _edges(3, 3))
    net = _net(implementation=impl)
    for b, pat in ((None, (p1, None)), (x2, (p1, p2))):
        whole = net.kernel_fn(x1, b, pattern=pat)
        tiled = net.kernel_fn(x1, b, pattern=pat, tile_size=tile)
        assert rel_err(tiled.nngp, whole.nngp) < 1e-13 and rel_err(tiled.ntk, whole.ntk) < 1e-13
    # a tile of x1's samples 1..2 alone: the same entries as in the whole kernel
    part = net.kernel_fn(x1[1:3], x2, pattern=(p1[1:3], p2))
    whole = net.kernel_fn(x1, x2, pattern=(p1, p2))
    assert rel_err(part.nngp, whole.nngp[1:3]) < 1e-14


def test_twin_is_x_times_the_pattern():
    x, p, e = _x(3), _dense(3, 8), _edges(3, 9)
    mod = nk.serial(nk.Aggregate()).module((2, 3, 4), seed=0, dtype=F64)
    expect = torch.einsum("nci,nij->ncj", x.reshape(3, 2, 12), p.reshape(3, 12, 12)).reshape(3, 2, 3, 4)
    with layer_kwargs(pattern=p):
        assert rel_err(mod(x), expect) < 1e-15
    sp = nk.serial(nk.Aggregate(implementation="SPARSE")).module((2, 3, 4), seed=0, dtype=F64)
    with layer_kwargs(pattern=e):
        assert rel_err(sp(x), mod[0](x, pattern=_to_dense(e))) < 1e-15


def test_refusals():
    x, p = _x(2), _dense(2, 1)
    net = _net()
    with pytest.raises(LayerError, match="pattern=\\(p1, p2\\)"):
        net.kernel_fn(x)
    with pytest.raises(TypeError, match="unexpected keyword argument.*pattern \\(Aggregate\\)"):
        net.kernel_fn(x, graph=(p, None))
    with pytest.raises(LayerError, match="leading axis must run over the 2 samples"):
        net.kernel_fn(x, pattern=(p[:1], None))
    with pytest.raises(LayerError, match="takes a pair"):
        net.kernel_fn(x, pattern=p)
    with pytest.raises(LayerError, match="x2 is None"):
        net.kernel_fn(x, pattern=(p, _dense(2, 9)))
    with pytest.raises(LayerError, match="expected \\(batch, \\*X, \\*X\\)"):
        net.kernel_fn(x, pattern=(p.reshape(2, 12, 12), None))
    sparse = _net(implementation="SPARSE")
    e = _edges(2, 3)
    bad_tail = e.clone()
    bad_tail[:, 0, 0, 0] = -1
    with pytest.raises(LayerError, match="negative tail"):
        sparse.kernel_fn(x, pattern=(bad_tail, None))
    past = e.clone()
    past[:, 0, 1, 1] = 4
    with pytest.raises(LayerError, match="past the end"):
        sparse.kernel_fn(x, pattern=(past, None))
    with pytest.raises(LayerError, match="integer vertex coordinates"):
        sparse.kernel_fn(x, pattern=(e.double(), None))
    with pytest.raises(LayerError, match="'DENSE' or 'SPARSE'"):
        nk.Aggregate(implementation="CSR")
    with pytest.raises(LayerError, match="to_dense is for"):
        nk.Aggregate(implementation="SPARSE", to_dense=lambda q: q)
    with pytest.raises(LayerError, match="channel axis"):
        nk.serial(nk.Aggregate(aggregate_axis=1)).kernel_fn(x, pattern=(p, None))
    with pytest.raises(LayerError, match="batch_axis=0 and channel_axis=1"):
        nk.Aggregate(channel_axis=-1)
    with pytest.raises(LayerError, match="has none"):
        nk.serial(nk.Dense(3), nk.Aggregate()).kernel_fn(torch.ones(2, 3, dtype=F64), pattern=(p, None))
    with pytest.raises(LayerError, match="needs each sample's graph"):
        nk.serial(nk.Aggregate()).module((2, 3, 4), seed=0, dtype=F64)(x)


#: NT 0.6.5's SPARSE Aggregate over two axes ignores Kernel.is_reversed: after a Conv (which reverses the kernel's
#: spatial axes) it reads vertex (h, w) as the pixel at flat position h·W + w of the reversed (W, H) layout — a
#: scrambled graph (its DENSE path and its apply_fn are right). ntkit computes the graph as given.
NT_BUGS = {"2d_sparse"}


@pytest.mark.parametrize("tag", sorted(set(ZOO_AGGREGATE) - NT_BUGS) + ["shared_grid"])
def test_nt_parity(tag):
    """Measured ≤ 4e-12 (dense 2-D graphs), ≤ 2e-15 otherwise; NT's diagonal carries its arc-cosine round-off."""
    name = f"aggregate_{tag}"
    err = zoo_errors(name, load_reference(name))
    assert err["12"] < 1e-11 and err["11_off"] < 1e-11 and err["11_diag"] < 1e-7, err


def test_nt_2d_sparse_bug_and_its_dense_twin():
    """ntkit's SPARSE kernel on the edges of aggregate_2d_sparse equals NT's DENSE one on their adjacency
    (aggregate_2d_sparse_to_dense, the same inputs and graphs) and differs from NT's SPARSE one (its bug)."""
    ref = load_reference("aggregate_2d_sparse")
    assert zoo_errors("aggregate_2d_sparse", ref)["12"] > 0.1
    dense = load_reference("aggregate_2d_sparse_to_dense")
    assert (dense["pattern1"] == ref["pattern1"]).all() and (dense["x1_nhwc"] == ref["x1_nhwc"]).all()
    err = zoo_errors("aggregate_2d_sparse_to_dense", dense)
    assert err["12"] < 1e-11 and err["11_off"] < 1e-11, err
