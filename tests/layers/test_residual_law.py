"""The residual-stream rule (ntkit.layers.residual_law): a nonlinearity applied to a non-Gaussian sum
``g + φ0(z)`` (post-activation residual blocks). Its pieces against independent high-accuracy references
(mpmath for Φ₂, an independent Cartesian quadrature for the 2-level law), and the whole rule against Monte Carlo
of wide finite networks."""

from __future__ import annotations

import itertools
import math

import mpmath
import pytest
import torch
from helpers import rel_err

import ntkit as nt
from ntkit.layers import residual_law as rl
from ntkit.layers.base import LayerError

F64 = torch.float64


def _t(v):
    return torch.tensor(v, dtype=F64)


def _bvn_ref(h, k, r):
    """P(X > h, Y > k) to 30 digits: ∫_h^∞ φ(x) Φ((ρx − k)/s) dx, split around the step at x = k/ρ."""
    mpmath.mp.dps = 30
    h, k, r = mpmath.mpf(h), mpmath.mpf(k), mpmath.mpf(r)
    if abs(r) == 1:
        return mpmath.ncdf(-max(h, k)) if r == 1 else max(mpmath.mpf(0), mpmath.ncdf(-k) - mpmath.ncdf(h))
    s = mpmath.sqrt(1 - r * r)
    pts = [h]
    if r and k / r > h:
        pts += [q for d in (50 * s, 5 * s, s, s / 5) for q in (k / r - d, k / r + d) if q > h]
    pts = sorted(set(pts)) + [mpmath.inf]
    return mpmath.quad(lambda x: mpmath.npdf(x) * mpmath.ncdf((r * x - k) / s), pts)


def test_bvn_against_mpmath():
    hs, rs = [-5, -0.3, 0.7, 3], [-1, -0.999999, -0.93, -0.5, 0.8, 0.93, 0.9999, 1]
    cases = [c for i, c in enumerate(itertools.product(hs, hs, rs)) if i % 3 == 0]
    # and both branches beside their split |ρ| = 0.75, where the 6-node rules are least accurate
    cases += list(itertools.product([-0.8, -0.5], [0.4], [-0.76, -0.7499, 0.7499, 0.75, 0.76]))
    ref = _t([float(_bvn_ref(*c)) for c in cases])
    h, k, r = (_t([c[i] for c in cases]) for i in range(3))
    err = (rl.bvn_upper(h, k, r) - ref).abs().max()
    print(f"bvn_upper vs mpmath: {float(err):.2e}")
    assert err < 1e-8  # 6-node rules: measured 5.7e-9 (at ρ = 0.75); 5 nodes would be 5e-8


def test_bvn_node_count_on_a_grid(monkeypatch):
    # the bound of bvn_upper's docstring on a grid of h, k ∈ [−8, 8] (step 0.5) × ρ ∈ (−1, 1) (step 0.01)
    # against the same formulas with 24 nodes; 5 nodes exceed it (the bound is sharp enough to fail); and the
    # bound of the rule's own Φ₂ (_RULE_BVN_NODES, 1e-6), which 3 nodes exceed
    h = torch.arange(-8.0, 8.001, 0.5, dtype=F64)
    H, K, P = torch.meshgrid(h, h, torch.arange(-0.995, 0.996, 0.01, dtype=F64), indexing="ij")
    errs, shipped, rule = {}, rl._BVN_NODES, rl._RULE_BVN_NODES
    assert (shipped, rule) == (6, 4)
    monkeypatch.setattr(rl, "_BVN_NODES", 24)
    ref = rl.bvn_upper(H, K, P)
    for n in (3, rule, 5, shipped):
        monkeypatch.setattr(rl, "_BVN_NODES", n)
        errs[n] = float((rl.bvn_upper(H, K, P) - ref).abs().max())
    print(f"bvn_upper vs 24 nodes on the grid: {errs}")
    assert errs[shipped] < 1e-8 < errs[5]
    assert errs[rule] < 1e-6 < errs[3]


def test_bvn_rows_match_broadcast():
    """The row-wise evaluation (one correlation per row, as the rule calls it) equals the elementwise one."""
    g = torch.Generator().manual_seed(3)
    h, k = torch.randn(7, 40, generator=g, dtype=F64) * 2, torch.randn(7, 40, generator=g, dtype=F64) * 2
    rho = _t([-1.0, -0.9, -0.75, -0.3, 0.5, 0.7499, 0.99])
    rows = rl._bvn_rows(h, k, rho, rl._Q(h), rl._Q(k))
    assert torch.allclose(rows, rl.bvn_upper(h, k, rho[:, None]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [3, 4, 6, 8, 12, 24])
def test_radial_rules_are_gauss(n):
    """The radial rules integrate ``R^m`` against their weights exactly for ``m < 2n`` (Gauss):
    ``∫ R^m R e^{−R²/2} dR = 2^{m/2} Γ(m/2 + 1)``, ``∫ R^m √(2/π) e^{−R²/2} dR = 2^{m/2} Γ((m+1)/2)/√π``."""
    import numpy as np

    worst = 0.0
    for rule, moment in (
        (rl._radial, lambda m: 2 ** (m / 2) * math.gamma(m / 2 + 1)),
        (rl._half, lambda m: 2 ** (m / 2) * math.gamma((m + 1) / 2) / math.sqrt(math.pi)),
    ):
        x, w = rule(n)
        for m in range(2 * n):
            worst = max(worst, abs(float(np.sum(w * x**m)) / moment(m) - 1))
    print(f"worst relative moment error {worst:.1e}")
    assert worst < 1e-12  # measured 1.1e-13


def test_relu_pair_against_quadrature():
    """E[relu(g+r1) relu(g'+r2)] and P(g+r1>0, g'+r2>0) against scipy's 1-D integral of the conditional law."""
    from scipy import integrate, stats

    for r1, r2, s1, s2, rho in [(0.3, -0.2, 1.0, 0.7, 0.5), (1.5, 0.1, 0.4, 1.2, -0.8), (0.0, 0.0, 1.0, 1.0, 0.97)]:
        sd = s2 * math.sqrt(1 - rho * rho)

        def cond(x, power):
            m = r2 + rho * s2 * x  # g' | g = s1 x
            e = m * stats.norm.cdf(m / sd) + sd * stats.norm.pdf(m / sd) if power else stats.norm.cdf(m / sd)
            return (s1 * x + r1 if power else 1.0) * e * stats.norm.pdf(x)

        lo = -r1 / s1
        f_ref = integrate.quad(lambda x: cond(x, 1), lo, 12, epsabs=1e-13, epsrel=1e-12)[0]
        p_ref = integrate.quad(lambda x: cond(x, 0), lo, 12, epsabs=1e-13, epsrel=1e-12)[0]
        f, p, *_ = rl._relu_pair(_t(r1), _t(r2), _t(s1), _t(s2), _t(rho))
        assert abs(float(f) - f_ref) < 1e-9 and abs(float(p) - p_ref) < 1e-9


def _leg(n, lo, hi):
    """Gauss–Legendre nodes and weights on ``[lo, hi]`` (broadcast tensors)."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    x, w = torch.as_tensor((x + 1) / 2, dtype=F64), torch.as_tensor(w / 2, dtype=F64)
    return lo[..., None] + (hi - lo)[..., None] * x, (hi - lo)[..., None] * w


def _gauss_split(cov, m1, m2, n, slope_neg, width=9.0):
    """Nodes of ``ABRelu(slope_neg, 1)`` applied to ``N((m1, m2), cov)`` (``m`` broadcast) and their weights:
    Cholesky coordinates ``u, v`` by Gauss–Legendre on ``[−9, 9]`` split at ``u = −m1/σ1`` and, per ``u``, at the
    ``v`` where the second coordinate is 0."""
    c12, c11, c22 = cov
    s1, s2 = math.sqrt(c11), math.sqrt(c22)
    rho = c12 / (s1 * s2)
    s = math.sqrt(1 - rho * rho)
    phi = lambda t: torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    act = lambda t: torch.where(t > 0, t, slope_neg * t)
    cut = (-m1 / s1).clamp(-width, width)
    outs = []
    for lo, hi in ((torch.full_like(cut, -width), cut), (cut, torch.full_like(cut, width))):
        u, wu = _leg(n, lo, hi)
        vc = ((-m2[..., None] / s2 - rho * u) / s).clamp(-width, width)
        for vlo, vhi in ((torch.full_like(vc, -width), vc), (vc, torch.full_like(vc, width))):
            v, wv = _leg(n, vlo, vhi)
            h1 = (m1[..., None] + s1 * u)[..., None].expand_as(v)
            h2 = m2[..., None, None] + s2 * (rho * u[..., None] + s * v)
            outs.append((act(h1), act(h2), (wu * phi(u))[..., None] * wv * phi(v)))
    return [torch.cat([o[i].flatten(-2) for o in outs], -1) for i in range(3)]


def _cartesian_reference(lv0, lvg, slope_neg=0.0, n=48):
    """``(E[φ(h) φ(h')], E[φ'(h)φ'(h')], E[φ'(h)φ'(h') φ0'(z)φ0'(z')])``, ``h = g + φ0(z)`` (φ = relu, φ0 =
    ABRelu(slope_neg, 1)) by an independent rule: ``(z, z')`` by :func:`_gauss_split` (Gauss–Legendre in Cholesky
    coordinates, split at both kinks); the last level by the closed form (tested above)."""
    zero = torch.zeros((), dtype=F64)
    r1, r2, w = _gauss_split(lv0, zero, zero, n, slope_neg)
    g12, g11, g22 = (_t(c) for c in lvg)
    f, p, *_ = rl._relu_pair(r1, r2, g11.sqrt(), g22.sqrt(), g12 / (g11 * g22).sqrt())
    d = torch.where(r1 > 0, 1.0, slope_neg) * torch.where(r2 > 0, 1.0, slope_neg)  # φ0'(z)φ0'(z'): r > 0 iff z > 0
    return tuple(float((t * w).sum()) for t in (f, p, p * d))


CASES = [  # (level-0 covariance (q12, q11, q22), Gaussian branch's)
    ((0.3, 1.0, 0.8), (0.2, 0.5, 0.6)),
    ((0.95, 1.0, 1.0), (0.45, 0.5, 0.5)),
    ((-0.4, 1.2, 0.7), (0.05, 0.3, 0.2)),
    ((0.99, 1.0, 1.0), (0.0, 0.4, 0.4)),
    ((0.6, 1.0, 0.9), (0.099, 0.1, 0.1)),  # a Gaussian branch ten times smaller than the skip (ρ_g = 0.99)
]


@pytest.mark.parametrize("need_dot", [True, False])
@pytest.mark.parametrize("slope_neg", [0.0, 0.1])
def test_pair_rule_against_independent_quadrature(slope_neg, need_dot):
    """The rule with its error control (tolerance 1e-3 of √(E[φ(h)²]E[φ(h')²])) against the Cartesian rule, itself
    converged to ~1e-9 (48 → 64 nodes), on both ladders (with the NTK's path weights, and the NNGP's alone): the
    rule's error is far inside its tolerance (measured: 1.0e-5 on the first ladder, 7.5e-5 on the second)."""
    lv0 = tuple(_t([c[0][i] for c in CASES]) for i in range(3))
    lvg = tuple(_t([c[1][i] for c in CASES]) for i in range(3))
    prefix = (rl.Apply(nt.LeakyRelu(slope_neg) if slope_neg else nt.Relu()),)
    got, dot = rl.pair_expectations((lv0, lvg), (prefix,), (0.0, 1.0), need_dot)
    refs = [_cartesian_reference(c[0], c[1], slope_neg) for c in CASES]
    ref = _t([r[0] for r in refs])
    scale = rl._pair_scale((lv0, lvg), (prefix,), (0.0, 1.0))
    err = ((got - ref).abs() / scale).max()
    assert (dot is not None) == need_dot
    # the NTK's path weights (P_0, P_1) = (E[φ'φ' φ0'φ0'], E[φ'φ'])
    err_dot = max((float((d - _t([r[2 - i] for r in refs])).abs().max()) for i, d in enumerate(dot or ())), default=0)
    print(f"max error / scale {float(err):.2e}, path weights {err_dot:.2e}")
    assert err < 2e-4 and err_dot < rl.TOL
    assert all(bool(((d >= 0) & (d <= 1)).all()) for d in dot or ())


def test_single_rule_is_exact_on_the_diagonal():
    """E[relu(h)] and E[relu(h)²] by the 1-D rule against scipy's nested adaptive quadrature."""
    from scipy import integrate, stats

    q0, qg = 0.8, 0.3
    sg = math.sqrt(qg)

    def inner(z, power):  # E_g[relu(g + relu(z))^power], closed-form-free
        r = max(z, 0.0)
        return integrate.quad(lambda g: (g + r) ** power * stats.norm.pdf(g, 0, sg), -r, 12, epsabs=1e-14)[0]

    for power, idx in ((1, 0), (2, 1)):
        f = lambda z: inner(z, power) * stats.norm.pdf(z, 0, math.sqrt(q0))
        ref = integrate.quad(f, -10, 0, epsabs=1e-13)[0] + integrate.quad(f, 0, 10, epsabs=1e-13)[0]
        got = rl.single_expectations((_t(q0), _t(qg)), ((rl.Apply(nt.Relu()),),), (0.0, 1.0))[idx]
        assert abs(float(got) - ref) < 1e-10


# ---------------------------------------------------------------------------------------------------
# three levels (two post-activation blocks in a row): the rule against a 4-D nested quadrature
# ---------------------------------------------------------------------------------------------------
def _nested_reference(c0, c1, c2, n=20, slope_neg=0.0):
    """``(E[relu(h2) relu(h2')], P_2, P_1, P_0)`` for ``h2 = g2 + φ(g1 + φ(z))`` (``φ = ABRelu(slope_neg, 1)``;
    ``P_2 = P(h2 > 0, h2' > 0)``, ``P_1 = E[1{h2 > 0, h2' > 0} φ'(h1)φ'(h1')]``, ``P_0`` that times ``φ'(z)φ'(z')``:
    the NTK's path weights) by the nested 4-D rule: ``z`` by :func:`_gauss_split`, then ``g1`` given ``z`` the
    same way around the shifted mean, the last level by the closed form (tested above). Converged to ~2e-5 at
    n = 20 on the cases below (n = 40 as the yardstick)."""
    zero = torch.zeros((), dtype=F64)
    r1, r2, wz = _gauss_split(c0, zero, zero, n, slope_neg)
    q1, q2, wh = _gauss_split(c1, r1, r2, n, slope_neg)
    g12, g11, g22 = c2
    f, p, *_ = rl._relu_pair(q1, q2, _t(g11).sqrt(), _t(g22).sqrt(), _t(g12 / math.sqrt(g11 * g22)))
    w = wh * wz[..., None]

    def d(a):  # φ'(a) from φ(a): 1 where a > 0, else slope_neg
        return torch.where(a > 0, 1.0, slope_neg)

    p1 = p * d(q1) * d(q2)
    p0 = p1 * (d(r1) * d(r2))[..., None]
    return tuple(float((t * w).sum()) for t in (f, p, p1, p0))


CASES3 = [  # covariances (q12, q11, q22) of z, g1, g2
    ((0.3, 1.0, 0.8), (0.2, 0.5, 0.6), (0.1, 0.4, 0.5)),
    ((0.95, 1.0, 1.0), (0.45, 0.5, 0.5), (0.2, 0.3, 0.3)),
    ((-0.4, 1.2, 0.7), (0.05, 0.3, 0.2), (0.0, 0.3, 0.3)),
]


@pytest.mark.parametrize("need_dot", [True, False])
@pytest.mark.parametrize("slope_neg", [0.0, 0.1])
def test_three_level_rule_against_nested_quadrature(slope_neg, need_dot):
    """The three-level rule (sign patterns of z, each a two-level rule with a Φ₂ weight) against the nested
    4-D rule, which shares none of its steps: within 1e-4 of √(E[φ(h)²]E[φ(h')²]) (the returned values, with
    error control at 1e-3, on either ladder), and the NTK's path weights within 1e-4."""
    prefix = (rl.Apply(nt.LeakyRelu(slope_neg) if slope_neg else nt.Relu()),)
    levels = tuple(tuple(_t([c[lv][i] for c in CASES3]) for i in range(3)) for lv in range(3))
    got, dot = rl.pair_expectations(levels, (prefix, prefix), (0.0, 1.0), need_dot)
    assert (dot is not None) == need_dot
    scale = rl._pair_scale(levels, (prefix, prefix), (0.0, 1.0))
    refs = [_nested_reference(*c, slope_neg=slope_neg) for c in CASES3]
    err = ((got - _t([r[0] for r in refs])).abs() / scale).max()
    err_dot = max((float((d - _t([r[3 - i] for r in refs])).abs().max()) for i, d in enumerate(dot or ())), default=0)
    print(f"three levels: max error / scale {float(err):.2e}, P error {float(err_dot):.2e}")
    assert err < 1e-4 and err_dot < 1e-4


def test_three_level_rule_converges_on_thin_branches():
    """Gaussian branches 3–4× smaller than the skip in standard deviation (as in default-initialised ResNets,
    where the measured ratio is ~0.15): the rule's ladder converges, if slowly (π_Q then steps over a width ~σ_g
    across its cut lines: (16, 24) is within 4e-5 of (32, 48), measured), and its first rung, the one usually
    returned, is within its tolerance of the finest rule (32 nodes per angular piece, 48 radial)."""
    cases = [
        ((0.6, 1.0, 0.9), (0.099, 0.1, 0.1), (0.05, 0.1, 0.1)),
        ((0.9, 1.0, 1.0), (0.05, 0.06, 0.06), (0.07, 0.08, 0.08)),
    ]
    levels = tuple(tuple(_t([c[lv][i] for c in cases]) for i in range(3)) for lv in range(3))
    relu = (rl.Apply(nt.Relu()),)
    rules = ((32, 48), (16, 24), (4, 8))
    (v32, d32), (v16, d16), (v4, d4) = rl._pair_rules3(levels, (relu, relu), (0.0, 1.0), rules, True)
    scale = rl._pair_scale(levels, (relu, relu), (0.0, 1.0))

    def gap(a, b):  # the path weights P_0, P_1, P_2 of the NTK
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    assert float(((v16 - v32).abs() / scale).max()) < 1e-4 and gap(d16, d32) < 1e-4
    assert float(((v4 - v32).abs() / scale).max()) < rl.TOL and gap(d4, d32) < rl.TOL


def test_three_level_single_rule():
    """E[relu(h2)] and E[relu(h2)²], h2 = g2 + relu(g1 + relu(z)), against scipy's nested adaptive quadrature
    (the last level in closed form), to 1e-9."""
    from scipy import integrate, stats

    q0, q1, q2 = 0.9, 0.2, 0.3
    s0, s1, s2 = math.sqrt(q0), math.sqrt(q1), math.sqrt(q2)

    def last(r, power):  # E[relu(g2 + r)^power]
        a = r / s2
        cdf, pdf = stats.norm.cdf(a), stats.norm.pdf(a)
        return r * cdf + s2 * pdf if power == 1 else (r * r + q2) * cdf + r * s2 * pdf

    def middle(z, power):  # E over g1 given z, split at the kink g1 = −relu(z)
        r = max(z, 0.0)
        f = lambda g: last(max(g + r, 0.0), power) * stats.norm.pdf(g, 0, s1)
        return sum(integrate.quad(f, a, b, epsabs=1e-14)[0] for a, b in ((-10 * s1, -r), (-r, 10 * s1 + r)))

    prefix = (rl.Apply(nt.Relu()),)
    got = rl.single_expectations((_t(q0), _t(q1), _t(q2)), (prefix, prefix), (0.0, 1.0))
    for power, idx in ((1, 0), (2, 1)):
        f = lambda z: middle(z, power) * stats.norm.pdf(z, 0, s0)
        ref = integrate.quad(f, -10 * s0, 0, epsabs=1e-13)[0] + integrate.quad(f, 0, 10 * s0, epsabs=1e-13)[0]
        assert abs(float(got[idx]) - ref) < 1e-9


# ---------------------------------------------------------------------------------------------------
# the whole rule in networks: Monte Carlo of wide finite networks
# ---------------------------------------------------------------------------------------------------
def _mlp_block(width=64, outs=128, forget=False):
    """relu(x0 + Dense(relu(Dense(x0)))), x0 = relu(Dense(x)): the post-activation residual MLP. ``forget``: the
    same network with the sum's law forgotten and the sum pretended Gaussian (the answer before this rule; a
    layer that drops the law but keeps the kernel)."""

    class Forget(nt.Identity):
        def kernel(self, k):
            return k.replace(is_gaussian=True, law=None)

    return nt.serial(
        nt.Dense(width, 1.5, 0.1),
        nt.Relu(),
        nt.FanOut(2),
        nt.parallel(nt.serial(nt.Dense(width, 1.4, 0.0), nt.Relu(), nt.Dense(width, 1.3, 0.0)), nt.Identity()),
        nt.FanInSum(),
        *([Forget()] if forget else []),
        nt.Relu(),
        nt.Dense(outs, 1.0, 0.0),
    )


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _mc(net, x, n, width, get):
    """Monte-Carlo mean over wide finite twins and the tolerance 3 % + 3 standard errors (relative)."""
    per = nt.monte_carlo_kernel_fn(net, n, width, seed=0).samples(x, None, get)
    out = {}
    for g, t in per.items():
        m = t.mean(0)
        out[g] = (m, 0.03 + 3 * float((t.std(0) / math.sqrt(n)).max() / m.abs().max()))
    return out


def test_mlp_against_monte_carlo():
    net = _mlp_block()
    x = _x(5, 3)
    k = net.kernel_fn(x, None, ("nngp", "ntk"))
    mc = _mc(net, x, 150, 256, ("nngp", "ntk"))
    e_nngp, e_ntk = rel_err(mc["nngp"][0], k.nngp), rel_err(mc["ntk"][0], k.ntk)
    print(f"MC: nngp {e_nngp:.4f} (tol {mc['nngp'][1]:.4f}), ntk {e_ntk:.4f} (tol {mc['ntk'][1]:.4f})")
    assert e_nngp < mc["nngp"][1] and e_ntk < mc["ntk"][1]
    # the old answer, the sum treated as Gaussian, is far off (what the rule fixes)
    gauss = _mlp_block(forget=True).kernel_fn(x, None, "nngp")
    e_gauss = rel_err(mc["nngp"][0], gauss)
    print(f"sum treated as Gaussian: {e_gauss:.3f} off")
    assert e_gauss > 0.2


def test_conv_against_monte_carlo_and_tiled():
    net = nt.serial(
        nt.Conv(8, (3, 3), padding="SAME", W_std=1.5, b_std=0.1),
        nt.Relu(),
        nt.FanOut(2),
        nt.parallel(
            nt.serial(
                nt.Conv(8, (3, 3), padding="SAME", W_std=1.4), nt.Relu(), nt.Conv(8, (3, 3), padding="SAME", W_std=1.3)
            ),
            nt.Identity(),
        ),
        nt.FanInSum(),
        nt.Relu(),
        nt.GlobalAvgPool(),
        nt.Dense(64, 1.0, 0.0),
    )
    x = _x(3, 2, 3, 3)
    k = net.kernel_fn(x, None, "nngp")
    mc, tol = _mc(net, x, 150, 128, ("nngp",))["nngp"]
    err = rel_err(mc, k)
    print(f"MC conv: nngp {err:.4f} (tol {tol:.4f})")
    assert err < tol
    # tiled evaluation (off-diagonal tiles pair-only, their variances replayed from the tape) gives the same
    # numbers: every entry depends only on its own covariances
    tiled = net.kernel_fn(x, None, "nngp", tile_size=1)
    assert torch.allclose(tiled, k, rtol=1e-12, atol=1e-14)
    x2 = _x(2, 2, 3, 3, seed=1)
    assert torch.allclose(net.kernel_fn(x, x2, "nngp", tile_size=1), net.kernel_fn(x, x2, "nngp"), rtol=1e-12)


def test_two_blocks_tiled_and_against_monte_carlo():
    """Two post-activation conv blocks in a row (three levels): NNGP and NTK against Monte Carlo of wide twins,
    and the tiled evaluation (pair-only tiles replaying the tape) equal to the untiled one, also for x2 ≠ x1."""

    def block(w):
        branch = nt.serial(nt.Conv(8, (3, 3), padding="SAME", W_std=w), nt.Relu(), nt.Conv(8, (3, 3), padding="SAME"))
        return [nt.FanOut(2), nt.parallel(branch, nt.Identity()), nt.FanInSum(), nt.Relu()]

    net = nt.serial(
        nt.Conv(8, (3, 3), padding="SAME", W_std=1.5, b_std=0.1),
        nt.Relu(),
        *block(1.4),
        *block(1.2),
        nt.GlobalAvgPool(),
        nt.Dense(64, 1.0, 0.0),
    )
    x = _x(3, 2, 3, 3)
    k = net.kernel_fn(x, None, ("nngp", "ntk"))
    mc = _mc(net, x, 120, 128, ("nngp", "ntk"))
    errs = {g: rel_err(mc[g][0], getattr(k, g)) for g in ("nngp", "ntk")}
    print(f"MC two conv blocks: {errs} (tol {mc['nngp'][1]:.4f}, {mc['ntk'][1]:.4f})")
    assert all(errs[g] < mc[g][1] for g in errs)
    tiled = net.kernel_fn(x, None, ("nngp", "ntk"), tile_size=1)
    for g in ("nngp", "ntk"):
        assert torch.allclose(getattr(tiled, g), getattr(k, g), rtol=1e-12, atol=1e-14)
    x2 = _x(2, 2, 3, 3, seed=1)
    a, b = net.kernel_fn(x, x2, ("nngp", "ntk"), tile_size=1), net.kernel_fn(x, x2, ("nngp", "ntk"))
    assert torch.allclose(a.nngp, b.nngp, rtol=1e-12) and torch.allclose(a.ntk, b.ntk, rtol=1e-12)


def test_pair_rule_raises_below_its_reach():
    """An entry whose error estimate stays above the tolerance after the last refinement raises (never a silent
    inaccurate number)."""
    lv0 = tuple(_t([c[0][i] for c in CASES]) for i in range(3))
    lvg = tuple(_t([c[1][i] for c in CASES]) for i in range(3))
    with pytest.raises(LayerError, match="did not reach its tolerance 1e-14"):
        rl.pair_expectations((lv0, lvg), ((rl.Apply(nt.Relu()),),), (0.0, 1.0), True, tol=1e-14)


def test_symmetric_evaluation_matches_the_full_one(monkeypatch):
    """x2 = x1 computes, in the diagonal batch blocks, the pixel pairs p ≤ p' only and mirrors them: the same
    numbers as every pixel pair computed, and the blocks exactly symmetric."""
    seen = []
    inner = rl._pixel_symmetric_pairs

    def spy(picked, diag, nsp, prefixes, ab, need_dot):
        v, d = inner(picked, diag, nsp, prefixes, ab, need_dot)
        lvs = (tuple(picked[:3]), tuple(picked[3:]))
        seen.append((v, d, rl.pair_expectations(lvs, prefixes, ab, need_dot), diag))
        return v, d

    monkeypatch.setattr(rl, "_pixel_symmetric_pairs", spy)
    net = nt.serial(
        nt.Conv(4, (3, 3), padding="SAME", W_std=1.5, b_std=0.1),
        nt.Relu(),
        nt.FanOut(2),
        nt.parallel(
            nt.serial(nt.Conv(4, (3, 3), padding="SAME", W_std=1.4), nt.Relu(), nt.Conv(4, (3, 3), padding="SAME")),
            nt.Identity(),
        ),
        nt.FanInSum(),
        nt.Relu(),
        nt.GlobalAvgPool(),
        nt.Dense(4),
    )
    k = net.kernel_fn(_x(3, 2, 3, 4), None, ("nngp", "ntk"))
    assert len(seen) == 1
    v, d, (v_all, d_all), diag = seen[0]
    assert v.shape == (6, 3, 3, 4, 4) and int(diag.sum()) == 3
    for got, every in ((v, v_all), *zip(d, d_all)):
        assert torch.allclose(got, every, rtol=1e-12, atol=0)
        assert torch.equal(got[diag], got[diag].permute(0, 2, 1, 4, 3))
    assert torch.allclose(k.nngp, k.nngp.T, rtol=1e-14, atol=0)  # exact at the rule; pooling sums in its order


def test_refusals():
    # three non-Gaussian levels in a row (three identity blocks): a clear error, not a number
    block = [nt.FanOut(2), nt.parallel(nt.Dense(8, 1.4), nt.Identity()), nt.FanInSum(), nt.Relu()]
    deep = nt.serial(nt.Dense(8, 1.5), nt.Relu(), *block, *block, *block)
    with pytest.raises(LayerError, match="more than two non-Gaussian levels"):
        deep.kernel_fn(_x(2, 3))
    nt.serial(nt.Dense(8, 1.5), nt.Relu(), *block, *block).kernel_fn(_x(2, 3))  # two are fine
    # two levels with a smooth nonlinearity before the last sum: the sign-pattern rule needs ReLU-like ones
    smooth = nt.serial(nt.Dense(8, 1.5), nt.Gelu(), *block, *block)
    with pytest.raises(LayerError, match="outside the ReLU family"):
        smooth.kernel_fn(_x(2, 3))
    other = nt.serial(
        nt.Dense(8, 1.5), nt.Relu(), nt.FanOut(2), nt.parallel(nt.Dense(8, 1.4), nt.Identity()), nt.FanInSum(), nt.Erf()
    )
    with pytest.raises(LayerError, match="ReLU family"):
        other.kernel_fn(_x(2, 3))


def test_ray_in_finds_every_representative_of_a_line():
    """A line through the origin (an angle mod π, as atan2 returns it in (−π, π]) is cut on every arc of
    [−π/2, 3π/2) it crosses, also at tt + 2π (missing before 2026-12-02: the three-level rule's weight went uncut
    on the arc through (π, 3π/2) and was 4e-3 off on such entries)."""
    lo = _t([-math.pi / 2, 0.0, math.pi, math.pi])
    hi = _t([0.0, math.pi, 3 * math.pi / 2, 3 * math.pi / 2])
    tt = _t([-1.842, 1.2993, -1.842, 0.3])  # representatives: −1.842 + π = 1.2996, −1.842 + 2π = 4.4412
    got = rl._ray_in(tt, lo, hi)
    want = _t([0.0, 1.2993, -1.842 + 2 * math.pi, 0.3 + math.pi])
    assert torch.allclose(got, want, rtol=0, atol=1e-12), got
