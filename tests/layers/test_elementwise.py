"""The activation catalogue and LayerNorm: NT parity, closed forms against numerical integration, PSD-ness
and float32 behaviour.

Tolerances (float64 unless stated):
* NT parity, closed forms: 1e-10 relative (measured ≤ 1e-15). On the diagonal of ``kernel_fn(x1, None)``
  NT's own values carry round-off amplified through ``arccos`` at ``ρ = 1 − O(eps)`` (ntkit restores exact
  diagonals instead): measured 5e-9 for the ReLU family, 8.8e-5 for ``Sign``; we allow 1e-5, and 2e-4 for
  ``Sign``, whose diagonal we additionally check is exactly ``E[sign²] = 1`` propagated.
* NT parity, ``Elementwise(torch.tanh, deg=25)`` against NT's ``ElementwiseNumerical(tanh, deg=25)``: both
  carry the 25-node rule's error for tanh (~3e-4 per layer) in different directions; 1e-2 (measured 2.7e-3).
* Closed form vs quadrature: smooth activations against a 100×100-node Gauss–Hermite rule, 1e-12, looser
  where that rule's own error is larger (``SMOOTH``); piecewise-smooth homogeneous activations against an
  angular Gauss–Legendre integral split at the kinks, which is exact to round-off: 1e-11.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import REFERENCE_DIR, angular_expectation, derivative, load_reference, random_triples, rel_err
from nt_nets import ACTIVATIONS, FC_CASES, HERMITE_CASES, fc_net, hermite_net, parse_case

import ntkit as nk
from ntkit.layers.elementwise_poly import arccos_polynomials

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# 1. NT parity
# ---------------------------------------------------------------------------------------------------
def test_every_reference_fc_case_is_covered():
    path = REFERENCE_DIR / "cases.json"
    names = {n for n in json.loads(path.read_text()) if n.startswith("fc_")}
    assert names == set(FC_CASES) | set(HERMITE_CASES)


@pytest.mark.parametrize("case", FC_CASES)
def test_nt_parity(case):
    ref = load_reference(case)
    aname, param, b_std = parse_case(case)
    act = ACTIVATIONS[aname]()
    net = fc_net(act, b_std, param)
    x1, x2 = torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"])
    k12, k11 = net.kernel_fn(x1, x2), net.kernel_fn(x1)

    if aname.startswith("rectified_monomial"):
        # NT 0.6.5 returns NaN for this network: its J_n derivative divides by sin θ = 0 on the diagonal and
        # the NaN spreads to every entry through the second layer. Compare with the same network whose rule
        # is the independent angular quadrature instead (and with NT's finite one-layer values below).
        assert np.isnan(ref["nngp_12"]).all()
        n = act.degree
        twin = fc_net(
            nk.Elementwise(
                act.fn,
                nngp_fn=lambda q12, q11, q22: angular_expectation(act.fn, n, q12, q11, q22),
                d_nngp_fn=lambda q12, q11, q22: (
                    n * n * angular_expectation(nk.RectifiedMonomial(n - 1).fn, n - 1, q12, q11, q22)
                ),
            ),
            b_std,
            param,
        )
        for x2_ in (x2, None):
            k, t = net.kernel_fn(x1, x2_), twin.kernel_fn(x1, x2_)
            assert rel_err(k.nngp, t.nngp.numpy()) < 1e-11
            assert rel_err(k.ntk, t.ntk.numpy()) < 1e-11
        return

    # tanh by 25×25 Gauss–Hermite, in NT and here: both carry the rule's error (~3e-4 per layer for tanh, see
    # gauss_hermite_expectation), and ntkit orders the two variances differently (for exact symmetry), so
    # they agree only to that error: measured 2.7e-3 after two layers.
    tol = 1e-2 if aname == "elementwise_numerical_tanh" else 1e-10
    assert rel_err(k12.nngp, ref["nngp_12"]) < tol
    assert rel_err(k12.ntk, ref["ntk_12"]) < tol
    off = ~np.eye(len(x1), dtype=bool)
    diag_tol = 2e-4 if aname == "sign" else 1e-5
    for name in ("nngp", "ntk"):
        ours, theirs = getattr(k11, name).numpy(), ref[f"{name}_11"]
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs)[off].max() / scale < tol
        assert np.abs(np.diag(ours) - np.diag(theirs)).max() / scale < diag_tol
    if aname == "sign":  # E[sign(u)²] = 1 exactly, then the readout Dense(3, W_std=1, b_std)
        expect = 1.0 + (b_std or 0.0) ** 2
        np.testing.assert_allclose(np.diag(k11.nngp.numpy()), expect, rtol=1e-15)


# NT 0.6.5, serial(Dense(4, W_std=1.5, b_std=0.3), RectifiedMonomial(n)).kernel_fn(X1, X2): (nngp, ntk)
_RM_X1 = [[1.0, -0.5, 0.3], [0.2, 0.8, -1.1], [-0.7, 0.4, 0.9]]
_RM_X2 = [[0.5, 0.5, -0.5], [-1.2, 0.1, 0.6]]
_RM_NT = {
    0: (
        [
            [0.28126829491942146, 0.1542571584822958],
            [0.42284078952261733, 0.19217178125613957],
            [0.18286816975676914, 0.4218638314027607],
        ],
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
    ),
    1: (
        [
            [0.17835078029942997, 0.05528787808752327],
            [0.4446056984895829, 0.11886361847195628],
            [0.06185024972779748, 0.5855252643877326],
        ],
        [
            [0.04640926866170453, -0.10990822541863575],
            [0.3710427928060976, -0.10089018515947329],
            [-0.06583254111243692, 0.4872527252701881],
        ],
    ),
    2: (
        [
            [0.28158878778527663, 0.04801207438606096],
            [1.2607591504454652, 0.17916169865060033],
            [0.050897970201557334, 2.189685900123688],
        ],
        [
            [0.11771151499762376, -0.1575704525494413],
            [1.5605660016984368, -0.24961359879110825],
            [-0.08906435960802836, 2.7051267214713297],
        ],
    ),
    3: (
        [
            [0.7226059625050012, 0.06721594902698272],
            [5.911518572223753, 0.4361455807379276],
            [0.067614029048925, 13.538391377668813],
        ],
        [
            [0.41815934986113584, -0.30787742700061593],
            [9.956845390643048, -0.8465390261240865],
            [-0.1649094234530458, 22.761784931785783],
        ],
    ),
    4: (
        [
            [2.5763386150807848, 0.13029542996551313],
            [38.735611726914044, 1.4712807635477945],
            [0.12443977541385737, 116.97150037291554],
        ],
        [
            [1.9076797410132031, -0.7662618189076054],
            [82.99772075402137, -3.663622878198592],
            [-0.3894568073218075, 250.18947265931982],
        ],
    ),
}


@pytest.mark.parametrize("degree", sorted(_RM_NT))
def test_rectified_monomial_one_layer_matches_nt(degree):
    x1, x2 = torch.tensor(_RM_X1, dtype=F64), torch.tensor(_RM_X2, dtype=F64)
    k = nk.serial(nk.Dense(4, 1.5, 0.3), nk.RectifiedMonomial(degree)).kernel_fn(x1, x2)
    nngp, ntk = (np.array(a) for a in _RM_NT[degree])
    assert rel_err(k.nngp, nngp) < 1e-12
    if degree == 0:
        assert torch.equal(k.ntk, torch.zeros_like(k.ntk))
    else:
        assert rel_err(k.ntk, ntk) < 1e-12


@pytest.mark.parametrize("case", HERMITE_CASES)
def test_nt_parity_hermite(case):
    ref = load_reference(case)
    net = hermite_net(int(case[-1]))
    k = net.kernel_fn(torch.from_numpy(ref["x1"]), torch.from_numpy(ref["x2"]))
    assert rel_err(k.nngp, ref["nngp_12"]) < 1e-10
    assert rel_err(k.ntk, ref["ntk_12"]) < 1e-10


# NT 0.6.5: serial(Dense(8, 1.3, 0.2), LayerNorm(axis), Erf(), Dense(2, b_std=0.1)) on NHWC images
# x1 = sin(0.7 i + 0.3), x2 = cos(1.1 i − 0.2) (i = 0..11, shape (1, 2, 2, 3)); full (1, 1, 2, 2, 2, 2) kernels.
_LN_NT = {
    (1, 2, 3): (
        [
            0.12903944269667766,
            -0.011758139710030615,
            0.34170727530128603,
            -0.30199343795771816,
            0.005802978732124191,
            0.1102961582884234,
            0.3960151872542663,
            -0.3366459537469444,
            -0.32075064846797885,
            0.3368159343814616,
            0.1342520655247522,
            -0.017077787905209245,
            -0.2283041986168498,
            0.23120665401389337,
            0.010921687552788844,
            0.10516861649191309,
        ],
        [
            0.24948593344721437,
            -0.0335247553381751,
            0.7070949826661874,
            -0.6416227844920328,
            0.0016058966578109237,
            0.2114304346325721,
            0.8375119650918867,
            -0.7221682830082938,
            -0.6848676936210498,
            0.695729426771492,
            0.26010626552171073,
            -0.0441719165774283,
            -0.4784002259997682,
            0.46176786318959717,
            0.011843375749554201,
            0.20105255202001054,
        ],
    ),
    (3, 1): (
        [
            0.13242361885401285,
            -0.01236889834831309,
            0.35760360188467255,
            -0.31674606643037234,
            0.005703518416124663,
            0.11269479999372958,
            0.4132830676692933,
            -0.35169499845854396,
            -0.31310385324946505,
            0.3292696447404144,
            0.13152074541185643,
            -0.01648893689303627,
            -0.22200190655202198,
            0.2253977459839125,
            0.010897830403456198,
            0.10268862450395891,
        ],
        [
            0.2563789860127759,
            -0.03474700684898802,
            0.7444359657976476,
            -0.6755674891852872,
            0.001406971599561162,
            0.21628973687505512,
            0.8808493972618343,
            -0.7580878660179725,
            -0.6671413612225314,
            0.6783038346762077,
            0.2545392679583931,
            -0.042993171021379874,
            -0.46485094969401686,
            0.4494095930927733,
            0.011795661402165635,
            0.196037784773338,
        ],
    ),
}


class _FullSpatial(nk.Identity):
    """Identity that asks the network to track pixel-pixel covariances (the layout pooling needs)."""

    needs_full_spatial = True


@pytest.mark.parametrize("axis", sorted(_LN_NT), ids=str)
def test_layernorm_spatial_matches_nt(axis):
    """NT's axis (1, 2, 3) / (2, 3) in NHWC are ntkit's (1, 2, 3) / (3, 1) in NCHW."""
    x1 = torch.sin(0.7 * torch.arange(12, dtype=F64) + 0.3).reshape(1, 2, 2, 3).permute(0, 3, 1, 2)
    x2 = torch.cos(1.1 * torch.arange(12, dtype=F64) - 0.2).reshape(1, 2, 2, 3).permute(0, 3, 1, 2)
    layers = [nk.Dense(8, 1.3, 0.2), nk.LayerNorm(axis=axis), nk.Erf(), nk.Dense(2, b_std=0.1)]
    full = nk.serial(*layers, _FullSpatial()).kernel_fn(x1, x2)
    diag = nk.serial(*layers).kernel_fn(x1, x2)
    for i, name in enumerate(("nngp", "ntk")):
        ref = np.array(_LN_NT[axis][i]).reshape(1, 1, 2, 2, 2, 2)
        assert rel_err(getattr(full, name), ref) < 1e-12
        assert rel_err(getattr(diag, name), np.einsum("ijaabb->ijab", ref)) < 1e-12


# ---------------------------------------------------------------------------------------------------
# 2. closed forms against numerical integration
# ---------------------------------------------------------------------------------------------------
# name: (layer, tolerance). The tolerance is set by the 100-node rule's own error, measured: ≤ 1e-15 for most;
# erf(x) (b = 1: poles near the real axis) 1.5e-10; the narrow bump exp(−x²) 9e-9 for K̇ at variance 2.
SMOOTH = {
    "erf": (lambda: nk.Erf(), 1e-9),
    "erf_abc": (lambda: nk.Erf(2.0, 0.5, 0.3), 1e-12),
    "sigmoid_like": (lambda: nk.Sigmoid_like(), 1e-12),
    "gelu": (lambda: nk.Gelu(), 1e-12),
    "sin": (lambda: nk.Sin(), 1e-12),
    "sin_abc": (lambda: nk.Sin(2.0, 0.7, 0.4), 1e-12),
    "cos": (lambda: nk.Cos(), 1e-12),
    "cos_abc": (lambda: nk.Cos(1.5, 0.8, -0.3), 1e-12),
    "rbf": (lambda: nk.Rbf(0.5), 1e-12),
    "rbf_1": (lambda: nk.Rbf(), 1e-12),
    "gaussian": (lambda: nk.Gaussian(), 3e-8),
    "gaussian_ab": (lambda: nk.Gaussian(0.7, -0.4), 1e-12),
    "gaussian_pos_b": (lambda: nk.Gaussian(1.0, 0.05), 1e-12),
    "exp": (lambda: nk.Exp(1.0, 0.5), 1e-12),
    "exp_ab": (lambda: nk.Exp(0.5, -0.8), 1e-12),
    "monomial_0": (lambda: nk.Monomial(0), 1e-12),
    "monomial_1": (lambda: nk.Monomial(1), 1e-12),
    "monomial_2": (lambda: nk.Monomial(2), 1e-12),
    "monomial_5": (lambda: nk.Monomial(5), 1e-12),
    "polynomial": (lambda: nk.Polynomial([0.5, -1.0, 0.25]), 1e-12),
    "polynomial_6": (lambda: nk.Polynomial([0.3, -0.2, 0.5, 0.1, -0.25, 0.05, 0.02]), 1e-12),
}
HOMOGENEOUS = {  # name: (layer, degree of homogeneity)
    "relu": (lambda: nk.Relu(), 1),
    "leaky_relu": (lambda: nk.LeakyRelu(0.1), 1),
    "abrelu": (lambda: nk.ABRelu(-0.5, 1.5), 1),
    "abs": (lambda: nk.Abs(), 1),
    "sign": (lambda: nk.Sign(), 0),
    **{f"rectified_monomial_{n}": ((lambda n=n: nk.RectifiedMonomial(n)), n) for n in range(5)},
}


@pytest.mark.parametrize("name", SMOOTH)
def test_closed_form_vs_gauss_hermite(name):
    make, tol = SMOOTH[name]
    act = make()
    quad = nk.Elementwise(act.fn, deg=100)
    q12, q11, q22 = random_triples(24)
    nngp, dot = act.rule(q12, q11, q22, True)
    assert rel_err(nngp, quad.nngp_fn(q12, q11, q22).numpy()) < tol
    expect = quad.d_nngp_fn(q12, q11, q22)
    if name == "monomial_0":
        assert torch.equal(dot, expect) and not dot.any()
    else:
        assert rel_err(dot, expect.numpy()) < tol
    assert rel_err(act.var_fn(q11), quad.var_fn(q11).numpy()) < tol
    assert rel_err(act.var_fn(q11), act.nngp_fn(q11, q11, q11).numpy()) < 1e-12


@pytest.mark.parametrize("name", HOMOGENEOUS)
def test_closed_form_vs_angular_integral(name):
    make, n = HOMOGENEOUS[name]
    act = make()
    q12, q11, q22 = random_triples()
    nngp, dot = act.rule(q12, q11, q22, True)
    assert rel_err(nngp, angular_expectation(act.fn, n, q12, q11, q22).numpy()) < 1e-11
    if n == 0:
        # sign and the step: φ' = 0 almost everywhere — NT's convention and what autograd gives the finite
        # net. (The distributional derivative would be a delta; no quadrature of φ' can see it.)
        assert torch.equal(dot, torch.zeros_like(dot))
    else:
        expect = angular_expectation(derivative(act.fn), n - 1, q12, q11, q22)
        assert rel_err(dot, expect.numpy()) < 1e-11
    assert rel_err(act.var_fn(q11), angular_expectation(act.fn, n, q11, q11, q11).numpy()) < 1e-11


@pytest.mark.parametrize("degree", range(5))
def test_hermite_vs_gauss_hermite(degree):
    """Hermite's kernel holds at unit variance only (its precondition)."""
    act = nk.Hermite(degree)
    q12 = random_triples()[0].clamp(-1, 1)
    one = torch.ones_like(q12)
    nngp, dot = act.rule(q12, one, one, True)
    quad = nk.Elementwise(act.fn, deg=40)
    assert rel_err(nngp, quad.nngp_fn(q12, one, one).numpy()) < 1e-12
    if degree:
        assert rel_err(dot, quad.d_nngp_fn(q12, one, one).numpy()) < 1e-12
    else:
        assert not dot.any()
    assert rel_err(act.var_fn(one), quad.var_fn(one).numpy()) < 1e-12


@pytest.mark.parametrize("gamma,shift", [(1.0, -1.0), (0.5, -0.5), (2.0, 0.3)])
def test_exp_normalized_vs_its_unit_feature(gamma, shift):
    """K' = √(q11 q22)·E[g(z) g(z')] at correlation ρ, with g the twin's unit-variance feature."""
    act = nk.ExpNormalized(gamma, shift)
    q12, q11, q22 = random_triples()
    prod = torch.sqrt(q11 * q22)
    rho, one = q12 / prod, torch.ones_like(q12)
    quad = nk.Elementwise(act.unit_fn, deg=100)
    nngp, dot = act.rule(q12, q11, q22, True)
    assert rel_err(nngp, (prod * quad.nngp_fn(rho, one, one)).numpy()) < 1e-9
    assert rel_err(dot, quad.d_nngp_fn(rho, one, one).numpy()) < 1e-9


def test_exp_normalized_twin_normalises_per_sample():
    act = nk.ExpNormalized(0.7, -0.2)
    x = torch.randn(3, 50, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x[1] = 0
    r = torch.sqrt((x * x).mean(1, keepdim=True))
    y = act.fn(x)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert rel_err(y[[0, 2]], (r * act.unit_fn(x / r))[[0, 2]].numpy()) < 1e-14


def test_gelu_tanh_has_the_exact_kernel():
    x = torch.linspace(-8, 8, 20001, dtype=F64)
    gap = (nk.Gelu(True).fn(x) - nk.Gelu(False).fn(x)).abs().max()
    assert 1e-4 < gap < 5e-4  # the finite functions differ (documented bound) ...
    q12, q11, q22 = random_triples()
    for a, b in zip(nk.Gelu(True).rule(q12, q11, q22, True), nk.Gelu(False).rule(q12, q11, q22, True)):
        assert torch.equal(a, b)  # ... the kernels do not


def test_arccos_polynomials():
    assert arccos_polynomials(0) == ([0], [1])
    assert arccos_polynomials(1) == ([1, 0], [0, 1])  # sin θ + (π − θ) cos θ
    assert arccos_polynomials(2) == ([0, 3, 0], [1, 0, 2])  # 3 sin θ cos θ + (π − θ)(1 + 2 cos² θ)
    for n in range(8):  # J_n(0) = π·(2n − 1)!!: Q_n(1) = (2n − 1)!!
        assert sum(arccos_polynomials(n)[1]) == math.prod(range(2 * n - 1, 0, -2))


# ---------------------------------------------------------------------------------------------------
# 3. symmetric and PSD for x2 = None;  4. float32
# ---------------------------------------------------------------------------------------------------
ALL = {**ACTIVATIONS, "hermite_3": lambda: nk.Hermite(3), "rectified_monomial_0": lambda: nk.RectifiedMonomial(0)}


def net_for(name, b_std=None):
    act = ALL[name]()
    if isinstance(act, nk.Hermite):
        return nk.serial(
            nk.Dense(64, 1.5, b_std),
            nk.LayerNorm(),
            act,
            nk.Dense(64, 1.2, b_std),
            nk.LayerNorm(),
            act,
            nk.Dense(3, 1.0, b_std),
        )
    return fc_net(act, b_std, "ntk")


def inputs(dtype=F64, zero_row=True):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(14, 7, generator=g, dtype=F64)
    x[4], x[9] = x[1], x[1]  # duplicates
    if zero_row:
        x[6] = 0
    return x.to(dtype)


@pytest.mark.parametrize("name", ALL)
def test_symmetric_psd(name):
    k = net_for(name, 0.3).kernel_fn(inputs())
    for t in (k.nngp, k.ntk):
        assert torch.equal(t, t.T)
        eig = torch.linalg.eigvalsh(t)
        assert eig.min() >= -1e-10 * t.trace()


@pytest.mark.parametrize("b_std", [None, 0.3])
@pytest.mark.parametrize("name", ALL)
def test_float32(name, b_std):
    """float32 in, float32 out, within 1e-4 of float64 (measured ≤ 2e-6), no NaN — with duplicated rows (whose
    correlations are 1 up to round-off) and a zero row (variance 0 when there is no bias)."""
    net = net_for(name, b_std)
    zero_row = not (name.startswith("hermite") and b_std is None)  # a zero row cannot be normalised
    x = inputs(zero_row=zero_row)
    x2 = torch.cat([x[:5], x[:3] + 0.5])
    for a, b in ((x, None), (x, x2)):
        k64 = net.kernel_fn(a, b)
        k32 = net.kernel_fn(a.float(), None if b is None else b.float())
        for t32, t64 in ((k32.nngp, k64.nngp), (k32.ntk, k64.ntk)):
            assert t32.dtype == torch.float32 and bool(torch.isfinite(t32).all())
            assert rel_err(t32.double(), t64.numpy()) < 1e-4


@pytest.mark.parametrize("name", ALL)
def test_spatial_layouts_agree(name):
    """On images (Dense acting per pixel), the full pixel-pixel layout's pixel diagonal equals the diagonal
    layout, and both equal the fully-connected kernel of each pixel's channel vector."""
    act = ALL[name]()
    pre = [nk.LayerNorm()] if isinstance(act, nk.Hermite) else []
    layers = [nk.Dense(8, 1.5, 0.3), *pre, act, nk.Dense(4, 1.2, 0.3), *pre, act, nk.Dense(2, 1.0, 0.3)]
    x = torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    x2 = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    for b in (None, x2):
        full = nk.serial(*layers, _FullSpatial()).kernel_fn(x, b)
        diag = nk.serial(*layers).kernel_fn(x, b)
        for t in ("nngp", "ntk"):
            f, d = getattr(full, t), getattr(diag, t)
            assert rel_err(torch.einsum("ijaabb->ijab", f), d.numpy()) < 1e-13
        fc = nk.serial(*layers).kernel_fn(x[:, :, 1, 2], None if b is None else b[:, :, 1, 2])
        assert rel_err(diag.ntk[:, :, 1, 2], fc.ntk.numpy()) < 1e-13


# ---------------------------------------------------------------------------------------------------
# errors and LayerNorm's finite twin
# ---------------------------------------------------------------------------------------------------
def test_hermite_needs_unit_variance():
    x = inputs(zero_row=False)
    with pytest.raises(nk.LayerError, match="LayerNorm"):
        nk.serial(nk.Dense(8, 1.5), nk.Hermite(2)).kernel_fn(x)
    with pytest.raises(nk.LayerError, match="zero input row"):
        nk.serial(nk.Dense(8), nk.LayerNorm(), nk.Hermite(2)).kernel_fn(inputs())
    nk.serial(nk.Dense(8, 1.5), nk.LayerNorm(), nk.Hermite(2)).kernel_fn(x)  # the fix works


def test_layernorm_errors():
    x = inputs()
    for bad in (nk.LayerNorm(axis=0), nk.LayerNorm(axis=(1, 0))):
        with pytest.raises(nk.LayerError, match="batch axis"):
            nk.serial(nk.Dense(8), bad).kernel_fn(x)
    with pytest.raises(nk.LayerError, match="channel axis 1"):
        nk.serial(nk.Dense(8), nk.LayerNorm(axis=-1)).kernel_fn(x.reshape(14, 7, 1))
    with pytest.raises(nk.LayerError, match="out of range"):
        nk.serial(nk.Dense(8), nk.LayerNorm(axis=(1, 3))).kernel_fn(x)
    with pytest.raises(nk.LayerError, match="Dense or Conv"):
        nk.serial(nk.LayerNorm()).kernel_fn(x)
    with pytest.raises(nk.LayerError, match="Dense or Conv"):
        nk.serial(nk.Dense(8), nk.Relu(), nk.LayerNorm()).kernel_fn(x)
    with pytest.raises(ValueError, match="eps"):
        nk.LayerNorm(eps=-1.0)


@pytest.mark.parametrize("axis", [1, (1, 2, 3), (3, 1)], ids=str)
def test_layernorm_twin(axis):
    """NT's finite LayerNorm: (x − mean)/√(eps + var) over ``axis`` of each sample; a zero sample stays 0."""
    net = nk.serial(nk.Dense(16, b_std=0.5), nk.LayerNorm(axis=axis, eps=1e-6))
    x = torch.randn(4, 3, 5, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    m = net.module((3, 5, 2), seed=0).double()
    h = m[0](x)
    dims = (1,) if axis == 1 else tuple(sorted(axis))
    mean, var = h.mean(dims, keepdim=True), h.var(dims, keepdim=True, unbiased=False)
    assert rel_err(m(x), ((h - mean) / torch.sqrt(var + 1e-6)).detach().numpy()) < 1e-13
    zero = nk.serial(nk.LayerNorm(eps=0.0)).build((3,), None, torch.Generator(), True)[0]
    assert torch.equal(zero(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_invalid_parameters():
    for make in (
        lambda: nk.Monomial(-1),
        lambda: nk.RectifiedMonomial(1.5),
        lambda: nk.Hermite(-2),
        lambda: nk.Rbf(-1.0),
        lambda: nk.ExpNormalized(gamma=-1.0),
        lambda: nk.Polynomial([1.0, math.nan]),
    ):
        with pytest.raises(ValueError):
            make()
    x = inputs(zero_row=False)
    with pytest.raises(nk.LayerError, match="infinite"):  # E[exp(b u²)²] diverges once 4 b q >= 1
        nk.serial(nk.Dense(8, 3.0), nk.Gaussian(1.0, 0.5)).kernel_fn(x)
    with pytest.raises(nk.LayerError, match="overflows"):
        nk.serial(nk.Dense(8, 30.0), nk.Exp(1.0, 1.0)).kernel_fn(x.float())


# ---------------------------------------------------------------------------------------------------
# issue #16, item 5: the ReLU family on nearly parallel (and anti-parallel) inputs
# ---------------------------------------------------------------------------------------------------
def _relu_exact(rho, a=0.0, b=1.0):
    """40-digit ``(K'/√(q11 q22), K̇)`` of ``ABRelu(a, b)`` at correlation ``rho`` (Cho & Saul 2009)."""
    import mpmath

    with mpmath.workdps(40):
        a, b = mpmath.mpf(a), mpmath.mpf(b)
        th = mpmath.acos(mpmath.mpf(rho))
        j1 = mpmath.sin(th) + (mpmath.pi - th) * mpmath.cos(th)
        j2 = mpmath.sin(th) - th * mpmath.cos(th)
        k = ((a * a + b * b) * j1 - 2 * a * b * j2) / (2 * mpmath.pi)
        kd = ((a * a + b * b) * (mpmath.pi - th) + 2 * a * b * th) / (2 * mpmath.pi)
        return k, kd


@pytest.mark.parametrize("layer", [nk.Relu(), nk.LeakyRelu(0.1), nk.Abs()], ids=repr)
@pytest.mark.parametrize("q", [1.0, 0.5, 4.0])
def test_relu_family_exact_at_every_angle(layer, q):
    """θ from 1e-7 to π on correlations that are exact in float64 (``q12 = q·fl(cos θ)`` with ``q`` a power of 2):
    K̇ within 1e-11 of the 40-digit value entry by entry, K' within 1e-11·√(q11 q22). Before the fix every
    correlation was scaled by (1 + 16 eps) so that one clamp also snapped |ρ| ≥ 1 − 16 eps: 1.5e-8 on K̇ at
    θ ≈ 1e-7 (7e-9 on a network's NTK), against 2e-15 through RectifiedMonomial(1)."""
    theta = torch.logspace(-7, math.log10(math.pi), 300, dtype=F64)
    rho = torch.cos(theta)
    qq = torch.full_like(rho, q)
    k, kd = layer.rule(q * rho, qq, qq, True)
    worst_k = worst_kd = 0.0
    for i in range(len(rho)):
        ek, ekd = _relu_exact(float(rho[i]), layer.a, layer.b)
        worst_k = max(worst_k, abs(float(k[i]) / q - float(ek)))
        worst_kd = max(worst_kd, abs(float(kd[i]) - float(ekd)) / max(abs(float(ekd)), 1e-300 if ekd else 1.0))
    assert worst_k < 1e-11 and worst_kd < 1e-11, (worst_k, worst_kd)


def test_relu_snaps_only_within_16_ulps_of_one():
    """|ρ| ≥ 1 − 16 eps is ±1 exactly (duplicated inputs: θ = 0, K̇ = 1/2; anti-parallel: θ = π, K̇ = 0); one
    ulp further in, nothing moves."""
    eps = torch.finfo(F64).eps
    one = torch.ones(6, dtype=F64)
    rho = torch.tensor([1.0, 1 - 16 * eps, 1 - 18 * eps, -1.0, -1 + 16 * eps, -1 + 18 * eps], dtype=F64)
    _, kd = nk.Relu().rule(rho, one, one, True)
    assert kd[0] == kd[1] == 0.5 and kd[3] == kd[4] == 0.0
    for i in (2, 5):
        assert abs(float(kd[i]) - float(_relu_exact(float(rho[i]))[1])) < 1e-12 * max(float(kd[i]), 1e-8)


def test_relu_network_ntk_on_nearly_parallel_inputs():
    """The issue's measurement: ``serial(Dense, Relu, Dense)`` on ``(1, 0)`` and ``(cos θ, sin θ)`` (the Dense's
    covariances are exact: ``q = 1/2``) against a 40-digit evaluation of the same network; Relu within 3e-11 of
    it from θ = 1e-7 to 1e-3 (was 7.7e-9), as RectifiedMonomial(1)."""
    import mpmath

    worst = {"relu": 0.0, "rm1": 0.0}
    for th in (1e-7, 2e-7, 5e-7, 1e-6, 1e-5, 1e-4, 1e-3):
        x1 = torch.tensor([[1.0, 0.0]], dtype=F64)
        x2 = torch.tensor([[math.cos(th), math.sin(th)]], dtype=F64)
        with mpmath.workdps(40):
            X1, X2 = [mpmath.mpf(float(v)) for v in x1[0]], [mpmath.mpf(float(v)) for v in x2[0]]
            q12 = (X1[0] * X2[0] + X1[1] * X2[1]) / 2
            q22 = (X2[0] ** 2 + X2[1] ** 2) / 2
            q11 = mpmath.mpf(1) / 2
            rho = q12 / mpmath.sqrt(q11 * q22)
            ek, ekd = _relu_exact(rho)
            nngp = mpmath.mpf("1.44") * mpmath.sqrt(q11 * q22) * ek + mpmath.mpf("0.01")
            ntk = nngp + mpmath.mpf("1.44") * q12 * ekd
        for name, act in (("relu", nk.Relu()), ("rm1", nk.RectifiedMonomial(1))):
            k = nk.serial(nk.Dense(4), act, nk.Dense(1, 1.2, 0.1)).kernel_fn(x1, x2)
            worst[name] = max(worst[name], float(abs(mpmath.mpf(float(k.ntk)) - ntk) / ntk))
    assert worst["relu"] < 3e-11, worst
