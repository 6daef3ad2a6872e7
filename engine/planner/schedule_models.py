"""The table of schedule models: what the planner needs to know about each schedule.

Each :class:`ScheduleModel` says how to evaluate a schedule for a shape (p devices, m
micro-batches, v chunks): its step time (the discrete-event simulator on the built schedule,
or a closed form for schedules without a builder yet), how many weight versions each device
holds, how many micro-batches' activations are in flight at peak (a closed form, tested against
the simulator), whether it is asynchronous and whether :class:`~pipetrain.Pipeline` can run it
today (the asynchronous ones through ``Pipeline(..., optimizer=...).train()``). New
schedules plug in by adding a row: :func:`register` — the search has no special cases.

Conventions: per-stage costs in seconds (F, full backward B, weight part W), one entry per
(virtual) stage, stage k on device k % p; ``latency`` the time of one boundary transfer,
``wake`` the wake-up of a device that waited for it (0 off CPU).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pipetrain import schedules
from pipetrain.planner.wake import makespan

__all__ = ["ScheduleModel", "MODELS", "register", "models_for"]


@dataclasses.dataclass(frozen=True)
class ScheduleModel:
    """One row of the table.

    Attributes:
        name: the schedule's name (as :func:`pipetrain.schedules.build` and ``Pipeline`` know it).
        asynchronous: no flush between mini-batches (stale or predicted weights); only chosen
            with ``allow_async=True``.
        runnable: ``Pipeline(schedule=name)`` runs it in this build.
        split_backward: the backward is split into I and W (zero bubble).
        graph: the schedule runs a stage DAG of a multi-branch model (graphpipe): evaluated
            by :mod:`pipetrain.planner.graph` on the partitioner's stages, not by the chain
            search.
        chunks: the values of v (stages per device) to try.
        versions: ``versions(p, d)`` weight versions device d holds.
        inflight: ``inflight(p, m, v, d)`` peak micro-batch activations held on device d (in
            units of one stage's activations for one micro-batch), closed form.
        valid: ``valid(p, m, v)`` whether the shape is allowed.
        step_time: ``step_time(p, m, v, F, B, W, latency)`` seconds for one mini-batch, or
            None to simulate the built schedule.
        note: where the model comes from.
    """

    name: str
    asynchronous: bool = False
    runnable: bool = True
    split_backward: bool = False
    graph: bool = False
    chunks: Tuple[int, ...] = (1,)
    versions: Callable[[int, int], int] = lambda p, d: 1
    inflight: Callable[[int, int, int, int], int] = lambda p, m, v, d: min(p - d, m)
    valid: Callable[[int, int, int], bool] = lambda p, m, v: True
    step_time: Optional[Callable[..., float]] = None
    note: str = ""

    def simulate(self, p: int, m: int, v: int, F: Sequence[float], B: Sequence[float],
                 W: Sequence[float], latency: float, wake: float = 0.0) -> float:
        """Seconds of one mini-batch from the built schedule's simulation (or the closed form).
        ``latency``: every cross-device hand-off's transfer; ``wake``: what a device that sat
        idle waiting for another's output pays on top (:mod:`pipetrain.planner.wake`; a
        closed form charges it on every hand-off)."""
        if self.step_time is not None:
            return self.step_time(p, m, v, F, B, W, latency + wake)
        s = schedules.build(self.name, num_stages=p, num_microbatches=m, num_chunks=v)
        if wake > 0:
            return makespan(s, F, B, W if self.split_backward else [0.0] * len(F), latency, wake)
        return s.simulate(forward=list(F), backward=list(B),
                          weight=list(W) if self.split_backward else None,
                          transfer=latency).makespan

    def peak_inflight(self, p: int, m: int, v: int) -> List[int]:
        """Per device: exact from the built schedule's order when it has a builder, else the
        closed form."""
        if self.step_time is None and self.name in schedules.NAMES:
            return schedules.build(self.name, num_stages=p, num_microbatches=m,
                                   num_chunks=v).peak_inflight()
        return [self.inflight(p, m, v, d) for d in range(p)]


def _steady_1f1b(p: int, m: int, v: int, F, B, W, latency: float) -> float:
    """No flush (PipeDream-2BW's rule): in steady state each mini-batch costs m times the
    slowest stage's F + B plus its boundary transfers (in and out); the warm-up happens once
    over many mini-batches and is not charged."""
    per_device = [0.0] * p
    for k, (f, b) in enumerate(zip(F, B)):
        per_device[k % p] += f + b
    comm = 2 * latency if p > 1 else 0.0
    return m * (max(per_device) + comm)


MODELS: Dict[str, ScheduleModel] = {}


def register(model: ScheduleModel) -> ScheduleModel:
    """Add (or replace) a row of the table."""
    MODELS[model.name] = model
    return model


register(ScheduleModel("gpipe", inflight=lambda p, m, v, d: m,
                       note="fill-drain: all m forwards in flight"))
register(ScheduleModel("1f1b", note="PipeDream-Flush: p - d in flight on device d"))
register(ScheduleModel("interleaved-1f1b", chunks=(2, 4),
                       inflight=lambda p, m, v, d: min(v * p + p - 1 - 2 * d, v * m),
                       valid=lambda p, m, v: p > 1 and m % p == 0,
                       note="Megatron interleaving: v chunks, m a multiple of p"))
register(ScheduleModel("zb-h1", split_backward=True,
                       note="zero bubble H1: 1F1B's memory, W fills the drain"))
register(ScheduleModel("zb-h2", split_backward=True,
                       inflight=lambda p, m, v, d: min(2 * (p - d) - 1, m),
                       note="zero bubble H2: about twice 1F1B's in-flight"))
register(ScheduleModel("graphpipe", graph=True,
                       note="GraphPipe: the partitioner's stage DAG, DAG 1F1B; multi-branch "
                            "models only"))
register(ScheduleModel("2bw", asynchronous=True, step_time=_steady_1f1b,
                       versions=lambda p, d: 2, valid=lambda p, m, v: m >= p,
                       note="PipeDream-2BW: 1F1B without flush, 2 weight versions, m >= p"))
register(ScheduleModel("2bw-predict", asynchronous=True,
                       step_time=_steady_1f1b, versions=lambda p, d: 3,
                       valid=lambda p, m, v: m >= p,
                       note="2BW with weight prediction: 2 versions + 1 predicted buffer"))
register(ScheduleModel("pipedream", asynchronous=True, step_time=_steady_1f1b,
                       versions=lambda p, d: p - d,
                       note="PipeDream weight stashing: p - d versions on device d"))


def models_for(names, allow_async: bool) -> List[ScheduleModel]:
    """The rows for ``names`` ("all" or a list), asynchronous ones only if allowed.

    Raises ValueError for an unknown name, or an asynchronous one named without allow_async."""
    if names == "all" or names is None:
        return [m for m in MODELS.values() if allow_async or not m.asynchronous]
    if isinstance(names, str):
        names = [names]
    out = []
    for n in names:
        if n not in MODELS:
            raise ValueError(f"unknown schedule {n!r}: the planner models {', '.join(MODELS)}")
        if MODELS[n].asynchronous and not allow_async:
            raise ValueError(f"schedule {n!r} is asynchronous (stale weights): pass "
                             "allow_async=True to let the planner choose it")
        out.append(MODELS[n])
    return out
