"""ntkit.theory.eigenlearning against kernel ridge regression measured on a held-out task.

The task: inputs uniform on the sphere of radius √d in d = 8 (M = 2000 samples: the "population"), the NTK of
a two-hidden-layer ReLU net, a polynomial target of degrees 1 to 3 that the kernel knows nothing about, and
label noise. The operator's eigensystem is the eigendecomposition of the kernel on the M samples
(``ntkit.theory.eigensystem``, exact for the empirical distribution); KRR is trained on n of the M points and
tested on all of them, averaged over 30 draws, and compared with the prediction at three n and three ridges.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import ntkit
from ntkit.theory import EigenlearningResult, eigenlearning, eigensystem

M, D, NOISE, DRAWS = 2000, 8, 0.1, 30


@pytest.fixture(scope="module")
def task():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, D, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(D)
    net = ntkit.serial(
        ntkit.Dense(1, W_std=1.5, b_std=0.1),
        ntkit.Relu(),
        ntkit.Dense(1, W_std=1.5, b_std=0.1),
        ntkit.Relu(),
        ntkit.Dense(1),
    )
    k = net.kernel_fn(x, None, "ntk")
    f = x[:, 0] + x[:, 1] * x[:, 2] + 0.5 * (x[:, 3] ** 2 - 1) + 0.3 * x[:, 4] * x[:, 5] * x[:, 6]
    lam, v = eigensystem(k, f)
    return k, f, lam, v


def _measured(k, f, n, ridge):
    """Mean test MSE (against noisy labels: + NOISE) and train MSE of KRR over DRAWS draws of n points."""
    gen = torch.Generator().manual_seed(1000 + n)
    tests, trains = [], []
    for _ in range(DRAWS):
        idx = torch.randperm(M, generator=gen)[:n]
        y = f[idx] + math.sqrt(NOISE) * torch.randn(n, generator=gen, dtype=torch.float64)
        k_nn = k[idx][:, idx]
        alpha = torch.linalg.solve(k_nn + ridge * torch.eye(n, dtype=torch.float64), y)
        tests.append(float(((k[:, idx] @ alpha - f) ** 2).mean()) + NOISE)
        trains.append(float(((k_nn @ alpha - y) ** 2).mean()))
    return float(np.mean(tests)), float(np.mean(trains))


@pytest.mark.parametrize("n", [30, 120, 400])
@pytest.mark.parametrize("ridge", [0.0, 0.1, 1.0])
def test_predicts_measured_test_mse_within_10_percent(task, n, ridge):
    k, f, lam, v = task
    pred = eigenlearning(lam, v, n, ridge=ridge, noise=NOISE)
    test, train = _measured(k, f, n, ridge)
    assert abs(pred.test_mse / test - 1) < 0.10, (n, ridge, pred.test_mse, test)
    if ridge > 0 and n <= 120:
        # the train-MSE estimate (δ/(nκ))² E is checked where n is small against the M samples
        assert abs(pred.train_mse / train - 1) < 0.15, (n, ridge, pred.train_mse, train)
    if ridge == 0:
        assert pred.train_mse == 0.0 and train < 1e-12


def test_predicts_the_learning_curve_shape(task):
    # more data, less error (while n stays well below the M modes of the empirical distribution: as n → M at
    # zero ridge, E₀ = n/(n − Σ Lᵢ²) blows up, the finite-population double descent)
    _, _, lam, v = task
    errs = [eigenlearning(lam, v, n, noise=NOISE).test_mse for n in (10, 30, 100, 300)]
    assert all(a > b for a, b in itertools.pairwise(errs))


def test_conservation_law_and_definitions():
    lam = 1.0 / torch.arange(1, 501, dtype=torch.float64) ** 1.5
    v = torch.zeros(500, dtype=torch.float64)
    v[[0, 3, 30]] = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    for n, ridge in [(1, 0.0), (10, 0.0), (50, 1e-3), (200, 1.0)]:
        r = eigenlearning(lam, v, n, ridge=ridge, noise=0.02)
        assert isinstance(r, EigenlearningResult)
        L = r.learnabilities
        assert L.dtype == torch.float64 and L.shape == (500,)
        # Σ Lᵢ + δ/κ = n to solver precision, and Lᵢ = λᵢ/(λᵢ + κ)
        assert float(L.sum()) + ridge / r.kappa == pytest.approx(n, rel=1e-10)
        torch.testing.assert_close(L, lam / (lam + r.kappa))
        e0 = n / (n - float((L**2).sum()))
        assert r.overfitting == pytest.approx(e0)
        assert r.test_mse == pytest.approx(e0 * (float(((1 - L) ** 2 * v**2).sum()) + 0.02))
        assert r.train_mse == pytest.approx((ridge / (n * r.kappa)) ** 2 * r.test_mse)


def test_interpolation_regime_and_padding():
    lam = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    # as many samples as nonzero modes at zero ridge: every mode learnt exactly, κ = 0, infinite E₀
    r = eigenlearning(lam, torch.tensor([1.0, 1.0]), n=3)  # coefficients padded with zeros
    assert r.kappa == 0.0 and r.test_mse == 0.0 and r.train_mse == 0.0
    torch.testing.assert_close(r.learnabilities, torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    assert math.isinf(eigenlearning(lam, torch.ones(4), n=3, noise=0.1).test_mse)
    # n = 1, ridge 0: κ solves Σ λ/(λ+κ) = 1
    r1 = eigenlearning(lam, torch.ones(4), n=1)
    assert float((lam / (lam + r1.kappa)).sum()) == pytest.approx(1.0)


def test_multi_output_and_dtypes():
    lam = np.linspace(1.0, 0.01, 50)
    v = np.stack([np.eye(50)[0], np.eye(50)[10]], 1)
    r = eigenlearning(lam, v, n=20, ridge=0.1)
    r0 = eigenlearning(lam, v[:, 0], n=20, ridge=0.1)
    r1 = eigenlearning(lam, v[:, 1], n=20, ridge=0.1)
    assert r.test_mse == pytest.approx((r0.test_mse + r1.test_mse) / 2)
    r32 = eigenlearning(torch.tensor(lam, dtype=torch.float32), v, n=20, ridge=0.1)
    assert r32.learnabilities.dtype == torch.float32 and r32.kappa == pytest.approx(r.kappa, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eigenvalues=[1.0, -1.0], coefficients=[1.0], n=1), "must be >= 0"),
        (dict(eigenvalues=[[1.0]], coefficients=[1.0], n=1), "non-empty vector"),
        (dict(eigenvalues=[1.0], coefficients=[1.0, 2.0], n=1), "coefficients must have shape"),
        (dict(eigenvalues=[1.0], coefficients=[1.0], n=0), "positive integer"),
        (dict(eigenvalues=[1.0], coefficients=[1.0], n=2.5), "positive integer"),
        (dict(eigenvalues=[1.0], coefficients=[1.0], n=1, ridge=-1.0), "ridge"),
        (dict(eigenvalues=[1.0], coefficients=[1.0], n=1, noise=float("nan")), "noise"),
        (dict(eigenvalues=[0.0, 0.0], coefficients=[1.0], n=1), "learns nothing"),
        (dict(eigenvalues=[1.0, float("inf")], coefficients=[1.0], n=1), "NaN/Inf"),
    ],
)
def test_bad_input_names_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eigenlearning(**kwargs)


def test_eigensystem_reconstructs_kernel_and_target():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    k = ntkit.serial(ntkit.Dense(1), ntkit.Erf(), ntkit.Dense(1)).kernel_fn(x, None, "nngp")
    y = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    lam, v = eigensystem(k, y)
    assert (lam[:-1] >= lam[1:]).all() and (lam >= 0).all()
    assert float(lam.sum()) == pytest.approx(float(torch.trace(k)) / 60)
    # Parseval: E_p[f²] = Σ vᵢ² for the empirical distribution
    torch.testing.assert_close((v**2).sum(0), (y**2).mean(0))
    lam0, v0 = eigensystem(k)
    torch.testing.assert_close(lam0, lam) and v0.numel() == 0
    with pytest.raises(ValueError, match="square"):
        eigensystem(k[:, :5])
    with pytest.raises(ValueError, match="targets must have shape"):
        eigensystem(k, y[:5])
