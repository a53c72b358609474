"""Scalable solvers: CG / preconditioned CG, Nyström (uniform, ridge leverage scores), Falkon, random features."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import rel_err

import ntkit
from ntkit.linalg import (
    LowRankPreconditioner,
    MatvecOperator,
    cg,
    falkon,
    nystrom,
    pivoted_cholesky,
    ridge_leverage_scores,
    tmm,
)
from ntkit.random_features import RandomFeatures, random_features
from ntkit.tiling import KernelFnOperator

pytestmark = pytest.mark.usefixtures("one_thread")


def relu_net(depth=2, b_std=0.1, act=ntkit.Relu):
    layers = []
    for _ in range(depth):
        layers += [ntkit.Dense(512, 1.4, b_std), act()]
    return ntkit.serial(*layers, ntkit.Dense(1, 1.4, b_std))


@pytest.fixture(scope="module")
def nngp600():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g, dtype=torch.float64)
    k = relu_net().kernel_fn(x, None, "nngp")
    y = torch.randn(600, 3, generator=g, dtype=torch.float64)
    return x, k, y


# ---------------------------------------------------------------------------------------------------
# CG
# ---------------------------------------------------------------------------------------------------
def test_cg_matches_direct_solve_all_columns(nngp600):
    x, k, y = nngp600
    lam = 1e-2 * float(k.diagonal().mean())
    exact = torch.linalg.solve(k + lam * torch.eye(600, dtype=k.dtype), y)
    res = cg(k, y, lam, tol=1e-10)
    assert res.converged and res.residual.shape == (3,) and float(res.residual.max()) <= 1e-10
    assert rel_err(res.x, exact) < 1e-8
    one = cg(k, y[:, 1], lam, tol=1e-10)  # a vector right-hand side stays a vector
    assert one.x.shape == (600,) and rel_err(one.x, exact[:, 1]) < 1e-8
    # matrix-free: the kernel recomputed tile by tile on every product
    op = KernelFnOperator(relu_net().kernel_fn, x, get="nngp", tile_size=250)
    mf = cg(op, y[:, :1], lam, tol=1e-8)
    assert mf.converged and rel_err(mf.x, exact[:, :1]) < 1e-6


def test_preconditioners_cut_iterations(nngp600):
    _, k, y = nngp600
    lam = 1e-5 * float(k.diagonal().mean())
    plain = cg(k, y, lam, tol=1e-8)
    ny = cg(k, y, lam, tol=1e-8, preconditioner="nystrom", rank=150, seed=0)
    pc = cg(k, y, lam, tol=1e-8, preconditioner="pivchol", rank=150)
    for r in (plain, ny, pc):
        assert r.converged and float(r.residual.max()) <= 1e-8
    assert ny.iterations * 3 < plain.iterations and pc.iterations * 3 < plain.iterations
    assert rel_err(ny.x, plain.x) < 1e-5


def test_cg_and_nystrom_pcg_n20k_matrix_free():
    """n = 20 000 without the 3.2 GB matrix: K = Φ Φᵀ from NNGP random features (D = 129), as a matvec.
    (The full-rank n = 20 000 NNGP store is solved in benchmarks/cg_scale.py.)"""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20000, 10, generator=g, dtype=torch.float64)
    phi = random_features(relu_net(), x, num_features=128, seed=1)
    diag = (phi**2).sum(1)
    op = MatvecOperator(lambda v: phi @ tmm(phi, v), 20000, diagonal=diag)
    y = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    lam = 1e-4 * float(diag.mean())
    plain = cg(op, y, lam, tol=1e-6)
    assert plain.converged and float(plain.residual.max()) <= 1e-6
    pre = LowRankPreconditioner.from_factor(nystrom(op, 200, seed=0).factor, lam)
    fast = cg(op, y, lam, tol=1e-6, preconditioner=pre)
    assert fast.converged and float(fast.residual.max()) <= 1e-6
    assert fast.iterations <= 10 < plain.iterations


def test_cg_checkpoint_restart_is_exact(nngp600, tmp_path):
    _, k, y = nngp600
    lam = 1e-3 * float(k.diagonal().mean())
    full = cg(k, y, lam, tol=1e-9)
    ck = tmp_path / "cg.pt"
    part = cg(k, y, lam, tol=1e-9, maxiter=15, checkpoint=ck, checkpoint_every=5)
    assert not part.converged and part.iterations == 15 and ck.exists()
    resumed = cg(k, y, lam, tol=1e-9, checkpoint=ck)
    assert resumed.iterations == full.iterations and torch.equal(resumed.x, full.x)
    again = cg(k, y, lam, tol=1e-9, checkpoint=ck)  # a finished solve returns at once
    assert again.iterations == full.iterations and torch.equal(again.x, full.x)
    with pytest.raises(ValueError, match="different problem"):
        cg(k, y + 1, lam, tol=1e-9, checkpoint=ck)


def test_cg_bad_inputs(nngp600):
    _, k, y = nngp600
    with pytest.raises(ValueError, match="square"):
        cg(k[:, :500], y, 1.0)
    with pytest.raises(ValueError, match="lam"):
        cg(k, y, -1.0)
    with pytest.raises(ValueError, match="B must have shape"):
        cg(k, y[:599], 1.0)
    with pytest.raises(ValueError, match="NaN"):
        cg(k, y * float("nan"), 1.0)
    with pytest.raises(ValueError, match="not positive definite"):
        cg(-torch.eye(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs its size"):
        cg(lambda v: v, y)
    with pytest.raises(ValueError, match="preconditioner"):
        cg(k, y, 1.0, preconditioner="jacobi")


def test_pivoted_cholesky_exact_at_full_rank():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(40, 7, generator=g, dtype=torch.float64)
    k = a @ a.T
    f, piv = pivoted_cholesky(k, 20)
    assert f.shape[1] == 7 and len(set(piv.tolist())) == 7  # stops at the rank
    assert rel_err(f @ f.T, k) < 1e-10


# ---------------------------------------------------------------------------------------------------
# Nyström
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rare_clusters():
    """700 points in one tight cluster and 10 rare clusters of 10: the rare points carry high leverage."""
    g = torch.Generator().manual_seed(0)
    d = 10
    main = torch.randn(700, d, generator=g, dtype=torch.float64) * 0.05 + 3 * torch.eye(d, dtype=torch.float64)[0]
    dirs = torch.randn(10, d, generator=g, dtype=torch.float64)
    dirs = 3 * dirs / dirs.norm(dim=1, keepdim=True)
    rare = (dirs[:, None, :] + 0.05 * torch.randn(10, 10, d, generator=g, dtype=torch.float64)).reshape(100, d)
    x = torch.cat([main, rare])
    k = ntkit.serial(ntkit.Dense(512, 1.0), ntkit.Relu(), ntkit.Dense(1, 1.0)).kernel_fn(x, None, "nngp")
    return k, 1e-2 * float(k.diagonal().mean())


def test_nystrom_error_shrinks_and_leverage_sampling_wins(rare_clusters):
    k, lam = rare_clusters
    ell = ridge_leverage_scores(k, lam)
    d_eff = float(ell.sum())
    assert 20 < d_eff < 50 and float(ell[700:].mean()) > 10 * float(ell[:700].mean())

    def spectral_error(m, sampling, seed=0):
        e = k - nystrom(k, m, sampling=sampling, lam=lam, seed=seed).to_tensor()
        return float(torch.linalg.eigvalsh(e)[-1])

    for sampling in ("uniform", "rls"):
        errs = [spectral_error(m, sampling) for m in (20, 40, 80, 160)]
        assert all(b < a for a, b in itertools.pairwise(errs)), (sampling, errs)
    # theory (Musco & Musco 2017): m ≈ 5 d_eff leverage-sampled centres give ‖K − K̃‖₂ ≤ λ; uniform
    # sampling misses rare clusters and stays far above at the same m
    m = 160
    assert all(spectral_error(m, "rls", seed) <= lam for seed in range(3))
    assert spectral_error(m, "uniform") > 50 * lam


def test_nystrom_exact_with_all_centres_and_bad_m(nngp600):
    _, k, _ = nngp600
    ny = nystrom(k[:200, :200], 200)
    assert rel_err(ny.to_tensor(), k[:200, :200]) < 1e-8
    with pytest.raises(ValueError, match="centres"):
        nystrom(k, 0)
    with pytest.raises(ValueError, match="sampling"):
        nystrom(k, 10, sampling="greedy")


def test_falkon_matches_nystrom_krr(rare_clusters):
    k, lam = rare_clusters
    n = k.shape[0]
    g = torch.Generator().manual_seed(1)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    res = falkon(k, y, lam, m=200, sampling="rls", seed=0, tol=1e-10)
    c = k[:, res.idx]
    alpha = torch.linalg.solve(c.T @ c + lam * k[res.idx][:, res.idx], c.T @ y)  # Nyström KRR, closed form
    # K_mm of tight clusters is near-singular, so compare the fit K_nm α (unique) rather than α
    assert rel_err(res.fitted, c @ alpha) < 1e-6 and res.iterations < 60
    exact = k @ torch.linalg.solve(k + lam * torch.eye(n, dtype=k.dtype), y)  # full KRR fit
    assert rel_err(res.fitted, exact) < 0.02  # leverage-sampled centres: within 2% of full KRR
    uniform = falkon(k, y, lam, m=200, sampling="uniform", seed=0, tol=1e-10)
    assert rel_err(uniform.fitted, exact) > 0.1  # uniform centres miss the rare clusters
    assert rel_err(res.predict(c), res.fitted) < 1e-12


# ---------------------------------------------------------------------------------------------------
# random features
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("get,depth", [("nngp", 1), ("ntk", 1), ("nngp", 3), ("ntk", 3)])
def test_random_features_error_shrinks_like_inverse_sqrt_m(get, depth):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(150, 8, generator=g, dtype=torch.float64)
    net = relu_net(depth)
    k = net.kernel_fn(x, None, get)
    ms = (128, 512, 2048)
    errs = []
    for m in ms:  # root-mean-square error over 4 fixed seeds
        sq = [
            float(torch.linalg.norm(p @ p.T - k) / torch.linalg.norm(k)) ** 2
            for p in (RandomFeatures(net, 8, m, get, seed=s)(x) for s in range(4))
        ]
        errs.append(math.sqrt(sum(sq) / len(sq)))
    slope = math.log(errs[-1] / errs[0]) / math.log(ms[-1] / ms[0])
    assert -0.7 < slope < -0.3, errs  # Monte-Carlo rate m^(-1/2)
    assert errs[-1] < (0.12 if depth == 1 else 0.2), errs


@pytest.mark.parametrize("act", [lambda: ntkit.LeakyRelu(0.2), ntkit.Abs, lambda: ntkit.ABRelu(-0.5, 1.5)])
def test_random_features_relu_family(act):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, 5, generator=g, dtype=torch.float64)
    net = relu_net(2, act=act)
    for get in ("nngp", "ntk"):
        phi = random_features(net, x, 2048, get, seed=0)
        k = net.kernel_fn(x, None, get)
        assert float(torch.linalg.norm(phi @ phi.T - k) / torch.linalg.norm(k)) < 0.15


def test_random_features_krr_and_errors():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    xt = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(6, 1, generator=g, dtype=torch.float64) / math.sqrt(6))
    net = relu_net(2)
    k, kt = net.kernel_fn(x, None, "ntk"), net.kernel_fn(xt, x, "ntk")
    lam = 0.1 * float(k.diagonal().mean())
    exact = kt @ torch.linalg.solve(k + lam * torch.eye(400, dtype=k.dtype), y)
    errs = []
    for m in (256, 2048):
        rf = RandomFeatures(net, 6, m, "ntk", seed=0)
        pred = rf.krr(x, y, lam)(xt)
        phi, phit = rf(x), rf(xt)  # the primal solve is KRR with K̃ = ΦΦᵀ exactly
        dual = (phit @ phi.T) @ torch.linalg.solve(phi @ phi.T + lam * torch.eye(400, dtype=k.dtype), y)
        assert rel_err(pred, dual) < 1e-9
        errs.append(float((pred - exact).norm() / exact.norm()))
    assert errs[1] < 0.1 and errs[1] < 0.75 * errs[0], errs
    with pytest.raises(ValueError, match="ConvLocal has no random-feature map"):  # Conv has one: CNN features
        RandomFeatures(ntkit.serial(ntkit.ConvLocal(4, (3,)), ntkit.Relu(), ntkit.Flatten(), ntkit.Dense(1)), 6)
    with pytest.raises(ValueError, match="parameterization"):
        RandomFeatures(
            ntkit.serial(ntkit.Dense(8, parameterization="standard"), ntkit.Relu(), ntkit.Dense(1)), 6, get="ntk"
        )
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        rf(torch.randn(3, 5, dtype=torch.float64))
