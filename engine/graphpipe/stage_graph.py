"""The partitioner's output: convex stages of an operator graph, their devices and costs.

A :class:`StageGraph` is checked on construction: every operator in exactly one stage, the
stage graph (an operator edge across stages is a stage edge) acyclic -- which also makes
every stage convex. Stages are numbered in topological order; stage s gets the devices
``devices[s]`` (consecutive ids, in stage order). Derived quantities (see
:mod:`pipetrain.graphpipe.cost`): ``inflight[s]`` = stages on the longest path from s to a
sink, ``depth`` = the longest path, ``stage_time[s]`` (s/sample), ``stage_memory[s]`` (bytes
per device), ``time_per_sample`` = the bottleneck, ``step_time_per_sample`` with fill/drain.
"""

from __future__ import annotations

import heapq
from typing import Dict, List, Optional, Sequence, Tuple

from pipetrain.graphpipe.cost import CostModel
from pipetrain.graphpipe.opgraph import OpGraph

__all__ = ["StageGraph"]


class StageGraph:
    """Stages (operator index lists) with device counts; see the module docstring."""

    def __init__(self, graph: OpGraph, stages: Sequence[Sequence[int]],
                 replicas: Sequence[int], num_devices: int, cost: CostModel, *, tree=None):
        if len(stages) != len(replicas):
            raise ValueError("one device count per stage")
        self.graph, self.cost, self.num_devices, self.tree = graph, cost, num_devices, tree
        stage_of = [-1] * len(graph)
        for s, ops in enumerate(stages):
            for o in ops:
                if stage_of[o] != -1:
                    raise ValueError(f"operator {graph.ops[o].name!r} in two stages")
                stage_of[o] = s
        if -1 in stage_of:
            raise ValueError(f"operator {graph.ops[stage_of.index(-1)].name!r} in no stage")
        n = len(stages)
        succ = [set() for _ in range(n)]
        for u, v in graph.edges:
            if stage_of[u] != stage_of[v]:
                succ[stage_of[u]].add(stage_of[v])
        # Topological order of stages, earliest operator first among the ready ones.
        topo = {v: i for i, v in enumerate(graph.topological_order())}
        first = [min(topo[o] for o in ops) for ops in stages]
        indeg = [0] * n
        for s in range(n):
            for t in succ[s]:
                indeg[t] += 1
        ready = [(first[s], s) for s in range(n) if not indeg[s]]
        heapq.heapify(ready)
        order = []
        while ready:
            _, s = heapq.heappop(ready)
            order.append(s)
            for t in succ[s]:
                indeg[t] -= 1
                if not indeg[t]:
                    heapq.heappush(ready, (first[t], t))
        if len(order) != n:
            raise ValueError("the stage graph has a cycle (some stage is not convex)")
        new = {s: i for i, s in enumerate(order)}
        self.stages: List[List[int]] = [sorted(stages[s], key=topo.__getitem__) for s in order]
        self.replicas: List[int] = [int(replicas[s]) for s in order]
        self.stage_of = [new[s] for s in stage_of]
        self.edges: List[Tuple[int, int]] = sorted((new[s], new[t])
                                                   for s in range(n) for t in succ[s])
        if sum(self.replicas) > num_devices:
            raise ValueError(f"stages use {sum(self.replicas)} devices, only {num_devices}")
        self.devices: List[List[int]] = []
        nxt = 0
        for d in self.replicas:
            self.devices.append(list(range(nxt, nxt + d)))
            nxt += d
        out = [[] for _ in range(n)]
        for s, t in self.edges:
            out[s].append(t)
        self.inflight = [0] * n
        for s in range(n - 1, -1, -1):
            self.inflight[s] = 1 + max((self.inflight[t] for t in out[s]), default=0)
        self.depth = max(self.inflight)
        ops = graph.ops
        self.work = [sum(ops[o].work for o in st) for st in self.stages]
        self.params = [sum(ops[o].params for o in st) for st in self.stages]
        self.activation = [sum(ops[o].activation for o in st) for st in self.stages]
        self.stage_time = [cost.stage_time(w, p, d)
                           for w, p, d in zip(self.work, self.params, self.replicas)]
        self.stage_memory = [cost.stage_memory(p, a, d, f) for p, a, d, f in
                             zip(self.params, self.activation, self.replicas, self.inflight)]

    # --- summary ----------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def time_per_sample(self) -> float:
        """Steady-state seconds per sample: the slowest stage's."""
        return max(self.stage_time)

    @property
    def step_time_per_sample(self) -> float:
        """Seconds per sample over a step, fill and drain included."""
        return self.cost.step_time_per_sample(self.time_per_sample, self.depth)

    @property
    def simulated_time_per_sample(self) -> float:
        """Seconds per sample of one step of the DAG 1F1B schedule (``cost.num_microbatches``
        micro-batches of ``cost.microbatch_size``) in the schedule simulator: the makespan
        divided by the samples. Per micro-batch a stage's forward is ``B F / d`` and its
        backward ``B Bw / d`` plus its all-reduce share ``B sync(d)`` (cost.py), so the
        bubble is the one the schedule really has, not the ``(m + D - 1) / m`` bound."""
        c = self.cost
        B, m = c.microbatch_size, c.num_microbatches
        fwd = [B * sum(self.graph.ops[o].forward for o in st) / d
               for st, d in zip(self.stages, self.replicas)]
        bwd = [B * (t - f / B) for t, f in zip(self.stage_time, fwd)]
        r = self.dag_1f1b(m).simulate(forward=fwd, backward=bwd)
        return r.makespan / (m * B)

    @property
    def fits(self) -> bool:
        """Every stage within ``cost.memory_limit``."""
        return all(self.cost.fits(p, a, d, f) for p, a, d, f in
                   zip(self.params, self.activation, self.replicas, self.inflight))

    def placement(self) -> List[int]:
        """First device of each stage (a data-parallel stage's replicas run the same actions)."""
        return [d[0] for d in self.devices]

    def schedule_inputs(self) -> Dict[str, object]:
        """Keyword arguments for ``schedules.Schedule.from_actions``: ``num_stages``,
        ``edges`` (stage edges), ``placement`` (first device of each stage). Device ids are
        renumbered to the devices actually used, one schedule row per stage here."""
        return {"num_stages": self.num_stages, "edges": list(self.edges),
                "placement": list(range(self.num_stages))}

    def dag_1f1b(self, num_microbatches: int):
        """GraphPipe's DAG 1F1B order as a validated ``schedules.Schedule`` (one device row
        per stage; see :mod:`pipetrain.graphpipe.dag_schedule`)."""
        from pipetrain import schedules
        from pipetrain.graphpipe.dag_schedule import dag_1f1b_actions
        rows = dag_1f1b_actions(self.inflight, num_microbatches)
        return schedules.Schedule.from_actions(rows, num_microbatches=num_microbatches,
                                               name="dag-1f1b",
                                               **self.schedule_inputs()).validate()

    def __str__(self) -> str:
        lines = [f"StageGraph: {self.num_stages} stages on {sum(self.replicas)} of "
                 f"{self.num_devices} devices, depth {self.depth}, time/sample "
                 f"{self.time_per_sample:.6g} s (with fill/drain {self.step_time_per_sample:.6g})"]
        preds = [[] for _ in range(self.num_stages)]
        for s, t in self.edges:
            preds[t].append(s)
        for s, ops in enumerate(self.stages):
            names = self.graph.names(ops)
            shown = ", ".join(names) if len(names) <= 6 else \
                f"{', '.join(names[:3])}, ... {names[-1]} ({len(names)} ops)"
            dev = self.devices[s]
            dv = f"d{dev[0]}" if len(dev) == 1 else f"d{dev[0]}-{dev[-1]}"
            lines.append(f"  stage {s:>3} [{dv:>7}] t={self.stage_time[s]:.4g} "
                         f"inflight={self.inflight[s]} mem={self.stage_memory[s]:.4g} "
                         f"<- {preds[s] or '-'}: {shown}")
        return "\n".join(lines)

    # --- picture ----------------------------------------------------------------------
    def plot(self, path, *, title: Optional[str] = None) -> None:
        """Draw the operator graph, each operator coloured by its stage's first device;
        x = longest path from a source, y = rank in that column. Needs matplotlib."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        g = self.graph
        level = [0] * len(g)
        for u in g.topological_order():
            for v in g.succ[u]:
                level[v] = max(level[v], level[u] + 1)
        rank: Dict[int, int] = {}
        pos = []
        for u in range(len(g)):
            pos.append((level[u], rank.get(level[u], 0)))
            rank[level[u]] = rank.get(level[u], 0) + 1
        width = max(level) + 1
        height = max(rank.values())
        fig, ax = plt.subplots(figsize=(min(30, 2 + 0.6 * width), min(20, 1.5 + 0.5 * height)))
        cmap = plt.get_cmap("tab20")
        for u, v in g.edges:
            (x0, y0), (x1, y1) = pos[u], pos[v]
            cross = self.stage_of[u] != self.stage_of[v]
            ax.plot([x0, x1], [y0, y1], color="black" if cross else "0.7",
                    lw=1.0 if cross else 0.5, zorder=1)
        xs, ys = zip(*pos)
        cols = [cmap(self.devices[self.stage_of[u]][0] % 20) for u in range(len(g))]
        ax.scatter(xs, ys, c=cols, s=60 if len(g) <= 200 else 12, edgecolors="black",
                   linewidths=0.4, zorder=2)
        if len(g) <= 60:
            for u in range(len(g)):
                ax.annotate(g.ops[u].name, pos[u], fontsize=6, xytext=(0, 5),
                            textcoords="offset points", ha="center")
        ax.set_xlabel("longest path from a source")
        ax.set_yticks([])
        ax.set_title(title or f"{self.num_stages} stages, depth {self.depth}, "
                     f"{self.time_per_sample:.4g} s/sample (colour: device)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
