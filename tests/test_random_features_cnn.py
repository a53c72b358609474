"""Random features of convolutional nets with pooling (ntkit.random_features; Zandieh et al. 2021).

Checked against ntkit's exact kernels: linear nets (Conv, pooling, Flatten, no nonlinearity) are reproduced
exactly; with one nonlinearity the features are unbiased (mean over seeds within a tolerance set by the
measured variance); the relative Frobenius error of Myrtle-5 / CNTK features falls as m^(-1/2).
"""

from __future__ import annotations

import math

import pytest
import torch

import ntkit
from ntkit import AvgPool, Conv, Dense, Flatten, GlobalAvgPool, Relu, serial
from ntkit.architectures import cntk, myrtle
from ntkit.layers.base import LayerError
from ntkit.random_features import RandomFeatures, random_features


def _images(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + shape, generator=g, dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ---------------------------------------------------------------------------------------------------
# linear nets: the features are exact (layouts, paddings, strides, pooling rules)
# ---------------------------------------------------------------------------------------------------
LINEAR_NETS = {
    "same-bias-avgpool-flatten": lambda: serial(
        Conv(3, (3, 3), padding="SAME", W_std=1.3, b_std=0.4), AvgPool((2, 2), (2, 2)), Flatten(), Dense(1)
    ),
    "valid-strided-gap": lambda: serial(
        Conv(3, (3, 2), strides=(2, 1), padding="VALID", W_std=0.9), GlobalAvgPool(), Dense(2, 1.0, 0.1)
    ),
    "circular-sumpool-edges": lambda: serial(
        Conv(3, (3, 3), padding="CIRCULAR", W_std=1.1, b_std=0.2),
        AvgPool((3, 3), (1, 1), padding="SAME", normalize_edges=True),
        Conv(2, (2, 2), padding=1, W_std=0.8),
        ntkit.SumPool((2, 2), (2, 2)),
        ntkit.GlobalSumPool(),
        Dense(1),
    ),
    "1d-explicit-circular": lambda: serial(
        Conv(3, (5,), padding=2, padding_mode="circular", W_std=1.2, b_std=0.3), Flatten(), Dense(1)
    ),
}


@pytest.mark.parametrize("name", sorted(LINEAR_NETS))
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_linear_conv_pool_features_are_exact(name, get):
    net = LINEAR_NETS[name]()
    shape = (2, 9) if name.startswith("1d") else (2, 7, 6)
    x = _images(6, shape, 0)
    phi = random_features(net, x, 8, get, seed=0)
    k = net.kernel_fn(x, None, get)
    assert _rel(phi @ phi.T, k) < 1e-12
    # the same features map other inputs consistently: the cross kernel too
    rf = RandomFeatures(net, shape, 8, get, seed=0)
    x2 = _images(4, shape, 1)
    assert _rel(rf(x2) @ rf(x).T, net.kernel_fn(x2, x, get)) < 1e-12


# ---------------------------------------------------------------------------------------------------
# one nonlinearity: unbiased, tolerance from the measured variance
# ---------------------------------------------------------------------------------------------------
def _z_scores(net, x, get: str, m: int, seeds: int, scale: float = 1.0) -> torch.Tensor:
    """(mean over seeds of ΦΦᵀ − K) / its standard error, entrywise (upper triangle with the diagonal)."""
    k = net.kernel_fn(x, None, get)
    rf = [RandomFeatures(net, tuple(x.shape[1:]), m, get, seed=s) for s in range(seeds)]
    est = torch.stack([scale * (p @ p.T) for p in (r(x) for r in rf)])
    se = est.std(0) / math.sqrt(seeds)
    iu = torch.triu_indices(x.shape[0], x.shape[0])
    return ((est.mean(0) - k) / se)[iu[0], iu[1]]


UNBIASED_NET = lambda: serial(
    Conv(4, (3, 3), padding="SAME", W_std=1.5, b_std=0.3),
    Relu(),
    AvgPool((2, 2), (2, 2)),
    Conv(4, (3, 3), padding="SAME", W_std=1.2, b_std=0.2),
    GlobalAvgPool(),
    Dense(1, 1.0, 0.1),
)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_one_nonlinearity_is_unbiased(get):
    x = _images(6, (2, 6, 6), 2)
    z = _z_scores(UNBIASED_NET(), x, get, m=16, seeds=40)
    # 21 entries, each ~ t(39) (strongly correlated: most of the error is a common scale); an unbiased
    # estimator passes |z| < 4.5 except with probability < 1e-3
    assert float(z.abs().max()) < 4.5, z
    # the test can fail: a 25 % scale error at the same sample size is flagged
    zb = _z_scores(UNBIASED_NET(), x, get, m=16, seeds=40, scale=1.25)
    assert float(zb.abs().max()) > 4.5, zb


# ---------------------------------------------------------------------------------------------------
# deep nets: relative Frobenius error ∝ m^(-1/2)
# ---------------------------------------------------------------------------------------------------
def _loglog_slope(ms, errs) -> float:
    lm = torch.tensor([math.log(m) for m in ms])
    le = torch.tensor([math.log(e) for e in errs])
    return float(((lm - lm.mean()) * (le - le.mean())).sum() / ((lm - lm.mean()) ** 2).sum())


def _rms_errors(net, x, get: str, ms, seeds: int) -> list[float]:
    """Root mean square over ``seeds`` of ``‖ΦΦᵀ − K‖_F / ‖K‖_F`` at each ``m``."""
    k = net.kernel_fn(x, None, get)
    shape = tuple(x.shape[1:])
    errs = []
    for m in ms:
        sq = [_rel(p @ p.T, k) ** 2 for p in (RandomFeatures(net, shape, m, get, seed=s)(x) for s in range(seeds))]
        errs.append(math.sqrt(sum(sq) / seeds))
    return errs


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_error_falls_like_inverse_sqrt_m(get):
    # CNTK-GAP with two conv+ReLU layers (Arora et al. 2019); least-squares slope of log error on log m. Most of
    # the error is one common scale per seed, so 12 seeds leave the slope a standard error of about 0.07
    # (measured over disjoint seed sets: -0.45/-0.59/-0.54 NNGP, -0.40/-0.54/-0.48 NTK): the window is ±2σ
    # around -0.5; a bias that did not vanish with m would flatten the slope towards 0
    net, x = cntk(2, "gap", b_std=0.2), _images(4, (2, 5, 5), 3)
    ms = (32, 128, 384)
    errs = _rms_errors(net, x, get, ms, seeds=12)
    assert -0.65 < _loglog_slope(ms, errs) < -0.35, errs
    assert errs[-1] < 0.12, errs


def test_myrtle5_error_shrinks():
    # Myrtle-5 (3 pooling stages) at 4×4: its NTK features converge too (the slope is measured on MNIST by
    # benchmarks/cnn_random_features.py, whose rows carry the relative Frobenius error at each m)
    net, x = myrtle(5, out_features=1), _images(6, (1, 4, 4), 3)
    for get, bound in (("nngp", 0.3), ("ntk", 0.4)):
        errs = _rms_errors(net, x, get, (16, 256), seeds=2)
        assert errs[1] < bound and errs[1] < 0.5 * errs[0], (get, errs)


# ---------------------------------------------------------------------------------------------------
# regression on the features; refusals
# ---------------------------------------------------------------------------------------------------
def test_krr_on_cnn_features_matches_dual_and_the_exact_kernel():
    x, xt = _images(60, (1, 6, 6), 4), _images(10, (1, 6, 6), 5)
    y = torch.tanh(x.mean((1, 2, 3)))[:, None] * 3
    net = cntk(1, "gap")
    k, kt = net.kernel_fn(x, None, "ntk"), net.kernel_fn(xt, x, "ntk")
    lam = 0.1 * float(k.diagonal().mean())
    exact = kt @ torch.linalg.solve(k + lam * torch.eye(60, dtype=k.dtype), y)
    rf = RandomFeatures(net, (1, 6, 6), 256, "ntk", seed=0)
    pred = rf.krr(x, y, lam)(xt)
    phi, phit = rf(x, batch_size=7), rf(xt)  # chunked mapping gives the same features
    assert _rel(phi[:20], rf(x[:20])) < 1e-14
    dual = (phit @ phi.T) @ torch.linalg.solve(phi @ phi.T + lam * torch.eye(60, dtype=k.dtype), y)
    assert _rel(pred, dual) < 1e-9
    assert _rel(pred, exact) < 0.1


def test_cnn_random_features_refusals():
    conv = Conv(2, (3, 3), padding="SAME")
    with pytest.raises(LayerError, match="Flatten"):
        RandomFeatures(serial(conv, Relu(), Dense(1)), (1, 5, 5))
    with pytest.raises(LayerError, match="ConvTranspose has no random-feature map"):
        RandomFeatures(serial(ntkit.ConvTranspose(2, (3, 3)), GlobalAvgPool(), Dense(1)), (1, 5, 5))
    with pytest.raises(LayerError, match="parameterization='ntk'"):
        RandomFeatures(serial(Conv(2, (3, 3), parameterization="standard"), Flatten(), Dense(1)), (1, 5, 5), get="ntk")
    with pytest.raises(LayerError, match="spatial"):
        RandomFeatures(serial(Dense(3), GlobalAvgPool(), Dense(1)), 4)
    with pytest.raises(LayerError, match="spatial"):
        RandomFeatures(serial(Conv(2, (3, 3)), Dense(1)), 4)
    with pytest.raises(ValueError, match="in_features"):
        RandomFeatures(serial(conv, Flatten(), Dense(1)), (1, 0, 5))
    rf = RandomFeatures(serial(conv, Flatten(), Dense(1)), (1, 5, 5), 4)
    with pytest.raises(ValueError, match=r"\(N, 1, 5, 5\)"):
        rf(torch.randn(2, 1, 4, 5, dtype=torch.float64))
