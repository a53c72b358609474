"""The model side of empirical kernels: inputs, parameter selection, the evaluation mode, and a probe pass
that measures a model's output shape, FLOPs and activation memory."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ntkit._inputs import as_batch
from ntkit._inputs import check_pair as _check_pair
from ntkit.empirical.protocol import EmpiricalError

__all__ = [
    "ParamsLike",
    "as_input",
    "check_pair",
    "resolve_params",
    "fixed_params",
    "compute_mode",
    "check_eval",
    "single_fn",
    "Probe",
    "probe",
    "check_independent",
]

ParamsLike = Union[None, Mapping[str, Tensor], Iterable[Union[str, Tensor]]]


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------
def as_input(x: Any, name: str) -> Tensor:
    """A batch of model inputs: a tensor (numpy accepted) with a batch axis; any dtype the model takes
    (token ids are integers). Floating inputs must be finite."""
    return as_batch(x, name, min_dim=1, floating=False, error=EmpiricalError).detach()


def check_pair(x1: Tensor, x2: Optional[Tensor]) -> None:
    _check_pair(x1, x2, error=EmpiricalError)


# ---------------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------------
def _canonical_names(model: nn.Module) -> tuple[dict[str, str], dict[int, str]]:
    """alias name -> canonical name (shared parameters have several names), id(param) -> canonical."""
    by_id: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canon = by_id.setdefault(id(p), name)
        alias[name] = canon
    return alias, by_id


def resolve_params(model: nn.Module, params: ParamsLike) -> dict[str, Tensor]:
    """The parameters the kernel differentiates, as ``{canonical name: value}``.

    ``params`` may be ``None`` (every parameter with ``requires_grad``), a mapping ``name -> value`` (values
    to evaluate at, e.g. other weights of the same architecture), names, or the parameter tensors themselves
    (a subset, e.g. ``model.head.parameters()``). Shared (tied) parameters count once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    alias, by_id = _canonical_names(model)
    named = dict(model.named_parameters())
    if params is None:
        out = {n: p.detach() for n, p in named.items() if p.requires_grad}
        if not out:
            raise EmpiricalError(
                "the model has no parameter with requires_grad=True; pass params=... to "
                "choose which parameters the kernel differentiates."
            )
        return out
    if isinstance(params, Tensor):
        params = [params]
    if isinstance(params, Mapping):
        items = list(params.items())
    else:
        items = []
        for p in params:
            if isinstance(p, str):
                items.append((p, None))
            elif isinstance(p, Tensor):
                if id(p) not in by_id:
                    raise EmpiricalError(
                        f"a tensor of shape {tuple(p.shape)} in params is not a parameter of "
                        f"the model; pass the model's own parameters or their names."
                    )
                items.append((by_id[id(p)], None))
            else:
                raise TypeError(f"params entries must be names or parameter tensors, got {type(p).__name__}.")
    unknown = [n for n, _ in items if n not in alias]
    if unknown:
        some = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
        raise EmpiricalError(f"params not in the model: {unknown}; its parameters are: {some}.")
    out = {}
    for n, v in items:
        canon = alias[n]
        ref = named[canon]
        if v is None:
            v = ref
        elif not isinstance(v, Tensor):
            v = torch.as_tensor(np.asarray(v))
        if tuple(v.shape) != tuple(ref.shape):
            raise EmpiricalError(
                f"params[{n!r}] has shape {tuple(v.shape)} but the model's parameter has {tuple(ref.shape)}."
            )
        out[canon] = v.detach().to(device=ref.device, dtype=ref.dtype)
    if not out:
        raise EmpiricalError("params is empty; pass None for all parameters or a non-empty selection.")
    return out


def fixed_params(model: nn.Module, selected: dict[str, Tensor]) -> dict[str, Tensor]:
    """The parameters not differentiated, detached (held fixed; no autograd graph is built through them)."""
    return {n: p.detach() for n, p in model.named_parameters() if n not in selected}


@contextlib.contextmanager
def compute_mode():
    """Settings under which every model composes with ``vmap``/``jacrev``/``jvp``: the fused
    ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` fast path off (it has no forward-mode AD) and
    scaled-dot-product attention on its math backend (the fused CPU kernels have no batching rule)."""
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


_RANDOM_OR_BATCH = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def check_eval(model: nn.Module) -> None:
    """Kernels are per-sample quantities: BatchNorm must use running statistics and dropout be off."""
    bad = [n or type(m).__name__ for n, m in model.named_modules() if m.training and isinstance(m, _RANDOM_OR_BATCH)]
    if bad:
        raise EmpiricalError(
            f"the model is in training mode and has BatchNorm/Dropout modules ({', '.join(bad[:5])}), whose "
            f"outputs then depend on the whole batch or on random draws; call model.eval() first."
        )
    nostats = [
        n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]
    if nostats:
        raise EmpiricalError(
            f"BatchNorm modules without running statistics ({', '.join(nostats[:5])}) normalise with batch "
            f"statistics even in eval mode, coupling samples; build them with track_running_stats=True."
        )


# ---------------------------------------------------------------------------------------------------
# the model as a function of (params, one sample)
# ---------------------------------------------------------------------------------------------------
def single_fn(model: nn.Module):
    """``f(params, x) = model(x[None])[0]`` through ``torch.func.functional_call`` (tied weights follow)."""

    def f(p: dict, x: Tensor) -> Tensor:
        return torch.func.functional_call(model, p, (x.unsqueeze(0),), tie_weights=True).squeeze(0)

    return f


class Probe:
    """One forward pass on one sample: output shape, FLOPs, bytes saved for backward per sample.

    ``saved_bytes`` starts as an upper bound (everything one sample's pass saves, weights included);
    :meth:`refine` replaces it by the per-sample increment measured from a pass on two samples.
    """

    def __init__(self, out_shape, flops, saved_bytes, refine=None):
        self.out_shape, self.flops, self.saved_bytes = out_shape, flops, saved_bytes
        self._refine = refine

    def refine(self) -> bool:
        """Measure the per-sample activation bytes (once); True if the estimate changed."""
        if self._refine is None:
            return False
        new, self._refine = self._refine(), None
        changed = new != self.saved_bytes
        self.saved_bytes = new
        return changed


class _FlopCount(torch.overrides.TorchFunctionMode):
    """Multiply-add FLOPs of the matrix products and convolutions a forward pass calls (shapes only: the
    estimate ``auto`` needs, without re-dispatching every operation as ``torch.utils.flop_counter`` does)."""

    _MM: frozenset = frozenset(
        {
            torch.matmul,
            torch.mm,
            torch.bmm,
            torch.Tensor.__matmul__,
            torch.Tensor.matmul,
            torch.Tensor.mm,
            torch.Tensor.bmm,
            torch.nn.functional.linear,
            torch.addmm,
            torch.baddbmm,
        }
    )
    _CONV: frozenset = frozenset(
        {
            torch.nn.functional.conv1d,
            torch.nn.functional.conv2d,
            torch.nn.functional.conv3d,
            torch.conv1d,
            torch.conv2d,
            torch.conv3d,
        }
    )

    def __init__(self):
        super().__init__()
        self.flops = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            if func in self._MM and isinstance(out, Tensor):
                a = args[1] if func in (torch.addmm, torch.baddbmm) else args[0]
                self.flops += 2.0 * out.numel() * a.shape[-1]
            elif func in self._CONV and isinstance(out, Tensor):
                w = args[1] if len(args) > 1 else kwargs["weight"]
                self.flops += 2.0 * out.numel() * w[0].numel()
            elif func is torch.nn.functional.scaled_dot_product_attention:
                q, k = args[0], args[1]
                self.flops += 4.0 * q.numel() * k.shape[-2]
        except Exception:  # pragma: no cover - an estimate only
            pass
        return out


def probe(
    model: nn.Module,
    params: dict[str, Tensor],
    x1: Tensor,
    fixed: Optional[dict] = None,
    x2: Optional[Tensor] = None,
) -> Probe:
    """Run the model on ``x1[:1]``: check it accepts the inputs, preserves the batch axis and returns one
    floating tensor; measure its FLOPs and, from a second pass on ``x1[:2]``, the activation bytes it saves
    for backward per sample (the difference between the two passes: weights and other per-batch constants
    cancel). When ``x1`` (or ``x2``) holds more than one sample, also check that the model treats samples
    independently (:func:`check_independent`)."""
    leaves = {n: v.detach().requires_grad_(True) if v.is_floating_point() else v for n, v in params.items()}
    leaves.update(fixed or {})

    def run(x: Tensor, count_flops: bool):
        saved, seen = [0], set()

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                saved[0] += t.untyped_storage().nbytes()
            return t

        fc = _FlopCount() if count_flops else contextlib.nullcontext()
        with compute_mode(), torch.enable_grad(), fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = torch.func.functional_call(model, leaves, (x,), tie_weights=True)
        return out, (fc.flops if isinstance(fc, _FlopCount) else 0.0), saved[0]

    try:
        out, flops, saved1 = run(x1[:1], True)
    except Exception as e:  # the model's own error, re-raised with what we passed
        raise EmpiricalError(
            f"the model rejected inputs of per-sample shape {tuple(x1.shape[1:])} and dtype "
            f"{x1.dtype}: {type(e).__name__}: {e}" + _needs_batch(model, leaves, x1)
        ) from e
    if not isinstance(out, Tensor):
        raise EmpiricalError(
            f"the model returned {type(out).__name__}; empirical kernels need a model that "
            f"returns one tensor (wrap it to select the output)."
        )
    if out.dim() < 1 or out.shape[0] != 1:
        raise EmpiricalError(
            f"the model mapped a batch of 1 sample to an output of shape {tuple(out.shape)}; "
            f"its first output axis must be the batch axis."
        )
    if not out.is_floating_point():
        raise EmpiricalError(f"the model's output has dtype {out.dtype}; kernels need floating outputs.")
    if max(x1.shape[0], 0 if x2 is None else x2.shape[0]) > 1:
        values = {n: v.detach() for n, v in leaves.items()}
        check_independent(
            lambda x: torch.func.functional_call(model, values, (x,), tie_weights=True), x1, x2, out.detach()
        )

    def refine() -> int:
        return max(0, run(x1[:2], False)[2] - saved1)

    return Probe(tuple(out.shape[1:]), float(flops), saved1, refine if x1.shape[0] > 1 else None)


# ---------------------------------------------------------------------------------------------------
# samples must be processed independently
# ---------------------------------------------------------------------------------------------------
def _needs_batch(model: nn.Module, leaves: dict, x1: Tensor) -> str:
    """For the error of a model that rejected one sample: a hint when it accepts the whole batch ``x1``."""
    if x1.shape[0] == 1:
        return ""
    try:
        with torch.no_grad(), compute_mode():
            torch.func.functional_call(model, leaves, (x1,), tie_weights=True)
    except Exception:
        return ""
    return (
        f". It accepts the batch of {x1.shape[0]} samples but not one sample: empirical kernels evaluate the "
        f"model one sample at a time, as model(x[i:i+1]), so a model whose output for one sample depends on "
        f"the others (a layer over the batch axis) is not supported; make its forward treat samples independently."
    )


_MIXING_FIX = (
    "empirical kernels are per-sample quantities, computed one sample at a time as model(x[i:i+1]), so "
    "they would silently be wrong (all zero for x - x.mean(0)). Make the forward treat samples independently "
    "(no mean, softmax, cumsum, sort or layer over the batch axis 0; BatchNorm with running statistics: "
    "model.eval()); for the NTK of the batch as one function, pass the batch as one sample of a wrapper, "
    "lambda xb: model(xb[0])[None], on x[None] with trace_axes=()."
)


def _mixing_tol(dtype: torch.dtype) -> float:
    """Normwise relative difference between batched and per-sample outputs taken as round-off: batch sizes
    may select other kernels (GEMV/GEMM, cuDNN algorithms, TF32 on GPUs), never an O(1) change."""
    eps = torch.finfo(dtype).eps
    return 1e-6 if eps < 1e-10 else 1e-2 if eps < 1e-5 else 0.25


def _probe_batch(x1: Tensor, x2: Optional[Tensor]) -> Tensor:
    """The probe batch ``[x0, xk, x0]``: ``x0 = x1[0]`` (the sample of the probe pass) on both sides of ``xk``,
    the first of ``x1[1:8]`` then ``x2[:8]`` that differs from it (``x0`` again if none does)."""
    pool = x1[:8] if x2 is None else torch.cat([x1[:8], x2[:8]])
    differs = (pool != pool[:1]).reshape(pool.shape[0], -1).any(1).nonzero()
    k = int(differs[0, 0]) if differs.numel() else 0
    return pool[[0, k, 0]]


def check_independent(fn: Callable[[Tensor], Any], x1: Tensor, x2: Optional[Tensor], out0: Tensor) -> None:
    """Refuse a model whose output for one sample depends on the other samples of its batch.

    ``fn`` is the model on a batch (parameters held fixed), ``out0`` its output on ``x1[:1]`` (the probe
    pass). One more pass, on the batch ``[x0, xk, x0]`` (:func:`_probe_batch`), must give ``out0`` in rows
    0 and 2 to round-off (:func:`_mixing_tol`): row 0 sees the samples after it and row 2 those before it, so
    the one pass catches mixing in either direction (centring, softmax, cumsum or sort over the batch axis,
    layers applied over it, batch statistics), also through ``torch.no_grad``/``detach`` code, for integer
    inputs (token ids) too, and factors of the batch size and output shapes that change with it. The
    comparison is normwise, relative to the largest output of the batch.

    A model that takes one sample but not three (``x.view(1, -1)``) is left alone (it is evaluated one
    sample at a time anyway). A mismatch that comes from random draws (the same sample twice gives two
    outputs) is reported as such. Cost: one forward pass on three samples, without autograd.

    (A cross-derivative test, exact where this one needs a tolerance, costs a backward pass more, or a
    forward-mode JVP, which torch runs ~20x slower than the forward on an MLP; values catch the O(1) mixing
    that makes per-sample kernels wrong, e.g. an all-zero NTK for ``x - x.mean(0)``.)
    """
    X = _probe_batch(x1, x2)
    try:
        with torch.no_grad(), compute_mode():
            out3 = fn(X)
    except Exception:  # the model takes one sample only: per-sample evaluation is all there is
        return
    if not isinstance(out3, Tensor) or out3.shape[:1] != (3,) or out3.shape[1:] != out0.shape[1:]:
        shape = tuple(out3.shape) if isinstance(out3, Tensor) else type(out3).__name__
        raise EmpiricalError(
            f"the model maps a batch of 3 samples to an output of shape {shape} but one sample to "
            f"{tuple(out0.shape)}: its output depends on the batch; " + _MIXING_FIX
        )
    d = _mixing(out3, out0)
    tol = _mixing_tol(out0.dtype)
    if d <= tol:
        return
    with torch.no_grad(), compute_mode():
        again = fn(X[:1])
    if _mixing(again.expand_as(out3), out0) > tol:
        raise EmpiricalError(
            "the model gives different outputs for the same input on two calls (random operations in its "
            "forward: dropout with training=True, torch.rand...); empirical kernels need a deterministic "
            "model: turn the randomness off (model.eval(), fixed masks)."
        )
    raise EmpiricalError(
        f"the model's output for a sample in a batch of 3 differs from its output for the sample alone (by "
        f"{d:.1e}, relative): the output for one sample depends on the other samples in its batch; " + _MIXING_FIX
    )


def _mixing(out3: Tensor, out0: Tensor) -> float:
    """``max(‖out3[0] - out0‖, ‖out3[2] - out0‖) / max(‖out3[r]‖, ‖out0‖)`` in float64 over finite entries
    (``inf`` where rows 0 and 2 are not finite where ``out0`` is; 0 for all-zero outputs)."""
    a, b = out3.detach().double(), out0.detach().double()[0]
    fin = b.isfinite()
    if not (torch.equal(a[0].isfinite(), fin) and torch.equal(a[2].isfinite(), fin)):
        return math.inf
    a = torch.where(a.isfinite(), a, 0.0)
    b = torch.where(fin, b, 0.0)
    scale = max(float(a.reshape(3, -1).norm(dim=1).max()), float(b.norm()))
    diff = max(float((a[0] - b).norm()), float((a[2] - b).norm()))
    return 0.0 if scale == 0 else diff / scale
