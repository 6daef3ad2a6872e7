"""Local refinement of a stage graph against the simulated schedule.

The SP dynamic programme (partitioner.py) minimises the bottleneck stage time, then the
depth, over the partitions the SP tree expresses. Two things it cannot see:

* partitions outside its shapes -- a fork or join operator on the same stage as the start
  (end) of only one of its branches, several small parallel branches sharing one stage next
  to large branches that are split further, ranges that are not level-order contiguous;
* the schedule's real fill/drain and bubbles: a shallower or better balanced *critical
  path* can beat a slightly smaller bottleneck, which the ``(m + D - 1) / m`` bound only
  approximates.

:func:`refine` therefore starts from the DP's stage graph(s) and hill-climbs on the
objective the runtime pays -- :attr:`StageGraph.simulated_time_per_sample`, the DAG 1F1B
schedule run in the schedule simulator, with memory overflow ranked first (so it can also
repair a start that does not fit). Moves, each keeping every stage convex (checked: the
stage graph must stay acyclic):

1. move one operator to another stage (absorbs a fork/join into a branch stage, shifts a
   boundary, regroups independent branches);
2. split a stage in two at a prefix of one of two topological orders of its operators
   (level order and depth-first order: the latter separates parallel branches), when a
   device is free;
3. swap two operators of different stages (a step no single move makes without passing
   through a worse or overflowing assignment);
4. merge two stages (groups small parallel branches), then split any stage with the freed
   device.

Only for one device per stage (what the runtime runs). Above ``FULL_NEIGHBOURHOOD_OPS``
operators, moves and swaps involve only operators with an edge to another stage. The search
stops after a budget of simulated candidates, so its cost is bounded on large graphs.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pipetrain.graphpipe.opgraph import OpGraph
from pipetrain.graphpipe.stage_graph import StageGraph

__all__ = ["refine", "objective"]

# Up to this many operators the neighbourhood is complete (see _Search.moves).
FULL_NEIGHBOURHOOD_OPS = 24


def objective(sg: StageGraph) -> Tuple[float, float, int]:
    """(memory overflow in bytes summed over stages, simulated seconds per sample, depth):
    smaller is better."""
    c = sg.cost
    over = 0.0
    if c.memory_limit is not None:  # summed over stages: each stage's fix counts
        over = sum(max(0.0, m - c.memory_limit * (1 + 1e-12)) for m in sg.stage_memory)
    return (over, sg.simulated_time_per_sample, sg.depth)


class _Search:
    def __init__(self, graph: OpGraph, num_devices: int, cost, max_evals: int,
                 max_work: float = float("inf")):
        self.g, self.N, self.cost, self.left = graph, num_devices, cost, max_evals
        self.work_left = max_work
        self.scan_left = 20 * max_evals
        self.topo = graph.topological_order()
        self.pos = {v: i for i, v in enumerate(self.topo)}
        self.seen: Dict[Tuple[int, ...], Optional[Tuple]] = {}
        # Depth-first topological order: a branch's operators stay together.
        self.dfs_pos = self._dfs_order()

    def _dfs_order(self) -> Dict[int, int]:
        g = self.g
        indeg = [len(p) for p in g.pred]
        stack = sorted((v for v in range(len(g)) if not indeg[v]), reverse=True)
        order = []
        while stack:
            u = stack.pop()
            order.append(u)
            for v in sorted(g.succ[u], reverse=True):
                indeg[v] -= 1
                if not indeg[v]:
                    stack.append(v)
        return {v: i for i, v in enumerate(order)}

    def evaluate(self, labels: Sequence[int]) -> Optional[Tuple[Tuple, StageGraph]]:
        """Objective and stage graph of an assignment (None: cyclic, too many stages, or
        the evaluation budget is spent)."""
        self.scan_left -= 1  # even a cached candidate costs its key: bounded too
        if self.scan_left <= 0:
            self.left = 0
            return None
        # Canonical key: relabel stages by first operator so equal partitions hit the cache.
        # (dict.fromkeys keeps first-occurrence order; map/tuple run in C: this is the
        # search's inner loop on large graphs.)
        remap = {s: i for i, s in enumerate(dict.fromkeys(labels))}
        key = tuple(map(remap.__getitem__, labels))
        if key in self.seen:
            return self.seen[key]
        if len(remap) > self.N or self.left <= 0:
            return None
        self.left -= 1
        self.work_left -= len(remap) * self.cost.num_microbatches
        if self.work_left <= 0:
            self.left = 0
        stages: List[List[int]] = [[] for _ in remap]
        for v, s in enumerate(key):
            stages[s].append(v)
        try:
            sg = StageGraph(self.g, stages, [1] * len(stages), self.N, self.cost)
        except ValueError:  # a cycle: some stage not convex
            self.seen[key] = None
            return None
        out = (objective(sg), sg)
        self.seen[key] = out
        return out

    def climb(self, labels: List[int]):
        """Hill-climb from ``labels``: (objective, stage graph) of the local optimum."""
        cur = self.evaluate(labels)
        if cur is None:
            return None
        while self.left > 0:
            # Best improvement: the steepest move (first improvement tends to take a
            # depth-only tie-break early and stall on the plateaus few micro-batches make).
            step = None
            for cand in self.moves(labels):
                if self.left <= 0:  # budget spent: keep the best move seen so far
                    break
                r = self.evaluate(cand)
                if r is not None and r[0] < (step or cur)[0]:
                    step, nxt = r, cand
            if step is None:
                break
            labels, cur = list(nxt), step
        return cur

    def moves(self, labels: List[int]):
        """Candidate assignments around ``labels`` (see the module docstring)."""
        g = self.g
        nst = max(labels) + 1
        # On small graphs every operator and every stage; on larger ones only operators
        # with an edge to another stage, moved to such a stage (the rest would make the
        # neighbourhood quadratic in the operators for moves that rarely help).
        full = len(g) <= FULL_NEIGHBOURHOOD_OPS
        ops = self.topo if full else [v for v in self.topo if any(
            labels[u] != labels[v] for u in g.pred[v] + g.succ[v])]
        for v in ops:  # 1. move an operator to another stage (neighbours first)
            near = {labels[u] for u in g.pred[v] + g.succ[v]} - {labels[v]}
            far = sorted(set(range(nst)) - near - {labels[v]}) if full else []
            for b in sorted(near) + far:
                new = list(labels)
                new[v] = b
                yield new
        members = [[] for _ in range(nst)]
        for v, s in enumerate(labels):
            members[s].append(v)
        if nst < self.N:  # 2. split a stage
            for s in range(nst):
                yield from self._splits(labels, members[s], nst)
        for i, v in enumerate(ops):  # 3. swap two operators of different stages
            for u in ops[i + 1:]:
                if labels[u] != labels[v]:
                    new = list(labels)
                    new[u], new[v] = labels[v], labels[u]
                    yield new
        work = [sum(self.g.ops[v].work for v in ms) for ms in members]
        for a in range(nst):  # 4. merge two stages, split the heaviest with the freed device
            for b in range(a + 1, nst):
                merged = [a if s == b else s for s in labels]
                merged = [s - 1 if s > b else s for s in merged]
                yield merged
                w = [x for i, x in enumerate(work) if i != b]
                w[a] += work[b]
                c = max(range(nst - 1), key=w.__getitem__)
                yield from self._splits(merged, [v for v, s in enumerate(merged) if s == c],
                                        nst - 1)

    def _splits(self, labels, ops, new_label):
        if len(ops) < 2:
            return
        for order in (self.pos, self.dfs_pos):
            seq = sorted(ops, key=order.__getitem__)
            for k in range(1, len(seq)):
                new = list(labels)
                for v in seq[k:]:
                    new[v] = new_label
                yield new


def refine(starts: Sequence[StageGraph], *, max_evals: int = 3000, max_work: float = 2e5,
           kicks: int = 20, seed: int = 0) -> StageGraph:
    """The best stage graph found from ``starts`` (all on the same graph, devices and cost
    model, one device per stage): hill-climbing (steepest improvement over the moves in the
    module docstring) from each start, then iterated local search -- ``kicks`` times
    without improvement, perturb the best assignment by two random moves and climb again.
    Deterministic (``seed``); stops after ``max_evals`` simulated candidates, ``20 max_evals``
    candidates looked at (cached ones included), or ``max_work`` simulated actions (stages x
    micro-batches summed over candidates: what a simulation costs), so large stage graphs
    get few candidates. Never worse than the best start
    under :func:`objective`."""
    import random
    first = starts[0]
    search = _Search(first.graph, first.num_devices, first.cost, max_evals, max_work)
    # Every start is evaluated before any climb spends the budget; climbs go best first.
    ranked = sorted((r for r in (search.evaluate(list(s.stage_of)) for s in starts)
                     if r is not None), key=lambda r: r[0])
    if not ranked:
        return first
    best = ranked[0]
    for r in ranked:
        cur = search.climb(list(r[1].stage_of))
        if cur is not None and cur[0] < best[0]:
            best = cur
    rng = random.Random(seed)
    stale = 0
    while stale < kicks and search.left > 0:
        labels = list(best[1].stage_of)
        for _ in range(2):
            cands = list(search.moves(labels))
            labels = rng.choice(cands) if cands else labels
        cur = search.climb(labels)
        if cur is not None and cur[0] < best[0]:
            best, stale = cur, 0
        else:
            stale += 1
    return best[1]
