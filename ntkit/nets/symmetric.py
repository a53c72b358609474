"""Symmetric kernels of entrywise nets on the blocks of their upper triangle.

For a serial stack of ``Dense``, ``Identity`` and elementwise layers on vectors, every layer's rule maps each
kernel entry ``(q12, q11, q22)`` on its own. For ``x2 = None`` the kernel is symmetric, so the rules need only
run on the upper triangle. :func:`blocked_symmetric` cuts the samples into ``B`` groups of ``s``, takes the
``B(B+1)/2`` group pairs ``I ≤ J`` as one batch, and runs the layers once on it. That is
``(B+1)/(2B)`` of the full matrix's entries (0.55 for ``B = 10``), in one pass per rule.

The batch is an ordinary record (:class:`~ntkit.kernel.Kernel`) in the ``diagonal_spatial`` layout
``(s, s, B(B+1)/2)``: its "pixel" axis runs over the group pairs, ``cov1[r, b]`` is the variance of row ``r``
of group ``I_b`` and ``cov2[c, b]`` that of column ``c`` of group ``J_b``. So the rules see broadcast variances
as on their fast path, and every layer updates the variances itself (``B(B+1)`` copies of ``s`` numbers,
negligible). The input Gram matrix is the full one (a single GEMM, as for the full matrix), cut into the group
pairs. After each nonlinearity the diagonal of every pair ``(I, I)`` is set to the samples' own variances, as
:meth:`~ntkit.kernel.Kernel.with_exact_diagonal` does on the full matrix. At the end the blocks are written into
both triangles. The result agrees with the full evaluation to round-off (tested to 1e-14); it is exactly
symmetric, and ``cov1`` and the diagonal are the full evaluation's bit for bit.

Measured in-process (``serial(Dense(512), Relu()) x 3 + Dense(1)``, NNGP and NTK, 2 threads, blocked over
full evaluation, median of paired ratios; a script outside the repository): 0.61–0.68 for 500–512 samples of
dimension 16, 0.71 for 300, 0.81 for 256. The kernel of 2000 samples of dimension 784 (``benchmarks/fc.py``,
tiles of 512) gains only 0.96–0.985: its 512 × 784 Gram products are a large share of each tile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ntkit.kernel import Kernel, _gram, kernel_from_inputs
from ntkit.layers.base import Layer
from ntkit.layers.dense import Dense, Identity
from ntkit.layers.elementwise import ElementwiseLayer
from ntkit.nets.tiler import apply_layer

__all__ = ["BLOCKED_MIN_N", "BLOCK_SIZE", "entrywise_leaves", "symmetric_blocks", "blocked_symmetric"]

#: fewest samples for which ``kernel_fn(x, None)`` of an entrywise net runs on blocks of the upper triangle;
#: below it the fixed cost of cutting the blocks and assembling them outweighs the saving
BLOCKED_MIN_N = 256

#: samples per group of :func:`blocked_symmetric` (about ``n / BLOCK_SIZE`` groups: :func:`symmetric_blocks`)
BLOCK_SIZE = 50


def entrywise_leaves(leaves: Optional[Sequence[Layer]]) -> bool:
    """Whether every layer maps each kernel entry on its own: ``Dense``, ``Identity`` and elementwise layers
    that keep the base class's kernel rule."""
    if not leaves:
        return False
    for layer in leaves:
        if type(layer) in (Dense, Identity):
            continue
        if isinstance(layer, ElementwiseLayer) and type(layer).kernel is ElementwiseLayer.kernel:
            continue
        return False
    return True


def symmetric_blocks(n: int) -> Optional[int]:
    """The number of groups ``B`` for ``n`` samples (``s = ⌈n/B⌉`` each), or ``None`` below
    :data:`BLOCKED_MIN_N`."""
    if n < BLOCKED_MIN_N:
        return None
    # a divisor of n near n / BLOCK_SIZE when there is one (groups of 32 to 80: no padded samples), else that
    # many groups and the last one padded
    best = max(2, round(n / BLOCK_SIZE))
    exact = [b for b in range(max(2, -(-n // 80)), n // 32 + 1) if n % b == 0]
    return min(exact, key=lambda b: (abs(b - n / BLOCK_SIZE), b)) if exact else best


def blocked_symmetric(leaves: Sequence[Layer], x: Tensor, compute_ntk: bool, blocks: int) -> Kernel:
    """The kernel record of the serial net ``leaves`` on ``(x, None)``, evaluated on the blocks of the upper
    triangle (module docstring). ``x``: validated 2-D inputs."""
    n, width = x.shape
    s = -(-n // blocks)
    npad = s * blocks
    xp = x if npad == n else torch.cat([x, x[-1:].expand(npad - n, -1)])
    rows, cols, on_diag = _pairs(blocks, x.device)
    nb = rows.numel()
    # the input Gram matrix x xᵀ / C as kernel_from_inputs computes it (one GEMM: a batched product of the group
    # pairs alone was 5× slower at C = 784), its group pairs (nb, s, s), those of a group against itself
    # symmetrised as kernel_from_inputs symmetrises the whole matrix
    gram = _gram(xp, xp, True).view(blocks, s, blocks, s)[rows, :, cols, :]
    own = gram[on_diag]
    gram[on_diag] = own.add_(own.transpose(1, 2).contiguous()).mul_(0.5)
    var = torch.diagonal(own, 0, 1, 2)  # (B, s): the samples' own variances
    base = kernel_from_inputs(xp[:1], xp[:1], compute_ntk=False)  # the input record's flags

    def sides(v: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample values ``(B, s)`` -> those of the rows and of the columns of every group pair, ``(s, nb)``."""
        return v[rows].T, v[cols].T

    cov1, cov2 = sides(var)
    q12 = gram.permute(1, 2, 0)  # (s, s, nb), a view of the (nb, s, s) tensor
    k = Kernel(
        nngp=q12,
        ntk=q12.new_zeros(()).expand(q12.shape) if compute_ntk else None,
        cov1=cov1,
        cov2=cov2,
        shape1=(s, width, nb),
        shape2=(s, width, nb),
        diagonal_spatial=True,
        is_gaussian=base.is_gaussian,
        is_input=True,
        mean_kind=base.mean_kind,
        fresh=base.fresh,
    )
    for layer in leaves:
        out = apply_layer(layer, k)
        assert isinstance(out, Kernel), "an entrywise layer returns one record"
        if isinstance(layer, ElementwiseLayer) and out.nngp is not None and out.cov1 is not None:
            # the groups against themselves: their diagonal is the samples' own variances, bit for bit
            out = out.replace(nngp=_exact_diagonal(out.nngp, out.cov1[:, on_diag].T, on_diag))
        k = out

    def assemble(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.permute(2, 0, 1)  # (nb, s, s)
        out = t.new_empty(npad, npad)
        grid = out.view(blocks, s, blocks, s)
        grid[rows, :, cols, :] = t
        grid[cols, :, rows, :] = t.transpose(1, 2)
        return out if npad == n else out[:n, :n].contiguous()

    assert k.cov1 is not None, "the blocks' record carries the rows' variances"
    shape = (n,) + tuple(k.shape1[1:2])
    res = k.replace(
        nngp=assemble(k.nngp),
        ntk=assemble(k.ntk),
        cov1=k.cov1[:, on_diag].T.reshape(npad)[:n],
        cov2=None,
        shape1=shape,
        shape2=shape,
        diagonal_spatial=True,
        x1_is_x2=True,
        mean1=None if k.mean1 is None else k.mean1[:, on_diag].T.reshape(npad)[:n],
        mean2=None,
        law=None,
    )
    return res.with_exact_diagonal(inplace=res.nngp is not None and not res.nngp.requires_grad)


@functools.lru_cache(maxsize=64)
def _pairs(blocks: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The group pairs ``I ≤ J`` (rows, cols) and the positions of the pairs ``(I, I)``, in the order of ``I``
    (index tensors only; cached per ``B`` and device)."""
    rows, cols = torch.triu_indices(blocks, blocks, device=device)
    return rows, cols, torch.nonzero(rows == cols).flatten()


def _exact_diagonal(t: Tensor, v: Tensor, on_diag: Tensor) -> Tensor:
    """``t`` ``(s, s, nb)`` with the diagonal of each group pair ``(I, I)`` (``on_diag[I]``) set to ``v[I]``
    (``v``: ``(B, s)``): in place into a fresh ``(nb, s, s)``-ordered tensor, else out of place."""
    s = t.shape[0]
    phys = t.permute(2, 0, 1)
    eye = torch.arange(s, device=t.device)
    if phys.is_contiguous() and not t.requires_grad:
        flat = (on_diag[:, None] * (s * s) + eye * (s + 1)).flatten()
        phys.view(-1).index_copy_(0, flat, v.flatten().to(t.dtype))
        return t
    phys = phys.index_put((on_diag[:, None], eye, eye), v.to(t.dtype))
    return phys.permute(1, 2, 0)
