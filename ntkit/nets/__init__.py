"""Networks: ``serial`` and ``parallel`` combinators and :class:`Net` (one description, two objects: the exact
infinite-width kernels and the finite torch module), with the tiler and self-covariance tape behind
``Net.kernel_fn`` (:mod:`ntkit.nets.tiler`). Ready-made architectures live in :mod:`ntkit.architectures`."""

from ntkit.nets.combinators import Net, Parallel, Serial, parallel, repeat, serial
from ntkit.nets.graph import GraphNet, GraphNode, graph

__all__ = ["Net", "Serial", "Parallel", "serial", "parallel", "repeat", "GraphNet", "GraphNode", "graph"]
