"""MaxPool: window planning against torch, the quasi-Monte-Carlo estimate against closed forms (windows of two
values: ``max(a, b) = (a + b)/2 + |a − b|/2``, Clark 1961) and a 16× larger independent sample, its stated error
bound, determinism, refusals, and Monte Carlo against wide finite networks (``Net.module``)."""

from __future__ import annotations

import math

import pytest
import torch

import ntkit as nk
from ntkit.kernel import kernel_from_inputs
from ntkit.layers import LayerError
from ntkit.layers.maxpool import MaxPool, is_monotone
from ntkit.monte_carlo import monte_carlo_kernel_fn

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n, shape, seed):
    return torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=F64)


def _conv_record(x1, x2=None, rank=2):
    k = kernel_from_inputs(x1, x2, diagonal_spatial=False)
    return nk.Conv(4, (3,) * rank, padding="SAME", W_std=1.3, b_std=0.3).kernel(k)


# ---------------------------------------------------------------------------------------------------
# windows: torch's output sizes, padding, dilation, ceil_mode; 1-D to 3-D
# ---------------------------------------------------------------------------------------------------
CONFIGS = [
    ((7,), dict(kernel_size=2)),
    ((7,), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((6, 5), dict(kernel_size=2)),
    ((6, 5), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    ((5, 5), dict(kernel_size=2, ceil_mode=True)),
    ((4, 3, 4), dict(kernel_size=2, stride=(2, 1, 2), padding=(1, 0, 0))),
]


@pytest.mark.parametrize("spatial,kw", CONFIGS)
def test_twin_and_record_follow_torch(spatial, kw):
    """The twin is torch's MaxPool (padding −∞); the kernel's output pixels are the twin's."""
    x = _x(2, (3,) + spatial, 0)
    layer = MaxPool(**kw, activation=nk.Relu())
    mod, shape = layer.build((3,) + spatial, None, torch.Generator(), False)
    torch_pool = {1: torch.nn.MaxPool1d, 2: torch.nn.MaxPool2d, 3: torch.nn.MaxPool3d}[len(spatial)](**kw)
    assert torch.equal(mod(x), torch_pool(torch.relu(x)))
    assert tuple(mod(x).shape[1:]) == shape
    k = layer.kernel(_conv_record(x[:1], rank=len(spatial)))
    assert k.shape1[2:] == shape[1:]
    assert k.nngp.shape == (1, 1) + tuple(s for s in shape[1:] for _ in (0, 1))
    assert not k.is_gaussian


def test_padding_beyond_half_window_refused():
    with pytest.raises(LayerError, match="at most half|more than half"):
        MaxPool(2, padding=2).build((1, 6, 6), None, torch.Generator(), False)


# ---------------------------------------------------------------------------------------------------
# the estimate against closed forms and a larger sample; the error bound
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x2_given", [False, True])
def test_two_value_windows_qmc_within_its_bound_of_the_closed_form(x2_given):
    """Windows of 2 values: the RQMC path (closed form switched off) vs the closed form. Every entry's error is
    below 4 × (rtol · s) (the docstring's bound) and the mean error below rtol · s; the NNGP's own diagonal is
    Clark's E[max(u1, u2)²] = (σ1² + σ2²)/2."""
    x1, x2 = _x(3, (2, 6), 1), (_x(2, (2, 6), 2) if x2_given else None)
    k = _conv_record(x1, x2, rank=1)
    exact_layer = MaxPool(2)
    qmc_layer = MaxPool(2, rtol=5e-3)
    qmc_layer._exact_small = False
    ex, qm = exact_layer.kernel(k), qmc_layer.kernel(k)
    # Clark: E[max(u1, u2)²] = (σ1² + σ2²)/2 for centred u
    var = torch.diagonal(k.cov1, 0, 1, 2)  # (N1, 6)
    clark = (var[:, 0::2] + var[:, 1::2]) / 2
    assert torch.allclose(torch.diagonal(ex.cov1, 0, 1, 2), clark, rtol=1e-13, atol=0)
    d1 = torch.diagonal(ex.cov1, 0, 1, 2)  # (N1, 3) exact E[max²]
    d2 = d1 if ex.cov2 is None else torch.diagonal(ex.cov2, 0, 1, 2)
    s = torch.sqrt(d1[:, None, :, None] * d2[None, :, None, :])  # (N1, N2, 3, 3)
    for field in ("nngp", "ntk"):
        a, b = getattr(qm, field), getattr(ex, field)
        scale = s if field == "nngp" else None
        if field == "ntk":  # s = max |Θ| over the window pair, E[φ'²] = 1 (no activation): bounded by max |Θ|
            scale = getattr(k, "ntk").abs().amax().expand_as(b)
        err = (a - b).abs() / (5e-3 * scale)
        assert float(err.max()) < 4, (field, float(err.max()))
        assert float(err.mean()) < 1, (field, float(err.mean()))


def test_closed_form_two_values_against_brute_force():
    """The 2-value closed form itself against 2^20 plain Monte-Carlo samples of the 4-D Gaussian (one entry)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    sigma = a @ a.T / 4
    theta = torch.randn(2, 2, generator=g, dtype=F64)
    layer = MaxPool(2)
    from ntkit.layers.maxpool import _Estimator

    nngp, ntk = _Estimator(layer, 2)(sigma[None], torch.ones(1, 4, dtype=torch.bool), theta[None])
    z = torch.randn(1 << 20, 4, generator=g, dtype=F64) @ torch.linalg.cholesky(sigma).T
    mu, au = z[:, :2].max(1)
    mv, av = z[:, 2:].max(1)
    f, t = mu * mv, theta[au, av]
    for est, smp in ((nngp, f), (ntk, t)):
        se = float(smp.std() / math.sqrt(len(smp)))
        assert abs(float(est[0]) - float(smp.mean())) < 4 * se


def test_relu_windows_within_bound_of_a_larger_sample():
    """2×2 windows with a fused ReLU (no closed form): the default tolerance against an independent estimate with
    an 8× tighter tolerance (about 16-64× the samples, other scrambles): max error < 4·tol, mean < tol."""
    x1 = _x(2, (2, 4, 4), 3)
    k = _conv_record(x1)
    got = MaxPool(2, activation=nk.Relu(), rtol=1e-2).kernel(k)
    ref = MaxPool(2, activation=nk.Relu(), rtol=1.25e-3, seed=1000, max_samples=1 << 15).kernel(k)
    d = torch.diagonal(torch.diagonal(ref.cov1, 0, 1, 2), 0, 1, 2)  # (N, 2, 2) E[φ(max u)²] per output pixel
    d = d.reshape(2, 4)
    s = torch.sqrt(d[:, None, :, None] * d[None, :, None, :]).reshape(-1)
    a = got.nngp.permute(0, 1, 2, 4, 3, 5).reshape(-1)
    b = ref.nngp.permute(0, 1, 2, 4, 3, 5).reshape(-1)
    err = (a - b).abs() / (1e-2 * s)
    assert float(err.max()) < 4 and float(err.mean()) < 1, (float(err.max()), float(err.mean()))
    # the NTK, bounded by max |Θ| · √(E[φ'²] E[φ'²]) ≤ max |Θ|
    ea = (got.ntk - ref.ntk).abs() / (1e-2 * k.ntk.abs().amax())
    assert float(ea.max()) < 4 and float(ea.mean()) < 1


def test_deterministic_and_symmetric():
    x = _x(3, (2, 4, 4), 4)
    net = nk.serial(nk.Conv(4, (3, 3), padding="SAME"), MaxPool(2, activation=nk.Relu()))
    a, b = net.kernel_fn(x), net.kernel_fn(x)
    assert torch.equal(a.nngp, b.nngp) and torch.equal(a.ntk, b.ntk)
    assert torch.equal(a.nngp, a.nngp.permute(1, 0, 3, 2, 5, 4))  # swap (i, p) with (j, q): exactly symmetric
    # x2 given takes the other path (all pairs, no mirroring): the same kernel within the tolerance
    c = net.kernel_fn(x, x)
    assert float((c.nngp - a.nngp).abs().max() / a.nngp.abs().max()) < 2e-2


def test_tiled_equals_untiled():
    x1, x2 = _x(3, (2, 4, 4), 5), _x(2, (2, 4, 4), 6)
    net = nk.serial(nk.Conv(4, (3, 3), padding="SAME"), MaxPool(2, activation=nk.Relu()), nk.GlobalAvgPool())
    for b in (None, x2):
        whole, tiled = net.kernel_fn(x1, b), net.kernel_fn(x1, b, tile_size=1)
        for g in ("nngp", "ntk"):
            w, t = getattr(whole, g), getattr(tiled, g)
            assert float((w - t).abs().max() / w.abs().max()) < 1e-2, g


def test_float32_inputs_give_float32():
    x = _x(2, (2, 4, 4), 7).float()
    k = nk.serial(nk.Conv(4, (3, 3), padding="SAME"), MaxPool(2)).kernel_fn(x)
    assert k.nngp.dtype == torch.float32 and k.ntk.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------
def test_refuses_non_gaussian_input_and_says_fuse():
    x = _x(2, (2, 4, 4), 8)
    net = nk.serial(nk.Conv(4, (3, 3), padding="SAME"), nk.Relu(), MaxPool(2))
    with pytest.raises(LayerError, match="activation=Relu"):
        net.kernel_fn(x)
    with pytest.raises(LayerError, match="raw inputs"):
        nk.serial(MaxPool(2)).kernel_fn(x)


def test_refuses_non_monotone_activation():
    assert is_monotone(nk.Relu()) and is_monotone(nk.LeakyRelu(0.1)) and is_monotone(nk.Erf())
    assert is_monotone(nk.Elementwise(torch.tanh)) and not is_monotone(nk.Abs())
    assert not is_monotone(nk.Gelu()) and not is_monotone(nk.LeakyRelu(-0.5))
    with pytest.raises(LayerError, match="monotone"):
        MaxPool(2, activation=nk.Gelu())


def test_unreachable_tolerance_raises():
    x = _x(2, (2, 4, 4), 9)
    net = nk.serial(nk.Conv(4, (3, 3), padding="SAME"), MaxPool(2, rtol=1e-7, max_samples=64))
    with pytest.raises(LayerError, match="did not reach the requested tolerance"):
        net.kernel_fn(x, get="nngp")


def test_refuses_autograd():
    x = _x(2, (2, 4, 4), 10).requires_grad_(True)
    with pytest.raises(LayerError, match="no derivative"):
        nk.serial(nk.Conv(4, (3, 3), padding="SAME"), MaxPool(2)).kernel_fn(x, get="nngp")


# ---------------------------------------------------------------------------------------------------
# Monte Carlo against wide finite networks
# ---------------------------------------------------------------------------------------------------
MC_NETS = {
    # Conv -> ReLU -> MaxPool 2x2 (fused), a second conv block, global pooling
    "relu_2x2": (
        lambda o: nk.serial(
            nk.Conv(8, (3, 3), padding="SAME", b_std=0.2),
            MaxPool(2, activation=nk.Relu()),
            nk.Conv(8, (3, 3), padding="SAME"),
            nk.Relu(),
            nk.GlobalAvgPool(),
            nk.Dense(o),
        ),
        (2, 6, 6),
    ),
    # no activation, overlapping windows with padding and ceil_mode, 1-D
    "plain_1d": (
        lambda o: nk.serial(
            nk.Conv(8, (3,), padding="SAME", W_std=1.2),
            MaxPool(3, stride=2, padding=1, ceil_mode=True),
            nk.Conv(8, (2,), padding="SAME"),
            nk.Relu(),
            nk.GlobalAvgPool(),
            nk.Dense(o),
        ),
        (2, 8),
    ),
}


@pytest.mark.parametrize("name", sorted(MC_NETS))
def test_monte_carlo(name):
    make, shape = MC_NETS[name]
    x = _x(3, shape, 11)
    exact = make(1).kernel_fn(x)
    # NNGP: many readout units per network (forward passes only); NTK: one output (one backward pass each)
    for g, n, o in (("nngp", 128, 64), ("ntk", 64, 1)):
        mc = monte_carlo_kernel_fn(make(o), n_samples=n, width=64, seed=3, get=g, implementation="structured")
        s = mc.samples(x)[g].reshape(n, -1)
        mean, se = s.mean(0), s.std(0) / math.sqrt(n)
        e = getattr(exact, g).reshape(-1)
        err = float((mean - e).norm() / e.norm())
        noise = float(se.norm() / e.norm())
        assert err < 0.01 + 3 * noise, (g, err, noise)


def test_monte_carlo_has_power():
    """The same check rejects a max pool replaced by an average pool of the same windows (the kernel moves)."""
    make, shape = MC_NETS["relu_2x2"]
    net = make(64)
    x = _x(3, shape, 11)
    wrong = nk.serial(net.layers[0], nk.Relu(), nk.AvgPool((2, 2), (2, 2)), *net.layers[2:])
    s = monte_carlo_kernel_fn(net, n_samples=96, width=64, seed=3, get="nngp").samples(x)["nngp"].reshape(96, -1)
    e = wrong.kernel_fn(x, get="nngp").reshape(-1)
    err = float((s.mean(0) - e).norm() / e.norm())
    noise = float((s.std(0) / math.sqrt(96)).norm() / e.norm())
    assert err > 0.01 + 3 * noise, (err, noise)


@pytest.mark.parametrize("act", [None, "relu"])
def test_means_against_plain_monte_carlo(act):
    """``mean1 = E[φ(max u)]`` per output pixel (what a later FanInSum needs) against 2^18 plain Monte-Carlo
    samples of each window; 2-value windows: Clark's ``E[max(u1, u2)] = √(Var(u1 − u2)/(2π))`` exactly."""
    x = _x(2, (2, 4, 4), 12)
    k = _conv_record(x)
    layer = MaxPool(2, activation=None if act is None else nk.Relu())
    out = layer.kernel(k)
    assert out.mean_kind == "exact" and out.mean1.shape == (2, 2, 2) and out.mean2 is None
    c = k.cov1.permute(0, 1, 3, 2, 4).reshape(2, 16, 16)  # (N, pixel, pixel')
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        for p, (r, s) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            win = [4 * (2 * r + a) + 2 * s + b for a in (0, 1) for b in (0, 1)]
            cov = c[i][win][:, win]
            z = torch.randn(1 << 18, 4, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
            m = z.max(1).values
            m = m if act is None else m.clamp_min(0)
            se = float(m.std() / 512)
            assert abs(float(out.mean1[i].reshape(-1)[p]) - float(m.mean())) < 4 * se + 4 * 5e-3 * float(
                m.pow(2).mean().sqrt()
            )
    two = MaxPool((2, 1)).kernel(k)  # closed form
    full = k.cov1.permute(0, 1, 3, 2, 4).reshape(2, 4, 4, 4, 4)  # (N, h, w, h', w')
    t, b = full[:, 0::2, :, 0::2, :], full[:, 1::2, :, 1::2, :]
    tb = full[:, 0::2, :, 1::2, :]
    vd = torch.einsum("nhwhw->nhw", t) + torch.einsum("nhwhw->nhw", b) - 2 * torch.einsum("nhwhw->nhw", tb)
    assert torch.allclose(two.mean1, torch.sqrt(vd / (2 * math.pi)), rtol=1e-12, atol=0)


def test_chunking_does_not_change_the_kernel(monkeypatch):
    """Entries are estimated independently: tiny chunks (many passes of a few entries) give the same kernel up to
    float32 round-off of the samples."""
    import ntkit.layers.maxpool as mp

    x = _x(3, (2, 4, 4), 13)
    net = nk.serial(nk.Conv(4, (3, 3), padding="SAME"), MaxPool(2, activation=nk.Relu()))
    a = net.kernel_fn(x)
    monkeypatch.setattr(mp, "_CHUNK_EVALS", 1 << 10)
    b = net.kernel_fn(x)
    for g in ("nngp", "ntk", "cov1"):
        u, v = getattr(a, g), getattr(b, g)
        assert float((u - v).abs().max() / u.abs().max()) < 1e-5, g


@pytest.mark.parametrize("act", [None, "relu"])
def test_any_scale(act):
    """Identity/ReLU pools are homogeneous: inputs scaled by 1e±150 scale the kernels by 1e±300 (each entry runs
    on Σ/c with c a power of 2, so float32 samples neither overflow nor underflow), to float32 round-off."""
    x = _x(2, (2, 4, 4), 14)
    net = nk.serial(nk.Conv(4, (3, 3), padding="SAME"), MaxPool(2, activation=None if act is None else nk.Relu()))
    a = net.kernel_fn(x)
    for s in (1e-150, 1e150):
        b = net.kernel_fn(x * s)
        for g in ("nngp", "ntk"):
            u, v = getattr(a, g), getattr(b, g) / s**2
            assert float((u - v).abs().max() / u.abs().max()) < 1e-6, (s, g)
