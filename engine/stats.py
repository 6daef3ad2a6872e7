"""Step statistics: what one training step did, measured from the executor's timeline.

Definitions (the same as the schedule simulator's, so measured and simulated numbers compare):

- makespan: from the first action's start to the last action's end, over all devices;
- busy(d): the summed durations of device d's actions; idle(d) = makespan - busy(d);
- bubble ratio: the idle fraction of all device time, ``sum_d idle(d) / (p * makespan)``.
  For GPipe / 1F1B with equal stage costs this is ``(p-1)/(m+p-1)``.

The bubble ratio is computed in one place, :func:`bubble_ratio`; :class:`StepStats` and
:meth:`pipetrain.timeline.Timeline.bubble_ratio` both call it.

Times from the executor are nanoseconds on a steady clock, relative to the run's start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Any, Dict, List, NamedTuple, Optional, Sequence

__all__ = ["ActionRecord", "StepStats", "bubble_ratio", "measure", "measure_run", "measure_later", "per_stage_costs",
           "simulate_measured"]


def bubble_ratio(busy: Sequence[float], makespan: float) -> float:
    """The bubble ratio: the idle fraction of all device time, ``sum_d idle(d) / (p * makespan)``.

    ``busy[d]`` is the summed duration of device d's actions and ``makespan`` the time from
    the first action's start to the last action's end over all devices (any unit, the same
    for both): it divides by ``p * makespan``, not by the run's wall time, so the time before
    the first action and after the last one (thread wake-up, the caller's own work) is not
    counted as bubble. ``idle(d) = makespan - busy(d)``, floored at 0. This is the formula
    of the C++ schedule simulator (csrc/schedule/simulator.cpp, the ``bubble_ratio`` of
    ``Schedule.simulate(...)``, whose makespan starts at 0 = the first action's start), so a
    measured step and its simulation compare directly; for GPipe / 1F1B with equal stage
    costs it is ``(p-1)/(m+p-1)``. 0.0 when ``makespan`` is 0 or there are no devices.
    """
    p = len(busy)
    if p == 0 or makespan <= 0:
        return 0.0
    return sum(max(0.0, makespan - b) for b in busy) / (p * makespan)


class ActionRecord(NamedTuple):
    """One action of a run: where, what, and when (ns since the run started; both -1 when it
    never ran, e.g. after a failure: then it counts for nothing)."""

    device: int
    label: str        # e.g. "1F3": stage 1, forward, micro-batch 3
    kind: str         # "F", "B", "I" or "W"
    stage: int
    microbatch: int
    start_ns: int
    end_ns: int

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) * 1e-9


@dataclass
class StepStats:
    """The last step, measured. All times in seconds.

    Attributes:
        schedule: schedule name.
        num_devices / num_stages / num_microbatches: the pipeline's shape.
        samples: samples in the mini-batch.
        wall_s: the whole ``step()`` call (scatter, run, gather of the loss).
        makespan_s: first action start to last action end.
        busy_s / idle_s: per device.
        bubble_ratio: ``sum(idle) / (p * makespan)``.
        samples_per_s: ``samples / wall_s``.
        costs_s: per kind ("F", "B", "I", "W"), per stage: the mean action duration (with
            batched W's, "W" per micro-batch and "W_fixed" the fixed part, fitted).
        peak_stash_bytes / peak_inflight: per stage, the most bytes / micro-batches kept
            between forward and backward during the step.
        records: every action, per device in issue order.
        waits: per device, the executor's waits as rows ``(index, dep_device, dep_index,
            start_ns, end_ns)`` (:data:`pipetrain.timeline.WAIT_COLUMNS`; dep_device -1 =
            taking the GIL), or empty when not measured. :func:`pipetrain.trace.chrome_trace`
            draws them as ``wait <label>`` events.
    """

    schedule: str
    num_devices: int
    num_stages: int
    num_microbatches: int
    samples: int
    wall_s: float
    makespan_s: float
    busy_s: List[float]
    idle_s: List[float]
    bubble_ratio: float
    samples_per_s: float
    costs_s: Dict[str, List[float]]
    peak_stash_bytes: List[int] = field(default_factory=list)
    peak_inflight: List[int] = field(default_factory=list)
    records: List[List[ActionRecord]] = field(default_factory=list, repr=False)
    waits: List[Any] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        lines = [f"{self.schedule}: p={self.num_devices} stages={self.num_stages} "
                 f"m={self.num_microbatches} samples={self.samples}",
                 f"  wall {self.wall_s * 1e3:.2f} ms, makespan {self.makespan_s * 1e3:.2f} ms, "
                 f"bubble {100 * self.bubble_ratio:.1f} %, {self.samples_per_s:.1f} samples/s"]
        for d, (b, i) in enumerate(zip(self.busy_s, self.idle_s)):
            lines.append(f"  device {d}: busy {b * 1e3:.2f} ms, idle {i * 1e3:.2f} ms")
        return "\n".join(lines)


def _covered(r: ActionRecord) -> int:
    """Micro-batches an action covers: ``n`` for a batched W labelled ``"3W4-7"``, else 1."""
    if r.kind != "W" or "-" not in r.label:
        return 1
    last = r.label.split("-", 1)[1].split("@", 1)[0]
    return int(last) - r.microbatch + 1


def _fit_batched_w(points: List[tuple]) -> tuple:
    """``(w, a)`` for W durations ``d = a + (w - a) * n`` over ``(n, d)`` points: least
    squares when two or more sizes ran, clamped to ``0 <= a <= w``; with one size, ``a = 0``
    and ``w`` the mean per micro-batch."""
    ns = {n for n, _ in points}
    if len(ns) < 2:
        return sum(d / n for n, d in points) / len(points), 0.0
    k = len(points)
    mn = sum(n for n, _ in points) / k
    md = sum(d for _, d in points) / k
    slope = (sum((n - mn) * (d - md) for n, d in points)
             / sum((n - mn) ** 2 for n, _ in points))
    a = md - slope * mn
    w = a + slope
    a = min(max(a, 0.0), max(w, 0.0))
    return max(w, 0.0), a


def per_stage_costs(records: Sequence[Sequence[ActionRecord]], num_stages: int) -> Dict[str, List[float]]:
    """Mean duration per action kind and stage (0.0 where a kind never ran on a stage).

    With batched W's (``"3W4-7"``), ``"W"`` is the fitted cost of one micro-batch's W and
    ``"W_fixed"`` the fixed part ``a`` of a batched W's ``a + (W - a) * n`` (the simulator's
    ``weight_fixed``)."""
    sums: Dict[str, List[float]] = {}
    counts: Dict[str, List[int]] = {}
    w_points: Dict[int, List[tuple]] = {}
    for per_device in records:
        for r in per_device:
            sums.setdefault(r.kind, [0.0] * num_stages)[r.stage] += r.duration_s
            counts.setdefault(r.kind, [0] * num_stages)[r.stage] += 1
            if r.kind == "W":
                w_points.setdefault(r.stage, []).append((_covered(r), r.duration_s))
    out = {k: [s / c if c else 0.0 for s, c in zip(sums[k], counts[k])] for k in sums}
    if any(n > 1 for pts in w_points.values() for n, _ in pts):
        fixed = [0.0] * num_stages
        for st, pts in w_points.items():
            out["W"][st], fixed[st] = _fit_batched_w(pts)
        out["W_fixed"] = fixed
    return out


def measure(records: Sequence[Sequence[ActionRecord]], *, schedule: str, num_stages: int,
            num_microbatches: int, samples: int, wall_s: float,
            peak_stash_bytes: Optional[List[int]] = None,
            peak_inflight: Optional[List[int]] = None,
            waits: Optional[Sequence[Any]] = None) -> StepStats:
    """Build :class:`StepStats` from one run's action records (one list per device) and,
    optionally, its waits (``Timeline.waits``: per device, rows of
    :data:`pipetrain.timeline.WAIT_COLUMNS`), kept for the trace."""
    p = len(records)
    ran = [[r for r in d if r.start_ns >= 0 and r.end_ns >= 0] for d in records]  # see ActionRecord
    starts = [r.start_ns for d in ran for r in d]
    ends = [r.end_ns for d in ran for r in d]
    makespan = (max(ends) - min(starts)) * 1e-9 if starts else 0.0
    busy = [sum(r.duration_s for r in d) for d in ran]
    idle = [max(0.0, makespan - b) for b in busy]
    return StepStats(
        schedule=schedule, num_devices=p, num_stages=num_stages,
        num_microbatches=num_microbatches, samples=samples, wall_s=wall_s,
        makespan_s=makespan, busy_s=busy, idle_s=idle, bubble_ratio=bubble_ratio(busy, makespan),
        samples_per_s=samples / wall_s if wall_s > 0 else 0.0,
        costs_s=per_stage_costs(ran, num_stages),
        peak_stash_bytes=list(peak_stash_bytes or []), peak_inflight=list(peak_inflight or []),
        records=[list(d) for d in records], waits=list(waits) if waits is not None else [])


def measure_run(outcome: Any, plan: Any, num_stages: int) -> StepStats:
    """:class:`StepStats` of a one-mini-batch run (a :class:`~pipetrain.runner.RunOutcome` of
    ``plan``): the executor's timeline and waits, the run's memory meters."""
    return measure_later(outcome, plan, num_stages)()


def measure_later(outcome: Any, plan: Any, num_stages: int) -> Callable[[], StepStats]:
    """:func:`measure_run`, deferred: keeps the timeline, the action table and the run's few
    numbers (not the run: its inputs and outputs are freed), and builds the StepStats when
    called. Building them costs ~1.5 µs per action, so a step pays it only when someone asks
    for ``stats()``."""
    timeline, run = outcome.timeline, outcome.run
    table = getattr(run, "table", None) or plan.actions
    samples, wall_s = sum(map(sum, run.sizes)), outcome.wall_s
    peak_bytes = [mt.peak_bytes for mt in run.meters]
    peak_count = [mt.peak_count for mt in run.meters]

    def build() -> StepStats:
        return measure(timeline.records(table), schedule=plan.schedule.name,
                       num_stages=num_stages, num_microbatches=plan.num_microbatches,
                       samples=samples, wall_s=wall_s, peak_stash_bytes=peak_bytes,
                       peak_inflight=peak_count, waits=timeline.waits)
    return build


def simulate_measured(schedule: Any, costs: Dict[str, List[float]]) -> Any:
    """``schedule.simulate`` fed measured mean costs per stage (``StepStats.costs_s``): F, and
    B or I + W (then ``weight`` = W)."""
    zeros = [0.0] * schedule.num_stages
    forward = costs.get("F", zeros)
    if "W" in costs:
        i_cost, w_cost = costs.get("I", zeros), costs["W"]
        return schedule.simulate(forward=forward, backward=[a + b for a, b in zip(i_cost, w_cost)],
                                 weight=w_cost, weight_fixed=costs.get("W_fixed", 0.0))
    return schedule.simulate(forward=forward, backward=costs.get("B", zeros))
