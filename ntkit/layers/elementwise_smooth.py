"""Smooth nonlinearities whose Gaussian expectations are exponentials: GELU, sine/cosine, RBF features, the
Gaussian bump, the exponential and NT's normalised exponential kernel.

All are :class:`~ntkit.layers.elementwise.RuleLayer` s: ``rule(q12, q11, q22, need_dot)`` returns the new
covariance ``K' = E[φ(u) φ(v)]`` and ``K̇ = E[φ'(u) φ'(v)] = ∂K'/∂q12`` for
``(u, v) ~ N(0, [[q11, q12], [q12, q22]])``; ``var_fn(q) = E[φ(u)²]`` for ``u ~ N(0, q)``. The identity behind
most of them is the Gaussian moment-generating function ``E[exp(s·u + t·v)] = exp((s²q11 + 2st·q12 + t²q22)/2)``
(and its characteristic-function twin for ``sin``/``cos``). Parameters and defaults are neural-tangents'.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ntkit.layers.base import Layer, LayerError, LiftOptions, lift_rule
from ntkit.layers.elementwise import RuleLayer, _root_det, _safe_rho

__all__ = ["Gelu", "Sin", "Cos", "Rbf", "Gaussian", "Exp", "ExpNormalized", "Gabor"]

_PI = math.pi


def _check_finite(t: Tensor, layer: RuleLayer, hint: str) -> Tensor:
    """One clear error instead of an Inf that later turns into NaN."""
    if not bool(torch.isfinite(t).all()):
        raise LayerError(
            f"{layer!r}: the kernel overflows {t.dtype} ({hint}). Scale the inputs or W_std down, "
            f"or compute in float64."
        )
    return t


class Gelu(RuleLayer):
    """GELU, ``φ(x) = x·Φ(x)`` (Hendrycks & Gimpel 2016); ``approximate=True`` uses the tanh approximation
    ``x/2·(1 + tanh(√(2/π)(x + 0.044715 x³)))`` in the finite network only.

    Kernel (Tsuchida et al. 2021, "Avoiding kernel fixed points: computing with ELU and GELU infinite
    networks", arXiv:2002.08517), with ``P = (1 + q11)(1 + q22)``, ``δ = √(P − q12²)`` and
    ``α = atan2(q12, δ)``::

        K' = q12/4 + [ (q12² + q11 q22 δ²) / (P δ) + q12·α ] / (2π)
        K̇  = 1/4 + α/(2π) + q12/(2π δ) · (1/δ² + (1 − q11 q22)/P + 1)
        E[φ(u)²] = q·(1/4 + [ q/((1 + q)√(1 + 2q)) + atan(q/√(1 + 2q))/2 ] / π)

    (evaluated in a rearranged form without cancellation or overflow at any variance; see ``rule``).

    ``approximate=True`` keeps the exact-GELU kernel, as NT does: the kernel describes exact GELU, and the
    tanh form differs from it by at most 4.7e-4 (absolute, near ``|x| ≈ 2.7``), so a finite network built
    with it matches the kernel to that level, not exactly.
    """

    def __init__(self, approximate: bool = False):
        self.approximate = bool(approximate)

    def fn(self, x):
        return torch.nn.functional.gelu(x, approximate="tanh" if self.approximate else "none")

    def rule(self, q12, q11, q22, need_dot):
        # the formulas of the docstring, rearranged so that no term overflows or cancels: with
        # β = π/2 + α ∈ [0, π], q12/4 + q12·α/(2π) = q12·β/(2π) and 1/4 + α/(2π) = β/(2π);
        # (q12² + q11 q22 δ²)/(P δ) = (q12/(1+q11))·(q12/(1+q22))/δ + r11 r22 δ with r = q/(1+q); and
        # 1/δ² + (1 − q11 q22)/P + 1 = 1/δ² + 1/(1+q11) + 1/(1+q22). δ = m·S by _root_det (c = 1).
        m, root = _root_det(1.0, q12, q11, q22)
        d = m * root
        # α = atan2(q12, δ) = atan(q12/δ) (δ > 0; atan, not atan2, whose rounding depends on the position in
        # the tensor on CPU)
        beta = torch.atan((q12 / m) / root) + _PI / 2
        p1, p2 = 1 + q11, 1 + q22
        nngp = (q12 * beta + ((q12 / p1) * (q12 / p2)) / d + (q11 / p1) * (q22 / p2) * d) / (2 * _PI)
        dot = None
        if need_dot:
            dot = (beta + (q12 / d) * ((1 / d) / d + (1 / p1 + 1 / p2))) / (2 * _PI)  # symmetric sums
        return nngp, dot

    def var_fn(self, q):
        r = torch.sqrt(1 + 2 * q)
        return q * (0.25 + ((q / (1 + q)) / r + torch.atan(q / r) / 2) / _PI)

    def mean_fn(self, q):
        """``E[u Φ(u)] = q·E[Φ'(u)] = q/√(2π(1 + q))`` (Stein's lemma)."""
        return q / torch.sqrt(2 * _PI * (1 + q))


class Sin(RuleLayer):
    """``φ(x) = a·sin(b·x + c)`` (NT's defaults a=1, b=1, c=0; ``c`` is an input phase).

    From ``sin(α)sin(β) = (cos(α − β) − cos(α + β))/2`` and ``E[cos(s·u + t·v + φ)] =
    cos(φ)·exp(−(s²q11 + 2st·q12 + t²q22)/2)``, with ``S = q11 + q22``::

        K' = a²/2 · [ exp(−b²(S − 2q12)/2) − cos(2c)·exp(−b²(S + 2q12)/2) ]
        K̇  = a²b²/2 · [ exp(−b²(S − 2q12)/2) + cos(2c)·exp(−b²(S + 2q12)/2) ]
        E[φ(u)²] = a²/2 · (1 − cos(2c)·exp(−2b²q))
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        self.a, self.b, self.c = float(a), float(b), float(c)

    @property
    def _phase(self) -> float:
        return self.c

    def fn(self, x):
        return self.a * torch.sin(self.b * x + self._phase)

    def rule(self, q12, q11, q22, need_dot):
        h, b2, cos2c = self.a**2 / 2, self.b**2, math.cos(2 * self._phase)
        # (S − 2q12)/2 as ((q11 − q12) + (q22 − q12))/2: each difference is exact for nearly parallel inputs
        # (Sterbenz), where q12 − S/2 would keep only the round-off of S at large variance
        # (both exponents are ≤ 0 for a covariance, |q12| ≤ (q11 + q22)/2; round-off above 0 is clamped, since
        # at large variance it would overflow exp)
        e_minus = torch.exp((b2 * ((q12 - q11) + (q12 - q22)) / 2).clamp_max(0.0))  # exp(−b²(S − 2q12)/2)
        e_plus = torch.exp((-b2 * ((q12 + q11) + (q12 + q22)) / 2).clamp_max(0.0))  # exp(−b²(S + 2q12)/2)
        nngp = h * (e_minus - cos2c * e_plus)
        dot = h * b2 * (e_minus + cos2c * e_plus) if need_dot else None
        return nngp, dot

    def var_fn(self, q):
        return self.a**2 / 2 * (1 - math.cos(2 * self._phase) * torch.exp(-2 * self.b**2 * q))

    def mean_fn(self, q):
        """``E[a·sin(b u + c)] = a·sin(c)·exp(−b²q/2)`` (characteristic function)."""
        s = math.sin(self._phase)
        return None if abs(s) < 1e-15 else self.a * s * torch.exp(-(self.b**2) * q / 2)


class Cos(Sin):
    """``φ(x) = a·cos(b·x + c) = a·sin(b·x + c + π/2)``: :class:`Sin`'s kernel with phase ``c + π/2``
    (so ``cos(2c)`` there becomes ``−cos(2c)``). NT's defaults a=1, b=1, c=0."""

    @property
    def _phase(self) -> float:
        return self.c + _PI / 2

    def fn(self, x):
        return self.a * torch.cos(self.b * x + self.c)


class Rbf(RuleLayer):
    """Random-Fourier-feature activation ``φ(x) = √2·sin(√(2γ)·x + π/4)`` (Rahimi & Recht 2007), whose kernel
    is the RBF kernel of its inputs: :class:`Sin` with ``a = √2, b = √(2γ), c = π/4``, where ``cos(2c) = 0``::

        K' = exp(−γ·(q11 + q22 − 2 q12))       (= exp(−γ|x − x'|²/d) right after a Dense layer)
        K̇  = 2γ·K'
        E[φ(u)²] = 1

    ``gamma = 1/(2ℓ²)`` for length-scale ℓ (NT's default 1).
    """

    def __init__(self, gamma: float = 1.0):
        gamma = float(gamma)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma={gamma!r} must be a finite number >= 0 (the frequency is sqrt(2*gamma)).")
        self.gamma = gamma

    def fn(self, x):
        return math.sqrt(2) * torch.sin(math.sqrt(2 * self.gamma) * x + _PI / 4)

    def rule(self, q12, q11, q22, need_dot):
        # (q12 − q11) + (q12 − q22): exactly symmetric in (q11, q22) and without cancellation for nearly
        # parallel inputs at large variance (each difference is exact there); ≤ 0 for a covariance (round-off
        # above 0 is clamped: it would overflow exp at large variance)
        nngp = torch.exp((self.gamma * ((q12 - q11) + (q12 - q22))).clamp_max(0.0))
        return nngp, (2 * self.gamma * nngp if need_dot else None)

    def var_fn(self, q):
        return torch.ones_like(q)

    def mean_fn(self, q):
        """``E[√2 sin(√(2γ) u + π/4)] = exp(−γ q)``."""
        return torch.exp(-self.gamma * q)


class Gaussian(RuleLayer):
    """Gaussian bump ``φ(x) = a·exp(b·x²)`` (NT's defaults a=1, b=−1).

    With ``D² = (1 − 2b q11)(1 − 2b q22) − 4b² q12²`` (the determinant of ``I − 2b·Σ``)::

        K' = a² / D,      K̇ = 4a²b²·q12 / D³,      E[φ(u)²] = a² / √(1 − 4b q)

    ``D`` is evaluated as ``1 − 2b(q11 + q22) + 4b²(q11 q22 − q12²)`` with an exact discriminant and a
    power-of-2 scaling (no cancellation on the diagonal, no overflow up to variances of 1e300).

    For ``b > 0`` the expectation is finite only while ``4b·q < 1``; beyond that the layer raises.
    """

    def __init__(self, a: float = 1.0, b: float = -1.0):
        self.a, self.b = float(a), float(b)

    def fn(self, x):
        return self.a * torch.exp(self.b * x * x)

    def _root(self, q12, q11, q22) -> tuple[Tensor, Tensor]:
        """``(m, S)`` with ``m·S = D = √det(I − 2b·Σ)`` (:func:`~ntkit.layers.elementwise._root_det`: exact and
        without overflow for any variances; the product form cancelled to 0 on the diagonal at large variance,
        returning 6.7e153 for 6.5e-16); raises where the expectation is infinite (``b > 0``)."""
        b = self.b
        m, root = _root_det(2 * abs(b), q12, q11, q22, sign=-1.0 if b > 0 else 1.0)
        if b > 0 and not bool(((root > 0).all() & ((1 - 2 * b * torch.maximum(q11, q22)) > 0).all()).detach()):
            raise LayerError(
                f"{self!r}: E[exp(b·u²)·exp(b·v²)] is infinite when 4b·q ≥ 1 (b={b}, largest variance "
                f"{float(torch.maximum(q11.max(), q22.max()).detach()):.4g}). Use b <= 0, or scale the "
                f"pre-activations down (smaller W_std / inputs)."
            )
        return m, root

    def rule(self, q12, q11, q22, need_dot):
        a2, b = self.a**2, self.b
        m, root = self._root(q12, q11, q22)
        inv = 1 / (m * root)  # 1/D
        nngp = a2 * inv
        # K̇ = 4a²b² q12/D³, as (q12/m)·(1/D)²·(1/S): no intermediate over- or underflows before the result
        dot = (4 * a2 * b * b) * ((q12 / m) * inv) * (inv / root) if need_dot else None
        return nngp, dot

    def var_fn(self, q):
        den = 1 - 4 * self.b * q
        if self.b > 0 and not bool((den > 0).all().detach()):
            self._root(q, q, q)  # raises with the message above
        return self.a**2 * torch.rsqrt(den)

    def mean_fn(self, q):
        """``E[a·exp(b u²)] = a/√(1 − 2bq)`` (finite where the variance is, ``4bq < 1``)."""
        return self.a * torch.rsqrt(1 - 2 * self.b * q)


class Exp(RuleLayer):
    """``φ(x) = a·exp(b·x)`` (NT's defaults a=1, b=1). Log-normal moments::

        K' = a²·exp(b²·((q11 + q22)/2 + q12)),    K̇ = b²·K',    E[φ(u)²] = a²·exp(2b²q)

    The kernel grows like ``exp(2b²q)``: if it overflows the dtype the layer raises instead of returning Inf.
    """

    def __init__(self, a: float = 1.0, b: float = 1.0):
        self.a, self.b = float(a), float(b)

    def fn(self, x):
        return self.a * torch.exp(self.b * x)

    def rule(self, q12, q11, q22, need_dot):
        b2 = self.b**2
        nngp = _check_finite(self.a**2 * torch.exp(b2 * ((q11 + q22) / 2 + q12)), self, "exp(b²·q) too large")
        return nngp, (b2 * nngp if need_dot else None)

    def var_fn(self, q):
        return _check_finite(self.a**2 * torch.exp(2 * self.b**2 * q), self, "exp(2b²·q) too large")

    def mean_fn(self, q):
        """``E[a·exp(b u)] = a·exp(b²q/2)``."""
        return self.a * torch.exp(self.b**2 * q / 2)


class ExpNormalized(RuleLayer):
    """NT's "Gaussian normalised kernel" (Shankar et al. 2020, "Neural kernels without tangents",
    arXiv:2003.02237, p. 6): with ``ρ = q12/√(q11 q22)``::

        K' = √(q11 q22)·exp(γ·(ρ + shift)),    K̇ = γ·exp(γ·(ρ + shift)),    E[φ(u)²] = q·exp(γ(1 + shift))

    (NT's defaults ``gamma=1, shift=-1``). ``do_clip`` is accepted for NT compatibility: ntkit always clamps
    ``ρ`` to ``[−1, 1]`` (it only differs from not clamping by round-off).

    Finite twin. No elementwise function has this kernel (a degree-1 homogeneous kernel needs a piecewise
    linear ``φ``), and NT offers none. ntkit's twin normalises each sample (and pixel) by its root-mean-square
    over the channel axis, ``r = √(mean_c x_c²)``, and applies the unit-variance sine feature
    ``g(z) = √(2·exp(γ(1 + shift)))·sin(√γ·z + π/4)``, for which ``E[g(z) g(z')] = exp(γ(ρ + shift))``
    (:class:`Sin` at unit variance)::

        φ(x) = r·g(x / r)

    As the width grows ``r² → q``, so the NNGP converges to ``K'``; the normalisation's Jacobian is a rank-one
    term whose NTK contribution is ``O(1/width)``, so the NTK converges to ``Θ·K̇``. This twin is not
    elementwise; :meth:`unit_fn` is its elementwise part ``g``.
    """

    def __init__(self, gamma: float = 1.0, shift: float = -1.0, do_clip: bool = False):
        gamma, shift = float(gamma), float(shift)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(
                f"gamma={gamma!r} must be a finite number >= 0 (exp(gamma*rho) is a positive "
                f"definite function of rho only for gamma >= 0)."
            )
        if not math.isfinite(shift):
            raise ValueError(f"shift={shift!r} must be finite.")
        self.gamma, self.shift, self.do_clip = gamma, shift, bool(do_clip)

    def unit_fn(self, z: Tensor) -> Tensor:
        """``g(z) = √(2·exp(γ(1 + shift)))·sin(√γ·z + π/4)``: ``E[g(z) g(z')] = exp(γ(ρ + shift))`` for
        unit-variance ``z, z'`` with correlation ``ρ``."""
        amp = math.sqrt(2 * math.exp(self.gamma * (1 + self.shift)))
        return amp * torch.sin(math.sqrt(self.gamma) * z + _PI / 4)

    def fn(self, x):
        if x.dim() < 2:
            raise ValueError(f"ExpNormalized's finite twin needs (N, C, *spatial) activations; got {tuple(x.shape)}.")
        r = torch.sqrt(torch.mean(x * x, dim=1, keepdim=True))
        return r * self.unit_fn(x / r.clamp_min(torch.finfo(x.dtype).tiny))

    def rule(self, q12, q11, q22, need_dot):
        prod, rho = _safe_rho(q12, q11, q22)
        e = torch.exp(self.gamma * (rho + self.shift))
        nngp = prod * e
        return nngp, (self.gamma * e if need_dot else None)

    def var_fn(self, q):
        return q * math.exp(self.gamma * (1 + self.shift))

    def mean_fn(self, q):
        """The twin's ``E[r·g(x/r)] → √q·E[g(z)] = √q·exp(γ·shift/2)`` (``E[sin(√γ z + π/4)] =
        exp(−γ/2)/√2``)."""
        return torch.sqrt(q) * math.exp(self.gamma * self.shift / 2)


class Gabor(RuleLayer):
    """Gabor function ``φ(x) = exp(−x²)·sin(x)`` (NT's ``stax.Gabor``; no parameters).

    From ``sin u sin v = (cos(u − v) − cos(u + v))/2`` and the Gaussian integral
    ``E[exp(−u² − v²)·cos(aᵀw)] = exp(−aᵀMa/2)/√D`` for ``w = (u, v) ~ N(0, Σ)``, where
    ``D = det(I + 2Σ) = 1 + 2S + 4Δ`` (``S = q11 + q22``, ``Δ = q11 q22 − q12²``) and
    ``M = Σ(I + 2Σ)⁻¹ = [[q11 + 2Δ, q12], [q12, q22 + 2Δ]]/D``; with ``a = (1, ∓1)``::

        E± = exp(−(S + 4Δ ± 2q12)/(2D)) = exp(−1/2 + (1 + S ∓ 2q12)/(2D))
        K' = (E₋ − E₊)/(2√D)                                          (E₋: the ``cos(u − v)`` term)
        K̇  = ∂K'/∂q12 = [E₋·(D + 8q12² + T) + E₊·(D + 8q12² − T)] / (2 D^{5/2}),   T = 4q12·(1 + S + D)
        E[φ(u)²] = (1 − exp(−2q/(1 + 4q))) / (2√(1 + 4q)),    E[φ(u)] = 0 (φ is odd)

    (``1 + S + D = 2 + 3S + 4Δ``; ``K̇ = E[φ'(u)φ'(v)]`` by Price's theorem, ``φ'(x) = exp(−x²)(cos x − 2x sin x)``.)
    Evaluated as ``K' = E₊·expm1(2q12/D)/(2√D)``, without cancellation for small ``q12``; ``√D`` comes from
    :func:`~ntkit.layers.elementwise._root_det` (exact discriminant, no overflow).
    """

    def fn(self, x):
        return torch.exp(-x * x) * torch.sin(x)

    def derivative(self, x):
        return torch.exp(-x * x) * (torch.cos(x) - 2 * x * torch.sin(x))

    def rule(self, q12, q11, q22, need_dot):
        m, root = _root_det(2.0, q12, q11, q22)
        r = 1 / (m * root)  # 1/√D
        t = r * r  # 1/D
        # E₊ = exp(−(S + 4Δ + 2q12)/(2D)): exponent ≤ 0 for a covariance (round-off above 0 clamped)
        e_plus = torch.exp((((1 + (q11 - q12) + (q22 - q12)) * t - 1) / 2).clamp_max(0.0))
        x = 2 * q12 * t
        diff = e_plus * torch.expm1(x)  # E₋ − E₊
        nngp = diff * (r / 2)
        dot = None
        if need_dot:
            s = q11 + q22
            u = q12 * t  # q12/D, |u| ≤ 1/4: no product below overflows (q12², T·D would at q ≈ 1e300)
            # [E₋ (D + 8q12² + T) + E₊ (D + 8q12² − T)]/(2D^{5/2}) = r³/2·[(E₋ + E₊)(1 + 8q12²/D) + (E₋ − E₊)·T/D]
            # with 8q12²/D = 8 q12 u and T/D = 4u(1 + S) + 4q12; 1/D is applied before 1/√D (r³ underflows)
            a = (2 * e_plus + diff) * (1 + 8 * q12 * u) + diff * (4 * u * (1 + s) + 4 * q12)
            dot = (r / 2) * (t * a)
        return nngp, dot

    def var_fn(self, q):
        d = 1 + 4 * q
        return -torch.expm1(-2 * q / d) / (2 * torch.sqrt(d))

    def mean_fn(self, q):
        """``E[exp(−u²) sin u] = 0`` (odd)."""
        return None


@lift_rule(nn.GELU)
def _lift_gelu(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.GELU)
    return Gelu(approximate=(m.approximate == "tanh"))
