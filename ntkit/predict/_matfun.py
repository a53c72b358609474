"""Matrix functions of a train kernel applied to a block of columns without its eigendecomposition.

Gradient flow on MSE needs, for finite ``t`` and ``τ = η t / N``, the function

    g_τ(λ) = (1 - exp(-τ λ)) / λ = τ φ(τ λ),      φ(x) = (1 - e^{-x}) / x = ∫_0^1 e^{-x u} du,

of the (regularised, positive definite) train kernel ``Θ`` applied to the targets and to the test-train kernel
(``g_τ(0) = τ``, the limit the eigendecomposition path uses too). ``φ`` is entire, so on the spectrum interval
``[0, b]`` (``b ≥ λ_max``: ``min(‖Θ‖_∞, ‖Θ‖_F)``) its Chebyshev interpolant of degree ``d`` converges
geometrically, and ``p_d(Θ) B`` costs ``d`` products ``Θ · (n × m)`` (the three-term recurrence of Chebyshev
polynomials), against ``~20 n³`` for ``eigh`` plus its back-transformations.

A priori error bounds; the lesser is used. (1) Trefethen, *Approximation Theory and Approximation Practice*
(2013), Thm 8.2: if ``f``
is analytic in the Bernstein ellipse ``E_ρ`` (foci ±1, semi-axes summing to ``ρ > 1``) of the interval mapped
to ``[-1, 1]`` and ``|f| ≤ M_ρ`` there, the degree-``d`` interpolant in Chebyshev points satisfies
``max_{[-1,1]} |f - p_d| ≤ 4 M_ρ ρ^{-d} / (ρ - 1)``. For ``f(s) = φ(L (1 + s) / 2)`` (``L = τ b``) on ``E_ρ``,
``Re x ≥ -a`` with ``a = L ((ρ + 1/ρ)/2 - 1) / 2``, and ``|φ(x)| ≤ ∫_0^1 e^{a u} du ≤ e^{a}``: so
``M_ρ = e^{a}``, minimised over a grid of ``ρ``. (2) The interpolant's error is at most ``2 Σ_{k>d} |a_k|``
(ibid., Thm 4.2) in the Chebyshev coefficients ``a_k`` of ``f``; as ``f(s) = ∫_0^1 e^{-z} e^{-zs} du`` with
``z = Lu/2`` and ``e^{-zs} = I_0(z) + 2 Σ_k (-1)^k I_k(z) T_k(s)``, and ``e^{-z} I_k(z) ≤ (z/2)^k / k!``
(the series of ``I_k``, with ``(m+k)! ≥ m! k!``), ``|a_k| ≤ 2 (L/4)^k / (k+1)!``: the error is at most
``4 (L/4)^{d+1} / (d+2)! / (1 − L/(4(d+3)))``, sharper than (1) for the small ``L`` of a deflated kernel.
Since every eigenvalue of ``Θ`` lies in ``[0, b]``,
``‖p_d(Θ) B - g_τ(Θ) B‖₂ ≤ τ ε_d ‖B‖₂`` with ``ε_d`` that bound; the degree is the least with
``ε_d ≤ rtol · φ(L)`` (``φ(L)`` is the least value of ``φ`` on the interval, so the error is at most ``rtol``
relative to ``‖g_τ(Θ) B‖₂ ≥ τ φ(L) ‖B‖₂``). Round-off of the recurrence adds at most about ``d²·eps·Σ|c_k|``
(the growth of the Chebyshev recurrence's errors, Smoktunowicz 2002, "Backward stability of Clenshaw's
algorithm"; an estimate, reported in the plan and checked by the tests).

**Deflation of the top eigenpair.** A kernel of inputs that are not centred has one eigenvalue far above the
others (the constant mode: ``λ_1 ≈ N·mean(Θ)``), and the degree grows with ``τ λ_max``. With ``v`` a unit
vector found by power iteration, ``θ = vᵀΘv``, ``r = Θv − θv`` and ``P = I − vvᵀ``,

    Θ = Θ̂ + E,   Θ̂ = θ vvᵀ + M,   M = PΘP,   E = r vᵀ + v rᵀ   (‖E‖_F = √2 ‖r‖₂, as r ⊥ v),

and ``g(Θ̂) B = g(θ) v (vᵀB) + g(M) (PB)`` exactly (``v`` is an eigenvector of ``Θ̂``, and ``M`` maps
``v^⊥`` into itself), so the polynomial runs on ``M``, whose spectrum bound ``β = min(‖M‖_∞, ‖M‖_F)`` is
about ``λ_2`` instead of ``λ_1``. The replacement of ``Θ`` by ``Θ̂`` costs, for Hermitian matrices and ``g``
Lipschitz with constant ``ℓ`` on an interval holding both spectra, ``‖g(Θ) − g(Θ̂)‖_F ≤ ℓ ‖E‖_F`` (in the
joint eigenbases the difference is the Schur product of the divided differences ``g[λ_i, μ_j]``, each of
modulus ``≤ ℓ``, with ``E``; Bhatia, *Matrix Analysis*, 1997, ch. VII). Both spectra lie in ``[0, ∞)`` (``Θ``
positive definite, ``Θ̂`` a sum of positive semi-definite terms), where ``|g_τ'| = τ²|φ'(τλ)| ≤ τ²/2``
(``|φ'(x)| = ∫_0^1 u e^{-xu} du ≤ 1/2``): the deflation adds at most ``τ ‖r‖₂ / (√2 φ(τ b))`` relative to
``‖g_τ(Θ) B‖₂`` (``ChebyshevPlan.rel_deflation``), and the polynomial's own error is asked relative to the same
``φ(τ b)`` of the whole kernel. ``‖r‖₂`` is computed in floating point (its round-off, about ``√N eps ‖Θ‖``,
is part of the measured value).

**A float32 tail.** The coefficients fall fast (``|c_k| ≤ 2τ (L/4)^k/(k+1)!``) while ``‖T_k(S) B‖ ≤ ‖B‖``, so
the products of the last terms need not be exact to float64: from ``k0`` on, ``T_k`` is computed in float32
(the sum in float64). An error ``e_j`` made at step ``j`` reaches ``T_k`` as ``U_{k−j}(S) e_j`` (the
recurrence's solution for a perturbation; ``|U_m| ≤ m + 1`` on ``[−1, 1]``), and a float32 product errs by
about ``√n u₃₂`` relative (probabilistic rounding-error analysis, Higham & Mary 2019, for ``A`` and the
iterates rounded to float32 and the product), so the tail adds about ``2√n u₃₂ Σ_{k≥k0} |c_k| (k − k0 + 2)²``
(an estimate like the float64 one, counted in ``round_off``); ``k0`` is the first index where this is at most
``FLOAT32_RTOL = 1e-12`` relative (``ChebyshevPlan.float32_from``; ``phi_plan(n=...)``; ``usable`` still asks
bound plus round-off ``≤ MAX_REL_ERROR``). A float32 product takes about half the time of a float64 one. (The
quadratic form of :func:`quad_form` takes its ``X_j = T_j(S) B`` from ``j0 ≥ 2`` on in float32 the same way: an
error in ``X_j`` reaches ``Σ_m X_mᵀ Y_m`` through ``2|c_{2j}| + |c_{2j+1}| + |c_{2j−1}|``, so its estimate is
``2 ε Σ_{m≥j0} (m − j0 + 2)² (2|c_{2m}| + |c_{2m+1}| + |c_{2m−1}|)`` relative to ``‖B‖₂²``, with ``ε = 2√n u₃₂``
and ``‖Bᵀ g(Θ) B‖₂ ≥ τ φ(L) ‖B‖₂²``; ``ChebyshevPlan.quad_float32_from``.)

Positive definiteness (all eigenvalues in the interval) is established by a Cholesky factorisation (``n³/3``);
when it fails the caller falls back to ``eigh``, which handles singular and non-PSD kernels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ChebyshevPlan",
    "Deflation",
    "phi_plan",
    "apply_plan",
    "apply_matfun",
    "deflate_top",
    "deflated_plan",
    "deflation_error",
    "deflation_residual",
    "certified_bound",
    "quad_form",
    "spectrum_bound",
    "is_positive_definite",
    "usable",
    "EIGH_FLOPS",
    "MAX_REL_ERROR",
]

#: ``eigh`` of an ``n x n`` float64 matrix with vectors costs about this many ``n³`` GEMM-equivalent FLOPs on the
#: machines measured (tridiagonalisation is memory-bound: 20-25 n³ measured at n=500; taken low, so that eigh is
#: kept when the two are close)
EIGH_FLOPS = 15.0
#: relative accuracy asked of every matrix function (the outputs are compared with eigh's at 1e-10)
RTOL = 1e-13
#: a plan is used only when its bound plus its round-off estimate, relative, is below this
MAX_REL_ERROR = 1e-11
#: above this degree the polynomial is not worth it (eigh is used)
MAX_DEGREE = 160
#: power iterations tried for the top eigenvector, and the relative error asked of the deflation
DEFLATION_STEPS = 40
DEFLATION_RTOL = 1e-14
#: power iteration stops when a step leaves the residual above this fraction of the last one (round-off)
STALL = 0.5
#: the float32 tail (module docstring) is used for matrices of at least this order (below it the products are
#: cheap and the conversions are not)
FLOAT32_MIN_N = 128
#: time of a float32 product relative to a float64 one (GEMM 500 x 500 x 201 on the 2-core machine: 0.45)
FLOAT32_COST = 0.5
#: the round-off estimate of the float32 tail is kept at most this, relative (a tenth of MAX_REL_ERROR)
FLOAT32_RTOL = 1e-12


@dataclass(frozen=True)
class ChebyshevPlan:
    """``g_τ`` on ``[0, b]`` by its Chebyshev interpolant: ``coeffs`` (degree ``len - 1``), ``bound``: the a
    priori bound on ``max_{[0,b]} |p - g_τ|``, ``rel_bound``: the same relative to the least value of ``g_τ`` on
    the kernel's spectrum (``≤ RTOL`` by the choice of degree)."""

    tau: float
    b: float
    coeffs: Tensor
    bound: float
    rel_bound: float
    round_off: float = 0.0  # estimate ``d² · eps · Σ|c_k|`` of the recurrence's round-off (absolute)
    rel_round_off: float = 0.0  # the same, relative
    rel_deflation: float = 0.0  # bound on the error of the deflation (module docstring), relative
    float32_from: Optional[int] = None  # T_k for k >= this in float32 (module docstring); None: all float64
    quad_float32_from: Optional[int] = None  # the same for the X_j = T_j(S) B of quad_form

    @property
    def degree(self) -> int:
        return self.coeffs.numel() - 1

    @property
    def products(self) -> float:
        """The products ``A · (n × m)`` of :func:`apply_plan` in float64 equivalents (a float32 one counts
        :data:`FLOAT32_COST`)."""
        low = self.degree - self.float32_from + 1 if self.float32_from is not None else 0
        return self.degree - low * (1.0 - FLOAT32_COST)


@dataclass(frozen=True)
class Deflation:
    """``Θ ≈ θ vvᵀ + M`` with ``M = PΘP`` formed (module docstring): ``b`` bounds ``M``'s spectrum, ``resid``
    is ``‖Θv − θv‖₂``."""

    v: Tensor
    theta: float
    M: Tensor
    b: float
    resid: float
    estimate: float = math.inf  # a guess of λ_max(M) (not a bound)
    fro: float = math.inf  # ‖M‖_F


def _phi1(x: float) -> float:
    """``φ(x) = -expm1(-x)/x`` with ``φ(0) = 1`` (accurate near 0)."""
    return 1.0 if abs(x) < 1e-300 else -math.expm1(-x) / x


#: the grid of ellipse parameters ``ρ`` the bound is minimised over (1.0001 .. ~1e4, geometric in ``ρ - 1``)
_RHO = 1.0 + np.logspace(-4, 4, 801)
_LOG_RHO = np.log(_RHO)
_LOG_RHO_M1 = np.log(_RHO - 1.0)
_COSH_M1 = (_RHO + 1.0 / _RHO) / 2.0 - 1.0


def _log_bound_terms(L: float) -> np.ndarray:
    """Per ``ρ`` of the grid: ``log(4 e^{a(ρ)} / (ρ - 1))`` with ``a(ρ) = L((ρ + 1/ρ)/2 - 1)/2``; the bound at
    degree ``d`` is ``min_ρ exp(term - d log ρ)`` (module docstring)."""
    return math.log(4.0) + (L / 2.0) * _COSH_M1 - _LOG_RHO_M1


def _bound(L: float, d: int) -> float:
    """``min_ρ 4 e^{a(ρ)} ρ^{-d} / (ρ - 1)`` (module docstring)."""
    return float(np.exp((_log_bound_terms(L) - d * _LOG_RHO).min()))


def _series_bound(L: float, d: int) -> float:
    """``4 (L/4)^{d+1} / (d+2)! / (1 − L/(4(d+3)))``: the bound ``2 Σ_{k>d} |a_k|`` on the degree-``d``
    interpolant's error from the Chebyshev coefficients of ``φ(L(1+s)/2)`` (module docstring); inf where the
    geometric tail does not converge."""
    q = L / (4.0 * (d + 3))
    if q >= 1.0:
        return math.inf
    if L == 0.0:
        return 0.0
    return math.exp(math.log(4.0) + (d + 1) * math.log(L / 4.0) - math.lgamma(d + 3)) / (1.0 - q)


def _degree(L: float, target: float) -> tuple[int, float]:
    """Least degree whose bound (the lesser of the ellipse and the series bound) is ``≤ target``, and that
    bound; ``(MAX_DEGREE + 1, inf)`` if none. Per ``ρ`` the least degree of the ellipse bound is
    ``⌈(term(ρ) - log target) / log ρ⌉``, and the answer is their minimum; the series bound is tried below it."""
    need = np.maximum(np.ceil((_log_bound_terms(L) - math.log(target)) / _LOG_RHO), 1.0)
    d = int(need.min())
    for k in range(1, min(d, MAX_DEGREE + 1)):
        e = _series_bound(L, k)
        if e <= target:
            return k, e
    if d > MAX_DEGREE:
        return MAX_DEGREE + 1, math.inf
    return d, min(_bound(L, d), _series_bound(L, d))


def _coeffs(L: float, d: int) -> np.ndarray:
    """Chebyshev coefficients of the degree-``d`` interpolant of ``φ(L(1+s)/2)`` in the ``d + 1`` Chebyshev
    points of the second kind ``s_j = cos(πj/d)`` (the discrete cosine transform of the values)."""
    j = np.arange(d + 1, dtype=np.float64)
    x = L * (1.0 + np.cos(math.pi * j / d)) / 2.0
    v = np.array([_phi1(float(xi)) for xi in x])
    v[0] *= 0.5
    v[-1] *= 0.5
    c = (2.0 / d) * (np.cos(math.pi * np.outer(j, j) / d) @ v)
    c[0] /= 2.0
    c[-1] /= 2.0
    return c


def _quad_last(d: int) -> int:
    """The last ``j`` for which :func:`quad_form` computes ``X_j = T_j(S) B`` at degree ``d``: ``⌈d/2⌉``."""
    return d // 2 + 1 if d % 2 else d // 2


def _step(t0: Tensor, a: Tensor, t1: Tensor, alpha: float, out: Optional[Tensor] = None) -> Tensor:
    """One step of the Chebyshev recurrence, ``2 S t1 − t0`` with ``S = alpha·a − I``."""
    return torch.addmm(t0, a, t1, beta=-1.0, alpha=2.0 * alpha, out=out).sub_(t1, alpha=2.0)


def _float32_round_off(c: np.ndarray, k0: int, n: int) -> float:
    """The round-off estimate of the float32 tail from ``T_{k0}`` on (module docstring):
    ``2√n u₃₂ Σ_{k≥k0} |c_k| (k − k0 + 2)²``."""
    k = np.arange(k0, c.size)
    return 2.0 * math.sqrt(n) * 2.0**-24 * float((np.abs(c[k0:]) * (k - k0 + 2.0) ** 2).sum())


def _quad_float32_round_off(c: np.ndarray, j0: int, n: int) -> float:
    """The round-off estimate of :func:`quad_form` with ``X_j`` from ``j0`` on in float32 (module docstring):
    ``2 ε Σ_{m≥j0} (m − j0 + 2)² (2|c_{2m}| + |c_{2m+1}| + |c_{2m−1}|)``, ``ε = 2√n u₃₂``, relative to
    ``‖B‖₂²``."""
    need = _quad_last(c.size - 1)
    cc = np.abs(np.concatenate([c, np.zeros(3)]))
    w = [(m - j0 + 2.0) ** 2 * (2 * cc[2 * m] + cc[2 * m + 1] + cc[2 * m - 1]) for m in range(j0, need + 1)]
    return 2.0 * 2.0 * math.sqrt(n) * 2.0**-24 * float(sum(w))


def phi_plan(
    tau: float, b: float, rtol: float = RTOL, b_kernel: Optional[float] = None, n: Optional[int] = None
) -> ChebyshevPlan:
    """The plan for ``g_τ = τ φ(τ ·)`` on ``[0, b]``; its degree is ``MAX_DEGREE + 1`` when none suffices.

    ``b_kernel`` (default ``b``) bounds the spectrum of the whole kernel: the error is asked relative to
    ``g_τ``'s least value there, ``τ φ(τ b_kernel)`` (with a deflation ``b`` bounds only the rest). ``n``: the
    order of the matrix, which allows the float32 tail (module docstring) from the first ``k`` whose round-off
    estimate is at most :data:`FLOAT32_RTOL` relative."""
    if tau == 0.0:  # g_0 = 0: nothing has been learnt at t = 0
        return ChebyshevPlan(tau, b, torch.zeros(1, dtype=torch.float64), 0.0, 0.0)
    L = tau * b
    floor = _phi1(tau * (b if b_kernel is None else max(b, b_kernel)))
    d, e = _degree(L, rtol * floor)
    if d > MAX_DEGREE:
        inf = math.inf
        return ChebyshevPlan(tau, b, torch.zeros(MAX_DEGREE + 2, dtype=torch.float64), inf, inf, inf, inf)
    c = tau * _coeffs(L, d)
    rnd = d * d * 2.0**-52 * float(np.abs(c).sum())
    low = quad_low = None
    if n is not None and n >= FLOAT32_MIN_N:
        target = FLOAT32_RTOL * tau * floor
        low = next((k for k in range(1, d + 1) if _float32_round_off(c, k, n) <= target), None)
        # quad_form computes X_0 .. X_{⌈d/2⌉}; X_0 = B and X_1 = S B stay in float64
        quad_low = next((j for j in range(2, _quad_last(d) + 1) if _quad_float32_round_off(c, j, n) <= target), None)
        # one plan may serve either function: both tails' estimates are counted
        rnd += (0.0 if low is None else _float32_round_off(c, low, n)) + (
            0.0 if quad_low is None else _quad_float32_round_off(c, quad_low, n)
        )
    return ChebyshevPlan(
        tau,
        b,
        torch.from_numpy(c),
        tau * e,
        e / floor,
        rnd,
        rnd / (tau * floor),
        float32_from=low,
        quad_float32_from=quad_low,
    )


def deflation_error(tau: float, resid: float, b_kernel: float) -> float:
    """The deflation's error bound relative to ``‖g_τ(Θ) B‖₂``: ``τ ‖r‖ / (√2 φ(τ b_kernel))`` (module
    docstring); ``resid`` is ``‖r‖``."""
    return tau * resid / (math.sqrt(2.0) * _phi1(tau * b_kernel))


def deflation_residual(tau: float, b_kernel: float, rtol: float = DEFLATION_RTOL) -> float:
    """The residual ``‖r‖`` at which :func:`deflation_error` is ``rtol``."""
    return rtol / deflation_error(tau, 1.0, b_kernel)


def deflated_plan(
    tau: float, defl: Deflation, b_kernel: float, rtol: float = RTOL, n: Optional[int] = None
) -> ChebyshevPlan:
    """:func:`phi_plan` on ``[0, defl.b]`` with the deflation's error bound (:func:`deflation_error`)."""
    plan = phi_plan(tau, defl.b, rtol, b_kernel, n)
    if tau == 0.0:
        return plan
    return dataclasses.replace(plan, rel_deflation=deflation_error(tau, defl.resid, max(b_kernel, defl.b)))


def usable(plan: ChebyshevPlan) -> bool:
    """The plan's degree is at most ``MAX_DEGREE`` and its bound plus round-off (plus the deflation's error),
    relative, ``≤ MAX_REL_ERROR``."""
    return plan.degree <= MAX_DEGREE and plan.rel_bound + plan.rel_round_off + plan.rel_deflation <= MAX_REL_ERROR


def apply_plan(A: Tensor, B: Tensor, plan: ChebyshevPlan) -> Tensor:
    """``p(A) B`` for the plan's polynomial ``p ≈ g_τ``: ``Σ_k c_k T_k(S) B`` with ``S = (2/b) A - I`` (the
    interval ``[0, b]`` mapped to ``[-1, 1]``), by ``T_{k+1} = 2 S T_k - T_{k-1}``: ``degree`` products, those
    of ``T_k`` for ``k ≥ plan.float32_from`` in float32 (the sum stays in ``B``'s dtype)."""
    c = plan.coeffs.tolist()
    alpha = 2.0 / plan.b
    low = len(c) if plan.float32_from is None or A.dtype != torch.float64 else plan.float32_from
    t0 = B
    out = c[0] * t0
    if len(c) == 1:
        return out
    a = A
    if low <= 1:
        a, t0 = A.to(torch.float32), t0.to(torch.float32)
    t1 = torch.addmm(t0, a, t0, beta=-1.0, alpha=alpha)  # S B = (2/b) A B - B
    out.add_(t1, alpha=c[1])
    for k in range(2, len(c)):
        if k == low:  # the tail, whose coefficients are small enough for float32 products (module docstring)
            a, t0, t1 = A.to(torch.float32), t0.to(torch.float32), t1.to(torch.float32)
        t2 = _step(t0, a, t1, alpha)
        out.add_(t2, alpha=c[k])
        t0, t1 = t1, t2
    return out


def _split(defl: Deflation, B: Tensor, plan: ChebyshevPlan) -> tuple[Tensor, Tensor, float]:
    """``(PB, c, g(θ))`` with ``c = vᵀB``: the parts of ``g(Θ̂) B = g(θ) v c + g(M) PB`` (module docstring)."""
    c = defl.v @ B
    return torch.addr(B, defl.v, c, alpha=-1.0), c, plan.tau * _phi1(plan.tau * defl.theta)


def apply_matfun(A: Tensor, B: Tensor, plan: ChebyshevPlan, defl: Optional[Deflation] = None) -> Tensor:
    """``p(A) B`` (:func:`apply_plan`), or with a deflation ``g(θ) v (vᵀB) + p(M)(B - v vᵀB)`` (module
    docstring); ``plan`` is then the plan on ``[0, defl.b]``."""
    if defl is None:
        return apply_plan(A, B, plan)
    pb, c, g_theta = _split(defl, B, plan)
    return apply_plan(defl.M, pb, plan).addr_(defl.v, c, alpha=g_theta)


def spectrum_bound(A: Tensor, fro: Optional[float] = None) -> float:
    """An upper bound on ``λ_max`` of the symmetric ``A``: ``min(‖A‖_∞, ‖A‖_F)`` (both bound the spectral
    norm; ``fro``: ``‖A‖_F`` when known), nudged up by round-off."""
    f = float(torch.linalg.matrix_norm(A)) if fro is None else fro
    b = min(float(A.abs().sum(1).max()), f)
    return b * (1.0 + 1e-12) + 1e-300


def deflate_top(A: Tensor, resid_target: float, steps: int = DEFLATION_STEPS) -> Optional[Deflation]:
    """The top eigenpair of the symmetric positive definite ``A`` by power iteration from ``A·1`` (the constant
    mode a kernel's top eigenvector is close to), stopped once ``‖Av − θv‖₂ ≤ resid_target``, or when a step
    no longer halves it (round-off; the caller judges the residual reached); ``None`` after ``steps``
    matrix-vector products without either (no dominant eigenvalue). Returns the deflation with
    ``M = PAP = A − v uᵀ − u vᵀ`` (``u = Av − θv/2``; one product of rank 2), its spectrum bound
    (:func:`spectrum_bound`) and an estimate of ``λ_max(M)`` (``θ`` times the residuals' mean ratio, which
    tends to ``λ_2/λ_1``; only a guess for :func:`certified_bound`)."""
    n = A.shape[0]
    if n < 2:
        return None
    w = A.sum(1)
    nw = float(torch.linalg.vector_norm(w))
    if not (nw > 0.0 and math.isfinite(nw)):
        return None
    v = w / nw
    first, k, last = 0.0, 0, math.inf
    for _ in range(steps):
        w = A @ v
        theta = float(v @ w)
        resid = float(torch.linalg.vector_norm(w - theta * v))
        first, k = (resid, 0) if k == 0 and first == 0.0 else (first, k + 1)
        # the residuals' mean rate of decrease since the first step (tends to λ_2/λ_1)
        ratio = (resid / first) ** (1.0 / k) if k > 0 and first > 0.0 and resid > 0.0 else 1.0
        # done at the target, or where round-off stops the residual's decrease (the caller's error budget
        # then decides: ChebyshevPlan.rel_deflation)
        if resid <= resid_target or resid > STALL * last:
            # M = A - v wᵀ - w vᵀ + θ v vᵀ = A - v uᵀ - u vᵀ with u = w - (θ/2) v (symmetric in one form)
            u = w.sub(v, alpha=theta / 2.0)
            M = torch.addmm(A, torch.stack([v, u], 1), torch.stack([u, v]), alpha=-1.0)
            fro = float(torch.linalg.matrix_norm(M))
            return Deflation(v, theta, M, spectrum_bound(M, fro), resid, min(1.0, ratio) * theta, fro)
        last = resid
        nw = float(torch.linalg.vector_norm(w))
        if not (nw > 0.0 and math.isfinite(nw)):
            return None
        v = w / nw
    return None


def certified_bound(M: Tensor, beta: float, fro: float) -> Optional[float]:
    """An upper bound on ``λ_max`` of the symmetric ``M`` (``fro = ‖M‖_F``) near ``beta``, proven by a float32
    Cholesky factorisation of ``C = βI − M`` (half the cost of a float64 one), or ``None`` if it fails.

    ``C₃₂ = −fl₃₂(M) + β`` on the diagonal differs from ``C`` by ``E`` with ``‖E‖₂ ≤ ‖E‖_F ≤ u(‖M‖_F + tr C₃₂)``
    (``u = 2⁻²⁴``; one rounding per entry, two on the diagonal). If the factorisation of ``C₃₂`` completes, the
    computed factor satisfies ``RᵀR = C₃₂ + ΔC`` with ``|ΔC| ≤ γ_{n+1} |Rᵀ||R|`` (Higham, *Accuracy and Stability
    of Numerical Algorithms*, 2002, Thm 10.3; ``γ_k = k u / (1 − k u)``), so ``‖ΔC‖₂ ≤ γ_{n+1} ‖R‖_F²`` and,
    taking the trace of the same relation, ``‖R‖_F² ≤ tr C₃₂ / (1 − γ_{n+1})``. As ``RᵀR ⪰ 0``,
    ``C ⪰ −(‖ΔC‖₂ + ‖E‖₂) I``, i.e. ``λ_max(M) ≤ β + ‖ΔC‖₂ + ‖E‖₂``, which is returned (nudged up)."""
    n = M.shape[0]
    C = M.to(torch.float32).neg_()
    C.diagonal().add_(beta)
    info = torch.linalg.cholesky_ex(C)[1]
    if int(info) != 0:
        return None
    u = 2.0**-24
    gamma = (n + 1) * u / (1.0 - (n + 1) * u)
    trace = float(C.diagonal().to(torch.float64).sum())
    slack = gamma * trace / (1.0 - gamma) + u * (fro + trace)
    return beta + slack * (1.0 + 1e-6)


def quad_form(A: Tensor, B: Tensor, plan: ChebyshevPlan, defl: Optional[Deflation] = None) -> Tensor:
    """``Bᵀ p(A) B`` (``p`` the plan's polynomial) with half of :func:`apply_plan`'s products: with
    ``X_j = T_j(S) B`` and ``T_{a+b} = 2 T_a T_b − T_{|a−b|}`` (``S`` symmetric),

        Bᵀ T_{2m} B = 2 X_mᵀ X_m − X_0ᵀ X_0,      Bᵀ T_{2m+1} B = 2 X_mᵀ X_{m+1} − X_0ᵀ X_1,

    so ``Σ_k c_k Bᵀ T_k B = 2 Σ_m X_mᵀ Y_m`` with ``Y_m = c_{2m} X_m + c_{2m+1} X_{m+1}`` (and ``Y_0`` less
    ``(Σ_even c / 2) X_0 + (Σ_odd c / 2) X_1``): ``⌈d/2⌉`` products ``A · (n × m)`` and one product
    ``(m × (M+1)n) · ((M+1)n × m)``, ``M = ⌊d/2⌋``. With a deflation (``plan`` on ``[0, defl.b]``, module
    docstring): ``g(θ) cᵀc + (PB)ᵀ p(M) (PB)``, ``c = vᵀB``. Returned symmetric."""
    c = plan.coeffs.tolist()
    d = len(c) - 1
    base, g_theta, cv = A, 0.0, None
    if defl is not None:
        B, cv, g_theta = _split(defl, B, plan)
        base = defl.M
    n, m = B.shape
    top = d // 2
    need = _quad_last(d)  # X_0 .. X_need are computed; X_{top+1} stays 0 for an even degree
    X = B.new_zeros((top + 2, n, m))
    X[0].copy_(B)
    low = need + 1 if plan.quad_float32_from is None or base.dtype != torch.float64 else plan.quad_float32_from
    if need >= 1:
        alpha = 2.0 / plan.b
        torch.addmm(X[0], base, X[0], beta=-1.0, alpha=alpha, out=X[1])  # S B
        for j in range(2, min(low, need + 1)):
            _step(X[j - 2], base, X[j - 1], alpha, out=X[j])
        if low <= need:  # the tail in float32 (module docstring), stored in the float64 buffer
            a32 = base.to(torch.float32)
            t0, t1 = X[low - 2].to(torch.float32), X[low - 1].to(torch.float32)
            for j in range(low, need + 1):
                t0, t1 = t1, _step(t0, a32, t1, alpha)
                X[j].copy_(t1)
    cc = c + [0.0]
    even = torch.tensor(cc[0 : 2 * top + 1 : 2], dtype=B.dtype, device=B.device)[:, None, None]
    odd = torch.tensor(cc[1 : 2 * top + 2 : 2], dtype=B.dtype, device=B.device)[:, None, None]
    Y = torch.addcmul(X[: top + 1] * even, X[1 : top + 2], odd)
    even_sum, odd_sum = sum(c[0::2]), sum(c[1::2])
    Y[0].sub_(X[0], alpha=even_sum / 2.0)
    if need >= 1:
        Y[0].sub_(X[1], alpha=odd_sum / 2.0)
    out = torch.mm(X[: top + 1].reshape(-1, m).T, Y.reshape(-1, m)).mul_(2.0)
    if cv is not None:
        out.addr_(cv, cv, alpha=g_theta)
    return (out + out.T) / 2.0


def is_positive_definite(A: Tensor) -> bool:
    """``A`` has a Cholesky factor (every eigenvalue ``> 0``, to round-off)."""
    return int(torch.linalg.cholesky_ex(A)[1]) == 0
