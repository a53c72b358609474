"""Closed forms at extreme variances (issue #16, item 4): every nonlinearity's ``(K', K̇)`` for variances from
1e-300 to 1e300 is exact — or an error, never a silent wrong number.

Reference: each layer's formula (its docstring's, written out independently here) evaluated in ``mpmath`` at
120 digits on the *same* float64 triple ``(q12, q11, q22)``, with every product and discriminant exact.

What "exact" means here. The error allowed is

* ``1e-12 × scale``, with ``scale = √(K'(q11) K'(q22))`` (for K̇: the same with ``K̇``): by Cauchy–Schwarz
  ``|E[φ(u)φ(v)]| ≤ √(E[φ(u)²] E[φ(v)²])``, so this is the kernel's own magnitude at those variances (an
  entry that cancels to almost 0 — ReLU at ``ρ = −1`` — is then held to the accuracy of its neighbours);
* plus the change of the exact value under a 16-ulp perturbation of each of ``q12, q11, q22``: the accuracy
  the data itself supports (``arccos`` near ``ρ = ±1`` amplifies any round-off of ``ρ``).

A rule may instead *refuse*: raise a ``LayerError`` (``Exp`` beyond its range, ``Gaussian(b > 0)`` past
``4bq = 1``) or return a non-finite value, which ``Net.kernel_fn`` turns into an error naming the layer
(tests/nets/test_core.py). Layers marked ``exact_everywhere`` may not: their kernels are representable at every
such triple, and so must be the result. Before the fixes ``Gaussian`` returned 6.7e153 (exact 6.5e-16) and an
infinite K̇ on the diagonal at ``q ≈ 6e29``; ``Erf``/``Gelu`` cancelled the same way and overflowed; ``Sign``,
``ExpNormalized`` and ``RectifiedMonomial`` took ``√(q11·q22)`` through an overflowing product (ρ = 0 at
``q = 1e300``); ``Sin``/``Rbf`` lost ``q12 − (q11 + q22)/2`` to round-off at large variance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import mpmath
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ntkit as nk
from ntkit.layers import LayerError
from ntkit.layers.elementwise_poly import arccos_polynomials

F64 = torch.float64
EPS = torch.finfo(F64).eps
mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
PREC_DPS = 120

M = mpmath.mpf


@dataclasses.dataclass
class Ref:
    make: Callable[[], nk.ElementwiseLayer]
    formula: Callable  # (q12, q11, q22) mpf -> (K', K̇) mpf
    exact_everywhere: bool = True


def _rho(q12, q11, q22):
    den = mpmath.sqrt(q11 * q22)
    return mpmath.mpf(0) if den == 0 else max(M(-1), min(M(1), q12 / den))


def abrelu(a, b):
    a, b = M(a), M(b)

    def f(q12, q11, q22):
        th = mpmath.acos(_rho(q12, q11, q22))
        pre = mpmath.sqrt(q11 * q22) / (2 * mpmath.pi)
        j1 = mpmath.sin(th) + (mpmath.pi - th) * mpmath.cos(th)
        j2 = mpmath.sin(th) - th * mpmath.cos(th)
        k = pre * ((a * a + b * b) * j1 - 2 * a * b * j2)
        kd = ((a * a + b * b) * (mpmath.pi - th) + 2 * a * b * th) / (2 * mpmath.pi)
        return k, kd

    return f


def sign(q12, q11, q22):
    return 2 / mpmath.pi * mpmath.asin(_rho(q12, q11, q22)), M(0)


def rect_mono(n):
    j, jd = arccos_polynomials(n), (arccos_polynomials(n - 1) if n else None)

    def kappa(polys, rho):
        th = mpmath.acos(rho)
        p = sum(M(c) * rho**i for i, c in enumerate(polys[0]))
        q = sum(M(c) * rho**i for i, c in enumerate(polys[1]))
        return (p * mpmath.sin(th) + q * (mpmath.pi - th)) / (2 * mpmath.pi)

    def f(q12, q11, q22):
        rho, prod = _rho(q12, q11, q22), mpmath.sqrt(q11 * q22)
        k = prod**n * kappa(j, rho)
        kd = n * n * prod ** (n - 1) * kappa(jd, rho) if n else M(0)
        return k, kd

    return f


def _disc(q12, q11, q22):
    return max(M(0), q11 * q22 - q12 * q12)  # exact at this precision; PSD


def erf(a, b, c):
    a, b, c = M(a), M(b), M(c)
    t = 2 * b * b

    def f(q12, q11, q22):
        det = 1 + t * (q11 + q22) + t * t * _disc(q12, q11, q22)
        x = t * q12 / mpmath.sqrt((1 + t * q11) * (1 + t * q22))
        k = a * a * 2 / mpmath.pi * mpmath.asin(max(M(-1), min(M(1), x))) + c * c
        return k, a * a * 2 * t / mpmath.pi / mpmath.sqrt(det)

    return f


def gelu(q12, q11, q22):
    """Tsuchida et al. 2021 as in the docstring (P − q12² with an exact discriminant)."""
    p = (1 + q11) * (1 + q22)
    d2 = 1 + q11 + q22 + _disc(q12, q11, q22)
    d = mpmath.sqrt(d2)
    ang = mpmath.atan2(q12, d)
    k = q12 / 4 + ((q12 * q12 + q11 * q22 * d2) / (p * d) + q12 * ang) / (2 * mpmath.pi)
    kd = M(1) / 4 + ang / (2 * mpmath.pi) + q12 / (2 * mpmath.pi * d) * (1 / d2 + (1 - q11 * q22) / p + 1)
    return k, kd


def sin(a, b, c):
    a, b, c = M(a), M(b), M(c)

    def f(q12, q11, q22):
        s = q11 + q22
        em, ep = mpmath.exp(-b * b * (s - 2 * q12) / 2), mpmath.exp(-b * b * (s + 2 * q12) / 2)
        c2 = mpmath.cos(2 * c)
        return a * a / 2 * (em - c2 * ep), a * a * b * b / 2 * (em + c2 * ep)

    return f


def rbf(gamma):
    g = M(gamma)

    def f(q12, q11, q22):
        k = mpmath.exp(-g * (q11 + q22 - 2 * q12))
        return k, 2 * g * k

    return f


def gaussian(a, b):
    a, b = M(a), M(b)

    def f(q12, q11, q22):
        det = 1 - 2 * b * (q11 + q22) + 4 * b * b * _disc(q12, q11, q22)
        d = mpmath.sqrt(det)
        return a * a / d, 4 * a * a * b * b * q12 / d**3

    return f


def gabor(q12, q11, q22):
    """``φ(x) = exp(−x²) sin(x)``: with ``D = det(I + 2Σ)`` and ``E± = exp(−(S + 4Δ ± 2 q12)/(2D))`` (``S`` the
    variances' sum, ``Δ`` the covariance determinant), ``K' = (E₋ − E₊)/(2√D)`` and
    ``K̇ = [E₋(D + 8q12² + T) + E₊(D + 8q12² − T)]/(2 D^{5/2})``, ``T = 4 q12 (1 + S + D)``."""
    s, disc = q11 + q22, _disc(q12, q11, q22)
    d = 1 + 2 * s + 4 * disc
    # E± = exp(−α ∓ β), α = (S + 4Δ)/(2D), β = q12/D: E₋ − E₊ = 2 e^{−α} sinh β and E₋ + E₊ = 2 e^{−α} cosh β
    # (the difference of the exponentials themselves cancels at q ≈ 1e-300, even in 40 digits)
    alpha, beta = (s + 4 * disc) / (2 * d), q12 / d
    t = 4 * q12 * (1 + s + d)
    k = mpmath.exp(-alpha) * mpmath.sinh(beta) / mpmath.sqrt(d)
    kd = mpmath.exp(-alpha) * ((d + 8 * q12**2) * mpmath.cosh(beta) + t * mpmath.sinh(beta)) / d**2.5
    return k, kd


def exp_(a, b):
    a, b = M(a), M(b)

    def f(q12, q11, q22):
        k = a * a * mpmath.exp(b * b * ((q11 + q22) / 2 + q12))
        return k, b * b * k

    return f


def exp_normalized(gamma, shift):
    g, sh = M(gamma), M(shift)

    def f(q12, q11, q22):
        e = mpmath.exp(g * (_rho(q12, q11, q22) + sh))
        return mpmath.sqrt(q11 * q22) * e, g * e

    return f


def polynomial(coef):
    """E[φ(u)φ(v)] from the Hermite expansion, exact in rationals times powers of the q's."""
    n = len(coef)
    alpha = [
        [
            M(coef[k + 2 * m]) * math.factorial(k + 2 * m) / (math.factorial(k) * 2**m * math.factorial(m))
            for m in range((n - 1 - k) // 2 + 1)
        ]
        for k in range(n)
    ]

    def f(q12, q11, q22):
        def A(k, q):
            return sum(al * q**m for m, al in enumerate(alpha[k]))

        k_ = sum(math.factorial(k) * q12**k * A(k, q11) * A(k, q22) for k in range(n))
        kd = sum(k * math.factorial(k) * q12 ** (k - 1) * A(k, q11) * A(k, q22) for k in range(1, n))
        return k_, kd

    return f


REFS: dict[str, Ref] = {
    "Relu": Ref(nk.Relu, abrelu(0, 1)),
    "LeakyRelu": Ref(lambda: nk.LeakyRelu(0.1), abrelu(0.1, 1)),
    "ABRelu": Ref(lambda: nk.ABRelu(-0.5, 1.5), abrelu(-0.5, 1.5)),
    "Abs": Ref(nk.Abs, abrelu(-1, 1)),
    "Sign": Ref(nk.Sign, sign),
    "RectifiedMonomial(0)": Ref(lambda: nk.RectifiedMonomial(0), rect_mono(0)),
    "RectifiedMonomial(1)": Ref(lambda: nk.RectifiedMonomial(1), rect_mono(1)),
    "RectifiedMonomial(3)": Ref(lambda: nk.RectifiedMonomial(3), rect_mono(3), exact_everywhere=False),
    "Erf": Ref(lambda: nk.Erf(2.0, 0.5, 0.3), erf(2.0, 0.5, 0.3)),
    "Sigmoid_like": Ref(nk.Sigmoid_like, erf(0.5, 1 / 2.4020563531719796, 0.5)),
    "Gelu": Ref(nk.Gelu, gelu),
    "Sin": Ref(lambda: nk.Sin(2.0, 0.7, 0.4), sin(2.0, 0.7, 0.4)),
    "Cos": Ref(lambda: nk.Cos(1.0, 1.3, 0.2), sin(1.0, 1.3, 0.2 + mpmath.pi / 2)),
    "Rbf": Ref(lambda: nk.Rbf(0.5), rbf(0.5)),
    "Gaussian": Ref(lambda: nk.Gaussian(0.7, -0.4), gaussian(0.7, -0.4)),
    "Gaussian(b>0)": Ref(lambda: nk.Gaussian(1.0, 0.1), gaussian(1.0, 0.1), exact_everywhere=False),
    "Gabor": Ref(nk.Gabor, gabor),
    "Exp": Ref(lambda: nk.Exp(1.0, 0.5), exp_(1.0, 0.5), exact_everywhere=False),
    "ExpNormalized": Ref(lambda: nk.ExpNormalized(1.0, -1.0), exp_normalized(1.0, -1.0)),
    "Monomial": Ref(lambda: nk.Monomial(3), polynomial([0, 0, 0, 1]), exact_everywhere=False),
    "Polynomial": Ref(lambda: nk.Polynomial([0.5, -1.0, 0.25]), polynomial([0.5, -1.0, 0.25]), exact_everywhere=False),
}


def test_every_closed_form_nonlinearity_is_audited():
    """Every public nonlinearity with a closed form is in REFS (Hermite needs unit variance, Elementwise is a
    quadrature: both are covered elsewhere)."""
    import ntkit.layers

    closed = {
        n
        for n in ntkit.layers.__all__
        if isinstance(getattr(ntkit.layers, n), type)
        and issubclass(getattr(ntkit.layers, n), nk.ElementwiseLayer)
        and n not in ("ElementwiseLayer", "Elementwise", "Hermite")
    }
    covered = {n.split("(")[0] for n in REFS}
    assert closed <= covered, sorted(closed - covered)


def _float_triple(e1: float, e2: float, rho: float) -> tuple[float, float, float]:
    """A PSD float triple (``q12² ≤ q11 q22`` exactly) with correlation ≈ ``rho``; ``q12 = q11 = q22`` bit for
    bit for ``rho = 1`` and equal variances."""
    q11, q22 = 10.0**e1, 10.0**e2
    if q11 == q22 and abs(rho) == 1.0:
        return rho * q11, q11, q22
    q12 = rho * math.sqrt(q11) * math.sqrt(q22)
    while M(q12) ** 2 > M(q11) * M(q22):
        q12 = math.nextafter(q12, 0.0)
    return q12, q11, q22


def _exact(formula, q12, q11, q22):
    with mpmath.workdps(PREC_DPS):
        k, kd = formula(M(q12), M(q11), M(q22))
        k1, kd1 = formula(M(q11), M(q11), M(q11))
        k2, kd2 = formula(M(q22), M(q22), M(q22))
        # the data's own accuracy: 16-ulp perturbations of each argument
        dk = dkd = M(0)
        for i in range(3):
            for s in (1, -1):
                args = [M(q12), M(q11), M(q22)]
                args[i] = args[i] * (1 + s * 16 * M(EPS))
                if args[1] < 0 or args[2] < 0:
                    continue
                pk, pkd = formula(*args)
                dk, dkd = max(dk, abs(pk - k)), max(dkd, abs(pkd - kd))
        tol_k = M("1e-12") * mpmath.sqrt(abs(k1 * k2)) + dk + M("1e-306")
        tol_kd = M("1e-12") * mpmath.sqrt(abs(kd1 * kd2)) + dkd + M("1e-306")
        return k, kd, tol_k, tol_kd


def _check(name: str, q12: float, q11: float, q22: float) -> None:
    ref = REFS[name]
    layer = ref.make()
    t = [torch.tensor([v], dtype=F64) for v in (q12, q11, q22)]
    try:
        k, kd = layer.rule(*t, True)
    except LayerError:
        assert not ref.exact_everywhere, f"{name} refused {(q12, q11, q22)}"
        return
    k_, kd_ = float(k), float(kd)
    if not (math.isfinite(k_) and math.isfinite(kd_)):
        # an error at the network level (Net.kernel_fn checks every output); only allowed where the kernel
        # may leave the float range
        assert not ref.exact_everywhere, f"{name} gave ({k_}, {kd_}) at {(q12, q11, q22)}"
        return
    ek, ekd, tol_k, tol_kd = _exact(ref.formula, q12, q11, q22)
    assert abs(M(k_) - ek) <= tol_k, (name, (q12, q11, q22), k_, float(ek), float(tol_k))
    assert abs(M(kd_) - ekd) <= tol_kd, (name, (q12, q11, q22), kd_, float(ekd), float(tol_kd))


exponents = st.floats(-300, 300, allow_nan=False)
correlations = st.one_of(
    st.sampled_from([-1.0, 1.0, 0.0, 1 - 2**-40, -1 + 2**-40, 1 - 1e-9, 0.5, -0.5]),
    st.floats(-1, 1, allow_nan=False),
)


@pytest.mark.parametrize("name", sorted(REFS))
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(e1=exponents, e2=exponents, rho=correlations)
@example(e1=math.log10(6e29), e2=math.log10(6e29), rho=1.0)  # the issue's diagonal
@example(e1=300.0, e2=300.0, rho=1.0)
@example(e1=-300.0, e2=-300.0, rho=0.5)
@example(e1=300.0, e2=-300.0, rho=-0.7)
@example(e1=13.9, e2=13.9, rho=1.0)  # q ≈ 8e13: the relative error was already 1e-3
@example(e1=10.0, e2=10.0, rho=1 - 1e-12)
def test_closed_form_exact_or_error(name, e1, e2, rho):
    _check(name, *_float_triple(e1, e2, rho))


@pytest.mark.parametrize("name", sorted(REFS))
@settings(max_examples=8, deadline=None, derandomize=True)
@given(e=exponents)
def test_closed_form_on_the_diagonal(name, e):
    """``q12 = q11 = q22`` bit for bit (the diagonal of ``x2 = None``): the product forms cancelled here."""
    q = 10.0**e
    _check(name, q, q, q)


def test_gaussian_issue_numbers():
    """The issue's numbers: ``Gaussian()`` after a pre-activation variance of 6e29 (a Dense layer on inputs of
    norm ~1e15): the exact NNGP on the diagonal is ``1/√(1 + 4q) = 6.45e-16`` (was 6.7e153) and the NTK finite."""
    x = torch.full((2, 4), 7.745966692414834e14, dtype=F64)
    x[1] *= 0.5
    net = nk.serial(nk.Dense(8), nk.Gaussian())
    k = net.kernel_fn(x)
    q = float((x[0] ** 2).mean())
    assert abs(float(k.nngp[0, 0]) - 1 / math.sqrt(1 + 4 * q)) < 1e-14 / math.sqrt(q)
    assert torch.isfinite(k.ntk).all()
    exact_ntk = q * 4 * q / (1 + 4 * q) ** 1.5 + 1 / math.sqrt(1 + 4 * q)  # Θ K̇ + K' (Θ = q, the Dense's NNGP)
    assert abs(float(k.ntk[0, 0]) - exact_ntk) < 1e-12 * exact_ntk
