"""ntkit layers: one file per family, each layer a kernel rule beside its finite torch module."""

from ntkit.layers.aggregate import Aggregate, layer_kwargs
from ntkit.layers.attention import GlobalSelfAttention
from ntkit.layers.base import Layer, LayerError, LayoutWarning, NonFiniteKernelError
from ntkit.layers.branching import FanInConcat, FanInProd, FanInSum, FanOut
from ntkit.layers.conv import Conv
from ntkit.layers.conv_variants import ConvLocal, ConvTranspose
from ntkit.layers.dense import Dense, Identity
from ntkit.layers.dot_general import DotGeneral
from ntkit.layers.dropout import Dropout
from ntkit.layers.elementwise import (
    ABRelu,
    Abs,
    Elementwise,
    ElementwiseLayer,
    Erf,
    LeakyRelu,
    Relu,
    Sigmoid_like,
    Sign,
)
from ntkit.layers.elementwise_poly import Hermite, Monomial, Polynomial, RectifiedMonomial
from ntkit.layers.elementwise_smooth import Cos, Exp, ExpNormalized, Gabor, Gaussian, Gelu, Rbf, Sin
from ntkit.layers.index import Index, Slice
from ntkit.layers.maxpool import MaxPool
from ntkit.layers.norm import LayerNorm
from ntkit.layers.pooling import AvgPool, Flatten, GlobalAvgPool, GlobalSumPool, SumPool
from ntkit.layers.resize import ImageResize

__all__ = [
    "Layer",
    "LayerError",
    "NonFiniteKernelError",
    "LayoutWarning",
    "Dense",
    "Identity",
    "FanOut",
    "FanInSum",
    "FanInConcat",
    "FanInProd",
    "ElementwiseLayer",
    "Elementwise",
    "ABRelu",
    "Relu",
    "LeakyRelu",
    "Abs",
    "Erf",
    "Sign",
    "Sigmoid_like",
    "Gelu",
    "Sin",
    "Gabor",
    "Cos",
    "Rbf",
    "Gaussian",
    "Exp",
    "ExpNormalized",
    "Monomial",
    "RectifiedMonomial",
    "Polynomial",
    "Hermite",
    "LayerNorm",
    "Conv",
    "ConvTranspose",
    "ConvLocal",
    "AvgPool",
    "SumPool",
    "MaxPool",
    "GlobalAvgPool",
    "GlobalSumPool",
    "Flatten",
    "GlobalSelfAttention",
    "Aggregate",
    "layer_kwargs",
    "Dropout",
    "Index",
    "Slice",
    "ImageResize",
    "DotGeneral",
]
