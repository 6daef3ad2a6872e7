"""GraphPipe's DAG 1F1B order for a stage graph, as input to the schedule IR.

One device row per stage (a data-parallel stage's replicas all run that row). Stage s with
``inflight[s]`` = stages on its longest path to the sink (itself included) runs

* warm-up: forwards of micro-batches 0 .. w_s - 1, ``w_s = min(inflight[s] - 1, m)``;
* steady state: forward of the next micro-batch, then the backward of the oldest one
  (each backward as early as the order allows);
* cool-down: the remaining backwards.

On a chain this is 1F1B (inflight = S - i). Its peak in-flight activations per stage are
``min(inflight[s], m)``: after the warm-up, each forward is followed by a backward.
Successors have smaller warm-ups (inflight[t] <= inflight[s] - 1 along every edge), so a
stage's backward of micro-batch i never waits on a forward it has not issued; the IR's
validator proves the order deadlock-free.
"""

from __future__ import annotations

from typing import List, Sequence

__all__ = ["dag_1f1b_actions"]


def dag_1f1b_actions(inflight: Sequence[int], num_microbatches: int) -> List[List[str]]:
    """Per stage (= device row), its actions in issue order, as IR strings (``"2F0"``)."""
    m = num_microbatches
    if m < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {m}")
    rows = []
    for s, f in enumerate(inflight):
        warm = min(f - 1, m)
        row = [f"{s}F{i}" for i in range(warm)]
        for i in range(m - warm):  # steady: F(warm + i), B(i)
            row += [f"{s}F{warm + i}", f"{s}B{i}"]
        row += [f"{s}B{i}" for i in range(m - warm, m)]
        rows.append(row)
    return rows
