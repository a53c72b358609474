"""Matrix functions of a train kernel applied to a block of columns without its eigendecomposition.

Gradient flow on MSE needs, for finite ``t`` and ``τ = η t / N``, the function

    g_τ(λ) = (1 - exp(-τ λ)) / λ = τ φ(τ λ),      φ(x) = (1 - e^{-x}) / x = ∫_0^1 e^{-x u} du,

of the (regularised, positive definite) train kernel ``Θ`` applied to the targets and to the test-train kernel
(``g_τ(0) = τ``, the limit the eigendecomposition path uses too). ``φ`` is entire, so on the spectrum interval
``[0, b]`` (``b ≥ λ_max``: ``min(‖Θ‖_∞, ‖Θ‖_F)``) its Chebyshev interpolant of degree ``d`` converges
geometrically, and ``p_d(Θ) B`` costs ``d`` products ``Θ · (n × m)`` (the three-term recurrence of Chebyshev
polynomials), against ``~20 n³`` for ``eigh`` plus its back-transformations.

A priori error bound (Trefethen, *Approximation Theory and Approximation Practice*, 2013, Thm 8.2): if ``f``
is analytic in the Bernstein ellipse ``E_ρ`` (foci ±1, semi-axes summing to ``ρ > 1``) of the interval mapped
to ``[-1, 1]`` and ``|f| ≤ M_ρ`` there, the degree-``d`` interpolant in Chebyshev points satisfies
``max_{[-1,1]} |f - p_d| ≤ 4 M_ρ ρ^{-d} / (ρ - 1)``. For ``f(s) = φ(L (1 + s) / 2)`` (``L = τ b``) on ``E_ρ``,
``Re x ≥ -a`` with ``a = L ((ρ + 1/ρ)/2 - 1) / 2``, and ``|φ(x)| ≤ ∫_0^1 e^{a u} du ≤ e^{a}``: so
``M_ρ = e^{a}``, minimised over a grid of ``ρ``. Since every eigenvalue of ``Θ`` lies in ``[0, b]``,
``‖p_d(Θ) B - g_τ(Θ) B‖₂ ≤ τ ε_d ‖B‖₂`` with ``ε_d`` that bound; the degree is the least with
``ε_d ≤ rtol · φ(L)`` (``φ(L)`` is the least value of ``φ`` on the interval, so the error is at most ``rtol``
relative to ``‖g_τ(Θ) B‖₂``). Round-off of the recurrence adds at most about ``d²·eps·Σ|c_k|`` (the growth
of the Chebyshev recurrence's errors, Smoktunowicz 2002, "Backward stability of Clenshaw's algorithm"; an
estimate, reported in the plan and checked by the tests).

Positive definiteness (all eigenvalues in the interval) is established by a Cholesky factorisation (``n³/3``);
when it fails the caller falls back to ``eigh``, which handles singular and non-PSD kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ChebyshevPlan",
    "phi_plan",
    "apply_plan",
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


@dataclass(frozen=True)
class ChebyshevPlan:
    """``g_τ`` on ``[0, b]`` by its Chebyshev interpolant: ``coeffs`` (degree ``len - 1``), ``bound``: the a
    priori bound on ``max_{[0,b]} |p - g_τ|``, ``rel_bound``: the same relative to ``g_τ``'s least value on
    ``[0, b]`` (``≤ RTOL`` by the choice of degree)."""

    tau: float
    b: float
    coeffs: Tensor
    bound: float
    rel_bound: float
    round_off: float = 0.0  # estimate ``d² · eps · Σ|c_k|`` of the recurrence's round-off (absolute)
    rel_round_off: float = 0.0  # the same relative to ``g_τ``'s least value on ``[0, b]``

    @property
    def degree(self) -> int:
        return self.coeffs.numel() - 1


def _phi(x: Tensor) -> Tensor:
    """``φ(x) = -expm1(-x)/x`` with ``φ(0) = 1`` (accurate near 0)."""
    small = x.abs() < 1e-300
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, torch.ones_like(x), -torch.expm1(-safe) / safe)


#: the grid of ellipse parameters ``ρ`` the bound is minimised over (1.0001 .. ~1e4, geometric in ``ρ - 1``)
_RHO = 1.0 + torch.logspace(-4, 4, 801, dtype=torch.float64)


def _log_bound_terms(L: float) -> Tensor:
    """Per ``ρ`` of the grid: ``log(4 e^{a(ρ)} / (ρ - 1))`` with ``a(ρ) = L((ρ + 1/ρ)/2 - 1)/2``; the bound at
    degree ``d`` is ``min_ρ exp(term - d log ρ)`` (module docstring)."""
    rho = _RHO
    a = L * ((rho + 1.0 / rho) / 2.0 - 1.0) / 2.0
    return math.log(4.0) + a - torch.log(rho - 1.0)


def _bound(L: float, d: int) -> float:
    """``min_ρ 4 e^{a(ρ)} ρ^{-d} / (ρ - 1)`` (module docstring)."""
    return float(torch.exp((_log_bound_terms(L) - d * torch.log(_RHO)).min()))


def _degree(L: float, rtol: float) -> tuple[int, float]:
    """Least degree whose bound is ``≤ rtol · φ(L)``, and that bound; ``(MAX_DEGREE + 1, inf)`` if none. Per
    ``ρ`` the least such degree is ``⌈(term(ρ) - log target) / log ρ⌉``; the answer is their minimum."""
    target = math.log(rtol * float(_phi(torch.tensor(L, dtype=torch.float64))))
    need = torch.ceil((_log_bound_terms(L) - target) / torch.log(_RHO)).clamp_min(1)
    d = int(need.min())
    if d > MAX_DEGREE:
        return MAX_DEGREE + 1, math.inf
    return d, _bound(L, d)


def _coeffs(L: float, d: int) -> Tensor:
    """Chebyshev coefficients of the degree-``d`` interpolant of ``φ(L(1+s)/2)`` in the ``d + 1`` Chebyshev
    points of the second kind ``s_j = cos(πj/d)`` (the discrete cosine transform of the values)."""
    j = torch.arange(d + 1, dtype=torch.float64)
    s = torch.cos(math.pi * j / d)
    v = _phi(L * (1.0 + s) / 2.0)
    w = torch.ones(d + 1, dtype=torch.float64)
    w[0] = w[-1] = 0.5
    c = (2.0 / d) * torch.cos(math.pi * torch.outer(j, j) / d) @ (w * v)
    c[0] /= 2.0
    c[-1] /= 2.0
    return c


def phi_plan(tau: float, b: float, rtol: float = RTOL) -> ChebyshevPlan:
    """The plan for ``g_τ = τ φ(τ ·)`` on ``[0, b]``; its degree is ``MAX_DEGREE + 1`` when none suffices."""
    if tau == 0.0:  # g_0 = 0: nothing has been learnt at t = 0
        return ChebyshevPlan(tau, b, torch.zeros(1, dtype=torch.float64), 0.0, 0.0)
    L = tau * b
    d, e = _degree(L, rtol)
    if d > MAX_DEGREE:
        inf = math.inf
        return ChebyshevPlan(tau, b, torch.zeros(MAX_DEGREE + 2, dtype=torch.float64), inf, inf, inf, inf)
    phil = float(_phi(torch.tensor(L, dtype=torch.float64)))
    c = tau * _coeffs(L, d)
    rnd = d * d * 2.0**-52 * float(c.abs().sum())
    return ChebyshevPlan(tau, b, c, tau * e, e / phil, rnd, rnd / (tau * phil))


def usable(plan: ChebyshevPlan) -> bool:
    """The plan's degree is at most ``MAX_DEGREE`` and its bound plus round-off, relative, ``≤ MAX_REL_ERROR``."""
    return plan.degree <= MAX_DEGREE and plan.rel_bound + plan.rel_round_off <= MAX_REL_ERROR


def apply_plan(A: Tensor, B: Tensor, plan: ChebyshevPlan) -> Tensor:
    """``p(A) B`` for the plan's polynomial ``p ≈ g_τ``: ``Σ_k c_k T_k(S) B`` with ``S = (2/b) A - I`` (the
    interval ``[0, b]`` mapped to ``[-1, 1]``), by ``T_{k+1} = 2 S T_k - T_{k-1}``: ``degree`` products."""
    c = plan.coeffs.tolist()
    alpha = 2.0 / plan.b
    t0 = B
    out = c[0] * t0
    if len(c) == 1:
        return out
    t1 = torch.addmm(t0, A, t0, beta=-1.0, alpha=alpha)  # S B = (2/b) A B - B
    out.add_(t1, alpha=c[1])
    for ck in c[2:]:
        t2 = torch.addmm(t0, A, t1, beta=-1.0, alpha=2.0 * alpha).sub_(t1, alpha=2.0)  # 2 S t1 - t0
        out.add_(t2, alpha=ck)
        t0, t1 = t1, t2
    return out


def spectrum_bound(A: Tensor) -> float:
    """An upper bound on ``λ_max`` of the symmetric ``A``: ``min(‖A‖_∞, ‖A‖_F)`` (both bound the spectral
    norm), nudged up by round-off."""
    b = min(float(A.abs().sum(1).max()), float(torch.linalg.matrix_norm(A)))
    return b * (1.0 + 1e-12) + 1e-300


def is_positive_definite(A: Tensor) -> bool:
    """``A`` has a Cholesky factor (every eigenvalue ``> 0``, to round-off)."""
    return int(torch.linalg.cholesky_ex(A)[1]) == 0
