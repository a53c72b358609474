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
* Each fused function is compiled once per *layout*: the arguments' dtypes, ranks and non-batch (spatial)
  sizes, with the leading batch axes symbolic (``torch._dynamo.maybe_mark_dynamic``), so tiles and batches of
  any size reuse it. The spatial sizes stay static because the generated loops are then fully vectorised:
  with every size symbolic (``dynamic=True``, the first version of this path) TorchInductor ran the 8-wide
  innermost pixel axis of a Myrtle tile through its masked tail loop, 2.8× slower per entry (9.6 against
  3.4 ns single-threaded, measured with a script outside the repository). Every layout has its own copy of
  the function's code object, so that TorchInductor's per-code recompile limit (8) is never reached by a net
  with many resolutions. The first call of a layout in a process traces and compiles (seconds;
  TorchInductor keeps its generated code in its on-disk cache, so later processes load it faster). Calls on fewer than
  :data:`MIN_NUMEL` entries, calls recorded by autograd, and variances outside the range of the fast
  correlation stay on the eager path (whose results the fused path reproduces).
* The pair ``Conv → ReLU`` (stride 1, zero padding keeping the size) is fused further, window sums and rule
  in one loop (:mod:`ntkit.layers.fused`); ``Net.kernel_fn`` rewrites its serial stacks for that inside the
  block.
* It is never required: without the ``with`` block every rule runs eagerly, as before. Compilation needs a
  C++ compiler on CPU (Triton on CUDA); if it fails, the call raises :class:`CompileError` naming the failure
  and the fix (run without ``ntkit.compiled()``), never a silent fallback to another number.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["compiled", "compile_enabled", "fused", "worth_compiling", "CompileError", "MIN_NUMEL"]

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


def worth_compiling(t: torch.Tensor, *others: torch.Tensor) -> bool:
    """The conditions every fused rule shares: ``t`` in float32/64 with at least :data:`MIN_NUMEL` entries, and
    autograd recording through none of ``t`` and ``others`` (then the eager rules run, with their exact
    gradients)."""
    return (
        t.dtype in (torch.float32, torch.float64)
        and t.numel() >= MIN_NUMEL
        and not (torch.is_grad_enabled() and any(x.requires_grad for x in (t, *others)))
    )


#: TorchInductor options for stencils (:func:`fused` with ``one_loop=True``): a pointwise value that reads many
#: inputs (a window sum's taps) is inlined into its users instead of being stored and read back, so that the
#: whole rule is one loop over the tile (its intermediates would not fit in L2 at the tiles ntkit plans)
ONE_LOOP = (
    ("realize_reads_threshold", 1000),
    ("realize_opcount_threshold", 10000),
    ("realize_acc_reads_threshold", 1000),
)


@functools.cache
def _compiled(fn: Callable[..., Any], layout: tuple = (), options: tuple = ()) -> Callable[..., Any]:
    """``fn`` compiled for one argument layout (:func:`_layout`), through a copy of its code object: TorchInductor
    keeps its compiled variants per code object, so the layouts do not share (and exhaust) one recompile limit.
    ``options``: TorchInductor options for this function's compilation only (not process-wide)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(copy, dynamic=False, fullgraph=True, options=dict(options) or None)


def _layout(args: tuple, batch_dims: int) -> tuple:
    """What a compiled variant is specialised on: per tensor argument its dtype, device and the sizes after
    the first ``batch_dims`` axes, tuples (static geometry) by value, ``None`` arguments and Python scalars by
    kind only."""
    out: list = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.device.type, a.dim(), tuple(a.shape[batch_dims:])))
        elif isinstance(a, tuple):  # static geometry (e.g. a window's memory offsets): part of the layout
            out.append(a)
        else:
            out.append(None if a is None else type(a))
    return tuple(out)


def fused(
    fn: Callable[..., Any], *args: Any, batch_dims: int = 2, static: tuple[int, ...] = (), one_loop: bool = False
) -> Any:
    """``fn(*args)`` through its cached ``torch.compile`` wrapper for this layout, the first ``batch_dims`` axes
    of every tensor argument symbolic (tile and batch sizes) except for the arguments numbered in ``static``
    (tables of constants), the others static; ``one_loop``: compiled with :data:`ONE_LOOP`. A compilation
    failure raises :class:`CompileError` with the fix."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and i not in static:
            for d in range(min(batch_dims, a.dim())):
                if a.shape[d] > 1:  # broadcast axes of size 1 stay static
                    torch._dynamo.maybe_mark_dynamic(a, d)
    try:
        return _compiled(fn, _layout(args, batch_dims), ONE_LOOP if one_loop else ())(*args)
    except Exception as e:  # torch.compile's failures come as many types (backend, C++ compiler, Triton)
        raise CompileError(
            f"ntkit.compiled(): torch.compile could not compile the fused rule {fn.__name__} on this machine "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}). "
            f"It needs a working C++ compiler on CPU (Triton on CUDA). Run without ntkit.compiled(): the eager "
            f"rules give the same kernel."
        ) from e
