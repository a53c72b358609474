"""Softmax attention at the standard 1/sqrt(d) scaling (GlobalSelfAttention(linear_scaling=False, SOFTMAX)): the
quasi-Monte-Carlo NNGP against closed forms (one token; zero-variance logits), a 2^21-sample reference of the
Gaussian-logit expectation (the stated error bound), and Monte Carlo over wide finite twins."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err

import ntkit as nt
import ntkit.layers.attention as att
from ntkit.layers import GlobalSelfAttention
from ntkit.layers.base import LayerError


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _attn(n_heads=1, **kw):
    base = dict(linear_scaling=False, attention_mechanism="SOFTMAX")
    base.update(kw)
    return GlobalSelfAttention(256, 256, 256, n_heads, **base)


def _input_kernels(x1, x2):
    """Per-channel token kernels ``K[a, b, s, t] = x1[a, :, s]·x2[b, :, t] / C``."""
    return torch.einsum("acs,bct->abst", x1, x2) / x1.shape[1]


def test_one_token_is_the_values_kernel():
    """L = 1: the softmax weight is 1, so K' = σ_OV² K + b² exactly (no sampling error)."""
    x1, x2 = _x(3, 4, 1), _x(2, 4, 1, seed=1)
    net = nt.serial(_attn(W_query_std=2.0, W_value_std=1.3, W_out_std=0.7, b_std=0.2))
    k = net.kernel_fn(x1, x2, "nngp")
    want = (1.3 * 0.7) ** 2 * _input_kernels(x1, x2) + 0.04
    assert torch.allclose(k, want, rtol=1e-12, atol=1e-14)


def test_zero_variance_logits_give_uniform_weights():
    """W_query_std = 0: every logit is 0, the weights are uniform, K'[s, s'] = σ_OV² mean_{t,t'} K[t, t'] + b²."""
    x1, x2 = _x(2, 3, 5), _x(3, 3, 5, seed=1)
    k = nt.serial(_attn(W_query_std=0.0, W_out_std=1.5, b_std=0.1)).kernel_fn(x1, x2, "nngp")
    K = _input_kernels(x1, x2)
    want = (2.25 * K.mean((2, 3)) + 0.01)[:, :, None, None].expand_as(k)
    assert torch.allclose(k, want, rtol=1e-12, atol=1e-14)


def _reference(A, B, C, V, qk2, n=2**19, seed=0):
    """Plain Monte Carlo of Σ_{jj'} E[p_ij p'_i'j'] V[j, j'] over the joint Gaussian logits of all query/key pairs:
    z = σ L Z Lᵀ with L Lᵀ = [[A, C], [Cᵀ, B]] gives Cov(z[a, b], z[c, d]) = σ² K[a, c] K[b, d] exactly."""
    L = A.shape[-1]
    K = torch.cat([torch.cat([A, C], 1), torch.cat([C.T, B], 1)], 0)
    Lc = torch.linalg.cholesky(K + 1e-12 * torch.eye(2 * L, dtype=K.dtype))
    g = torch.Generator().manual_seed(seed)
    tot = torch.zeros(L, L, dtype=torch.float64)
    tot2 = torch.zeros(L, L, dtype=torch.float64)
    bs = 2**16
    for _ in range(n // bs):
        z = math.sqrt(qk2) * Lc @ torch.randn(bs, 2 * L, 2 * L, generator=g, dtype=torch.float64) @ Lc.T
        val = torch.einsum("sij,jk,stk->sit", torch.softmax(z[:, :L, :L], -1), V, torch.softmax(z[:, L:, L:], -1))
        tot += val.sum(0)
        tot2 += (val**2).sum(0)
    m = tot / n
    return m, ((tot2 / n - m**2) / n).sqrt()


@pytest.mark.parametrize("qk2", [0.25, 2.0])
def test_qmc_within_its_stated_bound_of_a_large_reference(qk2):
    """The documented bound: |E − Ê| < 3.5·SE (99 %, Student t with 7 dof) with SE ≤ tol·max|V|."""
    x = _x(2, 3, 3)
    K = _input_kernels(x, x)
    A, B, C = K[0, 0], K[1, 1], K[0, 1]
    V = K[0, 1] * 0.8 + 0.1
    tol = 2e-3
    est, info = att.softmax_attention_expectation(A[None], B[None], C[None], V[None], qk2, tol)
    ref, ref_se = _reference(A, B, C, V, qk2)
    scale = float(V.abs().max())
    assert info["se"] <= tol
    err = (est[0] - ref).abs()
    bound = 3.5 * info["se"] * scale + 4 * ref_se
    print(f"qk2={qk2}: max error {float(err.max()) / scale:.2e} of scale, points {info['points']}")
    assert bool((err <= bound).all()), (err, bound)


def test_deterministic_and_symmetric():
    x = _x(2, 3, 3)
    net = nt.serial(_attn(W_query_std=1.2, softmax_tol=5e-3))
    a, b = net.kernel_fn(x, None, "nngp"), net.kernel_fn(x, None, "nngp")
    assert torch.equal(a, b)
    assert torch.equal(a, a.permute(1, 0, 3, 2))  # K'[b, a, s', s] = K'[a, b, s, s'], exactly
    cov = net.kernel_fn(x, None, ("nngp", "cov1")).cov1
    assert torch.equal(cov, torch.diagonal(a, 0, 0, 1).movedim(-1, 0))
    # x1 against x2 = x1: the same numbers up to the QMC error (other pairs of points per tile)
    c = net.kernel_fn(x, x.clone(), "nngp")
    assert rel_err(c, a) < 3.5 * 5e-3 * 2


def test_monte_carlo_of_wide_finite_twins():
    """Finite twins (32 heads of width 32, 256 outputs, N(0, 1) parameters, NTK parameterisation) averaged over
    seeds and output channels: the output covariance is the rule's at any number of heads (only layers after it see
    the Gaussian mixture); the heads make each twin's own kernel closer to it (less Monte-Carlo noise)."""
    x1 = _x(3, 2, 3)
    net = nt.serial(_attn(n_heads=32, W_query_std=1.2, W_key_std=1.0, b_std=0.1, softmax_tol=3e-3))
    k = net.kernel_fn(x1, None, "nngp")
    per = []
    with torch.no_grad():
        for s in range(60):
            f = net.module((2, 3), width=32, seed=s, dtype=torch.float64)(x1)  # (N, 256, L)
            per.append(torch.einsum("acs,bct->abst", f, f) / f.shape[1])
    per = torch.stack(per)
    mc, se = per.mean(0), per.std(0) / math.sqrt(len(per))
    err, tol = rel_err(mc, k), 0.03 + 3 * float(se.max() / k.abs().max())
    print(f"twin MC: error {err:.4f} (tolerance {tol:.4f})")
    assert err < tol


def test_ntk_and_pair_only_records_raise():
    x = _x(2, 3, 4)
    net = nt.serial(_attn())
    with pytest.raises(LayerError, match="NTK of softmax attention"):
        net.kernel_fn(x, None, "ntk")
    assert GlobalSelfAttention(1, 1, 1, 1, linear_scaling=False).needs_self_covariances
    with pytest.raises(ValueError, match="softmax_tol"):
        GlobalSelfAttention(1, 1, 1, 1, softmax_tol=0.0)


def test_unreachable_tolerance_raises(monkeypatch):
    monkeypatch.setattr(att, "QMC_MAX_POINTS", att.QMC_START_POINTS)
    x = _x(2, 3, 4)
    net = nt.serial(_attn(W_query_std=3.0, softmax_tol=1e-6))
    with pytest.raises(LayerError, match="did not reach the requested tolerance"):
        net.kernel_fn(x, None, "nngp")


def test_tiled_equals_untiled_within_tolerance():
    x = _x(3, 2, 3)
    net = nt.serial(_attn(W_query_std=1.0, softmax_tol=5e-3))
    a = net.kernel_fn(x, None, "nngp")
    b = net.kernel_fn(x, None, "nngp", tile_size=2)
    assert rel_err(b, a) < 3.5 * 2 * 5e-3


def test_masked_keys_get_no_weight():
    """Sequences padded with 2 masked positions (NT's mask_constant) give, at the unmasked positions, the kernel of
    the unpadded ones within the QMC bound (the padded logits are sampled in other dimensions: not to round-off)."""
    x1 = _x(2, 3, 3)
    xp = torch.cat([x1, torch.full((2, 3, 2), 10.0, dtype=torch.float64)], 2)
    dense = nt.Dense(4, b_std=0.1)
    tol = 4e-3
    net = nt.serial(dense, _attn(W_query_std=1.2, softmax_tol=tol))
    plain = net.kernel_fn(x1, None, "nngp")
    masked = net.kernel_fn(xp, None, "nngp", mask_constant=10.0)
    scale = float(nt.serial(dense).kernel_fn(x1, None, "nngp", diagonal_spatial=False).abs().max())  # max |K_v|
    err = float((masked[:, :, :3, :3] - plain).abs().max())
    assert err < 3.5 * math.sqrt(2) * tol * scale, (err, scale)
    assert float(masked[:, :, 3:].abs().max()) == 0.0  # masked query positions are zeroed
    unmasked = net.kernel_fn(xp, None, "nngp")
    assert float((unmasked[:, :, :3, :3] - plain).abs().max()) > 10 * tol * scale  # the padding is data otherwise
