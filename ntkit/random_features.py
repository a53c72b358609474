"""Random features for the NNGP and NTK of fully-connected nets: ``K(x, y) ≈ φ(x)·φ(y)``, linear-time KRR.

For a net ``serial(Dense, σ, Dense, σ, ..., Dense)`` (NTK parameterisation) the features follow the kernel
recursion layer by layer, each step an unbiased estimate given the previous one:

* inputs: ``f₀ = x/√d`` (so ``f₀·f₀' = x·x'/d``, ntkit's input covariance);
* ``Dense(W_std, b_std)``: ``g = [W_std f, b_std]`` (``g·g' = W_std² K + b_std²``) and for the NTK
  ``θ ← [W_std θ, g]`` (``Θ' = K' + W_std² Θ``);
* nonlinearity ``σ``: with ``G`` an ``m x dim(g)`` standard Gaussian matrix, ``f = σ(G g)/√m`` and
  ``ḟ = σ'(G g)/√m`` estimate ``E[σ(u)σ(v)]`` and ``E[σ'(u)σ'(v)]`` (for ReLU these are the arc-cosine
  random features of degree 1 and 0, Cho & Saul 2009). The NTK product ``Θ' = Θ·K̇`` is sketched with a
  Gaussian tensor sketch ``θ' = (A θ) ∘ (B ḟ)/√m`` (``A, B`` Gaussian; ``E[θ'·θ''] = (θ·θ')(ḟ·ḟ')``), as in
  the NTK random features of Zandieh et al. (2021), who use the TensorSRHT variant of the same sketch.

Error. For one hidden layer the features are unbiased and the entrywise error is ``O(1/√m)``; with more layers
each layer's estimate enters the next nonlinearly, adding an ``O(1/m)`` bias. Measured relative Frobenius
errors ``‖ΦΦᵀ − K‖_F/‖K‖_F`` halve when ``m`` quadruples (``∝ m^{-1/2}``, tested). KRR on the features costs
``O(n D²)`` (``D`` = feature dimension) instead of ``O(n³)``.

Tested on the ReLU family (``Relu``, ``LeakyRelu``, ``ABRelu``, ``Abs``); any other ntkit elementwise layer
works too (its derivative by autograd), with the same Monte-Carlo guarantee.

Each layer's map is that layer's ``random_features`` hook (in its own file, :mod:`ntkit.layers.base`); this
module only walks the network and applies them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ntkit._inputs import as_batch
from ntkit.layers.base import FeatureMap, Features, FeatureSpec, Layer
from ntkit.layers.dense import Dense
from ntkit.linalg.operators import tmm

__all__ = ["RandomFeatures", "random_features"]


def _leaves(net: Layer) -> list[Layer]:
    """The layers of a ``serial`` net in order (nested ``serial`` flattened); branching is refused."""
    if not net.is_combinator:
        return [net]
    if type(net).__name__ != "Serial":
        raise ValueError("random features support serial(...) nets of Dense and elementwise layers only.")
    out: list[Layer] = []
    for layer in net.sublayers():
        out.extend(_leaves(layer))
    return out


class RandomFeatures:
    """Random features of a fully-connected ntkit net's NNGP or NTK.

    Args:
      net: ``serial`` of ``Dense`` (NTK parameterisation; ``b_std`` allowed) and elementwise layers, ending
        with a ``Dense`` readout.
      in_features: input dimension ``d``.
      num_features: ``m``, features drawn per nonlinearity (the NTK sketch has ``m`` too). The output
        dimension is ``m + 1`` (NNGP, with a bias) or about ``2m + 1`` (NTK).
      get: ``"nngp"`` or ``"ntk"``.
      seed: seeds every random matrix; the same object maps train and test inputs consistently.
      dtype: float64 by default.

    ``rf(x)`` returns ``Φ`` (``N x D``) with ``Φ Φᵀ ≈ net.kernel_fn(x, None, get)``.
    """

    def __init__(
        self,
        net: Any,
        in_features: int,
        num_features: int = 4096,
        get: str = "nngp",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        if get not in ("nngp", "ntk"):
            raise ValueError(f"get={get!r}: choose 'nngp' or 'ntk'.")
        if not (isinstance(num_features, int) and num_features > 0):
            raise ValueError(f"num_features={num_features!r} must be a positive int.")
        self.layers = _leaves(net)
        if not self.layers or not isinstance(self.layers[-1], Dense):
            raise ValueError("the net must end with a Dense readout.")
        self.d, self.m, self.get, self.dtype = int(in_features), int(num_features), get, dtype
        self.seed = int(seed)
        g = torch.Generator().manual_seed(self.seed)
        spec = FeatureSpec(dim=self.d, ntk_dim=0, num_features=self.m, get=get, dtype=dtype)
        self._maps: list[FeatureMap] = []
        for layer in self.layers:
            fmap, spec = layer.random_features(spec, g)
            self._maps.append(fmap)
        self.spec = spec

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return self.spec.dim if self.get == "nngp" else self.spec.ntk_dim

    def __call__(self, x: Any) -> Tensor:
        x = as_batch(x, "x")
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must be (N, {self.d}); got {tuple(x.shape)}.")
        feats = Features(x.to(self.dtype) / math.sqrt(self.d))
        for fmap in self._maps:
            feats = fmap(feats)
        out = feats.f if self.get == "nngp" else feats.theta
        assert out is not None
        return out

    def krr(self, x_train: Any, y_train: Tensor, lam: float) -> Callable[[Any], Tensor]:
        """Kernel ridge regression on the features: ``w = (ΦᵀΦ + λI)⁻¹ Φᵀ y`` (the primal form of
        ``(K + λI)⁻¹ y`` with ``K = ΦΦᵀ``). Returns ``predict(x) = Φ(x) w``; cost ``O(n D² + D³)``."""
        phi = self(x_train)
        yy = y_train.to(self.dtype)
        a = phi.T @ phi + lam * torch.eye(phi.shape[1], dtype=self.dtype)
        w = torch.linalg.solve(a, tmm(phi, yy))
        return lambda x: self(x) @ w


def random_features(net: Any, x: Any, num_features: int = 4096, get: str = "nngp", seed: int = 0) -> Tensor:
    """``Φ`` for inputs ``x`` (``N x d``): ``Φ Φᵀ ≈ net.kernel_fn(x, None, get)``. To map other inputs
    with the same features, keep a :class:`RandomFeatures` object instead."""
    x = as_batch(x, "x")
    return RandomFeatures(net, x.shape[1], num_features, get, seed)(x)
