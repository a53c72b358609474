"""What the feature-learning limits need from a network description: its fully-connected skeleton.

μP twins, the DMFT and deep kernel machines are defined here for fully-connected networks
``serial(Dense, φ₁, Dense, φ₂, ..., φ_L, Dense)``: ``L`` hidden layers, each a :class:`~ntkit.layers.Dense`
(weights ``W_std``, optional bias ``b_std``, NTK parameterisation) followed by an elementwise nonlinearity (any
:class:`~ntkit.layers.ElementwiseLayer`), and a Dense readout. Nested ``serial`` and ``Identity`` layers are
flattened away. Anything else is refused with an error naming the layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from ntkit.layers.base import Layer, LayerError
from ntkit.layers.dense import Dense, Identity
from ntkit.layers.elementwise import ElementwiseLayer
from ntkit.nets.combinators import Serial

__all__ = ["FCSpec", "fc_spec", "as_float64"]


def as_float64(x: Any) -> Any:
    """Python numbers and lists as a float64 array (``torch.as_tensor`` would round them to float32 first)."""
    if isinstance(x, (int, float, list, tuple)):
        return np.asarray(x, dtype=np.float64)
    return x


@dataclasses.dataclass(frozen=True)
class FCSpec:
    """A fully-connected net ``Dense_0, φ_1, Dense_1, ..., φ_L, Dense_L``.

    ``dense[ℓ]`` maps layer ``ℓ``'s activations to layer ``ℓ+1``'s pre-activations
    (``h^{ℓ+1} = σ_ℓ W^ℓ φ(h^ℓ)/√N_ℓ + β_ℓ b^ℓ``, ``σ_ℓ = W_std``, ``β_ℓ = b_std`` or 0); ``phis[ℓ-1]`` is ``φ_ℓ``.
    """

    dense: tuple[Dense, ...]
    phis: tuple[ElementwiseLayer, ...]

    @property
    def depth(self) -> int:
        """``L``, the number of hidden layers."""
        return len(self.phis)

    @property
    def out_features(self) -> int:
        return self.dense[-1].out_features

    def sigma(self, l: int) -> float:
        """``σ_ℓ`` (W_std of ``dense[ℓ]``)."""
        return float(self.dense[l].W_std)

    def beta(self, l: int) -> float:
        """``β_ℓ`` (b_std of ``dense[ℓ]``, 0 without a bias)."""
        b = self.dense[l].b_std
        return 0.0 if b is None else float(b)


def _flatten(layer: Layer) -> Iterator[Layer]:
    if isinstance(layer, Serial):
        for sub in layer.layers:
            yield from _flatten(sub)
    elif not isinstance(layer, Identity):
        yield layer


def fc_spec(net: Layer, what: str) -> FCSpec:
    """The fully-connected skeleton of ``net``, or a :class:`LayerError` saying what ``what`` accepts."""
    shape = "serial(Dense(N), φ, Dense(N), φ, ..., Dense(out)) with elementwise φ (Relu, Erf, Gelu, ...)"
    if not isinstance(net, Layer):
        raise TypeError(f"{what} needs an ntkit network ({shape}), got {type(net).__name__}.")
    layers = list(_flatten(net))
    dense: list[Dense] = []
    phis: list[ElementwiseLayer] = []
    for i, layer in enumerate(layers):
        want_dense = i % 2 == 0
        if want_dense and not isinstance(layer, Dense):
            raise LayerError(
                f"{what} needs {shape}; layer {i} is {layer!r} where a Dense layer belongs "
                f"(two nonlinearities in a row, or a layer {what} does not support)."
            )
        if not want_dense and not isinstance(layer, ElementwiseLayer):
            raise LayerError(
                f"{what} needs {shape}; layer {i} is {layer!r} where an elementwise nonlinearity belongs "
                f"(two Dense layers in a row are one linear map: merge them, or put a nonlinearity between)."
            )
        if isinstance(layer, Dense):
            if layer.parameterization != "ntk":
                raise LayerError(
                    f"{what} is defined from the NTK parameterisation (N(0, 1) parameters, 1/√fan_in "
                    f"multipliers); layer {i} is Dense(..., parameterization={layer.parameterization!r}). "
                    f"Use Dense(..., parameterization='ntk') (the default)."
                )
            dense.append(layer)
        else:
            assert isinstance(layer, ElementwiseLayer)
            phis.append(layer)
    if not dense or len(dense) != len(phis) + 1:
        raise LayerError(f"{what} needs {shape} ending with the Dense readout; got {len(layers)} layers.")
    if not phis:
        raise LayerError(f"{what} needs at least one hidden layer ({shape}); the net is a single Dense layer.")
    return FCSpec(tuple(dense), tuple(phis))
