"""Image resizing: ``ImageResize`` (NT's ``stax.ImageResize``, i.e. ``jax.image.resize``).

``ImageResize(shape, method)`` resizes the spatial axes of activations ``(N, C, *spatial)`` to ``shape``, given
for the whole array in ntkit's channels-first layout with ``-1`` for an axis kept as it is: ``(-1, -1, 8, 8)``
resizes images to 8 x 8. The batch and channel entries must be ``-1``.

Resizing is linear and separable: output pixel ``y`` of axis ``a`` is ``Σ_x W_a[y, x] v[x]`` with the weights of
``jax.image.resize`` (half-pixel centres; ``"linear"``: the triangle filter, widened by the downsampling factor
when ``antialias``, normalised, zero for samples outside the image; ``"nearest"``: ``W[y, x] = 1`` for
``x = ⌊(y + ½)·m/n⌋``, computed in float32 as JAX does). Axes whose size does not change are left alone (as
JAX's). So, with ``W`` applied on both pixel sides (NT 0.6.5 applies ``jax.image.resize`` to the kernel's
arrays, which is this)::

    K'[i, j, y, y'] = Σ_{x, x'} W[y, x] K[i, j, x, x'] W[y', x'],        Θ' likewise

``"linear"`` mixes pixels and needs the full pixel-pixel covariances (``needs_full_spatial``); ``"nearest"``
is a selection, ``K'[i, j, y] = K[i, j, s(y)]``, and also works on the diagonal layout (NT asks for the full
covariance there too; the values are the same). The cubic and Lanczos methods have no kernel rule here (NT's
``kernel_fn`` neither) and are refused.

NT 0.6.5's ``kernel_fn`` has a bug that ntkit does not reproduce: it ignores ``Kernel.is_reversed``, so after a
``Conv`` (which reverses the kernel's spatial axes) a 2-D resize is applied with the targets of ``H`` and ``W``
swapped (its ``apply_fn`` is right; 1-D resizes, and equal targets on square images, are unaffected). Its kernels
then equal ntkit's with the two targets swapped (``tests/layers/test_resize.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError, single, single_shape
from ntkit.layers.conv import spatial_axes
from ntkit.layers.index import check_layout

__all__ = ["ImageResize", "ResizeModule", "METHODS", "resize_weights", "nearest_positions"]

#: method names (JAX's) -> the rule: "linear" or "nearest"
METHODS = {"linear": "linear", "bilinear": "linear", "trilinear": "linear", "triangle": "linear", "nearest": "nearest"}
_NO_KERNEL = ("cubic", "bicubic", "tricubic", "lanczos3", "lanczos5")


def resize_weights(m: int, n: int, antialias: bool) -> Tensor:
    """The ``(n, m)`` float64 matrix of ``jax.image.resize(..., "linear")`` on an axis of size ``m`` resized to
    ``n`` (JAX's ``compute_weight_mat`` with scale ``n/m`` and no translation, transposed)."""
    scale = n / m
    inv = 1.0 / scale
    kernel_scale = max(inv, 1.0) if antialias else 1.0
    f64 = torch.float64
    sample = (torch.arange(n, dtype=f64) + 0.5) * inv - 0.5  # (n,): the input coordinate of each output pixel
    x = (sample[None, :] - torch.arange(m, dtype=f64)[:, None]).abs() / kernel_scale  # (m, n)
    w = torch.clamp(1 - x.abs(), min=0.0)  # the triangle filter
    total = w.sum(0, keepdim=True)
    eps32 = float(torch.finfo(torch.float32).eps)
    w = torch.where(total.abs() > 1000.0 * eps32, w / torch.where(total != 0, total, torch.ones_like(total)), 0.0)
    inside = (sample >= -0.5) & (sample <= m - 0.5)
    return torch.where(inside[None, :], w, 0.0).T.contiguous()


def nearest_positions(m: int, n: int) -> Tensor:
    """Input position of each of the ``n`` outputs of ``jax.image.resize(..., "nearest")`` on an axis of size
    ``m``: ``⌊(y + ½)·m/n⌋`` evaluated in float32, as JAX does."""
    y = (torch.arange(n, dtype=torch.float32) + 0.5) * m / n
    return torch.floor(y).to(torch.int64).clamp_(0, m - 1)


def _method(method: Any) -> str:
    name = getattr(method, "name", method)  # jax.image.ResizeMethod.LINEAR -> "LINEAR"
    key = name.lower() if isinstance(name, str) else name
    if key in METHODS:
        return METHODS[key]
    if key in _NO_KERNEL:
        raise LayerError(
            f"ImageResize(method={method!r}) has no kernel rule (NT 0.6.5's kernel_fn has none either); "
            f"use 'linear' (or 'bilinear', 'trilinear', 'triangle') or 'nearest'."
        )
    raise LayerError(f"ImageResize(method={method!r}): unknown method; use 'linear' or 'nearest'.")


def _apply_matrix(t: Tensor, dim: int, w: Tensor) -> Tensor:
    """``Σ_x w[y, x] t[..., x, ...]`` along ``dim``."""
    return torch.movedim(torch.movedim(t, dim, -1) @ w.T.to(dtype=t.dtype, device=t.device), -1, dim)


class ResizeModule(nn.Module):
    """Finite twin of :class:`ImageResize` on ``(N, C, *spatial)``: the per-axis weights (``"linear"``) or
    positions (``"nearest"``), as buffers ``op0, op1, ...`` (``None``-free: unchanged axes are skipped)."""

    def __init__(self, ops: Sequence[Optional[Tensor]], method: str, text: str):
        super().__init__()
        self.axes = [a for a, op in enumerate(ops) if op is not None]
        self.method, self.text = method, text
        for a in self.axes:
            self.register_buffer(f"op{a}", ops[a])

    def forward(self, x: Tensor) -> Tensor:
        for a in self.axes:
            op = getattr(self, f"op{a}")
            if self.method == "linear":
                x = _apply_matrix(x, 2 + a, op)
            else:
                x = x.index_select(2 + a, op.to(x.device))
        return x

    def extra_repr(self) -> str:
        return self.text


class ImageResize(Layer):
    """``ImageResize(shape, method, antialias=True, precision="highest", batch_axis=0, channel_axis=1)``: NT's
    ``stax.ImageResize`` (``jax.image.resize``) on activations ``(N, C, *spatial)``.

    Args:
      shape: the output shape of the whole array in ntkit's layout, ``-1`` for an axis kept (the batch and
        channel entries must be ``-1``): ``(-1, -1, 8, 8)``.
      method: ``"linear"`` (``"bilinear"``, ``"trilinear"``, ``"triangle"``) or ``"nearest"`` (or JAX's
        ``ResizeMethod.LINEAR``/``NEAREST``); the others have no kernel rule.
      antialias: widen the linear filter when downsampling (JAX's); ignored by ``"nearest"``.
      precision: accepted for NT's signature; torch computes in the activations' dtype at full precision (JAX's
        ``"highest"``).
      batch_axis, channel_axis: fixed to ``0`` and ``1`` in ntkit's native layers (see :class:`Index`).

    Kernel rule: the module docstring.
    """

    tracks_means = True

    def __init__(
        self,
        shape: Sequence[int],
        method: Any,
        antialias: bool = True,
        precision: Any = "highest",
        batch_axis: int = 0,
        channel_axis: int = 1,
    ):
        check_layout(type(self).__name__, batch_axis, channel_axis)
        try:
            sizes = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise LayerError(f"ImageResize(shape={shape!r}): give a sequence of ints (-1 keeps an axis).") from None
        if any(isinstance(s, bool) for s in shape) or any(s != -1 and s < 1 for s in sizes) or len(sizes) < 2:
            raise LayerError(
                f"ImageResize(shape={shape!r}): one entry per axis of the activations (N, C, *spatial), each -1 "
                f"(kept) or a size >= 1."
            )
        if sizes[0] != -1 or sizes[1] != -1:
            raise LayerError(
                f"ImageResize(shape={shape!r}): the batch and channel entries (0 and 1) must be -1; only the "
                f"spatial axes can be resized (the channels are infinite in the kernel limit, as NT says)."
            )
        self.shape = sizes
        self.method = method
        self._rule = _method(method)
        self.antialias = bool(antialias)
        self.precision = precision
        self.needs_full_spatial = self._rule == "linear" and any(s != -1 for s in sizes[2:])

    def input_rank(self) -> Optional[int]:
        return len(self.shape)

    def _ops(self, spatial: Sequence[int]) -> list[Optional[Tensor]]:
        if len(spatial) != len(self.shape) - 2:
            raise LayerError(
                f"{self!r} takes activations with {len(self.shape) - 2} spatial axes (shape has one entry per "
                f"axis of (N, C, *spatial)) but got per-sample spatial shape {tuple(spatial)}."
            )
        ops: list[Optional[Tensor]] = []
        for m, n in zip(spatial, self.shape[2:]):
            if n == -1 or n == m:  # JAX skips axes whose size does not change
                ops.append(None)
            elif self._rule == "linear":
                ops.append(resize_weights(m, n, self.antialias))
            else:
                ops.append(nearest_positions(m, n))
        return ops

    def _out_spatial(self, spatial: Sequence[int]) -> tuple[int, ...]:
        return tuple(m if n == -1 else n for m, n in zip(spatial, self.shape[2:]))

    def kernel(self, k: Any) -> Kernel:
        k = single(k, self)
        ops = self._ops(k.spatial_shape)
        if all(op is None for op in ops):
            return k
        full = not k.diagonal_spatial
        if self._rule == "linear" and not full:
            raise LayerError(
                f"{self!r} mixes pixels and needs the full pixel-pixel covariance, but the kernel tracks only "
                f"the diagonal. Call it through a network (serial(...).kernel_fn), which tracks the full "
                f"covariance whenever a layer needs it."
            )
        out: dict[str, Any] = {}
        for name, nd in (("nngp", 2), ("ntk", 2), ("cov1", 1), ("cov2", 1)):
            t = getattr(k, name)
            if t is None:
                continue
            for a, op in enumerate(ops):
                if op is None:
                    continue
                for d in spatial_axes(nd, a, full):
                    t = _apply_matrix(t, d, op) if self._rule == "linear" else t.index_select(d, op.to(t.device))
            out[name] = t
        for name in ("mean1", "mean2", "var1", "var2"):  # same-pixel maps (N, *s)
            t = getattr(k, name)
            if t is None:
                continue
            if self._rule == "linear" and name.startswith("var"):
                out[name] = None  # not a function of the same-pixel variances; the tiler's tape replaces it
                continue
            for a, op in enumerate(ops):
                if op is not None:
                    t = (
                        _apply_matrix(t, 1 + a, op)
                        if self._rule == "linear"
                        else t.index_select(1 + a, op.to(t.device))
                    )
            out[name] = t
        spatial = self._out_spatial(k.spatial_shape)
        res = k.replace(**out, shape1=tuple(k.shape1[:2]) + spatial, shape2=tuple(k.shape2[:2]) + spatial)
        return res.with_exact_diagonal() if self._rule == "linear" else res

    def build(
        self, in_shape: Any, width: Optional[int], generator: torch.Generator, readout: bool
    ) -> tuple[nn.Module, tuple[int, ...]]:
        s = single_shape(in_shape, self)
        ops = self._ops(s[1:])
        return ResizeModule(ops, self._rule, repr(self)), (s[0],) + self._out_spatial(s[1:])

    def __repr__(self) -> str:
        return f"ImageResize({self.shape}, {self.method!r}" + ("" if self.antialias else ", antialias=False") + ")"
