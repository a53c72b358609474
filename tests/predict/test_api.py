"""ntkit.predict: NT parity, closed-form identities, trace_axes, the spectral view, input errors."""

import math

import pytest
import torch
from helpers import load_reference, rel_err

import ntkit
from ntkit import predict

F64 = torch.float64


def _t(a):
    return torch.tensor(a, dtype=F64)


@pytest.fixture(scope="module")
def problem():
    """A small regression problem with the NTK/NNGP of a ReLU net (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 5, dtype=F64, generator=g)
    xt = torch.randn(9, 5, dtype=F64, generator=g)
    y = torch.sin(x @ torch.randn(5, 2, dtype=F64, generator=g))
    net = ntkit.serial(ntkit.Dense(64, b_std=0.1), ntkit.Relu(), ntkit.Dense(2, b_std=0.1))
    return dict(
        net=net,
        x=x,
        xt=xt,
        y=y,
        k=net.kernel_fn(x, None),
        kt=net.kernel_fn(xt, x),
        ktt=net.kernel_fn(xt, None),
        f0=0.1 * torch.randn(24, 2, dtype=F64, generator=g),
        ft0=0.1 * torch.randn(9, 2, dtype=F64, generator=g),
    )


# ------------------------------------------------------------------------------------------------
# parity with NT 0.6.5
# ------------------------------------------------------------------------------------------------
def test_gd_mse_matches_nt():
    r = load_reference("predict_gd_mse")
    pf = predict.gradient_descent_mse(_t(r["k_train_train"]), _t(r["y_train"]), learning_rate=0.5)
    ts = (0.0, 1.0, 10.0, 1e6)
    tr, te = pf(_t(ts), _t(r["fx_train_0"]), _t(r["fx_test_0"]), _t(r["k_test_train"]))
    for i, t in enumerate(ts):
        assert rel_err(tr[i], r[f"fx_train_t{t}"]) <= 1e-5
        assert rel_err(te[i], r[f"fx_test_t{t}"]) <= 1e-5


def test_gp_inference_matches_nt():
    r = load_reference("predict_gp_inference")
    out = predict.gp_inference(_t(r["k_train_train"]), _t(r["y_train"]), diag_reg=1e-2)(
        "nngp", _t(r["k_test_train"]), _t(r["k_test_test"])
    )
    assert rel_err(out.mean, r["mean"]) <= 1e-5
    assert rel_err(out.covariance, r["covariance"]) <= 1e-5


def test_ensemble_matches_nt():
    r = load_reference("predict_ensemble")
    net = ntkit.serial(
        ntkit.Dense(128, b_std=0.2), ntkit.Relu(), ntkit.Dense(128, b_std=0.2), ntkit.Relu(), ntkit.Dense(1, b_std=0.2)
    )
    pf = predict.gradient_descent_mse_ensemble(
        net.kernel_fn, _t(r["x_train"]), _t(r["y_train"]), learning_rate=1.0, diag_reg=1e-3
    )
    for t in (None, 0.5, 5.0):
        tag = "inf" if t is None else str(t)
        out = pf(t, _t(r["x_test"]), ("nngp", "ntk"), compute_cov=True)
        for g in ("nngp", "ntk"):
            assert rel_err(getattr(out, g).mean, r[f"{g}_mean_t{tag}"]) <= 1e-5, (g, tag)
            assert rel_err(getattr(out, g).covariance, r[f"{g}_cov_t{tag}"]) <= 1e-5, (g, tag)


# ------------------------------------------------------------------------------------------------
# closed-form identities
# ------------------------------------------------------------------------------------------------
def test_times_any_shape_equal_single_calls_and_t0(problem):
    p = problem
    pf = predict.gradient_descent_mse(p["k"].ntk, p["y"], learning_rate=2.0)
    ts = _t([[0.0, 0.3], [4.0, 50.0]])
    tr, te = pf(ts, p["f0"], p["ft0"], p["kt"].ntk)
    assert tr.shape == (2, 2, 24, 2) and te.shape == (2, 2, 9, 2)
    for i in range(2):
        for j in range(2):
            a, b = pf(float(ts[i, j]), p["f0"], p["ft0"], p["kt"].ntk)
            assert torch.allclose(a, tr[i, j], atol=1e-13) and torch.allclose(b, te[i, j], atol=1e-13)
    assert torch.allclose(tr[0, 0], p["f0"], atol=1e-14) and torch.allclose(te[0, 0], p["ft0"], atol=1e-14)
    # a Kernel record stands for its NTK
    k_rec = predict.gradient_descent_mse(p["k"], p["y"], learning_rate=2.0)(ts, p["f0"], p["ft0"], p["kt"])
    assert torch.equal(k_rec[1], te)
    # learning_rate and t are interchangeable (only η·t matters)
    a2 = predict.gradient_descent_mse(p["k"].ntk, p["y"], learning_rate=1.0)(8.0, p["f0"])
    assert torch.allclose(a2, tr[1, 0], atol=1e-13)


def test_ode_solution_satisfies_its_ode(problem):
    """d f_train/dt = -η/N Θ (f - y), checked by a central finite difference in t."""
    p = problem
    eta, n_out = 0.7, p["y"].numel()
    pf = predict.gradient_descent_mse(p["k"].ntk, p["y"], learning_rate=eta)
    t, h = 3.0, 1e-4
    f = pf(_t([t - h, t, t + h]), p["f0"])
    dfdt = (f[2] - f[0]) / (2 * h)
    rhs = -eta / n_out * p["k"].ntk @ (f[1] - p["y"])
    assert torch.allclose(dfdt, rhs, rtol=1e-6, atol=1e-9)


def test_infinite_time_paths_agree(problem):
    p = problem
    pf = predict.gradient_descent_mse(p["k"].ntk, p["y"], diag_reg=1e-3)
    a_tr, a_te = pf(None, p["f0"], p["ft0"], p["kt"].ntk)  # Cholesky
    b_tr, b_te = pf(math.inf, p["f0"], p["ft0"], p["kt"].ntk)  # eigenbasis at t = inf
    c_tr, c_te = pf(1e12, p["f0"], p["ft0"], p["kt"].ntk)
    assert torch.allclose(a_te, b_te, atol=1e-10) and torch.allclose(b_te, c_te, atol=1e-10)
    assert torch.equal(a_tr, p["y"])
    # gp_inference gives the same infinite-time mean from a zero initial function
    gp = predict.gp_inference(p["k"].ntk, p["y"], diag_reg=1e-3)("ntk", p["kt"].ntk)
    assert torch.allclose(pf(None, None, 0.0, p["kt"].ntk), gp, atol=1e-12)


def test_trace_axes_zipped_kernel_equals_traced(problem):
    p = problem
    k, kt = p["k"].ntk, p["kt"].ntk
    eye = torch.eye(2, dtype=F64)
    kz = torch.einsum("ij,ab->ijab", k, eye)  # (n, n, 2, 2): Θ ⊗ I, zipped
    ktz = torch.einsum("ij,ab->ijab", kt, eye)
    ts = _t([0.5, 5.0])
    a = predict.gradient_descent_mse(k, p["y"])(ts, p["f0"], p["ft0"], kt)
    b = predict.gradient_descent_mse(kz, p["y"], trace_axes=())(ts, p["f0"], p["ft0"], ktz)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-12)
    gz = predict.gp_inference(kz, p["y"], diag_reg=1e-2, trace_axes=())(
        "nngp", ktz, torch.einsum("ij,ab->ijab", p["ktt"].nngp, eye)
    )
    g = predict.gp_inference(k, p["y"], diag_reg=1e-2)("nngp", kt, p["ktt"].nngp)
    assert torch.allclose(gz.mean, g.mean, atol=1e-12)
    assert gz.covariance.shape == (9, 9, 2, 2)
    assert torch.allclose(gz.covariance[:, :, 0, 0], g.covariance, atol=1e-12)
    assert float(gz.covariance[:, :, 0, 1].abs().max()) < 1e-12
    # per-output columns are independent problems
    one = predict.gradient_descent_mse(k, p["y"][:, 1])(ts, p["f0"][:, 1], p["ft0"][:, 1], kt)
    # normalisation N differs (24 vs 48 targets): time scales by 2
    two = predict.gradient_descent_mse(k, p["y"])(2 * ts, p["f0"], p["ft0"], kt)
    assert one[0].shape == (2, 24) and torch.allclose(one[1], two[1][..., 1], atol=1e-12)


def test_outputs_follow_kernel_dtype(problem):
    p = problem
    k32 = p["k"].ntk.float()
    tr, te = predict.gradient_descent_mse(k32, p["y"].float())(_t([1.0]), 0.0, 0.0, p["kt"].ntk.float())
    assert tr.dtype == torch.float32 and te.dtype == torch.float32
    ref = predict.gradient_descent_mse(p["k"].ntk, p["y"])(1.0, 0.0, 0.0, p["kt"].ntk)
    assert rel_err(te[0], ref[1].numpy()) < 1e-4


# ------------------------------------------------------------------------------------------------
# the spectral view (Jacot et al.): residual per eigen-direction
# ------------------------------------------------------------------------------------------------
def test_residual_modes(problem):
    p = problem
    eta = 1.5
    pf = predict.gradient_descent_mse(p["k"].ntk, p["y"], learning_rate=eta)
    lam, vec = pf.eigenvalues, pf.eigenvectors
    assert torch.all(lam[:-1] >= lam[1:])
    assert torch.allclose(vec @ torch.diag(lam) @ vec.T, p["k"].ntk, atol=1e-10)
    assert torch.allclose(pf.rates, eta * lam / p["y"].numel())
    ts = _t([0.0, 2.0, 30.0])
    modes = pf.residual_modes(ts, p["f0"])  # (3, 24, 2)
    assert modes.shape == (3, 24, 2)
    f = pf(ts, p["f0"])
    for i in range(3):
        assert torch.allclose(vec @ modes[i], f[i] - p["y"], atol=1e-12)
    # each direction decays as exp(-rate t): the top direction fastest
    ratio = modes[1] / modes[0]
    assert torch.allclose(ratio, torch.exp(-pf.rates * 2.0)[:, None].expand_as(ratio), rtol=1e-9)
    assert float(ratio[0].abs().max()) < float(ratio[-1].abs().min())


# ------------------------------------------------------------------------------------------------
# ensembles and GP inference
# ------------------------------------------------------------------------------------------------
def test_ensemble_caches_train_kernel_and_matches_gd_mse(problem):
    p = problem
    calls = []

    def kernel_fn(x1, x2, get):
        calls.append((x1.shape[0], None if x2 is None else x2.shape[0], tuple(get)))
        return p["net"].kernel_fn(x1, x2, get)

    pf = predict.gradient_descent_mse_ensemble(kernel_fn, p["x"], p["y"], learning_rate=0.8)
    ts = _t([0.5, 3.0])
    m = pf(ts, p["xt"], "ntk")
    m2 = pf(ts, p["xt"], ("nngp", "ntk"), compute_cov=True)
    pf(None, p["xt"], "nngp")
    train_calls = [c for c in calls if c[1] is None and c[0] == 24]
    assert len(train_calls) == 2  # ntk first, then nngp once; never recomputed
    # the ensemble mean is gradient flow from f0 = 0
    ref = predict.gradient_descent_mse(p["k"].ntk, p["y"], learning_rate=0.8)(ts, None, 0.0, p["kt"].ntk)
    assert torch.allclose(m, ref, atol=1e-12) and torch.allclose(m2.ntk.mean, ref, atol=1e-12)
    assert m2.ntk.covariance.shape == (2, 9, 9)
    c = m2.nngp.covariance
    assert torch.allclose(c, c.transpose(1, 2), atol=1e-12)
    assert float(torch.linalg.eigvalsh(c).min()) > -1e-10


def test_ensemble_long_time_tends_to_infinite_time(problem):
    p = problem
    pf = predict.gradient_descent_mse_ensemble(p["net"].kernel_fn, p["x"], p["y"], diag_reg=1e-2)
    inf = pf(None, p["xt"], compute_cov=True)
    late = pf(1e9, p["xt"], compute_cov=True)
    for g in ("nngp", "ntk"):
        assert torch.allclose(getattr(inf, g).mean, getattr(late, g).mean, atol=1e-9)
        assert torch.allclose(getattr(inf, g).covariance, getattr(late, g).covariance, atol=1e-9)
    # at t = 0 the ensemble is the prior: mean 0, covariance the test NNGP
    zero = pf(0.0, p["xt"], compute_cov=True)
    assert float(zero.ntk.mean.abs().max()) < 1e-14
    assert torch.allclose(zero.ntk.covariance, p["ktt"].nngp, atol=1e-12)
    assert torch.allclose(zero.nngp.covariance, p["ktt"].nngp, atol=1e-12)
    # training-set predictions (x_test=None) at t = 0 and t -> inf
    tr0 = pf(0.0, None, "ntk", compute_cov=True)
    assert torch.allclose(tr0.covariance, p["k"].nngp, atol=1e-12)
    assert torch.allclose(pf(None, None, "nngp"), p["y"])


def test_gp_inference_ntk_and_ntkgp(problem):
    p = problem
    gp = predict.gp_inference(p["k"], p["y"], diag_reg=1e-3)
    out = gp(("nngp", "ntk", "ntkgp"), p["kt"], p["ktt"])
    assert set(out._fields) == {"nngp", "ntk", "ntkgp"}
    # NTK-GP: a GP with covariance Θ, written out
    reg = 1e-3 * float(torch.diagonal(p["k"].ntk).mean())
    a = p["k"].ntk + reg * torch.eye(24, dtype=F64)
    ref = p["ktt"].ntk - p["kt"].ntk @ torch.linalg.solve(a, p["kt"].ntk.T)
    assert torch.allclose(out.ntkgp.covariance, ref, atol=1e-10)
    # tensors only carry one kernel: the NTK covariance needs both
    with pytest.raises(ValueError, match="needs both the NTK and the NNGP"):
        predict.gp_inference(p["k"].ntk, p["y"])("ntk", p["kt"].ntk, p["ktt"].nngp)
    # train-set predictions: N(y, 0)
    tr = gp("nngp", None, True)
    assert torch.equal(tr.mean, p["y"]) and float(tr.covariance.abs().max()) == 0.0


def test_max_learning_rate_is_the_stability_edge(problem):
    p = problem
    k, y = p["k"].ntk, p["y"]
    n_out = y.numel()
    lr = predict.max_learning_rate(k, n_out)
    assert lr == pytest.approx(2 * n_out / float(torch.linalg.eigvalsh(k)[-1]), rel=1e-9)
    assert predict.max_learning_rate(k, n_out, momentum=0.9) == pytest.approx(1.9 * lr, rel=1e-9)

    def residual(eta, steps=150):  # discrete full-batch GD in function space, from f = 0
        f = torch.zeros_like(y)
        for _ in range(steps):
            f = f - eta / n_out * k @ (f - y)
        return float((f - y).norm() / y.norm())

    assert residual(0.95 * lr) < 1.0 and residual(1.05 * lr) > 1e2


# ------------------------------------------------------------------------------------------------
# bad input: one clear error each
# ------------------------------------------------------------------------------------------------
def test_input_errors(problem):
    p = problem
    k, y = p["k"].ntk, p["y"]
    with pytest.raises(ValueError, match=r"k_train_train has shape \(24, 24\) but y_train of shape \(20, 2\)"):
        predict.gradient_descent_mse(k, y[:20])
    pf = predict.gradient_descent_mse(k, y)
    with pytest.raises(ValueError, match="t must be >= 0"):
        pf(_t([1.0, -0.1]), p["f0"])
    with pytest.raises(ValueError, match="NaN"):
        pf(float("nan"), p["f0"])
    with pytest.raises(ValueError, match="k_test_train"):
        pf(1.0, p["f0"], p["ft0"])
    with pytest.raises(ValueError, match="k_test_train has shape"):
        pf(1.0, p["f0"], p["ft0"], p["kt"].ntk[:, :5])
    with pytest.raises(ValueError, match="does not broadcast"):
        pf(1.0, p["f0"][:, :1].repeat(1, 3))
    with pytest.raises(ValueError, match="both None"):
        pf(1.0, None, None)
    with pytest.raises(ValueError, match="not symmetric"):
        predict.gradient_descent_mse(k + torch.triu(torch.ones_like(k)), y)
    bad = k.clone()
    bad[3, 3] = -50.0
    with pytest.raises(ValueError, match="not positive semi-definite: smallest eigenvalue -"):
        predict.gradient_descent_mse(bad, y)(1.0)
    nan = k.clone()
    nan[0, 1] = nan[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        predict.gradient_descent_mse(nan, y)
    ynan = y.clone()
    ynan[2, 0] = float("inf")
    with pytest.raises(ValueError, match="y_train contains 1 NaN/Inf"):
        predict.gradient_descent_mse(k, ynan)
    with pytest.raises(ValueError, match="fx_train_0 contains"):
        pf(1.0, torch.full_like(y, float("nan")))
    with pytest.raises(ValueError, match="batch axis"):
        predict.gradient_descent_mse(k, y, trace_axes=(0,))
    with pytest.raises(ValueError, match="learning_rate"):
        predict.gradient_descent_mse(k, y, learning_rate=0.0)
    with pytest.raises(ValueError, match="diag_reg"):
        predict.gradient_descent_mse(k, y, diag_reg=-1e-3)
    with pytest.raises(ValueError, match="get="):
        predict.gp_inference(k, y)("nnpg", p["kt"].ntk)
    with pytest.raises(TypeError, match="kernel_fn"):
        predict.gradient_descent_mse_ensemble(None, p["x"], y)


def test_predictors_are_freed_without_the_cycle_collector(problem):
    """A predictor and its cached kernels and factorisations are freed by reference counting when the last
    reference goes: a reference cycle (e.g. the posterior holding a bound method of the predictor) kept every
    fresh predictor's matrices until a full collection, which grew the heap call after call."""
    import gc
    import weakref

    p = problem
    loss = lambda f, y: 0.5 * ((f - y) ** 2).sum()
    makers = {
        "ensemble": lambda: predict.gradient_descent_mse_ensemble(p["net"].kernel_fn, p["x"], p["y"], diag_reg=1e-4),
        "gd_mse": lambda: predict.gradient_descent_mse(p["k"].ntk, p["y"], diag_reg=1e-4),
        "gp": lambda: predict.gp_inference(p["k"], p["y"], diag_reg=1e-4),
        "student_t": lambda: predict.student_t_inference(p["k"], p["y"], diag_reg=1e-4),
        "ode": lambda: predict.gradient_descent(loss, p["k"].ntk, p["y"]),
    }
    calls = {
        "ensemble": lambda pf: (pf(2.0, p["xt"], compute_cov=True), pf(None, p["xt"], compute_cov=True)),
        "gd_mse": lambda pf: pf(2.0, p["f0"], p["ft0"], p["kt"].ntk),
        "gp": lambda pf: pf(("nngp", "ntk"), p["kt"], p["ktt"]),
        "student_t": lambda pf: pf(p["kt"], p["ktt"]),
        "ode": lambda pf: pf(1.0, p["f0"], p["ft0"], p["kt"].ntk),
    }
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for name, make in makers.items():
            pf = make()
            calls[name](pf)
            ref = weakref.ref(pf)
            del pf
            assert ref() is None, f"{name}: the predictor is kept alive by a reference cycle"
    finally:
        if was:
            gc.enable()
