"""Layer rules on Gram matrices: the kernel map ``K(G)`` of one layer, read off ntkit's own layer rules.

A Gram matrix ``G`` (``n x n``, over any set of "points" — inputs, or (time, input) pairs for the DMFT's
two-time kernels) is wrapped in a :class:`~ntkit.kernel.Kernel` record (``nngp = G``, ``cov1 = diag G``,
Gaussian activations) and passed through the layer's ``kernel`` rule, so that every elementwise nonlinearity
ntkit knows (closed forms or quadrature) and every Dense layer's ``W_std``/``b_std`` work here unchanged:

* ``Dense``:            ``K(G) = W_std² G + b_std²``
* elementwise ``φ``:    ``K(G)_ij = E[φ(u_i) φ(u_j)]``,  ``K̇(G)_ij = E[φ'(u_i) φ'(u_j)]``,  ``u ~ N(0, G)``

(``K̇`` is read from the record's NTK slot: the rule returns ``Θ·K̇``, so ``Θ = 1`` gives ``K̇``.) The maps are
differentiable in ``G`` (deep kernel machines optimise through them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ntkit.kernel import Kernel
from ntkit.layers.dense import Dense
from ntkit.layers.elementwise import ElementwiseLayer

__all__ = ["gram_record", "affine_map", "nonlinear_map", "blockwise_map"]


def gram_record(G: Tensor, dot: Optional[Tensor] = None) -> Kernel:
    """A Kernel record for the Gram matrix ``G`` of Gaussian activations (``ntk = dot``, may be ``None``)."""
    n = G.shape[0]
    return Kernel(
        nngp=G,
        ntk=dot,
        cov1=torch.diagonal(G).clone(),
        cov2=None,
        shape1=(n, 1),
        shape2=(n, 1),
        diagonal_spatial=True,
        x1_is_x2=True,
        is_gaussian=True,
        is_input=False,
    )


def affine_map(dense: Dense, G: Tensor) -> Tensor:
    """``W_std² G + b_std²`` by the Dense layer's own rule."""
    out = dense.kernel(gram_record(G)).nngp
    assert isinstance(out, Tensor)
    return out


def nonlinear_map(phi: ElementwiseLayer, G: Tensor, need_dot: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``(E[φ(u)φ(u)ᵀ], E[φ'(u)φ'(u)ᵀ] or None)`` for ``u ~ N(0, G)``, by the layer's rule (exact diagonal)."""
    out = phi.kernel(gram_record(G, torch.ones_like(G) if need_dot else None))
    assert isinstance(out.nngp, Tensor)
    return out.nngp, out.ntk


def blockwise_map(
    phi: ElementwiseLayer, G: Tensor, need_dot: bool = False, block_entries: int = 1 << 21
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`nonlinear_map` of a large Gram matrix in blocks of rows, each a non-square record (its rows'
    variances in ``cov1``, all variances in ``cov2``): quadrature rules hold ``deg²`` values per entry."""
    n = G.shape[0]
    rows = max(1, block_entries // max(n, 1))
    if rows >= n:
        return nonlinear_map(phi, G, need_dot)
    d = torch.diagonal(G)
    ks, ds = [], []
    for a in range(0, n, rows):
        b = min(n, a + rows)
        rec = Kernel(
            nngp=G[a:b],
            ntk=torch.ones_like(G[a:b]) if need_dot else None,
            cov1=d[a:b].clone(),
            cov2=d.clone(),
            shape1=(b - a, 1),
            shape2=(n, 1),
            diagonal_spatial=True,
            x1_is_x2=False,
            is_gaussian=True,
            is_input=False,
        )
        out = phi.kernel(rec)
        assert isinstance(out.nngp, Tensor)
        ks.append(out.nngp)
        if need_dot:
            assert isinstance(out.ntk, Tensor)
            ds.append(out.ntk)
    k = torch.cat(ks)
    k = (k + k.T) / 2
    if not need_dot:
        return k, None
    dot = torch.cat(ds)
    return k, (dot + dot.T) / 2
