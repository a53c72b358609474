"""Every activation module torch has, as kernel rules: closed forms, exact piecewise rules, or Gauss–Hermite.

For jointly Gaussian pre-activations ``(u, v) ~ N(0, [[q11, q12], [q12, q22]])`` a nonlinearity's kernel is
``K' = E[φ(u) φ(v)]`` and ``K̇ = E[φ'(u) φ'(v)]`` (Lee et al. 2018; Jacot et al. 2018), ``φ'`` the derivative
autograd gives the finite network (for a jump, the almost-everywhere derivative: the jump's Dirac mass never
reaches a gradient, as for :class:`~ntkit.layers.elementwise.Sign`).

Three kinds of rule, chosen per activation (the table is in ``README.md``, "What ntkit.lift maps"):

* closed forms of :mod:`ntkit.layers.elementwise`: ``ReLU``, ``LeakyReLU``, ``PReLU`` (one slope, or equal
  slopes), ``RReLU`` in eval mode (slope ``(lower + upper)/2``), ``GELU`` (:class:`~ntkit.layers.Gelu`).
* :class:`Piecewise`, for functions made of pieces ``c0 + c1 x + c2 x² + c3 x³ + A·exp(r x)`` between fixed
  kinks (``ReLU6``, ``Hardtanh``, ``Hardsigmoid``, ``Hardswish``, ``Softshrink``, ``Hardshrink``,
  ``Threshold``, ``ELU``, ``CELU``, ``SELU``). Gauss–Hermite converges only algebraically across a kink, so
  these get a rule that integrates each smooth piece exactly: conditionally on ``u = √q11·z`` the other
  pre-activation is ``v | z ~ N(ρ√q22·z, q22(1 − ρ²))`` and ``E[φ(v) | z]`` is a sum of truncated Gaussian
  moments in closed form (normal CDFs and densities; ``E[e^{rv} 1{v < b}] = e^{rμ + r²s²/2}·Φ((b − μ − rs²)/s)``).
  The remaining 1-D integral over ``z`` is Gauss–Legendre on ``[−10, 10]`` (Gaussian tail mass beyond: 2e-23),
  split at every kink of ``φ(√q11 z)``, at every point where the conditional mean crosses a kink (panels graded
  geometrically around both, :data:`_GRADING`) and at that point ± 1 and ± 8 conditional deviations (where the
  smoothed kink is resolved): :data:`PIECEWISE_NODES` nodes per panel, every panel an analytic integrand.
  Error bound ``1e-9`` for ``K'`` (relative to ``max(|K'|, √(q11 q22))``) and ``K̇`` (relative to
  ``max(|K̇|, 1e-3)``), checked in tests/lift/test_lift_activations.py against nested adaptive scipy
  quadrature split at the kinks (tests/data/make_activation_reference.py) for variances 0.05–20 and
  correlations in ``[−1, 1]`` including ``±1`` (duplicated and parallel inputs); measured worst: 2e-15.
* :class:`Smooth`, for the smooth ones (``Tanh``, ``Sigmoid``, ``SiLU``, ``Mish``, ``Softplus``,
  ``LogSigmoid``, ``Softsign``, ``Tanhshrink``): the same conditional rule with the inner expectation by
  Gauss–Legendre as well, both graded around where ``φ`` bends (:func:`smooth_expectation`,
  :data:`SMOOTH_NODES` nodes per panel). Error bound ``1e-8`` (same reference and measure; measured worst:
  3e-9). Gauss–Hermite (:class:`~ntkit.layers.elementwise.Elementwise`, NT's rule) is kept for
  ``lift(deg=...)``: it is much cheaper on large kernels, but its nodes are fixed in units of the standard
  deviation, so at ``q = 20`` the Tanh ``K̇`` is 47 % off at 50 nodes and 15 % at 100.

Cost: ``Piecewise`` evaluates about 1–3·10³ closed-form terms per kernel entry, ``Smooth`` about 6·10⁴
function values (about 10 ms per entry for ``K'`` and ``K̇`` on one core): meant for the kernels of a few
hundred samples that ``lift`` checks; use ``lift(deg=...)`` for larger ones with smooth activations.

Activations without a per-pair kernel are refused with the reason: ``RReLU`` in train mode (a random slope per
entry and forward pass) here; ``Softmax``/``LogSoftmax``/``Softmin`` over the features and ``GLU`` in
:mod:`ntkit.lift` (its table of refusals).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.layers.base import Layer, LiftOptions, lift_rule, unsupported
from ntkit.layers.elementwise import Elementwise, LeakyRelu, RuleLayer, _safe_rho

__all__ = ["Piece", "Piecewise", "PIECEWISE_NODES", "SMOOTH_NODES", "SELU_ALPHA", "SELU_SCALE"]

#: Gauss–Legendre nodes per panel of :class:`Piecewise`'s outer integral
PIECEWISE_NODES = 20
#: Gauss–Legendre nodes per panel of :func:`smooth_expectation` (outer and inner)
SMOOTH_NODES = 10
#: half-width of the outer integration range in units of the standard deviation
_Z_MAX = 10.0
#: conditional standard deviations on either side of a smoothed kink that get their own panel
_SMOOTH_KINK = 8.0
#: geometric grading of the panels around every kink (offsets in units of the standard deviation)
_GRADING = (4.0**-5, 4.0**-4, 4.0**-3, 4.0**-2, 4.0**-1, 1.0, 4.0)
#: panel edges for a Gaussian weight alone
_COARSE = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)

#: SELU's α (Klambauer et al. 2017)
SELU_ALPHA = 1.6732632423543772848170429916717
#: SELU's scale λ (Klambauer et al. 2017)
SELU_SCALE = 1.0507009873554804934193349852946


@dataclasses.dataclass(frozen=True)
class Piece:
    """``φ(x) = c0 + c1 x + c2 x² + c3 x³ + amp·exp(rate·x)`` for ``lo < x ≤ hi`` (an exponential term only on
    a piece with ``lo = −inf``, where it cannot overflow)."""

    lo: float
    hi: float
    poly: tuple[float, ...] = ()
    amp: float = 0.0
    rate: float = 0.0

    def __post_init__(self) -> None:
        if len(self.poly) > 4:
            raise ValueError("Piece: polynomials of degree <= 3 only.")
        if self.amp != 0.0 and self.lo != -math.inf:
            raise ValueError("Piece: an exponential term only on a piece (-inf, hi].")

    def derivative(self) -> Piece:
        d = tuple(i * c for i, c in enumerate(self.poly))[1:]
        return Piece(self.lo, self.hi, d, self.amp * self.rate, self.rate)


@functools.cache
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def _std_normal_pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _tail_terms(x: Tensor, j: int) -> Tensor:
    """``x^j ϕ(x)``, 0 at ``x = ±inf``."""
    out = x.pow(j) * _std_normal_pdf(x) if j else _std_normal_pdf(x)
    return torch.where(torch.isfinite(x), out, torch.zeros((), dtype=x.dtype, device=x.device))


def _piece_mean(p: Piece, m: Tensor, s: Tensor) -> Tensor:
    """``E[φ_p(v)·1{lo < v ≤ hi}]`` for ``v ~ N(m, s²)`` (``s > 0``), in closed form."""
    a = (p.lo - m) / s
    b = (p.hi - m) / s
    out = torch.zeros_like(m)
    if p.poly:
        # M_j = ∫_a^b t^j ϕ(t) dt: M0 = Φ(b) − Φ(a) (upper-tail form where a > 0: no cancellation),
        # M1 = ϕ(a) − ϕ(b), M_j = (j − 1) M_{j−2} + a^{j−1}ϕ(a) − b^{j−1}ϕ(b)
        nd = torch.special.ndtr
        mom = [torch.where(a > 0, nd(-a) - nd(-b), nd(b) - nd(a)), _tail_terms(a, 0) - _tail_terms(b, 0)]
        for j in range(2, len(p.poly)):
            mom.append((j - 1) * mom[j - 2] + _tail_terms(a, j - 1) - _tail_terms(b, j - 1))
        # E[v^k 1] = Σ_j C(k, j) m^{k−j} s^j M_j
        for k, c in enumerate(p.poly):
            if c == 0.0:
                continue
            term = torch.zeros_like(m)
            for j in range(k + 1):
                term = term + math.comb(k, j) * m.pow(k - j) * s.pow(j) * mom[j]
            out = out + c * term
    if p.amp != 0.0:
        r = p.rate
        log = r * m + 0.5 * r * r * s * s + torch.special.log_ndtr((p.hi - m) / s - r * s)
        out = out + p.amp * torch.exp(log)
    return out


def _gaussian_mean(pieces: Sequence[Piece], m: Tensor, s: Tensor) -> Tensor:
    """``E[φ(v)]`` for ``v ~ N(m, s²)``; ``s = 0`` is taken as a tiny positive deviation (``E = φ(m)`` to
    round-off)."""
    s = s.clamp_min(torch.finfo(s.dtype).tiny ** 0.5)
    out = torch.zeros_like(m)
    for p in pieces:
        out = out + _piece_mean(p, m, s)
    return out


def _evaluate(pieces: Sequence[Piece], x: Tensor) -> Tensor:
    out = torch.zeros_like(x)
    for p in pieces:
        val = torch.zeros_like(x)
        for k, c in enumerate(p.poly):
            if c:
                val = val + c * x.pow(k)
        if p.amp:
            val = val + p.amp * torch.exp(torch.clamp(p.rate * x, max=0.0) if p.rate > 0 else p.rate * x)
        inside = (x > p.lo) & (x <= p.hi)
        out = torch.where(inside, val, out)
    return out


def _panels(points: list[Tensor], lim: float, nodes: int, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights ``(M, panels·nodes)`` on ``[−lim, lim]`` split at ``points`` (each
    ``(M,)``, clamped into the range; coinciding points give empty panels)."""
    dtype, dev = ref.dtype, ref.device
    lo_end = torch.full(ref.shape + (1,), -lim, dtype=dtype, device=dev)
    brk = torch.stack(points, -1).clamp(-lim, lim).sort(-1).values if points else ref.new_zeros(ref.shape + (0,))
    edges = torch.cat([lo_end, brk, -lo_end], -1)
    t, w = (torch.as_tensor(v, dtype=dtype, device=dev) for v in _legendre(nodes))
    left, right = edges[:, :-1, None], edges[:, 1:, None]
    half = (right - left) / 2
    z = ((left + right) / 2 + half * t).flatten(1)
    return z, (half * w).flatten(1)


def _graded(c: Tensor, out: list[Tensor], scale: Optional[Tensor] = None) -> None:
    """``c`` and ``c ± d`` for the offsets of :data:`_GRADING` (times ``scale``)."""
    out.append(c)
    for d in _GRADING:
        off = d if scale is None else d * scale
        out += [c - off, c + off]


def _conditional_expectation(
    outer: Callable[[Tensor], Tensor],
    inner: Callable[[Tensor, Tensor], Tensor],
    kinks: Sequence[float],
    q12: Tensor,
    q11: Tensor,
    q22: Tensor,
    nodes: int,
    evals_per_entry: int = 1,
) -> Tensor:
    """``E[f(u) g(v)]`` as ``∫ ϕ(z) f(√q11 z) E[g(v) | z] dz`` with ``inner(m, s) = E[g(m + s·t)]``,
    ``t ~ N(0, 1)`` and ``v | z ~ N(ρ√q22 z, q22(1 − ρ²))``; the outer Gauss–Legendre panels are split (and
    geometrically graded) at each ``kink`` of ``f(√q11 z)`` and where the conditional mean crosses a kink (± 1
    and ± 8 conditional deviations there). The larger variance is put first, so the result is exactly
    symmetric in ``(q11, q22)``. Entries are processed in chunks (``evals_per_entry``: inner evaluations per
    outer node, for the memory bound)."""
    q12, q11, q22 = torch.broadcast_tensors(q12, q11, q22)
    q11, q22 = torch.maximum(q11, q22), torch.minimum(q11, q22)
    shape = q12.shape
    a, b, c = q12.reshape(-1), q11.reshape(-1), q22.reshape(-1)
    out = torch.empty_like(a)
    per = nodes * (2 + (1 + len(kinks)) * (4 + 4 * len(_GRADING) + 2)) * evals_per_entry
    chunk = max(1, _CHUNK_EVALS // per)
    for s0 in range(0, a.numel(), chunk):
        aa, bb, cc = a[s0 : s0 + chunk], b[s0 : s0 + chunk], c[s0 : s0 + chunk]
        _, rho = _safe_rho(aa, bb, cc)
        r1, r2 = torch.sqrt(bb), torch.sqrt(cc)
        perp = torch.sqrt((1 - rho * rho).clamp_min(0.0))
        tiny = torch.finfo(a.dtype).tiny ** 0.5
        pts: list[Tensor] = []
        _graded(torch.zeros_like(aa), pts)  # the Gaussian weight's centre
        for k in kinks:
            slope = rho * r2  # the conditional mean ρ√q22·z crosses k at z = k/slope
            c2 = k / torch.where(slope.abs() > tiny, slope, torch.full_like(slope, tiny))
            if k != 0.0:  # (a kink at 0 is graded with the centre)
                _graded(k / r1.clamp_min(tiny), pts)  # kink of f(u)
                _graded(c2, pts)
            eps = perp / slope.abs().clamp_min(tiny)  # width of the smoothed kink of E[g(v) | z] around c2
            for f in (1.0, _SMOOTH_KINK):
                pts += [c2 - f * eps, c2 + f * eps]
        z, w = _panels(pts, _Z_MAX, nodes, aa)
        weight = w * _std_normal_pdf(z)
        fu = outer(r1[:, None] * z)
        hv = inner((rho * r2)[:, None] * z, (perp * r2)[:, None].expand_as(z))
        out[s0 : s0 + chunk] = (weight * fu * hv).sum(-1)
    return out.reshape(shape)


#: at most this many function evaluations are materialised at once
_CHUNK_EVALS = 1 << 22


def piecewise_expectation(
    pieces: Sequence[Piece], q12: Tensor, q11: Tensor, q22: Tensor, nodes: int = PIECEWISE_NODES
) -> Tensor:
    """``E[φ(u) φ(v)]`` for a piecewise ``φ``: :func:`_conditional_expectation` with the inner expectation in
    closed form (truncated Gaussian moments; see the module docstring for the rule and its error)."""
    kinks = sorted({p.lo for p in pieces if math.isfinite(p.lo)} | {p.hi for p in pieces if math.isfinite(p.hi)})
    return _conditional_expectation(
        lambda x: _evaluate(pieces, x), lambda m, s: _gaussian_mean(pieces, m, s), kinks, q12, q11, q22, nodes, 4
    )


def smooth_expectation(
    f: Callable[[Tensor], Tensor],
    q12: Tensor,
    q11: Tensor,
    q22: Tensor,
    nodes: int = SMOOTH_NODES,
    centers: Sequence[float] = (0.0,),
) -> Tensor:
    """``E[f(u) f(v)]`` for a smooth ``f`` whose features lie at unit scale around ``centers`` (where the
    activations bend): :func:`_conditional_expectation` with the inner expectation by Gauss–Legendre in ``t`` on
    ``[−10, 10]``, graded around each ``(center − m)/s`` at offsets :data:`_GRADING` / ``s`` (resolving the
    bend at every variance, where Gauss–Hermite's fixed nodes miss it once ``√q`` exceeds a few units)."""
    tiny = torch.finfo(q12.dtype).tiny ** 0.5

    def inner(m: Tensor, s: Tensor) -> Tensor:
        pts: list[Tensor] = []
        ss = s.reshape(-1).clamp_min(tiny)
        mm = m.reshape(-1)
        zero = torch.zeros_like(mm)
        pts += [zero + d for d in _COARSE]  # the Gaussian weight (smooth at unit scale)
        for c0 in centers:
            _graded(((c0 - mm) / ss).clamp(-2 * _Z_MAX, 2 * _Z_MAX), pts, 1.0 / ss)
        t, w = _panels(pts, _Z_MAX, nodes, mm)
        val = (w * _std_normal_pdf(t) * f(mm[:, None] + s.reshape(-1)[:, None] * t)).sum(-1)
        return val.reshape(m.shape)

    inner_evals = nodes * (2 + len(_COARSE) + len(centers) * (1 + 2 * len(_GRADING)))
    return _conditional_expectation(f, inner, centers, q12, q11, q22, nodes, inner_evals)


class Piecewise(RuleLayer):
    """A nonlinearity made of :class:`Piece` s, with the exact-piece rule of the module docstring (error
    ``≤ 1e-9`` relative, measured). ``fn``: the torch function the finite network applies (it must equal the
    pieces; tests/lift/test_lift_activations.py checks each built-in one)."""

    def __init__(
        self, name: str, fn: Callable[[Tensor], Tensor], pieces: Sequence[Piece], nodes: int = PIECEWISE_NODES
    ):
        self.name = name
        self._fn = fn
        self._pieces = tuple(pieces)
        self._dpieces = tuple(p.derivative() for p in pieces)
        self.nodes = int(nodes)

    def fn(self, x: Tensor) -> Tensor:
        return self._fn(x)

    def derivative(self, x: Tensor) -> Tensor:
        return _evaluate(self._dpieces, x)

    def rule(self, q12: Tensor, q11: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Optional[Tensor]]:
        nngp = piecewise_expectation(self._pieces, q12, q11, q22, self.nodes)
        dot = piecewise_expectation(self._dpieces, q12, q11, q22, self.nodes) if need_dot else None
        return nngp, dot

    def var_fn(self, q: Tensor) -> Tensor:
        return piecewise_expectation(self._pieces, q, q, q, self.nodes)

    def mean_fn(self, q: Tensor) -> Optional[Tensor]:
        """``E[φ(u)]``, ``u ~ N(0, q)``: truncated Gaussian moments in closed form."""
        return _gaussian_mean(self._pieces, torch.zeros_like(q), torch.sqrt(q))

    def __repr__(self) -> str:
        return f"Piecewise({self.name})"


# ---------------------------------------------------------------------------------------------------
# the pieces of torch's piecewise activations
# ---------------------------------------------------------------------------------------------------
_INF = math.inf


def hardtanh_pieces(lo: float, hi: float) -> list[Piece]:
    """The pieces of ``hardtanh(lo, hi)``."""
    return [Piece(-_INF, lo, (lo,)), Piece(lo, hi, (0.0, 1.0)), Piece(hi, _INF, (hi,))]


def elu_pieces(alpha: float, scale: float = 1.0, rate: float = 1.0) -> list[Piece]:
    """``scale·x`` for ``x > 0``, ``scale·alpha·(exp(rate·x) − 1)`` else (ELU: rate 1; CELU: rate 1/alpha)."""
    return [Piece(-_INF, 0.0, (-scale * alpha,), scale * alpha, rate), Piece(0.0, _INF, (0.0, scale))]


def threshold_pieces(th: float, value: float) -> list[Piece]:
    """``x`` for ``x > th``, ``value`` else (torch's ``Threshold``)."""
    return [Piece(-_INF, th, (value,)), Piece(th, _INF, (0.0, 1.0))]


def _piecewise(name: str, fn: Callable[[Tensor], Tensor], pieces: list[Piece]) -> Piecewise:
    return Piecewise(name, fn, pieces)


def relu6() -> Piecewise:
    """``F.relu6``: ``min(max(x, 0), 6)``."""
    return _piecewise("relu6", F.relu6, hardtanh_pieces(0.0, 6.0))


def hardtanh(lo: float = -1.0, hi: float = 1.0) -> Piecewise:
    """``F.hardtanh(x, lo, hi)``: ``x`` clipped to ``[lo, hi]``."""
    return _piecewise(f"hardtanh({lo}, {hi})", lambda x: F.hardtanh(x, lo, hi), hardtanh_pieces(lo, hi))


def hardsigmoid() -> Piecewise:
    """``F.hardsigmoid``: ``x/6 + 1/2`` clipped to ``[0, 1]``."""
    pieces = [Piece(-_INF, -3.0, ()), Piece(-3.0, 3.0, (0.5, 1 / 6)), Piece(3.0, _INF, (1.0,))]
    return _piecewise("hardsigmoid", F.hardsigmoid, pieces)


def hardswish() -> Piecewise:
    """``F.hardswish``: ``x·(x + 3)/6`` on ``[−3, 3]``, 0 below, ``x`` above."""
    pieces = [Piece(-_INF, -3.0, ()), Piece(-3.0, 3.0, (0.0, 0.5, 1 / 6)), Piece(3.0, _INF, (0.0, 1.0))]
    return _piecewise("hardswish", F.hardswish, pieces)


def softshrink(lambd: float = 0.5) -> Piecewise:
    """``F.softshrink(x, λ)``: ``x ∓ λ`` beyond ``±λ``, 0 between."""
    pieces = [Piece(-_INF, -lambd, (lambd, 1.0)), Piece(-lambd, lambd, ()), Piece(lambd, _INF, (-lambd, 1.0))]
    return _piecewise(f"softshrink({lambd})", lambda x: F.softshrink(x, lambd), pieces)


def hardshrink(lambd: float = 0.5) -> Piecewise:
    """``F.hardshrink(x, λ)``: ``x`` where ``|x| > λ``, else 0 (a jump at ``±λ``)."""
    # torch: x where |x| > λ, else 0; the pieces' boundaries are (lo, hi], so x = −λ goes to the middle piece
    # (a null set: the expectation does not see it)
    pieces = [Piece(-_INF, -lambd, (0.0, 1.0)), Piece(-lambd, lambd, ()), Piece(lambd, _INF, (0.0, 1.0))]
    return _piecewise(f"hardshrink({lambd})", lambda x: F.hardshrink(x, lambd), pieces)


def threshold(th: float, value: float) -> Piecewise:
    """``F.threshold(x, th, value)``: ``x`` where ``x > th``, else ``value``."""
    return _piecewise(f"threshold({th}, {value})", lambda x: F.threshold(x, th, value), threshold_pieces(th, value))


def elu(alpha: float = 1.0) -> Piecewise:
    """``F.elu(x, α)``: ``x`` for ``x > 0``, ``α(eˣ − 1)`` else."""
    return _piecewise(f"elu({alpha})", lambda x: F.elu(x, alpha), elu_pieces(alpha))


def celu(alpha: float = 1.0) -> Piecewise:
    """``F.celu(x, α)``: ``x`` for ``x > 0``, ``α(e^{x/α} − 1)`` else."""
    return _piecewise(f"celu({alpha})", lambda x: F.celu(x, alpha), elu_pieces(alpha, 1.0, 1.0 / alpha))


def selu() -> Piecewise:
    """``F.selu``: ``λ·elu(x, α)`` with SELU's constants (Klambauer et al. 2017)."""
    return _piecewise("selu", F.selu, elu_pieces(SELU_ALPHA, SELU_SCALE))


# ---------------------------------------------------------------------------------------------------
# smooth activations: graded Gauss–Legendre in both variables
# ---------------------------------------------------------------------------------------------------
class Smooth(RuleLayer):
    """A smooth nonlinearity ``fn`` with derivative ``dfn`` (closed forms), whose kernel is
    :func:`smooth_expectation`: error ``≤ 1e-9`` relative (measured against nested adaptive scipy quadrature,
    tests/lift/test_lift_activations.py) for variances 0.05–20 and every correlation, for ``K'`` and ``K̇``.

    Gauss–Hermite (:class:`~ntkit.layers.elementwise.Elementwise`) is not used here: its nodes are fixed in
    units of the standard deviation, so once ``√q`` exceeds a few units the bend of ``tanh`` (width 1 in ``u``)
    falls between them — measured at ``q = 20``: ``K̇`` of ``tanh`` 47 % off at 50 nodes, 15 % at 100; ``SiLU``
    33 % / 1.5 %; ``Softsign`` 60 % / 44 %."""

    def __init__(
        self,
        name: str,
        fn: Callable[[Tensor], Tensor],
        dfn: Callable[[Tensor], Tensor],
        nodes: int = SMOOTH_NODES,
        centers: Sequence[float] = (0.0,),
    ):
        self.name = name
        self._fn, self._dfn = fn, dfn
        self.nodes = int(nodes)
        self.centers = tuple(float(c) for c in centers)  # where φ bends (or jumps): the panels are graded there

    def fn(self, x: Tensor) -> Tensor:
        return self._fn(x)

    def derivative(self, x: Tensor) -> Tensor:
        return self._dfn(x)

    def rule(self, q12: Tensor, q11: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Optional[Tensor]]:
        nngp = smooth_expectation(self._fn, q12, q11, q22, self.nodes, self.centers)
        dot = smooth_expectation(self._dfn, q12, q11, q22, self.nodes, self.centers) if need_dot else None
        return nngp, dot

    def var_fn(self, q: Tensor) -> Tensor:
        return self._mean_of(lambda x: self._fn(x) ** 2, q)

    def mean_fn(self, q: Tensor) -> Optional[Tensor]:
        """``E[φ(u)]``, ``u ~ N(0, q)``, by the graded 1-D rule."""
        return self._mean_of(self._fn, q)

    def _mean_of(self, f: Callable[[Tensor], Tensor], q: Tensor) -> Tensor:
        flat = q.reshape(-1)
        pts: list[Tensor] = []
        root = torch.sqrt(flat).clamp_min(torch.finfo(flat.dtype).tiny ** 0.5)
        _graded(torch.zeros_like(flat), pts)
        for c in self.centers:
            if c != 0.0:
                _graded(c / root, pts)
        z, w = _panels(pts, _Z_MAX, 2 * self.nodes, flat)
        return (w * _std_normal_pdf(z) * f(torch.sqrt(flat)[:, None] * z)).sum(-1).reshape(q.shape)

    def __repr__(self) -> str:
        return f"Smooth({self.name})"


def _dtanh(x: Tensor) -> Tensor:
    return 1 - torch.tanh(x) ** 2


def _dsigmoid(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _dsilu(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _dmish(x: Tensor) -> Tensor:
    t = torch.tanh(F.softplus(x))
    return t + x * (1 - t * t) * torch.sigmoid(x)


def _dlogsigmoid(x: Tensor) -> Tensor:
    return torch.sigmoid(-x)


def _dsoftsign(x: Tensor) -> Tensor:
    return 1 / (1 + x.abs()) ** 2


def _dtanhshrink(x: Tensor) -> Tensor:
    return torch.tanh(x) ** 2


def softplus(beta: float = 1.0, threshold: float = 20.0) -> Smooth:
    """``F.softplus(x, beta, threshold)``: ``log(1 + e^{βx})/β``, and ``x`` where ``βx > threshold`` (a jump of
    ``log1p(e^{−threshold})/β``, split at like a kink)."""

    def fn(x: Tensor) -> Tensor:
        return F.softplus(x, beta, threshold)

    def dfn(x: Tensor) -> Tensor:
        return torch.where(beta * x > threshold, torch.ones_like(x), torch.sigmoid(beta * x))

    # the switch to x at βx = threshold is a jump of log1p(e^{−threshold})/β: its own panel edge
    return Smooth(f"softplus(beta={beta}, threshold={threshold})", fn, dfn, centers=(0.0, threshold / beta))


def tanh() -> Smooth:
    """``torch.tanh`` (:class:`Smooth`)."""
    return Smooth("tanh", torch.tanh, _dtanh)


def sigmoid() -> Smooth:
    """``torch.sigmoid`` (:class:`Smooth`)."""
    return Smooth("sigmoid", torch.sigmoid, _dsigmoid)


def silu() -> Smooth:
    """``F.silu``: ``x·σ(x)`` (:class:`Smooth`)."""
    return Smooth("silu", F.silu, _dsilu)


def mish() -> Smooth:
    """``F.mish``: ``x·tanh(softplus(x))`` (:class:`Smooth`)."""
    return Smooth("mish", F.mish, _dmish)


def logsigmoid() -> Smooth:
    """``F.logsigmoid``: ``−softplus(−x)`` (:class:`Smooth`)."""
    return Smooth("logsigmoid", F.logsigmoid, _dlogsigmoid)


def softsign() -> Smooth:
    """``F.softsign``: ``x/(1 + |x|)`` (:class:`Smooth`; its second derivative jumps at 0, graded there)."""
    return Smooth("softsign", F.softsign, _dsoftsign)


def tanhshrink() -> Smooth:
    """``F.tanhshrink``: ``x − tanh(x)`` (:class:`Smooth`)."""
    return Smooth("tanhshrink", F.tanhshrink, _dtanhshrink)


def _smooth(layer: Smooth, opts: LiftOptions) -> Layer:
    """The lift of a smooth activation: :class:`Smooth` (``lift(deg=None)``, the default), or Gauss–Hermite of
    degree ``deg`` (``lift(deg=...)``: faster for large kernels; its error grows with the variance)."""
    if opts.deg > 0:
        return Elementwise(layer.fn, deg=opts.deg, name=layer.name)
    return layer


# ---------------------------------------------------------------------------------------------------
# lift rules
# ---------------------------------------------------------------------------------------------------
@lift_rule(nn.Tanh)
def _lift_tanh(m: nn.Module, opts: LiftOptions) -> Layer:
    return _smooth(tanh(), opts)


@lift_rule(nn.Sigmoid)
def _lift_sigmoid(m: nn.Module, opts: LiftOptions) -> Layer:
    return _smooth(sigmoid(), opts)


@lift_rule(nn.SiLU)
def _lift_silu(m: nn.Module, opts: LiftOptions) -> Layer:
    return _smooth(silu(), opts)


@lift_rule(nn.Mish)
def _lift_mish(m: nn.Module, opts: LiftOptions) -> Layer:
    return _smooth(mish(), opts)


@lift_rule(nn.Softplus)
def _lift_softplus(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.Softplus)
    return _smooth(softplus(float(m.beta), float(m.threshold)), opts)


@lift_rule(nn.LogSigmoid)
def _lift_logsigmoid(m: nn.Module, opts: LiftOptions) -> Layer:
    return _smooth(logsigmoid(), opts)


@lift_rule(nn.Softsign)
def _lift_softsign(m: nn.Module, opts: LiftOptions) -> Layer:
    return _smooth(softsign(), opts)


@lift_rule(nn.Tanhshrink)
def _lift_tanhshrink(m: nn.Module, opts: LiftOptions) -> Layer:
    return _smooth(tanhshrink(), opts)


@lift_rule(nn.ReLU6)
def _lift_relu6(m: nn.Module, opts: LiftOptions) -> Layer:
    return relu6()


@lift_rule(nn.Hardtanh)
def _lift_hardtanh(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.Hardtanh)
    if type(m) is nn.ReLU6:  # ReLU6 subclasses Hardtanh
        return relu6()
    return hardtanh(float(m.min_val), float(m.max_val))


@lift_rule(nn.Hardsigmoid)
def _lift_hardsigmoid(m: nn.Module, opts: LiftOptions) -> Layer:
    return hardsigmoid()


@lift_rule(nn.Hardswish)
def _lift_hardswish(m: nn.Module, opts: LiftOptions) -> Layer:
    return hardswish()


@lift_rule(nn.Softshrink)
def _lift_softshrink(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.Softshrink)
    return softshrink(float(m.lambd))


@lift_rule(nn.Hardshrink)
def _lift_hardshrink(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.Hardshrink)
    return hardshrink(float(m.lambd))


@lift_rule(nn.Threshold)
def _lift_threshold(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.Threshold)
    return threshold(float(m.threshold), float(m.value))


@lift_rule(nn.ELU)
def _lift_elu(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.ELU)
    return elu(float(m.alpha))


@lift_rule(nn.CELU)
def _lift_celu(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.CELU)
    return celu(float(m.alpha))


@lift_rule(nn.SELU)
def _lift_selu(m: nn.Module, opts: LiftOptions) -> Layer:
    return selu()


@lift_rule(nn.PReLU)
def _lift_prelu(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.PReLU`` -> ``LeakyRelu(a)`` with its slope ``a`` as it is (one slope, or per-channel slopes that are
    all equal, as at PyTorch's init ``a = 0.25``). The slope is held at its value: its own NTK contribution
    (one scalar's, or one per channel) is not included. Per-channel slopes that differ are refused."""
    assert isinstance(m, nn.PReLU)
    with torch.no_grad():
        w = m.weight.detach().double().reshape(-1)
    if w.numel() > 1 and not bool((w == w[0]).all()):
        raise unsupported(
            m,
            f"its {w.numel()} per-channel slopes differ (from {float(w.min()):.4g} to {float(w.max()):.4g}): each "
            f"channel then has its own nonlinearity, and a kernel of the infinite-width limit would need the law "
            f"of the slopes as the channels grow, which a finite model does not fix. Fix: lift the model at "
            f"initialisation (equal slopes, e.g. module.reset_parameters()), or use nn.PReLU() with one slope.",
        )
    return LeakyRelu(float(w[0]))


@lift_rule(nn.RReLU)
def _lift_rrelu(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.RReLU`` in eval mode is ``LeakyReLU((lower + upper)/2)``; train mode draws a random slope per entry
    and per forward pass (refused)."""
    assert isinstance(m, nn.RReLU)
    if m.training:
        raise unsupported(
            m,
            "in train mode RReLU draws a random negative slope for every entry in every forward pass, so the "
            "network is not a fixed function of its parameters and lift has no rule for it. Fix: model.eval() "
            "(then RReLU is LeakyReLU((lower + upper)/2)), or use nn.LeakyReLU.",
        )
    return LeakyRelu((float(m.lower) + float(m.upper)) / 2)


__all__ += ["relu6", "hardtanh", "hardsigmoid", "hardswish", "softshrink", "hardshrink", "threshold", "elu"]
__all__ += ["celu", "selu", "Smooth", "smooth_expectation", "piecewise_expectation", "tanh", "sigmoid", "silu"]
__all__ += ["mish", "softplus", "logsigmoid", "softsign", "tanhshrink"]
