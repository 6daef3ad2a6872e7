"""The randomized comparison of the partitioner with exhaustive search (test and script).

Cases: small random series-parallel graphs (nested series / parallel compositions, 3..8
operators, forward:backward 1:2 with works drawn from a wide range so that branches are
unbalanced), 2..6 devices, one device per stage (what the runtime runs), 2..8 micro-batches,
and in a third of the cases a memory limit set below what the unconstrained optimum needs,
so that it binds.

The objective is the one the runtime pays: the *simulated* time per sample of the stage
graph's DAG 1F1B schedule (:attr:`StageGraph.simulated_time_per_sample`: fill/drain and
bubbles included). :func:`exhaustive` enumerates every partition of the operators into at
most N blocks whose stage graph is acyclic (so every stage convex), fitting in memory, and
simulates each one -- written from the definitions, without the SP tree or the DP.

``python tests/graphpipe/random_suite.py [cases]`` prints the worst ratios.
"""

from __future__ import annotations

import os
import random
import sys
from typing import List, Optional, Tuple

sys.path.insert(0, os.path.dirname(__file__))
from brute_force import convex_partitions  # noqa: E402

from pipetrain.graphpipe import CostModel, OpGraph, StageGraph  # noqa: E402


def random_sp(rng: random.Random, num_ops: int) -> OpGraph:
    """A random SP graph of exactly ``num_ops`` operators (works 1..12, log-uniform-ish)."""
    g = OpGraph()

    def op(inputs):
        w = rng.choice([1, 1, 2, 2, 3, 4, 6, 8, 12])
        g.add(f"o{len(g)}", w / 3, 2 * w / 3, rng.randint(1, 4), rng.randint(0, 4),
              inputs=inputs)
        return [f"o{len(g) - 1}"]

    def build(budget, inputs):
        if budget == 1:
            return op(inputs)
        left = rng.randint(1, budget - 1)
        if rng.random() < 0.5:  # series
            return build(budget - left, build(left, inputs))
        return build(left, inputs) + build(budget - left, inputs)  # parallel

    op(build(num_ops - 1, []))  # one sink (a join of the ends), like a model's output
    return g


def exhaustive(graph: OpGraph, num_devices: int, cost: CostModel
               ) -> Optional[Tuple[float, StageGraph]]:
    """(least simulated time per sample, its stage graph) over every convex partition into
    at most ``num_devices`` stages on one device each, within memory; None if none fits."""
    best = None
    for blocks, infl in convex_partitions(graph, num_devices):
        nb = len(blocks)
        if not all(cost.fits(sum(graph.ops[o].params for o in bl),
                             sum(graph.ops[o].activation for o in bl), 1, f)
                   for bl, f in zip(blocks, infl)):
            continue
        sg = StageGraph(graph, blocks, [1] * nb, num_devices, cost)
        t = sg.simulated_time_per_sample
        if best is None or t < best[0]:
            best = (t, sg)
    return best


def cases(count: int, seed: int = 0, max_ops: int = 8):
    """``count`` reproducible cases: (graph, devices, cost)."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        g = random_sp(rng, rng.randint(3, max_ops))
        n = rng.randint(2, 6)
        m = rng.choice([2, 4, 8])
        cost = CostModel(max_replicas=1, num_microbatches=m)
        if rng.random() < 1 / 3:
            free = exhaustive(g, n, cost)
            need = max(free[1].stage_memory)
            # Just below the unconstrained optimum's need: binds, usually still feasible.
            cost = CostModel(max_replicas=1, num_microbatches=m,
                             memory_limit=need * rng.uniform(0.7, 0.98))
        out.append((g, n, cost))
    return out


def compare(cases_, partition, best=None) -> List[Tuple[float, int]]:
    """Per case (ratio of the partitioner's simulated time to the exhaustive best, index);
    cases nothing fits are checked to raise and left out. ``best``: the exhaustive results
    per case if already computed."""
    ratios = []
    for i, (g, n, cost) in enumerate(cases_):
        bf = best[i] if best is not None else exhaustive(g, n, cost)
        if bf is None:
            try:
                partition(g, n, cost)
            except ValueError:
                continue
            raise AssertionError(f"case {i}: the partitioner found a plan brute force did not")
        try:
            sg = partition(g, n, cost)
        except ValueError:  # missed a feasible plan: infinitely worse
            ratios.append((float("inf"), i))
            continue
        assert sg.fits and sum(sg.replicas) <= n, f"case {i}: infeasible result"
        ratios.append((sg.simulated_time_per_sample / bf[0], i))
    return ratios


if __name__ == "__main__":
    import time
    from pipetrain.graphpipe import partition
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    cs = cases(count, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    t0 = time.perf_counter()
    r = compare(cs, partition)
    r.sort(reverse=True)
    exact = sum(x < 1 + 1e-9 for x, _ in r)
    print(f"{len(r)} cases ({time.perf_counter() - t0:.1f} s): {exact} exact, "
          f"worst {[f'{x:.3f}@{i}' for x, i in r[:10]]}")
    for x, i in r[:3]:
        g, n, cost = cs[i]
        print(f"\ncase {i}: ratio {x:.3f}, {n} devices, m={cost.num_microbatches}, "
              f"mem={cost.memory_limit}")
        print("ops:", [(op.name, round(op.work), op.activation, op.params) for op in g.ops],
              "edges:", [(g.ops[a].name, g.ops[b].name) for a, b in g.edges])
        print("partitioner:", partition(g, n, cost))
        print("exhaustive:", exhaustive(g, n, cost)[1])
