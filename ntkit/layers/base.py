"""The layer protocol: every layer is a kernel rule and the finite torch module it is the limit of.

A layer transforms a :class:`~ntkit.kernel.Kernel` (or a list of them, between ``FanOut`` and a ``FanIn``)
with :meth:`Layer.kernel`, and builds its finite-width twin with :meth:`Layer.build`. Shapes handed to
``build`` exclude the batch axis and follow PyTorch's layout: ``(features,)`` or ``(C, *spatial)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ntkit.kernel import Kernel

Shape = tuple[int, ...]
Shapes = Union[Shape, list[Shape]]
Kernels = Union[Kernel, list[Kernel]]

__all__ = ["Layer", "Shape", "Shapes", "Kernels", "single", "LayerError", "Lambda"]


class LayerError(ValueError):
    """An unsupported layer combination or an input a layer cannot take; the message says the fix."""


class Layer:
    """Base class. Subclasses implement ``kernel`` and ``build``.

    Class attributes:
      needs_full_spatial: the layer needs pixel-pixel covariances (pooling); the network then tracks them.
      has_params: the layer has trainable parameters (its width can be overridden in the finite twin).
    """

    needs_full_spatial: bool = False
    has_params: bool = False

    def kernel(self, k: Kernels) -> Kernels:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, in_shape: Shapes, width: Optional[int], generator: torch.Generator,
              readout: bool) -> tuple[nn.Module, Shapes]:  # pragma: no cover - abstract
        """Return the finite module and its output shape.

        ``width`` overrides hidden widths unless ``readout`` (the last parametric layer on its path).
        """
        raise NotImplementedError

    def sublayers(self) -> Sequence["Layer"]:
        return ()

    def requires_full_spatial(self) -> bool:
        return self.needs_full_spatial or any(l.requires_full_spatial() for l in self.sublayers())

    def contains_params(self) -> bool:
        return self.has_params or any(l.contains_params() for l in self.sublayers())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def single(k: Kernels, layer: Layer) -> Kernel:
    """The one kernel a non-branching layer takes; a clear error between FanOut and FanIn."""
    if isinstance(k, list):
        raise LayerError(
            f"{type(layer).__name__} got {len(k)} branches (after FanOut). Wrap per-branch layers in "
            f"parallel(...) or merge the branches first with FanInSum/FanInConcat/FanInProd.")
    return k


def single_shape(s: Shapes, layer: Layer) -> Shape:
    if isinstance(s, list):
        raise LayerError(
            f"{type(layer).__name__} got {len(s)} branches (after FanOut). Wrap per-branch layers in "
            f"parallel(...) or merge the branches first with a FanIn layer.")
    return s


class Lambda(nn.Module):
    """A parameter-free module applying ``fn``; ``name`` is shown in the module's repr."""

    def __init__(self, fn, name: str):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name
