"""ntkit layers: one file per family, each layer a kernel rule beside its finite torch module."""
from ntkit.layers.base import Layer, LayerError
from ntkit.layers.branching import FanInConcat, FanInProd, FanInSum, FanOut
from ntkit.layers.dense import Dense, Identity
from ntkit.layers.elementwise import (ABRelu, Abs, Elementwise, ElementwiseLayer, Erf, LeakyRelu, Relu)

__all__ = ["Layer", "LayerError", "Dense", "Identity", "FanOut", "FanInSum", "FanInConcat", "FanInProd",
           "ElementwiseLayer", "Elementwise", "ABRelu", "Relu", "LeakyRelu", "Abs", "Erf"]
