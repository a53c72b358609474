"""NT's top-level API for PyTorch: the names of ``neural_tangents`` (NT 0.6.5) with NT's signatures, so that a
script ports by changing its imports and its arrays.

NT (``import neural_tangents as nt``) → here (``import ntkit.nt as nt``):

* ``nt.empirical_ntk_fn(f, ...)`` → :func:`empirical_ntk_fn`: ``f(params, x)`` a torch function, ``params`` a
  pytree (dict, list, tuple) of tensors
* ``nt.empirical_nngp_fn``, ``empirical_kernel_fn`` → :func:`empirical_nngp_fn`, :func:`empirical_kernel_fn`
* ``nt.empirical_ntk_vp_fn(f, x1, x2, params)`` → :func:`empirical_ntk_vp_fn` (``Θ(x1, x2)·v`` without the NTK)
* ``nt.linearize``, ``nt.taylor_expand`` → :func:`linearize`, :func:`taylor_expand` (functions of ``(params, x)``)
* ``nt.monte_carlo_kernel_fn(init_fn, apply_fn, key, n_samples)`` → :func:`monte_carlo_kernel_fn` (``key``: an
  int seed or a ``torch.Generator``)
* ``nt.batch(kernel_fn, batch_size)`` → :func:`batch` (tiles through :func:`ntkit.tiling.kernel_matrix`)
* ``nt.predict``, ``nt.Kernel``, ``nt.stax`` → :mod:`ntkit.predict`, :class:`ntkit.kernel.Kernel`, :mod:`ntkit.stax`
* ``nt.NtkImplementation`` → :class:`NtkImplementation` (same values)

Differences, all deliberate: inputs are torch tensors or numpy arrays (PyTorch layouts, batch axis first);
``vmap_axes`` other than ``None``/``0`` are refused (ntkit's empirical kernels vmap over the batch axis 0 and
refuse models that mix samples); there is no ``jax.jit`` to apply (the functions run eagerly; NT's docs
recommend jitting kernel functions, ntkit's need no compilation). The kernels follow NT's output conventions:
``trace_axes`` are averaged, ``diagonal_axes`` kept once.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ntkit import predict, stax
from ntkit.empirical import EmpiricalError, empirical_ntk, feature_gram
from ntkit.kernel import Kernel, normalize_get
from ntkit.tiling import kernel_matrix

__all__ = [
    "Kernel",
    "NtkImplementation",
    "batch",
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "empirical_ntk_vp_fn",
    "linearize",
    "monte_carlo_kernel_fn",
    "predict",
    "stax",
    "taylor_expand",
]

Axes = Union[int, Sequence[int]]
ApplyFn = Callable[..., Tensor]


class NtkImplementation(enum.IntEnum):
    """NT's names (and values) for the empirical-NTK algorithms; ntkit's names are in parentheses."""

    AUTO = 0  # "auto"
    JACOBIAN_CONTRACTION = 1  # "jacobian"
    NTK_VECTOR_PRODUCTS = 2  # "ntk_vp"
    STRUCTURED_DERIVATIVES = 3  # "structured"


_IMPLEMENTATION = {0: "auto", 1: "jacobian", 2: "ntk_vp", 3: "structured"}


def _implementation(implementation: Union[int, str, NtkImplementation, None]) -> str:
    if implementation is None:
        return "auto"
    if isinstance(implementation, str):
        return implementation
    if int(implementation) not in _IMPLEMENTATION:
        raise ValueError(f"implementation={implementation!r}: choose a NtkImplementation (0, 1, 2 or 3).")
    return _IMPLEMENTATION[int(implementation)]


def _tensor(x: Any) -> Any:
    """numpy (or array-like, e.g. JAX) arrays to torch tensors, through pytrees; tensors pass unchanged."""
    if isinstance(x, Tensor) or x is None:
        return x
    if isinstance(x, (list, tuple, dict)):
        return pytree.tree_map(_tensor, x)
    if isinstance(x, (int, float)):
        return x
    return torch.from_numpy(np.array(x))


def _check_vmap_axes(vmap_axes: Any) -> None:
    if vmap_axes not in (None, 0, (0, 0, 0), (0, 0)):
        raise ValueError(
            f"vmap_axes={vmap_axes!r}: ntkit's empirical kernels take the batch along axis 0 of the "
            f"inputs and outputs; move it there (e.g. x.movedim(axis, 0))."
        )


class _Functional(nn.Module):
    """``f(params, x, **kwargs)`` as a module whose parameters are the leaves of ``params`` (flattened names
    ``p0, p1, ...``), so that ntkit's module-based empirical kernels apply to NT-style functions."""

    def __init__(self, f: ApplyFn, params: Any, kwargs: dict):
        super().__init__()
        leaves, self._spec = pytree.tree_flatten(_tensor(params))
        if not leaves or not all(isinstance(v, Tensor) for v in leaves):
            raise TypeError("params must be a pytree (dict, list, tuple) of tensors, with at least one tensor.")
        self._f, self._kwargs = f, kwargs
        self._names = [f"p{i}" for i in range(len(leaves))]
        for name, v in zip(self._names, leaves):
            self.register_parameter(name, nn.Parameter(v.detach().clone(), requires_grad=v.is_floating_point()))

    def forward(self, x: Tensor) -> Tensor:
        params = pytree.tree_unflatten([getattr(self, n) for n in self._names], self._spec)
        return self._f(params, x, **self._kwargs)


def empirical_ntk_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    implementation: Union[int, str, NtkImplementation] = NtkImplementation.JACOBIAN_CONTRACTION,
    _j_rules: bool = True,
    _s_rules: bool = True,
    _fwd: Optional[bool] = None,
) -> Callable:
    """NT's ``empirical_ntk_fn``: returns ``ntk_fn(x1, x2, params, **apply_fn_kwargs)`` computing
    ``Θ = J(x1) J(x2)ᵀ`` of ``f(params, x)`` (``x2=None``: ``x1``), traced/diagonalised as NT does
    (:func:`ntkit.empirical.empirical_ntk`). ``_j_rules``, ``_s_rules`` and ``_fwd`` are NT's tuning knobs for
    its structured derivatives and are accepted and ignored (ntkit chooses by its own FLOP estimates)."""
    _check_vmap_axes(vmap_axes)
    impl = _implementation(implementation)

    def ntk_fn(x1: Any, x2: Any, params: Any, **apply_fn_kwargs: Any) -> Tensor:
        module = _Functional(f, params, apply_fn_kwargs)
        return empirical_ntk(
            module, _tensor(x1), _tensor(x2), implementation=impl, trace_axes=trace_axes, diagonal_axes=diagonal_axes
        )

    return ntk_fn


def empirical_nngp_fn(f: ApplyFn, trace_axes: Axes = (-1,), diagonal_axes: Axes = ()) -> Callable:
    """NT's ``empirical_nngp_fn``: ``nngp_fn(x1, x2, params, **kwargs) = f(x1)·f(x2) / size(trace_axes)``."""

    def nngp_fn(x1: Any, x2: Any, params: Any, **apply_fn_kwargs: Any) -> Tensor:
        p = _tensor(params)
        with torch.no_grad():
            f1 = f(p, _tensor(x1), **apply_fn_kwargs)
            f2 = f1 if x2 is None else f(p, _tensor(x2), **apply_fn_kwargs)
        return feature_gram(f1, f2, trace_axes, diagonal_axes)

    return nngp_fn


def empirical_kernel_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    implementation: Union[int, str, NtkImplementation] = NtkImplementation.JACOBIAN_CONTRACTION,
) -> Callable:
    """NT's ``empirical_kernel_fn``: ``kernel_fn(x1, x2=None, get=None, params=None, **kwargs)`` returning the
    empirical NNGP and/or NTK (one name: a tensor; a tuple: a namedtuple in that order; ``None``: both)."""
    nngp_fn = empirical_nngp_fn(f, trace_axes, diagonal_axes)
    ntk_fn = empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation)

    def kernel_fn(
        x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = None, params: Any = None, **apply_fn_kwargs: Any
    ) -> Any:
        if params is None:
            raise ValueError("kernel_fn needs params=... (the parameters the empirical kernel is evaluated at).")
        names, single = normalize_get(get)
        out = {}
        for g in names:
            fn = nngp_fn if g == "nngp" else ntk_fn
            out[g] = fn(x1, x2, params, **apply_fn_kwargs)
        return _package(out, single)

    return kernel_fn


def _package(out: dict, single: bool) -> Any:
    """NT's return conventions: a bare value for one name, else a namedtuple with the names in order."""
    if single:
        return next(iter(out.values()))
    return collections.namedtuple("Kernel", tuple(out))(**out)


def empirical_ntk_vp_fn(f: ApplyFn, x1: Any, x2: Any, params: Any, **apply_fn_kwargs: Any) -> Callable:
    """NT's ``empirical_ntk_vp_fn``: ``ntk_vp(v) = J(x1) J(x2)ᵀ v`` for cotangents ``v`` shaped like
    ``f(params, x2)``, by one VJP and one JVP of the whole batch (no NTK, no per-sample assumption): the cost of
    about ``N1 + N2`` forward passes (Novak et al. 2022, "Fast finite width neural tangent kernel", section L).
    The result is shaped like ``f(params, x1)`` (untraced: NT's convention here)."""
    p = _tensor(params)
    a = _tensor(x1)
    b = a if x2 is None else _tensor(x2)

    def ntk_vp(cotangents: Any) -> Tensor:
        v = _tensor(cotangents)
        vjp = torch.func.vjp(lambda q: f(q, b, **apply_fn_kwargs), p)[1]
        (ct,) = vjp(v)
        return torch.func.jvp(lambda q: f(q, a, **apply_fn_kwargs), (p,), (ct,))[1]

    return ntk_vp


def linearize(f: ApplyFn, params: Any) -> ApplyFn:
    """NT's ``linearize``: ``f_lin(p, x) = f(params, x) + J(params, x)(p − params)`` as a function of
    ``(p, x)`` (one forward and one JVP per call; Lee et al. 2019)."""
    return taylor_expand(f, params, 1)


def taylor_expand(f: ApplyFn, params: Any, degree: int) -> ApplyFn:
    """NT's ``taylor_expand``: ``f_k(p, x) = Σ_{j≤degree} D^j f(params, x)[p − params]^j / j!`` (nested JVPs,
    as :func:`ntkit.empirical.taylor_expand`)."""
    if not (isinstance(degree, int) and degree >= 0):
        raise EmpiricalError(f"degree={degree!r} must be an int >= 0.")
    p0 = _tensor(params)

    def f_expanded(p: Any, x: Any, **kwargs: Any) -> Tensor:
        p1 = _tensor(p)
        dp = pytree.tree_map(lambda a, b: a - b, p1, p0)
        xx = _tensor(x)

        def g_derivs(q: Any, order: int) -> list:
            if order == 0:
                return [f(q, xx, **kwargs)]
            res = torch.func.jvp(lambda r: tuple(g_derivs(r, order - 1)), (q,), (dp,))
            primal, tangent = res[0], res[1]
            return [primal[0], *list(tangent)]

        terms = g_derivs(p0, degree)
        out = terms[0]
        for k in range(1, degree + 1):
            out = out + terms[k] / math.factorial(k)
        return out

    return f_expanded


def _seeds(key: Any, n: int) -> list[int]:
    """``n`` seeds from an int seed or a ``torch.Generator`` (NT's ``random.PRNGKey`` has no torch meaning)."""
    if isinstance(key, torch.Generator):
        return [int(s) for s in torch.randint(0, 2**62, (n,), generator=key)]
    if isinstance(key, (int, np.integer)):
        g = torch.Generator().manual_seed(int(key))
        return [int(s) for s in torch.randint(0, 2**62, (n,), generator=g)]
    raise TypeError(
        f"key must be an int seed or a torch.Generator, got {type(key).__name__} (NT's PRNGKey "
        f"has no torch counterpart: pass e.g. key=0)."
    )


def monte_carlo_kernel_fn(
    init_fn: Callable,
    apply_fn: ApplyFn,
    key: Any,
    n_samples: Union[int, Iterable[int]],
    batch_size: int = 0,
    device_count: int = -1,
    store_on_device: bool = True,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    implementation: Union[int, str, NtkImplementation] = NtkImplementation.JACOBIAN_CONTRACTION,
    _j_rules: bool = True,
    _s_rules: bool = True,
    _fwd: Optional[bool] = None,
) -> Callable:
    """NT's ``monte_carlo_kernel_fn``: the empirical NNGP/NTK averaged over ``n_samples`` networks drawn by
    ``init_fn(seed, input_shape) -> (output_shape, params)`` and applied by ``apply_fn(params, x)`` (e.g. an
    :mod:`ntkit.stax` layer's functions). ``n_samples`` an iterable of ints makes ``kernel_fn`` return a
    generator of the averages at those sample counts, as in NT. ``batch_size``/``device_count``/
    ``store_on_device`` are NT's batching knobs, accepted and ignored (the kernels are computed whole)."""
    ntk_fn = empirical_ntk_fn(apply_fn, trace_axes, diagonal_axes, vmap_axes, implementation)
    nngp_fn = empirical_nngp_fn(apply_fn, trace_axes, diagonal_axes)
    counts = [n_samples] if isinstance(n_samples, (int, np.integer)) else sorted(int(n) for n in n_samples)
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"n_samples={n_samples!r}: give a positive int or an iterable of positive ints.")

    def averages(x1: Any, x2: Any, names: tuple[str, ...], kwargs: dict):
        xt = _tensor(x1)
        seeds = _seeds(key, counts[-1])
        total: dict[str, Tensor] = {}
        for i, seed in enumerate(seeds, 1):
            _, params = init_fn(seed, tuple(xt.shape))
            for g in names:
                k = (nngp_fn if g == "nngp" else ntk_fn)(x1, x2, params, **kwargs)
                total[g] = k if g not in total else total[g] + k
            if i in counts:
                yield {g: v / i for g, v in total.items()}

    def kernel_fn(x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = None, **apply_fn_kwargs: Any):
        names, single = normalize_get(get)
        gen = (_package(k, single) for k in averages(x1, x2, names, apply_fn_kwargs))
        if isinstance(n_samples, (int, np.integer)):
            return next(gen)
        return gen

    return kernel_fn


def batch(kernel_fn: Callable, batch_size: int = 0, device_count: int = -1, store_on_device: bool = True) -> Callable:
    """NT's ``batch``: ``kernel_fn`` computed in tiles of ``batch_size`` samples per side (``0``: ntkit plans
    the tiles under its memory budget), through :func:`ntkit.tiling.kernel_matrix`. ``device_count`` and
    ``store_on_device`` are accepted for NT compatibility (under ``torchrun`` tiles are split across ranks)."""

    def batched(x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = None, **kwargs: Any) -> Any:
        names, single = normalize_get(get)
        fn = kernel_fn if not kwargs else (lambda a, b, g: kernel_fn(a, b, g, **kwargs))
        out = kernel_matrix(fn, _tensor(x1), _tensor(x2), get=names, tile_size=batch_size or None)
        if isinstance(out, Tensor):
            out = {names[0]: out}
        return _package(out, single)

    return batched
