"""The layer contract: everything a layer provides, in that layer's own file, and the registries that collect it.

A layer is a kernel rule beside the finite torch module whose infinite-width limit that rule is. Everything
ntkit knows about a layer is in its class (one family per file of ``ntkit/layers/``); the rest of ntkit only
calls these methods, it never re-implements a layer.

Required
  ``kernel(k) -> k'``
      the kernel rule on a :class:`~ntkit.kernel.Kernel` record (a list of records between ``FanOut`` and a
      ``FanIn``). It must also accept *pair-only* records (``cov1 = cov2 = None``, the same-pixel variances
      in ``var1``/``var2``): the tiler runs the off-diagonal tiles of full-spatial kernels that way and
      refreshes ``var1``/``var2`` after every layer itself, so a rule only has to skip the ``None``
      self-covariances (and use :meth:`~ntkit.kernel.Kernel.variances`, which reads either form).
  ``build(in_shape, width, generator, readout) -> (module, out_shape)``
      the finite twin; ``in_shape`` excludes the batch axis (``(features,)`` or ``(C, *spatial)``); ``width``
      overrides hidden widths unless ``readout``; parameters are drawn in float64 on the CPU from
      ``generator`` (:func:`gaussian`) — :meth:`ntkit.nets.Net.module` casts the whole module afterwards.
Declared
  ``needs_full_spatial`` (pooling: pixel-pixel covariances), ``has_params``; ``input_rank()``.
Optional hooks (absent: the feature refuses the layer with an error naming it)
  ``random_features(spec, generator) -> (map, spec')``   :mod:`ntkit.random_features`
  ``tunables()`` / ``with_tunables(**values)``            :meth:`ntkit.nets.Net.with_hyperparameters`
                                                           (differentiable hyper-parameters, GPyTorch)
  ``@lift_rule(nn.SomeModule)`` in the layer's file       :func:`ntkit.lift` (torch module -> this layer)
  ``structured_uses(x, G, names)`` on the twin module     :mod:`ntkit.empirical` (structured derivatives)

How to add a layer, in ten lines::

    class Cube(RuleLayer):                       # in ntkit/layers/<family>.py
        '''φ(x) = x³: K' = 6 q12³ + 9 q11 q22 q12, K̇ = 18 q12² + 9 q11 q22 (Hermite expansion).'''
        def fn(self, x): return x ** 3           # the finite twin (an elementwise module is built from it)
        def rule(self, q12, q11, q22, need_dot): # K' and K̇ in one pass; must work on pair-only records,
            k = 6 * q12**3 + 9 * q11 * q22 * q12 # which rules written on (q12, q11, q22) do by construction
            return k, (18 * q12**2 + 9 * q11 * q22 if need_dot else None)
    # export it in ntkit/layers/__init__.py and add its case to tests/layers/test_contract.py, which checks
    # the rule against quadrature and Monte Carlo, tiled == untiled, the twin's shapes and NT where NT has it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union, overload

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel

Shape = tuple[int, ...]
Shapes = Union[Shape, list[Shape]]
Kernels = Union[Kernel, list[Kernel]]

__all__ = [
    "Layer",
    "LayerError",
    "NonFiniteKernelError",
    "LayoutWarning",
    "LiftError",
    "Shape",
    "Shapes",
    "Kernels",
    "single",
    "single_shape",
    "Lambda",
    "gaussian",
    "FeatureSpec",
    "Features",
    "FeatureMap",
    "PendingAffine",
    "channel_matmul",
    "LinearUse",
    "LiftOptions",
    "lift_rule",
    "LIFT_RULES",
]


class LayerError(ValueError):
    """An unsupported layer combination or an input a layer cannot take; the message says the fix."""


class NonFiniteKernelError(LayerError):
    """A kernel came out Inf or NaN (overflow, or a rule outside its range); the message names the first layer
    whose output is not finite, and the fix (scale the inputs, smaller ``W_std``/``b_std``, float64)."""


class LayoutWarning(UserWarning):
    """Inputs that look channels-last (``(N, H, W, C)``) given to a network that reads ``(N, C, *spatial)``.

    Silence it, once the layout is right, with ``warnings.filterwarnings("ignore", category=ntkit.LayoutWarning)``
    (or move the channels first: ``x.permute(0, 3, 1, 2)``; NT-layout code can use :mod:`ntkit.stax`)."""


def warn_if_channels_last(x: Any, where: str) -> None:
    """Warn (:class:`LayoutWarning`) when image-like inputs are very likely channels-last: the last axis has 1 or 3
    entries (grey or RGB channels) while every axis ntkit reads as channels or spatial before it has ≥ 8."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) in (3, 4, 5) and shape[-1] in (1, 3) and all(s >= 8 for s in shape[1:-1]):
        import warnings

        perm = ", ".join(str(i) for i in (0, len(shape) - 1, *range(1, len(shape) - 1)))
        warnings.warn(
            f"{where}: inputs of shape {shape} look channels-last (N, *spatial, C) with C = {shape[-1]}, but ntkit "
            f"reads (N, C, *spatial): here C = {shape[1]} and the last spatial axis has {shape[-1]} entries. Move "
            f"the channels first (x.permute({perm})) "
            f"or use ntkit.stax for NT's layouts; if the layout is right, silence this with "
            f"warnings.filterwarnings('ignore', category=ntkit.LayoutWarning).",
            LayoutWarning,
            stacklevel=3,
        )


class LiftError(ValueError):
    """A torch module or call that ``ntkit.lift`` cannot map; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------
# random features (hook: Layer.random_features)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Sizes of the random features at one point of a network.

    ``dim``: width of the NNGP features ``f`` (``f·f' ≈ K``); ``ntk_dim``: width of the NTK features ``θ``
    (``θ·θ' ≈ Θ``; 0 before the first parametric layer); ``num_features``: ``m``, features drawn per
    nonlinearity; ``get``: ``"nngp"`` or ``"ntk"``; ``gaussian``: ``f`` is an affine layer's output (what a
    nonlinearity needs); ``spatial``: the spatial shape of convolutional features (``f`` is then
    ``(N, dim, *spatial)`` and ``f[:, :, y]·f'[:, :, y'] ≈ K[y, y']``, the pixel-pixel covariance); ``()`` for
    vectors.
    """

    dim: int
    ntk_dim: int
    num_features: int
    get: str
    dtype: torch.dtype
    gaussian: bool = False
    spatial: tuple[int, ...] = ()


def channel_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``weight`` ``(m, D)`` applied along the feature axis of ``x`` ``(N, D, *spatial)``: ``(N, m, *spatial)``
    (the same matrix at every pixel)."""
    if x.dim() == 2:
        return x @ weight.T
    return torch.matmul(weight, x.flatten(2)).reshape((x.shape[0], weight.shape[0]) + tuple(x.shape[2:]))


class PendingAffine:
    """An affine layer's random features held unapplied (e.g. a convolution's patches, ``|F|`` times wider
    than its input), so that a following random projection runs as one convolution instead.

    ``Features.f``/``theta`` then hold the layer's *inputs*; the true features are ``materialize(feats)``.
    ``project(feats, weight, which)`` returns ``weight @ v`` along the feature axis for the true ``v`` (``"f"``
    or ``"theta"``), with ``weight`` laid out as the columns of the materialized features.
    """

    def materialize(self, feats: Features) -> Features:
        raise NotImplementedError(f"{type(self).__name__} must define materialize(feats).")

    def project(self, feats: Features, weight: Tensor, which: str) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define project(feats, weight, which).")


@dataclasses.dataclass
class Features:
    """Random features of a batch: ``f`` ``(N, dim, *spatial)`` and, for the NTK, ``theta``
    ``(N, ntk_dim, *spatial)``; ``pending``: an affine map not yet applied (:class:`PendingAffine`)."""

    f: Tensor
    theta: Optional[Tensor] = None
    pending: Optional[PendingAffine] = None

    def resolved(self) -> Features:
        """The features with any pending affine map applied."""
        return self if self.pending is None else self.pending.materialize(self)

    def project(self, weight: Tensor, which: str = "f") -> Tensor:
        """``weight`` ``(m, dim)`` applied along the feature axis of ``f`` (or ``theta``): ``(N, m, *spatial)``."""
        if self.pending is not None:
            return self.pending.project(self, weight, which)
        x = self.f if which == "f" else self.theta
        if x is None:
            raise LayerError("NTK random features need a parametric layer (Dense or Conv) before a nonlinearity.")
        return channel_matmul(x, weight)


FeatureMap = Callable[[Features], Features]


# ---------------------------------------------------------------------------------------------------
# structured derivatives (hook: the twin module's structured_uses)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LinearUse:
    """One use ``y[t, g·fout + d] = Σ_c W[g, d, c]·X[t, g, c]`` of a weight ``W`` (positions ``t``: tokens,
    pixels, patches; groups ``g``): its inputs ``X`` ``(n, T, g, fin)`` and the output cotangents ``G``
    ``(n, M, T, g, fout)`` (``M`` output entries per sample). The weight's NTK contribution is then
    ``Σ_{t,s} (X1[t]·X2[s]) (G1[:, t]·G2[:, s])`` (Novak et al. 2022)."""

    X: Tensor
    G: Tensor


# ---------------------------------------------------------------------------------------------------
# lift (hook: @lift_rule in the layer's file)
# ---------------------------------------------------------------------------------------------------
Std = Union[float, str, None]


@dataclasses.dataclass(frozen=True)
class LiftOptions:
    """How :func:`ntkit.lift` reads a torch model's hyper-parameters.

    ``W_std``/``b_std``: ``"init"`` (PyTorch's default initialisation: weight variance ``1/(3·fan_in)``, i.e.
    ``W_std² = 1/3``, bias variance ``1/(3·fan_in)``), ``"empirical"`` (the parameters' root mean square, scaled
    by ``sqrt(fan_in)`` for weights) or a float; ``parameterization``; ``deg``: quadrature nodes per axis for
    activations without a closed form.
    """

    W_std: Std = "init"
    b_std: Std = "init"
    parameterization: str = "standard"
    deg: int = 25

    def _std(self, value: Std, kind: str, param: Optional[Tensor], fan_in: int) -> Optional[float]:
        if param is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if value == "init":
            return math.sqrt(1 / 3) if kind == "W" else math.sqrt(1 / (3 * fan_in))
        if value == "empirical":
            p = param.detach().double()
            rms = float(p.pow(2).mean().sqrt())
            return rms * math.sqrt(fan_in) if kind == "W" else rms
        raise ValueError(f"{kind}_std={value!r}: give a float, 'init' or 'empirical'.")

    @overload
    def weight_std(self, weight: Tensor, fan_in: int) -> float: ...
    @overload
    def weight_std(self, weight: Optional[Tensor], fan_in: int) -> Optional[float]: ...
    def weight_std(self, weight: Optional[Tensor], fan_in: int) -> Optional[float]:
        """``W_std`` of a layer with this weight and fan-in (``None`` only for no weight)."""
        return self._std(self.W_std, "W", weight, fan_in)

    def bias_std(self, bias: Optional[Tensor], fan_in: int) -> Optional[float]:
        """``b_std`` of a layer with this bias (``None`` for no bias)."""
        return self._std(self.b_std, "b", bias, fan_in)


LiftRule = Callable[[nn.Module, LiftOptions], "Layer"]
#: torch module type -> rule mapping such a module to an ntkit layer (filled by each layer's file)
LIFT_RULES: dict[type, LiftRule] = {}


def lift_rule(*module_types: type) -> Callable[[LiftRule], LiftRule]:
    """Register ``rule(module, options) -> Layer`` as the lift of ``module_types`` (decorator)."""

    def register(rule: LiftRule) -> LiftRule:
        for t in module_types:
            LIFT_RULES[t] = rule
        return rule

    return register


def unsupported(m: nn.Module, why: str) -> LiftError:
    """A :class:`LiftError` for module ``m`` saying why and what to do."""
    return LiftError(f"{m!r}: {why}")


# ---------------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------------
class Layer:
    """Base class of every layer; see the module docstring for the contract.

    Attributes:
      needs_full_spatial: the layer needs pixel-pixel covariances (pooling); the network then tracks them.
      has_params: the layer has trainable parameters (its width can be overridden in the finite twin).
      is_combinator: the layer only arranges other layers (``serial``/``parallel``): the tiler records
        self-covariances after its sublayers, not after it.
      tracks_means: the rule keeps the record's means and branch bookkeeping up to date (see the attribute).
    """

    needs_full_spatial: bool = False
    has_params: bool = False
    is_combinator: bool = False
    #: the rule sets the record's ``mean1``/``mean2``/``mean_kind``/``fresh`` (:class:`~ntkit.kernel.Kernel`);
    #: for layers that do not, the network takes a Gaussian output as zero-mean and fresh and marks any other
    #: output's means unknown (a later FanInSum then refuses rather than guess)
    tracks_means: bool = False
    #: the rule keeps (or builds) the record's ``law``, the residual-stream program of
    #: :mod:`ntkit.layers.residual_law`; for other layers the network drops it (``ntkit.nets.tiler.apply_layer``)
    carries_law: bool = False

    # -- required ------------------------------------------------------------------------------------
    def kernel(self, k: Kernels) -> Kernels:
        """The kernel rule (see the module docstring, including pair-only records)."""
        raise NotImplementedError(f"{type(self).__name__} must define kernel(k), its kernel rule.")

    def build(
        self, in_shape: Shapes, width: Optional[int], generator: torch.Generator, readout: bool
    ) -> tuple[nn.Module, Shapes]:
        """Return the finite module and its output shape (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must define build(...), its finite twin.")

    # -- structure -----------------------------------------------------------------------------------
    def sublayers(self) -> Sequence[Layer]:
        return ()

    def requires_full_spatial(self) -> bool:
        return self.needs_full_spatial or any(sub.requires_full_spatial() for sub in self.sublayers())

    def contains_params(self) -> bool:
        return self.has_params or any(sub.contains_params() for sub in self.sublayers())

    def input_rank(self) -> Optional[int]:
        """Rank the inputs must have, if this layer fixes it (``None``: any)."""
        return None

    # -- optional hooks ------------------------------------------------------------------------------
    def random_features(self, spec: FeatureSpec, generator: torch.Generator) -> tuple[FeatureMap, FeatureSpec]:
        """The random-feature map of this layer and the feature sizes after it (:mod:`ntkit.random_features`)."""
        raise LayerError(
            f"{type(self).__name__} has no random-feature map; compute its kernel with "
            f"ntkit.tiling.kernel_matrix (or approximate it with ntkit.linalg.nystrom) instead."
        )

    def tunables(self) -> dict[str, Any]:
        """Differentiable hyper-parameters by name (e.g. ``{"W_std": 1.5, "b_std": 0.1}``); none by default."""
        return {}

    def with_tunables(self, **values: Any) -> Layer:
        """A copy of this layer with some :meth:`tunables` replaced (floats or tensors; the layer itself is
        not modified). The kernel rule of the copy is a differentiable function of tensor values."""
        known = self.tunables()
        bad = sorted(set(values) - set(known))
        if bad:
            raise LayerError(f"{type(self).__name__} has no tunable {bad}; its tunables are {sorted(known)}.")
        new = copy.copy(self)
        for name, v in values.items():
            setattr(new, name, v)
        return new

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def single(k: Kernels, layer: Layer) -> Kernel:
    """The one kernel a non-branching layer takes; a clear error between FanOut and FanIn."""
    if isinstance(k, list):
        raise LayerError(
            f"{type(layer).__name__} got {len(k)} branches (after FanOut). Wrap per-branch layers in "
            f"parallel(...) or merge the branches first with FanInSum/FanInConcat/FanInProd."
        )
    return k


def single_shape(s: Shapes, layer: Layer) -> Shape:
    """The one shape a non-branching layer's twin takes."""
    if isinstance(s, list):
        raise LayerError(
            f"{type(layer).__name__} got {len(s)} branches (after FanOut). Wrap per-branch layers in "
            f"parallel(...) or merge the branches first with a FanIn layer."
        )
    return s


def gaussian(shape: Sequence[int], generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal parameters for a finite twin: drawn in float64 on the CPU, so that a seed gives the same
    network on every device and dtype (the module is cast afterwards)."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64)


class Lambda(nn.Module):
    """A parameter-free module applying ``fn``; ``name`` is shown in the module's repr."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name
