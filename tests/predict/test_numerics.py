"""ntkit.predict on hard kernels (NT issues #76, #128, #198): never NaN/Inf on a PSD kernel."""

import math
import warnings

import numpy as np
import torch

import ntkit
from ntkit import predict
from ntkit.linalg import NumericalWarning

F64 = torch.float64
NET = ntkit.serial(
    ntkit.Dense(256, b_std=0.1), ntkit.Relu(), ntkit.Dense(256, b_std=0.1), ntkit.Relu(), ntkit.Dense(1, b_std=0.1)
)


def _finite(*xs):
    return all(bool(torch.isfinite(x).all()) for x in xs)


def test_duplicated_training_points():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(15, 4, dtype=F64, generator=g)
    xt = torch.randn(6, 4, dtype=F64, generator=g)
    y = torch.randn(15, 1, dtype=F64, generator=g)
    xd, yd = torch.cat([x, x[:5]]), torch.cat([y, y[:5]])  # 5 duplicates with consistent targets
    k, kd = NET.kernel_fn(x, None), NET.kernel_fn(xd, None)
    kt, ktd = NET.kernel_fn(xt, x), NET.kernel_fn(xt, xd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        for t in (None, 5.0, math.inf):
            a = predict.gradient_descent_mse(kd.ntk, yd)(t, None, 0.0, ktd.ntk)
            b = predict.gradient_descent_mse(k.ntk, y)(t, None, 0.0, kt.ntk)
            assert _finite(a)
            # duplicates carry no new information: same predictions as the de-duplicated set (the time
            # scale differs by N, so compare at infinite time or rescale t by N_dup / N)
            if t is None or t == math.inf:
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), t
        tb = predict.gradient_descent_mse(k.ntk, y)(5.0 * 15 / 20, None, 0.0, kt.ntk)
        ta = predict.gradient_descent_mse(kd.ntk, yd)(5.0, None, 0.0, ktd.ntk)
        assert _finite(ta, tb)
        ens = predict.gradient_descent_mse_ensemble(NET.kernel_fn, xd, yd)
        for t in (None, 3.0):
            out = ens(t, xt, compute_cov=True)
            assert _finite(out.nngp.mean, out.nngp.covariance, out.ntk.mean, out.ntk.covariance)
        ref = predict.gradient_descent_mse_ensemble(NET.kernel_fn, x, y)(None, xt, compute_cov=True)
        out = ens(None, xt, compute_cov=True)
        assert torch.allclose(out.ntk.mean, ref.ntk.mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(out.nngp.covariance, ref.nngp.covariance, rtol=1e-4, atol=1e-6)


def test_rank_one_kernel():
    v = torch.linspace(0.5, 2.0, 30, dtype=F64)
    u = torch.linspace(-1.0, 1.0, 7, dtype=F64)
    k, kt = torch.outer(v, v), torch.outer(u, v)
    y = 2.0 * v[:, None]  # in the kernel's range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        pf = predict.gradient_descent_mse(k, y)
        for t in (None, 0.0, 1.0, 1e3, math.inf):
            tr, te = pf(t, 0.0, 0.0, kt)
            assert _finite(tr, te)
        # exact: only the direction v is learnt, f_test(t) = u·2·(1 - exp(-|v|² t/N))
        ts = torch.tensor([0.0, 1.0, 1e3, math.inf], dtype=F64)
        _, te = pf(ts, 0.0, 0.0, kt)
        vv = float(v @ v)
        for i, t in enumerate(ts.tolist()):
            want = 2.0 * u * (-math.expm1(-vv * t / 30) if math.isfinite(t) else 1.0)
            assert torch.allclose(te[i, :, 0], want, rtol=1e-6, atol=1e-9)
        _, te_inf = pf(None, 0.0, 0.0, kt)
        assert torch.allclose(te_inf[:, 0], 2.0 * u, rtol=1e-6, atol=1e-9)
        # a target outside the range: still finite, and the learnable part is learnt
        y2 = y + torch.randn(30, 1, dtype=F64, generator=torch.Generator().manual_seed(1))
        _, te2 = predict.gradient_descent_mse(k, y2)(math.inf, 0.0, 0.0, kt)
        want = u * float(v @ y2[:, 0]) / vv
        assert torch.allclose(te2[:, 0], want, rtol=1e-6, atol=1e-9)


def test_condition_number_1e14():
    n = 40
    rng = np.random.RandomState(3)
    q, _ = np.linalg.qr(rng.randn(n, n))
    lam = np.logspace(0, -14, n)
    q, lam = torch.tensor(q), torch.tensor(lam)
    k = (q * lam) @ q.T
    k = 0.5 * (k + k.T)
    y = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    f0 = 0.1 * torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        pf = predict.gradient_descent_mse(k, y)
        ts = torch.tensor([0.5, 50.0, 1e6, 1e15], dtype=F64)
        tr = pf(ts, f0)
        assert _finite(tr)
        # exact: f(t) = f0 + Q expm1(-λ t / N) Qᵀ (f0 - y), from the constructed spectrum. Float64 pins an
        # eigenpair down to ~eps·λ_max/gap: exact while the tiny-λ directions have not moved (t <= 1e6);
        # at t = 1e15 they are half-trained and carry that ~1e-16/1e-14 ~ 1% uncertainty (any method would).
        for i, (t, tol) in enumerate(zip(ts.tolist(), (1e-9, 1e-9, 1e-9, 1e-2))):
            want = f0 + q @ (torch.expm1(-lam * t / y.numel())[:, None] * (q.T @ (f0 - y)))
            assert float((tr[i] - want).abs().max()) < tol * float(want.abs().max()), t
        # infinite time on test points whose kernel is consistent with the train kernel (K_td = A Λ Qᵀ, as for
        # any feature map): f_test(∞) - f_test(0) = K_td K⁻¹ (y - f0) = A Qᵀ (y - f0). The tiny-λ directions
        # carry O(1) weight there, so float64 determines the answer only to ~eps·cond = 2e-2 (backward
        # stability); we require finite values within that bound, both paths agreeing to it.
        a = torch.randn(7, n, dtype=F64, generator=torch.Generator().manual_seed(4))
        k_td = (a * lam) @ q.T
        want = a @ (q.T @ (y - f0))
        zero = torch.zeros(7, 2, dtype=F64)
        outs = [pf(t, f0, zero, k_td)[1] for t in (None, math.inf)]
        for te in outs:
            assert _finite(te) and float((te - want).abs().max()) < 0.1 * float(want.abs().max())
        # on the training points themselves K K⁻¹ r = r to the same backward error
        for t in (None, math.inf):
            _, te = pf(t, f0, f0, k)
            assert _finite(te) and float((te - y).abs().max()) < 0.1 * float(y.abs().max()), t
    # a small regulariser restores accuracy: cond drops to ~4e9, the answer is exact to ~eps·cond
    reg = 1e-8 * float(lam.mean())
    want = a @ ((lam / (lam + reg))[:, None] * (q.T @ (y - f0)))
    pfr = predict.gradient_descent_mse(k, y, diag_reg=1e-8)
    for t in (None, math.inf):
        te = pfr(t, f0, zero, k_td)[1]
        assert float((te - want).abs().max()) < 1e-5 * float(want.abs().max()), t


def _relu_ntk(x1, x2):
    """NTK of serial(Dense(w), Relu(), Dense(1)) (no bias, W_std=1) in closed form (Cho & Saul arc-cosine),
    in the inputs' dtype: the one-hidden-layer case of ``net.kernel_fn``, inlined to keep n=5000 cheap."""
    d = x1.shape[1]
    n1, n2 = x1.norm(dim=1) / math.sqrt(d), x2.norm(dim=1) / math.sqrt(d)
    k0 = x1 @ x2.T / d
    c = (k0 / (n1[:, None] * n2[None, :])).clamp(-1, 1)
    th = torch.arccos(c)
    nngp = n1[:, None] * n2[None, :] * (torch.sin(th) + (math.pi - th) * c) / (2 * math.pi)
    return nngp + k0 * (math.pi - th) / (2 * math.pi)


def test_relu_ntk_helper_matches_kernel_fn():
    x = torch.randn(6, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    net = ntkit.serial(ntkit.Dense(512), ntkit.Relu(), ntkit.Dense(1))
    assert torch.allclose(_relu_ntk(x, x), net.kernel_fn(x, None, "ntk"), rtol=1e-6)


def test_n5000_float32_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 16, generator=g)  # float32
    xt = torch.randn(50, 16, generator=g)
    y = torch.sin(x @ torch.randn(16, 1, generator=g) / 4)
    k, kt = _relu_ntk(x, x), _relu_ntk(xt, x)  # float32 round-off: not exactly symmetric, as in practice
    assert k.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        out = predict.gradient_descent_mse(k, y)(None, None, 0.0, kt)  # unregularised, float32 kernel
    assert out.dtype == torch.float32 and _finite(out)
    # against the kernel computed from float64 inputs: the float32 kernel's ~1e-7 relative round-off,
    # amplified by this kernel's conditioning (measured 4e-5 relative), is all that separates them
    x64 = x.double()
    pf64 = predict.gradient_descent_mse(_relu_ntk(x64, x64), y.double())
    b = pf64(None, None, 0.0, _relu_ntk(xt.double(), x64))
    assert float((out.double() - b).abs().max()) < 1e-3 * float(b.abs().max())
