"""Model -> stages + schedule: the runtime path of GraphPipe (and of chain schedules on a
graph model).

:func:`build` captures the model (:mod:`pipetrain.graphpipe.capture`), measures each
operator on the sample micro-batch (:func:`measure`), assigns operators to stages, routes
every value to the stages that use it, and returns the schedule and one
:class:`~pipetrain.graphpipe.graph_stage.GraphStage` per stage.

* ``schedule="graphpipe"``: GraphPipe's partitioner (:func:`~pipetrain.graphpipe.partition`)
  cuts the operator graph into convex stages forming a DAG, one device each; a value goes
  from the stage computing it straight to each stage using it (one edge, sent once to each).
  A stage without input edges (a source) reads the model's inputs from the user's
  micro-batch; a later stage using a model input gets it on an edge from a source stage
  that is its ancestor (added if needed: no cycle, the source is already upstream). The
  order is the DAG 1F1B (:mod:`pipetrain.graphpipe.dag_schedule`), validated.
* a chain schedule (``"1f1b"``, ``"gpipe"``, ...): the operators in topological order cut
  into ``p * v`` contiguous stages balancing measured forward + backward time (the
  sequential baseline); a value used ``k`` stages later is relayed by the stages between.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

from pipetrain.graphpipe.capture import capture
from pipetrain.graphpipe.graph_stage import GraphStage, Piece, build_piece

__all__ = ["Built", "build", "measure"]


def _tensors(v: Any) -> List[torch.Tensor]:
    from pipetrain.microbatch import flatten
    return [t for t in flatten(v)[0] if isinstance(t, torch.Tensor)]


def measure(gm: fx.GraphModule, args: Sequence[Any], repeats: int = 3
            ) -> Tuple[Dict[str, Tuple[float, float]], Dict[str, float], int]:
    """Per operator of ``gm`` on ``args``: ``times[name] = (forward_s, backward_s)`` per
    sample (best of ``repeats``; backward: ``autograd.grad`` of the operator alone w.r.t. its
    float inputs and parameters, with ones as the output gradient), and ``act[name]`` bytes
    per sample of its output. Returns ``(times, act, batch)``."""
    batch = max(1, int(_tensors(args)[0].shape[0]) if _tensors(args) and _tensors(args)[0].dim() else 1)
    times: Dict[str, Tuple[float, float]] = {}
    act: Dict[str, float] = {}

    class _Timer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.op in ("placeholder", "output", "get_attr"):
                return super().run_node(n)
            fwd = bwd = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = super().run_node(n)
                fwd = min(fwd, time.perf_counter() - t0)
            b = self._backward_time(n, repeats)
            times[n.name] = (fwd / batch, b / batch)
            act[n.name] = float(sum(t.numel() * t.element_size() for t in _tensors(out))) / batch
            return out

        def _backward_time(self, n: fx.Node, reps: int) -> float:
            a, kw = self.fetch_args_kwargs_from_env(n)
            leaves = [t for t in _tensors((a, kw)) if t.is_floating_point()]
            copies = {id(t): t.detach().requires_grad_(True) for t in leaves}
            a, kw = fx.node.map_aggregate((a, kw), lambda v: copies.get(id(v), v))
            params = list(self.module.get_submodule(n.target).parameters()) \
                if n.op == "call_module" else []
            wrt = list(copies.values()) + params
            best = float("inf")
            for _ in range(reps):
                with torch.enable_grad():
                    out = getattr(self, n.op)(n.target, a, kw)
                outs = [t for t in _tensors(out) if t.requires_grad]
                if not outs or not wrt:
                    return 0.0
                t0 = time.perf_counter()
                torch.autograd.grad(outs, wrt, [torch.ones_like(t) for t in outs],
                                    allow_unused=True)
                best = min(best, time.perf_counter() - t0)
            return best

    with torch.no_grad():
        _Timer(gm).run(*args)
    return times, act, batch


@dataclass
class Built:
    """What :func:`build` returns: the schedule, the stages, and what to show the user."""

    schedule: Any
    stages: List[GraphStage]
    graph: fx.GraphModule
    stage_of: Dict[str, int]                      # fx node name -> stage
    partition: Any = None                         # graphpipe StageGraph (schedule="graphpipe")
    partition_s: float = 0.0                      # seconds spent in the partitioner
    opgraph: Any = None
    times: Dict[str, Tuple[float, float]] = field(default_factory=dict)


def _chain_assignment(gm: fx.GraphModule, times, num_stages: int) -> Dict[str, int]:
    from pipetrain.partition import balance_costs
    ops = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    if len(ops) < num_stages:
        raise ValueError(f"{num_stages} stages but the model has only {len(ops)} operators")
    counts = balance_costs([sum(times.get(n.name, (0.0, 0.0))) + 1e-12 for n in ops], num_stages)
    stage_of, i = {}, 0
    for s, c in enumerate(counts):
        for n in ops[i:i + c]:
            stage_of[n.name] = s
        i += c
    return stage_of


def _route(gm: fx.GraphModule, stage_of: Dict[str, int], n: int, chain: bool):
    """Edges and what each carries: ``carry[(s, t)]`` names in first-use order; ``reads[s]``
    model-argument positions a source reads; ``needs[s]`` names stage s takes from edges."""
    nodes = list(gm.graph.nodes)
    places = [nd for nd in nodes if nd.op == "placeholder"]
    consumers: Dict[str, List[int]] = {}
    for nd in nodes:
        here = n - 1 if nd.op == "output" else stage_of.get(nd.name)
        if here is None:
            continue
        for a in nd.all_input_nodes:
            if a.op != "get_attr":
                consumers.setdefault(a.name, [])
                if here not in consumers[a.name]:
                    consumers[a.name].append(here)
    carry: Dict[Tuple[int, int], List[str]] = {}

    def send(name: str, s: int, t: int) -> None:
        if chain:           # relay along s -> s+1 -> ... -> t
            for u in range(s, t):
                lst = carry.setdefault((u, u + 1), [])
                if name not in lst:
                    lst.append(name)
        else:
            lst = carry.setdefault((s, t), [])
            if name not in lst:
                lst.append(name)

    for nd in nodes:     # values computed in one stage, used in others
        if nd.op in ("placeholder", "get_attr", "output"):
            continue
        for t in consumers.get(nd.name, []):
            if t != stage_of[nd.name]:
                if t < stage_of[nd.name]:
                    raise AssertionError("stage order is not topological")
                send(nd.name, stage_of[nd.name], t)
    has_input = {t for (_, t) in carry}
    sources = [s for s in range(n) if s not in has_input] if not chain else [0]
    ancestors = _ancestors(carry, n)
    reads: Dict[int, List[int]] = {s: [] for s in sources}
    for pos, ph in enumerate(places):
        for t in sorted(consumers.get(ph.name, [])):
            if t in reads:
                if pos not in reads[t]:
                    reads[t].append(pos)
                continue
            src = min(s for s in sources if s in ancestors[t]) if not chain else 0
            if pos not in reads[src]:
                reads[src].append(pos)
            send(ph.name, src, t)
    return carry, reads


def _ancestors(carry, n: int) -> List[set]:
    anc = [set() for _ in range(n)]
    for t in range(n):          # stages are numbered in topological order
        for (s, u) in carry:
            if u == t:
                anc[t] |= anc[s] | {s}
    return anc


def build(model: Any, sample: Any, *, schedule: Any, num_devices: int, num_microbatches: int,
          loss_fn: Any, checkpoint: str = "never", num_chunks: Optional[int] = None,
          leaf_modules: Sequence[Any] = (), memory_limit: Optional[float] = None,
          rng_lock: Optional[bool] = None, check_finite: bool = False,
          devices: Optional[Sequence[torch.device]] = None,
          times: Optional[Dict[str, Tuple[float, float]]] = None) -> Built:
    """Stages and schedule for ``model`` (see the module docstring). ``sample``: one
    micro-batch of inputs (a tuple is ``model(*sample)``), used to measure the operators;
    ``times``: ``{fx node name: (forward_s, backward_s)}`` per sample to use instead of
    measuring (e.g. measured once for several pipelines, so they plan on the same costs)."""
    from pipetrain import arguments as args
    from pipetrain import schedules
    from pipetrain.graphpipe import CostModel, opgraph_from_fx, partition
    from pipetrain.graphpipe.dag_schedule import dag_1f1b_actions

    sample_args = tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)
    gm = capture(model, leaf_modules, sample_args)
    if times is None:
        times, _, batch = measure(gm, sample_args)
    else:
        first = _tensors(sample_args)
        batch = int(first[0].shape[0]) if first and first[0].dim() else 1
    ops = [nd for nd in gm.graph.nodes if nd.op not in ("placeholder", "output", "get_attr")]
    built = Built(None, [], gm, {}, times=times)
    if schedule == "graphpipe":
        g = opgraph_from_fx(gm, sample_args, times=times)
        cost = CostModel(microbatch_size=batch, num_microbatches=num_microbatches,
                         memory_limit=memory_limit, max_replicas=1)
        t0 = time.perf_counter()
        sg = partition(g, num_devices, cost)
        built.partition_s, built.partition, built.opgraph = time.perf_counter() - t0, sg, g
        names = {nd.name for nd in ops}
        # Placeholders are routed separately; a stage holding only placeholders is dropped.
        kept = [[g.ops[o].name for o in st if g.ops[o].name in names] for st in sg.stages]
        kept = [st for st in kept if st]
        stage_of = {name: s for s, st in enumerate(kept) for name in st}
        n = len(kept)
        chain = False
    else:
        probe = args.build_schedule(schedule, num_devices, None, num_microbatches, num_chunks,
                                    len(ops))
        n = probe.num_stages
        stage_of = _chain_assignment(gm, times, n)
        chain = True
    built.stage_of = stage_of
    carry, reads = _route(gm, stage_of, n, chain)
    edges = sorted(carry)
    if chain:
        built.schedule = probe
    else:
        succ = [[t for (s, t) in edges if s == u] for u in range(n)]
        inflight = [0] * n
        for s in range(n - 1, -1, -1):
            inflight[s] = 1 + max((inflight[t] for t in succ[s]), default=0)
        rows = dag_1f1b_actions(inflight, num_microbatches)
        built.schedule = schedules.Schedule.from_actions(
            rows, num_stages=n, num_microbatches=num_microbatches, edges=edges,
            placement=list(range(n)), name="graphpipe").validate()
    graph = built.schedule.stage_graph
    out_node = list(gm.graph.nodes)[-1]
    devs = devices or [torch.device("cpu")] * graph.num_devices
    for k in range(n):
        info = graph.stage(k)
        in_names = [carry[(graph.edge(e).src, k)] for e in info.inputs]
        out_names = [carry[(k, graph.edge(e).dst)] for e in info.outputs]
        own = [nd for nd in ops if stage_of[nd.name] == k]
        if info.inputs:
            placeholders, inputs = None, [name for edge in in_names for name in edge]
        else:
            placeholders = sorted(reads.get(k, []))
            phs = [nd for nd in gm.graph.nodes if nd.op == "placeholder"]
            inputs = [phs[i].name for i in placeholders]
        # get_attr nodes (constants, parameters used directly) are copied into each user.
        attrs = [nd for nd in gm.graph.nodes if nd.op == "get_attr"
                 and any(stage_of.get(u.name) == k for u in nd.users)]
        sub = build_piece(gm, attrs + own, inputs, out_names,
                          out_node.args[0] if not info.outputs else None)
        piece = Piece(sub, placeholders)
        device = devs[info.device]
        piece.to(device)
        recompute = checkpoint == "always" or (checkpoint == "except_last" and bool(info.outputs))
        built.stages.append(GraphStage(k, [piece], device, inputs=info.inputs,
                                       outputs=info.outputs, checkpoint=recompute,
                                       loss_fn=None if info.outputs else loss_fn,
                                       input_grad=bool(info.inputs), rng_lock=rng_lock,
                                       check_finite=check_finite))
    return built
