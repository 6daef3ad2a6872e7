"""GraphPipe's partitioner (Jeon et al., ASPLOS 2025) on an abstract operator graph.

``OpGraph`` (operators with per-sample costs, data-flow edges) -> ``decompose`` (series-
parallel tree, non-SP regions reduced) -> ``partition`` (binary search on the time per
sample, dynamic programme over the SP tree) -> ``StageGraph`` (convex stages, a device set
per stage, stage edges, predicted time per sample).
"""

from pipetrain.graphpipe.opgraph import Op, OpGraph
from pipetrain.graphpipe.sp_decompose import SPNode, SPTree, decompose
from pipetrain.graphpipe.cost import CostModel
from pipetrain.graphpipe.stage_graph import StageGraph
from pipetrain.graphpipe.partitioner import partition

__all__ = ["CostModel", "Op", "OpGraph", "SPNode", "SPTree", "StageGraph", "decompose",
           "partition"]
