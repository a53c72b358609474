"""Masking (NT's ``kernel_fn(..., mask_constant=c)``) through every layer with a mask rule, and FanInConcat along
spatial axes.

Independent checks (NT parity is in tests/test_stax.py, on the "masking" and "concat" reference families):

* exact: padding a batch with masked positions changes nothing — the kernel of sequences/images padded at the end
  with masked positions equals the kernel of the unpadded ones (SAME convolutions see zeros there, which is their
  padding; attention gives masked keys no weight; GlobalAvgPool and LayerNorm average over unmasked positions);
  and a spatial concatenation of two branches, pooled, is the size-weighted mean of the branches' pooled kernels
  plus the cross blocks (zero);
* Monte Carlo: the finite twins run with the same masks (inputs and embeddings zeroed at masked positions, masked
  keys without weight, masked means) converge to the kernels;
* tiled == untiled with masks (the tiler hands every tile its samples' masks), and clear errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err

import ntkit as nk
from ntkit.layers import LayerError
from ntkit.layers.attention import GlobalSelfAttentionModule

F64 = torch.float64
MASK = 10.0
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pad(x: torch.Tensor, extra: tuple[int, ...]) -> torch.Tensor:
    """``x`` padded at the end of each spatial axis by ``extra`` masked positions (every channel MASK)."""
    out = x
    for a, e in enumerate(extra):
        if e:
            shape = list(out.shape)
            shape[2 + a] = e
            out = torch.cat([out, torch.full(shape, MASK, dtype=x.dtype)], 2 + a)
    return out


ATTENTION = {
    "softmax": dict(W_key_std=1.3, b_std=0.1),
    "identity": dict(attention_mechanism="IDENTITY", W_key_std=0.5),
    "relu_sum_exp_val": dict(
        attention_mechanism="RELU", pos_emb_type="SUM", pos_emb_decay_fn=lambda d: torch.exp(-d), val_pos_emb=True
    ),
    "abs_concat_onehot": dict(attention_mechanism="ABS", pos_emb_type="CONCAT", n_chan_pos_emb=4, W_pos_emb_std=0.7),
    "sqrt_identity_concat_inverse_val": dict(
        linear_scaling=False,
        attention_mechanism="IDENTITY",
        pos_emb_type="CONCAT",
        pos_emb_decay_fn=lambda d: 1 / (1 + d),
        val_pos_emb=True,
    ),
    "sqrt_identity_sum_onehot": dict(linear_scaling=False, attention_mechanism="IDENTITY", pos_emb_type="SUM"),
}


def _attention_net(d: int, kw: dict) -> nk.Net:
    att = nk.GlobalSelfAttention(8, 8, 8, 2, **kw)
    return nk.serial(
        nk.Conv(8, (3,) * d, padding="SAME", b_std=0.1),
        nk.Relu(),
        att,
        nk.Relu(),
        att,
        nk.LayerNorm(axis=tuple(range(1, d + 2))),
        nk.GlobalAvgPool(),
        nk.Dense(1, b_std=0.2),
    )


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("tag", sorted(ATTENTION))
def test_padding_with_masked_positions_changes_nothing_attention(tag, d):
    """Attention (every mechanism, both scalings, positional embeddings) on sequences padded with 2 masked
    positions / images with a masked row and column: the kernels of the unpadded inputs, to round-off."""
    spatial, extra = ((5,), (2,)) if d == 1 else ((3, 4), (1, 1))
    x1 = torch.randn((3, 3, *spatial), generator=_gen(1), dtype=F64)
    x2 = torch.randn((2, 3, *spatial), generator=_gen(2), dtype=F64)
    net = _attention_net(d, ATTENTION[tag])
    plain = net.kernel_fn(x1, x2)
    masked = net.kernel_fn(_pad(x1, extra), _pad(x2, extra), mask_constant=MASK)
    assert rel_err(masked.nngp, plain.nngp) < 1e-12 and rel_err(masked.ntk, plain.ntk) < 1e-12
    sym = net.kernel_fn(_pad(x1, extra), None, "ntk", mask_constant=MASK)
    assert rel_err(sym, net.kernel_fn(x1, None, "ntk")) < 1e-12
    # the masks matter: without them the padding is data
    assert rel_err(net.kernel_fn(_pad(x1, extra), _pad(x2, extra), "nngp"), plain.nngp) > 1e-3


def test_padding_with_masked_positions_changes_nothing_conv_pool_norm():
    """SAME convolutions, AvgPool (SAME, stride 1), LayerNorm over channels and pixels, GlobalAvgPool, a residual
    FanInSum and a channel FanInConcat: padded-and-masked images give the unpadded kernels."""
    net = nk.serial(
        nk.Conv(6, (3, 3), padding="SAME", b_std=0.1),
        nk.Erf(),
        nk.AvgPool((3, 3), padding="SAME"),
        nk.Conv(6, (3, 3), padding="SAME"),
        nk.FanOut(2),
        nk.parallel(nk.Conv(6, (3, 3), padding="SAME"), nk.Identity()),
        nk.FanInSum(),
        nk.LayerNorm(axis=(1, 2, 3)),
        nk.Relu(),
        nk.FanOut(2),
        nk.parallel(nk.Conv(6, (2, 2), padding="SAME"), nk.Dense(3)),
        nk.FanInConcat(),
        nk.Conv(6, (3, 3), padding="SAME"),
        nk.Gelu(),
        nk.GlobalAvgPool(),
        nk.Dense(1),
    )
    x1 = torch.randn((3, 2, 4, 3), generator=_gen(3), dtype=F64)
    x2 = torch.randn((2, 2, 4, 3), generator=_gen(4), dtype=F64)
    plain = net.kernel_fn(x1, x2)
    masked = net.kernel_fn(_pad(x1, (2, 1)), _pad(x2, (2, 1)), mask_constant=MASK)
    assert rel_err(masked.nngp, plain.nngp) < 1e-12 and rel_err(masked.ntk, plain.ntk) < 1e-12


def test_index_moves_the_masks():
    """A flip (``Index``) moves the masked tail to the front; attention and GlobalAvgPool after it must follow
    the flipped mask: the padded-and-masked kernel is the unpadded one."""
    att = nk.GlobalSelfAttention(8, 8, 8, 2, pos_emb_type="SUM", pos_emb_decay_fn=lambda d: torch.exp(-d))
    net = nk.serial(
        nk.Conv(8, (3,), padding="SAME"),
        nk.Relu(),
        nk.Index(nk.Slice[:, :, ::-1]),
        nk.Conv(8, (3,), padding="SAME", b_std=0.1),
        att,
        nk.Relu(),
        nk.GlobalAvgPool(),
        nk.Dense(1),
    )
    x1 = torch.randn(3, 2, 5, generator=_gen(15), dtype=F64)
    x2 = torch.randn(2, 2, 5, generator=_gen(16), dtype=F64)
    plain = net.kernel_fn(x1, x2)
    masked = net.kernel_fn(_pad(x1, (2,)), _pad(x2, (2,)), mask_constant=MASK)
    assert rel_err(masked.nngp, plain.nngp) < 1e-12 and rel_err(masked.ntk, plain.ntk) < 1e-12


def test_masked_inputs_are_zeroed_and_nan_masks():
    """Entries equal to mask_constant are zero in the input covariances; ``nan`` matches NaN; a constant that
    matches only some channels of a position leaves the position unmasked after the first Dense (NT)."""
    x = torch.randn(4, 3, 6, generator=_gen(5), dtype=F64)
    x[0, :, 4:] = MASK
    x[1, 1, 2] = MASK  # one channel only
    net = nk.serial(nk.Conv(8, (3,), padding="SAME"), nk.Relu(), nk.GlobalAvgPool(), nk.Dense(1))
    z = x.clone()
    z[z == MASK] = 0.0
    got = net.kernel_fn(x, None, mask_constant=MASK)
    # by hand: sample 0 has 4 unmasked positions, the others 6 (the per-channel match is not a masked position)
    plain = nk.serial(nk.Conv(8, (3,), padding="SAME"), nk.Relu()).kernel_fn(z, None, diagonal_spatial=False)
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[0, 4:] = False
    k = plain.nngp * (keep[:, None, :, None] & keep[None, :, None, :])  # (N, N, P, P): both positions unmasked
    n = keep.sum(1).to(F64)
    assert rel_err(got.nngp, k.sum((2, 3)) / (n[:, None] * n[None, :])) < 1e-13
    xn = torch.where(x == MASK, torch.tensor(float("nan"), dtype=F64), x)
    assert torch.equal(net.kernel_fn(xn, None, "nngp", mask_constant=float("nan")), got.nngp)
    with pytest.raises(ValueError, match="NaN"):
        net.kernel_fn(xn, None, "nngp")


def test_tiles_get_their_masks():
    """Tiled (tile_size=2, with and without the self-covariance tape) == untiled, with masks."""
    x1 = _pad(torch.randn(5, 2, 5, generator=_gen(6), dtype=F64), (2,))
    x2 = _pad(torch.randn(3, 2, 5, generator=_gen(7), dtype=F64), (2,))
    x1[1, :, 3:] = MASK
    pool = nk.serial(
        nk.Conv(8, (3,), padding="SAME"), nk.Relu(), nk.AvgPool((2,), padding="SAME"), nk.GlobalAvgPool(), nk.Dense(1)
    )
    att = _attention_net(1, ATTENTION["relu_sum_exp_val"])
    for net in (pool, att):
        for b in (None, x2):
            whole = net.kernel_fn(x1, b, mask_constant=MASK)
            tiled = net.kernel_fn(x1, b, mask_constant=MASK, tile_size=2)
            assert rel_err(tiled.nngp, whole.nngp) < 1e-13 and rel_err(tiled.ntk, whole.ntk) < 1e-13


def test_fc_masked_sample_is_zero():
    """A vector that is all MASK is a masked sample: its kernel entries are zero after the first Dense (with a
    bias) and after every nonlinearity (Gaussian(0) = 1 is zeroed too)."""
    x = torch.randn(4, 5, generator=_gen(8), dtype=F64)
    x[2] = MASK
    net = nk.serial(nk.Dense(16, b_std=0.3), nk.Gaussian(), nk.Dense(1, b_std=0.2))
    k = net.kernel_fn(x, None, mask_constant=MASK)
    assert float(k.nngp[2].abs().max()) == 0.0 and float(k.ntk[:, 2].abs().max()) == 0.0
    keep = [0, 1, 3]
    assert rel_err(k.nngp[keep][:, keep], net.kernel_fn(x[keep], None, "nngp")) < 1e-14


def test_layers_without_a_mask_rule_refuse():
    x = _pad(torch.randn(3, 2, 5, generator=_gen(9), dtype=F64), (2,))
    for layer in (nk.ConvTranspose(4, (3,), padding="SAME"), nk.ImageResize((-1, -1, 9), "linear")):
        net = nk.serial(nk.Conv(4, (3,), padding="SAME"), layer, nk.GlobalAvgPool(), nk.Dense(1))
        with pytest.raises(LayerError, match="no mask rule"):
            net.kernel_fn(x, None, mask_constant=MASK)
    # per-channel masks reaching a layer that needs per-position ones
    y = torch.randn(3, 2, 5, generator=_gen(10), dtype=F64)
    y[0, 0, 1] = MASK
    with pytest.raises(LayerError, match="differ between the channels"):
        nk.serial(nk.GlobalAvgPool(), nk.Dense(1)).kernel_fn(y, None, mask_constant=MASK)
    with pytest.raises(TypeError, match="mask_constant"):
        nk.serial(nk.Dense(1)).kernel_fn(y[:, :, 0], None, mask_constant="pad")


# ---------------------------------------------------------------------------------------------------
# Monte Carlo: the finite twins with the same masks
# ---------------------------------------------------------------------------------------------------
def _masked_forward(mod: torch.nn.Sequential, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NT's masked apply_fn for the twin of :func:`_mc_net`: activations zeroed at masked positions before every
    layer, masked keys without weight, the global average over unmasked positions."""
    keep = (~mask)[:, None].to(x.dtype)
    n = keep.sum(tuple(range(2, x.dim())))
    h = x
    for m in mod:
        if h.dim() > 2:
            h = h * keep
        if isinstance(m, GlobalSelfAttentionModule):
            h = m(h, mask=mask)
        elif "GlobalAvgPool" in repr(m):
            h = h.sum(tuple(range(2, h.dim()))) / n
        else:
            h = m(h)
    return h


def _mc_net(out_scale: float = 1.0, outputs: int = 64) -> nk.Net:
    return nk.serial(
        nk.Conv(4, (3,), padding="SAME", W_std=1.3, b_std=0.2),
        nk.GlobalSelfAttention(
            8, 8, 8, 4, W_out_std=out_scale, pos_emb_type="SUM", pos_emb_decay_fn=lambda d: torch.exp(-d)
        ),
        nk.GlobalAvgPool(),
        nk.Dense(outputs, b_std=0.1),
    )


def _empirical_ntk(mod: torch.nn.Sequential, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_θ ∂f_o(x_i)/∂θ ∂f_o(x_j)/∂θ`` averaged over the outputs ``o``, one backward pass per output entry."""
    params = list(mod.parameters())
    f = _masked_forward(mod, x, mask)
    rows = []
    for i in range(f.shape[0]):
        for o in range(f.shape[1]):
            g = torch.autograd.grad(f[i, o], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    j = torch.stack(rows).reshape(f.shape[0], f.shape[1], -1)
    return torch.einsum("iop,jop->ij", j, j) / f.shape[1]


def test_monte_carlo_masked_attention():
    """Masked SOFTMAX attention with positional embeddings on sequences with masked tails and a masked inner
    position: the NNGP (mean of f f'ᵀ/64 over 120 twins of width 128) and the NTK (the empirical NTK of 8 twins,
    4 outputs) of the masked finite twins match the kernel within 3 % (finite-width bias) plus three standard
    errors (measured: 1 % and 5.5 %); the kernel computed without masks is rejected by both (NNGP 14 %, NTK 110 %
    away) and a rule off by 21 % (W_out_std × 1.1) by the NNGP."""
    x = torch.randn(3, 2, 6, generator=_gen(11), dtype=F64)
    x[0, :, 3:] = MASK
    x[1, :, :2] = MASK
    x[2, :, 1] = MASK  # a masked position inside the sequence
    mask = (x == MASK).all(1)
    xz = torch.where(mask[:, None], torch.zeros((), dtype=F64), x)
    exact = _mc_net().kernel_fn(x, None, mask_constant=MASK)
    wrong = _mc_net(1.1).kernel_fn(x, None, mask_constant=MASK)
    unmasked = _mc_net().kernel_fn(xz, None)
    for g, n, outputs in (("nngp", 120, 64), ("ntk", 8, 4)):
        samples = []
        for seed in range(n):
            mod = _mc_net(outputs=outputs).module((2, 6), width=128, seed=100 + seed, dtype=F64)
            if g == "nngp":
                with torch.no_grad():
                    f = _masked_forward(mod, xz, mask)
                samples.append(f @ f.T / f.shape[1])
            else:
                samples.append(_empirical_ntk(mod, xz, mask))
        s = torch.stack(samples).reshape(n, -1)
        mean, se = s.mean(0), s.std(0) / math.sqrt(n)
        e = getattr(exact, g).reshape(-1)
        err, noise = float((mean - e).norm() / e.norm()), float(se.norm() / e.norm())
        assert err < 0.03 + 3 * noise, (g, err, noise)
        for other in (wrong, unmasked) if g == "nngp" else (unmasked,):
            bad = getattr(other, g).reshape(-1)
            assert float((mean - bad).norm() / bad.norm()) > 0.03 + 3 * noise, (g, "no power", noise)


# ---------------------------------------------------------------------------------------------------
# FanInConcat along a spatial axis
# ---------------------------------------------------------------------------------------------------
def test_spatial_concat_is_block_diagonal():
    """Concatenating two Conv branches along the sequence axis: the full kernel is block-diagonal with the
    branches' kernels as blocks; the same-pixel kernel is their concatenation; GlobalAvgPool of it is the
    size-weighted mean of the branches' pooled kernels (the cross blocks are zero)."""
    x = torch.randn(3, 2, 5, generator=_gen(12), dtype=F64)
    stem = [nk.Conv(6, (3,), padding="SAME", b_std=0.1), nk.Relu()]
    a, b = nk.Conv(6, (3,), padding="SAME", b_std=0.2), nk.Conv(6, (2,), strides=(2,), padding="SAME")
    cat = nk.serial(*stem, nk.FanOut(2), nk.parallel(a, b), nk.FanInConcat(axis=2))
    ka = nk.serial(*stem, a).kernel_fn(x, None, diagonal_spatial=False)
    kb = nk.serial(*stem, b).kernel_fn(x, None, diagonal_spatial=False)
    full = cat.kernel_fn(x, None, diagonal_spatial=False)
    assert full.nngp.shape == (3, 3, 8, 8)
    assert torch.equal(full.nngp[:, :, :5, :5], ka.nngp) and torch.equal(full.nngp[:, :, 5:, 5:], kb.nngp)
    assert float(full.nngp[:, :, :5, 5:].abs().max()) == 0.0 and float(full.ntk[:, :, 5:, :5].abs().max()) == 0.0
    diag = cat.kernel_fn(x, None, diagonal_spatial=True)
    same_pixel = torch.cat([torch.diagonal(ka.ntk, 0, 2, 3), torch.diagonal(kb.ntk, 0, 2, 3)], 2)
    assert rel_err(diag.ntk, same_pixel) < 1e-14
    pooled = nk.serial(cat, nk.GlobalAvgPool()).kernel_fn(x, None)
    expect = (ka.nngp.sum((2, 3)) + kb.nngp.sum((2, 3))) / 64
    assert rel_err(pooled.nngp, expect) < 1e-14
    # the twin concatenates along the same axis
    mod = cat.module((2, 5), width=4, seed=0)
    assert tuple(mod(x.float()).shape) == (3, 6, 8)  # the readout branches keep their 6 channels


def test_spatial_concat_monte_carlo():
    """NNGP of a spatial concatenation followed by a ReLU Conv and GlobalAvgPool: the mean of 200 twins of width
    64 (16 outputs) within 3 % plus three standard errors; the block-diagonal rule is needed (a rule that
    correlated the blocks fully would be off by more)."""
    x = torch.randn(3, 2, 4, 3, generator=_gen(13), dtype=F64)
    net = nk.serial(
        nk.Conv(4, (3, 3), padding="SAME", b_std=0.1),
        nk.Relu(),
        nk.FanOut(2),
        nk.parallel(nk.Conv(4, (3, 3), padding="SAME"), nk.Conv(4, (3, 3), strides=(2, 1), padding="SAME")),
        nk.FanInConcat(axis=2),
        nk.Relu(),
        nk.Conv(4, (2, 2), padding="SAME"),
        nk.Relu(),
        nk.GlobalAvgPool(),
        nk.Dense(16),
    )
    exact = net.kernel_fn(x, None, "nngp")
    n = 200
    samples = []
    with torch.no_grad():
        for seed in range(n):
            f = net.module((2, 4, 3), width=64, seed=seed, dtype=F64)(x)
            samples.append(f @ f.T / f.shape[1])
    s = torch.stack(samples).reshape(n, -1)
    mean, se = s.mean(0), s.std(0) / math.sqrt(n)
    err, noise = float((mean - exact.reshape(-1)).norm() / exact.norm()), float(se.norm() / exact.norm())
    assert err < 0.03 + 3 * noise, (err, noise)


def test_spatial_concat_refusals():
    x = torch.randn(3, 2, 5, generator=_gen(14), dtype=F64)
    stem = nk.Conv(6, (3,), padding="SAME")
    with pytest.raises(LayerError, match="Gaussian"):
        nk.serial(stem, nk.FanOut(2), nk.parallel(nk.Relu(), nk.Conv(6, (3,))), nk.FanInConcat(axis=2)).kernel_fn(x)
    with pytest.raises(LayerError, match="same activations"):
        nk.serial(
            stem, nk.FanOut(2), nk.parallel(nk.Identity(), nk.Identity()), nk.FanInConcat(axis=2), nk.GlobalAvgPool()
        ).kernel_fn(x)
    with pytest.raises(LayerError, match="differ"):
        nk.serial(
            stem, nk.FanOut(2), nk.parallel(nk.Conv(6, (3,)), nk.Conv(4, (3,))), nk.FanInConcat(axis=2)
        ).kernel_fn(x)
