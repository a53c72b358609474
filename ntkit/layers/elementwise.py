"""Elementwise nonlinearities: each is a function ``φ`` and the Gaussian expectations that are its kernel rule.

For jointly Gaussian pre-activations ``(u, v) ~ N(0, [[q11, q12], [q12, q22]])`` (Lee et al. 2018;
Jacot et al. 2018)::

    K'  = E[φ(u) φ(v)]                       (nngp_fn)
    K̇   = E[φ'(u) φ'(v)] = ∂K'/∂q12          (d_nngp_fn; Price's theorem)
    Θ'  = Θ · K̇

Closed forms are used where they exist (formula and source in each class's docstring); any other torch
function goes through :class:`Elementwise`, which integrates numerically (2-D Gauss–Hermite). Names,
parameters and defaults follow neural-tangents' ``stax``.

=======================  ================================  =============================================
layer                    φ(x)                              kernel (source)
=======================  ================================  =============================================
``ABRelu(a, b)``         ``a·min(x,0) + b·max(x,0)``       arc-cosine, degree 1 (Cho & Saul 2009)
``Relu``/``LeakyRelu``   special cases of ``ABRelu``       same
``Abs``                  ``|x|``                           same
``Sign``                 ``sign(x)``                       ``(2/π)·arcsin ρ`` (Cho & Saul 2009, degree 0)
``RectifiedMonomial(n)`` ``max(x,0)^n``                    arc-cosine, degree n (Cho & Saul 2009)
``Erf(a, b, c)``         ``a·erf(b·x) + c``                arcsine kernel (Williams 1997)
``Sigmoid_like``         ``Erf(1/2, 1/2.4020563531719796,  same
                         1/2)``
``Gelu``                 ``x·Φ(x)`` (tanh approx. option)  Tsuchida et al. 2021 (arXiv:2002.08517)
``Sin(a, b, c)``         ``a·sin(b·x + c)``                Gaussian characteristic function
``Cos(a, b, c)``         ``a·cos(b·x + c)``                same (phase c + π/2)
``Rbf(gamma)``           ``√2·sin(√(2γ)·x + π/4)``         ``exp(−γ|x−x'|²/d)`` (Rahimi & Recht 2007)
``Gaussian(a, b)``       ``a·exp(b·x²)``                   Gaussian integral
``Exp(a, b)``            ``a·exp(b·x)``                    log-normal moments
``ExpNormalized``        per-sample normalised sine        Shankar et al. 2020 (arXiv:2003.02237)
``Monomial(n)``          ``x^n``                           Hermite expansion (Mehler; O'Donnell 2014 §11)
``Polynomial(coef)``     ``Σ coef[i]·x^i``                 same
``Hermite(n)``           ``He_n(x)/√n!``                   ``q12^n`` at unit variance (same)
``Elementwise(fn)``      any torch function                Gauss–Hermite quadrature (Han et al. 2022)
=======================  ================================  =============================================

The smooth families live in :mod:`ntkit.layers.elementwise_smooth`, the polynomial ones in
:mod:`ntkit.layers.elementwise_poly`; ``ntkit.layers`` re-exports them all.

Numerics: correlations ``ρ = q12/√(q11 q22)`` are computed in one rounding each of ``q11·q22``, its root and
the quotient (correctly rounded when ``q11 = q22``; ``√q11·√q22`` where the product would leave the float
range), clamped to ``[−1, 1]``, and taken as exactly ``±1`` where ``|ρ| ≥ 1 − 16 eps`` — and nowhere else:
kernels with a ``√(1 − ρ²)`` or ``arccos ρ`` term would otherwise turn the round-off of duplicated inputs into
errors of order ``√eps``, while moving any other ``ρ`` would cost ``eps/θ`` near ``θ = arccos ρ → 0``. A zero
variance gives ``ρ = 0`` instead of ``0/0``. Closed forms are evaluated without cancellation or overflow for
variances from 1e-300 to 1e300 (tests/layers/test_extremes.py), or refuse with an error; gradients of every
rule are exact (autograd, second derivatives included: tests/layers/test_gradients.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit import _compile
from ntkit.kernel import Kernel
from ntkit.layers import residual_law
from ntkit.layers.base import (
    Features,
    FeatureSpec,
    Lambda,
    Layer,
    LayerError,
    LiftOptions,
    channel_matmul,
    lift_rule,
    single,
)

__all__ = [
    "ElementwiseLayer",
    "Elementwise",
    "ABRelu",
    "Relu",
    "LeakyRelu",
    "Abs",
    "Sign",
    "Erf",
    "Sigmoid_like",
    "gauss_hermite_expectation",
]

_PI = math.pi


def can_inplace(*tensors: Tensor) -> bool:
    """In-place updates of intermediates are safe unless autograd is recording through these inputs."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def ipc(t: Tensor, ip: bool, op: str, *args, **kwargs) -> Tensor:
    """``t.op_(*args)`` when ``ip`` (no new allocation), else ``t.op(*args)``; ``t`` must be a fresh temporary."""
    return getattr(t, op + "_")(*args, **kwargs) if ip else getattr(t, op)(*args, **kwargs)


# correlations within this many ulps of ±1 are taken as ±1 (see the module docstring)
_SNAP_ULPS = 16


@functools.cache
def _product_range(dtype: torch.dtype) -> tuple[float, float]:
    """Variances ``q`` in ``[lo, hi]`` have products ``q11·q22`` in the normal range of ``dtype``."""
    fi = torch.finfo(dtype)
    e = (min(math.frexp(fi.max)[1], -math.frexp(fi.tiny)[1]) - 4) // 2
    return 2.0**-e, 2.0**e


def _within(q: Tensor, lo: float, hi: float) -> bool:
    return bool(((q >= lo) & (q <= hi)).all())


def _correlation(q12: Tensor, q11: Tensor, q22: Tensor, sign: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(P, sign·q12/P)`` with ``P = √(q11 q22)``, exactly symmetric in ``(q11, q22)``, ``ρ = 0`` where a
    variance is 0 (then ``q12 = 0``), and no overflow or underflow for variances anywhere in the dtype's range.

    When every variance lies in :func:`_product_range` (a check on the small, broadcast variances) ``P`` is
    ``√(q11·q22)`` in one rounding each where the variances are as large as ``q12`` (then ``ρ`` is correctly
    rounded whenever ``q11 = q22``: ``√(q²) = q`` in IEEE arithmetic), and ``√q11·√q22`` where they broadcast
    (roots of the small vectors: ``ρ`` within 2 ulps; ``|ρ| ≥ 1 − 16 eps`` is snapped to ``±1`` afterwards
    anyway); else ``P = √q11 · √q22`` (reciprocals on the variances: no intermediate leaves the range).
    """
    lo, hi = _product_range(q12.dtype)
    if _within(q11, lo, hi) and _within(q22, lo, hi):
        if 4 * (q11.numel() + q22.numel()) <= q12.numel():
            # broadcast variances: roots of the small vectors and one outer product, not a root over every
            # entry (benchmarks/cnn.py: 7 % of Myrtle-5); √q11·√q22 is within 1.5 ulp of √(q11 q22)
            prod = torch.sqrt(q11) * torch.sqrt(q22)
        else:
            prod = torch.sqrt(q11 * q22)
        if sign == 1.0:
            return prod, q12 / prod
        return prod, torch.addcdiv(q12.new_zeros(()), q12, prod, value=sign)
    r1, r2 = torch.sqrt(q11), torch.sqrt(q22)
    return r1 * r2, q12 * (_safe_reciprocal(r1, sign) * _safe_reciprocal(r2, 1.0))


def _two_prod(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(p, e)`` with ``p = fl(a·b)`` and ``a·b = p + e`` exactly (Dekker 1971, Veltkamp's splitting); needs
    ``|a|, |b|`` well inside the range (here ≤ 1/c after the scaling of :func:`_root_det`)."""
    split = _SPLIT.get(a.dtype, 2.0**6 + 1.0)  # float16/bfloat16 are computed in float32 (ntkit._inputs)
    p = a * b
    ta, tb = a * split, b * split
    ah, bh = ta - (ta - a), tb - (tb - b)
    al, bl = a - ah, b - bh
    cross = ah * bl + al * bh  # one sum: the result is exactly symmetric in (a, b)
    return p, ((ah * bh - p) + cross) + al * bl


#: Veltkamp's splitting constants 2^⌈t/2⌉ + 1 (t: mantissa bits)
_SPLIT = {torch.float64: 2.0**27 + 1.0, torch.float32: 2.0**12 + 1.0}


def _root_det(c: float, q12: Tensor, q11: Tensor, q22: Tensor, sign: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(m, S)`` with ``m·S = √det``, ``det = (1 + σc·q11)(1 + σc·q22) − c²q12² = 1 + σc(q11 + q22) +
    c²(q11 q22 − q12²)`` (``σ = sign``): the determinant of ``I + σc·Σ`` behind the Gaussian-integral kernels
    (:class:`Erf`, ``Gelu``, ``Gaussian``), computed without cancellation or overflow for any variances.

    ``m`` is a power of 2 ``≥ max(1, c·q11, c·q22)`` (so the scaled terms are ``≤ 1``: no overflow where
    ``c·q`` reaches 1e300), and the discriminant ``q11 q22 − q12²`` — whose direct evaluation loses every digit
    for nearly parallel inputs at large variance (on the diagonal of ``x2 = None`` the product form
    ``(1 + cq)² − c²q²`` returned 0 instead of ``1 + 2cq`` at ``q ≈ 6e29``) — is computed exactly from the
    floats by Dekker's two-product, and taken as 0 if round-off made it negative (a covariance is PSD).
    """
    u = torch.maximum(q11, q22) * c
    _, e = torch.frexp(u.clamp_min(1.0))
    m = torch.ldexp(torch.ones_like(u), e)
    a, b, r = q11 / m, q22 / m, q12 / m  # exact (powers of 2)
    p1, e1 = _two_prod(a, b)
    p2, e2 = _two_prod(r, r)
    disc = ((p1 - p2) + (e1 - e2)).clamp_min(0.0)
    inv = 1.0 / m
    det = torch.addcmul(inv * inv, a + b, inv, value=sign * c) + (c * c) * disc
    return m, torch.sqrt(det.clamp_min(0.0))


def _safe_rho(q12: Tensor, q11: Tensor, q22: Tensor) -> tuple[Tensor, Tensor]:
    """``(sqrt(q11 q22), clamp(q12 / sqrt(q11 q22), -1, 1))``; ρ = 0 where a variance is 0 (then q12 = 0).

    ``|ρ| ≥ 1 − 16·eps`` becomes exactly ``±1``: duplicated inputs give ``ρ = 1 − O(eps)`` by round-off,
    which ``arccos``/``√(1 − ρ²)`` would amplify to ``O(√eps)``. Snapping moves ``θ = arccos ρ`` by at most
    ``√(32·eps)`` — the size of the error it removes — and no other correlation moves at all.
    """
    prod, rho = _correlation(q12, q11, q22)
    return prod, _snap_rho(rho.clamp(-1.0, 1.0), False)


@functools.cache
def _snap_angle(dtype: torch.dtype) -> float:
    """``arccos(1 − 16 eps)``: angles ``θ`` at or below it are those of ``|ρ| ≥ 1 − 16 eps`` (snapped)."""
    return math.acos(1 - _SNAP_ULPS * torch.finfo(dtype).eps)


def _snap_rho(rho: Tensor, ip: bool) -> Tensor:
    """Set correlations within ``_SNAP_ULPS`` ulps of ±1 to exactly ±1 (in place when ``ip``)."""
    thr = 1 - _SNAP_ULPS * torch.finfo(rho.dtype).eps
    if ip:
        return rho.masked_fill_(rho >= thr, 1.0).masked_fill_(rho <= -thr, -1.0)
    return rho.masked_fill(rho >= thr, 1.0).masked_fill(rho <= -thr, -1.0)


def _owns(t: Tensor, k: Kernel) -> bool:
    """True if ``t`` shares no memory with the tensors of ``k`` (so a rule's output may be edited in place)."""
    ptr = t.untyped_storage().data_ptr()
    return all(u is None or u.untyped_storage().data_ptr() != ptr for u in (k.nngp, k.ntk, k.cov1, k.cov2))


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _safe_reciprocal(r: Tensor, scale: float) -> Tensor:
    """``scale / r`` where ``r > 0``, else 0 (a zero variance makes the correlation 0, not 0/0)."""
    return torch.where(r > 0, scale / r.clamp_min(torch.finfo(r.dtype).tiny), r.new_zeros(()))


def _horner(coefs, x: Tensor) -> Tensor:
    """``Σ_i coefs[i]·x^i`` (coefficients lowest degree first; Python numbers or tensors) by Horner's rule."""
    if len(coefs) == 0:
        return torch.zeros_like(x)
    acc = torch.zeros_like(x) + coefs[-1]
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return acc


def _grad_of(f: Callable[[Tensor], Tensor], x: Tensor, *context: Tensor) -> Tensor:
    """``∂f/∂x`` of a scalar function ``f`` by autograd (``context``: the other tensors ``f`` depends on).

    Outside a recorded computation the gradient is a plain tensor. When autograd records through ``x`` or a
    ``context`` tensor, the gradient is built with ``create_graph=True`` (on an alias of ``x``, so that it is
    the partial derivative in ``x`` alone) and stays a differentiable function of everything it depends on:
    second derivatives are then exact, not those of a constant (without it, gradients of the NTK through
    :class:`Elementwise` were off by 7–38 %)."""
    create = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *context))
    with torch.enable_grad():
        xx = x.view_as(x) if (create and x.requires_grad) else x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xx), xx, create_graph=create)
    return g


class ElementwiseLayer(Layer):
    """Base class for nonlinearities. Subclasses define ``fn`` and ``nngp_fn``; ``d_nngp_fn``, ``var_fn``,
    ``mean_fn`` and :meth:`derivative` have generic defaults. ``rule`` may be overridden to share work between
    K' and K̇ (:class:`RuleLayer` subclasses write ``rule`` alone)."""

    tracks_means = True
    #: keeps ``Kernel.law`` (the residual-stream program, :mod:`ntkit.layers.residual_law`)
    carries_law = True

    def fn(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define fn(x), its elementwise function.")

    def nngp_fn(self, q12: Tensor, q11: Tensor, q22: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define nngp_fn(q12, q11, q22) = E[φ(u)φ(v)].")

    def derivative(self, x: Tensor) -> Tensor:
        """``φ'(x)`` elementwise, by autograd (``d/dx Σ φ(x)`` is ``φ'(x)``); closed forms override it.

        When autograd records through ``x`` (hyper-parameters or inputs being differentiated) the result is
        itself differentiable (``create_graph``: its derivative is ``φ''(x)``), so that ``K̇ = E[φ'(u) φ'(v)]``
        — and the NTK — have the right gradients, not those of a constant."""
        return _grad_of(lambda t: self.fn(t).sum(), x)

    def d_nngp_fn(self, q12: Tensor, q11: Tensor, q22: Tensor) -> Tensor:
        """∂ nngp_fn / ∂ q12, by automatic differentiation (Price's theorem); differentiable again in
        ``(q12, q11, q22)`` when autograd records through them (see :meth:`derivative`)."""
        return _grad_of(lambda q: self.nngp_fn(q, q11, q22).sum(), q12, q11, q22)

    def var_fn(self, q: Tensor) -> Tensor:
        """``E[φ(u)²]`` for ``u ~ N(0, q)``."""
        return self.nngp_fn(q, q, q)

    def mean_fn(self, q: Tensor) -> Optional[Tensor]:
        """``E[φ(u)]`` for ``u ~ N(0, q)`` (``None``: 0), the means a sum of branches needs (``FanInSum``).
        Default: a 100-node Gauss–Hermite rule on ``φ`` (exact for polynomials of degree < 200); every built-in
        layer has the closed form."""
        z, w = _hermite_nodes(100, q.dtype, q.device)
        return (self.fn(torch.sqrt(q)[..., None] * z) * w).sum(-1)

    def rule(self, q12: Tensor, q11: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Optional[Tensor]]:
        return self.nngp_fn(q12, q11, q22), (self.d_nngp_fn(q12, q11, q22) if need_dot else None)

    # -- Layer protocol ------------------------------------------------------------------------------
    def kernel(self, k):
        k = single(k, self)
        if not k.is_gaussian and k.law is not None:
            # a residual sum (nonlinearity output + independent Gaussian branches): ntkit.layers.residual_law
            return residual_law.law_kernel(self, k, (self.a, self.b) if isinstance(self, ABRelu) else None)
        if not k.is_gaussian:
            where = (
                "the raw inputs"
                if k.is_input
                else "non-Gaussian activations (a nonlinearity's output, FanInProd, FanInConcat, Dropout, or a "
                "sum other than one nonlinearity output plus independent Gaussian branches)"
            )
            raise LayerError(
                f"{type(self).__name__} needs Gaussian pre-activations but is applied to {where}. "
                f"Put a Dense or Conv layer before it."
            )
        q11, q22 = k.variances()
        fused = self._fused_rule(k.nngp, q11, q22, k.ntk) if _compile.compile_enabled() else None
        if fused is not None:  # inside ntkit.compiled(): K' and Θ' = Θ·K̇ in one compiled pass
            nngp, ntk = fused
        else:
            nngp, dot = self.rule(k.nngp, q11, q22, k.ntk is not None)
            if k.ntk is None:
                ntk = None
            else:
                assert dot is not None, "rule(..., need_dot=True) returns the derivative kernel"
                # in place only into a fresh K̇ that aliases nothing else (a user's d_nngp_fn may return its input)
                fresh = dot.shape == nngp.shape and _owns(dot, k) and not _same_storage(dot, nngp)
                ntk = dot.mul_(k.ntk) if fresh and can_inplace(dot, k.ntk) else k.ntk * dot
        cov1 = None if k.cov1 is None else self._self_rule(k, 1)
        cov2 = None if k.cov2 is None else self._self_rule(k, 2)
        out = self.output_record(k, nngp, ntk, cov1, cov2)
        return out.replace(law=residual_law.ResidualLaw.of_nonlinearity(k, self))  # for a later residual sum

    def output_record(
        self, k: Kernel, nngp: Tensor, ntk: Optional[Tensor], cov1: Optional[Tensor], cov2: Optional[Tensor]
    ) -> Kernel:
        """The record after this layer from the Gaussian record ``k`` of its input and the output kernels: the
        means of ``k``'s same-pixel variances, and (for ``x1_is_x2``) ``nngp[i, i] = cov1[i]`` written into
        ``nngp`` when it is fresh. Its ``law`` is ``None`` (:meth:`kernel` sets it)."""
        d1, d2 = k.same_pixel_variances()
        mean1 = self.mean_fn(d1)
        mean2 = None if (mean1 is None or d2 is None) else self.mean_fn(d2)
        out = k.replace(
            nngp=nngp,
            ntk=ntk,
            cov1=cov1,
            cov2=cov2,
            is_gaussian=False,
            is_input=False,
            mean1=mean1,
            mean2=mean2,
            mean_kind="exact",  # i.i.d. channels of a Gaussian input: every channel has this mean
            law=None,
        )
        return out.with_exact_diagonal(inplace=_owns(nngp, k))

    def _self_rule(self, k: Kernel, which: int) -> Tensor:
        cov = k.cov1 if which == 1 else k.cov2
        assert cov is not None, "_self_rule runs only for a self-covariance the record carries"
        if k.diagonal_spatial or k.spatial_ndim == 0:
            return self.var_fn(cov)
        qa, qb = k.self_variances(which)
        fused = self._fused_rule(cov, qa, qb, None, batch_dims=1) if _compile.compile_enabled() else None
        return fused[0] if fused is not None else self.nngp_fn(cov, qa, qb)

    def _fused_rule(
        self, q12: Tensor, q11: Tensor, q22: Tensor, ntk: Optional[Tensor], batch_dims: int = 2
    ) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        """``(K', Θ·K̇)`` by a compiled fused form of the rule (:mod:`ntkit._compile`), or ``None`` where this
        layer has none or the call stays eager (small, recorded by autograd, variances out of range).
        ``batch_dims``: the sample axes of ``q12`` (2 for a cross-covariance, 1 for a self-covariance)."""
        return None

    def build(self, in_shape, width, generator, readout):
        return Lambda(self.fn, repr(self)), in_shape

    def random_features(self, spec: FeatureSpec, generator: torch.Generator):
        """``f = φ(G g)/√m`` with ``G`` an ``m x dim`` standard Gaussian matrix (``E[f·f'] = E[φ(u)φ(v)]``),
        and for the NTK the Gaussian tensor sketch ``θ' = (A θ) ∘ (B ḟ)/√m`` of ``Θ·K̇`` with
        ``ḟ = φ'(G g)/√m`` (Zandieh et al. 2021); see :mod:`ntkit.random_features`.

        On convolutional features ``(N, dim, *spatial)`` the same ``G``, ``A``, ``B`` act at every pixel (so
        ``E[f[y]·f'[y']] = E[φ(u_y)φ(v_y')]`` for every pixel pair); after a ``Conv`` the projection ``G g`` of
        its patches is one convolution with ``m`` random filters (:class:`~ntkit.layers.base.PendingAffine`)."""
        if not spec.gaussian:
            raise LayerError(
                f"{type(self).__name__} needs Gaussian pre-activations; put a Dense or Conv layer before it."
            )
        m, ntk = spec.num_features, spec.get == "ntk"

        def draw(*shape: int) -> Tensor:
            return torch.randn(shape, generator=generator, dtype=spec.dtype)

        gm = draw(m, spec.dim)
        sketch = (draw(m, spec.ntk_dim), draw(m, m)) if ntk else None
        root = math.sqrt(m)

        def fmap(feats: Features) -> Features:
            u = feats.project(gm.to(feats.f.device))
            f = self.fn(u) / root
            theta = None
            if sketch is not None:
                a, b = (t.to(feats.f.device) for t in sketch)
                theta = feats.project(a, "theta") * channel_matmul(self.derivative(u) / root, b) / root
            return Features(f, theta)

        return fmap, dataclasses.replace(spec, dim=m, ntk_dim=m if ntk else spec.ntk_dim, gaussian=False)


class RuleLayer(ElementwiseLayer):
    """An :class:`ElementwiseLayer` whose subclasses write one ``rule(q12, q11, q22, need_dot) ->
    (K', K̇ or None)`` that shares work between the two; ``nngp_fn``/``d_nngp_fn`` are read off it."""

    def rule(self, q12: Tensor, q11: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError(
            f"{type(self).__name__} is a RuleLayer and must define rule(q12, q11, q22, need_dot) -> (K', K̇)."
        )

    def nngp_fn(self, q12, q11, q22):
        return self.rule(q12, q11, q22, False)[0]

    def d_nngp_fn(self, q12, q11, q22):
        return self.rule(q12, q11, q22, True)[1]


# ---------------------------------------------------------------------------------------------------
# ReLU family: arc-cosine kernel of degree 1 (Cho & Saul 2009)
# ---------------------------------------------------------------------------------------------------
class ABRelu(RuleLayer):
    """``φ(x) = a·min(x, 0) + b·max(x, 0)``.

    With ``θ = arccos ρ``, ``ρ = q12/sqrt(q11 q22)`` and the arc-cosine integrals (Cho & Saul 2009)
    ``J1 = sqrt(q11 q22)/(2π)·(sin θ + (π − θ) cos θ)`` = E[relu(u) relu(v)],
    ``J2 = sqrt(q11 q22)/(2π)·(sin θ − θ cos θ)`` = E[relu(u) relu(−v)]::

        K' = (a² + b²)·J1 − 2ab·J2
        K̇  = ((a² + b²)(π − θ) + 2ab·θ) / (2π)
        E[φ(u)²] = (a² + b²)/2 · q,    E[φ(u)] = (b − a)·√(q/(2π))

    Evaluated through ``ψ = π − θ = arccos(−ρ)`` (accurate at both ends: no cancellation in ``K̇`` for
    anti-parallel inputs) with ``|ρ| ≥ 1 − 16 eps`` snapped to ``±1`` by two threshold passes and no other
    correlation moved: within 1e-11 of a 40-digit reference from ``θ = 1e-7`` to ``π`` wherever ``ρ`` is exact
    in float64 (the hot path of benchmarks/fc.py and cnn.py; 11 tensor passes, one more than the former
    scaled-clamp snapping that moved every ``ρ`` by 16 eps and cost 1.5e-8 on ``K̇`` at ``θ ≈ 1e-7``).
    """

    def __init__(self, a: float, b: float):
        self.a, self.b = float(a), float(b)

    def fn(self, x):
        a, b = self.a, self.b
        if a == 0.0:  # the ReLU family's common case in one pass (two for b ≠ 1); same values and gradients
            pos = torch.clamp(x, min=0)
            return pos if b == 1.0 else pos * b
        return a * torch.clamp(x, max=0) + b * torch.clamp(x, min=0)

    def derivative(self, x):
        return torch.where(x > 0, torch.as_tensor(self.b, dtype=x.dtype), torch.as_tensor(self.a, dtype=x.dtype))

    def rule(self, q12, q11, q22, need_dot):
        a, b = self.a, self.b
        s2, ab = a * a + b * b, a * b
        c1 = s2 - 2 * ab  # = (a − b)² ≥ 0
        ip = can_inplace(q12, q11, q22)
        eps = torch.finfo(q12.dtype).eps
        # y = −ρ, P = √(q11 q22) (ρ = 0 where a variance is 0; P symmetric in (q11, q22), so that the kernel for
        # x2 = None is exactly symmetric)
        prod, y = _correlation(q12, q11, q22, -1.0)
        # snap |ρ| ≥ 1 − 16 eps to ±1 (module docstring) and move no other correlation: ρ ≥ 1 − 16 eps (and
        # ρ > 1 by round-off) -> y = −1 in one threshold pass; ρ < −1 -> y = 1 by the clamp
        y = F.threshold(y, _SNAP_ULPS * eps - 1.0, -1.0, inplace=ip)
        y = ipc(y, ip, "clamp", max=1.0)
        # ψ = π − θ = arccos(−ρ), accurate at both ends (ψ ≈ π − θ near ρ = 1, ψ → 0 near ρ = −1: no
        # cancellation in K̇ for anti-parallel inputs); ρ ≤ −(1 − 16 eps) -> ψ = 0 (θ = π), one threshold pass
        psi = F.threshold(torch.arccos(y), _snap_angle(q12.dtype), 0.0, inplace=ip)
        sin = torch.sin(psi)  # sin θ = sin ψ
        # K̇ = ((a²+b²)(π − θ) + 2ab θ)/(2π) = ab + (a − b)²/(2π) · ψ
        alpha = c1 / (2 * _PI)
        dot = (
            torch.add(psi.new_tensor(ab), psi, alpha=alpha, out=psi)
            if ip
            else torch.add(psi.new_tensor(ab), psi, alpha=alpha)
        )
        # K' = (a²+b²) J1 − 2ab J2 = √(q11 q22)/(2π) · [c1 sin θ + 2π K̇ ρ] = K̇ q12 + c1/(2π) · P sin θ
        nngp = dot * q12
        if c1:
            nngp = ipc(nngp, ip, "addcmul", sin, prod, value=alpha)
        return nngp, (dot if need_dot else None)

    def _fused_rule(self, q12, q11, q22, ntk, batch_dims=2):
        """The rule above in one compiled pass (:func:`_abrelu_fused`), where the eager rule would take its
        broadcast-variance path (the hot path of convolutional nets): same formulas, same snapping."""
        if type(self).rule is not ABRelu.rule or not _fusable(q12, q11, q22, ntk):
            return None
        lo, hi = _product_range(q12.dtype)
        if not (_within(q11, lo, hi) and _within(q22, lo, hi)):
            return None
        r1, r2 = torch.sqrt(q11), torch.sqrt(q22)
        return _compile.fused(_abrelu_fused, q12, ntk, r1, r2, *self.fused_consts(q12.dtype), batch_dims=batch_dims)

    def fused_consts(self, dtype: torch.dtype) -> tuple[float, float, float, float]:
        """The constants of :func:`_abrelu_fused`: the snapping thresholds of ``y = −ρ`` and ``ψ``, ``ab`` and
        ``(a − b)²/2π``."""
        return (
            _SNAP_ULPS * torch.finfo(dtype).eps - 1.0,
            _snap_angle(dtype),
            self.a * self.b,
            (self.a - self.b) ** 2 / (2 * _PI),
        )

    def fused_variance_range(self, dtype: torch.dtype) -> tuple[float, float]:
        """Variances for which :func:`_abrelu_fused` (roots of the two variances, one product) is exact
        (:func:`_product_range`); outside it the eager rule runs."""
        return _product_range(dtype)

    def var_fn(self, q):
        return (self.a**2 + self.b**2) / 2 * q

    def mean_fn(self, q):
        """``E[φ(u)] = (b − a)·√(q/(2π))``."""
        return None if self.a == self.b else (self.b - self.a) * torch.sqrt(q / (2 * _PI))


def _fusable(q12: Tensor, q11: Tensor, q22: Tensor, ntk: Optional[Tensor]) -> bool:
    """Whether a fused rule may run (``ntkit.compiled()``): at least ``MIN_NUMEL`` entries in float32/64, no
    autograd recording, broadcast (small) variances as on the eager rules' fast path, ``Θ`` of ``q12``'s shape.
    (A subclass that overrides ``rule`` keeps its own rule, eagerly: the callers check that.)"""
    return (
        _compile.worth_compiling(q12, q11, q22, *(() if ntk is None else (ntk,)))
        and 4 * (q11.numel() + q22.numel()) <= q12.numel()
        and (ntk is None or ntk.shape == q12.shape)
    )


def _abrelu_fused(
    q12: Tensor, ntk: Optional[Tensor], r1: Tensor, r2: Tensor, lo: float, ang: float, ab: float, alpha: float
) -> tuple[Tensor, Optional[Tensor]]:
    """:meth:`ABRelu.rule` and ``Θ·K̇`` (``ntk`` given) in one pass, compiled by :func:`ntkit._compile.fused`
    (once per rank with and without ``ntk``), on ``P = r1·r2`` (``r = √q``): ``y = −ρ`` snapped at ``lo``,
    ``ψ = arccos y`` snapped at ``ang``, ``K̇ = ab + αψ``, ``K' = K̇ q12 + α·P sin ψ`` (``α = (a − b)²/2π``), with
    ``sin ψ = √((1 − y)(1 + y))`` (exact identity; ``1 ∓ y`` exact near ``y = ±1``, so within 2 ulps like
    ``sin(arccos y)``, and a third cheaper: one root instead of a sine), 0 where ``ψ`` is snapped to 0."""
    prod = r1 * r2
    y = -(q12 / prod)
    y = torch.where(y <= lo, -1.0, y).clamp(max=1.0)
    psi = torch.acos(y)
    keep = psi > ang
    sin = torch.where(keep, torch.sqrt((1.0 - y) * (1.0 + y)), 0.0)
    dot = ab + alpha * torch.where(keep, psi, 0.0)
    return dot * q12 + alpha * (sin * prod), (None if ntk is None else dot * ntk)


class Relu(ABRelu):
    """``max(x, 0)``; the arc-cosine kernel of degree 1 (Cho & Saul 2009). See :class:`ABRelu`."""

    def __init__(self):
        super().__init__(0.0, 1.0)

    def __repr__(self):
        return "Relu()"


class LeakyRelu(ABRelu):
    """``max(x, 0) + alpha·min(x, 0)``. See :class:`ABRelu` with ``a = alpha, b = 1``."""

    def __init__(self, alpha: float):
        super().__init__(alpha, 1.0)
        self.alpha = float(alpha)

    def __repr__(self):
        return f"LeakyRelu(alpha={self.alpha})"


class Abs(ABRelu):
    """``|x|``. See :class:`ABRelu` with ``a = −1, b = 1``."""

    def __init__(self):
        super().__init__(-1.0, 1.0)

    def __repr__(self):
        return "Abs()"


class Sign(RuleLayer):
    """``sign(x)`` (``sign(0) = 0``).

    The arc-cosine kernel of degree 0 made odd (Cho & Saul 2009): with ``θ = arccos ρ``,
    ``E[sign(u) sign(v)] = 1 − 2θ/π = (2/π)·arcsin ρ``; ``E[sign(u)²] = 1`` (0 where ``q = 0``).

    NTK: as NT, ``K̇ = 0`` — ``sign' = 0`` almost everywhere, which is also what autograd gives the finite
    network. (Price's theorem with the distributional derivative ``2δ(x)`` would give
    ``(2/π)/√(q11 q22 − q12²)`` — the limit of ``Erf(b=β)`` as ``β → ∞`` — which the sign network's gradient,
    identically 0, never sees.)
    """

    def fn(self, x):
        return torch.sign(x)

    def rule(self, q12, q11, q22, need_dot):
        _, rho = _safe_rho(q12, q11, q22)
        nngp = (2 / _PI) * torch.arcsin(rho)
        return nngp, (torch.zeros_like(nngp) if need_dot else None)

    def var_fn(self, q):
        return (q != 0).to(q.dtype)

    def mean_fn(self, q):
        return None  # odd

    def __repr__(self):
        return "Sign()"


# ---------------------------------------------------------------------------------------------------
# Erf: arcsine kernel (Williams 1997)
# ---------------------------------------------------------------------------------------------------
class Erf(RuleLayer):
    """``φ(x) = a·erf(b·x) + c`` (NT's defaults a=1, b=1, c=0).

    Williams (1997): ``E[erf(bu) erf(bv)] = (2/π)·arcsin(2b²q12 / sqrt((1 + 2b²q11)(1 + 2b²q22)))``, and
    ``E[erf(bu)] = 0``, so::

        K' = a²·(2/π)·arcsin(2b² q12 / sqrt((1+2b²q11)(1+2b²q22))) + c²
        K̇  = a²·(4b²/π) / sqrt((1+2b²q11)(1+2b²q22) − 4b⁴ q12²)

    Evaluated as ``arcsin(x) = atan(2b² q12/√det)`` with the determinant of :func:`_root_det`: exact for
    any variances (the product form cancels on the diagonal at large variance) and for ``ρ → ±1``.
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        self.a, self.b, self.c = float(a), float(b), float(c)

    def fn(self, x):
        return self.a * torch.erf(self.b * x) + self.c

    def rule(self, q12, q11, q22, need_dot):
        a, b, c = self.a, self.b, self.c
        t = 2 * b * b
        # arcsin(t q12 / √((1+t q11)(1+t q22))) = atan(t q12 / √det), det = (1+t q11)(1+t q22) − t² q12² > 0;
        # with √det = m·S (_root_det: no cancellation, no overflow) both parts are divided by m. (atan, not
        # atan2: torch's atan2 rounds differently in vectorised and tail loops, and cov1 must not depend on
        # where a sample falls in a tile)
        m, root = _root_det(t, q12, q11, q22)
        nngp = (a * a * 2 / _PI) * torch.atan(((t * q12) / m) / root) + c * c
        dot = None
        if need_dot:
            dot = (a * a * 2 * t / _PI) / (m * root)
        return nngp, dot

    def _fused_rule(self, q12, q11, q22, ntk, batch_dims=2):
        """The rule above in one compiled pass (:func:`_erf_fused`) where the variances broadcast: ``m`` of
        :func:`_root_det` is ``max(m1, m2)`` of the two sides' powers of 2 (the exponent is monotone), taken from
        the small variance tensors; the rest term for term."""
        if type(self).rule is not Erf.rule or not _fusable(q12, q11, q22, ntk):
            return None
        t = 2 * self.b * self.b
        if not (math.isfinite(t) and t > 0):
            return None
        m1, m2 = _pow2_above(q11 * t), _pow2_above(q22 * t)
        consts = (t, self.a * self.a * 2 / _PI, self.c * self.c, _SPLIT.get(q12.dtype, 2.0**6 + 1.0))
        return _compile.fused(_erf_fused, q12, ntk, q11, q22, m1, m2, *consts, batch_dims=batch_dims)

    def mean_fn(self, q):
        """``E[φ(u)] = c`` (erf is odd)."""
        return None if self.c == 0 else torch.full_like(q, self.c)


def _pow2_above(u: Tensor) -> Tensor:
    """The power of 2 that :func:`_root_det` divides by, ``2^e`` with ``max(1, u) = f·2^e``, ``f ∈ [1/2, 1)``."""
    _, e = torch.frexp(u.clamp_min(1.0))
    return torch.ldexp(torch.ones_like(u), e)


def _erf_fused(
    q12: Tensor, ntk: Optional[Tensor], q11: Tensor, q22: Tensor, m1: Tensor, m2: Tensor,
    t: float, a2: float, c2: float, split: float,
) -> tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """:meth:`Erf.rule` and ``Θ·K̇`` (``ntk`` given) in one pass, compiled by :func:`ntkit._compile.fused`, with
    :func:`_root_det` inlined (``m = max(m1, m2)``; Dekker's two-products by Veltkamp's ``split``):
    ``K' = a2·atan((t q12/m)/S) + c²``, ``K̇ = a2·t/(m S)``."""
    m = torch.maximum(m1, m2)
    a, b, r = q11 / m, q22 / m, q12 / m

    def two_prod(x, y):
        p = x * y
        tx, ty = x * split, y * split
        xh, yh = tx - (tx - x), ty - (ty - y)
        xl, yl = x - xh, y - yh
        return p, ((xh * yh - p) + (xh * yl + xl * yh)) + xl * yl

    p1, e1 = two_prod(a, b)
    p2, e2 = two_prod(r, r)
    disc = ((p1 - p2) + (e1 - e2)).clamp_min(0.0)
    inv = 1.0 / m
    det = (inv * inv + (a + b) * inv * t) + (t * t) * disc
    root = torch.sqrt(det.clamp_min(0.0))
    nngp = a2 * torch.atan(((t * q12) / m) / root) + c2
    return nngp, (None if ntk is None else (a2 * t) / (m * root) * ntk)


class Sigmoid_like(Erf):
    """A sigmoid-like erf, ``φ(x) = erf(x / 2.4020563531719796)/2 + 1/2`` (NT's ``Sigmoid_like``).

    The constant makes ``φ`` the least-squares fit of the logistic sigmoid on ``[−5, 5]``; the kernel is
    :class:`Erf`'s with ``a = 1/2``, ``b = 1/2.4020563531719796``, ``c = 1/2`` (Williams 1997).
    """

    def __init__(self):
        super().__init__(a=0.5, b=1 / 2.4020563531719796, c=0.5)

    def __repr__(self):
        return "Sigmoid_like()"


# ---------------------------------------------------------------------------------------------------
# Any torch elementwise function: closed forms if given, else Gauss–Hermite quadrature
# ---------------------------------------------------------------------------------------------------
def _hermite_nodes(deg: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Probabilists' Gauss–Hermite nodes/weights normalised so that Σ w f(z) ≈ E[f(z)], z ~ N(0,1)."""
    z, w = np.polynomial.hermite_e.hermegauss(deg)
    w = w / w.sum()
    return (torch.as_tensor(z, dtype=dtype, device=device), torch.as_tensor(w, dtype=dtype, device=device))


# at most this many function evaluations are materialised at once by the quadrature
_QUAD_CHUNK_EVALS = 1 << 22


def gauss_hermite_expectation(
    f: Callable[[Tensor], Tensor], q12: Tensor, q11: Tensor, q22: Tensor, deg: int = 25
) -> Tensor:
    """``E[f(u) f(v)]`` for ``(u, v) ~ N(0, [[q11, q12], [q12, q22]])`` by a ``deg × deg`` tensor-product
    Gauss–Hermite rule on the Cholesky factorisation ``u = √q11·z1``,
    ``v = √q22·(ρ z1 + √(1−ρ²) z2)``.

    The larger variance is always put first, so the result is exactly symmetric in ``(q11, q22)``.
    The rule is exact when ``f`` is a polynomial of degree ``≤ deg − 1`` (each 1-D rule integrates degree
    ``2·deg − 1``). For functions with complex poles the error falls only like ``exp(−c·sqrt(deg))``:
    measured for ``tanh`` with variances 1–2 and correlations 0.5–0.999 against ``deg = 200``, the relative
    error is about 3e-4 at ``deg = 25`` (NT's default, and NT's own reference outputs carry it), 2e-6 at
    ``deg = 50`` and 1e-9 at ``deg = 100``. Memory is bounded: entries are processed in chunks of
    ``_QUAD_CHUNK_EVALS / deg²``.
    """
    q12, q11, q22 = torch.broadcast_tensors(q12, q11, q22)
    # E[f(u) f(v)] is symmetric in (u, v) but the rule is not: put the larger variance first, so that the
    # result is exactly symmetric in its two arguments (and K(x1, x2) = K(x2, x1) bit for bit)
    q11, q22 = torch.maximum(q11, q22), torch.minimum(q11, q22)
    shape = q12.shape
    z, w = _hermite_nodes(deg, q12.dtype, q12.device)
    flat12, flat11, flat22 = q12.reshape(-1), q11.reshape(-1), q22.reshape(-1)
    out = torch.empty_like(flat12)
    chunk = max(1, _QUAD_CHUNK_EVALS // (deg * deg))
    for s in range(0, flat12.numel(), chunk):
        a, b, c = flat12[s : s + chunk], flat11[s : s + chunk], flat22[s : s + chunk]
        sq1, sq2 = torch.sqrt(b), torch.sqrt(c)
        _, rho = _safe_rho(a, b, c)
        perp = torch.sqrt((1 - rho * rho).clamp_min(0))
        fu = f(sq1[:, None] * z[None, :])  # (m, deg): f(u_i)
        v = sq2[:, None, None] * (rho[:, None, None] * z[None, :, None] + perp[:, None, None] * z[None, None, :])
        fv = f(v)  # (m, deg_i, deg_j)
        out[s : s + chunk] = torch.einsum("mi,mij,i,j->m", fu, fv, w, w)
    return out.reshape(shape)


class Elementwise(ElementwiseLayer):
    """Any elementwise torch function ``fn``.

    * ``nngp_fn(q12, q11, q22)`` given: used as the closed form of ``E[fn(u) fn(v)]``; ``d_nngp_fn`` defaults to
      its autograd derivative in ``q12`` (Price's theorem).
    * ``nngp_fn=None``: both expectations by :func:`gauss_hermite_expectation` with ``deg`` nodes per axis
      (``fn'`` by autograd). ``deg`` is the accuracy knob: polynomials of degree < ``deg`` are exact.

    Example: ``Elementwise(torch.tanh)``, ``Elementwise(torch.nn.functional.silu, deg=40)``.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        nngp_fn: Optional[Callable] = None,
        d_nngp_fn: Optional[Callable] = None,
        deg: int = 25,
        name: Optional[str] = None,
    ):
        if not callable(fn):
            raise TypeError("fn must be a callable mapping a tensor to a tensor of the same shape.")
        if not (isinstance(deg, int) and deg >= 2):
            raise ValueError(f"deg={deg!r}: the quadrature needs an int >= 2 nodes per axis.")
        self._fn, self._nngp, self._d_nngp, self.deg = fn, nngp_fn, d_nngp_fn, deg
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def fn(self, x):
        return self._fn(x)

    def nngp_fn(self, q12, q11, q22):
        if self._nngp is not None:
            return self._nngp(q12, q11, q22)
        return gauss_hermite_expectation(self._fn, q12, q11, q22, self.deg)

    def d_nngp_fn(self, q12, q11, q22):
        if self._d_nngp is not None:
            return self._d_nngp(q12, q11, q22)
        if self._nngp is not None:
            return super().d_nngp_fn(q12, q11, q22)
        return gauss_hermite_expectation(self.derivative, q12, q11, q22, self.deg)

    def var_fn(self, q):
        if self._nngp is not None:
            return self._nngp(q, q, q)
        z, w = _hermite_nodes(self.deg, q.dtype, q.device)
        return (self._fn(torch.sqrt(q)[..., None] * z) ** 2 * w).sum(-1)

    def __repr__(self):
        return f"Elementwise({self.name}, deg={self.deg})"


# ---------------------------------------------------------------------------------------------------
# lift: torch activation modules
# ---------------------------------------------------------------------------------------------------
@lift_rule(nn.ReLU)
def _lift_relu(m: nn.Module, opts: LiftOptions) -> Layer:
    return Relu()


@lift_rule(nn.LeakyReLU)
def _lift_leaky_relu(m: nn.Module, opts: LiftOptions) -> Layer:
    assert isinstance(m, nn.LeakyReLU)
    return LeakyRelu(m.negative_slope)


# nn.Tanh, nn.Sigmoid, nn.SiLU and every other activation module: ntkit/layers/activations.py
