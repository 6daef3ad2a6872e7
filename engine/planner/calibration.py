"""Calibrating the per-layer probes against the runtime that will execute them.

Layers timed one by one (:func:`pipetrain.planner.costs.measure_costs`) miss what the
executor adds and what a shared machine takes away, so the whole model also runs as
:class:`~pipetrain.Pipeline` s, all of them **interleaved** (one step each per round, rounds
repeated), so that a change of the machine's load between measurements hits every one alike:

- a one-stage 1F1B pipeline at each probed micro-batch size b: its per-micro-batch F and B,
  less the engine's per-action overhead (:func:`~pipetrain.planner.costs.
  measure_action_overhead`), over the layers' probed sum is the scale of the layers' F (B, I)
  at that b;
- a p-stage 1F1B pipeline at the middle size, for each depth p to calibrate: per round, its
  makespan over the same round's one-stage makespan, against the simulator's ratio of the
  two on the calibrated costs (hand-offs as wake-ups: :mod:`pipetrain.planner.wake`), is
  :attr:`CostTable.slowdown` at p (p threads sharing the
  cores, the GIL and memory bandwidth run each action slower); its hand-offs (an action
  waiting for another device's output: start minus that output's end) give the hand-off
  latency;
- a one-stage ZB-H1 pipeline at the middle size: per round its I + W over the one-stage B
  is the split backward's factor (the median over rounds whatever ``stat``).

``stat`` summarises the rounds (median or min). Units: seconds.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List, Sequence

__all__ = ["calibrate", "handoffs"]


def handoffs(records: Sequence[Sequence[Any]], p: int) -> List[float]:
    """Hand-off latency samples (seconds) from one run's records: an F whose input comes from
    the previous device (or a B whose gradient comes from the next) and whose own device was
    free before that input was ready: its start minus the input's end."""
    end = {(r.kind, r.stage, r.microbatch): r.end_ns for d in records for r in d}
    out = []
    for d in records:
        prev_end = None
        for r in d:
            if r.start_ns < 0:
                continue
            dep = None
            if r.kind == "F" and r.stage > 0:
                dep = end.get(("F", r.stage - 1, r.microbatch))
            elif r.kind == "B" and r.stage < p - 1:
                dep = end.get(("B", r.stage + 1, r.microbatch))
            if dep is not None and (prev_end is None or prev_end <= dep) and r.start_ns >= dep:
                out.append((r.start_ns - dep) * 1e-9)
            prev_end = r.end_ns
    return out


def _ratio(num: Sequence[float], den: Sequence[float], stat: Callable) -> float:
    """The ratio of two series measured in the same rounds: the median of the per-round
    ratios (a load change between rounds cancels), or for ``min`` the ratio of the minima
    (each series' least-disturbed round)."""
    if stat is min:
        return min(num) / max(1e-12, min(den))
    return statistics.median(a / max(1e-12, b) for a, b in zip(num, den))


def _backward(costs: Dict[str, List[float]]) -> float:
    return sum(costs["B"]) if "B" in costs else sum(costs["I"]) + sum(costs["W"])


def calibrate(model: Any, sample: Any, loss_fn: Callable, sizes: Sequence[int], rows: dict,
              threads: int, repeats: int, depths: Sequence[int], stat: Callable) -> tuple:
    """Scale ``rows`` (per layer, per size: "F", "B", "I" seconds) in place and return
    ``(slowdown {p: factor}, split factor, gap s, hand-off s, {"F": s, "B": s} overhead)``;
    see the module docstring."""
    from pipetrain import schedules
    from pipetrain.partition import balance_costs
    from pipetrain.pipeline import Pipeline
    from pipetrain.planner.costs import _leaves, _slice, measure_action_overhead
    from pipetrain.planner.wake import makespan
    inputs, targets = sample
    n = _leaves(inputs)[0].shape[0]
    L, mid = len(rows["F"]), len(sizes) // 2
    params = list(model.parameters())
    saved = [p.grad for p in params]
    o = measure_action_overhead()

    def make(p, b, schedule="1f1b", balance=None):
        m = max(1, min(8, n // b))
        pipe = Pipeline(model, p, schedule=schedule, num_microbatches=m, loss_fn=loss_fn,
                        balance=balance, num_threads=threads)
        return pipe, m, (_slice(inputs, m * b), _slice(targets, m * b))

    b_mid = sizes[mid]
    probe = [rows["F"][li][mid] + rows["B"][li][mid] for li in range(L)]
    runs = [("one", b) + make(1, b) for b in sizes]
    runs += [("deep", q) + make(q, b_mid, balance=balance_costs(probe, q)) for q in depths]
    runs.append(("split", b_mid) + make(1, b_mid, "zb-h1"))
    rec: Dict[tuple, list] = {(kind, key): [] for kind, key, *_ in runs}
    try:
        for r in range(max(3, repeats) + 1):
            for kind, key, pipe, m, (x, y) in runs:
                pipe.step(x, y)
                if r:     # round 0 warms up
                    st = pipe.stats()
                    rec[(kind, key)].append(st)
    finally:
        for _, _, pipe, _, _ in runs:
            pipe.close()
        for p, g in zip(params, saved):
            p.grad = g

    gaps = []
    for si, b in enumerate(sizes):
        sts = rec[("one", b)]
        gaps += [max(0.0, s.makespan_s - sum(s.busy_s)) / max(1, sum(len(d) for d in s.records))
                 for s in sts]
        for kind, layer_kinds in (("F", ("F",)), ("B", ("B", "I"))):
            measured = stat([sum(s.costs_s["F"]) if kind == "F" else _backward(s.costs_s)
                             for s in sts])
            total = sum(row[si] for row in rows[kind])
            scale = max(0.0, measured - o) / total if total > 0 else 1.0
            for lk in layer_kinds:
                for row in rows[lk]:
                    row[si] *= scale

    ones = rec[("one", b_mid)]
    m_mid = max(1, min(8, n // b_mid))
    f_all = sum(rows["F"][li][mid] for li in range(L)) + o
    b_all = sum(rows["B"][li][mid] for li in range(L)) + o
    sim_one = schedules.build("1f1b", num_stages=1, num_microbatches=m_mid).simulate(
        forward=[f_all], backward=[b_all]).makespan
    slowdown, handoff = {1: 1.0}, 0.0
    for q in depths:
        sts = rec[("deep", q)]
        # Each round's mean hand-off, summarised over rounds like every other time. The mean,
        # not the median: a wake-up is fast mostly and ~1 ms when the thread lost its core
        # (mean ~3x the median on 2 cores), and a schedule pays the sum of its hand-offs.
        per_round = [statistics.fmean(w) for w in (handoffs(s.records, q) for s in sts) if w]
        wake = stat(per_round) if per_round else 0.0
        handoff = wake if q == min(depths) else handoff
        balance = balance_costs(probe, q)
        F, B, i = [], [], 0
        for k in balance:
            F.append(sum(rows["F"][li][mid] for li in range(i, i + k)) + o)
            B.append(sum(rows["B"][li][mid] for li in range(i, i + k)) + o)
            i += k
        # The hand-off as the search charges it: a wake-up of an idle device only.
        sim = makespan(schedules.build("1f1b", num_stages=q, num_microbatches=m_mid),
                       F, B, [0.0] * len(F), 0.0, wake)
        ratio = _ratio([d.makespan_s for d in sts], [s.makespan_s for s in ones], stat)
        slowdown[q] = ratio * sim_one / sim if sim > 0 else 1.0
    # The split's factor on the layers' compute: I and W each pay the per-action overhead.
    # Always the paired median: a ratio of two unpaired minima put it anywhere from 0.6 to
    # 1.75 between runs on a loaded 2-core machine (and a "quiet" plan then never or always
    # chose the zero-bubble schedules), the paired median from 0.94 to 1.25.
    iw = [_backward(z.costs_s) for z in rec[("split", b_mid)]]
    full = [_backward(s.costs_s) for s in ones]
    if min(iw) > 2 * o and min(full) > o:
        split = _ratio([v - 2 * o for v in iw], [v - o for v in full], statistics.median)
    else:   # the model's compute is below the engine's overhead (tiny layers): raw ratio
        split = _ratio(iw, full, statistics.median)
    return slowdown, split, statistics.median(gaps), handoff, {"F": o, "B": o}
