"""Max pooling: ``MaxPool``, the infinite-width kernel of ``torch.nn.MaxPool{1,2,3}d`` (NT issue #27).

Rule. At infinite width the channels of a Gaussian layer are i.i.d. copies of a centred Gaussian field, so
one channel's window at output pixel ``p`` of ``x1`` (``u``, ``w`` values) and its window at ``q`` of ``x2``
(``v``) are jointly Gaussian, ``(u, v) ~ N(0, Σ)`` with the ``2w × 2w`` covariance read from the full
pixel-pixel covariances (``cov1`` on the ``u`` block, ``nngp`` across, ``cov2`` on the ``v`` block)::

    K'(p, q) = E[φ(max_i u_i) · φ(max_j v_j)]
    Θ'(p, q) = Σ_{i,j} E[φ'(max u) 1{argmax u = i} · φ'(max v) 1{argmax v = j}] · Θ(p_i, q_j)

``φ`` is the optional fused ``activation`` (identity by default), a monotone non-decreasing elementwise layer
applied before the max: ``max_i φ(u_i) = φ(max_i u_i)``, so ``Conv → ReLU → MaxPool`` and ``Conv → MaxPool →
ReLU`` are both ``MaxPool(..., activation=Relu())`` on the Gaussian convolution output. The max is piecewise
linear and its gradient picks the argmax, which gives the NTK (as for any parameter-free layer, ``Θ'`` is
``Θ`` pulled back through the layer's Jacobian; Jacot et al. 2018, Arora et al. 2019).

Numerics. Windows of one value use the activation's own rule; windows of two values without activation have a
closed form: ``max(a, b) = (a + b)/2 + |a − b|/2``, so with ``s = u1 + u2``, ``d = u1 − u2`` (``s', d'`` of ``v``)
``K' = E[s s']/4 + E[|d||d'|]/4`` and ``Θ' = ΣΘ/4 + (Θ11 − Θ12 − Θ21 + Θ22)·E[sign d sign d']/4`` (the
absolute-value arc-cosine kernel and its derivative ``(2/π) arcsin ρ``, Cho & Saul 2009; on the diagonal it is
Clark 1961's ``E[max(u1, u2)²] = (σ1² + σ2²)/2``). Every other case — windows of 3 or more values, or of 2 with
an activation or padding — has no closed form and is estimated by randomized quasi-Monte Carlo (Owen 1997;
L'Ecuyer & Lemieux 2002): ``R = 8`` independently scrambled Sobol sequences (``torch.quasirandom.SobolEngine``,
seeds ``seed .. seed + 7``), mapped to normals by ``torch.special.ndtri`` and coloured by
``L = V·diag(√max(λ, 0))`` from the batched eigendecomposition ``Σ = V diag(λ) Vᵀ`` (exact for the singular
``x1 = x2``, ``p = q`` covariances; padded entries are set to −∞). Each scramble gives an unbiased estimate; their
mean is the result and their spread the standard error ``se = std_R / √R``. Every entry starts with ``n0 = 64``
points per scramble and doubles its points (a Sobol sequence extends: earlier points are kept) until::

    se ≤ atol + rtol · s,    s = √(E[φ(max u)²] · E[φ(max v)²])            (NNGP; Cauchy–Schwarz: |K'| ≤ s)
                             s = max_ij |Θ(p_i, q_j)| · √(E[φ'(max u)²] · E[φ'(max v)²])      (NTK: |Θ'| ≤ s)

Error bound (``rtol = 5e-3``, ``atol = 0`` by default): the estimated standard error of every entry is at most
``atol + rtol · s``; the error itself is then below ``4 · (atol + rtol · s)`` except with a probability of about
1 % per entry (Student's t with ``R − 1 = 7`` degrees of freedom), and on average below ``atol + rtol · s``.
tests/layers/test_maxpool.py checks both against the 2-value closed form (with the closed form switched off)
and against an independent estimate with an 8× tighter tolerance. An entry that has not converged at
``max_samples`` points per scramble raises :class:`LayerError` (never a silently worse number). The samples are
computed in float32 unless ``rtol < 1e-5`` (its round-off is far below the estimate's error; sums in float64);
for the identity and ReLU-type activations (positively homogeneous) each entry runs on ``Σ/c`` (``c`` a power of 2
near its largest variance) and ``Θ/max|Θ|`` and is scaled back, so any scale from 1e-300 to 1e300 works; other
activations keep the input's dtype when a variance leaves ``[1e-30, 1e30]``. The tolerance is in the entry's own
units (``atol`` absolute), and the result is deterministic: the same inputs give the same kernel on every
call. Self-covariances (``cov1``) are computed on pixel pairs ``p ≤ p'`` and the ``x2 = None`` kernel on sample
pairs ``i < j``, then mirrored, so that both are exactly symmetric.

Cost: ``O(entries · R · n · w²)`` with ``entries = N1 · N2 · P_out²`` (plus the self-covariances), most entries
converging at ``n = 256–1024`` points per scramble at the default tolerance. Measured on the shared 2-core
machine under a load of about 10 (one thread; a quiet machine is several times faster): the lifted
``Conv → ReLU → MaxPool(2) → Conv → ReLU → GAP → Linear`` on 4 inputs of 8 × 8 pixels, NNGP 2.9 s, NNGP and NTK
3.5 s; 8 inputs of 8 × 8: 9.8 s; 4 inputs of 16 × 16: 45 s.

The rule needs each sample's window-window self-covariances, so the layer declares ``needs_self_covariances``
(the tiler then keeps full self-covariances in every tile). Masked inputs and autograd through the kernel are
refused with a :class:`LayerError`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError, LiftOptions, lift_rule, single, single_shape, unsupported
from ntkit.layers.elementwise import ABRelu, Abs, ElementwiseLayer, Erf

__all__ = ["MaxPool", "MaxPoolModule", "fuse_maxpool", "fuse_maxpool_nodes", "is_monotone", "MAX_POOL_CALLS"]

IntOrTuple = Union[int, Sequence[int]]

#: points per scramble of the first pass
_N0 = 64
#: number of independent scrambles (R)
_SCRAMBLES = 8
#: entries × points × dims materialised at once by the estimator
_CHUNK_EVALS = 1 << 21


# ---------------------------------------------------------------------------------------------------
# monotone activations
# ---------------------------------------------------------------------------------------------------
def is_monotone(layer: Layer) -> bool:
    """Whether ``layer`` is an elementwise function that is monotone non-decreasing (``max φ(u) = φ(max u)``).

    ``ABRelu(a, b)`` (ReLU, LeakyReLU) with ``a, b ≥ 0`` and ``Erf(a, b, c)`` with ``a·b ≥ 0`` are decided from
    their parameters; any other :class:`ElementwiseLayer` by checking ``φ`` non-decreasing on 20001 points of
    ``[−30, 30]`` (tanh, sigmoid, softplus, ELU pass; GELU, SiLU and Mish dip below zero and fail)."""
    if isinstance(layer, ABRelu):
        return layer.a >= 0 and layer.b >= 0
    if isinstance(layer, Erf):
        return layer.a * layer.b >= 0
    if isinstance(layer, ElementwiseLayer):
        x = torch.linspace(-30.0, 30.0, 20001, dtype=torch.float64)
        try:
            with torch.no_grad():
                y = layer.fn(x)
        except Exception:  # a function that does not take a plain tensor is not one we can vouch for
            return False
        return bool(torch.isfinite(y).all()) and bool((y[1:] >= y[:-1]).all())
    return False


# ---------------------------------------------------------------------------------------------------
# windows (torch's MaxPool semantics)
# ---------------------------------------------------------------------------------------------------
def _axis_windows(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool, name: str) -> tuple[Tensor, Tensor]:
    """``(idx, mask)`` ``(n_out, k)``: the input pixel of each window entry (clamped) and whether it is real
    (not padding), with ``n_out`` as ``torch.nn.MaxPool*d`` computes it."""
    eff = d * (k - 1) + 1
    if p > eff // 2:
        raise LayerError(
            f"{name}: padding {p} is more than half the effective window {eff} (torch refuses it too); "
            f"use padding ≤ {eff // 2}."
        )
    num = n + 2 * p - eff
    if num < 0:
        raise LayerError(
            f"{name}: the window ({eff} pixels with dilation) is larger than the padded input ({n + 2 * p})."
        )
    n_out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (n_out - 1) * s >= n + p:
        n_out -= 1  # the last window must start inside the input or the left padding (torch)
    idx = torch.arange(n_out)[:, None] * s - p + torch.arange(k)[None, :] * d
    mask = (idx >= 0) & (idx < n)
    return idx.clamp(0, n - 1), mask


def _plan(
    spatial: Sequence[int], k: tuple, s: tuple, p: tuple, d: tuple, ceil_mode: bool, name: str
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Flat window indices ``W (P_out, w)`` into the flattened input pixels, their mask, the output sizes."""
    idx: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    out: list[int] = []
    for a, n in enumerate(spatial):
        i, m = _axis_windows(n, k[a], s[a], p[a], d[a], ceil_mode, name)
        out.append(i.shape[0])
        if idx is None or mask is None:
            idx, mask = i, m
        else:  # combine: (P, w) x (n_a, k_a) -> (P·n_a, w·k_a), row-major like the flattened pixels
            idx = (idx[:, None, :, None] * n + i[None, :, None, :]).reshape(idx.shape[0] * i.shape[0], -1)
            mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(idx.shape[0], -1)
    assert idx is not None and mask is not None
    return idx, mask, tuple(out)


# ---------------------------------------------------------------------------------------------------
# randomized quasi-Monte Carlo
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _sobol_normals(dim: int, scramble: int, n: int, dtype: torch.dtype) -> Tensor:
    """The first ``n`` points of the Sobol sequence in ``dim`` dimensions scrambled with seed ``scramble``,
    mapped to standard normals (``n × dim``; a small cache of read-only tables, at most 16 of
    ``max_samples × dim`` numbers)."""
    eng = torch.quasirandom.SobolEngine(dim, scramble=True, seed=scramble)
    u = eng.draw(n, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).eps
    return torch.special.ndtri(u.clamp(tiny, 1 - tiny)).to(dtype)


def _colour(sigma: Tensor) -> Tensor:
    """``L`` with ``L Lᵀ = Σ`` for PSD (possibly singular) ``Σ``: ``V·diag(√max(λ, 0))`` (batched ``eigh``)."""
    lam, vec = torch.linalg.eigh(sigma)
    return vec * lam.clamp_min(0).sqrt()[..., None, :]


class _Estimator:
    """The RQMC estimates of ``E[φ(max u) φ(max v)]`` (and the NTK contraction) for a batch of covariances;
    see the module docstring for the stopping rule."""

    def __init__(self, layer: MaxPool, w: int):
        self.layer, self.w = layer, w
        #: ``E[φ(max u)]`` of the last call's entries (``want_mean``, or a closed form)
        self.means: Optional[Tensor] = None

    def _relu(self) -> bool:
        act = self.layer.activation
        return isinstance(act, ABRelu) and act.a == 0.0 and act.b == 1.0

    def _phi(self, m: Tensor) -> Tensor:
        act = self.layer.activation
        if act is None:
            return m
        return m.clamp_min(0) if self._relu() else act.fn(m)

    def _dphi(self, m: Tensor) -> Optional[Tensor]:
        act = self.layer.activation
        if act is None:
            return None
        return (m > 0).to(m.dtype) if self._relu() else act.derivative(m)

    def _pass(self, L: Tensor, masks: Tensor, T: Optional[Tensor], lo: int, hi: int) -> tuple[Tensor, ...]:
        """Sums over points ``lo..hi`` of every scramble: ``(f, fu², fv², g, gu², gv², fu)`` each ``(R, b)``."""
        w, d = self.w, 2 * self.w
        b = L.shape[0]
        R = self.layer.scrambles
        acc = [L.new_zeros(R, b, dtype=torch.float64) for _ in range(7)]
        flatL = L.reshape(b * d, d)
        kill = ~masks  # padding: −inf, never the max
        for r in range(R):
            z = _sobol_normals(d, self.layer.seed + r, self.layer.max_samples, L.dtype)[lo:hi]  # (n, d)
            x = (flatL @ z.T).reshape(b, d, -1)  # (b, d, n)
            if bool(kill.any()):
                x = x.masked_fill(kill[:, :, None], -math.inf)
            mu, au = x[:, :w].max(1)
            mv, av = x[:, w:].max(1)
            fu, fv = self._phi(mu), self._phi(mv)
            acc[0][r] = (fu * fv).sum(1)
            acc[1][r] = (fu * fu).sum(1)
            acc[2][r] = (fv * fv).sum(1)
            acc[6][r] = fu.sum(1)
            if T is not None:
                t = T.reshape(b, w * w).gather(1, au * w + av)  # Θ(p_{argmax u}, q_{argmax v})
                du, dv = self._dphi(mu), self._dphi(mv)
                if du is not None and dv is not None:
                    t = t * (du * dv)
                    acc[4][r] = (du * du).sum(1)
                    acc[5][r] = (dv * dv).sum(1)
                else:
                    acc[4][r] = acc[5][r] = float(hi - lo)
                acc[3][r] = t.sum(1)
        return tuple(acc)

    def _closed_form(self, sigma: Tensor, T: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Windows of one value (the activation's own rule) or of two values without activation:
        ``max(a, b) = (a + b)/2 + |a − b|/2``, so with ``s = u1 + u2``, ``d = u1 − u2`` (and ``s', d'`` of ``v``)
        ``K' = E[s s']/4 + E[|d||d'|]/4`` (the cross terms are odd) and, the argmax being the sign of ``d``,
        ``Θ' = (ΣΘ)/4 + (Θ11 − Θ12 − Θ21 + Θ22)·E[sign d sign d']/4`` — the absolute-value arc-cosine kernel
        and its derivative ``(2/π) arcsin ρ`` (Cho & Saul 2009; Clark 1961 for the moments of a maximum)."""
        need = T is not None
        if self.w == 1:
            q12, q11, q22 = sigma[:, 0, 1], sigma[:, 0, 0], sigma[:, 1, 1]
            act = self.layer.activation
            if act is None:
                self.means = torch.zeros_like(q11)
                return q12.clone(), (None if T is None else T[:, 0, 0].clone())
            m = act.mean_fn(q11)
            self.means = torch.zeros_like(q11) if m is None else m
            k, dot = act.rule(q12, q11, q22, need)
            return k, (None if T is None or dot is None else dot * T[:, 0, 0])
        S = sigma
        var_u = S[:, 0, 0] + S[:, 1, 1] - 2 * S[:, 0, 1]
        var_v = S[:, 2, 2] + S[:, 3, 3] - 2 * S[:, 2, 3]
        c_dd = S[:, 0, 2] - S[:, 0, 3] - S[:, 1, 2] + S[:, 1, 3]
        c_ss = S[:, 0, 2] + S[:, 0, 3] + S[:, 1, 2] + S[:, 1, 3]
        e_abs, sgn = Abs().rule(c_dd, var_u.clamp_min(0), var_v.clamp_min(0), need)
        self.means = torch.sqrt(var_u.clamp_min(0) / (2 * math.pi))  # Clark: E[max(u1, u2)] = θ φ(0)
        nngp = (c_ss + e_abs) / 4
        if T is None or sgn is None:
            return nngp, None
        t = T.reshape(-1, 4)
        ntk = (t.sum(1) + (t[:, 0] - t[:, 1] - t[:, 2] + t[:, 3]) * sgn) / 4
        return nngp, ntk

    def _ratio(self, se: Tensor, scale: Tensor, unit: Tensor) -> Tensor:
        """``se / (atol + rtol·scale)`` in the units of the original entry (``se``, ``scale`` are of the entry
        divided by ``unit``); 0 where both are 0, ∞ where only the tolerance is."""
        tol = self.layer.atol / unit + self.layer.rtol * scale
        return torch.where(tol > 0, se / tol.clamp_min(torch.finfo(tol.dtype).tiny), torch.where(se > 0, math.inf, 0.0))

    def __call__(
        self, sigma: Tensor, masks: Tensor, T: Optional[Tensor], want_mean: bool = False
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``sigma (b, 2w, 2w)``, ``masks (b, 2w)`` (real entries), ``T (b, w, w)`` or ``None``. With
        ``want_mean`` the stopping rule also covers ``E[φ(max u)]`` (error ``≤ atol + rtol·√E[φ(max u)²]``),
        left in :attr:`means` (``(b,)``)."""
        layer = self.layer
        b, d = sigma.shape[0], 2 * self.w
        self.means = None
        if b == 0:
            e = sigma.new_zeros(0)
            self.means = e.clone()
            return e, (None if T is None else e.clone())
        if self.w <= 2 and layer._exact_small and bool(masks.all()) and (self.w == 1 or layer.activation is None):
            return self._closed_form(sigma, T)
        sigma = sigma * (masks[:, :, None] & masks[:, None, :])  # padding rows: no variance
        R = layer.scrambles
        sums = [sigma.new_zeros(R, b, dtype=torch.float64) for _ in range(7)]
        # scales: for the identity and ReLU-type activations (positively homogeneous of degree 1) the NNGP is
        # homogeneous of degree 1 in Σ and the NTK of degree 0, so each entry runs on Σ/c with c a power of 2
        # near its largest variance (exact), and Θ/max|Θ|: no overflow or underflow for any scale
        act = layer.activation
        homogeneous = act is None or isinstance(act, ABRelu)
        c = torch.ones(b, dtype=sigma.dtype, device=sigma.device)
        if homogeneous:
            big = torch.diagonal(sigma, 0, 1, 2).amax(1)
            c = torch.where(big > 0, torch.ldexp(torch.ones_like(big), torch.frexp(big)[1]), c)
            sigma = sigma / c[:, None, None]
        tmax = None if T is None else T.abs().reshape(b, -1).amax(1)
        if T is not None and tmax is not None:
            tscale = torch.where(tmax > 0, tmax, torch.ones_like(tmax))
            T = T / tscale[:, None, None]
            tmax = (tmax / tscale).double()
        c64 = c.double()
        active = torch.arange(b, device=sigma.device)
        lo, hi = 0, _N0
        nngp = sigma.new_zeros(b, dtype=torch.float64)
        means = sigma.new_zeros(b, dtype=torch.float64)
        ntk = None if T is None else sigma.new_zeros(b, dtype=torch.float64)
        # the samples in float32 unless a tolerance below 1e-5 asks for more: its round-off (1e-7 relative) is
        # far below the quasi-Monte-Carlo error; the sums are kept in float64
        lim = float(sigma.abs().max()) if sigma.numel() else 0.0
        var = torch.diagonal(sigma, 0, 1, 2)
        small = float(var[var > 0].min()) if bool((var > 0).any()) else 1.0
        work = torch.float32 if (layer.rtol >= 1e-5 and lim <= 1e30 and small >= 1e-30) else sigma.dtype
        L = torch.cat([_colour(sigma[c : c + 4096]).to(work) for c in range(0, b, 4096)])
        if T is not None:
            T = T.to(work)
        while True:
            per = max(1, _CHUNK_EVALS // ((hi - lo) * d * 2))
            for c0 in range(0, active.numel(), per):
                ids = active[c0 : c0 + per]
                out = self._pass(L[ids], masks[ids], None if T is None else T[ids], lo, hi)
                for s, o in zip(sums, out):
                    s[:, ids] += o
            a = active
            est = sums[0][:, a] / hi  # (R, b_active)
            mean = est.mean(0)
            se = est.std(0) / math.sqrt(R)
            scale = torch.sqrt((sums[1][:, a].mean(0) / hi) * (sums[2][:, a].mean(0) / hi))
            ca = c64[a]
            ratio = self._ratio(se, scale, ca)
            nngp[a] = mean
            if want_mean:
                est_m = sums[6][:, a] / hi
                scale_m = torch.sqrt(sums[1][:, a].mean(0) / hi)
                ratio = torch.maximum(ratio, self._ratio(est_m.std(0) / math.sqrt(R), scale_m, ca.sqrt()))
                means[a] = est_m.mean(0)
            if T is not None and ntk is not None and tmax is not None:
                est_t = sums[3][:, a] / hi
                se_t = est_t.std(0) / math.sqrt(R)
                scale_t = tmax[a] * torch.sqrt((sums[4][:, a].mean(0) / hi) * (sums[5][:, a].mean(0) / hi))
                ratio = torch.maximum(ratio, self._ratio(se_t, scale_t, tscale[a].double()))
                ntk[a] = est_t.mean(0)
            ok = ratio <= 1
            active = a[~ok]
            if active.numel() == 0:
                dt = sigma.dtype
                self.means = (means * c64.sqrt()).to(dt) if want_mean else None
                ntk_out = None if ntk is None or T is None else (ntk * tscale.double()).to(dt)
                return (nngp * c64).to(dt), ntk_out
            if hi >= layer.max_samples:
                worst = float(ratio.max())
                raise LayerError(
                    f"{layer!r}: {active.numel()} of {b} kernel entries did not reach the requested tolerance "
                    f"(rtol={layer.rtol}, atol={layer.atol}) with max_samples={layer.max_samples} points per "
                    f"scramble (the worst standard error is {worst:.3g}× the tolerance). Fix: raise max_samples "
                    f"or loosen rtol/atol."
                )
            lo, hi = hi, 2 * hi


# ---------------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------------
def _tuple(v: Optional[IntOrTuple], name: str, minimum: int) -> Optional[tuple[int, ...]]:
    if v is None:
        return None
    t = (int(v),) if isinstance(v, int) else tuple(int(a) for a in v)
    if not 1 <= len(t) <= 3 or any(a < minimum for a in t) or isinstance(v, bool):
        raise LayerError(f"MaxPool: {name}={v!r} must be an int ≥ {minimum} or a tuple of 1 to 3 of them.")
    return t


def _flat_pairs(t: Tensor, nb: int, S: int) -> Tensor:
    """``(*batch, s1, s1', .., sS, sS')`` -> ``(*batch, P, P)`` (x1-side pixels first, row-major)."""
    perm = list(range(nb)) + [nb + 2 * a for a in range(S)] + [nb + 2 * a + 1 for a in range(S)]
    P = math.prod(t.shape[nb + 2 * a] for a in range(S))
    return t.permute(perm).reshape(tuple(t.shape[:nb]) + (P, P))


def _paired(t: Tensor, nb: int, sizes: tuple[int, ...]) -> Tensor:
    """``(*batch, P, P)`` -> ``(*batch, s1, s1', .., sS, sS')``."""
    S = len(sizes)
    t = t.reshape(tuple(t.shape[:nb]) + sizes + sizes)
    perm = list(range(nb)) + [a for i in range(S) for a in (nb + i, nb + S + i)]
    return t.permute(perm).contiguous()


class MaxPoolModule(nn.Module):
    """Finite twin of :class:`MaxPool`: the fused activation (if any), then ``torch.nn.functional.max_pool*d``."""

    def __init__(self, act: Optional[nn.Module], kernel_size, stride, padding, dilation, ceil_mode):
        super().__init__()
        self.act = act
        rank = len(kernel_size)
        self.pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[rank](
            kernel_size, stride, padding, dilation, ceil_mode=ceil_mode
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x if self.act is None else self.act(x))


class MaxPool(Layer):
    """Max pooling over windows, ``MaxPool(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
    activation=None, rtol=5e-3, atol=0.0, max_samples=2**13, seed=0)``.

    Window arguments as ``torch.nn.MaxPool{1,2,3}d`` (``stride=None``: the window; padding acts as −∞; an
    int applies to every spatial axis, a tuple fixes their number), on ``(N, C, *spatial)`` activations.

    ``activation``: a monotone non-decreasing elementwise layer (``Relu()``, ``LeakyRelu(a ≥ 0)``, ``Erf()``,
    ``Elementwise(torch.tanh)``, ...) applied before the max — or, equivalently, after it. The input must be
    Gaussian (a Dense/Conv output); ``Conv → Relu → MaxPool`` is ``Conv → MaxPool(activation=Relu())``
    (:func:`fuse_maxpool` does that rewrite, and ``ntkit.lift`` calls it).

    Accuracy: ``rtol``/``atol``: per entry, the estimated standard error of the randomized quasi-Monte-Carlo
    estimate is at most ``atol + rtol·s`` (``s`` the Cauchy–Schwarz bound of the entry), and the error below
    ``4 × that`` but with about 1 % probability per entry; ``max_samples`` points per scramble (8 scrambles)
    at most, else :class:`LayerError`; ``seed`` the first scramble's seed. Rule, numerics and cost: module
    docstring. Not differentiable in its inputs (the estimate is computed without autograd: differentiating
    through it raises).
    """

    needs_full_spatial = True
    tracks_means = True
    #: the rule needs the window-window self-covariances, which pair-only tiles do not carry
    needs_self_covariances = True
    scrambles = _SCRAMBLES
    #: windows of 1 value, and of 2 without activation, use their closed forms (the tests switch it off to check
    #: the quasi-Monte-Carlo path against them)
    _exact_small = True

    def __init__(
        self,
        kernel_size: IntOrTuple,
        stride: Optional[IntOrTuple] = None,
        padding: IntOrTuple = 0,
        dilation: IntOrTuple = 1,
        ceil_mode: bool = False,
        activation: Optional[Layer] = None,
        rtol: float = 5e-3,
        atol: float = 0.0,
        max_samples: int = 2**13,
        seed: int = 0,
    ):
        ks = _tuple(kernel_size, "kernel_size", 1)
        assert ks is not None
        self.kernel_size = ks
        self._int_window = isinstance(kernel_size, int)
        self.stride = _tuple(stride, "stride", 1)
        self.padding = _tuple(padding, "padding", 0)
        self.dilation = _tuple(dilation, "dilation", 1)
        self.ceil_mode = bool(ceil_mode)
        if activation is not None and not is_monotone(activation):
            raise LayerError(
                f"MaxPool(activation={activation!r}): the activation must be a monotone non-decreasing "
                f"elementwise layer (max φ(u) = φ(max u) holds only then). Keep it a separate layer after a "
                f"Dense/Conv, or use Relu(), LeakyRelu(a ≥ 0), Erf(), tanh, sigmoid."
            )
        self.activation: Optional[ElementwiseLayer] = activation if isinstance(activation, ElementwiseLayer) else None
        if not (rtol >= 0 and atol >= 0 and rtol + atol > 0):
            raise LayerError(f"MaxPool: rtol={rtol!r}, atol={atol!r} must be ≥ 0, not both 0.")
        if not (isinstance(max_samples, int) and max_samples >= _N0):
            raise LayerError(f"MaxPool: max_samples={max_samples!r} must be an int ≥ {_N0}.")
        self.rtol, self.atol = float(rtol), float(atol)
        self.max_samples = 1 << (max_samples.bit_length() - 1)  # a power of 2 (Sobol points come in those)
        self.seed = int(seed)

    def input_rank(self) -> Optional[int]:
        return None if self._int_window else len(self.kernel_size) + 2

    def _args(self, S: int) -> tuple[tuple[int, ...], ...]:
        def expand(t: Optional[tuple[int, ...]], default: tuple[int, ...], name: str) -> tuple[int, ...]:
            t = default if t is None else t
            if len(t) == 1:
                return t * S
            if len(t) != S:
                raise LayerError(f"{self!r}: {name} has {len(t)} entries but the input has {S} spatial axes.")
            return t

        k = expand(self.kernel_size, self.kernel_size, "kernel_size")
        return (
            k,
            expand(self.stride, k, "stride"),
            expand(self.padding, (0,), "padding"),
            expand(self.dilation, (1,), "dilation"),
        )

    def _windows(self, spatial: Sequence[int]) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        S = len(spatial)
        rank = self.input_rank()
        if not 1 <= S <= 3 or (rank is not None and S != rank - 2):
            raise LayerError(
                f"{self!r} needs activations with {rank - 2 if rank else '1 to 3'} spatial axes (channels first) "
                f"but got {S} (per-sample spatial shape {tuple(spatial)})."
            )
        k, s, p, d = self._args(S)
        return _plan(spatial, k, s, p, d, self.ceil_mode, repr(self))

    # -- the rule --------------------------------------------------------------------------------------
    def _check(self, k: Kernel) -> None:
        if k.spatial_ndim == 0:
            raise LayerError(
                f"{self!r} pools spatial axes but its input has none (per-sample shape {k.shape1[1:]}); "
                f"move it before Flatten/GlobalAvgPool."
            )
        if k.diagonal_spatial:
            raise LayerError(
                f"{self!r} needs the full pixel-pixel covariance, but the kernel tracks only the diagonal. Call it "
                f"through a network (serial(...).kernel_fn), which tracks it whenever a pooling layer is present."
            )
        if not k.is_gaussian:
            where = "the raw inputs" if k.is_input else "non-Gaussian activations (e.g. a ReLU's output)"
            raise LayerError(
                f"{self!r} is applied to {where}: its kernel is an expectation over jointly Gaussian window "
                f"values, which only a Dense/Conv output has. Fix: put a Dense/Conv before it; for Conv → ReLU → "
                f"MaxPool (or MaxPool → ReLU) fuse the activation into the pool: MaxPool(..., activation=Relu()) "
                f"(any monotone non-decreasing activation; ntkit.lift does this itself)."
            )
        if k.mask1 is not None or k.mask2 is not None:
            raise LayerError(
                f"{self!r}: masked inputs (mask_constant=) are not supported by the max-pooling kernel; pad with "
                f"a constant that is not masked, or pool before masking."
            )
        if k.pair_only:
            raise LayerError(
                f"{self!r} got a pair-only record (no self-covariances); it declares needs_self_covariances, so "
                f"call it through Net.kernel_fn, which keeps them."
            )
        tensors = (k.nngp, k.ntk, k.cov1, k.cov2)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            raise LayerError(
                f"{self!r}: its kernel is a quasi-Monte-Carlo estimate with no derivative in the inputs or "
                f"hyper-parameters; compute it under torch.no_grad() (or detach), or use AvgPool to differentiate."
            )

    def kernel(self, k):
        k = single(k, self)
        self._check(k)
        S = k.spatial_ndim
        W, mask, out_sizes = self._windows(k.spatial_shape)
        dev = k.device
        W, mask = W.to(dev), mask.to(dev)
        Po, w = W.shape
        est = _Estimator(self, w)
        assert k.cov1 is not None and k.nngp is not None
        with torch.no_grad():
            C1 = _flat_pairs(k.cov1, 1, S)
            C2 = C1 if k.cov2 is None else _flat_pairs(k.cov2, 1, S)
            win1 = C1[:, W[:, :, None], W[:, None, :]]  # (N1, Po, w, w): window self-covariances
            win2 = win1 if k.cov2 is None else C2[:, W[:, :, None], W[:, None, :]]
            K = _flat_pairs(k.nngp, 2, S)
            T = None if k.ntk is None else _flat_pairs(k.ntk, 2, S)
            n1, n2 = K.shape[0], K.shape[1]
            pu, pv = torch.triu_indices(Po, Po, device=dev)  # self pairs p ≤ p'

            # covariances are built for at most this many entries at a time (bounded memory, whatever N and P)
            per_chunk = max(1, _CHUNK_EVALS // (2 * w) ** 2)

            def self_cov(C: Tensor, win: Tensor, Th: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
                """cov' (and, with ``Th (N, P, P)``, the NTK of a sample with itself) on pixel pairs p ≤ p'."""
                fs, gs, ms = [], [], []
                step = max(1, per_chunk // pu.numel())
                for c0 in range(0, C.shape[0], step):
                    Cc, wc = C[c0 : c0 + step], win[c0 : c0 + step]
                    n = Cc.shape[0]
                    cross = Cc[:, W[pu][:, :, None], W[pv][:, None, :]]  # (n, m, w, w)
                    sig = self._sigma(wc[:, pu], cross, wc[:, pv])
                    msk = torch.cat([mask[pu], mask[pv]], 1).expand(n, -1, -1)
                    tt = None if Th is None else Th[c0 : c0 + step, W[pu][:, :, None], W[pv][:, None, :]]
                    f, g = est(sig.reshape(-1, 2 * w, 2 * w), msk.reshape(-1, 2 * w), _flat(tt, w), want_mean=True)
                    assert est.means is not None
                    ms.append(est.means.reshape(n, -1)[:, pu == pv])  # E[φ(max u)] at each output pixel
                    fs.append(f.reshape(n, -1))
                    gs.append(None if g is None else g.reshape(n, -1))
                means.append(torch.cat(ms))
                g_all = None if gs[0] is None else torch.cat([t for t in gs if t is not None])
                return _sym(torch.cat(fs), pu, pv, Po), (None if g_all is None else _sym(g_all, pu, pv, Po))

            means: list[Tensor] = []
            diag_ntk = None
            if k.x1_is_x2 and T is not None:
                diag_ntk = torch.diagonal(T, 0, 0, 1).movedim(-1, 0)  # (N1, P, P)
            cov1, ntk_self = self_cov(C1, win1, diag_ntk)
            cov2 = None if k.cov2 is None else self_cov(C2, win2, None)[0]

            # cross pairs (i, j): all pixel pairs; for x1_is_x2 only i < j (then mirrored), i = i is cov1
            if k.x1_is_x2:
                iu, ju = torch.triu_indices(n1, n1, 1, device=dev)
            else:
                iu, ju = (
                    a.reshape(-1)
                    for a in torch.meshgrid(torch.arange(n1, device=dev), torch.arange(n2, device=dev), indexing="ij")
                )
            m = iu.numel()
            pair_msk = torch.cat([mask[:, None].expand(-1, Po, -1), mask[None, :].expand(Po, -1, -1)], -1)
            fs, gs = [], []
            step = max(1, per_chunk // (Po * Po))
            for c0 in range(0, m, step):
                ic, jc = iu[c0 : c0 + step], ju[c0 : c0 + step]
                mc = ic.numel()
                Kb = K[ic, jc][:, W[:, :, None, None], W[None, None, :, :]]  # (mc, Po, w, Po, w)
                sig = self._sigma(
                    win1[ic][:, :, None].expand(-1, -1, Po, -1, -1),
                    Kb.permute(0, 1, 3, 2, 4),  # (mc, Po, Po, w, w)
                    win2[jc][:, None, :].expand(-1, Po, -1, -1, -1),
                )
                Tb = None
                if T is not None:
                    Tb = T[ic, jc][:, W[:, :, None, None], W[None, None, :, :]].permute(0, 1, 3, 2, 4)
                f, g = est(
                    sig.reshape(-1, 2 * w, 2 * w), pair_msk.expand(mc, -1, -1, -1).reshape(-1, 2 * w), _flat(Tb, w)
                )
                fs.append(f.reshape(mc, Po, Po))
                gs.append(None if g is None else g.reshape(mc, Po, Po))
            f = torch.cat(fs) if fs else K.new_zeros(0, Po, Po)
            g = None
            if T is not None:
                g = torch.cat([t for t in gs if t is not None]) if fs else K.new_zeros(0, Po, Po)
            if k.x1_is_x2:
                nngp = _mirror(f, iu, ju, cov1, n1)
                ntk = None if g is None else _mirror(g, iu, ju, ntk_self, n1)
            else:
                nngp = f.reshape(n1, n2, Po, Po)
                ntk = None if g is None else g.reshape(n1, n2, Po, Po)
        sh = (k.shape1[0], k.shape1[1]) + out_sizes
        sh2 = (k.shape2[0], k.shape2[1]) + out_sizes
        out = k.replace(
            nngp=_paired(nngp, 2, out_sizes),
            ntk=None if ntk is None else _paired(ntk, 2, out_sizes),
            cov1=_paired(cov1, 1, out_sizes),
            cov2=None if cov2 is None else _paired(cov2, 1, out_sizes),
            mean1=means[0].reshape((n1,) + out_sizes),
            mean2=None if cov2 is None else means[1].reshape((-1,) + out_sizes),
            mean_kind="exact",  # i.i.d. channels of a Gaussian input: every channel has this mean
            shape1=sh,
            shape2=sh2,
            is_gaussian=False,
            is_input=False,
        )
        return out.with_exact_diagonal(inplace=True)

    @staticmethod
    def _sigma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """``[[a, b], [bᵀ, c]]`` on the last two axes."""
        top = torch.cat([a, b], -1)
        bottom = torch.cat([b.transpose(-1, -2), c], -1)
        return torch.cat([top, bottom], -2)

    # -- the finite twin -------------------------------------------------------------------------------
    def build(self, in_shape, width, generator, readout):
        s = single_shape(in_shape, self)
        if len(s) < 2:
            raise LayerError(f"{self!r} pools spatial axes but its input has per-sample shape {tuple(s)}.")
        _, _, out_sizes = self._windows(s[1:])
        act = None
        if self.activation is not None:
            act, _ = self.activation.build(s, width, generator, readout)
        k, st, p, d = self._args(len(s) - 1)
        return MaxPoolModule(act, k, st, p, d, self.ceil_mode), (s[0],) + out_sizes

    def __repr__(self) -> str:
        args = [f"{self.kernel_size if not self._int_window else self.kernel_size[0]}"]
        for name, default in (("stride", None), ("padding", (0,)), ("dilation", (1,))):
            v = getattr(self, name)
            if v is not None and v != default:
                args.append(f"{name}={v}")
        if self.ceil_mode:
            args.append("ceil_mode=True")
        if self.activation is not None:
            args.append(f"activation={self.activation!r}")
        if self.rtol != 5e-3 or self.atol != 0.0:
            args.append(f"rtol={self.rtol}, atol={self.atol}")
        return f"MaxPool({', '.join(args)})"


def _flat(t: Optional[Tensor], w: int) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1, w, w)


def _sym(vals: Tensor, pu: Tensor, pv: Tensor, P: int) -> Tensor:
    """``(n, m)`` values on pixel pairs ``p ≤ p'`` -> symmetric ``(n, P, P)``."""
    out = vals.new_empty(vals.shape[0], P, P)
    out[:, pu, pv] = vals
    out[:, pv, pu] = vals
    return out


def _mirror(f: Tensor, iu: Tensor, ju: Tensor, diag: Optional[Tensor], n: int) -> Tensor:
    """Pairs ``i < j`` ``(m, P, P)`` and the ``i = i`` blocks -> the symmetric ``(n, n, P, P)`` kernel."""
    P = f.shape[-1]
    out = f.new_empty(n, n, P, P)
    out[iu, ju] = f
    out[ju, iu] = f.transpose(-1, -2)
    assert diag is not None
    idx = torch.arange(n, device=f.device)
    out[idx, idx] = diag
    return out


# ---------------------------------------------------------------------------------------------------
# fusion of monotone activations into an adjacent MaxPool (used by ntkit.lift)
# ---------------------------------------------------------------------------------------------------
def _fused(pool: Layer, act: Layer) -> Optional[MaxPool]:
    if isinstance(pool, MaxPool) and pool.activation is None and isinstance(act, ElementwiseLayer) and is_monotone(act):
        new = copy.copy(pool)
        new.activation = act
        return new
    return None


def fuse_maxpool(layers: Sequence[Layer]) -> list[Layer]:
    """``[..., act, MaxPool, ...]`` and ``[..., MaxPool, act, ...]`` -> ``[..., MaxPool(activation=act), ...]``
    for a monotone non-decreasing elementwise ``act`` (:func:`is_monotone`): ``max φ(u) = φ(max u)``, and the
    max then sees the Gaussian pre-activations its rule needs. Other layers are kept as they are."""
    out: list[Layer] = []
    for layer in layers:
        prev = out[-1] if out else None
        if prev is not None:
            f = _fused(layer, prev) or _fused(prev, layer)
            if f is not None:
                out[-1] = f
                continue
        out.append(layer)
    return out


def fuse_maxpool_nodes(nodes: Sequence[Any], output: str) -> list[Any]:
    """The same rewrite on a list of :class:`ntkit.nets.GraphNode` (``name``, ``layer``, ``inputs``): a pool
    node reading an activation node (or an activation node reading a pool node) is fused when the
    intermediate value has no other user and is not the ``output``. The fused node keeps the later name."""
    nodes = list(nodes)
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    by_name = {n.name: n for n in nodes}
    dropped: set[str] = set()
    out: list[Any] = []
    for n in nodes:
        if len(n.inputs) == 1 and n.inputs[0] in by_name and n.inputs[0] not in dropped:
            src = by_name[n.inputs[0]]
            if uses.get(src.name, 0) == 1 and src.name != output and len(src.inputs) == 1:
                f = _fused(n.layer, src.layer) or _fused(src.layer, n.layer)
                if f is not None:
                    dropped.add(src.name)
                    new = type(n)(n.name, f, src.inputs)
                    by_name[n.name] = new
                    out = [o for o in out if o.name != src.name]
                    out.append(new)
                    continue
        out.append(n)
    return out


# ---------------------------------------------------------------------------------------------------
# lift: torch max-pooling modules
# ---------------------------------------------------------------------------------------------------
@lift_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _lift_max_pool(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.MaxPool{1,2,3}d`` -> :class:`MaxPool` (an adjacent ReLU is fused into it by ``ntkit.lift``)."""
    assert isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))
    rank = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
    if m.return_indices:
        raise unsupported(m, "return_indices=True returns the argmax positions, which have no kernel; use the default.")

    def tup(v: Any) -> tuple[int, ...]:
        return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * rank

    return MaxPool(
        tup(m.kernel_size),
        stride=tup(m.stride if m.stride is not None else m.kernel_size),
        padding=tup(m.padding),
        dilation=tup(m.dilation),
        ceil_mode=bool(m.ceil_mode),
    )


def _functional(cls: type) -> Any:
    """``F.max_pool*d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)`` -> the module."""

    def make(
        kernel_size: Any,
        stride: Any = None,
        padding: Any = 0,
        dilation: Any = 1,
        ceil_mode: bool = False,
        return_indices: bool = False,
    ) -> nn.Module:
        return cls(kernel_size, stride, padding, dilation, return_indices=return_indices, ceil_mode=ceil_mode)

    return make


#: functional max pooling -> its module (for ``ntkit.lift``'s traced calls)
MAX_POOL_CALLS: dict[Any, Any] = {
    F.max_pool1d: _functional(nn.MaxPool1d),
    F.max_pool2d: _functional(nn.MaxPool2d),
    F.max_pool3d: _functional(nn.MaxPool3d),
}
