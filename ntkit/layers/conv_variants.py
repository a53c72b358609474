"""Convolution variants of NT's ``stax``: the transposed convolution ``ConvTranspose`` and the locally connected
(unshared-weight) convolution ``ConvLocal``, in 1-D to 3-D (PyTorch layouts NCW / NCHW / NCDHW).

Both follow NT 0.6.5 (``neural_tangents/_src/stax/linear.py``: ``ConvTranspose``, ``ConvLocal`` and ``_Conv``)
and the convolution kernels of Novak et al. 2019 ("Bayesian deep CNNs with many channels are Gaussian
processes", which also treats locally connected networks). Fan-in is ``C·|F|`` (input channels times filter
pixels) for both, as in NT.

**ConvTranspose** (``lax.conv_transpose`` semantics, filter not flipped). Along one spatial axis of ``n`` pixels,
filter size ``f`` and stride ``σ``, tap ``t`` of the filter maps input pixel ``i`` to output pixel
``j = σ i + p − t`` (``p``: lax's left padding of the dilated input, ``f − 1`` for VALID), kept when
``0 ≤ j < n'``: ``n' = nσ + max(f − σ, 0)`` (VALID) or ``nσ`` (SAME); CIRCULAR is the VALID output wrapped
around onto ``nσ`` pixels (output ``l`` is added to ``(l − c) mod nσ``, ``c = ⌊max(f − σ, 0)/2⌋``). With
``A_t`` the 0/1 matrix of tap ``t`` (a Kronecker product over the axes) the joint-tap mean is::

    T(K) = (1/|F|) Σ_t A_t K A_tᵀ        (full pixel covariance; separable over the axis pairs)
    T(K)[j] = (1/|F|) Σ_t Σ_i A_t[j, i] K[i]   (same-pixel covariances only: distinct taps are independent)

and then, as for :class:`~ntkit.layers.conv.Conv`: NTK parameterisation ``K' = W_std² T(K) + b_std²``,
``Θ' = W_std² T(Θ) + K'``; standard ``Θ' = C|F| T(K) + W_std² T(Θ) + [1 if bias]``.

**ConvLocal** (a separate filter and bias at every output pixel). Two different output pixels share no
parameter, so the output covariance is diagonal in the pixels: ``K'[y, y'] = 0`` for ``y ≠ y'`` and on the
diagonal the ``Conv`` rule ``K'[y, y] = W_std² (1/|F|) Σ_d K[σy + d, σy + d] + b_std²`` (the same for ``Θ``).
It reads only the same-pixel covariances of its input (NT's ``_conv_kernel_full_spatial_unshared``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Kernels, LayerError, Shapes, gaussian, single, single_shape
from ntkit.layers.conv import AxisWindow, Conv, IntOrTuple, PaddingArg, _expand, pad_spatial

__all__ = ["ConvTranspose", "ConvTransposeModule", "ConvLocal", "ConvLocalModule", "TransposeAxis"]

_CONV_T_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# ---------------------------------------------------------------------------------------------------
# transposed convolution: per-axis tap maps
# ---------------------------------------------------------------------------------------------------
class TransposeAxis:
    """One spatial axis of a transposed convolution: ``n_in`` pixels, filter ``size``, ``stride``, padding.

    ``pad_lo`` is lax's left padding of the stride-dilated input (``lax._conv_transpose_padding``): ``f − 1`` for
    VALID and CIRCULAR; for SAME ``f − 1`` if ``σ > f − 1`` else ``⌈(f + σ − 2)/2⌉``. ``n_out``: ``nσ + max(f − σ, 0)``
    (VALID) or ``nσ`` (SAME, CIRCULAR).
    """

    def __init__(self, n_in: int, size: int, stride: int, padding: str):
        self.n_in, self.size, self.stride, self.padding = n_in, size, stride, padding
        f, s = size, stride
        if padding == "SAME":
            self.pad_lo = f - 1 if s > f - 1 else -(-(f + s - 2) // 2)
            self.n_valid = n_in * s
        else:
            self.pad_lo = f - 1
            self.n_valid = n_in * s + max(f - s, 0)
        self.n_out = n_in * s if padding in ("SAME", "CIRCULAR") else self.n_valid
        self.wrap = max(f - s, 0) // 2  # CIRCULAR: the offset of NT's wrap-around (its central crop)

    def target(self, t: int) -> Tensor:
        """Output pixel of each input pixel under tap ``t`` (``-1``: dropped)."""
        j = self.stride * torch.arange(self.n_in) + self.pad_lo - t
        if self.padding == "CIRCULAR":
            ok = (j >= 0) & (j < self.n_valid)
            return torch.where(ok, (j - self.wrap) % self.n_out, torch.full_like(j, -1))
        return torch.where((j >= 0) & (j < self.n_out), j, torch.full_like(j, -1))

    def taps(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``A`` ``(f, n_out, n_in)``: ``A[t, j, i] = 1`` when tap ``t`` sends input pixel ``i`` to output ``j``."""
        A = torch.zeros(self.size, self.n_out, self.n_in, dtype=dtype)
        for t in range(self.size):
            j = self.target(t)
            i = torch.arange(self.n_in)
            ok = j >= 0
            A[t, j[ok], i[ok]] = 1.0
        return A.to(device)


def _apply_diag(x: Tensor, axis: int, M: Tensor) -> Tensor:
    """``x`` with its ``axis`` mapped by the matrix ``M`` ``(n_out, n_in)``."""
    return torch.movedim(torch.movedim(x, axis, -1) @ M.T, -1, axis)


def _apply_pair(x: Tensor, axes: tuple[int, int], P: Tensor) -> Tensor:
    """``x`` with its axis pair ``axes`` mapped by ``P`` ``(n_out, n_out, n_in, n_in)``."""
    a, b = axes
    no, ni = P.shape[0], P.shape[2]
    y = torch.movedim(x, (a, b), (-2, -1))
    shape = y.shape[:-2]
    y = y.reshape(*shape, ni * ni) @ P.reshape(no * no, ni * ni).T
    return torch.movedim(y.reshape(*shape, no, no), (-2, -1), (a, b))


class ConvTransposeModule(nn.Module):
    """Finite twin of :class:`ConvTranspose`: ``torch.nn.functional.conv_transpose{1,2,3}d`` with lax's padding
    (the output cropped / zero-extended to lax's window; CIRCULAR wrapped around as NT's ``apply_fn``).
    NTK parameterisation: ``W, b ~ N(0, 1)``, ``z = W_std/sqrt(C·|F|) · (W ⋆ᵀ x) + b_std·b``; standard:
    ``W ~ N(0, W_std²/(C|F|))``, ``b ~ N(0, b_std²)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        axes: Sequence[TransposeAxis],
        W_std: float,
        b_std: Optional[float],
        parameterization: str,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        self.axes = tuple(axes)
        ks = tuple(a.size for a in axes)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.stride = tuple(a.stride for a in axes)
        self.W_std, self.b_std, self.parameterization = W_std, b_std, parameterization
        self.scale = W_std / math.sqrt(in_channels * math.prod(ks))
        w = gaussian((in_channels, out_channels) + ks, generator)
        b = None if b_std is None else gaussian((out_channels,), generator)
        if parameterization == "standard":
            w = w * self.scale
            if b is not None:
                assert b_std is not None, "a bias is drawn only with a b_std"
                b = b * b_std
        self.weight = nn.Parameter(w)
        self.bias = None if b is None else nn.Parameter(b)

    def forward(self, x: Tensor) -> Tensor:
        d = len(self.axes)
        y = _CONV_T_FNS[d](x, self.weight, None, self.stride)  # torch's full output, (n − 1)σ + f per axis
        for a, ax in enumerate(self.axes):
            dim = 2 + a
            n_full = (ax.n_in - 1) * ax.stride + ax.size
            lo = ax.size - 1 - ax.pad_lo  # torch (unflipped taps) is lax shifted by f − 1 − p
            hi = ax.n_valid - n_full + lo
            pads = [0, 0] * (y.dim() - dim - 1) + [-lo, hi]
            y = F.pad(y, pads)
            if ax.padding == "CIRCULAR":
                idx = (torch.arange(ax.n_valid, device=y.device) - ax.wrap) % ax.n_out
                shape = list(y.shape)
                shape[dim] = ax.n_out
                y = y.new_zeros(shape).index_add(dim, idx, y)
        if self.parameterization == "ntk":
            y = y * self.scale
            if self.bias is not None:
                assert self.b_std is not None, "a bias exists only with a b_std"
                y = y + (self.b_std * self.bias).reshape((-1,) + (1,) * d)
            return y
        if self.bias is not None:
            y = y + self.bias.reshape((-1,) + (1,) * d)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.axes[0].padding!r}, W_std={self.W_std}, b_std={self.b_std}, "
            f"parameterization={self.parameterization!r}"
        )


class ConvTranspose(Conv):
    """Transposed convolution ``ConvTranspose(out_channels, kernel_size, strides=None, padding="VALID", W_std=1.0,
    b_std=None, parameterization="ntk")`` over 1 to 3 spatial axes (NCW, NCHW, NCDHW). NT's
    ``stax.ConvTranspose`` (``lax.conv_transpose``: output ``nσ + max(f − σ, 0)`` pixels for VALID, ``nσ`` for
    SAME and CIRCULAR).

    Kernel rule (module docstring): ``K' = W_std² (1/|F|) Σ_t A_t K A_tᵀ + b_std²`` with ``A_t`` the pixel map of
    filter tap ``t``; on same-pixel records ``K'[j] = W_std² (1/|F|) Σ_{t,i: A_t[j,i]=1} K[i] + b_std²`` (NT's
    ``_conv_kernel_diagonal_spatial_transpose`` / ``_conv_kernel_full_spatial_transpose``). Arguments as
    :class:`~ntkit.layers.conv.Conv`, but ``padding`` is one of ``"VALID"``, ``"SAME"``, ``"CIRCULAR"`` (NT's).
    """

    def __init__(
        self,
        out_channels: int,
        kernel_size: IntOrTuple,
        strides: Optional[IntOrTuple] = None,
        padding: PaddingArg = "VALID",
        W_std: float = 1.0,
        b_std: Optional[float] = None,
        parameterization: str = "ntk",
        *,
        in_channels: Optional[int] = None,
    ):
        if not isinstance(padding, str):
            raise LayerError(
                f"ConvTranspose: padding={padding!r}; a transposed convolution takes NT's 'VALID', 'SAME' or "
                f"'CIRCULAR' (explicit pads are not supported)."
            )
        super().__init__(
            out_channels, kernel_size, strides, padding, W_std, b_std, parameterization, in_channels=in_channels
        )

    def _axes(self, shape: Sequence[int]) -> list[TransposeAxis]:
        spatial = tuple(shape[1:])
        rank = self.input_rank()
        if not spatial or len(spatial) > 3 or (rank is not None and len(spatial) != rank - 2):
            raise LayerError(
                f"ConvTranspose(kernel_size={self.kernel_size}) needs activations (N, C, *spatial) with "
                f"{'1 to 3' if rank is None else rank - 2} spatial axes (PyTorch's channels-first layout), but got "
                f"per-sample shape {tuple(shape)}."
            )
        name = f"ConvTranspose(kernel_size={self.kernel_size})"
        ks = _expand(self.kernel_size, len(spatial), 1, "the kernel size", name)
        ss = _expand(self.strides, len(spatial), 1, "strides", name)
        assert isinstance(self.padding, str), "checked in __init__"
        return [TransposeAxis(n, f, s, self.padding) for n, f, s in zip(spatial, ks, ss)]

    def kernel(self, k: Kernels) -> Kernels:
        k = single(k, self)
        axes = self._axes(k.shape1[1:])
        self._check_channels(k.width)
        full = not k.diagonal_spatial
        f_size = math.prod(a.size for a in axes)
        ops: list[Tensor] = []
        for a in axes:
            A = a.taps(k.dtype, k.device)
            ops.append(torch.einsum("tji,tkl->jkil", A, A) if full else A.sum(0))

        def T(x: Optional[Tensor], batch_ndim: int) -> Optional[Tensor]:
            """The joint-tap mean ``T(x)``."""
            if x is None:
                return None
            for a, op in enumerate(ops):
                if full:
                    x = _apply_pair(x, (batch_ndim + 2 * a, batch_ndim + 2 * a + 1), op)
                else:
                    x = _apply_diag(x, batch_ndim + a, op)
            return x / f_size

        w2 = self.W_std * self.W_std
        b2 = 0.0 if self.b_std is None else self.b_std * self.b_std

        def affine(x: Optional[Tensor], batch_ndim: int) -> Optional[Tensor]:
            t = T(x, batch_ndim)
            return None if t is None else t * w2 + b2

        cov1, cov2 = affine(k.cov1, 1), affine(k.cov2, 1)
        ntk = None
        mean = T(k.nngp, 2)
        assert mean is not None, "a kernel record carries its NNGP"
        nngp = mean * w2 + b2
        if k.ntk is not None:
            if self.parameterization == "ntk":
                ntk = nngp.clone() if k.is_input else nngp + w2 * T(k.ntk, 2)  # type: ignore[operator]
            else:
                fan_in = float(k.width * f_size)
                ntk = mean * fan_in if k.is_input else w2 * T(k.ntk, 2) + mean * fan_in  # type: ignore[operator]
                if self.b_std is not None:
                    ntk = ntk + 1.0
        return self._output_record(k, nngp, ntk, cov1, cov2, tuple(a.n_out for a in axes))

    def build(
        self, in_shape: Shapes, width: Optional[int], generator: torch.Generator, readout: bool
    ) -> tuple[nn.Module, Shapes]:
        s = single_shape(in_shape, self)
        axes = self._axes(s)
        if width is None:
            self._check_channels(s[0])
        out = self.out_channels if (width is None or readout) else width
        mod = ConvTransposeModule(s[0], out, axes, self.W_std, self.b_std, self.parameterization, generator)
        return mod, (out,) + tuple(a.n_out for a in axes)

    def __repr__(self) -> str:
        return (
            f"ConvTranspose({self.out_channels}, "
            f"{self.kernel_size if not self._int_kernel else self.kernel_size[0]}, strides={self.strides}, "
            f"padding={self.padding!r}, W_std={self.W_std}, b_std={self.b_std}, "
            f"parameterization={self.parameterization!r})"
        )


# ---------------------------------------------------------------------------------------------------
# locally connected (unshared) convolution
# ---------------------------------------------------------------------------------------------------
def _spatial_diagonal(x: Optional[Tensor], batch_ndim: int, s: int) -> Optional[Tensor]:
    """Same-pixel entries ``(B, s_1, .., s_S)`` of a full-spatial ``(B, s_1, s_1', .., s_S, s_S')`` tensor."""
    if x is None:
        return None
    for _ in range(s):
        x = torch.diagonal(x, 0, batch_ndim, batch_ndim + 1)  # the diagonal goes last: axes stay in order
    return x


def _spatial_embed(x: Optional[Tensor], batch_ndim: int, s: int) -> Optional[Tensor]:
    """The full-spatial tensor with same-pixel entries ``x`` ``(B, s_1, .., s_S)`` and zeros elsewhere."""
    if x is None:
        return None
    for a in range(s):
        ax = batch_ndim + 2 * a
        n = x.shape[ax]
        eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape((n, n) + (1,) * (x.dim() - ax - 1))
        x = x.unsqueeze(ax + 1) * eye
    return x


def _gathered_patches(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int]) -> Tensor:
    """The patches of :func:`~ntkit.layers.conv.patches` (``(n, L, Cin·|F|)``, one group), by one gather on the
    flattened pixels instead of ``Tensor.unfold``: ``unfold``'s backward has no batching rule in ``torch.func``, so
    vmapped Jacobians (Monte Carlo, empirical NTKs) of a locally connected layer would run sample by sample."""
    spatial = tuple(x.shape[2:])
    d = len(spatial)
    idx = torch.zeros((), dtype=torch.long, device=x.device)
    step = 1
    for ax in reversed(range(d)):  # flat index of pixel (start + offset) along every axis, row-major
        n_out = (spatial[ax] - kernel_size[ax]) // stride[ax] + 1
        pos = torch.arange(n_out, device=x.device)[:, None] * stride[ax] + torch.arange(
            kernel_size[ax], device=x.device
        )
        shape = [1] * (2 * d)
        shape[ax], shape[d + ax] = n_out, kernel_size[ax]
        idx = idx + (pos * step).reshape(shape)
        step *= spatial[ax]
    n_pix, n_taps = idx.shape[:d].numel(), idx.shape[d:].numel()
    flat = x.reshape(x.shape[0], x.shape[1], -1)[:, :, idx.reshape(n_pix, n_taps)]  # (n, Cin, L, |F|)
    return flat.permute(0, 2, 1, 3).reshape(x.shape[0], n_pix, -1)


class ConvLocalModule(nn.Module):
    """Finite twin of :class:`ConvLocal`: a separate weight ``(Cout, C·|F|)`` and bias ``(Cout,)`` at every
    output pixel (NT's ``lax.conv_general_dilated_local``), applied to the padded input patches. NTK
    parameterisation: ``W, b ~ N(0, 1)``, ``z = W_std/sqrt(C·|F|) · W_y·patch_y + b_std·b_y``; standard:
    ``W ~ N(0, W_std²/(C|F|))``, ``b ~ N(0, b_std²)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        wins: Sequence[AxisWindow],
        W_std: float,
        b_std: Optional[float],
        parameterization: str,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        self.wins = tuple(wins)
        ks = tuple(w.size for w in wins)
        self.out_spatial = tuple(w.n_out for w in wins)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.stride = tuple(w.stride for w in wins)
        self.W_std, self.b_std, self.parameterization = W_std, b_std, parameterization
        fan_in = in_channels * math.prod(ks)
        n_pix = math.prod(self.out_spatial)
        w = gaussian((n_pix, out_channels, fan_in), generator)
        b = None if b_std is None else gaussian((out_channels,) + self.out_spatial, generator)
        self.scale = W_std / math.sqrt(fan_in)
        if parameterization == "standard":
            w = w * self.scale
            if b is not None:
                assert b_std is not None, "a bias is drawn only with a b_std"
                b = b * b_std
        self.weight = nn.Parameter(w)
        self.bias = None if b is None else nn.Parameter(b)

    def forward(self, x: Tensor) -> Tensor:
        d = len(self.wins)
        X = _gathered_patches(pad_spatial(x, self.wins), self.kernel_size, self.stride)  # (n, L, C|F|)
        assert X.shape[1] == math.prod(self.out_spatial) and d == len(self.kernel_size), "one patch per output pixel"
        y = torch.einsum("nlc,loc->nol", X, self.weight).reshape((x.shape[0], self.out_channels) + self.out_spatial)
        if self.parameterization == "ntk":
            y = y * self.scale
            if self.bias is not None:
                assert self.b_std is not None, "a bias exists only with a b_std"
                y = y + self.b_std * self.bias
            return y
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"out_spatial={self.out_spatial}, W_std={self.W_std}, b_std={self.b_std}, "
            f"parameterization={self.parameterization!r}"
        )


class ConvLocal(Conv):
    """Locally connected convolution ``ConvLocal(out_channels, kernel_size, strides=None, padding="VALID",
    W_std=1.0, b_std=None, parameterization="ntk")``: a convolution whose filter and bias differ at every output
    pixel. NT's ``stax.ConvLocal``; arguments as :class:`~ntkit.layers.conv.Conv` (same windows and paddings).

    Kernel rule (module docstring; NT's ``_conv_kernel_full_spatial_unshared``): the ``Conv`` rule on the
    same-pixel covariances, ``K'[y, y] = W_std² (1/|F|) Σ_{d ∈ F} K[σy + d, σy + d] + b_std²`` (and ``Θ`` alike),
    and ``K'[y, y'] = Θ'[y, y'] = 0`` for ``y ≠ y'`` on full pixel covariances.
    """

    def kernel(self, k: Kernels) -> Kernels:
        k = single(k, self)
        if k.diagonal_spatial:
            return Conv.kernel(self, k)
        s = k.spatial_ndim
        diag = k.replace(
            nngp=_spatial_diagonal(k.nngp, 2, s),
            ntk=_spatial_diagonal(k.ntk, 2, s),
            cov1=_spatial_diagonal(k.cov1, 1, s),
            cov2=_spatial_diagonal(k.cov2, 1, s),
            diagonal_spatial=True,
        )
        out = Conv.kernel(self, diag)
        assert isinstance(out, Kernel), "Conv takes and gives one record"
        return out.replace(
            nngp=_spatial_embed(out.nngp, 2, s),
            ntk=_spatial_embed(out.ntk, 2, s),
            cov1=_spatial_embed(out.cov1, 1, s),
            cov2=_spatial_embed(out.cov2, 1, s),
            diagonal_spatial=False,
        )

    def _twin(self, in_channels: int, out: int, wins: Sequence[AxisWindow], generator: torch.Generator) -> nn.Module:
        """:meth:`Conv.build`'s module: unshared weights (``s`` is ``(1, 1)`` for this layer)."""
        return ConvLocalModule(in_channels, out, wins, self.W_std, self.b_std, self.parameterization, generator)

    def __repr__(self) -> str:
        return "ConvLocal" + Conv.__repr__(self)[len("Conv") :]
