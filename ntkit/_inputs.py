"""The one input validator: every public entry point checks its arrays here.

Each check raises one error that names the problem and the fix (wrong type, integer/bool dtype, too few axes,
an empty batch, NaN or Inf, mismatched devices, dtypes or per-sample shapes). Entry points differ only in what
they accept — kernels need floating ``(N, features)`` / ``(N, C, *spatial)`` batches, empirical kernels any
batch the model takes (token ids are integers), predict functions any real array — and say so through the
arguments of :func:`as_batch` and :func:`to_tensor`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "all_finite",
    "as_batch",
    "check_pair",
    "kernel_inputs",
    "compute_dtype",
    "to_tensor",
    "parse_dtype",
]


def all_finite(x: Tensor) -> bool:
    """True if ``x`` has no NaN/Inf. One reduction: a finite sum proves it (NaN and ±Inf propagate); only a
    sum that overflowed falls back to the elementwise check (``torch.isfinite`` is ~20x slower)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _count_bad(x: Tensor) -> int:
    return int((~torch.isfinite(x)).sum())


def as_batch(
    x: Any, name: str, *, min_dim: int = 2, floating: bool = True, error: type[ValueError] = ValueError
) -> Tensor:
    """Validate one batch of inputs and return it as a tensor (numpy accepted).

    Args:
      x: the batch, batch axis first.
      name: how errors refer to it (``"x1"``).
      min_dim: fewest axes accepted (2 for kernels: a batch and a feature axis; 1 for model inputs).
      floating: require a floating dtype (kernels); ``False`` accepts any dtype a model takes (token ids).
      error: the ``ValueError`` subclass raised for bad shapes and values (e.g. ``EmpiricalError``).

    Floating batches must be finite.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}.")
    if floating and not x.is_floating_point():
        raise TypeError(
            f"{name} has dtype {x.dtype}; kernels need floating inputs. "
            f"Convert with {name}.to(torch.float64) (recommended) or .float()."
        )
    if x.dim() < min_dim:
        if min_dim >= 2:
            raise error(
                f"{name} has shape {tuple(x.shape)}; inputs need a batch axis and a feature axis "
                f"(N, features) or (N, C, *spatial). For a single sample use {name}[None]; "
                f"for N scalar features use {name}[:, None]."
            )
        raise error(
            f"{name} has shape {tuple(x.shape)}; it needs a batch axis first (for a single sample use {name}[None])."
        )
    if x.shape[0] == 0:
        raise error(f"{name} is an empty batch (shape {tuple(x.shape)}); pass at least one sample.")
    if floating and any(s == 0 for s in x.shape[1:]):
        raise error(f"{name} has a zero-sized feature axis (shape {tuple(x.shape)}).")
    if x.is_floating_point() and not all_finite(x):
        raise error(f"{name} contains {_count_bad(x)} NaN/Inf entries; clean or impute them before computing kernels.")
    return x


def check_pair(x1: Tensor, x2: Optional[Tensor], error: type[ValueError] = ValueError) -> None:
    """``x2`` (if given) must match ``x1`` in device, dtype and per-sample shape (``error`` as in
    :func:`as_batch`; a dtype mismatch is a ``TypeError`` unless ``error`` is given)."""
    if x2 is None:
        return
    if x2.device != x1.device:
        raise error(
            f"x1 is on {x1.device} but x2 is on {x2.device}; move both to one device (e.g. x2 = x2.to(x1.device))."
        )
    if x2.dtype != x1.dtype:
        raise (TypeError if error is ValueError else error)(
            f"x1 is {x1.dtype} but x2 is {x2.dtype}; cast both to one dtype (float64 recommended)."
        )
    if x2.shape[1:] != x1.shape[1:]:
        raise error(
            f"x1 has per-sample shape {tuple(x1.shape[1:])} but x2 has {tuple(x2.shape[1:])}; "
            f"both batches must have the same per-sample shape."
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 (arc-cosines lose all accuracy in fp16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def kernel_inputs(x1: Any, x2: Any = None) -> tuple[Tensor, Optional[Tensor], torch.dtype]:
    """Check a pair of kernel input batches; return them in the compute dtype, and the dtype to return."""
    t1 = as_batch(x1, "x1")
    t2 = None if x2 is None else as_batch(x2, "x2")
    check_pair(t1, t2)
    cdt = compute_dtype(t1.dtype)
    return t1.to(cdt), (None if t2 is None else t2.to(cdt)), t1.dtype


def to_tensor(
    x: Any,
    name: str,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    check_finite: bool = True,
) -> Tensor:
    """numpy arrays, numbers and tensors to a tensor (targets, kernel matrices, times); one clear error for
    NaN/Inf or non-numeric input (``check_finite=False`` when a later check covers it)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    elif not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # re-raised with the argument's name
            raise TypeError(f"{name} must be a tensor, array or number, got {type(x).__name__}.") from e
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} has dtype {x.dtype}; pass real numbers.")
    if check_finite and x.is_floating_point() and not all_finite(x):
        bad = _count_bad(x)
        if bad:
            raise ValueError(f"{name} contains {bad} NaN/Inf entries; clean them first.")
    return x.to(dtype=dtype or x.dtype, device=device or x.device)


_DTYPES = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32}


def parse_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """``"float64"``/``"float32"`` (or a torch dtype) to a torch dtype; one error naming the choices."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r}: choose 'float64' (recommended) or 'float32'.")
    return _DTYPES[name]
