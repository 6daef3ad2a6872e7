"""The planner: choose depth, width, micro-batch size, schedule and recompute from costs.

``pipetrain.plan(model, sample=(x, y), loss_fn=fn, devices=8, memory_per_device="80GB",
batch_size=256)`` measures the model's per-layer costs on the sample
(:mod:`~pipetrain.planner.costs`), enumerates configurations and evaluates each with the
schedule simulator and the memory model (:mod:`~pipetrain.planner.search`,
:mod:`~pipetrain.planner.memory`, :mod:`~pipetrain.planner.schedule_models`), and returns a
:class:`~pipetrain.planner.result.TrainingPlan`. Give ``costs=CostTable(...)`` instead of a
model to plan for hardware you do not have. ``devices`` may be a DeviceMesh
(:mod:`~pipetrain.planner.devices`); a multi-branch model (any ``nn.Module`` that is not a
sequence) is planned per operator, with GraphPipe's stage DAG next to the chain
linearizations (:mod:`~pipetrain.planner.graph`). ``plan.pipeline()`` builds the choice: this
rank's part under torchrun when w > 1 (:mod:`~pipetrain.planner.build`), an asynchronous
schedule with the ``optimizer=`` factory. PipeDream-2BW's planner is the special case
``schedules=["2bw"], allow_async=True``: with costs affine in b, the fastest fitting
configuration of each (w, p) is the largest b that fits, with recompute when that allows a
larger b and wins (tests/planner/test_search.py checks it against the paper's formulas).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

from pipetrain.planner.devices import DeviceSpec, device_spec
from pipetrain.planner.costs import Affine, CostTable, Network, measure_costs, parse_bytes
from pipetrain.planner.memory import Memory, device_memory
from pipetrain.planner.result import Candidate, TrainingPlan, fmt_bytes
from pipetrain.planner.schedule_models import MODELS, ScheduleModel, models_for, register
from pipetrain.planner.search import prefer_fewer_handoffs, rank, search
from pipetrain.planner.graph import graphpipe_candidates, is_graph_model, measure_graph

__all__ = ["plan", "DeviceSpec", "device_spec", "Affine", "CostTable", "Network",
           "measure_costs", "Memory", "Candidate", "TrainingPlan", "ScheduleModel", "MODELS",
           "register", "search", "device_memory"]


def plan(model: Any = None, sample: Any = None, loss_fn: Optional[Callable] = None, *,
         devices: Any, memory_per_device: Any, batch_size: int, schedules: Any = "all",
         allow_async: bool = False, costs: Optional[CostTable] = None,
         network: Optional[Network] = None, micro_batch_sizes: Optional[Sequence[int]] = None,
         recompute: Sequence[bool] = (False, True), optimizer_factor: float = 0.0,
         measure_sizes: Optional[Sequence[int]] = None, repeats: int = 5,
         threads: int = 1, widths: Optional[Sequence[int]] = None,
         optimizer: Optional[Callable] = None, leaf_modules: Sequence[Any] = (),
         op_times: Optional[dict] = None,
         handoff_tolerance: Optional[float] = None) -> TrainingPlan:
    """Choose the fastest configuration that fits.

    Args:
        model: an ``nn.Sequential`` (or list of layers) to measure; any other ``nn.Module``
            is a multi-branch graph: its operators are measured, the chain schedules run on
            their topological order and ``graphpipe`` on GraphPipe's stage DAG
            (:mod:`~pipetrain.planner.graph`); or a :class:`CostTable` (as ``costs=``).
        sample: ``(inputs, targets)``, a mini-batch whose slices are timed (its batch size
            bounds the measured micro-batch sizes; others are extrapolated by the fit).
        loss_fn: ``loss_fn(output, target) -> scalar``.
        devices: total devices (w * p), or a ``DeviceMesh``: 1-D gives the count, 2-D
            ``("dp", "pp")`` (or unnamed, in that order) fixes w and p
            (:mod:`~pipetrain.planner.devices`).
        memory_per_device: bytes, or a string such as ``"80GB"`` / ``"16GiB"``.
        batch_size: global mini-batch B = w * m * b.
        schedules: ``"all"`` or a list of names from the schedule table
            (:data:`~pipetrain.planner.schedule_models.MODELS`).
        allow_async: let asynchronous schedules (2bw, 2bw-predict, pipedream) be chosen.
            ``schedules="all"`` means every synchronous schedule unless this is True; naming an
            asynchronous schedule without it is a ValueError. They train with stale (or
            predicted) weights, so they are never chosen silently.
        costs: a cost table instead of measuring a model.
        network: transfers and all-reduce (default: free transfers, as between threads of
            one process).
        micro_batch_sizes: the b to try (default: every divisor of B / w).
        recompute: re-materialization settings to try.
        optimizer_factor: optimizer-state bytes per parameter byte of a measured model
            (0 plain SGD, 1 momentum, 2 Adam).
        measure_sizes, repeats, threads: for :func:`measure_costs`.
        widths: data-parallel widths w to consider (default all; ``[1]``: only what one
            process runs).
        leaf_modules, op_times: graph models only (as for ``Pipeline``): modules kept as one
            operator; ``{fx node name: (forward_s, backward_s)}`` per sample instead of
            timing the operators.
        handoff_tolerance: among configurations of the fastest's depth and width predicted
            within this fraction of it, take the one with the fewest cross-device hand-offs
            (:func:`~pipetrain.planner.search.prefer_fewer_handoffs`). Default: 0.10 when
            the costs carry a measured CPU hand-off (``handoff_latency > 0``), else 0.
        optimizer: ``optimizer(params) -> torch optimizer``, passed on to the Pipeline that
            :meth:`TrainingPlan.pipeline` builds (required there for asynchronous schedules,
            which step it themselves). Its state bytes are ``optimizer_factor``'s to say.
    Returns:
        a :class:`TrainingPlan`.
    Raises:
        ValueError: bad arguments, or nothing fits: by how much the configuration that needs
            least memory misses, and what would make it fit.
    """
    if isinstance(model, CostTable):
        costs, model = model, None
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    spec = device_spec(devices)
    devices = spec.count
    if spec.width is not None:
        if widths is not None and spec.width not in widths:
            raise ValueError(f"the device mesh fixes w={spec.width}, not in widths={list(widths)}")
        widths = [spec.width]
    if optimizer is not None and not callable(optimizer):
        raise ValueError("optimizer must be a factory: optimizer(params) -> optimizer")
    limit = parse_bytes(memory_per_device)
    rows = models_for(schedules, allow_async)
    graph = model is not None and is_graph_model(model)
    if any(r.graph for r in rows) and not graph and schedules not in ("all", None):
        raise ValueError("schedule 'graphpipe' partitions a multi-branch model (an nn.Module "
                         "with a forward over several branches); this model is a sequence of "
                         "layers: use the chain schedules")
    gc = None
    if graph:
        if sample is None or loss_fn is None:
            raise ValueError("a graph model is planned from its operators: give sample="
                             "(inputs, targets) and loss_fn")
        if any(r.asynchronous for r in rows) and schedules not in ("all", None):
            raise ValueError("a graph model runs the synchronous schedules (asynchronous ones "
                             "need a sequence of layers)")
        rows = [r for r in rows if not r.asynchronous]
        gc = measure_graph(model, sample, leaf_modules=leaf_modules, repeats=repeats,
                           op_times=op_times, optimizer_factor=optimizer_factor)
        costs = gc.table
    if costs is None:
        if model is None or sample is None or loss_fn is None:
            raise ValueError("give model, sample=(inputs, targets) and loss_fn to measure, "
                             "or costs=CostTable(...)")
        costs = measure_costs(model, sample, loss_fn, sizes=measure_sizes, repeats=repeats,
                              threads=threads, optimizer_factor=optimizer_factor)
    network = network or Network()
    if handoff_tolerance is None:
        handoff_tolerance = 0.10 if costs.handoff_latency > 0 else 0.0
    if not 0 <= handoff_tolerance < 1:
        raise ValueError(f"handoff_tolerance must be a fraction in [0, 1), got {handoff_tolerance}")
    t0 = time.perf_counter()
    cands, ev = search(costs, devices, limit, batch_size, rows, network,
                       micro_batch_sizes=micro_batch_sizes, recompute=recompute,
                       widths=widths, depths=[spec.depth] if spec.depth else None,
                       handoff_tolerance=handoff_tolerance)
    simulations = ev.simulations
    if gc is not None and any(r.graph for r in rows):
        extra, sims = graphpipe_candidates(gc, devices, limit, batch_size, network,
                                           micro_batch_sizes=micro_batch_sizes, widths=widths,
                                           depths=[spec.depth] if spec.depth else None)
        cands = prefer_fewer_handoffs(rank(list(cands) + extra), handoff_tolerance)
        simulations += sims
    elapsed = time.perf_counter() - t0
    if not cands:
        raise ValueError(f"no configuration of {devices} devices divides batch {batch_size} "
                         f"over {costs.num_layers} layers: use a batch size divisible by the "
                         "data-parallel widths, or give micro_batch_sizes that divide it")
    if not cands[0].fits:
        raise ValueError(_impossible(cands, limit, devices, batch_size))
    return TrainingPlan(cands, table=costs, model=model, loss_fn=loss_fn, search_s=elapsed,
                        simulations=simulations, memory_limit=limit, optimizer=optimizer,
                        graph=graph, op_times=gc.op_times if gc is not None else None)


def _impossible(cands: Sequence[Candidate], limit: float, devices: int, batch_size: int) -> str:
    """The message for a request nothing satisfies."""
    c = min(cands, key=lambda x: x.peak_memory)
    mem = max(c.memory, key=lambda x: x.total)
    state = mem.weights + mem.gradients + mem.optimizer
    act = mem.activations + mem.transient
    hints = [f"memory_per_device >= {fmt_bytes(c.peak_memory)}"]
    if state > limit:
        # Parameter state shrinks as 1/p at best: devices needed for it alone to fit.
        need = int(devices * state / limit) + 1
        hints.append(f"about {need}+ devices (weights, gradients and optimizer state alone "
                     f"need {fmt_bytes(state)} per device)")
    elif act > 0:
        hints.append(f"activations of {fmt_bytes(act)} down to {fmt_bytes(limit - state)} "
                     "(a smaller batch or micro-batch, or more devices)")
    return (f"nothing fits {fmt_bytes(limit)} per device: the smallest configuration "
            f"({c.label()}) needs {fmt_bytes(c.peak_memory)}, {fmt_bytes(c.peak_memory - limit)} "
            f"more than the limit (batch {batch_size} on {devices} devices). It would fit with "
            + " or ".join(hints) + ".")
