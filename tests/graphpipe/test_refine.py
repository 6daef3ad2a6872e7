"""The partitioner with its refinement (engine/graphpipe/refine.py) against the simulated
optimum: exhaustive search over every convex partition / device assignment the runtime can
run (one device per stage), each simulated as a DAG 1F1B schedule (random_suite.py)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from random_suite import cases, compare, exhaustive  # noqa: E402

from pipetrain.graphpipe import CostModel, OpGraph, StageGraph, partition  # noqa: E402
from pipetrain.graphpipe import refine as refine_mod  # noqa: E402

# 60 random SP graphs of 3..7 operators, 2..6 devices, m in {2, 4, 8}, a binding memory
# limit in a third of them (fixed seed; about 5 s on this loaded 2-core machine).
CASES = cases(60, seed=0, max_ops=7)


@pytest.fixture(scope="module")
def optimum():
    return [exhaustive(*case) for case in CASES]


@pytest.fixture(scope="module")
def dp_ratios(optimum):
    return compare(CASES, lambda g, n, c: partition(g, n, c, refine=False), optimum)


def test_random_sp_graphs_within_3_percent_of_simulated_optimum(optimum, dp_ratios):
    """Measured: every case exact (worst ratio 1.000; over 438 cases of 3..8 operators from
    two more seeds too). The bound asserted is the issue's ~3 %. The DP alone (bottleneck,
    then depth, over its SP shapes) is off by up to 25 % on these same cases, and misses a
    plan that fits in memory in one of them: the test fails without the refinement."""
    ratios = compare(CASES, partition, optimum)
    assert len(ratios) == len(dp_ratios) >= 45  # cases where nothing fits are left out
    worst = max(r for r, _ in ratios)
    assert worst <= 1.03, f"worst ratio {worst:.3f}"
    assert max(r for r, _ in dp_ratios) > 1.2  # what the refinement buys on these cases


def test_refinement_with_a_small_budget_stays_close(monkeypatch, optimum):
    """With 200 simulated candidates (fewer than the convex partitions of most of these
    graphs) the result is still within 10 % -- the refinement is a search, not enumeration."""
    real = refine_mod.refine
    from pipetrain.graphpipe import partitioner
    monkeypatch.setattr(partitioner, "refine_stage_graph",
                        lambda starts, max_evals: real(starts, max_evals=200))
    worst = max(r for r, _ in compare(CASES, partition, optimum))
    assert worst <= 1.10


def test_memory_repair_finds_a_plan_the_dp_cannot_express():
    """Case with three branches into a join and a binding memory limit: no SP-shaped plan
    fits (the DP raises), the exhaustive search finds one; the refinement, started from the
    unconstrained plans with memory overflow ranked first, reaches the optimum."""
    g = OpGraph()
    for name, w, a, p, ins in [("o0", 8, 4, 1, []), ("o1", 6, 1, 4, []), ("o2", 12, 3, 1, ["o1"]),
                               ("o3", 8, 4, 0, []), ("o4", 8, 1, 4, ["o3"]),
                               ("o5", 6, 4, 1, ["o0", "o2", "o4"])]:
        g.add(name, w / 3, 2 * w / 3, a, p, inputs=ins)
    cost = CostModel(max_replicas=1, num_microbatches=2, memory_limit=18.3)
    with pytest.raises(ValueError, match="too many"):
        partition(g, 5, cost, refine=False)
    best = exhaustive(g, 5, cost)
    sg = partition(g, 5, cost)
    assert sg.fits and sg.search == "refined"
    assert sg.simulated_time_per_sample == pytest.approx(best[0], rel=1e-12)


def test_refined_result_is_a_valid_stage_graph_never_worse_than_the_dp():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from bench.graph_partition import dlrm_graph
    g = dlrm_graph()  # 40 operators: beyond exhaustive search
    cost = CostModel(microbatch_size=8, num_microbatches=32, max_replicas=1)
    dp = partition(g, 8, cost, refine=False)
    sg = partition(g, 8, cost)
    StageGraph(g, sg.stages, sg.replicas, 8, cost)  # convex: the constructor checks
    assert sorted(o for s in sg.stages for o in s) == list(range(len(g)))
    # Measured 1.109x better (simulated): a join absorbed into a tower's last stage.
    assert sg.simulated_time_per_sample <= dp.simulated_time_per_sample / 1.05


def test_simulated_time_matches_the_closed_form_on_a_balanced_chain():
    """The objective itself: a chain of S equal stages under 1F1B takes (m + S - 1) stage
    times per micro-batch slot (fill, steady, drain)."""
    g = OpGraph.chain([(1.0, 2.0, 1.0, 1.0)] * 4)
    cost = CostModel(max_replicas=1, num_microbatches=6, microbatch_size=2)
    sg = StageGraph(g, [[0], [1], [2], [3]], [1] * 4, 4, cost)
    assert sg.simulated_time_per_sample == pytest.approx(3.0 * (6 + 4 - 1) / 6)
