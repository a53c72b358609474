"""A nonlinearity applied to a non-Gaussian sum: the law of the residual stream of post-activation blocks.

torchvision's ``BasicBlock`` computes ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + x)`` with ``x`` itself a
ReLU output: the ReLU is applied to ``h = g + r``, a Gaussian ``g`` (the fresh convolution's output) plus a
non-Gaussian ``r = φ0(z)``. Its kernel is not the Gaussian rule applied to ``Cov(h)``: treating the sum as
Gaussian is 76 % off Monte Carlo on the small ResNet of tests/lift/test_lift_resnet.py (8×8 inputs; this rule:
0.8 %, within the estimate's noise), 63 % on the residual MLP of tests/layers/test_residual_law.py.

The exact limit (tensor programs, Yang 2019). Each coordinate of a fresh matmul/conv output is Gaussian and
independent of every activation computed without its weights, and an identity skip maps pixel ``p`` to pixel
``p``. So at a pair of points ``(x, p), (x', p')`` the residual stream is the *program*::

    (z, z') ~ N(0, Σ_0)  ->  r = φ0(z)  ->  h = g + r,  (g, g') ~ N(0, Σ_g) independent of (z, z')

with ``Σ_0``, ``Σ_g`` the ``2×2`` covariances that the Gaussian rules give at that pair. The record of such an
activation carries that program (:class:`ResidualLaw`, the field ``Kernel.law``): a short list of steps
(``Gauss`` summands with their covariance records, ``Apply`` of an elementwise layer, ``Scale``), not a law.
Then (Jacot et al. 2018 for the NTK recursion)::

    K'  = E[φ(h) φ(h')],    Θ' = E[φ'(h) φ'(h')] Θ_g + E[φ'(h) φ'(h') φ0'(z) φ0'(z')] Θ_z
    E[φ(h)],  E[φ(h)²]      (means for later sums; same-pixel variances)

The NTK is *not* ``E[φ'(h)φ'(h')]`` times the mean ``Θ_h = Θ_g + E[φ0'φ0'] Θ_z`` of the sum: a neuron's gradient
inner product through the skip connection is ``φ0'(z)φ0'(z') Θ_z``, with that neuron's own derivatives, which are
correlated with ``φ'(h)`` (``z > 0`` makes ``h > 0`` likelier). Each Gaussian summand ``g_l`` contributes its
``Θ_{g_l}`` times the *path weight* ``P_l = E[φ'(h)φ'(h') Π r'(h_m) r'(h_m')]`` over the nonlinearities between it
and ``h`` (:func:`pair_expectations`). ntkit used the mean until 2026-12: on the tests' residual MLP that NTK is
2.6 % off Monte Carlo (1 000 twins of width 1 024, standard error 0.5 %), 5.1 % with two blocks in a row; the
path weights: 0.29 % and 0.33 % (``benchmarks/lift_models.py --cases mlp``). The NNGP is unaffected.

Numerical rule (:func:`pair_expectations`), for ``φ`` of the ReLU family ``φ(x) = a·min(x,0) + b·max(x,0)``
(``ABRelu``; ``φ0`` any elementwise layer):

* the last Gaussian level is integrated in closed form given ``(r, r')``: with ``α = r/σ_1``, ``β = r'/σ_2``
  and ``ρ`` the correlation of ``(g, g')``, ``E[relu(g+r) relu(g'+r')]`` is the truncated bivariate normal
  moment ``σ1σ2·E[(X+α)₊(Y+β)₊]`` (Rosenbaum 1961; derived by Stein's lemma in ``tests``) and
  ``E[1{g+r>0} 1{g'+r'>0}] = Φ₂(α, β; ρ)``, the bivariate normal probability computed as Drezner & Wesolowsky
  (1990) with Genz's (2004) treatment of ``|ρ| ≥ 0.75``, 6-node rules (within 1e-8; :func:`bvn_upper`);
* the first level ``(z, z')`` is integrated in polar coordinates of its whitened form, ``z = σ1·R cos t``,
  ``z' = σ2·R cos(t − t0)``, ``t0 = arccos ρ0``: the angle by Gauss–Legendre on pieces of the four arcs between
  the angles where ``z`` or ``z'`` changes sign (the kinks of ReLU-like ``φ0`` lie on those rays), each arc cut
  again at the ray where ``r/σ_g1 = ±r'/σ_g2`` (the kink of ``Φ₂`` as ``ρ_g → ±1``) and at ``2σ_g/σ_0`` from
  each end (or at its midpoint if nearer): the boundary layer ``|r| ≲ σ_g`` across which the last level smooths
  the kink of ``relu(g + r)``, thin when the Gaussian branch is small against the skip (as in default-initialised
  ResNets, ``σ_0/σ_g ≈ 7``); without these cuts the angular rule converges only algebraically (with 3 nodes per
  piece 6.6e-4 of the scale on the ResNet-18 stage's entries, with them 4.5e-5; a script outside the
  repository). 16 pieces in all; the radius by the Gauss rule of the weight ``R e^{−R²/2}`` on ``[0, ∞)``. On
  each piece the integrand is analytic for piecewise-linear ``φ0`` (ReLU, LeakyReLU, Abs) and smooth ``φ0``.
* the same point on both sides (same sample and pixel): the exact 1-D rule (:func:`single_expectations`).

Error control (:func:`pair_expectations`). Every entry is computed with two rules ``(n_ang, n_rad)`` (nodes per
angular piece, radial nodes): ``(4, 4)`` and ``(3, 3)`` when only the NNGP is asked for, ``(4, 8)`` and ``(3, 6)``
with the NTK's path weights, whose integrand converges more slowly in the radius (on arcs where one side is
negative its ``Φ₂`` factor decays like a Gaussian narrower than the weight's). Their difference, relative to
``√(E[φ(h)²] E[φ(h')²])`` (and for the path weights absolute, in units of ``max(|a|, |b|)²``), is the error
estimate of the coarser rule, and the finer one is returned. Entries whose estimate exceeds ``TOL = 1e-3`` are
recomputed with ``(8, 12)`` against the first rung's finer rule, then ``(16, 24)`` against ``(8, 12)``; an entry
still above it raises :class:`~ntkit.layers.base.LayerError` (never a silent inaccurate number). Measured
(tests/layers/test_residual_law.py): the returned values are within 1.0e-5 (with the path weights) and 7.5e-5
(the NNGP alone) of an independent 48-node Cartesian rule, the path weights within 2.8e-5, and ``Φ₂`` within
5.7e-9 of mpmath (:func:`bvn_upper`; inside the rule 4 nodes, within 5.5e-7 on a grid). The slowest case is a
Gaussian branch much smaller than the skip connection (``σ_g ≪ σ_0``): more entries then take the refinements.
Deterministic and independent of the batch: an entry depends only on its own covariances (tiled = untiled).
Cost: per entry 12 pieces (ReLU ``φ0``, whose arc ``z, z' < 0`` is a constant) × 25 nodes of the closed form for
the NNGP (50 with the path weights), the fine and the coarse rule's evaluated in one pass, each with a 4-node
``Φ₂`` whose angles depend on the entry only; for ``x2 = x1`` the batch pairs ``i ≤ j`` only and, in their diagonal
blocks, the pixel pairs ``p ≤ p'`` only; the error scale's 1-D rule once per distinct point. Measured times: the
tests' small ResNet and ResNet-18's first stage in BENCHMARKS.md (``benchmarks/lift_models.py``).

Two non-Gaussian levels (two identity blocks in a row, as in ResNet-18's first stage: ``h2 = g2 + χ(h1)``,
``h1 = g1 + ψ(z)``, with ``ψ`` and ``χ`` of the ReLU family) (:func:`_pair_rules3`). Nested, this is a 4-D
expectation (about 10⁵ closed-form evaluations per entry with kink-aligned pieces at both levels). Instead, on
each of the four sign patterns ``Q`` of ``(z, z')`` the map ``ψ`` is linear, ``ψ(z) = A_Q z``, so ``(z, h1)`` is
jointly Gaussian there, and by the tower property::

    E[F(χ(h1), χ(h1'))] = Σ_Q E_{h ~ N(0, C_Q)}[F(χ(h), χ(h')) π_Q(h)],   C_Q = Σ_1 + A_Q Σ_0 A_Q,
    π_Q(h) = P(z ∈ Q | h1 = h)   (a Φ₂ of the conditional law N(M h, V), M = Σ_0 A_Q C_Q⁻¹, V = Σ_0 − M A_Q Σ_0)

with ``F`` the last level's closed form. Each term is the two-level rule above with ``C_Q`` as its first level and
the weight ``π_Q``, whose steps, along the lines ``(M h)_i = 0`` (and, as the conditional correlation tends to ±1,
the line where ``Φ₂``'s arguments are equal or opposite), are cut as extra rays; for ReLU's ``z, z' < 0`` the
weight is the constant ``P(z ∈ Q)``. The same error control. The same point on both sides: a nested 1-D rule
(:func:`_single_rule3`, to ~1e-10). Measured (tests/layers/test_residual_law.py): within 7.3e-5 of the scale of an
independent nested 4-D rule on the NNGP's ladder and 8.3e-6 on the path weights' (the reference's own accuracy is
~2e-5), path weights within 2.5e-5; on branches 3–4× smaller than the skip in standard
deviation (default-initialised ResNets are nearer 7×) the first rung is within the tolerance of the finest rule
(32 angular nodes per piece, 48 radial), and the ladder converges slowly beyond it (``π_Q`` steps over a width
~σ_g1 across its cut lines: (16, 24) is 4e-5 from (32, 48)). Cost: about four times the two-level rule per
entry (four terms, three with a ``Φ₂`` weight per node and more pieces: the lines of the weight are cut as
well; the ResNet-18 stage's times in BENCHMARKS.md).

**Known limitation of the three-level rule** (``python benchmarks/lift_models.py --cases rule --samples 4``: 400
random entries per program, middle branches down to ``σ_g1² = 0.005 σ_0²``, 30 % of the correlations within 1e-6
to 1e-1 of 1, against the rule's own ``(32, 48)`` rung): 7 entries come back 1.0e-3 to 2.7e-3 of the scale off,
*above* the tolerance although their error estimate passed (fine and coarse rule off alike; a script outside the
repository found that an estimate threshold of 2e-4 would catch all 7 but refine 247 of the 400, and that on the
worst entry ``(32, 48)``, ``(64, 96)`` and the tests' nested 4-D reference agree to 1e-6). Until 2026-12-02 a line
of the weight with ``atan2`` angle in ``(−π, −π/2)`` was not cut on the arc through ``(π, 3π/2)``
(:func:`_ray_in`); the same command on that code: 11 of 360 entries above the tolerance, up to 4.0e-3 (two blocks
of 20 refused). The two-level rule stays within 3.4e-4 on these covariances; on the entries of the tests' models
(800 of ResNet-18's first stage, script outside the repository) the three-level rule is within 6.4e-5.

Three or more non-Gaussian levels in a row (three identity blocks) are refused with an error, as are other
final nonlinearities than the ReLU family, and two levels with a smooth nonlinearity before the last sum;
pre-activation blocks (``x + conv(relu(bn(x)))``) never need this rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ntkit.kernel import Kernel, swap_pair
from ntkit.layers.base import LayerError

__all__ = ["ResidualLaw", "Gauss", "Apply", "Scale", "bvn_upper", "pair_expectations", "single_expectations"]

_TWO_PI = 2 * math.pi
_SQRT_2PI = math.sqrt(_TWO_PI)
_LOG_SQRT_2PI = math.log(_SQRT_2PI)
_SQRT_HALF = math.sqrt(0.5)
#: relative tolerance of the rule (see the module docstring)
TOL = 1e-3


# ---------------------------------------------------------------------------------------------------
# the program carried by a record
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Gauss:
    """``+ g``: a Gaussian summand independent of everything before it; ``rec`` is its covariance record."""

    rec: Kernel


@dataclasses.dataclass(frozen=True)
class Apply:
    """``φ(·)``: an elementwise layer (its ``fn`` is evaluated at the quadrature nodes)."""

    layer: Any


@dataclasses.dataclass(frozen=True)
class Scale:
    """``s·(·)``: a fixed scaling (BatchNorm in eval mode)."""

    s: float


@dataclasses.dataclass(frozen=True)
class ResidualLaw:
    """The program behind a non-Gaussian activation (module docstring): ``steps`` applied from 0, the first a
    :class:`Gauss`. ``Kernel.law`` holds one for a nonlinearity's output and for sums of it with independent
    Gaussian branches; any layer that does not keep it drops it (``ntkit.nets.tiler.apply_layer``)."""

    steps: tuple[Any, ...]

    @staticmethod
    def of_nonlinearity(k: Kernel, layer: Any) -> ResidualLaw:
        """The law of ``φ(z)`` for a Gaussian record ``k`` of ``z``."""
        return ResidualLaw((Gauss(_bare(k)), Apply(layer)))

    def plus_gauss(self, rec: Kernel) -> ResidualLaw:
        """The law of ``h + g`` for an independent Gaussian ``g`` (two Gaussian summands in a row merge)."""
        if isinstance(self.steps[-1], Gauss):
            return ResidualLaw(self.steps[:-1] + (Gauss(_add_records(self.steps[-1].rec, rec)),))
        return ResidualLaw(self.steps + (Gauss(_bare(rec)),))

    def scaled(self, s: float) -> ResidualLaw:
        """The law of ``s·h``; a scaling of a sum ``r + g`` is ``s·r + s·g`` (kept in that form)."""
        last = self.steps[-1]
        if isinstance(last, Gauss):
            return ResidualLaw(self.steps[:-1] + (Scale(s), Gauss(_scale_record(last.rec, s))))
        return ResidualLaw(self.steps + (Scale(s),))

    def applied(self, layer: Any) -> ResidualLaw:
        return ResidualLaw(self.steps + (Apply(layer),))

    @property
    def levels(self) -> int:
        return sum(isinstance(s, Gauss) for s in self.steps)


def _bare(k: Kernel) -> Kernel:
    """The Gaussian record of a summand: covariances and its NTK (the NTK rule needs each summand's own)."""
    return k.replace(law=None) if k.law is not None else k


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return None if a is None or b is None else a + b


def _add_records(a: Kernel, b: Kernel) -> Kernel:
    return a.replace(
        nngp=_add(a.nngp, b.nngp), cov1=_add(a.cov1, b.cov1), cov2=_add(a.cov2, b.cov2),
        var1=_add(a.var1, b.var1), var2=_add(a.var2, b.var2), ntk=_add(a.ntk, b.ntk),
    )  # fmt: skip


def _scale_record(a: Kernel, s: float) -> Kernel:
    def sc(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t * (s * s)

    return a.replace(nngp=sc(a.nngp), cov1=sc(a.cov1), cov2=sc(a.cov2), var1=sc(a.var1), var2=sc(a.var2), ntk=sc(a.ntk))


# ---------------------------------------------------------------------------------------------------
# the bivariate normal probability
# ---------------------------------------------------------------------------------------------------
@functools.cache
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on ``[0, 1]``."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) / 2, w / 2


@functools.cache
def _legendre_t(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    x, w = _legendre(n)
    return torch.as_tensor(x, dtype=dtype, device=device), torch.as_tensor(w, dtype=dtype, device=device)


def _phi(x: Tensor) -> Tensor:
    """The standard normal density, ``exp(−x²/2 − log √(2π))`` in two passes."""
    return torch.addcmul(x.new_full((), -_LOG_SQRT_2PI), x, x, value=-0.5).exp_()


def _Q(x: Tensor) -> Tensor:
    """Upper tail ``1 − Φ(x) = (1 − erf(x/√2))/2``, to absolute (not relative) accuracy in the tails — the same
    numbers as ``torch.special.ndtr(−x)``, which is this composite, in one pass fewer; every use here needs only
    absolute accuracy."""
    return torch.erf(x * -_SQRT_HALF).mul_(0.5).add_(0.5)


#: Gauss–Legendre nodes of both branches of ``Φ₂`` and the ``|ρ|`` where they meet (measured errors: bvn_upper)
_BVN_NODES = 6
#: the nodes of the ``Φ₂`` inside the residual-stream rule: within 5.5e-7 on the same grid (against 2.9e-9 with 6),
#: three orders below the rule's tolerance, for a third fewer exponentials per quadrature node
_RULE_BVN_NODES = 4
_BVN_SPLIT = 0.75


def bvn_upper(h: Tensor, k: Tensor, rho: Tensor) -> Tensor:
    """``P(X > h, Y > k)`` for standard normals with correlation ``rho`` (broadcast), to 1e-8 absolute.

    ``|ρ| < 0.75`` (Drezner & Wesolowsky 1990):
    ``Φ(−h)Φ(−k) + (1/2π)∫_0^{asin ρ} exp(−(h²+k²−2hk sin θ)/(2cos²θ)) dθ`` by 6-node Gauss–Legendre.
    ``ρ ≥ 0.75``: ``Φ(−max(h,k)) − (1/2π)∫_0^{a} e^{−b²/(2x²)} e^{−hk/(1+t)}/t dx`` with ``a = √(1−ρ²)``,
    ``b = |h−k|``, ``t = √(1−x²)`` (Plackett's ``∂P/∂ρ = φ₂`` integrated from ``ρ`` to 1), the factor
    ``e^{−hk/(1+t)}/t`` replaced by its expansion ``e^{−hk/2}(1 + c x² + c d x⁴)``, ``c = (4−hk)/8``,
    ``d = (12−hk)/16``, integrated exactly, and the remainder by 6-node Gauss–Legendre (Genz 2004, who uses 6–20
    nodes and the split 0.925 for double precision); ``ρ ≤ −0.75`` by ``P(h, k, ρ) = Φ(−h) − P(h, −k, −ρ)``.
    Exponents are combined before ``exp`` (no overflow for any h, k). Measured: within 5.7e-9 of mpmath at the
    points of ``test_bvn_against_mpmath`` (the worst at ``ρ = 0.75``), and within 2.9e-9 of the same formulas
    with 24 nodes on ``h, k ∈ [−8, 8]`` (step 0.5) × ``ρ ∈ (−1, 1)`` (step 0.01), where 5 nodes give 3.4e-8
    (``test_bvn_node_count_on_a_grid``, tests/layers/test_residual_law.py).
    """
    h, k, rho = torch.broadcast_tensors(h, k, rho)
    flat = (-1, 1)
    p = _bvn_rows(h.reshape(flat), k.reshape(flat), rho.reshape(-1), _Q(h).reshape(flat), _Q(k).reshape(flat))
    return p.reshape(h.shape)


def _bvn_rows(h: Tensor, k: Tensor, rho: Tensor, qh: Tensor, qk: Tensor, n: Optional[int] = None) -> Tensor:
    """:func:`bvn_upper` for ``(P, M)`` points ``h, k`` sharing one correlation per row, ``rho`` of shape ``(P,)``
    (the quadrature's angles then depend on the row only), with ``qh, qk = Φ(−h), Φ(−k)`` given; ``n`` nodes in
    both branches (default ``_BVN_NODES``)."""
    n = _BVN_NODES if n is None else n
    rho = rho.clamp(-1.0, 1.0)
    low = rho.abs() < _BVN_SPLIT
    if bool(low.all()):
        return _bvn_low(h, k, rho, qh, qk, n).clamp_(0.0, 1.0)
    out = torch.empty_like(h)
    if bool(low.any()):
        out[low] = _bvn_low(h[low], k[low], rho[low], qh[low], qk[low], n)
    hi = ~low
    hh, kk, rr = h[hi], k[hi], rho[hi]
    neg = (rr < 0)[:, None]
    p = _bvn_high(hh, torch.where(neg, -kk, kk), rr.abs(), n)
    out[hi] = torch.where(neg, (qh[hi] - p).clamp_min(0.0), p)
    return out.clamp_(0.0, 1.0)


def _bvn_low(h: Tensor, k: Tensor, rho: Tensor, qh: Tensor, qk: Tensor, n: int) -> Tensor:
    """``|ρ| < 0.75`` (see :func:`bvn_upper`): the exponent ``−(h²+k²)/(2cos²θ) + hk sin θ/cos²θ`` with its
    per-row coefficients (``cos²θ = 1 − sin²θ ≥ 0.43``: no cancellation), accumulated node by node (one
    ``(P, M)`` temporary: 4× faster than one ``(P, M, n)`` exponent and a batched product, measured at
    ``P, M = 300, 700`` with a script outside the repository)."""
    xs, ws = _legendre_t(n, h.dtype, h.device)
    top = torch.asin(rho)[:, None]  # (P, 1)
    sn = torch.sin(top * xs)  # (P, n)
    ic2 = (1 - sn * sn).reciprocal_()
    ca, cb = ic2 * -0.5, sn * ic2
    wt = (top * ws).mul_(1 / _TWO_PI)
    hs = torch.addcmul(h * h, k, k)
    hk = h * k
    out = qh * qk
    for j in range(n):
        e = torch.mul(hs, ca[:, j : j + 1]).addcmul_(hk, cb[:, j : j + 1]).exp_()
        out.addcmul_(e, wt[:, j : j + 1])
    return out


def _bvn_high(h: Tensor, k: Tensor, rho: Tensor, n: int) -> Tensor:
    """``ρ ≥ 0.75`` (see :func:`bvn_upper`) for ``(P, M)`` points and ``(P,)`` correlations."""
    tiny = torch.finfo(h.dtype).tiny
    a = torch.sqrt(((1 - rho) * (1 + rho)).clamp_min(0.0))[:, None]  # (P, 1)
    a_s = a.clamp_min(1e-100)  # a < 1e-100: every term below is 0 (or b/a_s -> ∞) as in the limit
    b = (h - k).abs()
    b2 = b * b
    hk = h * k
    c, d = (4 - hk) / 8, (12 - hk) / 16
    # analytic part e^{-hk/2}(I0 + c I2 + c d I4), I_n = ∫_0^a x^n e^{-b²/(2x²)} dx:
    # I0 = a E − b√(2π) Φ(−b/a), 3 I2 = a³E − b² I0, 5 I4 = a⁵E − b² I2 (E = e^{−b²/(2a²)}), with the factor
    # e^{-hk/2} folded into the exponents (e^{-hk/2} E ≤ 1 and e^{-hk/2} Φ(-b/a) ≤ 1: b² ≥ -4hk)
    eE = torch.exp(-hk / 2 - b2 / (2 * a_s * a_s))
    eP = torch.exp(-hk / 2 + torch.special.log_ndtr(-b / a_s))
    i0 = a * eE - b * _SQRT_2PI * eP
    i2 = (a**3 * eE - b2 * i0) / 3
    i4 = (a**5 * eE - b2 * i2) / 5
    analytic = i0 + c * i2 + c * d * i4
    # remainder by Gauss–Legendre on [0, a], its per-row coefficients first
    xs, ws = _legendre_t(n, h.dtype, h.device)
    x2 = (a * xs) ** 2  # (P, n)
    t = torch.sqrt((1 - x2).clamp_min(0.0))
    cx, ct, it = (0.5 / x2.clamp_min(tiny))[:, None], (1 / (1 + t))[:, None], (1 / t)[:, None]
    x2 = x2[:, None]
    bb = b2[..., None] * cx  # (P, M, n)
    hk_, c_, d_ = hk[..., None], c[..., None], d[..., None]
    rem = torch.exp(-bb - hk_ * ct) * it - torch.exp(-bb - hk_ / 2) * (1 + c_ * x2 * (1 + d_ * x2))
    remainder = a * (rem * ws).sum(-1)
    return (_Q(torch.maximum(h, k)) - (analytic + remainder) / _TWO_PI).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# the last Gaussian level in closed form (ReLU family)
# ---------------------------------------------------------------------------------------------------
_CLAMP = 50.0  # |standardised shifts| beyond this saturate Φ and φ exactly in float64


def _relu_pair(
    r1: Tensor, r2: Tensor, s1: Tensor, s2: Tensor, rho: Tensor, moments: bool = True
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
    """For ``(g, g')`` with standard deviations ``s1, s2``, correlation ``rho`` and shifts
    ``r1, r2``: ``(E[relu(g+r1) relu(g'+r2)], P(g+r1>0, g'+r2>0), E[relu(g+r1)], E[relu(g'+r2)], Φ(r1/s1),
    Φ(r2/s2))`` (the one-sided moments ``None`` unless ``moments``).

    With ``X = g/s1``, ``Y = g'/s2``, ``h = −r1/s1``, ``k = −r2/s2``, ``P = P(X>h, Y>k)``, ``s = √(1−ρ²)``,
    ``m_k = (k − ρh)/s``, ``m_h = (h − ρk)/s`` (Stein's lemma on the truncated moments)::

        E[X 1] = φ(h) Q(m_k) + ρ φ(k) Q(m_h),     E[Y 1] = φ(k) Q(m_h) + ρ φ(h) Q(m_k)
        E[XY 1] = ρ P + φ(h)(ρ h Q(m_k) + s φ(m_k)) + ρ k φ(k) Q(m_h)
        E[relu(g+r1) relu(g'+r2)] = s1 s2 E[(X−h)(Y−k) 1]
                                  = s1 s2 [(ρ + hk) P − k φ(h) Q(m_k) − h φ(k) Q(m_h) + s φ(h) φ(m_k)]

    (``Q = 1 − Φ``; the last line is the first three collected); at ``s = 0`` the same expressions with
    ``m = ±∞`` are the limits ``ρ = ±1``. Broadcast; cheapest when ``rho`` varies along leading dimensions only
    (one ``Φ₂`` angle set per row).
    """
    tiny = torch.finfo(r1.dtype).tiny
    h = torch.mul(r1, -1 / s1.clamp_min(tiny)).clamp_(-_CLAMP, _CLAMP)
    k = torch.mul(r2, -1 / s2.clamp_min(tiny)).clamp_(-_CLAMP, _CLAMP)
    h, k, _ = torch.broadcast_tensors(h, k, rho)
    shape = h.shape
    s = torch.sqrt(((1 - rho) * (1 + rho)).clamp_min(0.0)).clamp_min(tiny)
    c1, c2 = _Q(h), _Q(k)  # Φ(r1/s1), Φ(r2/s2)
    # Φ₂ row-wise: rows = the leading dimensions along which rho varies
    rr = rho.reshape((1,) * (len(shape) - rho.dim()) + tuple(rho.shape))
    lead = max((i + 1 for i, n in enumerate(rr.shape) if n != 1), default=0)
    rows = rr.expand(shape[:lead] + rr.shape[lead:]).reshape(-1)
    flat = (rows.numel(), -1)
    p = _bvn_rows(h.reshape(flat), k.reshape(flat), rows, c1.reshape(flat), c2.reshape(flat), _RULE_BVN_NODES)
    p = p.reshape(shape)
    i_s = 1 / s
    mk = torch.addcmul(k, h, rho, value=-1.0).mul_(i_s)
    mh = torch.addcmul(h, k, rho, value=-1.0).mul_(i_s)
    ph, pk = _phi(h), _phi(k)
    f = torch.addcmul(rho, h, k).mul_(p)
    f.addcmul_(k, ph * _Q(mk), value=-1.0).addcmul_(h, pk * _Q(mh), value=-1.0).addcmul_(ph * s, _phi(mk))
    f = f.mul_(s1 * s2).clamp_min_(0.0)
    if not moments:
        return f, p, None, None, c1, c2
    # one-sided moments: E[relu(g + r)] = s(αΦ(α) + φ(α)) = r Φ(α) + s φ(α), α = r/s = −h
    m1 = (r1 * c1).addcmul_(s1, ph).clamp_min_(0.0)
    m2 = (r2 * c2).addcmul_(s2, pk).clamp_min_(0.0)
    return f, p, m1, m2, c1, c2


# ---------------------------------------------------------------------------------------------------
# quadrature rules
# ---------------------------------------------------------------------------------------------------
@functools.cache
def _radial(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss rule for ``∫_0^∞ f(R) R e^{−R²/2} dR`` (total weight 1), by the discretised Stieltjes procedure
    on a 600-node Gauss–Legendre discretisation of ``[0, 14]`` (``e^{−98}`` beyond)."""
    return _gauss_from_measure(n, lambda r: r * np.exp(-r * r / 2))


@functools.cache
def _half(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss rule for ``∫_0^∞ f(R) √(2/π) e^{−R²/2} dR`` (the half-normal law, total weight 1)."""
    return _gauss_from_measure(n, lambda r: math.sqrt(2 / math.pi) * np.exp(-r * r / 2))


def _gauss_from_measure(n: int, weight: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x, w = _legendre(600)  # on [0, 1]
    x = x * 14.0
    w = w * 14.0 * weight(x)
    # Stieltjes: three-term recurrence of the orthonormal polynomials of the discrete measure (x, w)
    alpha, beta = np.zeros(n), np.zeros(n)
    p_prev, p = np.zeros_like(x), np.ones_like(x) / math.sqrt(w.sum())
    for j in range(n):
        alpha[j] = np.sum(w * x * p * p)
        q = (x - alpha[j]) * p - (beta[j] if j else 0.0) * p_prev
        if j + 1 < n:
            beta[j + 1] = math.sqrt(np.sum(w * q * q))
            p_prev, p = p, q / beta[j + 1]
    jac = np.diag(alpha) + np.diag(beta[1:], 1) + np.diag(beta[1:], -1)
    nodes, vecs = np.linalg.eigh(jac)
    weights = w.sum() * vecs[0] ** 2
    return nodes, weights / weights.sum()


def _apply_prefix(steps: tuple[Any, ...], z: Tensor) -> Tensor:
    """``r`` from the first level's value ``z`` through the Apply/Scale steps between the two Gaussians."""
    for st in steps:
        if isinstance(st, Apply):
            z = st.layer.fn(z)
        else:
            z = z * st.s
    return z


def _prefix_grad(steps: tuple[Any, ...], z: Tensor) -> Tensor:
    """``r'(z)`` of ``r = prefix(z)`` at the nodes: for a positively homogeneous prefix its slope on the side of
    ``z`` (``z = 0`` counts as negative: the constant arc's column of :func:`_pair_rules`), else by autograd."""
    slopes = _slopes(steps, z.dtype, z.device)
    if slopes is not None:
        return torch.where(z > 0, slopes[0], -slopes[1]).to(z.dtype)
    with torch.enable_grad():
        zz = z if z.requires_grad else z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_apply_prefix(steps, zz).sum(), zz, create_graph=z.requires_grad)
    return g


def _slopes(prefix: tuple[Any, ...], dtype: torch.dtype, device: torch.device) -> Optional[tuple[float, float]]:
    """``(r(1), r(−1))`` if ``r = prefix(z)`` is positively homogeneous (piecewise linear with its kink at 0:
    the ReLU family, scalings), else ``None``."""
    z = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5], dtype=dtype, device=device)
    r = _apply_prefix(prefix, z)
    lin = torch.allclose(r[2:4], 2 * r[:2], rtol=1e-12, atol=0.0) and torch.allclose(r[4:], r[:2] / 2, rtol=1e-12)
    return (float(r[0]), float(r[1])) if lin else None


def _ray_in(tt: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The angle of the ray ``tt`` (mod π; ``tt`` from ``atan2``, in ``(−π, π]``) inside the arc ``(lo, hi)`` of
    ``[−π/2, 3π/2)``, else ``hi`` (a zero-length piece). The representatives there are ``tt + kπ``, ``k = −1 … 2``:
    before 2026-12-02 ``k = 2`` was missing, so a line at ``tt ∈ (−π, −π/2)`` went uncut on the arc through
    ``(π, 3π/2)``."""
    cut = hi
    for shift in (-math.pi, 0.0, math.pi, 2 * math.pi):
        c = tt + shift
        cut = torch.where((c > lo) & (c < hi), c, cut)
    return cut


def _pieces(
    t0: Tensor,
    slopes: Optional[tuple[float, float]],
    u1: Tensor,
    u2: Tensor,
    sg: Tensor,
    rays: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor]:
    """Starts and lengths ``(E, pieces)`` of the pieces of ``[−π/2, 3π/2)``, arc by arc: the arcs cut at
    ``t0 − π/2``, ``π/2`` and ``t0 + π/2`` (where ``z ∝ cos t`` or ``z' ∝ cos(t − t0)`` changes sign), each arc
    cut again

    * where the last level's standardised shifts ``r/σ_g1``, ``r'/σ_g2`` are equal (``sg = 1``) or opposite
      (``sg = −1``: the sign of ``ρ_g``) — the ray where ``Φ₂`` has its kink as ``ρ_g → ±1`` (only for a
      positively homogeneous ``prefix``, whose ``r = u·R·cos t`` on each arc with ``u`` a slope;
      ``u1 = σ01/σg1``, ``u2 = σ02/σg2``);
    * at ``_LAYER / u`` from each end (``u`` of the side that vanishes there), or at the arc's midpoint if that
      is nearer: the boundary layer where ``|r| ≲ σ_g``, across which the last level's kink is smoothed
      (``|cos t| ≲ 1/(u R)``; without these cuts the angular rule converges only algebraically, 6.6e-4 with 3
      nodes per piece against 4.5e-5 with them on the ResNet-18 stage's entries, script outside the repository);
    * at the given ``rays`` (angles mod π, the same for every arc).

    Each arc has the same number of pieces (a cut outside the arc sits at its end: a zero-length piece)."""
    half = math.pi / 2
    zero = torch.zeros_like(t0)
    edges = [zero - half, t0 - half, zero + half, t0 + half, zero + 3 * half]
    tiny = torch.finfo(t0.dtype).tiny
    layer = [_LAYER / u1.clamp_min(tiny), _LAYER / u2.clamp_min(tiny)]  # at the z = 0 and z' = 0 edges
    signs = [(1, -1), (1, 1), (-1, 1), (-1, -1)]
    los, lns = [], []
    for j in range(4):
        lo, hi = edges[j], edges[j + 1]
        mid = (hi - lo) / 2
        cuts = [lo + torch.minimum(layer[j % 2], mid), hi - torch.minimum(layer[(j + 1) % 2], mid)]
        if slopes is not None:
            sp, sn = slopes
            a = u1 * (sp if signs[j][0] > 0 else -sn)  # r/σ_g1 = a R cos t on this arc
            b = u2 * (sp if signs[j][1] > 0 else -sn)
            # a cos t = σ·b cos(t − t0), σ = sign(ρ_g)  <=>  tan t = (a − σ b cos t0) / (σ b sin t0): one ray mod π
            cuts.append(_ray_in(torch.atan2(a - sg * b * torch.cos(t0), sg * b * torch.sin(t0)), lo, hi))
        cuts += [_ray_in(ray, lo, hi) for ray in rays]
        pts = torch.stack([lo] + cuts + [hi], -1).sort(-1).values
        los.append(pts[..., :-1])
        lns.append(pts[..., 1:] - pts[..., :-1])
    return torch.cat(los, -1), torch.cat(lns, -1)


def _angle_nodes(lo: Tensor, ln: Tensor, n: int) -> tuple[Tensor, Tensor]:
    xs, ws = _legendre_t(n, lo.dtype, lo.device)
    nodes = lo[..., None] + ln[..., None] * xs
    weights = (ln[..., None] * ws) / _TWO_PI
    return nodes.reshape(lo.shape[:-1] + (-1,)), weights.reshape(lo.shape[:-1] + (-1,))


def _corr(q12: Tensor, q11: Tensor, q22: Tensor) -> Tensor:
    tiny = torch.finfo(q12.dtype).tiny
    rho = (q12 / torch.sqrt(q11 * q22).clamp_min(tiny)).clamp(-1.0, 1.0)
    thr = 1 - 16 * torch.finfo(q12.dtype).eps
    return rho.masked_fill(rho >= thr, 1.0).masked_fill(rho <= -thr, -1.0)


def _pair_rules(
    lv0: tuple[Tensor, Tensor, Tensor],
    lvg: tuple[Tensor, Tensor, Tensor],
    prefix: tuple[Any, ...],
    ab: tuple[float, float],
    rules: tuple[tuple[int, int], ...],
    need_dot: bool,
    weight: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    forms: tuple[tuple[Tensor, Tensor], ...] = (),
) -> list[tuple[Tensor, Optional[tuple[Tensor, Tensor]]]]:
    """``(E[φ(h)φ(h')], (E[φ'(h)φ'(h') r'(z) r'(z')], E[φ'(h)φ'(h')]))`` (the path weights ``(P_0, P_1)`` of
    :func:`pair_expectations`; ``None`` unless ``need_dot``; ``r = prefix``) for flat ``(E,)`` covariances by
    each ``(n_ang, n_rad)`` rule of ``rules``: the nodes of all the rules are evaluated in one pass (their pieces
    are the same).

    ``weight(z, z')`` (``(E, nodes)`` in, out), if given, multiplies the integrand: ``E[w(z, z') φ(h)φ(h')]``;
    ``forms``: pairs ``(w1, w2)`` of ``(E,)`` coefficients whose lines ``w1 z + w2 z' = 0`` (where the weight
    changes fastest) are cut as extra rays."""
    a, b = ab
    c = b - a
    q12, q11, q22 = lv0
    g12, g11, g22 = lvg
    dtype, device = q12.dtype, q12.device
    s1, s2 = torch.sqrt(q11)[:, None], torch.sqrt(q22)[:, None]
    t0 = torch.arccos(_corr(q12, q11, q22))
    tiny = torch.finfo(dtype).tiny
    slopes = _slopes(prefix, dtype, device)
    gs1, gs2 = torch.sqrt(g11)[:, None], torch.sqrt(g22)[:, None]
    u1, u2 = s1[:, 0] / gs1[:, 0].clamp_min(tiny), s2[:, 0] / gs2[:, 0].clamp_min(tiny)
    rho_g = _corr(g12, g11, g22)[:, None]
    sgn = torch.where(rho_g[:, 0] < 0, -1.0, 1.0).to(dtype)
    # w1 z + w2 z' = 0 with z = s1 R cos t, z' = s2 R cos(t − t0): (α + β cos t0) cos t + β sin t0 sin t = 0
    rays = tuple(
        torch.atan2(-(w1 * s1[:, 0] + w2 * s2[:, 0] * torch.cos(t0)), w2 * s2[:, 0] * torch.sin(t0)) for w1, w2 in forms
    )
    lo, ln = _pieces(t0, slopes, u1, u2, sgn, rays)  # (E, pieces)
    const = slopes is not None and slopes[1] == 0.0 and weight is None
    if const:
        # r = r' = 0 on the arc where z, z' < 0 (the last of _pieces' four): its integrand is a constant, taken
        # exactly (weight (π − t0)/2π) instead of by quadrature, as a last column shared by every rule
        keep = lo.shape[-1] * 3 // 4
        lo, ln = lo[:, :keep], ln[:, :keep]
    z1s, z2s, ws = [], [], []
    for n_ang, n_rad in rules:
        ang, wa = _angle_nodes(lo, ln, n_ang)  # (E, A)
        rn, rw = _radial(n_rad)
        R = torch.as_tensor(rn, dtype=dtype, device=device)
        wr = torch.as_tensor(rw, dtype=dtype, device=device)
        z1s.append(((s1 * torch.cos(ang))[..., None] * R).flatten(1))  # (E, A·R)
        z2s.append(((s2 * torch.cos(ang - t0[:, None]))[..., None] * R).flatten(1))
        ws.append((wa[..., None] * wr).flatten(1))
    if const:
        z1s.append(torch.zeros_like(s1))
        z2s.append(torch.zeros_like(s1))
    z1, z2 = torch.cat(z1s, -1), torch.cat(z2s, -1)
    wz = None if weight is None else weight(z1, z2)
    r1, r2 = _apply_prefix(prefix, z1), _apply_prefix(prefix, z2)
    f, p, m1, m2, c1, c2 = _relu_pair(r1, r2, gs1, gs2, rho_g, moments=a != 0.0)
    # φ = a·x + c·relu(x): E[φφ'] = a²(q12 + r1 r2) + ac(E[h relu(h')] + E[relu(h) h']) + c² F,
    # E[(g + r1) relu(g' + r2)] = q12 Φ(r2/s2) + r1 E[relu(g' + r2)]  (Stein)
    G12 = g12[:, None]
    val = f.mul_(c * c) if c * c != 1.0 else f
    if a != 0.0:
        assert m1 is not None and m2 is not None
        val = val + a * a * (G12 + r1 * r2) + a * c * (G12 * (c1 + c2) + r1 * m2 + r2 * m1)
    dv = None
    if need_dot:
        dv = p.mul(c * c)
        if a != 0.0:
            dv = dv + a * a + a * c * (c1 + c2)
    if wz is not None:
        val = val * wz
        dv = None if dv is None else dv * wz
    dvd = None if dv is None else dv * (_prefix_grad(prefix, z1) * _prefix_grad(prefix, z2))
    out: list[tuple[Tensor, Optional[tuple[Tensor, Tensor]]]] = []
    off = 0
    w0 = (math.pi - t0) / _TWO_PI
    for w in ws:
        cols = slice(off, off + w.shape[-1])
        off += w.shape[-1]
        nngp = (val[:, cols] * w).sum(-1)
        if const:
            nngp = nngp + val[:, -1] * w0
        dots = None
        if dv is not None and dvd is not None:
            dot, dotd = (dv[:, cols] * w).sum(-1), (dvd[:, cols] * w).sum(-1)
            if const:
                dot, dotd = dot + dv[:, -1] * w0, dotd + dvd[:, -1] * w0
            dots = (dotd, dot)
        out.append((nngp, dots))
    return out


def _last_single(r: Tensor, sg: Tensor, ab: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """``(E[φ(g + r)], E[φ(g + r)²], E[φ'(g + r)²])`` for ``g ~ N(0, sg²)`` and shifts ``r`` (broadcast):
    ``φ = a·x + c·relu(x)`` and the one-sided moments of ``relu(g + r)`` in closed form."""
    a, b = ab
    c = b - a
    tiny = torch.finfo(r.dtype).tiny
    al = (r / sg.clamp_min(tiny)).clamp(-_CLAMP, _CLAMP)
    cdf, pdf = torch.special.ndtr(al), _phi(al)
    m1 = (r * cdf + sg * pdf).clamp_min(0.0)  # E[relu(g + r)]
    m2 = ((r * r + sg * sg) * cdf + r * sg * pdf).clamp_min(0.0)  # E[relu(g + r)²]
    mean = a * r + c * m1
    sq = a * a * (sg * sg + r * r) + (2 * a * c + c * c) * m2
    dsq = a * a + (2 * a * c + c * c) * cdf
    return mean, sq, dsq


def _single_rule(
    q0: Tensor, qg: Tensor, prefix: tuple[Any, ...], ab: tuple[float, float], n_rad: int
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``(E[φ(h)], E[φ(h)²], (E[φ'(h)² r'(z)²], E[φ'(h)²]))`` for flat ``(E,)`` variances: the first level on the
    two rays ``z ≷ 0`` by the half-normal Gauss rule, the last in closed form."""
    rn, rw = _half(n_rad)
    R = torch.as_tensor(rn, dtype=q0.dtype, device=q0.device)
    wr = torch.as_tensor(rw, dtype=q0.dtype, device=q0.device) / 2
    z = torch.sqrt(q0)[:, None] * torch.cat([R, -R])  # (E, 2R)
    w = torch.cat([wr, wr])
    mean, sq, dsq = _last_single(_apply_prefix(prefix, z), torch.sqrt(qg)[:, None], ab)
    d = _prefix_grad(prefix, z)
    return (mean * w).sum(-1), (sq * w).sum(-1), ((dsq * d * d * w).sum(-1), (dsq * w).sum(-1))


_WINDOW = 8.0  # standardised half-width of the middle level's window (e^{-32} ≈ 1e-14 of the mass beyond)


def _single_rule3(
    q0: Tensor,
    q1: Tensor,
    qg: Tensor,
    prefixes: tuple[tuple[Any, ...], ...],
    ab: tuple[float, float],
    n_out: int,
    n_in: int,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """:func:`_single_rule` for three levels, ``h2 = g2 + χ(g1 + ψ(z))``: ``z`` on its two rays by the
    half-normal Gauss rule (``n_out`` nodes each), and given ``z`` the middle level ``h1 = ψ(z) + σ1 x`` by
    Gauss–Legendre (``n_in`` nodes) on ``x ∈ [−8, x*]`` and ``[x*, 8]``, cut at the kink ``x* = −ψ(z)/σ1`` of
    ``χ`` (clamped to the window), with the density ``φ(x)`` in the integrand; the last level in closed form."""
    pre1, pre2 = prefixes
    rn, rw = _half(n_out)
    dtype, device = q0.dtype, q0.device
    R = torch.as_tensor(rn, dtype=dtype, device=device)
    wr = torch.as_tensor(rw, dtype=dtype, device=device) / 2
    z = torch.sqrt(q0)[:, None] * torch.cat([R, -R])  # (E, 2n_out)
    r1 = _apply_prefix(pre1, z)
    d0 = _prefix_grad(pre1, z)[..., None]
    wz = torch.cat([wr, wr])
    s1 = torch.sqrt(q1)[:, None, None]
    xs, ws = _legendre_t(n_in, dtype, device)
    cut = (-r1 / s1[..., 0].clamp_min(torch.finfo(dtype).tiny)).clamp(-_WINDOW, _WINDOW)[..., None]
    lo = torch.cat([torch.full_like(cut, -_WINDOW), cut], -1)  # (E, 2n_out, 2)
    ln = torch.cat([cut + _WINDOW, _WINDOW - cut], -1)
    x = (lo[..., None] + ln[..., None] * xs).flatten(-2)  # (E, 2n_out, 2n_in)
    wx = (ln[..., None] * ws).flatten(-2) * _phi(x)
    h1 = r1[..., None] + s1 * x
    mean, sq, dsq = _last_single(_apply_prefix(pre2, h1), torch.sqrt(qg)[:, None, None], ab)
    d1 = _prefix_grad(pre2, h1)
    w = wz[:, None] * wx

    def E(t: Tensor) -> Tensor:
        return (t * w).sum((-2, -1))

    dd = dsq * d1 * d1
    return E(mean), E(sq), (E(dd * d0 * d0), E(dd), E(dsq))


def _pair_rules3(
    levels: tuple[tuple[Tensor, Tensor, Tensor], ...],
    prefixes: tuple[tuple[Any, ...], ...],
    ab: tuple[float, float],
    rules: tuple[tuple[int, int], ...],
    need_dot: bool,
) -> list[tuple[Tensor, Optional[tuple[Tensor, ...]]]]:
    """:func:`_pair_rules` for three levels, ``h2 = g2 + χ(h1)``, ``h1 = g1 + ψ(z)`` (``ψ`` positively
    homogeneous), the dots ``(E[φ'φ' χ'χ' ψ'ψ'], E[φ'φ' χ'χ'], E[φ'φ'])`` (:func:`pair_expectations`): the sum
    over the four sign patterns ``Q`` of ``(z, z')`` of

        ``E[F(χ(h1), χ(h1')) 1{z ∈ Q}] = E_{h ~ N(0, C_Q)}[F(χ(h), χ(h')) π_Q(h)]``

    (the tower property): on ``Q``, ``ψ(z) = A_Q z`` with ``A_Q = diag`` of ``ψ``'s slopes, so ``(z, h1)`` is
    jointly Gaussian there with ``C_Q = Σ_1 + A_Q Σ_0 A_Q``; ``π_Q(h) = P(z ∈ Q | h1 = h)``, a bivariate
    normal probability of the conditional law ``N(M h, V)``, ``M = Σ_0 A_Q C_Q⁻¹``, ``V = Σ_0 − M A_Q Σ_0``. Each
    term is the two-level rule with ``C_Q`` as its first level and ``π_Q`` as a weight, its lines ``(M h)_i = 0``
    (where ``π_Q`` steps, over a width ``√V_ii``) cut as extra rays; for ``A_Q = 0`` (ReLU's ``z, z' < 0``) the
    weight is the constant ``P(z ∈ Q)``."""
    (q12, q11, q22), (g12, g11, g22), last = levels
    pre1, pre2 = prefixes
    dtype, device = q12.dtype, q12.device
    slopes = _slopes(pre1, dtype, device)
    assert slopes is not None, "checked by _check_program"
    tiny = torch.finfo(dtype).tiny
    rho0 = _corr(q12, q11, q22)
    total: Optional[list[tuple[Tensor, Optional[tuple[Tensor, ...]]]]] = None
    for sg1, sg2 in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        a1 = slopes[0] if sg1 > 0 else -slopes[1]
        a2 = slopes[0] if sg2 > 0 else -slopes[1]
        c11, c22, c12 = g11 + a1 * a1 * q11, g22 + a2 * a2 * q22, g12 + a1 * a2 * q12
        if a1 == 0.0 and a2 == 0.0:
            zero = torch.zeros_like(q12)
            pq = bvn_upper(zero, zero, sg1 * sg2 * rho0)  # P(z ∈ Q)
            res = _pair_rules((c12, c11, c22), last, pre2, ab, rules, need_dot)
            res = [(v * pq, None if d is None else (d[0] * pq, d[1] * pq)) for v, d in res]
        else:
            # C⁻¹ with a relative ridge of 64 eps (C singular only where Σ0 A v = 0 for its null vector v, so M
            # has a limit there)
            e11, e22 = c11 * (1 + 64 * torch.finfo(dtype).eps), c22 * (1 + 64 * torch.finfo(dtype).eps)
            det = (e11 * e22 - c12 * c12).clamp_min(tiny)
            i11, i22, i12 = e22 / det, e11 / det, -c12 / det
            # M = Σ0 A C⁻¹ (Σ0 A = [[a1 q11, a2 q12], [a1 q12, a2 q22]])
            m11 = a1 * q11 * i11 + a2 * q12 * i12
            m12 = a1 * q11 * i12 + a2 * q12 * i22
            m21 = a1 * q12 * i11 + a2 * q22 * i12
            m22 = a1 * q12 * i12 + a2 * q22 * i22
            # V = Σ0 − M A Σ0 (A Σ0 = [[a1 q11, a1 q12], [a2 q12, a2 q22]])
            v11 = (q11 - (m11 * a1 * q11 + m12 * a2 * q12)).clamp_min(0.0)
            v22 = (q22 - (m21 * a1 * q12 + m22 * a2 * q22)).clamp_min(0.0)
            v12 = q12 - (m11 * a1 * q12 + m12 * a2 * q22)
            sd1, sd2 = torch.sqrt(v11), torch.sqrt(v22)
            rv = (sg1 * sg2 * v12 / (sd1 * sd2).clamp_min(tiny)).clamp(-1.0, 1.0)
            isd1, isd2 = -sg1 / sd1.clamp_min(tiny), -sg2 / sd2.clamp_min(tiny)
            cm = [t[:, None] for t in (m11 * isd1, m12 * isd1, m21 * isd2, m22 * isd2)]

            def weight(h1: Tensor, h2: Tensor, cm=cm, rv=rv) -> Tensor:
                # π_Q = P(s1 z > 0, s2 z' > 0 | h) = P(X > −s1 m1/sd1, Y > −s2 m2/sd2), corr s1 s2 ρ_V
                hh = torch.mul(h1, cm[0]).addcmul_(h2, cm[1]).clamp_(-_CLAMP, _CLAMP)
                kk = torch.mul(h1, cm[2]).addcmul_(h2, cm[3]).clamp_(-_CLAMP, _CLAMP)
                return _bvn_rows(hh, kk, rv, _Q(hh), _Q(kk), _RULE_BVN_NODES)

            # the lines where π_Q steps, (M h)_i = 0, and (as |ρ_V| -> 1, where Φ₂ has a kink along it) the line
            # where its two standardised arguments are equal (ρ_V > 0) or opposite; one line if A has rank one
            # (M has then rank one: all of these are the same line)
            forms: tuple[tuple[Tensor, Tensor], ...]
            if a1 != 0.0 and a2 != 0.0:
                sv = torch.where(rv < 0, -1.0, 1.0).to(dtype)
                u1, u2 = sg1 / sd1.clamp_min(tiny), sg2 * sv / sd2.clamp_min(tiny)
                forms = ((m11, m12), (m21, m22), (u1 * m11 - u2 * m21, u1 * m12 - u2 * m22))
            else:
                forms = ((m11, m12),) if a1 else ((m21, m22),)
            res = _pair_rules((c12, c11, c22), last, pre2, ab, rules, need_dot, weight, forms)
        # the NTK's path weights (pair_expectations): the two-level rule's (P_0, P_1) are this program's (P_1,
        # P_2), and on Q, ψ'(z) ψ'(z') = a1 a2 gives P_0
        terms: list[tuple[Tensor, Optional[tuple[Tensor, ...]]]] = [
            (v, None if d is None else (a1 * a2 * d[0], d[0], d[1])) for v, d in res
        ]
        if total is None:
            total = terms
        else:
            total = [
                (tv + v, None if td is None or d is None else tuple(x + y for x, y in zip(td, d)))
                for (tv, td), (v, d) in zip(total, terms)
            ]
    assert total is not None
    return total


# ---------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------
_CHUNK = 1 << 20  # (entries × nodes) evaluated at once
#: the boundary-layer cuts of the angular pieces sit at ``_LAYER·σ_g/σ_0`` from the arcs' ends (:func:`_pieces`)
_LAYER = 2.0
#: (fine, coarse) rules (nodes per angular piece, radial nodes); the second pair is the refinement
_RULES = (((4, 8), (3, 6)), ((8, 12), (4, 8)), ((16, 24), (8, 12)))
#: the ladder when only the NNGP is asked for: its integrand converges faster in the radius than the NTK's path
#: weights (whose Φ₂ factor decays like a narrower Gaussian in R on arcs where one side is negative)
_RULES_NNGP = (((4, 4), (3, 3)), ((8, 12), (4, 4)), ((16, 24), (8, 12)))
#: most Gaussian levels of a program the rule takes (two non-Gaussian levels in a row)
MAX_LEVELS = 3

Levels = tuple[tuple[Tensor, Tensor, Tensor], ...]
Prefixes = tuple[tuple[Any, ...], ...]


def _split_law(law: ResidualLaw) -> tuple[list[Kernel], Prefixes]:
    """The Gaussian levels' records and the Apply/Scale steps between consecutive ones."""
    steps = law.steps
    if not isinstance(steps[-1], Gauss) or law.levels < 2 or not isinstance(steps[0], Gauss):
        raise LayerError(_NOT_A_SUM)
    if law.levels > MAX_LEVELS:
        raise LayerError(_TOO_DEEP)
    recs: list[Kernel] = []
    prefixes: list[tuple[Any, ...]] = []
    between: list[Any] = []
    for st in steps:
        if isinstance(st, Gauss):
            if recs:
                prefixes.append(tuple(between))
            recs.append(st.rec)
            between = []
        else:
            between.append(st)
    return recs, tuple(prefixes)


def _check_program(prefixes: Prefixes, dtype: torch.dtype, device: torch.device) -> None:
    if len(prefixes) > 1 and any(_slopes(p, dtype, device) is None for p in prefixes):
        raise LayerError(
            "the residual stream carries two non-Gaussian levels (two post-activation blocks in a row) with a "
            "nonlinearity outside the ReLU family (ReLU, LeakyReLU, Abs) before the last sum; ntkit's rule for "
            "two levels needs piecewise-linear nonlinearities there. Use ReLU, or pre-activation blocks "
            "(x + conv(φ(bn(x)))), whose kernel is in closed form."
        )


_NOT_A_SUM = (
    "a nonlinearity is applied to the output of another nonlinearity (φ(ψ(h)) of a residual sum h); ntkit's "
    "residual-stream rule takes a nonlinearity of a sum (Gaussian branch + nonlinearity output). Put a Dense or "
    "Conv layer in between."
)
_TOO_DEEP = (
    "the residual stream carries more than two non-Gaussian levels (identity skip connections of three or more "
    "post-activation blocks in a row, relu(g3 + relu(g2 + relu(g1 + relu(z))))): its kernel needs nested "
    "expectations of dimension 2·levels, which ntkit does not have beyond two. Give every third block of a "
    "stage a downsample (a 1×1 Conv on the skip), or use pre-activation blocks (x + conv(relu(bn(x)))), whose "
    "kernel is in closed form."
)


def _levels(flat: list[Tensor]) -> Levels:
    """``(q12, q11, q22)`` per level from a flat list of three tensors per level."""
    return tuple((flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3))


def _rules_fn(
    levels: Levels, prefixes: Prefixes, ab: tuple[float, float], rules: tuple[tuple[int, int], ...], need_dot: bool
) -> list[tuple[Tensor, Optional[tuple[Tensor, ...]]]]:
    """``(E[φ(h)φ(h')], path weights)`` by each rule of ``rules``, for two or three levels."""
    if len(levels) == 2:
        return list(_pair_rules(levels[0], levels[1], prefixes[0], ab, rules, need_dot))
    return _pair_rules3(levels, prefixes, ab, rules, need_dot)


def _single_any(
    variances: list[Tensor], prefixes: Prefixes, ab: tuple[float, float], fine: bool
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``(E[φ(h)], E[φ(h)²], (P_0, …, P_{L−1}))`` at one point, flat per-level variances: exact to ~1e-14
    (``fine``) or ~1e-4 (the error scale)."""
    if len(variances) == 2:
        return _single_rule(variances[0], variances[1], prefixes[0], ab, 40 if fine else 12)
    n_out, n_in = (40, 48) if fine else (12, 12)
    return _single_rule3(variances[0], variances[1], variances[2], prefixes, ab, n_out, n_in)


def pair_expectations(
    levels: Levels,
    prefixes: Prefixes,
    ab: tuple[float, float],
    need_dot: bool,
    tol: float = TOL,
) -> tuple[Tensor, Optional[tuple[Tensor, ...]]]:
    """``E[φ(h)φ(h')]`` and (``need_dot``) the NTK's path weights ``(P_0, …, P_{L−1})`` for the program of
    ``L = len(levels)`` Gaussian levels (2 or 3) at broadcast covariances ``levels[l] = (q12, q11, q22)`` of its
    ``l``-th Gaussian ``g_l`` (``g_0 = z``), with the elementwise steps ``r_{l+1} = prefixes[l](h_l)`` between
    levels, ``h_0 = z``, ``h_l = g_l + r_l``; ``φ = ABRelu(*ab)`` of ``h = h_{L−1}``.

    ``P_l = E[φ'(h)φ'(h') Π_{l ≤ m < L−1} r_{m+1}'(h_m) r_{m+1}'(h_m')]``: a neuron's gradient inner product is
    ``Θ_{h_l} = Θ_{g_l} + r_l'(h_{l−1}) r_l'(h_{l−1}') Θ_{h_{l−1}}`` *with that neuron's own derivatives* (the
    skip connection), so ``Θ' = E[φ'φ' Θ_h] = Σ_l P_l Θ_{g_l}`` — not ``E[φ'φ']`` times the mean ``Θ_h``, which
    drops the correlation of ``φ'(h)`` with the derivatives inside ``h``.
    Error control: the module docstring. Each refinement level runs on the entries the previous one left
    above the tolerance, in chunks of about ``_CHUNK`` (entries × nodes of both its rules)."""
    tensors = torch.broadcast_tensors(*(t for lv in levels for t in lv))
    _check_program(prefixes, tensors[0].dtype, tensors[0].device)
    shape = tensors[0].shape
    flat = [t.reshape(-1) for t in tensors]
    nl = len(levels)
    n = flat[0].numel()
    out = torch.empty(n, dtype=flat[0].dtype, device=flat[0].device)
    dots = [torch.empty_like(out) for _ in range(nl)] if need_dot else None
    # the same point on both sides (same sample and pixel, ρ = 1 at every level): the exact 1-D rule
    same = torch.ones_like(out, dtype=torch.bool)
    for q12, q11, q22 in _levels(flat):
        same &= (q11 == q22) & (q12 == q11)
    if bool(same.any()):
        _, sq, dsq = _single_any([q11[same] for _, q11, _ in _levels(flat)], prefixes, ab, True)
        out[same] = sq
        if dots is not None:
            for t, ds in zip(dots, dsq):
                t[same] = ds

    def result() -> tuple[Tensor, Optional[tuple[Tensor, ...]]]:
        return out.reshape(shape), (None if dots is None else tuple(t.reshape(shape) for t in dots))

    idx = (~same).nonzero().flatten()
    if idx.numel() == 0:
        return result()
    scale = torch.empty_like(out)
    scale[idx] = _pair_scale(_levels([t[idx] for t in flat]), prefixes, ab)
    dot_unit = max(1.0, abs(ab[0]) + abs(ab[1])) ** 2
    terms = 1 if nl == 2 else 8  # three levels: four terms, three with a Φ₂ weight; ~8× the temporaries per entry
    ladder = _RULES if need_dot else _RULES_NNGP
    for i, (fine, coarse) in enumerate(ladder):
        chunk = max(1, _CHUNK // (terms * 16 * (fine[0] * fine[1] + coarse[0] * coarse[1]) + 1))
        bad_parts, err_parts = [], []
        for s0 in range(0, idx.numel(), chunk):
            part = idx[s0 : s0 + chunk]
            lvs = _levels([t[part] for t in flat])
            (v, d), (vc, dc) = _rules_fn(lvs, prefixes, ab, (fine, coarse), need_dot)
            out[part] = v
            err = (v - vc).abs_().div_(scale[part])
            if dots is not None:
                assert d is not None and dc is not None
                for t, dl, dcl in zip(dots, d, dc):
                    t[part] = dl
                    err = torch.maximum(err, (dl - dcl).abs_().div_(dot_unit))
            bad = err > tol
            bad_parts.append(part[bad])
            err_parts.append(err[bad])
        idx = torch.cat(bad_parts)
        if idx.numel() == 0:
            break
        if i == len(ladder) - 1:
            raise LayerError(
                f"the residual-stream rule did not reach its tolerance {tol:g} (estimated error "
                f"{float(torch.cat(err_parts).max()):.3g} at {idx.numel()} entries): covariances outside its "
                f"range (a Gaussian branch tiny against the skip connection?). Report this with the model."
            )
    return result()


def _pair_scale(levels: Levels, prefixes: Prefixes, ab: tuple[float, float]) -> Tensor:
    """``√(E[φ(h)²] E[φ(h')²])`` (the errors are relative to it), floored at the dtype's tiny: the 1-D rule once per
    distinct point (the variances of one sample and pixel recur in every entry of its row; a kernel of ``N·P``
    points has ``N·P`` of them against ``(N·P)²/2`` entries). Not recorded by autograd (it only scales the error
    estimate)."""
    with torch.no_grad():
        sides = torch.stack([torch.stack([lv[i] for lv in levels], -1) for i in (1, 2)])  # (2, E, L)
        points, which = torch.unique(sides.reshape(-1, sides.shape[-1]), dim=0, return_inverse=True)
        sq = _single_any(list(points.unbind(-1)), prefixes, ab, False)[1][which].reshape(2, -1)
        return torch.sqrt(sq[0] * sq[1]).clamp_min(torch.finfo(sq.dtype).tiny)


def single_expectations(
    variances: tuple[Tensor, ...], prefixes: Prefixes, ab: tuple[float, float]
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``(E[φ(h)], E[φ(h)²], (P_0, …, P_{L−1}))`` (the path weights of :func:`pair_expectations` at one point)
    at broadcast per-level variances: for two levels a 1-D rule (40
    half-normal nodes per ray; a smooth integrand on each ray, exact to ~1e-14), for three
    :func:`_single_rule3` with 40 nodes per ray and 48 per piece of the middle level."""
    vs = torch.broadcast_tensors(*variances)
    shape = vs[0].shape
    _check_program(prefixes, vs[0].dtype, vs[0].device)
    m, sq, dsq = _single_any([v.reshape(-1) for v in vs], prefixes, ab, True)
    return m.reshape(shape), sq.reshape(shape), tuple(d.reshape(shape) for d in dsq)


def _symmetric_pairs(
    levels: Levels,
    prefixes: Prefixes,
    ab: tuple[float, float],
    need_dot: bool,
    k: Kernel,
) -> tuple[Tensor, Optional[tuple[Tensor, ...]]]:
    """For ``x2 = x1``: the rule on the batch pairs ``i ≤ j`` only, the others by symmetry (``K[j, i]`` is
    ``K[i, j]`` with its pixel pairs swapped); in a diagonal block ``K[i, i]`` (full spatial layout) the entry of
    pixels ``(p, p')`` is that of ``(p', p)``, so there only ``p ≤ p'`` is computed (the blocks exactly
    symmetric)."""
    full = torch.broadcast_tensors(*(t for lv in levels for t in lv))
    n = full[0].shape[0]
    iu, ju = torch.triu_indices(n, n, device=full[0].device)
    picked = [t[iu, ju] for t in full]
    if k.diagonal_spatial or not k.spatial_ndim:
        v, d = pair_expectations(_levels(picked), prefixes, ab, need_dot)
    else:
        v, d = _pixel_symmetric_pairs(picked, iu == ju, k.spatial_ndim, prefixes, ab, need_dot)
    pix = [0]
    if not k.diagonal_spatial and k.spatial_ndim:
        for a in range(k.spatial_ndim):
            pix += [2 + 2 * a, 1 + 2 * a]
    else:
        pix += list(range(1, v.dim()))

    def place(t: Tensor) -> Tensor:
        out = t.new_empty(full[0].shape)
        out[ju, iu] = t.permute(pix)
        out[iu, ju] = t
        return (out + swap_pair(out, k)) / 2  # exact: (x + x)/2 = x (the diagonal blocks are symmetric already)

    return place(v), (None if d is None else tuple(place(t) for t in d))


def _pixel_symmetric_pairs(
    picked: list[Tensor], diag: Tensor, nsp: int, prefixes: Prefixes, ab: tuple[float, float], need_dot: bool
) -> tuple[Tensor, Optional[tuple[Tensor, ...]]]:
    """:func:`pair_expectations` on ``(B, s1, s1', s2, s2', …)`` covariances of batch pairs (three per level), of
    which those with ``diag`` pair a sample with itself: there only the pixel pairs ``p ≤ p'`` (flat pixel
    order), mirrored."""
    shape = picked[0].shape
    to_pp = [0] + [1 + 2 * a for a in range(nsp)] + [2 + 2 * a for a in range(nsp)]  # (B, s…, s'…)
    sp = [shape[1 + 2 * a] for a in range(nsp)]
    npix = math.prod(sp)
    ti, tj = torch.triu_indices(npix, npix, device=picked[0].device)
    off = ~diag

    def entries(t: Tensor) -> Tensor:
        t = t.permute(to_pp).reshape(-1, npix, npix)
        return torch.cat([t[off].reshape(-1), t[diag][:, ti, tj].reshape(-1)])

    vals = pair_expectations(_levels([entries(t) for t in picked]), prefixes, ab, need_dot)
    n_off = int(off.sum()) * npix * npix

    def back(e: Tensor) -> Tensor:
        out = e.new_empty(shape[0], npix, npix)
        out[off] = e[:n_off].reshape(-1, npix, npix)
        blocks = e.new_empty(int(diag.sum()), npix, npix)
        blocks[:, ti, tj] = e[n_off:].reshape(len(blocks), -1)
        blocks[:, tj, ti] = e[n_off:].reshape(len(blocks), -1)
        out[diag] = blocks
        return out.reshape([shape[0], *sp, *sp]).permute(torch.argsort(torch.tensor(to_pp)).tolist())

    return back(vals[0]), (None if vals[1] is None else tuple(back(t) for t in vals[1]))


def law_kernel(layer: Any, k: Kernel, ab: Optional[tuple[float, float]]) -> Kernel:
    """The rule of an elementwise ``layer`` on a record ``k`` whose activations follow ``k.law`` (module
    docstring): ``nngp``, ``ntk``, ``cov1``/``cov2`` (or pair-only), means and the output's law."""
    law = k.law
    assert isinstance(law, ResidualLaw)
    name = type(layer).__name__
    if ab is None:
        raise LayerError(
            f"{name} is applied to a residual sum of a nonlinearity's output and a Gaussian branch (a "
            f"post-activation residual block); ntkit's rule for such sums covers the ReLU family (ReLU, "
            f"LeakyReLU, Abs: ABRelu) only so far. Use ReLU there, or pre-activation blocks (x + conv(φ(bn(x)))), "
            f"whose kernel is in closed form."
        )
    if k.mask1 is not None or k.mask2 is not None:
        raise LayerError(f"{name}: masked inputs (mask_constant) are not supported by the residual-stream rule.")
    try:
        recs, prefixes = _split_law(law)
        _check_program(prefixes, k.dtype, k.device)
    except LayerError as e:
        raise LayerError(f"{name}: {e}") from None
    if k.nngp is None or any(r.nngp is None or r.nngp.shape != k.nngp.shape for r in recs):
        raise LayerError(f"{name}: the residual-stream record does not match its activations (internal error).")
    need_dot = k.ntk is not None
    levels = tuple((r.nngp, *r.variances()) for r in recs)
    if k.x1_is_x2:
        nngp, dot = _symmetric_pairs(levels, prefixes, ab, need_dot, k)  # type: ignore[arg-type]
    else:
        nngp, dot = pair_expectations(levels, prefixes, ab, need_dot)  # type: ignore[arg-type]

    def self_cov(which: int) -> Optional[Tensor]:
        covs = [r.cov1 if which == 1 else r.cov2 for r in recs]
        if any(c is None for c in covs):
            return None
        if k.diagonal_spatial or k.spatial_ndim == 0:
            return single_expectations(tuple(covs), prefixes, ab)[1]  # type: ignore[arg-type]
        lvs = tuple((c, *r.self_variances(which)) for c, r in zip(covs, recs))
        return pair_expectations(lvs, prefixes, ab, False)[0]  # type: ignore[arg-type]

    cov1: Optional[Tensor]
    cov2: Optional[Tensor]
    if k.x1_is_x2 and k.cov1 is not None and not (k.diagonal_spatial or k.spatial_ndim == 0):
        # x2 = x1: the self-covariances are the batch diagonal of nngp (the same expectations)
        cov1, cov2 = torch.diagonal(nngp, 0, 0, 1).movedim(-1, 0).clone(), None
    else:
        cov1, cov2 = self_cov(1), self_cov(2)
    d1s, d2s = zip(*(r.same_pixel_variances() for r in recs))
    mean1 = single_expectations(tuple(d1s), prefixes, ab)[0]
    mean2 = None
    if all(d is not None for d in d2s):
        mean2 = single_expectations(tuple(d2s), prefixes, ab)[0]
    ntk = None
    if need_dot:
        assert dot is not None
        if any(r.ntk is None for r in recs):
            raise LayerError(f"{name}: the residual-stream record lacks a summand's NTK (internal error).")
        # Θ' = Σ_l P_l Θ_{g_l} (pair_expectations)
        ntk = torch.zeros_like(dot[0])
        for p, r in zip(dot, recs):
            assert r.ntk is not None
            ntk = ntk + p * r.ntk
    out = k.replace(
        nngp=nngp,
        ntk=ntk,
        cov1=cov1,
        cov2=cov2,
        is_gaussian=False,
        is_input=False,
        mean1=mean1,
        mean2=mean2,
        mean_kind="exact",
        law=law.applied(layer),
    )
    return out.with_exact_diagonal(inplace=True)
