"""Private helpers of :mod:`ntkit.predict`: output-axes bookkeeping, targets, times, spectral factors, records.

Targets ``y`` have shape ``(n, *out)``. NT's ``trace_axes`` name axes of ``y`` along which the kernel is
``Θ ⊗ I`` (block-diagonal, the same for every entry): the kernel then lacks them. A kernel between batches of
``y``-shaped outputs keeps the other ("non-traced") axes zipped: ``(n1, n2, a1, a2, b1, b2, ...)`` for
non-traced per-sample axes ``(a, b, ...)``. Internally everything is flattened to matrices:
``y -> (M, T)`` with ``M = n·prod(non-traced)`` rows and ``T = prod(traced)`` independent columns, and
kernels to ``(M1, M2)``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ntkit._inputs import to_tensor

F64 = torch.float64
Axes = Union[int, Sequence[int]]


_RECORDS: dict[tuple[str, ...], type] = {}


def package(out: dict, single: bool):
    """NT's return convention: the bare value for a string ``get``, else a namedtuple with one field per name."""
    if single:
        return next(iter(out.values()))
    names = tuple(out)
    if names not in _RECORDS:
        _RECORDS[names] = collections.namedtuple("Gaussians", names)
    return _RECORDS[names](**out)


def get_attr(k: Any, g: str, name: str) -> Union[Tensor, np.ndarray]:
    """``k.nngp``/``k.ntk`` of a Kernel-like record, or ``k`` itself if it is a plain matrix."""
    if isinstance(k, (Tensor, np.ndarray)):
        return k
    v = getattr(k, g, None)
    if v is None:
        raise ValueError(f"{name} has no '{g}' kernel; compute it with get=('nngp', 'ntk') (or include '{g}').")
    return v


def ntk_of(k: Any) -> Any:
    """A Kernel-like record stands for its NTK (what gradient descent is driven by); matrices pass through."""
    if isinstance(k, (Tensor, np.ndarray)) or getattr(k, "ntk", None) is None:
        return k
    return k.ntk


class Layout:
    """Maps targets ``(n, *out)`` and zipped kernels to the flat ``(M, T)`` / ``(M1, M2)`` matrices."""

    def __init__(self, y_shape: Sequence[int], trace_axes: Union[int, Sequence[int]]):
        y_shape = tuple(int(s) for s in y_shape)
        nd = len(y_shape)
        if nd == 0:
            raise ValueError("y_train must have a batch axis: shape (n,) or (n, *outputs).")
        self.ndim = nd
        if nd == 1:
            # One output per sample: nothing to trace (trace_axes would name the batch axis).
            trace: list[int] = []
        else:
            axes = [trace_axes] if isinstance(trace_axes, int) else list(trace_axes)
            trace = []
            for a in axes:
                if not isinstance(a, (int, np.integer)) or not -nd <= a < nd:
                    raise ValueError(f"trace_axes={trace_axes!r} is out of range for y_train of shape {y_shape}.")
                trace.append(int(a) % nd)
            trace = sorted(set(trace))
            if 0 in trace:
                raise ValueError(
                    f"trace_axes={trace_axes!r} includes the batch axis 0 of y_train "
                    f"(shape {y_shape}); only output axes can be traced."
                )
        self.trace = tuple(trace)
        self.non = tuple(a for a in range(nd) if a not in trace)
        self.perm = self.non + self.trace
        self.inv_perm = tuple(int(i) for i in np.argsort(self.perm))
        self.y_shape = y_shape
        self.rest_shape = tuple(y_shape[a] for a in self.non[1:])  # non-traced per-sample axes
        self.trace_shape = tuple(y_shape[a] for a in self.trace)
        self.T = math.prod(self.trace_shape)

    # -- targets / outputs ----------------------------------------------------------------------------
    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n,) + tuple(self.y_shape[1:])

    def flatten(self, y: Tensor) -> Tensor:
        """``(n, *out) -> (n·prod(non-traced), T)``."""
        return y.permute(self.perm).reshape(-1, self.T)

    def unflatten(self, flat: Tensor, n: int) -> Tensor:
        """``(*lead, M, T) -> (*lead, n, *out)``."""
        lead = tuple(flat.shape[:-2])
        x = flat.reshape(lead + (n,) + self.rest_shape + self.trace_shape)
        nl = len(lead)
        return x.permute(tuple(range(nl)) + tuple(nl + p for p in self.inv_perm))

    # -- kernels --------------------------------------------------------------------------------------
    def kernel_shape(self, n1: int, n2: int) -> tuple[int, ...]:
        shape = [n1, n2]
        for s in self.rest_shape:
            shape += [s, s]
        return tuple(shape)

    def kernel_2d(self, k: Tensor, name: str, n2: int, n1: Optional[int] = None) -> Tensor:
        """Check a zipped kernel ``(n1, n2, a, a, ...)`` and flatten it to ``(n1·A, n2·A)``."""
        if k.dim() < 2:
            raise ValueError(f"{name} must be a kernel matrix, got shape {tuple(k.shape)}.")
        n1 = k.shape[0] if n1 is None else n1
        want = self.kernel_shape(n1, n2)
        if tuple(k.shape) != want:
            hint = (
                ""
                if not self.rest_shape
                else f" (non-traced output axes {self.rest_shape} of y_train appear zipped, once per side)"
            )
            raise ValueError(
                f"{name} has shape {tuple(k.shape)} but y_train of shape {self.y_shape} with "
                f"trace_axes={self.trace} needs {want}{hint}. Check that the kernel and the "
                f"targets describe the same samples and that trace_axes matches the kernel."
            )
        p = len(self.rest_shape) + 1
        if p > 1:
            k = k.permute(tuple(range(0, 2 * p, 2)) + tuple(range(1, 2 * p, 2)))
        m = math.prod(self.rest_shape)
        return k.reshape(n1 * m, n2 * m)

    def zip_cov(self, cov: Tensor, n: int) -> Tensor:
        """``(*lead, M, M) -> (*lead, n, n, a, a, ...)`` (NT's zipped kernel layout)."""
        lead = tuple(cov.shape[:-2])
        p = len(self.rest_shape) + 1
        x = cov.reshape(lead + (n,) + self.rest_shape + (n,) + self.rest_shape)
        nl = len(lead)
        order = []
        for i in range(p):
            order += [nl + i, nl + p + i]
        return x.permute(tuple(range(nl)) + tuple(order))


# -------------------------------------------------------------------------------------------------
# times and spectral factors
# -------------------------------------------------------------------------------------------------
def as_times(t: Any, learning_rate: float, dtype: torch.dtype, device) -> tuple[Tensor, tuple[int, ...]]:
    """Times ``t`` (scalar or any-shaped array, ``+inf`` allowed) times ``learning_rate``, flattened."""
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate={learning_rate!r} must be a finite number > 0.")
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    t = (
        torch.as_tensor(t, dtype=dtype, device=device)
        if not isinstance(t, Tensor)
        else t.to(dtype=dtype, device=device)
    )
    if bool(torch.isnan(t).any()):
        raise ValueError("t contains NaN; pass times >= 0 (t=None or inf for infinite time).")
    if bool((t < 0).any()):
        raise ValueError(f"t must be >= 0 (training time); got min(t) = {float(t.min()):g}.")
    return (t * learning_rate).reshape(-1), tuple(t.shape)


def decay(lam: Tensor, t: Tensor, norm: float) -> Tensor:
    """``exp(-λ t / norm)`` as a ``(T, M)`` table; 1 where ``λ = 0`` (also at ``t = inf``)."""
    lam, t = lam[None, :], t[:, None]
    x = torch.where(lam > 0, lam * t, torch.zeros((), dtype=lam.dtype, device=lam.device))
    return torch.exp(-x / norm)


def expm1_factor(lam: Tensor, t: Tensor, norm: float) -> Tensor:
    """``expm1(-λ t / norm)`` (train residual factor), ``(T, M)``; 0 where ``λ = 0``."""
    lam, t = lam[None, :], t[:, None]
    x = torch.where(lam > 0, lam * t, torch.zeros((), dtype=lam.dtype, device=lam.device))
    return torch.expm1(-x / norm)


def inv_expm1_factor(lam: Tensor, t: Tensor, norm: float, cutoff: float) -> Tensor:
    """``expm1(-λ t / norm) / λ`` (test-point factor), ``(T, M)``.

    Its limit ``-t / norm`` where ``λ = 0``; at ``t = inf`` it is ``-1/λ`` for ``λ > cutoff`` and 0 for the
    numerically-null directions (the pseudo-inverse convention: no information lives there)."""
    lam2, t2 = lam[None, :], t[:, None]
    pos = lam2 > 0
    safe = torch.where(pos, lam2, torch.ones((), dtype=lam.dtype, device=lam.device))
    finite_t = torch.isfinite(t2)
    x = torch.where(pos & finite_t, lam2 * torch.where(finite_t, t2, 0.0), 0.0)
    val = torch.where(pos, torch.expm1(-x / norm) / safe, -torch.where(finite_t, t2, 0.0) / norm)
    at_inf = torch.where(lam2 > cutoff, -1.0 / safe, torch.zeros((), dtype=lam.dtype, device=lam.device))
    return torch.where(finite_t, val, at_inf)


# -------------------------------------------------------------------------------------------------
# targets and kernels
# -------------------------------------------------------------------------------------------------
def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def targets(y_train: Any, trace_axes: Axes, device) -> tuple[Tensor, Layout]:
    y = to_tensor(y_train, "y_train", device=device)
    if y.dim() == 0 or y.shape[0] == 0:
        raise ValueError(f"y_train must have shape (n,) or (n, *outputs) with n >= 1, got {tuple(y.shape)}.")
    return y, Layout(y.shape, trace_axes)


def check_train_kernel(k: Tensor, layout: Layout, name: str) -> Tensor:
    n = layout.y_shape[0]
    return layout.kernel_2d(to_tensor(k, name, check_finite=False), name, n2=n, n1=n)


def bytes64(*shape: int) -> int:
    return 8 * int(math.prod(shape))
