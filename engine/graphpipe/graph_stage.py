"""A stage that runs a piece of an ``fx`` graph, with distinct values on each edge.

A :class:`GraphStage` holds one :class:`Piece`: an ``fx.GraphModule`` over the stage's own
operators (sharing the model's submodules and parameters, never copies). Its inputs are the
values on its input edges, in edge order -- each edge carries a tuple of the producer's
values that this stage needs (values it computed or relays) -- or, for a source stage, the
user's micro-batch (``model(*inputs)``: the placeholders it reads). Its output is a tuple
with one tuple of values per output edge, or, for the sink, the model's output (then the
loss). The four edge hooks of :class:`~pipetrain.stage.Stage` map these tuples onto the
edges one to one, so each value moves along its own edge, and each edge's gradient comes
back on that edge alone (a value sent to several stages gets the sum of their gradients
from autograd, as unsplit).
"""

from __future__ import annotations

from typing import Any, List, Sequence

from torch import fx, nn

from pipetrain.stage import Stage

__all__ = ["GraphStage", "Piece", "build_piece"]


class Piece(nn.Module):
    """The stage's sub-graph. ``placeholders``: for a source, the model-argument positions
    it reads from the user's micro-batch; ``None`` otherwise (inputs come from edges)."""

    def __init__(self, module: fx.GraphModule, placeholders: Any) -> None:
        super().__init__()
        self.module = module
        self.placeholders = placeholders

    def forward(self, x: Any) -> Any:
        if self.placeholders is not None:       # a source: the user's micro-batch
            args = x if isinstance(x, (tuple, list)) else (x,)
            return self.module(*[args[i] for i in self.placeholders])
        return self.module(*[v for edge in x for v in edge])


def build_piece(gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Sequence[str],
                outputs: Sequence[Sequence[str]], result: Any = None) -> fx.GraphModule:
    """An ``fx.GraphModule`` with one placeholder per name in ``inputs``, running ``nodes``
    (of ``gm``, in order) and returning ``result`` (the sink: the model's output structure,
    nodes by name) or one tuple per entry of ``outputs`` (names)."""
    g = fx.Graph()
    env = {}
    for name in inputs:
        env[name] = g.placeholder(name)
    for n in nodes:
        env[n.name] = g.node_copy(n, lambda a: env[a.name])
    if result is not None:
        g.output(fx.node.map_arg(result, lambda a: env[a.name]))
    else:
        g.output(tuple(tuple(env[name] for name in edge) for edge in outputs))
    return fx.GraphModule(gm, g)


class GraphStage(Stage):
    """A :class:`~pipetrain.stage.Stage` whose single layer is a :class:`Piece`; the edge
    hooks pass one tuple of values per edge (see the module docstring)."""

    def join_inputs(self, values: List[Any]) -> Any:
        return tuple(values)

    def split_outputs(self, out: Any) -> List[Any]:
        return list(out)

    def join_output_grads(self, grads: List[Any]) -> Any:
        return tuple(grads)

    def split_input_grads(self, grad_inputs: Any) -> List[Any]:
        if grad_inputs is None:
            return [None] * len(self.inputs)
        return list(grad_inputs)
