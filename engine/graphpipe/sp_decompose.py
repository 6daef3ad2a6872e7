"""Series-parallel decomposition of an operator DAG, reducing graphs that are not SP.

We use *vertex* series-parallel composition on the partial order the DAG defines:

* ``Series(A, B, ...)``: every operator of A precedes (reaches) every operator of B, ...
* ``Parallel(A, B, ...)``: no operator of A is comparable with one of B (independent
  branches).

Edges that are implied by longer paths (a residual ``x -> add`` beside ``x -> f -> add``)
do not change the order, so residual blocks stay chains. Decomposing a set S of
operators (always convex here, so paths between its members stay inside it):

1. one operator: a leaf;
2. S splits into several weakly connected components: ``Parallel`` of them;
3. otherwise cut S, in topological order, at every position where the whole prefix
   reaches the whole suffix: ``Series`` of the pieces (each piece then has no cut left);
4. a connected S with no cut is not series-parallel (it contains an "N": operators a, b,
   c, d with a->c, b->c, b->d and a, d / a, b / c, d pairwise independent).

**Reduction rule (step 4).** Instead of refusing, we merge two operators into one unit and
start again: among all "N" patterns inside S formed by edges of the transitive reduction
(a->c, b->c, b->d with a||b, c||d, a||d), take the *middle edges* b->c and merge the one whose
two ends have the least forward+backward time (ties: the earliest in topological order).
A transitive-reduction edge has no other path between its ends, so the merged graph stays
acyclic and the merged unit is convex; each merge removes one unit, so this ends. (If no
such N is found -- the N may be induced by longer paths -- the cheapest transitive-reduction
edge inside S is merged instead.) The merged operators always land in the same stage.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from pipetrain.graphpipe.opgraph import OpGraph

__all__ = ["SPNode", "SPTree", "decompose"]


@dataclasses.dataclass
class SPNode:
    """A node of the SP tree. ``kind`` is ``"leaf"``, ``"series"`` or ``"parallel"``.

    ``unit``: for a leaf, the index of its unit (a group of operators, see
    :attr:`SPTree.units`). ``children``: series children in execution order; parallel
    children by first operator. ``ops``: every operator index below, in topological order.
    """

    kind: str
    children: List["SPNode"] = dataclasses.field(default_factory=list)
    unit: int = -1
    ops: List[int] = dataclasses.field(default_factory=list)

    def leaves(self) -> List["SPNode"]:
        if self.kind == "leaf":
            return [self]
        return [leaf for c in self.children for leaf in c.leaves()]

    def __str__(self) -> str:
        return self.render()

    def render(self, graph: Optional[OpGraph] = None, units=None) -> str:
        """``S(a, P(b, c), d)``: S for series, P for parallel; merged units as ``[x+y]``."""
        if self.kind == "leaf":
            ops = units[self.unit] if units is not None else self.ops
            names = graph.names(ops) if graph is not None else [str(o) for o in ops]
            return names[0] if len(names) == 1 else "[" + "+".join(names) + "]"
        inner = ", ".join(c.render(graph, units) for c in self.children)
        return ("S(" if self.kind == "series" else "P(") + inner + ")"


@dataclasses.dataclass
class SPTree:
    """The decomposition: ``root`` over ``units`` (each a list of operator indices, a leaf's
    operators); ``merges`` lists, per reduction step, the operator names merged."""

    graph: OpGraph
    root: SPNode
    units: List[List[int]]
    merges: List[Tuple[str, ...]]

    def __str__(self) -> str:
        return self.root.render(self.graph, self.units)


class NotSeriesParallel(Exception):
    """Internal: the set ``mask`` (of quotient nodes) is connected and has no series cut."""

    def __init__(self, mask: int):
        super().__init__(mask)
        self.mask = mask


def decompose(graph: OpGraph) -> SPTree:
    """The SP tree of ``graph``, reducing non-SP regions by the rule in the module docstring."""
    if len(graph) == 0:
        raise ValueError("empty operator graph")
    units = [[v] for v in graph.topological_order()]
    merges: List[Tuple[str, ...]] = []
    while True:
        q = _Quotient(graph, units)
        try:
            root = q.decompose(q.full)
        except NotSeriesParallel as err:
            b, c = q.reduction_edge(err.mask)
            merged = sorted(units[b] + units[c], key=q.topo_pos.__getitem__)
            merges.append(tuple(graph.names(merged)))
            units = [u for i, u in enumerate(units) if i not in (b, c)] + [merged]
            # Keep units sorted by their first operator's topological position.
            units.sort(key=lambda u: q.topo_pos[u[0]])
            continue
        return SPTree(graph, root, units, merges)


class _Quotient:
    """The DAG of units (groups of operators), units numbered in topological order so that
    bit i of a mask is unit i and ascending bits are a topological order."""

    def __init__(self, graph: OpGraph, units: List[List[int]]):
        self.graph = graph
        self.units = units
        self.topo_pos = {v: i for i, v in enumerate(graph.topological_order())}
        unit_of = {}
        for i, u in enumerate(units):
            for v in u:
                unit_of[v] = i
        n = len(units)
        succ = [set() for _ in range(n)]
        for a, b in graph.edges:
            ua, ub = unit_of[a], unit_of[b]
            if ua != ub:
                succ[ua].add(ub)
        # Units are merged along transitive-reduction edges, so the quotient is a DAG; order
        # it topologically and renumber.
        indeg = [0] * n
        for u in range(n):
            for v in succ[u]:
                indeg[v] += 1
        import heapq
        ready = [(min(self.topo_pos[o] for o in units[u]), u) for u in range(n) if not indeg[u]]
        heapq.heapify(ready)
        order = []
        while ready:
            _, u = heapq.heappop(ready)
            order.append(u)
            for v in succ[u]:
                indeg[v] -= 1
                if not indeg[v]:
                    heapq.heappush(ready, (min(self.topo_pos[o] for o in units[v]), v))
        assert len(order) == n, "quotient graph has a cycle"
        new = {u: i for i, u in enumerate(order)}
        self.units = [units[u] for u in order]
        # Caller indexes units in its own order: keep a map back.
        self.orig = order
        self.succ = [sorted(new[v] for v in succ[u]) for u in order]
        self.pred = [[] for _ in range(n)]
        for u in range(n):
            for v in self.succ[u]:
                self.pred[v].append(u)
        self.desc = [0] * n
        for u in range(n - 1, -1, -1):
            m = 0
            for v in self.succ[u]:
                m |= self.desc[v] | (1 << v)
            self.desc[u] = m
        self.full = (1 << n) - 1
        self.work = [sum(graph.ops[o].work for o in u) for u in self.units]

    def _members(self, mask: int) -> List[int]:
        out = []
        while mask:
            low = mask & -mask
            out.append(low.bit_length() - 1)
            mask ^= low
        return out

    def decompose(self, mask: int) -> SPNode:
        members = self._members(mask)
        if len(members) == 1:
            u = members[0]
            return SPNode("leaf", unit=self.orig[u], ops=list(self.units[u]))
        comps = self._components(mask, members)
        if len(comps) > 1:
            return self._node("parallel", [self.decompose(c) for c in comps])
        cuts, acc, prefix = [], -1, 0
        for u in members[:-1]:
            acc &= self.desc[u]
            prefix |= 1 << u
            suffix = mask & ~prefix
            if acc & suffix == suffix:  # every prefix unit reaches every suffix unit
                cuts.append(prefix)
        if not cuts:
            raise NotSeriesParallel(mask)
        pieces, prev = [], 0
        for c in cuts:
            pieces.append(c & ~prev)
            prev = c
        pieces.append(mask & ~prev)
        return self._node("series", [self.decompose(p) for p in pieces])

    def _node(self, kind: str, children: List[SPNode]) -> SPNode:
        ops = sorted((o for c in children for o in c.ops), key=self.topo_pos.__getitem__)
        return SPNode(kind, children=children, ops=ops)

    def _components(self, mask: int, members: List[int]) -> List[int]:
        seen, comps = 0, []
        for s in members:
            if seen >> s & 1:
                continue
            comp, stack = 1 << s, [s]
            while stack:
                u = stack.pop()
                for v in self.succ[u] + self.pred[u]:
                    if mask >> v & 1 and not comp >> v & 1:
                        comp |= 1 << v
                        stack.append(v)
            seen |= comp
            comps.append(comp)
        return comps

    def _independent(self, x: int, y: int) -> bool:
        return x != y and not (self.desc[x] >> y & 1) and not (self.desc[y] >> x & 1)

    def reduction_edge(self, mask: int) -> Tuple[int, int]:
        """The two units (caller's numbering) to merge inside the non-SP region ``mask``."""
        members = self._members(mask)
        hasse = []  # transitive-reduction edges inside the region
        for u in members:
            for v in self.succ[u]:
                if mask >> v & 1 and not any(self.desc[w] >> v & 1
                                             for w in self.succ[u] if w != v):
                    hasse.append((u, v))
        hset = set(hasse)
        hsucc = {u: [v for (x, v) in hasse if x == u] for u in members}
        hpred = {v: [x for (x, y) in hasse if y == v] for v in members}
        middles = []
        for b, c in hasse:
            if any(self._independent(a, b) and self._independent(a, d) and
                   self._independent(c, d)
                   for a in hpred[c] if a != b for d in hsucc[b] if d != c):
                middles.append((b, c))
        candidates = middles or sorted(hset)
        b, c = min(candidates, key=lambda e: (self.work[e[0]] + self.work[e[1]], e))
        return self.orig[b], self.orig[c]
