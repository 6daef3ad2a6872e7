"""Evaluation: a forward-only pipeline run (``Pipeline.eval``).

The plan has only forwards: device ``d`` runs ``F`` of its stages micro-batch by micro-batch
(``0F0 2F0 0F1 2F1 ...`` for stages 0 and 2), which is deadlock-free because every
dependency (the previous stage's F of the same micro-batch) comes earlier in that order on
its own device. Across processes the same actions are lowered by the IR (``Schedule.lower``
inserts ``SF`` / ``RF``); the IR's validator wants a backward per forward, so the forward-only
schedule is lowered but not validated, and its one kind of dependency is written here.

Stages run their layers under ``torch.no_grad`` with the modules in eval mode (restored
after): nothing is kept for a backward. The result is the merged output of the last stage
(on its rank) and, given targets, the loss as ``step`` computes it (every rank).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from pipetrain.dispatch import Run
from pipetrain.mailbox import VALUE
from pipetrain.microbatch import gather
from pipetrain.schedules import Schedule
from pipetrain.transport import to_device

__all__ = ["EvalPlan", "EvalMixin", "forward_schedule"]


def forward_schedule(graph: Any, m: int) -> Schedule:
    """The forward-only schedule of ``graph``'s chain over ``m`` micro-batches (unvalidated)."""
    rows: List[List[str]] = [[] for _ in range(graph.num_devices)]
    order = graph.topological_order()
    for k in range(m):
        for s in order:
            rows[graph.stage(s).device].append(f"{s}F{k}")
    return Schedule.from_actions(rows, num_stages=graph.num_stages, num_microbatches=m,
                                 placement=[graph.stage(s).device for s in range(graph.num_stages)],
                                 edges=[(e.src, e.dst) for e in graph.edges], name="forward")


class EvalPlan:
    """The subset of :class:`~pipetrain.plan.Plan` a run needs, for a forward-only schedule."""

    def __init__(self, schedule: Schedule, graph: Any, lowered: bool = False) -> None:
        self.schedule = schedule.lower() if lowered else schedule
        self.graph = graph
        self.num_devices = graph.num_devices
        self.num_microbatches = schedule.num_microbatches
        self.num_minibatches = 1
        self.actions = [list(self.schedule.actions(d)) for d in range(self.num_devices)]
        where = {(a.stage, a.microbatch): (d, i) for d, row in enumerate(self.actions)
                 for i, a in enumerate(row) if str(a.kind) == "F"}
        preds = {e.dst: e.src for e in graph.edges}
        self.deps = [[[where[(preds[a.stage], a.microbatch)]]
                      if str(a.kind) == "F" and a.stage in preds and
                      where[(preds[a.stage], a.microbatch)][0] != d else []
                      for a in row] for d, row in enumerate(self.actions)]
        self._compiled: Dict[int, Any] = {}

    @property
    def total_microbatches(self) -> int:
        return self.num_microbatches

    def compiled(self, executor: Any) -> Any:
        entry = self._compiled.get(id(executor))
        if entry is None or entry[0] is not executor:
            rows = [[(str(a), [tuple(x) for x in dep]) for a, dep in zip(row, deps)]
                    for row, deps in zip(self.actions, self.deps)]
            entry = self._compiled[id(executor)] = (executor, executor.compile(rows))
        return entry[1]


class EvalMixin:
    """Makes a :class:`Run` forward-only: F runs the stage's layers without autograd; the
    last stage keeps its outputs (and losses when targets were given)."""

    has_targets = False
    loss_fn: Any = None

    def _compute(self, kind: str, stage: Any, k: int) -> None:
        if kind != "F":
            return
        s = stage.index
        inputs = self._in[s]
        if inputs:
            x = stage.join_inputs([tr.receive(self.mailbox.take(VALUE, e, k))
                                   for e, tr, _, _ in inputs])
        else:
            x = to_device(self.x[k], stage.device)
        with torch.no_grad():
            for layer in stage.layers:
                x = layer(x)
            if not self._out[s]:
                self.outputs[k] = x
                if self.has_targets:
                    self.losses[k] = self.loss_fn(x, to_device(self.y[k], stage.device)).detach().to("cpu")
                return
        for (e, tr, a, b), part in zip(self._out[s], stage.split_outputs(x)):
            self.mailbox.put(VALUE, e, k, tr.send(part, a, b))


class EvalRun(EvalMixin, Run):
    """A forward-only run in one process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outputs: Dict[int, Any] = {}


def _train_modes(stages: List[Any], mode: Optional[List[bool]] = None) -> List[bool]:
    mods = [m for st in stages if st is not None for layer in st.layers for m in layer.modules()]
    before = [m.training for m in mods]
    for m, t in zip(mods, mode if mode is not None else [False] * len(mods)):
        m.train(t)
    return before


def evaluate(pipe: Any, inputs: Any, targets: Any = None) -> Tuple[Any, Optional[torch.Tensor]]:
    """One process: (merged outputs, loss or None) of a forward-only pipelined run."""
    graph = pipe.plan.graph
    plan = getattr(pipe, "_eval_plan", None)
    if plan is None or plan.num_microbatches != pipe.num_microbatches:
        plan = pipe._eval_plan = EvalPlan(forward_schedule(graph, pipe.num_microbatches), graph)
    y = targets if targets is not None else inputs
    run = EvalRun(plan, pipe.stages, pipe.runner.transports, pipe.devices, [(inputs, y)],
                  pipe.num_threads)
    run.has_targets, run.loss_fn = targets is not None, pipe._loss
    pipe._loss.begin(targets)
    modes = _train_modes(pipe.stages)
    try:
        pipe.runner.executor.run(plan.compiled(pipe.runner.executor), run.dispatch,
                                 timeout=pipe.timeout)
    finally:
        _train_modes(pipe.stages, modes)
    out = gather([run.outputs[k] for k in range(plan.num_microbatches)])
    loss = pipe._loss.finish(run.losses_per_minibatch()[0]) if targets is not None else None
    return out, loss
