"""The opt-in fused path: per-pixel-pair kernel rules compiled by ``torch.compile`` (issue 17, item 1).

A rule such as the ReLU family's arc-cosine kernel is a chain of ~11 elementwise tensor passes in eager
PyTorch (correlation, two snapping thresholds, ``arccos``, ``sin``, the two kernels and the NTK product); on a
convolutional net's full pixel-pair covariances they dominate the run time and are memory-bound. Inside
``with ntkit.compiled():`` the layers that have a fused form evaluate it as **one** generated loop
(TorchInductor: C++/OpenMP on CPU, Triton on CUDA) that reads ``q12``, the two variance roots and ``Θ`` once
and writes ``K'`` and ``Θ'`` once. The formulas are those of the eager rule, term for term, so the results
agree with it to a few ulps (tests/layers/test_compiled.py asserts 1e-12 relative on Myrtle-5 and the FC
nets; ``arccos``/``sin`` come from the vectorised math library instead of the scalar one).

The switch, and what it costs:

* ``with ntkit.compiled():`` (or ``ntkit.compiled(False)`` to turn it off in a scope) sets a context variable:
  it affects only kernel evaluations inside the ``with`` block of this thread/task, nothing process-wide.
* Each fused function is compiled once per rank and dtype with symbolic sizes (``dynamic=True``), so tiles
  and batches of any size reuse it; the first call in a process traces and compiles (seconds; TorchInductor
  keeps its generated code in its on-disk cache, so later processes load it faster). Calls on fewer than
  :data:`MIN_NUMEL` entries, calls recorded by autograd, and variances outside the range of the fast
  correlation stay on the eager path (whose results the fused path reproduces).
* It is never required: without the ``with`` block every rule runs eagerly, as before. Compilation needs a
  C++ compiler on CPU (Triton on CUDA); if it fails, the call raises :class:`CompileError` naming the failure
  and the fix (run without ``ntkit.compiled()``), never a silent fallback to another number.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["compiled", "compile_enabled", "fused", "CompileError", "MIN_NUMEL"]

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("ntkit_compiled", default=False)

#: calls on fewer entries run eagerly (a compiled call's fixed cost, ~0.3 ms of guards and launch on CPU, is
#: then comparable to the eager rule itself)
MIN_NUMEL = 1 << 15


class CompileError(RuntimeError):
    """``torch.compile`` failed on a fused rule inside ``ntkit.compiled()``."""


@contextlib.contextmanager
def compiled(enabled: bool = True) -> Iterator[None]:
    """Evaluate the per-pixel-pair rules that have a fused form through ``torch.compile`` inside this block.

    Example::

        with ntkit.compiled():
            k = net.kernel_fn(x1, x2, "ntk")

    Opt-in and scoped (a context variable; see :mod:`ntkit._compile` for the cost and the guarantees)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def compile_enabled() -> bool:
    """True inside ``ntkit.compiled()``."""
    return _ENABLED.get()


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=True, fullgraph=True)


def fused(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` through its cached ``torch.compile`` wrapper; a compilation failure raises
    :class:`CompileError` with the fix."""
    try:
        return _compiled(fn)(*args)
    except Exception as e:  # torch.compile's failures come as many types (backend, C++ compiler, Triton)
        raise CompileError(
            f"ntkit.compiled(): torch.compile could not compile the fused rule {fn.__name__} on this machine "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}). "
            f"It needs a working C++ compiler on CPU (Triton on CUDA). Run without ntkit.compiled(): the eager "
            f"rules give the same kernel."
        ) from e
