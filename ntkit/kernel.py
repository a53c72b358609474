"""The Kernel record: the one object that layers pass along.

A network's infinite-width behaviour on a pair of input batches ``x1`` (``N1`` samples) and ``x2``
(``N2`` samples) is described by second moments of its pre-activations (Neal 1996; Lee et al. 2018;
Jacot et al. 2018):

* ``nngp[i, j] = E[z(x1_i) z(x2_j)]`` — the NNGP kernel (covariance of one output channel),
* ``ntk[i, j]  = <df(x1_i)/dθ, df(x2_j)/dθ>`` — the neural tangent kernel, deterministic in the limit,
* ``cov1[i] = E[z(x1_i)^2]`` and ``cov2[j] = E[z(x2_j)^2]`` — the marginal variances a nonlinearity needs.

Layouts follow PyTorch (channels first). With ``S`` spatial dimensions of sizes ``s_1..s_S``:

* ``diagonal_spatial=True`` (only same-pixel covariances): ``nngp`` is ``(N1, N2, s_1, .., s_S)`` and
  ``cov1`` is ``(N1, s_1, .., s_S)``;
* ``diagonal_spatial=False`` (full pixel-pixel covariance, needed by pooling): ``nngp`` is
  ``(N1, N2, s_1, s_1, s_2, s_2, ..)`` (each spatial axis paired with its twin, the x1 side first) and
  ``cov1`` is ``(N1, s_1, s_1, ..)``.

Fully-connected networks have ``S = 0``: ``nngp`` is ``(N1, N2)`` and ``cov1`` is ``(N1,)``.
``cov2`` is ``None`` when ``x2`` is ``x1`` (``x1_is_x2``).

Pair-only records: a nonlinearity needs from ``cov1``/``cov2`` only their same-pixel variances. When the
tiler has those already (recorded on the diagonal tiles, see :mod:`ntkit.nets`), an off-diagonal tile runs
with ``cov1 = cov2 = None`` and the variances in ``var1``/``var2`` (``(N, *s)``), which the tiler refreshes
after every layer, so that no tile recomputes the full self-covariances of its samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ntkit._inputs import all_finite as all_finite  # former home, kept importable
from ntkit._inputs import as_batch, kernel_inputs

# former homes of the input checks (now ntkit._inputs), kept importable from here
as_tensor_input = as_batch
validate_inputs = kernel_inputs

__all__ = ["Kernel", "kernel_from_inputs", "normalize_get", "check_get", "map_kernels", "GETS"]

#: the kernels a ``kernel_fn`` can compute, the valid values of ``get=``
GETS = ("nngp", "ntk")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """Immutable record of the kernels of a network on ``(x1, x2)``; see the module docstring.

    Attributes:
      nngp, ntk: cross-covariance and tangent kernel (``ntk`` is ``None`` when not requested).
      cov1, cov2: marginal (same-sample) covariances; ``cov2`` is ``None`` when ``x1_is_x2``.
      shape1, shape2: shapes ``(N, C, *spatial)`` of the finite twin's activations at this point; ``C`` is
        the finite channel width (it enters the NTK under the standard parameterisation).
      diagonal_spatial: whether only same-pixel covariances are tracked.
      x1_is_x2: ``x2`` was ``None``; ``nngp``/``ntk`` are symmetric ``N1 x N1`` matrices.
      is_gaussian: the current activations are jointly Gaussian (true after any Dense/Conv); a nonlinearity
        requires it, since its rule is a Gaussian expectation.
      is_input: nothing has been applied yet.
      var1, var2: same-pixel variances ``(N, *s)`` of a pair-only record (``cov1 = cov2 = None``); see the
        module docstring.
      mean1, mean2: same-pixel means ``E[z_c(x)]`` ``(N, *s)`` of the activations, averaged over the channels
        (``None``: zero, as after every Dense/Conv; ``mean2`` is ``None`` for ``x1_is_x2``). A sum of branches
        needs them: ``E[(u + v)(u' + v')]`` has the cross terms ``E[u]E[v'] + E[v]E[u']`` (``FanInSum``).
      mean_kind: ``"exact"`` (every channel has the mean ``mean1``), ``"varying"`` (channels differ, e.g. the raw
        inputs or a concatenation; ``mean1`` is their average) or ``"unknown"`` (a layer that does not track
        means produced these activations).
      fresh: one entry per enclosing ``FanOut``: whether this path has applied a layer with its own parameters
        (Dense/Conv) since that ``FanOut``. Branches that have not are the same function of the same
        activations, not independent, and the ``FanInSum``/``FanInProd`` rules refuse more than one of them.
      mask1, mask2: NT's masks (``kernel_fn(..., mask_constant=c)``): boolean ``(N, C_m, *s)``, ``True`` where an
        entry is masked, ``C_m`` 1 (the same for every channel) or ``C`` (per channel: the raw inputs). ``None``:
        nothing is masked (``mask2`` is ``None`` for ``x1_is_x2``: the masks of x1). Kept by every layer as NT
        does (see :mod:`ntkit.nets.masks`).
      law: for a non-Gaussian record, the program behind its activations when it is a nonlinearity's output or
        a sum of one with independent Gaussian branches (:class:`ntkit.layers.residual_law.ResidualLaw`): what a
        nonlinearity applied to such a sum needs (post-activation residual blocks). ``None`` otherwise; layers
        that do not keep it drop it (:func:`ntkit.nets.tiler.apply_layer`).
    """

    nngp: Optional[Tensor]
    ntk: Optional[Tensor]
    cov1: Optional[Tensor]
    cov2: Optional[Tensor]
    shape1: tuple[int, ...]
    shape2: tuple[int, ...]
    diagonal_spatial: bool = True
    x1_is_x2: bool = False
    is_gaussian: bool = False
    is_input: bool = True
    var1: Optional[Tensor] = None
    var2: Optional[Tensor] = None
    mean1: Optional[Tensor] = None
    mean2: Optional[Tensor] = None
    mean_kind: str = "exact"
    fresh: tuple[bool, ...] = ()
    mask1: Optional[Tensor] = None
    mask2: Optional[Tensor] = None
    law: Optional[Any] = None

    def replace(self, **changes: Any) -> Kernel:
        return dataclasses.replace(self, **changes)

    # -- shape bookkeeping -------------------------------------------------------------------------
    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.shape1[2:])

    @property
    def spatial_ndim(self) -> int:
        return len(self.shape1) - 2

    @property
    def width(self) -> int:
        """Channel width of the finite twin at this point (the ``C`` of ``shape1``)."""
        return self.shape1[1]

    def _any(self) -> Tensor:
        return next(t for t in (self.cov1, self.var1, self.nngp, self.ntk) if t is not None)

    @property
    def dtype(self) -> torch.dtype:
        return self._any().dtype

    @property
    def device(self) -> torch.device:
        return self._any().device

    @property
    def pair_only(self) -> bool:
        """Self-covariances are not propagated (``var1``/``var2`` carry the variances instead)."""
        return self.cov1 is None

    # -- marginal variances, broadcast against the kernels ---------------------------------------------
    def _cov_diag(self, cov: Tensor) -> Tensor:
        """Same-pixel variances ``(N, s_1, .., s_S)`` from a (possibly full-spatial) ``cov``."""
        if self.diagonal_spatial or self.spatial_ndim == 0:
            return cov
        d = cov
        for _ in range(self.spatial_ndim):
            # the first remaining pair of axes is (s, s); take its diagonal and move it to the end
            d = torch.diagonal(d, dim1=1, dim2=2)
        return d

    def _outer_view(self, v: Tensor, side: int, paired: bool) -> Tensor:
        """Reshape same-pixel variances ``v (N, *s)`` to broadcast against a kernel.

        side 0: ``v`` indexes the first batch/pixel axes, side 1 the second.
        paired: target layout has a batch pair ``(N1, N2, ...)``; else a single batch axis (cov1).
        """
        n = v.shape[0]
        s = v.shape[1:]
        if self.diagonal_spatial or self.spatial_ndim == 0:
            if not paired:
                return v
            return v.reshape((n, 1) + s) if side == 0 else v.reshape((1, n) + s)
        shape: list[int] = []
        if paired:
            shape += [n, 1] if side == 0 else [1, n]
        else:
            shape += [n]
        for size in s:
            shape += [size, 1] if side == 0 else [1, size]
        return v.reshape(shape)

    def same_pixel_variances(self) -> tuple[Tensor, Optional[Tensor]]:
        """``(d1, d2)``: same-pixel variances ``(N, *s)`` of both sides (``d2`` is ``None`` for ``x1_is_x2``)."""
        if self.cov1 is None:  # pair-only
            assert self.var1 is not None, "a pair-only Kernel carries its same-pixel variances in var1"
            return self.var1, self.var2
        return self._cov_diag(self.cov1), None if self.cov2 is None else self._cov_diag(self.cov2)

    def variances(self) -> tuple[Tensor, Tensor]:
        """``(q11, q22)``: the variances of the two entries behind every entry of ``nngp``."""
        d1, d2 = self.same_pixel_variances()
        d2 = d1 if d2 is None else d2
        return self._outer_view(d1, 0, True), self._outer_view(d2, 1, True)

    def means(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(m1, m2)``: same-pixel means ``(N, *s)`` of both sides (``m2 = m1`` for ``x1_is_x2``; ``None``: zero)."""
        return self.mean1, (self.mean1 if self.x1_is_x2 else self.mean2)

    def outer_means(self, a: Tensor, b: Tensor, which: int = 0) -> Tensor:
        """``a(x) b(x')`` for same-pixel means ``a`` of one side and ``b`` of the other, broadcast against
        ``nngp`` (``which = 0``: ``a`` of x1, ``b`` of x2), ``cov1`` (1: both of x1) or ``cov2`` (2: both of x2);
        pixel pairs ``(p, p')`` of a full-spatial layout get ``a[p] b[p']``."""
        if which == 0:
            return self._outer_view(a, 0, True) * self._outer_view(b, 1, True)
        return self._outer_view(a, 0, False) * self._outer_view(b, 1, False)

    def with_exact_diagonal(self, inplace: bool = False) -> Kernel:
        """For ``x1_is_x2``: make ``nngp[i, i]`` equal ``cov1[i]`` bit for bit, so that correlations on the
        diagonal are exactly 1 (arc-cosines there are exact, not round-off of ``arccos(1 - ε)``).

        ``inplace=True`` writes the diagonal into ``nngp`` itself (only for a freshly computed ``nngp`` that
        nothing else references)."""
        if not self.x1_is_x2 or self.nngp is None:
            return self
        assert self.cov1 is not None, "an x1_is_x2 Kernel carries cov1"
        src = self.cov1.movedim(0, -1)  # the batch diagonal comes last in both forms below
        if inplace and not self.nngp.requires_grad:
            torch.diagonal(self.nngp, 0, 0, 1).copy_(src)
            return self
        return self.replace(nngp=torch.diagonal_scatter(self.nngp, src, 0, 0, 1))

    def self_variances(self, which: int = 1) -> tuple[Tensor, Tensor]:
        """``(q_a, q_b)`` broadcast against ``cov1`` (which=1) or ``cov2`` (which=2)."""
        cov = self.cov1 if which == 1 else self.cov2
        assert cov is not None
        d = self._cov_diag(cov)
        return self._outer_view(d, 0, False), self._outer_view(d, 1, False)


def swap_pair(t: Tensor, k: Kernel) -> Tensor:
    """The kernel block of (x2, x1) from that of (x1, x2): swap the batch axes, and each (s, s') pair of a
    full spatial layout."""
    perm = [1, 0]
    if not k.diagonal_spatial and k.spatial_ndim:
        for a in range(k.spatial_ndim):
            perm += [3 + 2 * a, 2 + 2 * a]
    else:
        perm += list(range(2, t.dim()))
    return t.permute(perm)


# ---------------------------------------------------------------------------------------------------
# which kernels to return
# ---------------------------------------------------------------------------------------------------
def normalize_get(
    get: Union[str, Sequence[str], None], allowed: Sequence[str] = GETS, default: Optional[Sequence[str]] = None
) -> tuple[tuple[str, ...], bool]:
    """The one normalisation of ``get`` arguments: ``(names, single)``.

    ``None`` means ``default`` (else every name in ``allowed``); a string is one name and ``single`` asks for a
    bare tensor back; a sequence is a tuple of distinct names. Names are case-insensitive (``"NTK"`` is
    ``"ntk"``). One error lists the choices.
    """
    if get is None:
        return tuple(default if default is not None else allowed), False
    single = isinstance(get, str)
    raw: tuple[Any, ...] = (get,) if isinstance(get, str) else tuple(get)
    names: tuple[str, ...] = tuple(g.lower() if isinstance(g, str) else g for g in raw)
    bad = [g for g in names if g not in allowed]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"get={get!r}: choose distinct names from {tuple(allowed)} (a name or a tuple of names).")
    return names, single


#: former name of :func:`normalize_get`
check_get = normalize_get


# ---------------------------------------------------------------------------------------------------
# inputs -> Kernel
# ---------------------------------------------------------------------------------------------------
def _gram(a: Tensor, b: Tensor, diagonal_spatial: bool) -> Tensor:
    """Channel-averaged products: ``sum_c a[i,c,..] b[j,c,..] / C`` in the Kernel layout."""
    c = a.shape[1]
    sp = a.dim() - 2
    if sp == 0:
        return (a @ b.T).div_(c)
    if diagonal_spatial:
        # (N1, C, P) x (N2, C, P) -> (N1, N2, P), batched over pixels as a matmul
        a2, b2 = a.reshape(a.shape[0], c, -1), b.reshape(b.shape[0], c, -1)
        out = torch.einsum("icp,jcp->ijp", a2, b2) / c
        return out.reshape((a.shape[0], b.shape[0]) + tuple(a.shape[2:]))
    # full: (N1, N2, s1, s1', s2, s2', ...)
    letters = "abcdefgh"[:sp]
    primes = "pqrstuvw"[:sp]
    pair = "".join(l + p for l, p in zip(letters, primes))
    eq = f"iz{letters},jz{primes}->ij{pair}"
    # 1/√C on the (small) inputs instead of / C over every pixel pair: one pass fewer over the largest tensor
    a_s, b_s = _scaled_pair(a, b, c)
    return torch.einsum(eq, a_s, b_s)


def _scaled_pair(a: Tensor, b: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """``(a/√c, b/√c)``, the same tensor twice when ``b is a`` (so that a Gram matrix stays exactly symmetric)."""
    if c == 1:
        return a, b
    r = 1.0 / math.sqrt(c)
    a_s = a * r
    return a_s, (a_s if b is a else b * r)


def _self_cov(a: Tensor, diagonal_spatial: bool) -> Tensor:
    c = a.shape[1]
    sp = a.dim() - 2
    if sp == 0 or diagonal_spatial:
        return (a * a).sum(1) / c
    letters = "abcdefgh"[:sp]
    primes = "pqrstuvw"[:sp]
    pair = "".join(l + p for l, p in zip(letters, primes))
    a_s, _ = _scaled_pair(a, a, c)
    return torch.einsum(f"iz{letters},iz{primes}->i{pair}", a_s, a_s)


def kernel_from_inputs(
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    diagonal_spatial: bool = True,
    compute_ntk: bool = True,
    pair_only: bool = False,
    mask1: Optional[Tensor] = None,
    mask2: Optional[Tensor] = None,
) -> Kernel:
    """Input covariances (channel-averaged inner products, as NT) of validated inputs.

    ``nngp = x1 x2^T / C``; ``cov1 = |x1|^2 / C``; ``ntk = 0`` (inputs have no parameters).
    For ``x2 = None`` the Gram matrix is symmetrised and ``cov1`` is its diagonal, bit for bit.
    ``pair_only`` (needs ``x2``): a pair-only record with the same-pixel variances in ``var1``/``var2``.
    ``mask1``/``mask2``: the inputs' masks (``x1 == mask_constant``, entries already zeroed in ``x1``), kept on the
    record (:attr:`Kernel.mask1`).
    """
    diagonal_spatial = diagonal_spatial or x1.dim() == 2
    if pair_only and x2 is None:
        raise ValueError("kernel_from_inputs(pair_only=True) needs x2 (the tiler's off-diagonal tiles).")
    var1: Optional[Tensor] = None
    var2: Optional[Tensor] = None
    cov1: Optional[Tensor]
    cov2: Optional[Tensor]
    if x2 is None:
        g = _gram(x1, x1, diagonal_spatial)
        if x1.dim() == 2:
            # gemm need not return an exactly symmetric product; (g + gᵀ)/2 is (addition commutes)
            g = g.add_(g.T.contiguous()).mul_(0.5)
        cov1 = torch.diagonal(g, 0, 0, 1).movedim(-1, 0).clone()
        cov2 = None
    else:
        g = _gram(x1, x2, diagonal_spatial)
        if pair_only:
            cov1 = cov2 = None
            var1, var2 = _self_cov(x1, True), _self_cov(x2, True)
        else:
            cov1 = _self_cov(x1, diagonal_spatial)
            cov2 = _self_cov(x2, diagonal_spatial)
    # the inputs' NTK is 0: a broadcast view of one zero (every Dense/Conv ignores it, other layers only read it)
    ntk = g.new_zeros(()).expand(g.shape) if compute_ntk else None
    # the inputs are deterministic: their "mean" is themselves; averaged over channels (which differ)
    mean1 = x1.mean(1)
    mean2 = None if x2 is None else x2.mean(1)
    return Kernel(
        nngp=g,
        ntk=ntk,
        cov1=cov1,
        cov2=cov2,
        shape1=tuple(x1.shape),
        shape2=tuple((x1 if x2 is None else x2).shape),
        diagonal_spatial=diagonal_spatial,
        x1_is_x2=x2 is None,
        is_gaussian=False,
        is_input=True,
        var1=var1,
        var2=var2,
        mean1=mean1,
        mean2=mean2,
        mean_kind="exact" if x1.shape[1] == 1 else "varying",
        mask1=mask1,
        mask2=None if x2 is None else mask2,
    )


def map_kernels(
    k: Kernel, fn: Callable[[Tensor], Tensor], *, ntk_fn: Optional[Callable[[Tensor], Tensor]] = None, **changes: Any
) -> Kernel:
    """Apply ``fn`` to nngp, cov1 and cov2 (and ``ntk_fn`` to ntk, if given); a small helper for
    affine layers whose rule is the same map on every covariance."""
    nngp = None if k.nngp is None else fn(k.nngp)
    out = dict(nngp=nngp, cov1=None if k.cov1 is None else fn(k.cov1), cov2=None if k.cov2 is None else fn(k.cov2))
    if ntk_fn is not None and k.ntk is not None:
        out["ntk"] = ntk_fn(k.ntk)
    out.update(changes)
    return k.replace(**out)
