"""The planner on a multi-branch model (GraphPipe): per-operator costs, the graphpipe schedule
evaluated on the partitioner's stage graph, and the chain linearizations beside it.

A model that is not a sequence of layers is captured with torch.fx
(:mod:`pipetrain.graphpipe.capture`) and each operator timed on the sample
(:func:`pipetrain.graphpipe.build.measure`: forward and backward seconds per sample, output
bytes per sample) — the same measurement :class:`~pipetrain.Pipeline` makes, and the times are
handed to it (``op_times=``) so the pipeline it builds partitions exactly as planned.

- **Chain rows** (gpipe, 1f1b, zb, interleaved): the operators in topological order are the
  "layers" of a :class:`~pipetrain.planner.costs.CostTable` (what the Pipeline's chain path
  cuts into contiguous stages); a cut carries every value live across it (relayed), which
  is the operator's ``input_bytes``.
- **graphpipe**: for each depth p and micro-batch size b, GraphPipe's partitioner
  (:func:`pipetrain.graphpipe.partition`, one device per stage) gives the stage DAG; its DAG
  1F1B order (:meth:`~pipetrain.graphpipe.StageGraph.dag_1f1b`) is simulated with each
  stage's F and B (its operators' per-sample times x b, plus the per-action overhead), and
  memory per device is its parameter state plus the order's peak in-flight count x the
  stage's per-micro-batch activations. Recompute is not planned for graphpipe.

Units: seconds, bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipetrain.planner.costs import Affine, CostTable, Network
from pipetrain.planner.memory import Memory
from pipetrain.planner.result import Candidate
from pipetrain.planner.schedule_models import MODELS

__all__ = ["GraphCosts", "is_graph_model", "measure_graph", "graph_table",
           "graphpipe_candidates"]


def is_graph_model(model: Any) -> bool:
    """A module that is not a sequence of layers (what Pipeline treats as an operator graph)."""
    from torch import nn
    return isinstance(model, nn.Module) and not isinstance(model, (nn.Sequential, nn.ModuleList))


@dataclasses.dataclass
class GraphCosts:
    """A graph model's measured costs: the operator graph (per-sample seconds and bytes), the
    per-operator times as Pipeline takes them (``op_times``), and the chain table."""

    graph: Any
    op_times: Dict[str, Tuple[float, float]]
    table: CostTable


def measure_graph(model: Any, sample: Any, *, leaf_modules: Sequence[Any] = (),
                  repeats: int = 3, op_times: Optional[Dict[str, Tuple[float, float]]] = None,
                  optimizer_factor: float = 0.0) -> GraphCosts:
    """Capture ``model`` and time its operators on ``sample = (inputs, targets)`` (``inputs``
    a tensor or a tuple of the model's positional inputs); ``op_times`` (``{fx node name:
    (forward_s, backward_s)}`` per sample) skips the timing."""
    from pipetrain.graphpipe import opgraph_from_fx
    from pipetrain.graphpipe.build import measure
    from pipetrain.graphpipe.capture import capture
    from pipetrain.planner.costs import measure_action_overhead
    inputs = sample[0]
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    gm = capture(model, leaf_modules)
    # Given times are taken as they are; measured ones pay the engine's per-action cost.
    overhead = 0.0 if op_times is not None else measure_action_overhead()
    if op_times is None:
        op_times = measure(gm, args, repeats)[0]
    g = opgraph_from_fx(gm, args, times=op_times)
    return GraphCosts(g, dict(op_times), graph_table(g, overhead, optimizer_factor))


def graph_table(g: Any, overhead: float = 0.0, optimizer_factor: float = 0.0) -> CostTable:
    """The operators of ``g`` in topological order as a chain :class:`CostTable`: F and B per
    sample from the operators, W = B / 2 for an operator with parameters (its weight gradient
    is about half its backward, as for a matrix product) and 0 without; activation = the
    operator's output; ``input_bytes[i]`` = the bytes of every value computed before i and
    used at or after i (what a cut before i carries); ``inner_input`` all False (the stash of
    a stage is its input plus its operators' outputs)."""
    order = g.topological_order()
    pos = {o: i for i, o in enumerate(order)}
    last_use = {o: max((pos[s] for s in g.succ[o]), default=pos[o]) for o in order}
    fwd, bwd, wgt, act, inp, par = [], [], [], [], [], []
    for i, o in enumerate(order):
        op = g.ops[o]
        fwd.append(Affine(0.0, op.forward))
        bwd.append(Affine(0.0, op.backward))
        wgt.append(Affine(0.0, op.backward / 2 if op.params else 0.0))
        act.append(Affine(0.0, op.activation))
        live = sum(g.ops[u].activation for u in order[:i] if last_use[u] >= i)
        inp.append(Affine(0.0, live))
        par.append(float(op.params))
    return CostTable(fwd, bwd, wgt, act, inp, par, optimizer_factor=optimizer_factor,
                     inner_input=[False] * len(order), forward_overhead=overhead,
                     backward_overhead=overhead, name=f"graph ({len(order)} operators)")


def graphpipe_candidates(gc: GraphCosts, devices: int, memory_limit: float, batch_size: int,
                         network: Network, *, micro_batch_sizes: Optional[Sequence[int]] = None,
                         widths: Optional[Sequence[int]] = None,
                         depths: Optional[Sequence[int]] = None) -> Tuple[List[Candidate], int]:
    """Every (p, w, b) of the graphpipe schedule, simulated (see the module docstring).
    Returns (candidates, simulations)."""
    from pipetrain.graphpipe import CostModel, partition
    from pipetrain.planner.search import grid
    row, t, g = MODELS["graphpipe"], gc.table, gc.graph
    out, sims = [], 0
    # (The partitioner may use fewer than p devices: a stage per operator at most.)
    for p, w, b, m in grid(devices, batch_size, len(g.ops), depths, widths, micro_batch_sizes):
        try:
            sg = partition(g, p, CostModel(microbatch_size=b, num_microbatches=m,
                                           max_replicas=1))
            sched = sg.dag_1f1b(m)
        except ValueError:
            continue
        k = t.slowdown_at(p)
        o = t.forward_overhead + t.action_overhead + network.action_overhead
        F = [k * b * sum(g.ops[i].forward for i in st) + o for st in sg.stages]
        B = [k * b * sum(g.ops[i].backward for i in st) + o for st in sg.stages]
        params = [sum(g.ops[i].params for i in st) for st in sg.stages]
        acts = [b * sum(g.ops[i].activation for i in st) for st in sg.stages]
        boundary = max((b * g.ops[u].activation for u, v in g.edges
                        if sg.stage_of[u] != sg.stage_of[v]), default=0.0)
        latency = network.transfer(boundary) + t.handoff_latency if len(sg.stages) > 1 else 0.0
        inflight = sched.peak_inflight()
        mem = [Memory(pr, t.grad_factor * pr, t.optimizer_factor * pr, n * a)
               for pr, a, n in zip(params, acts, inflight)]
        extra = network.allreduce(t.grad_factor * max(params), w) + t.update * max(params)
        step = sched.simulate(forward=F, backward=B, transfer=latency).makespan + extra
        sims += 1
        c = Candidate(p=p, w=w, b=b, m=m, schedule="graphpipe", v=1, recompute=False,
                      balance=[len(st) for st in sg.stages], memory=mem, bound=step,
                      extra=extra, latency=latency, costs=(F, B, [0.0] * len(F)),
                      model=row, limit=memory_limit)
        c.step_time, c.status = step, "simulated"
        out.append(c)
    return out, sims
