"""GraphPipe's partitioner against an exhaustive reference (tests/graphpipe/brute_force.py).

The SP dynamic programme (without the refinement, see dp_partition below) searches the partitions the SP tree can express (see partitioner.py), a subset of all
convex partitions, so its time per sample is >= the brute force's always, equal on chains,
and close on branchy graphs (bounds below are the measured worst cases, not wishes).
"""

import os
import statistics
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from brute_force import brute_force  # noqa: E402
from graphs import chain, fan_out, four_branches, n_shape, two_towers  # noqa: E402

from pipetrain import schedules  # noqa: E402
from pipetrain.graphpipe import CostModel, OpGraph, StageGraph, decompose, partition  # noqa: E402

EXACT = 1e-6  # tolerance of the partitioner's bisection in these tests


def dp_partition(*args, **kwargs):
    """The SP dynamic programme alone (no refinement): what these tests pin down is the
    DP's own search space and objective (bottleneck, then depth); the refined partition
    is tested against the simulated optimum in test_partition_quality.py."""
    return partition(*args, refine=False, **kwargs)
PIPE = CostModel(max_replicas=1, num_microbatches=4)
DP_SYNC = CostModel(allreduce_bandwidth=1.0, num_microbatches=4)


def check_sp(tree):
    """Every operator in exactly one leaf; series children in an order the edges respect
    (no path from a later child back to an earlier one) and parallel children without
    edges between them; without reductions, also the full order: each op of series child i
    reaches each op of child i+1, parallel children pairwise independent."""
    g = tree.graph
    desc = g.descendants()
    leaves = [o for leaf in tree.root.leaves() for o in tree.units[leaf.unit]]
    assert sorted(leaves) == list(range(len(g)))

    def walk(node):
        for c in node.children:
            walk(c)
        strict = not tree.merges
        if node.kind == "series":
            for i, a in enumerate(node.children):
                for b in node.children[i + 1:]:
                    assert not any(desc[y] >> x & 1 for x in a.ops for y in b.ops)
            for a, b in zip(node.children, node.children[1:]):
                assert not strict or all(desc[x] >> y & 1 for x in a.ops for y in b.ops)
        if node.kind == "parallel":
            for i, a in enumerate(node.children):
                for b in node.children[i + 1:]:
                    assert not any(y in g.succ[x] or x in g.succ[y] for x in a.ops for y in b.ops)
                    assert not strict or not any(desc[x] >> y & 1 or desc[y] >> x & 1
                                                 for x in a.ops for y in b.ops)
    walk(tree.root)


# --- SP decomposition -------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: chain([1, 2, 3]), two_towers, four_branches,
                                  fan_out, n_shape])
def test_sp_roundtrip(make):
    check_sp(decompose(make()))


def test_shapes_print_as_expected():
    assert str(decompose(two_towers())) == "S(src, P(S(a0, a1, a2), S(b0, b1)), head)"
    # The skip edge y -> out is implied by y -> p -> z -> out: still series-parallel.
    assert str(decompose(fan_out())) == "S(x, y, P(p, q), z, out)"


def test_n_shape_is_reduced_by_merging_the_middle_edge():
    # a->c, b->c, b->d: the middle edge b->c is merged; the rest decomposes.
    tree = decompose(n_shape())
    assert tree.merges == [("b", "c")]
    assert str(tree) == "S(s, a, [b+c], d, t)"
    check_sp(tree)
    sg = dp_partition(n_shape(), 4, PIPE, rel_tol=EXACT, chain_candidate=False)
    assert sg.stage_of[n_shape().index("b")] == sg.stage_of[n_shape().index("c")]


def test_wide_n_merges_only_the_cross_edge():
    # Two chains a0..a3, b0..b3 with a cross edge a1 -> b2: merging {a1, b2} suffices.
    g = OpGraph()
    for p in "ab":
        for i in range(4):
            g.add(f"{p}{i}", 1, 2, inputs=[f"{p}{i - 1}"] if i else ())
    g.add_edge("a1", "b2")
    tree = decompose(g)
    assert tree.merges == [("a1", "b2")]
    check_sp(tree)


# --- against brute force ----------------------------------------------------------------
def compare(g, n, cost, chain_candidate=True):
    bf = brute_force(g, n, cost)
    sg = dp_partition(g, n, cost, rel_tol=EXACT, chain_candidate=chain_candidate)
    assert sg.fits and sum(sg.replicas) <= n
    assert sg.time_per_sample >= bf[0] * (1 - 1e-9), "DP beat exhaustive search: a bug"
    return sg.time_per_sample / bf[0], sg, bf


@pytest.mark.parametrize("cost", [PIPE, DP_SYNC], ids=["pipeline", "dp-sync"])
@pytest.mark.parametrize("works", [[3, 1, 4, 1, 5, 9, 2], [1] * 8, [5, 1, 1, 1, 1, 5]])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_chains_match_brute_force_exactly(works, n, cost):
    ratio, sg, bf = compare(chain(works), n, cost)
    assert ratio == pytest.approx(1.0, abs=1e-9)
    assert sg.depth == bf[1]


def test_unique_optima_by_construction():
    # Memory holds one operator's weights per device: every op its own stage, one device.
    g = chain([2, 7, 3, 5], params=10.0)
    cost = CostModel(max_replicas=1, memory_limit=3 * 10.0 + 4 * 1.0)
    sg = dp_partition(g, 4, cost, rel_tol=EXACT)
    assert sg.time_per_sample == 7 and sg.num_stages == 4
    # Two towers, 2 devices: the only split at 9 is {src, a0, b0} | {a1, a2, b1, head}.
    ratio, sg, bf = compare(two_towers(), 2, PIPE)
    assert sg.time_per_sample == bf[0] == 9
    assert sorted(map(sorted, (sg.graph.names(s) for s in sg.stages))) == \
        [["a0", "b0", "src"], ["a1", "a2", "b1", "head"]]
    # Four equal branches of work 6 on 6 devices: one stage per branch, src/head alone.
    ratio, sg, bf = compare(four_branches((6, 6, 6, 6), src=1, head=1), 6, PIPE)
    assert sg.time_per_sample == bf[0] == 6 and sg.depth == 3


BRANCHY = [("towers", two_towers), ("four", four_branches), ("fan", fan_out),
           ("N", n_shape)]


def test_branchy_graphs_close_to_brute_force():
    """The measured agreement on the hand-built multi-branch graphs (1..4 devices, both
    cost models; 32 cases): never better than brute force. SP search alone: 19/32 exact,
    worst 1.67 (the non-SP N graph, whose reduction merges two operators; 1.21 on the SP
    graphs). With the chain candidate (the default): 22/32 exact, worst 1.25."""
    stats = {}
    for chain_candidate in (False, True):
        ratios = {}
        for name, make in BRANCHY:
            for cost in (PIPE, DP_SYNC):
                for n in range(1, 5):
                    ratios[(name, cost.max_replicas, n)] = \
                        compare(make(), n, cost, chain_candidate)[0]
        vals = list(ratios.values())
        exact = sum(r < 1 + 1e-9 for r in vals)
        sp_worst = max(v for (name, *_), v in ratios.items() if name != "N")
        stats[chain_candidate] = (exact, statistics.median(vals), sp_worst, max(vals))
        print(f"\nchain candidate {chain_candidate}: {exact}/{len(vals)} exact, median "
              f"{statistics.median(vals):.3f}, worst on SP graphs {sp_worst:.3f}, "
              f"worst {max(vals):.3f}")
    assert stats[False][0] >= 19 and stats[False][2] <= 1.21 and stats[False][3] <= 1.67
    assert stats[True][0] >= 22 and stats[True][2] <= 1.21 and stats[True][3] <= 1.25
    assert stats[True][1] <= 1.0 + 1e-9


# --- memory -----------------------------------------------------------------------------
def test_memory_limit_respected_and_matches_brute_force_on_chains():
    g = chain([1, 1, 1, 1, 1, 1], act=4.0, params=2.0)
    for limit in (40.0, 30.0, 29.0):
        cost = CostModel(max_replicas=2, memory_limit=limit, num_microbatches=4)
        ratio, sg, bf = compare(g, 4, cost)
        assert all(m <= limit for m in sg.stage_memory)
        assert ratio == pytest.approx(1.0)


def test_impossible_memory_raises_with_shortfall():
    g = chain([1, 1, 1], act=1.0, params=10.0)  # one op alone needs 30 + inflight bytes
    cost = CostModel(max_replicas=1, memory_limit=20.0)
    with pytest.raises(ValueError, match=r"needs 3\d\.?\d* bytes per device.*too many"):
        dp_partition(g, 3, cost)
    # The shortfall is the real one: on a chain (exact DP) brute force agrees.
    g = chain([1] * 6, act=4.0, params=2.0)
    cost = CostModel(max_replicas=2, memory_limit=25.0, num_microbatches=4)
    assert brute_force(g, 4, cost) is None
    with pytest.raises(ValueError) as err:
        dp_partition(g, 4, cost)
    need = float(err.value.args[0].split("needs ")[1].split(" bytes")[0])
    ok = CostModel(max_replicas=2, memory_limit=need * 1.001, num_microbatches=4)
    assert brute_force(g, 4, ok) is not None and dp_partition(g, 4, ok).fits
    below = CostModel(max_replicas=2, memory_limit=need * 0.999, num_microbatches=4)
    assert brute_force(g, 4, below) is None


# --- random SP graphs -------------------------------------------------------------------
@st.composite
def sp_graphs(draw, max_ops=7):
    """Random series-parallel graphs built by nesting series / parallel compositions."""
    g = OpGraph()

    def build(budget, inputs):
        # Returns the sink names of a random sub-graph fed by `inputs`.
        if budget <= 1 or draw(st.booleans()):
            name = f"o{len(g)}"
            w = draw(st.integers(1, 6))
            g.add(name, w / 3, 2 * w / 3, draw(st.integers(0, 3)), draw(st.integers(0, 3)),
                  inputs=inputs)
            return [name]
        if draw(st.booleans()):  # series
            left = draw(st.integers(1, budget - 1))
            return build(budget - left, build(left, inputs))
        left = draw(st.integers(1, budget - 1))  # parallel
        return build(left, inputs) + build(budget - left, inputs)

    build(draw(st.integers(1, max_ops)), [])
    return g


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(g=sp_graphs(), n=st.integers(1, 3), mem=st.sampled_from([None, 40.0, 25.0]),
       replicas=st.sampled_from([1, None]))
def test_random_sp_graphs_never_crash_and_are_convex(g, n, mem, replicas):
    check_sp(decompose(g))
    cost = CostModel(max_replicas=replicas, memory_limit=mem, allreduce_bandwidth=2.0,
                     num_microbatches=4)
    bf = brute_force(g, n, cost)
    if bf is None:
        with pytest.raises(ValueError):
            dp_partition(g, n, cost, rel_tol=EXACT)
        return
    # (300 random examples, measured: always found when brute force fits; 291/294 exact,
    # worst ratio 1.19.)
    sg = dp_partition(g, n, cost, rel_tol=EXACT)
    # StageGraph's constructor rejects a cyclic stage graph (= a non-convex stage).
    StageGraph(g, sg.stages, sg.replicas, n, cost)
    assert sorted(o for s in sg.stages for o in s) == list(range(len(g)))
    assert sg.fits and sum(sg.replicas) <= n
    assert bf[0] * (1 - 1e-9) <= sg.time_per_sample <= bf[0] * 1.25 + 1e-12


# --- outputs ----------------------------------------------------------------------------
def test_print_plot_and_schedule_inputs(tmp_path):
    sg = partition(two_towers(), 4, PIPE)
    text = str(sg)
    assert "stage" in text and "depth" in text
    sg.plot(tmp_path / "sg.png")
    assert (tmp_path / "sg.png").stat().st_size > 1000
    kw = sg.schedule_inputs()
    # A fill-drain order on the stage DAG, one device per stage: the IR accepts the edges.
    m = 3
    rows = [[f"{s}F{i}" for i in range(m)] + [f"{s}B{i}" for i in range(m)]
            for s in range(sg.num_stages)]
    sched = schedules.Schedule.from_actions(rows, **kw).validate()
    assert sched.edges == sg.edges


def test_batched_evaluation_matches_node_by_node(monkeypatch):
    """batched.py must fill the same tables as the per-node code: same partition."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from bench.graph_partition import random_sp_graph
    from pipetrain.graphpipe import partitioner

    g = random_sp_graph(120, seed=3)
    cost = CostModel(microbatch_size=8, num_microbatches=16, memory_limit=1.0e9,
                     allreduce_bandwidth=1e9)
    batched = dp_partition(g, 12, cost)
    monkeypatch.setattr(partitioner, "series_batch_key", lambda node: None)
    single = dp_partition(g, 12, cost)
    assert batched.time_per_sample == single.time_per_sample
    assert batched.stages == single.stages and batched.replicas == single.replicas


@pytest.mark.parametrize("make,n", [(two_towers, 4), (four_branches, 6), (fan_out, 4),
                                    (lambda: chain([1] * 6), 4)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_dag_1f1b_validates_and_peak_inflight_matches_formula(make, n, m):
    sg = partition(make(), n, PIPE)
    sched = sg.dag_1f1b(m)  # validated: complete, dependencies hold, deadlock-free
    fwd = [sum(sg.graph.ops[o].forward for o in st) for st in sg.stages]
    bwd = [sum(sg.graph.ops[o].backward for o in st) for st in sg.stages]
    r = sched.simulate(forward=fwd, backward=bwd)
    assert r.peak_inflight == [min(f, m) for f in sg.inflight]
    assert sched.peak_inflight() == [min(f, m) for f in sg.inflight]


def test_dag_1f1b_on_random_stage_graphs():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from bench.graph_partition import random_sp_graph
    for seed in range(4):
        sg = partition(random_sp_graph(60, seed=seed), 12, PIPE, chain_candidate=False)
        r = sg.dag_1f1b(16).simulate(forward=1.0, backward=2.0)
        assert r.peak_inflight == [min(f, 16) for f in sg.inflight]


def test_fx_two_tower_model_to_stage_graph():
    import torch
    from torch import nn
    from pipetrain.graphpipe.fx import opgraph_from_fx

    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
            self.b = nn.Linear(16, 16)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x)], dim=1))

    g = opgraph_from_fx(TwoTowers(), (torch.randn(8, 16),))
    assert str(decompose(g)) == "S(x, P(S(a_0, a_1, a_2), b), cat, head)"
    assert g.ops[g.index("a_0")].params == (16 * 64 + 64) * 4
    assert g.ops[g.index("a_0")].activation == 64 * 4  # bytes per sample
    assert g.ops[g.index("a_0")].module == "a.0"
    sg = partition(g, 3, PIPE)
    assert sg.fits and sum(sg.replicas) <= 3
    sg.dag_1f1b(4).simulate()


def test_edge_cases():
    g = OpGraph()
    g.add("a")
    g.add("b", inputs=["a"])
    assert partition(g, 4, PIPE).time_per_sample == 0.0  # zero-cost graph: one stage
    one = OpGraph.chain([(1, 2, 1, 1)])
    assert partition(one, 64, CostModel()).time_per_sample == 3 / 64  # free data parallel
    two = OpGraph()
    two.add("a", 1, 2)
    two.add("b", 1, 1)  # disconnected: two independent stages, depth 1
    sg = partition(two, 2, PIPE)
    assert sg.num_stages == 2 and sg.depth == 1 and sg.time_per_sample == 3
    # More devices than operators, data parallel with a sync cost: all three replicated.
    sg = partition(OpGraph.chain([(1, 2, 1, 1)] * 3), 64,
                   CostModel(allreduce_bandwidth=10.0), rel_tol=EXACT)
    assert sg.num_stages == 3 and sum(sg.replicas) <= 64 and max(sg.replicas) > 1
    with pytest.raises(ValueError, match="num_devices"):
        partition(one, 0)
    with pytest.raises(ValueError, match="cycle"):
        g.add_edge("b", "a")
