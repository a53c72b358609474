"""The kernel core: Dense/branching rules, tiling, symmetry, dtype/device conventions, errors, finite twins."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import load_reference, rel_err
from nt_nets import BRANCH_CASES, branch_net

import ntkit as nt

torch.manual_seed(0)


def _x(n, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


# ------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("param", ["ntk", "standard"])
def test_linear_net_closed_form(param):
    """Dense-Dense with no nonlinearity: K = W2²(W1² x·x'/d + b1²) + b2², and the NTK by the layer rule."""
    x1, x2 = _x(6), _x(4, seed=1)
    w1, b1, w2, b2, width = 1.3, 0.2, 0.7, 0.4, 16
    net = nt.serial(nt.Dense(width, w1, b1, param), nt.Dense(3, w2, b2, param))
    k = net.kernel_fn(x1, x2)
    k0 = x1 @ x2.T / x1.shape[1]
    k1 = w1**2 * k0 + b1**2
    k2 = w2**2 * k1 + b2**2
    if param == "ntk":
        ntk = k2 + w2**2 * k1
    else:  # Θ1 = d·K0 + 1; Θ2 = width·K1 + w2²Θ1 + 1
        ntk = width * k1 + w2**2 * (x1.shape[1] * k0 + 1) + 1
    assert rel_err(k.nngp, k2) < 1e-14
    assert rel_err(k.ntk, ntk) < 1e-14


def test_relu_closed_form_one_layer():
    """Arc-cosine kernel (Cho & Saul 2009) written out independently of the implementation."""
    x1, x2 = _x(5), _x(7, seed=2)
    k = nt.serial(nt.Dense(8), nt.Relu()).kernel_fn(x1, x2)
    q = x1 @ x2.T / 5
    n1, n2 = (x1 * x1).sum(1) / 5, (x2 * x2).sum(1) / 5
    c = (q / torch.sqrt(n1[:, None] * n2[None, :])).clamp(-1, 1)
    th = torch.arccos(c)
    nngp = torch.sqrt(n1[:, None] * n2[None, :]) * (torch.sin(th) + (math.pi - th) * c) / (2 * math.pi)
    ntk = q * (math.pi - th) / (2 * math.pi)  # Θ' = Θ·K̇ with Θ = K = q after the first Dense
    assert rel_err(k.nngp, nngp) < 1e-13
    assert rel_err(k.ntk, ntk) < 1e-13


# ------------------------------------------------------------------ NT parity: branching
@pytest.mark.parametrize("name", BRANCH_CASES)
def test_branch_parity_with_nt(name):
    ref = load_reference(name)
    k = branch_net(name).kernel_fn(ref["x1"], ref["x2"])
    assert rel_err(k.nngp, ref["nngp_12"]) < 1e-5
    assert rel_err(k.ntk, ref["ntk_12"]) < 1e-5


@pytest.mark.parametrize("act", ["relu", "erf"])
def test_fc_parity_diagonal_is_exact(act):
    """x2=None: our diagonal correlations are exactly 1, so the NTK diagonal of a ReLU net equals its
    closed form to round-off; NT's own diagonal carries ~1e-9 arccos error, well inside the 1e-5 bar."""
    ref = load_reference(f"fc_{act}_ntk_bNone")
    a = nt.Relu() if act == "relu" else nt.Erf()
    net = nt.serial(nt.Dense(64, 1.5), a, nt.Dense(64, 1.2), a, nt.Dense(3))
    k = net.kernel_fn(ref["x1"])
    assert rel_err(k.nngp, ref["nngp_11"]) < 1e-5 and rel_err(k.ntk, ref["ntk_11"]) < 1e-5
    if act == "relu":
        x = torch.from_numpy(ref["x1"])
        q = (x * x).sum(1) / x.shape[1] * 1.5**2  # Dense 1
        n1, t1 = q / 2, q / 2  # ReLU on the diagonal: K' = q/2, K̇ = 1/2
        q2, th2 = 1.44 * n1, 1.44 * n1 + 1.44 * t1  # Dense 2
        diag = q2 / 2 + th2 / 2  # ReLU, then Dense(3): Θ = K + Θ
        assert rel_err(torch.diagonal(k.ntk), diag) < 1e-15


# ------------------------------------------------------------------ symmetry, PSD, tiling
ACTS = [nt.Relu(), nt.LeakyRelu(0.2), nt.Abs(), nt.Erf(), nt.Elementwise(torch.tanh)]


@pytest.mark.parametrize("act", ACTS, ids=repr)
def test_self_kernel_symmetric_psd(act):
    x = _x(40, 6)
    x[3] = x[7]  # duplicated point
    x[5] = 0.0  # zero input
    net = nt.serial(nt.Dense(32, 1.4, 0.1), act, nt.Dense(32, 1.4, 0.1), act, nt.Dense(1))
    k = net.kernel_fn(x)
    for m in (k.nngp, k.ntk):
        assert torch.equal(m, m.T)
        ev = torch.linalg.eigvalsh(m)
        assert ev.min() >= -1e-10 * torch.trace(m)
        assert torch.isfinite(m).all()


@pytest.mark.parametrize("tile", [13, 100, 512])
def test_tiled_equals_untiled(tile):
    x1, x2 = _x(237, 9, 3), _x(101, 9, 4)
    net = nt.serial(
        nt.Dense(64, 1.5, 0.2),
        nt.Relu(),
        nt.FanOut(2),
        nt.parallel(nt.serial(nt.Dense(64), nt.Erf()), nt.Identity()),
        nt.FanInSum(),
        nt.Dense(2),
    )
    whole = net.kernel_fn(x1, x2, tile_size=10_000)
    part = net.kernel_fn(x1, x2, tile_size=tile)
    assert rel_err(part.nngp, whole.nngp) < 1e-14 and rel_err(part.ntk, whole.ntk) < 1e-14
    assert torch.equal(part.cov1, whole.cov1) and torch.equal(part.cov2, whole.cov2)
    sym_whole = net.kernel_fn(x1, tile_size=10_000)
    sym = net.kernel_fn(x1, tile_size=tile)
    assert torch.equal(sym.ntk, sym.ntk.T)
    assert rel_err(sym.ntk, sym_whole.ntk) < 1e-14
    assert sym.cov2 is None and sym.x1_is_x2


def test_self_kernel_matches_cross_kernel():
    x = _x(30)
    net = nt.serial(nt.Dense(16, 1.2, 0.3), nt.Relu(), nt.Dense(1))
    a, b = net.kernel_fn(x), net.kernel_fn(x, x)
    assert rel_err(a.ntk, b.ntk) < 1e-13 and rel_err(a.nngp, b.nngp) < 1e-13


def test_memory_budget_too_small_is_a_clear_error():
    net = nt.serial(nt.Dense(4), nt.Relu(), nt.Dense(1))
    with pytest.raises(MemoryError, match="budget"):
        net.kernel_fn(_x(10), memory_budget=10)


# ------------------------------------------------------------------ conventions
def test_dtype_and_numpy_and_get():
    net = nt.serial(nt.Dense(8), nt.Relu(), nt.Dense(1))
    x32 = _x(9, dtype=torch.float32)
    k32 = net.kernel_fn(x32)
    assert k32.nngp.dtype == torch.float32 and k32.ntk.dtype == torch.float32
    k64 = net.kernel_fn(x32.double())
    assert rel_err(k32.ntk, k64.ntk) < 1e-5
    kn = net.kernel_fn(x32.double().numpy())
    assert kn.ntk.dtype == torch.float64 and torch.equal(kn.ntk, k64.ntk)
    t = net.kernel_fn(x32, get="ntk")
    assert isinstance(t, torch.Tensor) and torch.equal(t, k32.ntk)
    only = net.kernel_fn(x32, get=("nngp",))
    assert only.ntk is None and only.nngp is not None
    half = net.kernel_fn(x32.half())
    assert half.ntk.dtype == torch.float16


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: (torch.ones(3, 4), torch.ones(2, 5)), "per-sample shape"),
        (lambda: (torch.tensor([[1.0, float("nan")]]), None), "NaN"),
        (lambda: (torch.ones(3, 4, dtype=torch.int64), None), "dtype"),
        (lambda: (torch.ones(4), None), "batch axis"),
        (lambda: (torch.ones(0, 4), None), "empty"),
        (lambda: (torch.ones(3, 4, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)), "per-sample"),
        (lambda: (torch.ones(3, 4), torch.ones(3, 4, dtype=torch.float64)), "dtype"),
        (lambda: ("abc", None), "torch.Tensor"),
    ],
)
def test_bad_inputs(bad, match):
    net = nt.serial(nt.Dense(4), nt.Relu(), nt.Dense(1))
    x1, x2 = bad()
    with pytest.raises((ValueError, TypeError), match=match):
        net.kernel_fn(x1, x2)


def test_layer_misuse_errors():
    x = _x(3)
    with pytest.raises(nt.LayerError, match="Gaussian"):
        nt.serial(nt.Relu(), nt.Dense(1)).kernel_fn(x)
    with pytest.raises(nt.LayerError, match="Gaussian"):
        nt.serial(nt.Dense(4), nt.Relu(), nt.Relu()).kernel_fn(x)
    with pytest.raises(nt.LayerError, match="branches"):
        nt.serial(nt.FanOut(2), nt.Dense(3)).kernel_fn(x)
    with pytest.raises(nt.LayerError, match="FanOut"):
        nt.serial(nt.Dense(3), nt.FanInSum()).kernel_fn(x)
    with pytest.raises(nt.LayerError, match="merge"):
        nt.serial(nt.FanOut(2)).kernel_fn(x)
    with pytest.raises(ValueError, match="parameterization"):
        nt.Dense(3, parameterization="mup")
    with pytest.raises(ValueError, match="get="):
        nt.serial(nt.Dense(1)).kernel_fn(x, get="cov")


# ------------------------------------------------------------------ finite twins
def test_module_twin_structure_and_init():
    net = nt.serial(nt.Dense(64, 1.5, 0.3), nt.Relu(), nt.Dense(64, 1.2, 0.3), nt.Erf(), nt.Dense(3))
    m = net.module(7, seed=0)
    assert m(torch.zeros(2, 7)).shape == (2, 3)
    wide = net.module(7, width=1000, seed=1)
    ws = [p for n, p in wide.named_parameters() if n.endswith("weight")]
    assert [tuple(w.shape) for w in ws] == [(1000, 7), (1000, 1000), (3, 1000)]  # readout keeps its size
    # NTK parameterisation: N(0, 1) parameters
    big = ws[1].detach().flatten()
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    same = net.module(7, width=1000, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(wide.parameters(), same.parameters()))


def test_module_twin_standard_parameterisation_scales():
    net = nt.serial(nt.Dense(2000, W_std=2.0, b_std=0.5, parameterization="standard"))
    m = net.module(400, seed=0)
    w, b = m[0].weight.detach(), m[0].bias.detach()
    assert abs(w.std() * math.sqrt(400) - 2.0) < 0.02
    assert abs(b.std() - 0.5) < 0.05


def test_module_twin_nngp_matches_kernel_roughly():
    """A cheap sanity check (the full Monte-Carlo convergence study lives in test_monte_carlo.py)."""
    net = nt.serial(nt.Dense(384, 1.5, 0.2), nt.Relu(), nt.Dense(384, 1.5, 0.2), nt.Relu(), nt.Dense(256))
    x = _x(4, 5, 8)
    k = net.kernel_fn(x, get="nngp")
    outs = torch.stack([net.module(5, seed=s, dtype=torch.float64)(x) for s in range(24)])  # (S, N, 256)
    emp = torch.einsum("sio,sjo->ij", outs, outs) / (24 * 256)
    assert rel_err(emp, k) < 0.05


def test_residual_twin_runs():
    net = branch_net("branch_residual_sum")
    m = net.module(7, seed=0, dtype=torch.float64)
    assert m(_x(5, 7)).shape == (5, 1)


# ------------------------------------------------------------------ issue #16, item 3: sums of non-Gaussian branches
def _two_relu_branches(w_trunk=1.3):
    return nt.serial(
        nt.Dense(8, w_trunk, 0.2),
        nt.FanOut(2),
        nt.parallel(nt.serial(nt.Dense(8, 1.2, 0.1), nt.Relu()), nt.serial(nt.Dense(8, 0.9, 0.3), nt.Relu())),
        nt.FanInSum(),
        nt.Dense(16),
    )


def test_fan_in_sum_cross_terms_closed_form():
    """K = K_a + K_b + μ_a(x)μ_b(x') + μ_b(x)μ_a(x') with the ReLU means μ = √(q/(2π)) (independent branches);
    the rule before the fix dropped the means (24 % off its Monte Carlo for two ReLU branches)."""
    x1, x2 = _x(4, 5, 1), _x(3, 5, 2)
    net = _two_relu_branches()
    k = net.kernel_fn(x1, x2, get="nngp")
    ka = nt.serial(nt.Dense(8, 1.3, 0.2), nt.Dense(8, 1.2, 0.1), nt.Relu()).kernel_fn(x1, x2)
    kb = nt.serial(nt.Dense(8, 1.3, 0.2), nt.Dense(8, 0.9, 0.3), nt.Relu()).kernel_fn(x1, x2)
    q0 = [1.69 * (x * x).mean(1) + 0.04 for x in (x1, x2)]
    ma = [torch.sqrt((1.44 * q + 0.01) / (2 * math.pi)) for q in q0]
    mb = [torch.sqrt((0.81 * q + 0.09) / (2 * math.pi)) for q in q0]
    expect = ka.nngp + kb.nngp + ma[0][:, None] * mb[1][None, :] + mb[0][:, None] * ma[1][None, :]
    assert rel_err(k, expect) < 1e-14
    # Θ = Σ Θ_i (no mean terms), then the readout's Θ' = K + Θ
    assert rel_err(net.kernel_fn(x1, x2, get="ntk"), k + ka.ntk + kb.ntk) < 1e-14


SUM_NETS = {
    "relu+relu": (_two_relu_branches(), 256),
    # the raw inputs (means differ per channel) plus a ReLU branch: Σ_c x_c/C · μ(x')
    "inputs+relu": (
        nt.serial(
            nt.FanOut(2),
            nt.parallel(nt.Identity(), nt.serial(nt.Dense(5, 1.2, 0.1), nt.Relu())),
            nt.FanInSum(),
            nt.Dense(16),
        ),
        None,
    ),
    # a concatenation (channel-varying means) plus a ReLU branch, and an Erf(c ≠ 0) branch
    "concat+relu": (
        nt.serial(
            nt.Dense(8, 1.3, 0.2),
            nt.FanOut(2),
            nt.parallel(
                nt.serial(
                    nt.FanOut(2),
                    nt.parallel(nt.serial(nt.Dense(128), nt.Relu()), nt.serial(nt.Dense(128), nt.Erf(1.0, 1.0, 0.5))),
                    nt.FanInConcat(),
                ),
                nt.serial(nt.Dense(256), nt.Gelu()),
            ),
            nt.FanInSum(),
            nt.Dense(16),
        ),
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(SUM_NETS))
def test_fan_in_sum_of_nonlinearity_branches_monte_carlo(name):
    from ntkit.monte_carlo import monte_carlo_kernel_fn

    net, width = SUM_NETS[name]
    x = _x(5, 5, 0) + 0.5
    exact = net.kernel_fn(x)
    for g, n in (("nngp", 1024), ("ntk", 48)):
        s = monte_carlo_kernel_fn(net, n_samples=n, width=width, seed=3, get=g).samples(x)[g].reshape(n, -1)
        mean, se = s.mean(0), s.std(0) / math.sqrt(n)
        e = getattr(exact, g).reshape(-1)
        err, noise = float((mean - e).norm() / e.norm()), float(se.norm() / e.norm())
        assert err < 0.01 + 3 * noise, (g, err, noise)


def test_dependent_branches_are_refused():
    """Two branches without a Dense/Conv of their own since the FanOut are the same function of the same
    activations: the sum/product rules (independent branches) would be wrong (relu(h)·gelu(h): 85 % off its
    Monte Carlo), so they refuse; one such branch (a skip connection) is fine, and so is a concatenation."""
    x = _x(4)
    for merge in (nt.FanInSum(), nt.FanInProd()):
        for branches in ((nt.Relu(), nt.Gelu()), (nt.Identity(), nt.Identity())):
            net = nt.serial(nt.Dense(8), nt.FanOut(2), nt.parallel(*branches), merge, nt.Dense(1))
            with pytest.raises(nt.LayerError, match="no Dense/Conv of their own"):
                net.kernel_fn(x)
        with pytest.raises(nt.LayerError, match="no Dense/Conv of their own"):
            nt.serial(nt.Dense(8), nt.FanOut(2), merge).kernel_fn(x)
        ok = nt.serial(nt.Dense(8), nt.FanOut(2), nt.parallel(nt.Relu(), nt.serial(nt.Dense(8), nt.Gelu())), merge)
        assert torch.isfinite(ok.kernel_fn(x).ntk).all()
    # nested: the inner FanOut's Dense makes its branch fresh for the outer one too
    inner = nt.serial(nt.FanOut(2), nt.parallel(nt.Dense(8), nt.Identity()), nt.FanInSum())
    with pytest.raises(nt.LayerError, match="no Dense/Conv of their own"):
        nt.serial(nt.Dense(8), nt.FanOut(2), nt.parallel(inner, nt.Identity()), nt.FanInSum()).kernel_fn(x)
    fresh = nt.serial(nt.Dense(8), inner)
    nt.serial(nt.Dense(8), nt.FanOut(2), nt.parallel(fresh, nt.Identity()), nt.FanInSum()).kernel_fn(x)
    concat = nt.serial(nt.Dense(8), nt.FanOut(2), nt.parallel(nt.Relu(), nt.Gelu()), nt.FanInConcat(), nt.Dense(1))
    concat.kernel_fn(x)


def test_cross_terms_of_two_channel_varying_means_are_refused():
    net = nt.serial(
        nt.FanOut(2),
        nt.parallel(
            nt.Identity(),
            nt.serial(nt.FanOut(2), nt.parallel(nt.serial(nt.Dense(2), nt.Relu()), nt.Dense(3)), nt.FanInConcat()),
        ),
        nt.FanInSum(),
    )
    with pytest.raises(nt.LayerError, match="differ from channel to channel"):
        net.kernel_fn(_x(3))


@pytest.mark.parametrize("tile", [1, 2])
def test_fan_in_sum_means_tiled_with_tape(tile):
    """The branch means in pair-only tiles (self-covariance tape) and after pooling: tiled = untiled."""
    c = lambda n, w=1.2: nt.Conv(n, (3, 3), padding="SAME", W_std=w, b_std=0.1)
    net = nt.serial(
        c(4),
        nt.FanOut(2),
        nt.parallel(nt.serial(c(4), nt.Relu(), nt.AvgPool((2, 2), (1, 1), "SAME")), nt.serial(c(4, 0.8), nt.Gelu())),
        nt.FanInSum(),
        c(3),
        nt.GlobalAvgPool(),
        nt.Dense(1),
    )
    g = torch.Generator().manual_seed(5)
    x1, x2 = (
        torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64),
    )
    for b in (None, x2):
        whole, part = net.kernel_fn(x1, b), net.kernel_fn(x1, b, tile_size=tile)
        for f in ("nngp", "ntk"):
            assert rel_err(getattr(part, f), getattr(whole, f)) < 1e-13


# ------------------------------------------------------------------ issue #16, item 6: no silent Inf/NaN
def test_overflowing_inputs_raise_naming_the_input_covariances():
    x = _x(4) * 1e200
    for tile in (None, 2):
        with pytest.raises(nt.NonFiniteKernelError, match="input covariances.*scale the inputs"):
            nt.serial(nt.Dense(8), nt.Relu(), nt.Dense(1)).kernel_fn(x, tile_size=tile)
    with pytest.raises(nt.NonFiniteKernelError, match="float64"):
        nt.serial(nt.Dense(8), nt.Relu(), nt.Dense(1)).kernel_fn((_x(4) * 3e19).float())


def test_overflow_inside_the_net_names_the_first_layer():
    x = _x(4)
    net = nt.serial(nt.Dense(8, 1e60), nt.RectifiedMonomial(3), nt.Dense(1))  # q ~ 1e120, E[relu³²] ~ q³
    for b, tile in ((None, None), (None, 1), (_x(3, seed=1), 2)):
        with pytest.raises(nt.NonFiniteKernelError, match=r"after layer 1, RectifiedMonomial\(degree=3\)"):
            net.kernel_fn(x, b, tile_size=tile)
    nested = nt.serial(
        nt.Dense(8), nt.FanOut(2), nt.parallel(nt.Identity(), nt.serial(nt.Dense(8, 1e160), nt.Relu())), nt.FanInSum()
    )
    with pytest.raises(nt.NonFiniteKernelError, match=r"after layer 2\.1\.0, Dense"):
        nested.kernel_fn(x)


def test_an_overflow_is_not_squashed_into_a_finite_kernel():
    """Dense(W_std=1e160) overflows (W² = inf); Gaussian() maps an infinite variance to exp(−∞)-like 0 and the
    readout to b²: before the checks a finite, wrong NNGP came back."""
    net = nt.serial(nt.Dense(8, 1e160), nt.Gaussian(), nt.Dense(1, 1.0, 0.5))
    with pytest.raises(nt.NonFiniteKernelError, match="after layer 0, Dense"):
        net.kernel_fn(_x(4), get="nngp")


def test_finite_kernels_pass_the_checks_unchanged():
    net = nt.serial(nt.Dense(8, 1.5, 0.1), nt.Gaussian(), nt.Dense(1))
    x = _x(5) * 1e14  # q ~ 2e28: tiny but exact kernels (issue #16, item 4), no error
    k = net.kernel_fn(x)
    assert torch.isfinite(k.nngp).all() and torch.isfinite(k.ntk).all() and (k.nngp.diagonal() > 0).all()


# ------------------------------------------------------------------ issue #14: NT's kernel_fn controls
def _img(n, c=3, size=(5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, *size, generator=g, dtype=torch.float64)


def test_get_any_kernel_field():
    x = _img(4, c=3, size=(5, 5))
    net = nt.serial(nt.Conv(4, (3, 3), padding="SAME"), nt.Relu(), nt.Conv(2, (3, 3)))
    full = net.kernel_fn(x)
    assert torch.equal(net.kernel_fn(x, get="cov1"), full.cov1)
    assert net.kernel_fn(x, get="shape1") == (4, 2, 3, 3)
    assert net.kernel_fn(x, get="is_gaussian") is True and net.kernel_fn(x, get="x1_is_x2") is True
    k = net.kernel_fn(x, get=("ntk", "cov1"))
    assert k.nngp is None and torch.equal(k.ntk, full.ntk) and torch.equal(k.cov1, full.cov1)
    with pytest.raises(ValueError, match="choose distinct names from"):
        net.kernel_fn(x, get="mean1")


def test_diagonal_spatial_control():
    """``diagonal_spatial=False`` returns every pixel pair (NT's ``(N1, N2, H, H', W, W')``), whose diagonal is
    the default same-pixel kernel; ``True`` on a net that pools is refused (NT raises too)."""
    x, x2 = _img(3, c=2, size=(4, 5)), _img(2, c=2, size=(4, 5), seed=1)
    net = nt.serial(nt.Conv(4, (3, 3), padding="SAME"), nt.Erf(), nt.Conv(3, (2, 2)))
    diag = net.kernel_fn(x, x2)
    full = net.kernel_fn(x, x2, diagonal_spatial=False)
    assert full.nngp.shape == (3, 2, 3, 3, 4, 4) and diag.nngp.shape == (3, 2, 3, 4)
    on_diagonal = torch.einsum("abiijj->abij", full.ntk)
    assert rel_err(on_diagonal, diag.ntk) < 1e-13
    assert torch.equal(net.kernel_fn(x, x2, diagonal_spatial=True).nngp, diag.nngp)
    with pytest.raises(nt.LayerError, match="diagonal_spatial=True, but this network needs"):
        nt.serial(net, nt.GlobalAvgPool()).kernel_fn(x, diagonal_spatial=True)
    with pytest.raises(TypeError, match="choose None, True or False"):
        net.kernel_fn(x, diagonal_spatial="yes")


def test_channels_last_images_are_warned_about():
    import warnings

    net = nt.serial(nt.Conv(4, (3, 3)), nt.Relu(), nt.GlobalAvgPool(), nt.Dense(1))
    nhwc = _img(2, c=8, size=(8, 3))  # (N, 8, 8, 3): reads as 8 channels of 8 x 3 images, but looks NHWC
    with pytest.warns(nt.LayoutWarning, match=r"look channels-last.*permute\(0, 3, 1, 2\)"):
        net.kernel_fn(nhwc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.kernel_fn(_img(2, c=3, size=(8, 8)))  # channels first: no warning
        net.kernel_fn(_img(2, c=64, size=(3, 3)))  # a small spatial axis after many channels: no warning
        warnings.filterwarnings("ignore", category=nt.LayoutWarning)
        net.kernel_fn(nhwc)  # the documented way to silence it
