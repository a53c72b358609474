"""ntkit.solvers.linalg: checks, Cholesky with jitter ladder, eigh fallback, PSD errors."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from ntkit.linalg import NumericalWarning, PSDMatrix, add_diagonal_regularizer, as_kernel_matrix, psd_rtol

F64 = torch.float64


def _spd(n, cond=1e3, seed=0):
    rng = np.random.RandomState(seed)
    q, _ = np.linalg.qr(rng.randn(n, n))
    lam = np.logspace(0, -np.log10(cond), n)
    return torch.tensor((q * lam) @ q.T), torch.tensor(q), torch.tensor(lam)


def test_solve_matches_scipy_and_needs_no_jitter():
    a, _, _ = _spd(30, cond=1e6)
    b = torch.randn(30, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        p = PSDMatrix(a)
        x = p.solve(b)
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a.numpy()), b.numpy())
    assert np.abs(x.numpy() - ref).max() <= 1e-8 * np.abs(ref).max()
    assert p.jitter == 0.0
    assert p.solve(b[:, 0]).shape == (30,)


def test_eigh_is_cached_clipped_and_ascending():
    a, _, lam = _spd(20, cond=1e4)
    p = PSDMatrix(a)
    ev, vec = p.eigh()
    assert p.eigh()[0] is ev  # cached
    assert torch.all(ev[1:] >= ev[:-1]) and float(ev.min()) >= 0
    assert np.allclose(ev.numpy(), np.sort(lam.numpy()), rtol=1e-9, atol=1e-14)
    assert torch.allclose(vec @ torch.diag(ev) @ vec.T, a, atol=1e-13)


def test_float32_input_is_solved_in_float64():
    a, _, _ = _spd(25, cond=1e2)
    p = PSDMatrix(a.float())
    assert p.matrix.dtype == F64 and p.input_dtype == torch.float32
    b = torch.ones(25, dtype=torch.float32)
    assert p.solve(b).dtype == F64


def _rbf(x):
    return torch.exp(-(torch.cdist(x, x) ** 2))


def test_duplicated_rows_use_jitter_and_warn():
    x = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, x[:4]])  # 4 exact duplicates: rank 10 of 14
    y = torch.randn(10, dtype=F64, generator=torch.Generator().manual_seed(2))
    y = torch.cat([y, y[:4]])  # consistent targets on the duplicates
    k = _rbf(x)
    p = PSDMatrix(k)
    with pytest.warns(NumericalWarning, match="jitter|pseudo-inverse"):
        sol = p.solve(y)
    assert torch.isfinite(sol).all()
    # a consistent system: the solution reproduces y up to the jitter's effect on the small modes
    assert float((k @ sol - y).abs().max()) < 1e-5 * float(y.abs().max())
    # and predicts like the de-duplicated system (identical columns carry no extra information)
    sol10 = torch.linalg.solve(k[:10, :10], y[:10])
    kt = torch.exp(-(torch.cdist(torch.randn(5, 3, dtype=F64), x) ** 2))
    assert torch.allclose(kt @ sol, kt[:, :10] @ sol10, rtol=1e-5, atol=1e-6)


def test_rank_one_matrix_is_solved_consistently():
    v = torch.linspace(1, 2, 12, dtype=F64)
    k = torch.outer(v, v)
    p = PSDMatrix(k)
    with pytest.warns(NumericalWarning):
        sol = p.solve(3.0 * v)
    assert torch.isfinite(sol).all()
    # consistent rank-1 system: K x = 3 v; x is the minimum-norm solution up to round-off amplified by the
    # jitter in the null directions (~eps·|K|/jitter), which K (and any consistent K_td) projects out
    assert torch.allclose(k @ sol, 3.0 * v, rtol=1e-10, atol=1e-10)
    assert torch.allclose(sol, 3.0 * v / float(v @ v), rtol=1e-4)


def test_eigh_fallback_when_no_jitter_suffices():
    _, q, lam = _spd(20, cond=1e3, seed=5)
    lam = lam.clone()
    lam[-3:] = torch.tensor([0.0, -2e-8, -5e-8], dtype=F64)  # beyond the largest jitter, within round-off
    k = (q * lam) @ q.T
    k = 0.5 * (k + k.T)
    b = k @ torch.randn(20, dtype=F64, generator=torch.Generator().manual_seed(6))
    p = PSDMatrix(k)
    with pytest.warns(NumericalWarning, match="pseudo-inverse"):
        sol = p.solve(b)
    assert p.jitter is None and p.cholesky() is None
    # the pseudo-inverse of the clipped matrix: exact on its range, zero on the (near-)null directions
    keep = lam > 1e-6
    ref = (q[:, keep] / lam[keep]) @ (q[:, keep].T @ b)
    assert torch.allclose(sol, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_not_psd_reports_smallest_eigenvalue():
    a = torch.diag(torch.tensor([1.0, 0.5, -0.2], dtype=F64))
    p = PSDMatrix(a)
    with pytest.raises(ValueError, match=r"not positive semi-definite: smallest eigenvalue -2\.0000e-01"):
        p.solve(torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="smallest eigenvalue"):
        PSDMatrix(a).eigh()


def test_round_off_negative_eigenvalue_is_tolerated():
    a, q, lam = _spd(15, cond=1e3)
    lam = lam.clone()
    lam[-1] = -1e-12  # far inside float64 round-off tolerance
    b = (q * lam) @ q.T
    b = 0.5 * (b + b.T)
    ev, _ = PSDMatrix(b).eigh()
    assert float(ev.min()) == 0.0


def test_input_checks():
    with pytest.raises(ValueError, match="square"):
        as_kernel_matrix(torch.ones(3, 4, dtype=F64), "k")
    with pytest.raises(ValueError, match="NaN/Inf"):
        as_kernel_matrix(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "k")
    with pytest.raises(ValueError, match="not symmetric"):
        as_kernel_matrix(torch.tensor([[1.0, 0.5], [0.1, 1.0]], dtype=F64), "k")
    with pytest.raises(TypeError, match="floating"):
        as_kernel_matrix(torch.eye(3, dtype=torch.int64), "k")
    with pytest.raises(ValueError, match="diag_reg"):
        add_diagonal_regularizer(torch.eye(2, dtype=F64), -1.0, False)
    # float32 round-off asymmetry is accepted and removed
    a = torch.tensor([[2.0, 1.0], [1.0 + 1e-7, 2.0]], dtype=torch.float32)
    s = as_kernel_matrix(a, "k")
    assert torch.equal(s, s.T)


def test_diag_reg_relative_and_absolute():
    a = torch.diag(torch.tensor([1.0, 3.0], dtype=F64))
    assert torch.allclose(add_diagonal_regularizer(a, 0.5, False), a + torch.eye(2, dtype=F64))
    assert torch.allclose(add_diagonal_regularizer(a, 0.5, True), a + 0.5 * torch.eye(2, dtype=F64))


def test_condition_number_1e14_backward_stable():
    a, _, _ = _spd(50, cond=1e14, seed=3)
    b = a @ torch.randn(50, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        x = PSDMatrix(a).solve(b)
    assert torch.isfinite(x).all()
    assert float((a @ x - b).abs().max()) <= 1e-8 * float(b.abs().max())


def test_psd_tolerance_scales_with_dtype():
    assert psd_rtol(torch.float32, 10) > 1e3 * psd_rtol(F64, 10) / 10
    assert psd_rtol(torch.float32, 10**5) > 10 * psd_rtol(torch.float32, 10)
