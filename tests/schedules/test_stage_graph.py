"""The stage graph as a bound C++ object: fields for a chain, interleaving and a DAG."""

import pytest

from pipetrain import schedules
from pipetrain.schedules import Schedule, StageGraph


def summary(g):
    """Everything the graph says, as plain Python values."""
    return {
        "shape": (g.num_stages, g.num_devices, g.is_chain),
        "edges": [(e.id, e.src, e.dst, e.name) for e in g.edges],
        "stages": [(k.id, k.device, k.chunk, list(k.inputs), list(k.outputs)) for k in g.stages],
        "ends": (g.sources(), g.sinks()),
        "order": g.topological_order(),
    }


def test_chain():
    g = schedules.build("1f1b", 3, 4).stage_graph
    assert isinstance(g, StageGraph) and isinstance(g, schedules._C.schedule.StageGraph)
    assert summary(g) == {
        "shape": (3, 3, True),
        "edges": [(0, 0, 1, "0->1"), (1, 1, 2, "1->2")],
        "stages": [(0, 0, 0, [], [0]), (1, 1, 0, [0], [1]), (2, 2, 0, [1], [])],
        "ends": ([0], [2]),
        "order": [0, 1, 2],
    }
    assert g.edge(1).name == "1->2" and g.stage(1).inputs == [0]
    with pytest.raises(IndexError):
        g.edge(2)
    with pytest.raises(IndexError):
        g.stage(3)


def test_interleaved():
    # p = 2, v = 2: stage k on device k % 2, chunk k // 2, a chain 0 -> 1 -> 2 -> 3.
    g = schedules.build("interleaved-1f1b", 2, 4, num_chunks=2).stage_graph
    assert summary(g) == {
        "shape": (4, 2, True),
        "edges": [(0, 0, 1, "0->1"), (1, 1, 2, "1->2"), (2, 2, 3, "2->3")],
        "stages": [(0, 0, 0, [], [0]), (1, 1, 0, [0], [1]), (2, 0, 1, [1], [2]),
                   (3, 1, 1, [2], [])],
        "ends": ([0], [3]),
        "order": [0, 1, 2, 3],
    }


def test_dag_fan_out_and_fan_in():
    # 0 feeds 1 and 2, both feed 3; stage 3 shares device 0 with stage 0 (chunk 1). Edge ids
    # follow (src, dst) order: 0->1, 0->2, 1->3, 2->3.
    g = StageGraph([0, 1, 2, 0], edges=[(2, 3), (0, 2), (1, 3), (0, 1)])
    assert summary(g) == {
        "shape": (4, 3, False),
        "edges": [(0, 0, 1, "0->1"), (1, 0, 2, "0->2"), (2, 1, 3, "1->3"), (3, 2, 3, "2->3")],
        "stages": [(0, 0, 0, [], [0, 1]), (1, 1, 0, [0], [2]), (2, 2, 0, [1], [3]),
                   (3, 0, 1, [2, 3], [])],
        "ends": ([0], [3]),
        "order": [0, 1, 2, 3],
    }
    # A schedule over this very graph reads its shape from it.
    s = Schedule.from_actions([["0F0", "3F0", "3B0", "0B0"], ["1F0", "1B0"], ["2F0", "2B0"]],
                              graph=g)
    schedules.validate(s)
    assert s.predecessors(3) == [1, 2] and s.successors(0) == [1, 2]
    assert s.edges == [(0, 1), (0, 2), (1, 3), (2, 3)]
    assert [s.device_of(k) for k in range(4)] == [0, 1, 2, 0] and s.chunk_of(3) == 1
    assert summary(s.stage_graph) == summary(g)


def test_topological_order_takes_the_smallest_ready_stage():
    g = StageGraph([0, 1, 2], edges=[(2, 0), (1, 0)])
    assert (g.sources(), g.sinks(), g.topological_order()) == ([1, 2], [0], [1, 2, 0])


def test_graph_and_edges_are_exclusive_and_checked():
    g = StageGraph.chain(2)
    with pytest.raises(ValueError, match="either a stage graph or edges"):
        Schedule.from_actions([["0F0", "0B0"], ["1F0", "1B0"]], graph=g, edges=[(0, 1)])
    with pytest.raises(ValueError, match="cycle"):
        StageGraph([0, 1], edges=[(0, 1), (1, 0)])
    with pytest.raises(ValueError, match="edge src"):
        StageGraph([0, 1], edges=[(2**31, 1)])
