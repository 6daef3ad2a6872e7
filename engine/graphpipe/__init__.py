"""GraphPipe's partitioner (Jeon et al., ASPLOS 2025) on an abstract operator graph.

``OpGraph`` (operators with per-sample costs, data-flow edges) -> ``decompose`` (series-
parallel tree, non-SP regions reduced) -> ``partition`` (binary search on the time per
sample, dynamic programme over the SP tree) -> ``StageGraph`` (convex stages, a device set
per stage, stage edges, predicted time per sample) -> ``StageGraph.dag_1f1b(m)`` (the DAG
1F1B order as a validated ``schedules.Schedule``). ``opgraph_from_fx`` builds the OpGraph
from a ``torch.fx`` trace.

Example::

    from pipetrain.graphpipe import CostModel, opgraph_from_fx, partition
    g = opgraph_from_fx(model, (example_batch,), times=profiled)   # or OpGraph() by hand
    sg = partition(g, num_devices=8, cost=CostModel(memory_limit=40e9, microbatch_size=4))
    print(sg)                  # stages, devices, in-flight, memory, time per sample
    sg.plot("stages.png")
    sched = sg.dag_1f1b(num_microbatches=16)   # schedules.Schedule, validated
"""

from pipetrain.graphpipe.opgraph import Op, OpGraph
from pipetrain.graphpipe.sp_decompose import SPNode, SPTree, decompose
from pipetrain.graphpipe.cost import CostModel
from pipetrain.graphpipe.stage_graph import StageGraph
from pipetrain.graphpipe.partitioner import partition
from pipetrain.graphpipe.fx import opgraph_from_fx
from pipetrain.graphpipe.dag_schedule import dag_1f1b_actions

__all__ = ["CostModel", "Op", "OpGraph", "SPNode", "SPTree", "StageGraph", "dag_1f1b_actions",
           "decompose", "opgraph_from_fx", "partition"]
