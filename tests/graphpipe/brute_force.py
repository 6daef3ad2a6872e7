"""Independent reference: exhaustive search over every partition of the operators into
stages whose stage graph is acyclic (hence convex stages), and every device count per stage.

Written without the SP tree or the partitioner's tables: in-flight counts come from the
longest path in the stage graph, times and memory from the scalar CostModel formulas.
Exponential: only for graphs of <= ~8 operators and <= 4 devices.
"""

from __future__ import annotations

import itertools
from typing import Iterator, List, Optional, Tuple

from pipetrain.graphpipe import CostModel, OpGraph


def set_partitions(n: int):
    """Every partition of range(n), as a block label per element (restricted growth)."""
    labels = [0] * n

    def rec(i, m):
        if i == n:
            yield list(labels)
            return
        for b in range(m + 1):
            labels[i] = b
            yield from rec(i + 1, max(m, b + 1))

    if n:
        yield from rec(1, 1)


def stage_inflight(graph: OpGraph, labels: List[int], nb: int) -> Optional[List[int]]:
    """Per block, stages on the longest path to a sink; None if the stage graph has a cycle."""
    succ = [set() for _ in range(nb)]
    for u, v in graph.edges:
        if labels[u] != labels[v]:
            succ[labels[u]].add(labels[v])
    memo, state = [0] * nb, [0] * nb  # 0 new, 1 on stack, 2 done

    def depth(s):
        if state[s] == 1:
            raise ValueError("cycle")
        if state[s] == 2:
            return memo[s]
        state[s] = 1
        memo[s] = 1 + max((depth(t) for t in succ[s]), default=0)
        state[s] = 2
        return memo[s]

    try:
        return [depth(s) for s in range(nb)]
    except ValueError:
        return None


def convex_partitions(graph: OpGraph, max_stages: int) -> Iterator[Tuple[List[List[int]], List[int]]]:
    """Every partition of the operators into at most ``max_stages`` stages whose stage graph
    is acyclic (convex stages): ``(blocks, in-flight count per stage)``."""
    n = len(graph)
    for labels in set_partitions(n):
        nb = max(labels) + 1
        if nb > max_stages:
            continue
        infl = stage_inflight(graph, labels, nb)
        if infl is not None:
            yield [[o for o in range(n) if labels[o] == b] for b in range(nb)], infl


def brute_force(graph: OpGraph, num_devices: int, cost: CostModel
                ) -> Optional[Tuple[float, int, List[List[int]], List[int]]]:
    """(best bottleneck time per sample, its least depth, stages, devices per stage), or
    None if nothing fits in memory."""
    cap = min(num_devices, cost.max_replicas or num_devices)
    best = None
    for blocks, infl in convex_partitions(graph, num_devices):
        nb = len(blocks)
        W = [sum(graph.ops[o].work for o in bl) for bl in blocks]
        P = [sum(graph.ops[o].params for o in bl) for bl in blocks]
        A = [sum(graph.ops[o].activation for o in bl) for bl in blocks]
        for ds in itertools.product(range(1, cap + 1), repeat=nb):
            if sum(ds) > num_devices:
                continue
            if not all(cost.fits(P[b], A[b], ds[b], infl[b]) for b in range(nb)):
                continue
            T = max(cost.stage_time(W[b], P[b], ds[b]) for b in range(nb))
            key = (T, max(infl))
            if best is None or key < best[:2]:
                best = (T, max(infl), blocks, list(ds))
    return best
