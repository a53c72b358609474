"""Empirical kernels of any ``torch.nn.Module``: the NTK ``Θ = J(x1) J(x2)ᵀ`` and the NNGP of its features.

The empirical NTK of a model ``f(θ, x)`` at parameters ``θ`` is ``Θ(x1, x2) = J(x1) J(x2)ᵀ`` with
``J = ∂f/∂θ`` (Jacot et al. 2018); the empirical NNGP of a layer is the inner product of its features.
Three exact implementations (Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel"):

* ``"jacobian"``: per-sample Jacobians (``torch.func.jacrev`` under ``vmap``), contracted over parameters.
* ``"ntk_vp"``: NTK-vector products: for each output direction of ``x2`` a VJP gives a parameter vector
  that a JVP pushes through ``f(x1)``; no Jacobian of ``x1`` is stored.
* ``"structured"``: for modules whose parameters enter linearly in a known way (``nn.Linear``,
  ``nn.Conv1d/2d/3d``, ``nn.Embedding``, norm layers' affine parameters, ntkit's ``DenseModule``) the
  contribution of each parameter is computed from the layer's inputs and the output cotangents
  (e.g. ``(X1 X2ᵀ) ∘ (G1 G2ᵀ)`` for a dense weight) without building its Jacobian; other parameters use
  Jacobian contraction. See :mod:`ntkit._structured`.

``"auto"`` takes structured derivatives when the model has such modules (else Jacobian contraction), and
NTK-vector products when their FLOP estimate is under half of that. All three are exact (they agree to
round-off; tests check 1e-9 in float64 against brute-force autograd Jacobians), so the choice never changes
the result, only its cost. Output shapes follow NT (see :mod:`ntkit._empirical_core`): ``(N1, N2)`` for the
default ``trace_axes=(-1,)`` (the *mean* over outputs), ``(N1, N2, O, O)`` for ``trace_axes=()``.

Computations run with the fused ``nn.MultiheadAttention`` fast path off and attention on its math backend
(see :func:`~ntkit.empirical.compute_mode`); ``"structured"`` attaches forward hooks to the model's
structured modules for the duration of one computation, so one model must not be used from another thread
meanwhile.

Kernels are per-sample quantities: every implementation evaluates the model one sample at a time. A model
whose output for one sample depends on the other samples of its batch (``x - x.mean(0)``, a softmax or
cumsum over the batch axis, a layer applied over it, BatchNorm in training mode) would get a silently wrong
kernel (all zero for centring), so it is refused with an :class:`EmpiricalError`: the probe pass also runs
the model on three samples ``[x0, xk, x0]`` and compares rows 0 and 2 with ``x0`` alone
(:func:`~ntkit.empirical._model.check_independent`; batches of one sample are exempt, their kernel is exact).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ntkit._memory import BUDGET_ENV, bytes_of, check_fits, memory_budget
from ntkit.empirical._blocks import choose, make, run_blocks
from ntkit.empirical._model import (
    ParamsLike,
    Probe,
    as_input,
    check_eval,
    check_pair,
    compute_mode,
    fixed_params,
    probe,
    resolve_params,
)
from ntkit.empirical._spec import OutSpec, feature_gram
from ntkit.empirical.protocol import IMPLEMENTATIONS, EmpiricalError, Implementation
from ntkit.empirical.structured import _Chain, plan_chain
from ntkit.kernel import Kernel, normalize_get

__all__ = ["empirical_ntk", "empirical_nngp", "empirical_kernel_fn", "ntk_implementation"]


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------
def _checked_inputs(model, x1, x2):
    """Check that ``model`` is a module fit for per-sample kernels and return ``x1``/``x2`` as valid inputs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    x1 = as_input(x1, "x1")
    x2 = None if x2 is None else as_input(x2, "x2")
    check_pair(x1, x2)
    check_eval(model)
    return x1, x2


def _analyse(model, p, x1, x2, fixed) -> tuple[Probe, Optional[_Chain]]:
    """The model's probe record, and its chain analysis when it is a chain of per-sample modules
    (:func:`~ntkit.empirical.structured.plan_chain`: no probe passes); else the probe passes."""
    chain = plan_chain(model, p, fixed or {}, x1)
    if chain is not None:
        return chain.probe, chain
    return probe(model, p, x1, fixed, x2), None


def _prepare(model, x1, x2, params, trace_axes, diagonal_axes):
    x1, x2 = _checked_inputs(model, x1, x2)
    p = resolve_params(model, params)
    fixed = fixed_params(model, p)
    pr, chain = _analyse(model, p, x1, x2, fixed)
    spec = OutSpec(pr.out_shape, trace_axes, diagonal_axes)
    return x1, x2, p, fixed, pr, spec, chain


def empirical_ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    params: ParamsLike = None,
    implementation: str = "auto",
    trace_axes: Union[int, Sequence[int]] = (-1,),
    diagonal_axes: Union[int, Sequence[int]] = (),
    block_size: Union[int, tuple, None] = None,
    memory_budget_bytes: Optional[int] = None,
) -> Tensor:
    """Empirical NTK ``Θ = Σ_θ ∂f(x1)/∂θ · ∂f(x2)/∂θ`` of ``model`` at its current (or given) parameters.

    Args:
      model: any ``nn.Module`` mapping a batch ``(N, ...)`` to one tensor ``(N, *O)`` with samples processed
        independently (BatchNorm in eval mode, dropout off: call ``model.eval()``).
      x1, x2: input batches (``x2=None``: ``x1`` against itself; then only half the blocks are computed).
      params: which parameters to differentiate: ``None`` (all with ``requires_grad``), names, the
        parameter tensors (e.g. ``model.head.parameters()``) or a mapping ``name -> value`` of values to
        evaluate at. Other parameters and buffers are held fixed at the model's values.
      implementation: ``"auto"``, ``"jacobian"``, ``"ntk_vp"`` or ``"structured"`` (module docstring).
      trace_axes: output axes averaged over (NT's convention); default the last axis.
      diagonal_axes: output axes of which only the diagonal is kept (``0``: per-sample kernels).
      block_size: samples per block (an int or ``(b1, b2)``); ``None`` sizes blocks to the memory budget.
      memory_budget_bytes: memory the computation may hold at once (default: a quarter of free memory,
        or ``$NTKIT_MEMORY_BUDGET``; :func:`ntkit.memory.memory_budget`).

    Returns:
      A tensor in the output's dtype: ``(N1, N2)`` for ``f(x)`` of shape ``(N, O)`` with the default
      ``trace_axes``; ``(N1, N2, O, O)`` with ``trace_axes=()``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise EmpiricalError(f"implementation={implementation!r}: choose one of {IMPLEMENTATIONS}.")
    x1, x2, p, fixed, pr, spec, chain = _prepare(model, x1, x2, params, trace_axes, diagonal_axes)
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    dtype = p[next(iter(p))].dtype
    nbytes = bytes_of(spec.shape(x1.shape[0], n2), dtype)
    budget = memory_budget(x1.device, memory_budget_bytes)
    if not (nbytes <= budget and memory_budget_bytes is None and not os.environ.get(BUDGET_ENV)):
        # (a default budget is a quarter of the available memory: a kernel within it fits, no second reading)
        check_fits(
            nbytes,
            x1.device,
            f"the kernel of shape {spec.shape(x1.shape[0], n2)}",
            "trace output axes (trace_axes), take diagonals (diagonal_axes) or pass fewer samples.",
        )
    with compute_mode():
        if implementation == "auto":
            impl = choose(model, p, spec, pr, x1, n2, x2 is None, fixed, chain)
        else:
            impl = make(implementation, model, p, spec, pr, x1, fixed, chain)
        impl.budget = budget
        with impl.active():
            return run_blocks(impl, x1, x2, spec, block_size, budget)


def ntk_implementation(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    implementation: str = "auto",
    trace_axes: Union[int, Sequence[int]] = (-1,),
    diagonal_axes: Union[int, Sequence[int]] = (),
) -> tuple[Implementation, OutSpec]:
    """The empirical-NTK implementation (see :mod:`ntkit.empirical.protocol`) analysed for ``model`` on
    inputs like ``x1``, and its output spec: for callers that evaluate the same model at many parameter
    values (``impl.features(x, params)``, as :mod:`ntkit.monte_carlo` does for sampled networks)."""
    if implementation not in IMPLEMENTATIONS:
        raise EmpiricalError(f"implementation={implementation!r}: choose one of {IMPLEMENTATIONS}.")
    x1t = as_input(x1, "x1")
    x2t = None if x2 is None else as_input(x2, "x2")
    check_pair(x1t, x2t)
    p = resolve_params(model, None)
    pr, chain = _analyse(model, p, x1t, x2t, fixed_params(model, p))
    spec = OutSpec(pr.out_shape, trace_axes, diagonal_axes)
    n2 = x1t.shape[0] if x2t is None else x2t.shape[0]
    with compute_mode():
        if implementation == "auto":
            return choose(model, p, spec, pr, x1t, n2, x2 is None, chain=chain), spec
        return make(implementation, model, p, spec, pr, x1t, chain=chain), spec


def _layer_module(model: nn.Module, layer: Union[str, nn.Module, None]) -> Optional[nn.Module]:
    if layer is None:
        return None
    if isinstance(layer, str):
        mods = dict(model.named_modules())
        if layer not in mods:
            some = ", ".join(n for n in list(mods)[:10] if n)
            raise EmpiricalError(f"layer={layer!r} is not a submodule of the model; submodules: {some}, ...")
        return mods[layer]
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise EmpiricalError(f"layer {type(layer).__name__} is not a submodule of the model.")
        return layer
    raise TypeError(f"layer must be None, a submodule name or a submodule, got {type(layer).__name__}.")


def _features(model: nn.Module, x: Tensor, layer: Optional[nn.Module], params) -> Tensor:
    """Output of ``layer`` (or of the model) on batch ``x``."""
    got: list = []
    if layer is not None:
        h = layer.register_forward_hook(lambda m, i, o: got.append(o))
    try:
        with torch.no_grad(), compute_mode():
            out = torch.func.functional_call(model, params or {}, (x,), tie_weights=True)
    finally:
        if layer is not None:
            h.remove()
    if layer is None:
        return out
    if not got:
        raise EmpiricalError(f"layer {type(layer).__name__} was not called by the model's forward.")
    if len(got) > 1:
        raise EmpiricalError(
            f"layer {type(layer).__name__} is called {len(got)} times per forward; its features "
            f"are ambiguous. Pick a layer called once."
        )
    feats = got[0]
    if not isinstance(feats, Tensor) or feats.dim() < 1 or feats.shape[0] != x.shape[0]:
        raise EmpiricalError(f"layer {type(layer).__name__} does not output one tensor with the batch axis first.")
    return feats


def empirical_nngp(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    layer: Union[str, nn.Module, None] = None,
    params: Optional[dict] = None,
    trace_axes: Union[int, Sequence[int]] = (-1,),
    diagonal_axes: Union[int, Sequence[int]] = (),
) -> Tensor:
    """Empirical NNGP: inner products of features ``φ(x1)·φ(x2) / size(trace_axes)``.

    ``φ`` is the output of ``layer`` (a submodule or its name) or of the model (``layer=None``); trace and
    diagonal axes refer to ``φ``'s axes, as in :func:`empirical_ntk` (a conv layer's ``(N, C, H, W)``
    features averaged over channels: ``trace_axes=(1,)``). ``params`` optionally maps names to values.
    """
    x1, x2 = _checked_inputs(model, x1, x2)
    mod = _layer_module(model, layer)
    vals = None if params is None else resolve_params(model, params)
    try:
        f1 = _features(model, x1, mod, vals)
        f2 = f1 if x2 is None else _features(model, x2, mod, vals)
    except EmpiricalError:
        raise
    except Exception as e:
        raise EmpiricalError(
            f"the model rejected inputs of per-sample shape {tuple(x1.shape[1:])}: {type(e).__name__}: {e}"
        ) from e
    return feature_gram(f1, f2, trace_axes, diagonal_axes)


def empirical_kernel_fn(
    model: nn.Module,
    get: Union[str, Sequence[str]] = ("nngp", "ntk"),
    trace_axes: Union[int, Sequence[int]] = (-1,),
    diagonal_axes: Union[int, Sequence[int]] = (),
    implementation: str = "auto",
    layer: Union[str, nn.Module, None] = None,
    block_size: Union[int, tuple, None] = None,
) -> Callable:
    """A ``kernel_fn(x1, x2=None, get=None, params=None)`` like a network's analytic ``kernel_fn``.

    Returns the empirical NNGP (of ``layer``'s features, default the output) and NTK as a
    :class:`~ntkit.Kernel` (a bare tensor when ``get`` is one name). ``cov1``/``cov2`` hold the per-sample
    NNGP variances (``cov2`` is ``None`` when ``x2`` is ``None``).
    """
    default_get = normalize_get(get)

    def kernel_fn(
        x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = None, params: ParamsLike = None
    ) -> Union[Kernel, Tensor]:
        names, single = default_get if get is None else normalize_get(get)
        vals = None if params is None else resolve_params(model, params)
        res: dict[str, Optional[Tensor]] = {"nngp": None, "ntk": None}
        if "nngp" in names:
            res["nngp"] = empirical_nngp(
                model, x1, x2, layer=layer, params=vals, trace_axes=trace_axes, diagonal_axes=diagonal_axes
            )
        if "ntk" in names:
            res["ntk"] = empirical_ntk(
                model,
                x1,
                x2,
                params=params,
                implementation=implementation,
                block_size=block_size,
                trace_axes=trace_axes,
                diagonal_axes=diagonal_axes,
            )
        if single:
            only = res[names[0]]
            assert only is not None, "the one requested kernel was computed above"
            return only
        dax = (diagonal_axes,) if isinstance(diagonal_axes, int) else tuple(diagonal_axes)
        diag = dax if 0 in dax else (0,) + dax
        cov1 = empirical_nngp(model, x1, None, layer=layer, params=vals, trace_axes=trace_axes, diagonal_axes=diag)
        cov2 = (
            None
            if x2 is None
            else empirical_nngp(model, x2, None, layer=layer, params=vals, trace_axes=trace_axes, diagonal_axes=diag)
        )
        x1t = as_input(x1, "x1")
        x2t = x1t if x2 is None else as_input(x2, "x2")
        return Kernel(
            nngp=res["nngp"],
            ntk=res["ntk"],
            cov1=cov1,
            cov2=cov2,
            shape1=tuple(x1t.shape),
            shape2=tuple(x2t.shape),
            x1_is_x2=x2 is None,
            is_gaussian=False,
            is_input=False,
        )

    return kernel_fn
