"""Random features for the NNGP and NTK of fully-connected and convolutional nets: ``K(x, y) ≈ φ(x)·φ(y)``,
linear-time KRR.

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

Convolutional nets with pooling (the CNN-GP / CNTK features of Zandieh et al. 2021, "Scaling neural tangent
kernels via sketching and random features", NeurIPS 2021, here with Gaussian rather than TensorSRHT sketches).
For ``serial(Conv, σ, ..., AvgPool, ..., GlobalAvgPool | Flatten, Dense)`` (e.g.
:func:`ntkit.architectures.myrtle`, :func:`ntkit.architectures.cntk`) the features carry the spatial axes,
``f`` ``(N, D, *S)`` with ``f[y]·f'[y'] ≈ K[y, y']`` (the pixel-pixel covariance), from ``f₀ = x/√C``:

* ``Conv`` (filter ``F``): ``g[y] = [W_std/√|F| · P(f)[y], b_std]`` with ``P(f)[y]`` the patch under the filter
  at output pixel ``y``, so ``g[y]·g'[y'] = W_std² T(K)[y, y'] + b_std²`` (ntkit's conv rule, exactly), and
  ``θ'[y] = [W_std/√|F| · P(θ)[y], g[y]]`` for ``Θ' = W_std² T(Θ) + K'`` — the CNTK's patch structure. The
  nonlinearity after it draws ``G`` ``m x |F|·D`` as ``m`` random filters: ``G g`` is one convolution;
* nonlinearity: as above with the same ``G, A, B`` at every pixel (``E[f[y]·f'[y']] = E[σ(u_y)σ(v_y')]`` for
  every pixel pair; for ReLU the convolutional arc-cosine features);
* ``AvgPool``/``SumPool``: the twin's window sums on ``f`` and ``θ``; ``GlobalAvgPool``: the mean over pixels;
  ``Flatten``: ``flatten(f)/√|S|`` (``mean_y K[y, y]``, ntkit's Flatten rule). All linear, so exact.

Unbiasedness and error are as for dense nets: exactly unbiased with one nonlinearity (any number of linear
layers, convolutions and poolings after it); with more, each nonlinearity adds an ``O(1/m)`` bias; the
relative Frobenius error falls as ``m^{-1/2}`` (both tested in ``tests/test_random_features_cnn.py``). Cost
per image: about ``28 m²·|S|`` multiply-adds per NTK conv layer of ``|S|`` output pixels (3×3 filters),
linear in the number of images, against the exact kernel's ``O(|S|²)`` per *pair* of images.

Each layer's map is that layer's ``random_features`` hook (in its own file, :mod:`ntkit.layers.base`); this
module only walks the network and applies them. Affine layers' outputs may stay unapplied
(:class:`~ntkit.layers.base.PendingAffine`, a convolution's patches) until a nonlinearity projects them; before
any other layer this module materializes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ntkit._inputs import as_batch
from ntkit.layers.base import FeatureMap, Features, FeatureSpec, Layer, LayerError
from ntkit.layers.dense import Dense
from ntkit.layers.elementwise import ElementwiseLayer
from ntkit.linalg.operators import tmm
from ntkit.nets.combinators import serial_leaves

__all__ = ["RandomFeatures", "random_features"]


def _leaves(net: Layer) -> list[Layer]:
    """The layers of a ``serial`` net in order (nested ``serial`` flattened); branching is refused."""
    leaves = serial_leaves(net)
    if not isinstance(leaves, list):
        raise ValueError(
            "random features support serial(...) nets of Dense, Conv, pooling, Flatten and elementwise layers "
            f"only; got {type(leaves).__name__}."
        )
    return leaves


def _resolving(fmap: FeatureMap) -> FeatureMap:
    """``fmap`` applied to the features with any pending affine map (a convolution's patches) materialized."""
    return lambda feats: fmap(feats.resolved())


#: bytes of features one chunk of inputs may hold in flight (``RandomFeatures.__call__`` maps inputs in chunks)
CHUNK_BYTES = 2**28


class RandomFeatures:
    """Random features of an ntkit net's NNGP or NTK (fully-connected or convolutional with pooling).

    Args:
      net: ``serial`` of ``Dense`` / ``Conv`` (NTK parameterisation for the NTK; ``b_std`` allowed), poolings
        (``AvgPool``, ``SumPool``, ``GlobalAvgPool``, ``GlobalSumPool``), ``Flatten`` and elementwise layers,
        ending with a ``Dense`` readout on vectors (pool or flatten the spatial axes before it).
      in_features: input dimension ``d`` (vectors), or the per-sample input shape ``(C, *spatial)`` (images).
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
        in_features: Union[int, Sequence[int]],
        num_features: int = 4096,
        get: str = "nngp",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        if get not in ("nngp", "ntk"):
            raise ValueError(f"get={get!r}: choose 'nngp' or 'ntk'.")
        if not (isinstance(num_features, int) and num_features > 0):
            raise ValueError(f"num_features={num_features!r} must be a positive int.")
        shape = (in_features,) if isinstance(in_features, int) else tuple(in_features)
        if not (1 <= len(shape) <= 4 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise ValueError(
                f"in_features={in_features!r}: give the input dimension d (an int) or the per-sample shape "
                f"(C, *spatial) of images, positive ints with 1 to 3 spatial axes."
            )
        self.layers = _leaves(net)
        if not self.layers or not isinstance(self.layers[-1], Dense):
            raise ValueError("the net must end with a Dense readout.")
        self.in_shape = shape
        self.d, self.m, self.get, self.dtype = int(shape[0]), int(num_features), get, dtype
        self.seed = int(seed)
        g = torch.Generator().manual_seed(self.seed)
        spec = FeatureSpec(dim=self.d, ntk_dim=0, num_features=self.m, get=get, dtype=dtype, spatial=shape[1:])
        self._maps: list[FeatureMap] = []
        per_sample = math.prod(shape)
        for layer in self.layers:
            if isinstance(layer, Dense) and spec.spatial:
                raise LayerError(
                    f"random features: Dense on convolutional features of spatial shape {spec.spatial}; put "
                    f"Flatten() or GlobalAvgPool() before the Dense layer."
                )
            fmap, spec = layer.random_features(spec, g)
            # a nonlinearity projects a pending convolution itself; every other layer gets its input resolved
            self._maps.append(fmap if isinstance(layer, ElementwiseLayer) else _resolving(fmap))
            per_sample = max(per_sample, (spec.dim + spec.ntk_dim) * math.prod(spec.spatial))
        self.spec = spec
        self._per_sample = per_sample

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return self.spec.dim if self.get == "nngp" else self.spec.ntk_dim

    def _map(self, x: Tensor) -> Tensor:
        c = math.sqrt(self.d)
        feats = Features(x.to(self.dtype) / c)
        for fmap in self._maps:
            feats = fmap(feats)
        feats = feats.resolved()
        out = feats.f if self.get == "nngp" else feats.theta
        assert out is not None and out.dim() == 2, "the net ends with a Dense readout on vectors"
        return out

    def __call__(self, x: Any, batch_size: Optional[int] = None) -> Tensor:
        """``Φ`` ``(N, D)`` for inputs ``(N, *in_shape)``, mapped ``batch_size`` inputs at a time (default:
        as many as keep about :data:`CHUNK_BYTES` of features in flight)."""
        x = as_batch(x, "x")
        if tuple(x.shape[1:]) != self.in_shape:
            want = ", ".join(str(v) for v in self.in_shape)
            raise ValueError(f"x must be (N, {want}); got {tuple(x.shape)}.")
        if batch_size is None:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            batch_size = max(1, CHUNK_BYTES // (4 * itemsize * self._per_sample))
        if x.shape[0] <= batch_size:
            return self._map(x)
        return torch.cat([self._map(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])

    def krr(self, x_train: Any, y_train: Tensor, lam: float) -> Callable[[Any], Tensor]:
        """Kernel ridge regression on the features: ``w = (ΦᵀΦ + λI)⁻¹ Φᵀ y`` (the primal form of
        ``(K + λI)⁻¹ y`` with ``K = ΦΦᵀ``). Returns ``predict(x) = Φ(x) w``; cost ``O(n D² + D³)``."""
        phi = self(x_train)
        yy = y_train.to(self.dtype)
        a = phi.T @ phi + lam * torch.eye(phi.shape[1], dtype=self.dtype)
        w = torch.linalg.solve(a, tmm(phi, yy))
        return lambda x: self(x) @ w


def random_features(net: Any, x: Any, num_features: int = 4096, get: str = "nngp", seed: int = 0) -> Tensor:
    """``Φ`` for inputs ``x`` (``N x d``, or images ``(N, C, *spatial)``): ``Φ Φᵀ ≈ net.kernel_fn(x, None,
    get)``. To map other inputs with the same features, keep a :class:`RandomFeatures` object instead."""
    x = as_batch(x, "x")
    shape: Union[int, tuple[int, ...]] = x.shape[1] if x.dim() == 2 else tuple(x.shape[1:])
    return RandomFeatures(net, shape, num_features, get, seed)(x)
