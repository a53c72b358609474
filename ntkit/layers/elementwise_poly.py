"""Polynomial nonlinearities (``Polynomial``, ``Monomial``, ``Hermite``) and rectified monomials
(``RectifiedMonomial``, the arc-cosine kernels of any degree).

Polynomials: the kernel is a polynomial in ``(q12, q11, q22)``. Writing ``u = √q11·z`` and expanding in the
probabilists' Hermite polynomials ``He_k`` — ``E[He_j(z) He_k(z')] = k!·ρ^k·δ_jk`` for unit normals with
correlation ``ρ`` (Mehler's formula; O'Donnell 2014, "Analysis of Boolean Functions", §11.2) and
``x^n = Σ_m n!/(k!·2^m·m!)·He_k(x)`` over ``n = k + 2m`` — gives, for ``φ(x) = Σ_n c_n x^n``::

    K'  = Σ_k k!·q12^k·A_k(q11)·A_k(q22),     A_k(q) = Σ_m c_{k+2m}·(k+2m)!/(k!·2^m·m!)·q^m
    K̇   = Σ_k k·k!·q12^(k−1)·A_k(q11)·A_k(q22)

No square roots and no division: exact at zero variance, and stable in float32 for moderate degrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

from ntkit.layers.base import LayerError
from ntkit.layers.elementwise import RuleLayer, _horner, _safe_rho

__all__ = ["Polynomial", "Monomial", "Hermite", "RectifiedMonomial"]

_PI = math.pi


def _check_degree(degree, name: str) -> int:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"{name}(degree={degree!r}): degree must be an int >= 0.")
    return degree


class Polynomial(RuleLayer):
    """``φ(x) = coef[0] + coef[1]·x + … + coef[n]·x^n`` (numpy's ``Polynomial`` order, as NT).

    Kernel: the Hermite expansion in the module docstring, exact for every degree and variance.
    """

    def __init__(self, coef: Sequence[float]):
        coef = [float(c) for c in (coef.tolist() if hasattr(coef, "tolist") else coef)]
        if not all(math.isfinite(c) for c in coef):
            raise ValueError(f"Polynomial coefficients must be finite; got {coef}.")
        self.coef = tuple(coef)
        n = len(coef)
        # _alpha[k][m] = c_{k+2m}·(k+2m)!/(k!·2^m·m!)  (the integer count of pairings, times the coefficient)
        self._alpha = [
            [
                coef[k + 2 * m] * (math.factorial(k + 2 * m) // (math.factorial(k) * 2**m * math.factorial(m)))
                for m in range((n - 1 - k) // 2 + 1)
            ]
            for k in range(n)
        ]
        self._kfact = [float(math.factorial(k)) for k in range(n)]

    def fn(self, x):
        return _horner(self.coef, x)

    def _terms(self, q11: Tensor, q22: Tensor) -> list[Tensor]:
        """``k!·A_k(q11)·A_k(q22)``, the coefficient of ``q12^k``."""
        out = []
        for k, alpha in enumerate(self._alpha):
            a1 = _horner(alpha, q11)
            a2 = a1 if q22 is q11 else _horner(alpha, q22)
            out.append(self._kfact[k] * (a1 * a2))  # a1·a2 first: exactly symmetric in (q11, q22)
        return out

    def rule(self, q12, q11, q22, need_dot):
        terms = self._terms(q11, q22)
        nngp = _horner(terms, q12) + torch.zeros_like(q12)  # broadcast to q12's shape
        dot = None
        if need_dot:
            dot = _horner([k * t for k, t in enumerate(terms)][1:], q12) + torch.zeros_like(q12)
        return nngp, dot

    def var_fn(self, q):
        return _horner(self._terms(q, q), q)

    def mean_fn(self, q):
        """``E[φ(u)] = Σ_m c_{2m}·(2m − 1)!!·q^m = A_0(q)`` (module docstring); ``None`` for odd polynomials."""
        alpha = self._alpha[0] if self._alpha else []
        return _horner(alpha, q) if any(alpha) else None

    def __repr__(self):
        return f"Polynomial(coef={list(self.coef)})"


class Monomial(Polynomial):
    """``φ(x) = x^degree``. :class:`Polynomial`'s kernel, e.g. ``degree=2``: ``K' = 2q12² + q11 q22``,
    ``K̇ = 4q12``; ``E[u^{2n}] = (2n − 1)!!·q^n`` on the diagonal. Any ``degree >= 0`` (NT allows 0–5)."""

    def __init__(self, degree: int):
        self.degree = _check_degree(degree, "Monomial")
        super().__init__([0.0] * degree + [1.0])

    def fn(self, x):
        return x**self.degree

    def __repr__(self):
        return f"Monomial(degree={self.degree})"


class Hermite(RuleLayer):
    """Normalised probabilists' Hermite polynomial ``φ(x) = He_n(x)/√n!`` (``He_0 = 1, He_1 = x,
    He_{k+1} = x·He_k − k·He_{k−1}``), so that ``E[φ(z)²] = 1`` for ``z ~ N(0, 1)``.

    Kernel at unit variances (Mehler's formula, ``E[He_n(u) He_n(v)] = n!·q12^n``; NT's ``Hermite``)::

        K' = q12^n,    K̇ = n·q12^(n−1),    E[φ(u)²] = 1

    It needs ``q11 = q22 = 1``: put :class:`~ntkit.layers.norm.LayerNorm` right before it. Other variances
    raise an error (NT only warns and returns ``q12^n``, which is then wrong); for the exact kernel at any
    variance use ``Polynomial`` with the Hermite coefficients.
    """

    def __init__(self, degree: int):
        self.degree = _check_degree(degree, "Hermite")

    def fn(self, x):
        n = self.degree
        h_prev, h = torch.ones_like(x), x
        if n == 0:
            return h_prev
        for k in range(1, n):
            h_prev, h = h, x * h - k * h_prev
        return h / math.sqrt(math.factorial(n))

    def kernel(self, k):
        if k.is_gaussian:  # otherwise the base class raises its own error
            q11, q22 = k.variances()
            tol = max(1e-6, 1e3 * torch.finfo(q11.dtype).eps)
            lo = float(torch.minimum(q11.min(), q22.min()).detach())
            hi = float(torch.maximum(q11.max(), q22.max()).detach())
            if lo < 1 - tol or hi > 1 + tol:
                raise LayerError(
                    f"{self!r} needs unit-variance pre-activations (its kernel is q12^n), but the variances "
                    f"range over [{lo:.6g}, {hi:.6g}]. Put LayerNorm() right before it (a zero input row "
                    f"stays at variance 0 even then), or use Polynomial(...) with the Hermite coefficients "
                    f"for the exact kernel at any variance."
                )
        return super().kernel(k)

    def rule(self, q12, q11, q22, need_dot):
        n = self.degree
        nngp = q12**n if n else torch.ones_like(q12)
        dot = None
        if need_dot:
            dot = n * q12 ** (n - 1) if n else torch.zeros_like(q12)
        return nngp, dot

    def var_fn(self, q):
        return q**self.degree if self.degree else torch.ones_like(q)

    def mean_fn(self, q):
        """``E[He_n(z)] = 0`` for ``n ≥ 1`` (orthogonal to ``He_0 = 1``)."""
        return None if self.degree else torch.ones_like(q)

    def __repr__(self):
        return f"Hermite(degree={self.degree})"


def arccos_polynomials(n: int) -> tuple[list[int], list[int]]:
    """Integer coefficients of ``P_n, Q_n`` with ``J_n(θ) = P_n(cos θ)·sin θ + Q_n(cos θ)·(π − θ)``, the
    arc-cosine kernel function of degree ``n`` (Cho & Saul 2009, eq. 4):
    ``J_n(θ) = (−1)^n·sin^(2n+1)θ·(1/sin θ · ∂/∂θ)^n ((π − θ)/sin θ)``.

    The derivatives are carried out exactly on sums of ``cos^i θ·sin^j θ·(π − θ)^l`` terms; e.g.
    ``J_1 = sin θ + (π − θ) cos θ``, ``J_2 = 3 sin θ cos θ + (π − θ)(1 + 2cos²θ)``.
    """
    terms: dict[tuple[int, int, int], Fraction] = {(0, -1, 1): Fraction(1)}
    for _ in range(n):
        new: dict[tuple[int, int, int], Fraction] = {}
        for (i, j, l), v in terms.items():
            # (1/s)·d/dθ of c^i s^j ψ^l with dc/dθ = −s, ds/dθ = c, dψ/dθ = −1
            for key, w in (((i - 1, j, l), -i), ((i + 1, j - 2, l), j), ((i, j - 1, 0), -l)):
                if w:
                    new[key] = new.get(key, Fraction(0)) + w * v
        terms = {key: v for key, v in new.items() if v}
    p, q = [Fraction(0)] * (n + 1), [Fraction(0)] * (n + 1)
    for (i, j, l), v in terms.items():
        j += 2 * n + 1
        assert j >= 0 and j % 2 == (0 if l else 1)
        target = q if l else p
        m = j // 2  # s^j = (1 − c²)^m (times s when l = 0)
        for t in range(m + 1):
            target[i + 2 * t] += (-1) ** n * v * math.comb(m, t) * (-1) ** t
    assert all(x.denominator == 1 for x in p + q)
    return [int(x) for x in p], [int(x) for x in q]


class RectifiedMonomial(RuleLayer):
    """``φ(x) = max(x, 0)^n`` (``n = 0``: the step ``1[x >= 0]``). The arc-cosine kernel of degree ``n``
    (Cho & Saul 2009): with ``θ = arccos ρ`` and :func:`arccos_polynomials` ``J_n``::

        K' = (q11 q22)^(n/2) · J_n(θ) / (2π)
        K̇  = n²·(q11 q22)^((n−1)/2) · J_{n−1}(θ) / (2π)      (Price: φ' = n·max(x, 0)^(n−1); 0 for n = 0)
        E[φ(u)²] = (2n − 1)!!/2 · q^n

    Evaluated as polynomials in ``ρ`` times ``√(1 − ρ²)`` and ``π − arccos ρ``: finite at ``ρ = ±1``
    (NT 0.6.5 differentiates ``J_n`` numerically through ``1/sin θ`` and returns NaN there).
    """

    def __init__(self, degree: int):
        self.degree = _check_degree(degree, "RectifiedMonomial")
        self._j = arccos_polynomials(self.degree)
        self._j_dot = arccos_polynomials(self.degree - 1) if self.degree else None

    def fn(self, x):
        if self.degree == 0:
            return (x >= 0).to(x.dtype)
        return torch.clamp(x, min=0) ** self.degree

    @staticmethod
    def _kappa(polys, rho: Tensor, sin: Tensor, psi: Tensor) -> Tensor:
        return (_horner(polys[0], rho) * sin + _horner(polys[1], rho) * psi) / (2 * _PI)

    def rule(self, q12, q11, q22, need_dot):
        n = self.degree
        prod, rho = _safe_rho(q12, q11, q22)
        sin = torch.sqrt((1 - rho * rho).clamp_min(0))
        psi = _PI - torch.arccos(rho)
        nngp = prod**n * self._kappa(self._j, rho, sin, psi)
        dot = None
        if need_dot:
            dot = n * n * prod ** (n - 1) * self._kappa(self._j_dot, rho, sin, psi) if n else torch.zeros_like(nngp)
        return nngp, dot

    def var_fn(self, q):
        n = self.degree
        return math.prod(range(2 * n - 1, 0, -2)) / 2 * q**n

    def mean_fn(self, q):
        """``E[max(u, 0)^n] = q^(n/2)·2^(n/2)·Γ((n + 1)/2)/(2√π)`` (half the absolute moment)."""
        n = self.degree
        c = 2 ** (n / 2) * math.gamma((n + 1) / 2) / (2 * math.sqrt(_PI))
        return c * torch.sqrt(q) ** n if n else torch.full_like(q, 0.5)

    def __repr__(self):
        return f"RectifiedMonomial(degree={self.degree})"
