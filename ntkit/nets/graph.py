"""``GraphNet``: a network whose layers form a directed acyclic graph (what :func:`ntkit.lift` builds from a
``torch.fx`` trace), evaluated node by node on :class:`~ntkit.kernel.Kernel` records.

Rule. Each node applies one layer to the values of its inputs (a single value, or the list of values a
``FanIn`` layer merges). A value used by ``n > 1`` consumers is split with ``FanOut(n)``: its consumers are then
the branches of that ``FanOut``, and the node merging them (``FanInSum``/``FanInProd``/``FanInConcat``) applies the
branch rules of :mod:`ntkit.layers.branching` — including the means' cross terms of non-Gaussian branches (a
ReLU-output skip connection) and the refusal of correlated parameter-free branches. Two consumers of one record
are the same function of it, so a sum of two paths from one node is *exactly*
``serial(FanOut(2), parallel(path_1, path_2), FanInSum())``, and the graph's kernel is that of the equivalent
``serial``/``parallel`` net (Lee et al. 2018 for the layer-by-layer NNGP recursion; Yang 2019 for the
infinite-width limit of arbitrary architectures as tensor programs).

The graph must be series-parallel in the sense of ``FanOut``/``FanIn``: a merge node takes all the branches of
the innermost open ``FanOut`` (nested ``FanOut``s close innermost first). Other graphs raise :class:`LayerError`.
``build`` gives the finite twin, which evaluates the same graph on tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError, Shapes
from ntkit.layers.branching import FanOut
from ntkit.nets.combinators import Net
from ntkit.nets.tiler import apply_layer

__all__ = ["GraphNet", "GraphNode", "graph"]


@dataclasses.dataclass(frozen=True)
class GraphNode:
    """One node: ``layer`` applied to the values named ``inputs`` (one name: a single path; several: a merge)."""

    name: str
    layer: Layer
    inputs: tuple[str, ...]


class _GraphModule(nn.Module):
    """The finite twin: the same graph on tensors (a value with several consumers is simply reused)."""

    def __init__(self, nodes: Sequence[GraphNode], mods: Sequence[nn.Module], input_name: str, output_name: str):
        super().__init__()
        self.node_inputs = [n.inputs for n in nodes]
        self.node_names = [n.name for n in nodes]
        self.mods = nn.ModuleList(mods)
        self.input_name, self.output_name = input_name, output_name

    def forward(self, x):
        values: dict[str, Any] = {self.input_name: x}
        for name, inputs, mod in zip(self.node_names, self.node_inputs, self.mods):
            args = [values[i] for i in inputs]
            values[name] = mod(args[0] if len(args) == 1 else tuple(args))
        return values[self.output_name]


class GraphNet(Net):
    """A DAG of layers (see the module docstring for the rule and the graphs it accepts).

    Args:
      nodes: in topological order; each input name is ``input_name`` or an earlier node's name.
      input_name: the name of the network's input value.
      output_name: the node whose value is the output (default: the last node). Nodes the output does not
        depend on are dropped.
    """

    def __init__(self, nodes: Sequence[GraphNode], input_name: str = "x", output_name: Optional[str] = None):
        nodes = list(nodes)
        if not nodes:
            raise LayerError("GraphNet needs at least one node (use Identity() for the identity).")
        seen = {input_name}
        for n in nodes:
            if not isinstance(n.layer, Layer):
                raise TypeError(f"GraphNet node {n.name!r}: {type(n.layer).__name__} is not an ntkit layer.")
            if n.name in seen:
                raise LayerError(f"GraphNet: the name {n.name!r} is used twice.")
            missing = [i for i in n.inputs if i not in seen]
            if missing or not n.inputs:
                raise LayerError(
                    f"GraphNet node {n.name!r} reads {missing or 'nothing'}: every input must be the input "
                    f"{input_name!r} or an earlier node (give the nodes in topological order)."
                )
            seen.add(n.name)
        out = nodes[-1].name if output_name is None else output_name
        if out not in seen or out == input_name:
            raise LayerError(f"GraphNet: the output {out!r} is not a node.")
        live, need = [], {out}
        for n in reversed(nodes):  # drop the nodes the output does not depend on
            if n.name in need:
                live.append(n)
                need.update(n.inputs)
        self.nodes = tuple(reversed(live))
        self.input_name, self.output_name = input_name, out
        uses = {input_name: 0, **{n.name: 0 for n in self.nodes}}
        for n in self.nodes:
            for i in n.inputs:
                uses[i] += 1
        uses[out] += 1
        self._uses = uses

    # -- structure -----------------------------------------------------------------------------------
    def sublayers(self):
        return tuple(n.layer for n in self.nodes)

    def _with_sublayers(self, layers):
        nodes = [dataclasses.replace(n, layer=l) for n, l in zip(self.nodes, layers)]
        return GraphNet(nodes, self.input_name, self.output_name)

    def input_rank(self) -> Optional[int]:
        for n in self.nodes:  # the layers reading the graph's input fix its rank
            if self.input_name in n.inputs:
                r = n.layer.input_rank()
                if r is not None:
                    return r
        return super().input_rank()

    # -- the rule ------------------------------------------------------------------------------------
    def kernel(self, k):
        if isinstance(k, list):
            raise LayerError("GraphNet takes one path; merge the branches before it.")
        # name -> [(record, stack of open FanOuts as (value name, n))] one entry per consumer still to come
        pending: dict[str, list[tuple[Kernel, tuple[tuple[str, int], ...]]]] = {}

        def put(name: str, rec: Kernel, stack: tuple[tuple[str, int], ...]) -> None:
            n = self._uses[name]
            if n > 1:
                recs = apply_layer(FanOut(n), rec)
                assert isinstance(recs, list)
                pending[name] = [(r, stack + ((name, n),)) for r in recs]
            else:
                pending[name] = [(rec, stack)]

        put(self.input_name, k, ())
        for node in self.nodes:
            args = [pending[i].pop() for i in node.inputs]
            if len(args) == 1:
                rec, stack = args[0]
                out = apply_layer(node.layer, rec)
            else:
                stacks = {s for _, s in args}
                top = next(iter(stacks))[-1] if len(stacks) == 1 and next(iter(stacks)) else None
                if top is None or top[1] != len(args):
                    raise LayerError(
                        f"GraphNet node {node.name!r} ({type(node.layer).__name__}) merges values that are not "
                        f"exactly the branches of one split point: ntkit needs every branch point to be a FanOut "
                        f"whose branches all meet at one merge (series-parallel graph). Restructure the model so "
                        f"that each merge combines all the paths leaving one value."
                    )
                stack = next(iter(stacks))[:-1]
                out = apply_layer(node.layer, [r for r, _ in args])
            if isinstance(out, list):
                raise LayerError(f"GraphNet node {node.name!r} returned {len(out)} branches; it must return one.")
            put(node.name, out, stack)
        return pending[self.output_name][0][0]

    # -- the finite twin -----------------------------------------------------------------------------
    def build(self, in_shape, width, generator: torch.Generator, readout: bool):
        last = max((i for i, n in enumerate(self.nodes) if n.layer.contains_params()), default=-1)
        shapes: dict[str, Shapes] = {self.input_name: in_shape}
        mods = []
        for i, node in enumerate(self.nodes):
            ins = [shapes[j] for j in node.inputs]
            arg: Shapes = ins[0] if len(ins) == 1 else [s for s in ins if not isinstance(s, list)]
            mod, shapes[node.name] = node.layer.build(arg, width, generator, readout and i == last)
            mods.append(mod)
        return _GraphModule(self.nodes, mods, self.input_name, self.output_name), shapes[self.output_name]

    def __repr__(self):
        body = "; ".join(f"{n.name}={n.layer!r}({', '.join(n.inputs)})" for n in self.nodes)
        return f"graph({body}; out={self.output_name})"


def graph(nodes: Sequence[GraphNode], input_name: str = "x", output_name: Optional[str] = None) -> Net:
    """A :class:`GraphNet` of ``nodes`` (see its docstring)."""
    return GraphNet(nodes, input_name, output_name)
