"""The Pipeline facade's side of a graph model: keep the arguments, build at the sample.

:class:`GraphModel` is what :class:`~pipetrain.pipeline.Pipeline` holds for a model that is
not a sequence of layers. ``build(sample)`` (from ``example_inputs=``, or the first
micro-batch of the first ``step``) runs :func:`pipetrain.graphpipe.build.build` and fills
in the pipeline's schedule, plan, stages and runner, so the rest of the facade is the same
for graph and sequential models.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

__all__ = ["GraphModel"]


class GraphModel:
    """A graph model's capture options and, once built, its :class:`~.build.Built`."""

    def __init__(self, model: Any, leaf_modules: Sequence[Any], memory_limit: Optional[float],
                 op_times: Optional[dict] = None):
        self.model, self.leaf_modules, self.memory_limit = model, list(leaf_modules), memory_limit
        self.op_times = op_times
        self.built: Any = None
        self._pipe: Any = None
        self._options: Dict[str, Any] = {}

    def configure(self, pipe: Any, **options: Any) -> None:
        """Remember the pipeline's arguments (checked when the build runs)."""
        if not (isinstance(options["schedule"], str)):
            raise ValueError("a graph model takes a schedule name ('graphpipe' or a chain "
                             "schedule such as '1f1b'), not a built Schedule")
        if options["num_devices"] is None:
            raise ValueError("give num_devices for a graph model")
        self._pipe, self._options = pipe, options
        pipe.schedule, pipe.num_devices, pipe.balance = None, options["num_devices"], None
        pipe.num_microbatches = options["num_microbatches"] or 1

    def build_from_batch(self, inputs: Any) -> None:
        """Build from the first micro-batch of ``inputs``."""
        from pipetrain.microbatch import scatter
        self.build(scatter(inputs, self._pipe.num_microbatches)[0][0])

    def build(self, sample: Any) -> None:
        """Capture, measure, partition and start the runner (see the module docstring)."""
        from pipetrain import arguments as args
        from pipetrain.graphpipe.build import build
        from pipetrain.plan import Plan
        o, pipe = self._options, self._pipe
        devices = args.resolve_devices(o["devices"], o["num_devices"])
        b = build(self.model, sample, schedule=o["schedule"], num_devices=o["num_devices"],
                  num_microbatches=pipe.num_microbatches, loss_fn=o["loss_fn"],
                  checkpoint=o["checkpoint"], num_chunks=o["num_chunks"],
                  leaf_modules=self.leaf_modules, memory_limit=self.memory_limit,
                  rng_lock=o["rng_lock"], check_finite=o["check_finite"], devices=devices,
                  times=self.op_times)
        pipe.schedule, pipe.plan, pipe.stages = b.schedule, Plan(b.schedule), b.stages
        for st in b.stages:
            st.grad_scale = pipe._loss.grad_scale
        graph = pipe.plan.graph
        pipe.num_devices, pipe.num_stages = graph.num_devices, graph.num_stages
        pipe.devices = devices[:graph.num_devices]
        pipe.balance = [sum(1 for s in b.stage_of.values() if s == k) for k in range(graph.num_stages)]
        pipe._start_runner(o["num_threads"])
        self.built = b
        if getattr(pipe, "_optimizer_factory", None) is not None:    # train(): one per stage
            from pipetrain.training import make_optimizers
            make_optimizers(pipe, pipe._optimizer_factory)

    def summary(self) -> str:
        """Stages (operators, device) and edges (the values each carries)."""
        b = self.built
        if b is None:
            return "graph model, not built yet (built at the first step)"
        g = b.schedule.stage_graph
        lines = [f"{g.num_stages} stages on {g.num_devices} devices ({b.schedule.name})"]
        for k in range(g.num_stages):
            ops = [n for n, s in b.stage_of.items() if s == k]
            shown = ", ".join(ops) if len(ops) <= 8 else f"{', '.join(ops[:4])}, ... ({len(ops)} ops)"
            lines.append(f"  stage {k} [d{g.stage(k).device}]: {shown}")
        for e in g.edges:
            carried = b.stages[e.src].layers[0].module.graph.output_node().args[0]
            i = list(b.stages[e.src].outputs).index(e.id)
            names = [a.name for a in carried[i]]
            lines.append(f"  edge {e.src}->{e.dst}: {', '.join(names)}")
        return "\n".join(lines)

    def plot(self, path: Any) -> Any:
        """The partitioner's picture for "graphpipe"; for a chain, the operator graph coloured
        by stage (a :class:`~pipetrain.graphpipe.StageGraph` built from the assignment)."""
        from pipetrain.graphpipe import CostModel, StageGraph, opgraph_from_fx
        b = self.built
        if b.partition is not None:
            b.partition.plot(path)
            return path
        g = opgraph_from_fx(b.graph, times=b.times)
        n = b.schedule.num_stages
        stages = [[] for _ in range(n)]
        for op in g.ops:
            stages[b.stage_of.get(op.name, 0)].append(g.index(op.name))
        sg = StageGraph(g, stages, [1] * n, n, CostModel())
        sg.plot(path, title=f"{b.schedule.name}: {n} contiguous stages")
        return path
