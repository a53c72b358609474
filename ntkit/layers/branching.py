"""Branching: ``FanOut`` splits one path into several, ``FanIn*`` layers merge them.

Kernel rules, for branches that are independent given their inputs (every branch but at most one has its own
Dense/Conv after the ``FanOut``, so that channel ``c`` of one branch is asymptotically independent of channel
``c`` of the others; checked, see below), with ``μ_i(x) = E[z_i,c(x)]`` the branch means:

* ``FanInSum``:    ``K = Σ K_i + Σ_{i≠j} μ_i(x) μ_j(x')``,   ``Θ = Σ Θ_i``
* ``FanInConcat`` (channel axis): ``K = Σ n_i K_i / Σ n_i``, same for ``Θ`` (``n_i`` the branch widths)
* ``FanInProd``:   ``K = Π K_i``,   ``Θ = Σ_i Θ_i Π_{j≠i} K_j``   (product rule; output is not Gaussian)

The sum's cross terms ``E[z_i(x)] E[z_j(x')]`` vanish when a branch is zero-mean — any Gaussian branch (a
Dense/Conv output), so the common residual block ``x + f(x)`` with a Gaussian ``x`` or a ``f`` ending in a
Dense/Conv needs none — but not for two nonlinearity outputs (two ReLU branches: 24 % off their Monte Carlo
without them; NT refuses non-Gaussian sums). The records carry the means (``Kernel.mean1/mean2``), computed
exactly by every nonlinearity (``mean_fn``) and mapped by every linear layer; a cross term of two branches whose
means differ from channel to channel (raw inputs, a concatenation, a Flatten), or of a branch whose means are
unknown, is refused with an error.

The product and the concatenation need no means: ``E[u u' v v'] = E[u u'] E[v v']`` for independent ``u, v``,
and a concatenation only averages per-channel second moments (exact even for dependent branches).

Independence (``Kernel.fresh``): branches with no parametric layer of their own since the ``FanOut`` are the
same function of the same activations (``parallel(Relu(), Gelu())`` multiplies ``relu(h)`` by ``gelu(h)``);
``FanInSum`` and ``FanInProd`` refuse two or more of them, instead of returning the kernel of independent
branches.
"""

from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError

__all__ = ["FanOut", "FanInSum", "FanInConcat", "FanInProd"]


def _branches(k, layer: Layer) -> list:
    if not isinstance(k, list):
        raise LayerError(
            f"{type(layer).__name__} merges branches but got a single path; put FanOut(n) and parallel(...) before it."
        )
    return k


def _same_shapes(shapes: list, layer: Layer, skip_axis=None) -> None:
    def strip(s):
        return tuple(x for i, x in enumerate(s) if i != skip_axis)

    if len({strip(s) for s in shapes}) != 1:
        raise LayerError(
            f"{type(layer).__name__}: branch output shapes {shapes} differ"
            + ("" if skip_axis is None else " outside the concatenation axis")
            + "; make every branch end with the same shape."
        )


def _check_independent(ks: list[Kernel], layer: Layer) -> None:
    """At most one branch without a parametric layer of its own since the FanOut (see the module docstring)."""
    stale = [i for i, x in enumerate(ks) if x.fresh and not x.fresh[-1]]
    if len(stale) > 1:
        name = type(layer).__name__
        raise LayerError(
            f"{name}: branches {stale} have no Dense/Conv of their own since the FanOut, so they are functions of "
            f"the same activations — correlated, not independent — and the {name} rule (which assumes independent "
            f"branches) would give a wrong kernel. Give every branch but one its own Dense or Conv (one "
            f"parameter-free branch, e.g. an Identity skip connection, is fine), or merge those branches into one "
            f"path (e.g. Elementwise(lambda x: f(x) {'+' if name == 'FanInSum' else '*'} g(x)))."
        )


def _merged_fresh(ks: list[Kernel]) -> tuple[bool, ...]:
    """The merged path is fresh w.r.t. an outer FanOut iff every branch is."""
    n = len(ks[0].fresh)
    if n == 0 or any(len(x.fresh) != n for x in ks):
        return ks[0].fresh
    return tuple(all(x.fresh[i] for x in ks) for i in range(n - 1))


def _mean_state(x: Kernel) -> str:
    """``"zero"``, ``"exact"`` (the same mean in every channel), ``"varying"`` or ``"unknown"``."""
    if x.is_gaussian:
        return "zero"
    if x.mean_kind == "unknown":
        return "unknown"
    return "zero" if x.mean1 is None else x.mean_kind


def _sum_law(ks: list[Kernel]):
    """The residual-stream program of a sum (``Kernel.law``): one non-Gaussian branch with a law plus Gaussian
    branches (independent of it: checked by :func:`_check_independent`); ``None`` for any other sum."""
    other = [x for x in ks if not x.is_gaussian]
    if len(other) != 1 or other[0].law is None:
        return None
    law = other[0].law
    for x in ks:
        if x.is_gaussian:
            law = law.plus_gauss(x)
    return law


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else (a if b is None else a + b)


class _FanOutModule(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return tuple(x for _ in range(self.n))

    def extra_repr(self):
        return str(self.n)


class FanOut(Layer):
    """Copy the input into ``n`` branches (to be followed by ``parallel`` of ``n`` layers)."""

    tracks_means = True
    carries_law = True

    def __init__(self, n: int):
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"FanOut(n={n!r}): n must be a positive int.")
        self.n = n

    def kernel(self, k):
        if isinstance(k, list):
            raise LayerError("FanOut got several branches already; merge them with a FanIn layer first.")
        return [k.replace(fresh=k.fresh + (False,))] * self.n

    def build(self, in_shape, width, generator, readout):
        return _FanOutModule(self.n), [in_shape] * self.n


class _FanInModule(nn.Module):
    def __init__(self, mode: str, axis: int = 1):
        super().__init__()
        self.mode, self.axis = mode, axis

    def forward(self, xs):
        if self.mode == "sum":
            return functools.reduce(operator.add, xs)
        if self.mode == "prod":
            return functools.reduce(operator.mul, xs)
        return torch.cat(tuple(xs), dim=self.axis)

    def extra_repr(self):
        return self.mode


class FanInSum(Layer):
    """Sum the branches (residual connections: ``serial(FanOut(2), parallel(block, Identity()), FanInSum())``).

    ``K = Σ K_i + Σ_{i≠j} μ_i(x) μ_j(x')`` and ``Θ = Σ Θ_i`` (module docstring); exact for independent
    branches whatever their means.

    A sum of one nonlinearity output (a record with a ``law``) and independent Gaussian branches keeps that
    program, the Gaussian branches appended (:mod:`ntkit.layers.residual_law`): a nonlinearity applied to the
    sum (a post-activation residual block) needs it."""

    tracks_means = True
    carries_law = True

    def kernel(self, k):
        ks = _branches(k, self)
        _same_shapes([x.shape1 for x in ks], self)
        _check_independent(ks, self)
        first = ks[0]

        def total(name):
            vals = [getattr(x, name) for x in ks]
            return None if any(v is None for v in vals) else functools.reduce(operator.add, vals)

        nngp, cov1, cov2 = total("nngp"), total("cov1"), total("cov2")
        live = [(i, x) for i, x in enumerate(ks) if _mean_state(x) != "zero"]
        for a, (i, xi) in enumerate(live):
            for j, xj in live[a + 1 :]:
                self._check_cross(i, xi, j, xj)
                (a1, a2), (b1, b2) = xi.means(), xj.means()
                assert a1 is not None and a2 is not None and b1 is not None and b2 is not None
                # each pair's two cross terms summed first: exactly symmetric under (x, x') -> (x', x)
                if nngp is not None:
                    nngp = nngp + (first.outer_means(a1, b2) + first.outer_means(b1, a2))
                if cov1 is not None:
                    cov1 = cov1 + (first.outer_means(a1, b1, 1) + first.outer_means(b1, a1, 1))
                if cov2 is not None:
                    cov2 = cov2 + (first.outer_means(a2, b2, 2) + first.outer_means(b2, a2, 2))
        mean1 = mean2 = None
        for _, x in live:
            mean1 = _add(mean1, x.mean1)
            mean2 = None if first.x1_is_x2 else _add(mean2, x.mean2)
        states = {_mean_state(x) for _, x in live}
        kind = "unknown" if "unknown" in states else ("varying" if "varying" in states else "exact")
        out = first.replace(
            nngp=nngp,
            ntk=total("ntk"),
            cov1=cov1,
            cov2=cov2,
            is_gaussian=all(x.is_gaussian for x in ks),
            is_input=all(x.is_input for x in ks),
            mean1=mean1,
            mean2=mean2,
            mean_kind=kind,
            fresh=_merged_fresh(ks),
            law=_sum_law(ks),
        )
        return out.with_exact_diagonal(inplace=True) if len(live) > 1 else out

    def _check_cross(self, i: int, xi: Kernel, j: int, xj: Kernel) -> None:
        si, sj = _mean_state(xi), _mean_state(xj)
        if "unknown" in (si, sj):
            b = i if si == "unknown" else j
            raise LayerError(
                f"FanInSum: branch {b} is not Gaussian and its mean is unknown (a layer that does not track "
                f"means produced it), but the sum's cross terms E[u]E[v'] need it (branch {j if b == i else i} "
                f"has a non-zero mean). End one of the two branches with a Dense or Conv (zero-mean outputs)."
            )
        if si == sj == "varying":
            raise LayerError(
                f"FanInSum: branches {i} and {j} both have means that differ from channel to channel (raw inputs, "
                f"a concatenation or a Flatten), so the cross terms Σ_c E[u_c]E[v_c'] need them channel by channel. "
                f"End one of the two branches with a Dense or Conv (zero-mean outputs)."
            )

    def build(self, in_shape, width, generator, readout):
        shapes = _branches(in_shape, self)
        _same_shapes(shapes, self)
        return _FanInModule("sum"), shapes[0]


class FanInProd(Layer):
    """Elementwise product of the branches. See module docstring for the rule; the output is not Gaussian."""

    tracks_means = True

    def kernel(self, k):
        ks = _branches(k, self)
        _same_shapes([x.shape1 for x in ks], self)
        _check_independent(ks, self)
        first = ks[0]

        def prod(vals):
            return functools.reduce(operator.mul, vals)

        ntk = None
        if all(x.ntk is not None for x in ks):
            ntk = sum(
                ks[i].ntk * prod([ks[j].nngp for j in range(len(ks)) if j != i]) if len(ks) > 1 else ks[i].ntk
                for i in range(len(ks))
            )
        cov1 = None if first.cov1 is None else prod([x.cov1 for x in ks])
        cov2 = None if first.cov2 is None else prod([x.cov2 for x in ks])
        # E[Π z_i] = Π μ_i (independent branches): zero if a branch is; channel by channel if more than one varies
        states = [_mean_state(x) for x in ks]
        mean1 = mean2 = None
        kind = "exact"
        if "zero" not in states:
            mean1 = prod([x.means()[0] for x in ks])
            mean2 = None if first.x1_is_x2 else prod([x.means()[1] for x in ks])
            n_varying = states.count("varying")
            kind = "unknown" if ("unknown" in states or n_varying > 1) else ("varying" if n_varying else "exact")
        return first.replace(
            nngp=prod([x.nngp for x in ks]),
            ntk=ntk,
            cov1=cov1,
            cov2=cov2,
            is_gaussian=False,
            is_input=False,
            mean1=mean1,
            mean2=mean2,
            mean_kind=kind,
            fresh=_merged_fresh(ks),
        )

    def build(self, in_shape, width, generator, readout):
        shapes = _branches(in_shape, self)
        _same_shapes(shapes, self)
        return _FanInModule("prod"), shapes[0]


class FanInConcat(Layer):
    """Concatenate the branches along ``axis`` of ``(N, C, *spatial)`` activations (default: the channel axis 1;
    ``-1`` is the channel axis of fully-connected inputs ``(N, features)`` and the last spatial axis otherwise).

    Channels (``axis=1``): the result is the width-weighted mean of the branch kernels,
    ``K = Σ_b C_b K_b / Σ_b C_b``; not Gaussian (the channels of different branches have different laws), so a
    Dense/Conv must follow before a nonlinearity.

    A spatial axis (NT's rule): the branches must be zero-mean Gaussian (each ending with a Dense/Conv) and
    independent; their pixels are laid side by side, so a same-pixel kernel is the concatenation of the branches'
    (``K[y] = K_b[y − o_b]`` for ``y`` in branch ``b``'s block, offset ``o_b``), and a full pixel-pixel kernel is
    block-diagonal: ``K[y, y'] = K_b[y − o_b, y' − o_b]`` when both pixels lie in branch ``b``'s block and ``0``
    between blocks (independent branches are uncorrelated). The output is Gaussian. The branches may have
    different sizes along the axis; every other axis (channels too) must agree.
    """

    tracks_means = True

    def __init__(self, axis: int = 1):
        self.axis = axis

    def _concat_axis(self, ndim: int) -> int:
        """The concatenation axis of ``ndim``-D activations (1: channels, >= 2: spatial)."""
        if not -ndim <= self.axis < ndim:
            raise LayerError(f"FanInConcat(axis={self.axis}) is out of range for {ndim}-D activations.")
        ax = self.axis % ndim
        if ax == 0:
            raise LayerError("FanInConcat(axis=0) would concatenate along the batch axis; use axis=1 (channels).")
        return ax

    def kernel(self, k):
        ks = _branches(k, self)
        ax = self._concat_axis(len(ks[0].shape1))
        _same_shapes([x.shape1 for x in ks], self, skip_axis=ax)
        if ax >= 2:
            return self._spatial_kernel(ks, ax)
        widths = [x.width for x in ks]
        total_w = float(sum(widths))

        def mix(name):
            vals = [getattr(x, name) for x in ks]
            if any(v is None for v in vals):
                return None
            return functools.reduce(operator.add, [(w / total_w) * v for w, v in zip(widths, vals)])

        first = ks[0]
        # the channels of each branch keep their means: the record's is their width-weighted average
        live = [(w, x) for w, x in zip(widths, ks) if _mean_state(x) != "zero"]
        mean1 = mean2 = None
        for w, x in live:
            m1, m2 = x.means()
            mean1 = _add(mean1, (w / total_w) * m1)
            mean2 = None if first.x1_is_x2 else _add(mean2, (w / total_w) * m2)
        kind = "unknown" if any(_mean_state(x) == "unknown" for _, x in live) else ("varying" if live else "exact")
        shape1 = (first.shape1[0], int(total_w)) + tuple(first.shape1[2:])
        shape2 = (first.shape2[0], int(total_w)) + tuple(first.shape2[2:])
        return first.replace(
            nngp=mix("nngp"),
            ntk=mix("ntk"),
            cov1=mix("cov1"),
            cov2=mix("cov2"),
            shape1=shape1,
            shape2=shape2,
            # channels of different branches have different laws: a nonlinearity of the
            # mixture is not the mixture of nonlinearities, so a Dense/Conv must come next
            is_gaussian=False,
            is_input=all(x.is_input for x in ks),
            mean1=mean1,
            mean2=mean2,
            mean_kind=kind,
            fresh=_merged_fresh(ks),
        )

    def _spatial_kernel(self, ks: list[Kernel], ax: int) -> Kernel:
        """Concatenation along spatial axis ``ax`` (class docstring): same-pixel layouts concatenate, full ones
        are block-diagonal."""
        if not all(x.is_gaussian for x in ks):
            raise LayerError(
                f"FanInConcat(axis={self.axis}) along a spatial axis needs zero-mean Gaussian branches (as NT): end "
                f"every branch with a Dense or Conv layer (a nonlinearity's output has a mean and another law)."
            )
        first = ks[0]
        if len({x.diagonal_spatial for x in ks}) != 1:
            raise LayerError(f"FanInConcat(axis={self.axis}): the branches track different pixel covariances.")
        if not first.diagonal_spatial:
            _check_independent(ks, self)  # the blocks between branches are zero only for independent branches
        a = ax - 2

        def cat(name: str, nd: int) -> Optional[Tensor]:
            vals = [getattr(x, name) for x in ks]
            if any(v is None for v in vals):
                return None
            if first.diagonal_spatial or name in ("var1", "var2"):
                return torch.cat(vals, nd + a)
            return _block_diagonal(vals, nd + 2 * a)

        shape1, shape2 = list(first.shape1), list(first.shape2)
        shape1[ax] = sum(x.shape1[ax] for x in ks)
        shape2[ax] = sum(x.shape2[ax] for x in ks)
        out = first.replace(
            nngp=cat("nngp", 2),
            ntk=cat("ntk", 2),
            cov1=cat("cov1", 1),
            cov2=cat("cov2", 1),
            var1=cat("var1", 1),
            var2=cat("var2", 1),
            shape1=tuple(shape1),
            shape2=tuple(shape2),
            is_gaussian=True,
            is_input=False,
            mean1=None,
            mean2=None,
            mean_kind="exact",
            fresh=_merged_fresh(ks),
        )
        return out.with_exact_diagonal()

    def build(self, in_shape, width, generator, readout):
        shapes = _branches(in_shape, self)
        ax = self._concat_axis(len(shapes[0]) + 1)
        _same_shapes(shapes, self, skip_axis=ax - 1)
        out = list(shapes[0])
        out[ax - 1] = sum(s[ax - 1] for s in shapes)
        return _FanInModule("concat", ax), tuple(out)


def _block_diagonal(mats: list[Tensor], d: int) -> Tensor:
    """Block-diagonal concatenation along the axis pair ``(d, d + 1)`` (the two sides of one spatial axis of a
    full pixel-pixel kernel): block ``b`` is ``mats[b]``, zero between blocks."""
    sizes = [m.shape[d] for m in mats]
    shape = list(mats[0].shape)
    shape[d] = shape[d + 1] = sum(sizes)
    out = mats[0].new_zeros(shape)
    off = 0
    for m, n in zip(mats, sizes):
        out.narrow(d, off, n).narrow(d + 1, off, n).copy_(m)
        off += n
    return out
