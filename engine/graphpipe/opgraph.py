"""The operator graph GraphPipe partitions: operators with costs, edges = data flow.

An :class:`OpGraph` is a DAG. Each operator (:class:`Op`) carries

* ``forward`` / ``backward``: seconds per *sample* (profile a micro-batch, divide by its size);
* ``activation``: bytes per sample the operator keeps for its backward (its output);
* ``params``: parameter bytes (weights only; optimizer state is a factor in the cost model);
* ``module``: an optional module path (``"encoder.layers.3.attn"``) for builders that come
  from ``torch.fx`` (``node.target`` of a ``call_module`` node); purely informative here.

Edges ``(producer, consumer)`` say the consumer reads the producer's output. Operators are
addressed by name; inside the algorithm by their index (insertion order).

Building by hand::

    g = OpGraph()
    g.add("embed", forward=1e-3, backward=2e-3, activation=4096, params=1 << 20)
    g.add("attn", forward=..., inputs=["embed"])
    g.add_edge("embed", "mlp")

A ``torch.fx`` builder is then a loop over ``graph_module.graph.nodes``: ``add(node.name,
module=str(node.target), inputs=[a.name for a in node.all_input_nodes], **profiled_costs)``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["Op", "OpGraph"]


@dataclasses.dataclass
class Op:
    """One operator. Times in seconds per sample, sizes in bytes (activation: per sample)."""

    name: str
    forward: float = 0.0
    backward: float = 0.0
    activation: float = 0.0
    params: float = 0.0
    module: Optional[str] = None

    @property
    def work(self) -> float:
        """Forward + backward seconds per sample."""
        return self.forward + self.backward


class OpGraph:
    """A DAG of operators. Add operators first (or with ``inputs=``), then edges."""

    def __init__(self) -> None:
        self.ops: List[Op] = []
        self._index: Dict[str, int] = {}
        self.succ: List[List[int]] = []
        self.pred: List[List[int]] = []

    # --- construction -----------------------------------------------------------------
    def add(self, name: str, forward: float = 0.0, backward: float = 0.0,
            activation: float = 0.0, params: float = 0.0, *, module: Optional[str] = None,
            inputs: Iterable[str] = ()) -> int:
        """Add operator ``name`` (unique) reading the outputs of ``inputs``; return its index."""
        if name in self._index:
            raise ValueError(f"operator {name!r} already in the graph")
        for what, v in (("forward", forward), ("backward", backward),
                        ("activation", activation), ("params", params)):
            if not v >= 0:  # also rejects NaN
                raise ValueError(f"operator {name!r}: {what} must be >= 0, got {v!r}")
        self._index[name] = len(self.ops)
        self.ops.append(Op(name, float(forward), float(backward), float(activation),
                           float(params), module))
        self.succ.append([])
        self.pred.append([])
        for src in inputs:
            self.add_edge(src, name)
        return self._index[name]

    def add_edge(self, producer: str, consumer: str) -> None:
        """Data flows from ``producer`` to ``consumer``. Raises ValueError on a cycle."""
        u, v = self.index(producer), self.index(consumer)
        if u == v:
            raise ValueError(f"self-loop on {producer!r}")
        if v in self.succ[u]:
            return
        # A consumer with no successors yet (the usual case when building in order with
        # inputs=) cannot close a cycle; otherwise search.
        if self.succ[v] and self._reaches(v, u):
            raise ValueError(f"edge {producer!r} -> {consumer!r} would close a cycle")
        self.succ[u].append(v)
        self.pred[v].append(u)

    @classmethod
    def chain(cls, costs: Sequence[Tuple[float, float, float, float]],
              prefix: str = "op") -> "OpGraph":
        """A chain ``op0 -> op1 -> ...`` with ``costs[i] = (fwd, bwd, activation, params)``."""
        g = cls()
        for i, c in enumerate(costs):
            g.add(f"{prefix}{i}", *c, inputs=[f"{prefix}{i - 1}"] if i else ())
        return g

    # --- queries ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ops)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ValueError(f"no operator named {name!r}") from None

    def names(self, indices: Iterable[int]) -> List[str]:
        return [self.ops[i].name for i in indices]

    @property
    def edges(self) -> List[Tuple[int, int]]:
        """All edges as index pairs, grouped by producer."""
        return [(u, v) for u in range(len(self.ops)) for v in self.succ[u]]

    @property
    def sources(self) -> List[int]:
        return [v for v in range(len(self.ops)) if not self.pred[v]]

    @property
    def sinks(self) -> List[int]:
        return [v for v in range(len(self.ops)) if not self.succ[v]]

    def topological_order(self) -> List[int]:
        """Kahn's algorithm, smallest index first among the ready ones (deterministic)."""
        import heapq
        indeg = [len(p) for p in self.pred]
        ready = [v for v in range(len(self.ops)) if indeg[v] == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            u = heapq.heappop(ready)
            order.append(u)
            for v in self.succ[u]:
                indeg[v] -= 1
                if indeg[v] == 0:
                    heapq.heappush(ready, v)
        return order

    def descendants(self) -> List[int]:
        """Per operator, a bitset (Python int, bit v) of the operators it reaches (not itself)."""
        desc = [0] * len(self.ops)
        for u in reversed(self.topological_order()):
            m = 0
            for v in self.succ[u]:
                m |= desc[v] | (1 << v)
            desc[u] = m
        return desc

    def as_chain(self) -> "OpGraph":
        """The same operators linked as a chain in topological order: the sequential baseline
        (any contiguous split of it is a chain pipeline)."""
        g = OpGraph()
        prev = None
        for u in self.topological_order():
            op = self.ops[u]
            g.add(op.name, op.forward, op.backward, op.activation, op.params, module=op.module,
                  inputs=[prev] if prev is not None else ())
            prev = op.name
        return g

    def _reaches(self, a: int, b: int) -> bool:
        stack, seen = [a], {a}
        while stack:
            u = stack.pop()
            if u == b:
                return True
            for v in self.succ[u]:
                if v not in seen:
                    seen.add(v)
                    stack.append(v)
        return False

    def __repr__(self) -> str:
        return f"OpGraph({len(self.ops)} ops, {sum(map(len, self.succ))} edges)"
