"""Bench section ``floor_gap``: where a pipetrain step's time goes beyond the floor, from timelines.

The peers bench's workloads ``linear`` (16 x Linear(512)+GELU) and ``blocks`` (8 pre-norm
residual MLP blocks, d = 256), batch 512, m = 8, p = 2 on threads (one torch thread each).
The *floor* is each stage's micro-batch work -- forward + backward of its 8 micro-batches,
the same code as the peers bench's floor (``_peer_models.stage_work``) -- run on two threads
at once with no dependency between them; a pipeline step cannot beat its slower stage.

Rows step in turn with the floor in every round (the order alternating), so load from other
processes hits them alike; numbers are medians over rounds. For each schedule's step, on
the device with the most work (its *critical* device, ``d``), the wall time splits into:

- ``floor``: the floor's time for stage ``d`` in the same round;
- ``actions``: ``busy(d)`` at steady speed minus that floor -- what the pipeline's actions
  cost beyond the same arithmetic in the floor (per-action engine bookkeeping, the I/W
  split, staged gradients, the two threads' contention for the shared GIL / memory);
- ``first``: what the first 4 actions of ``d`` took beyond the steady cost of their kind
  (median over the step's actions of that kind): cold caches, the first forward of a run
  counting the bytes it saves, memory touched for the first time in the step;
- ``bubble``: the schedule's own idle time on ``d``, simulated with the step's measured
  costs (``Pipeline.simulate(stats())``: makespan - busy(d));
- ``waits``: measured idle on ``d`` beyond the simulated one (hand-offs between threads,
  wake-ups, cost variation the mean costs hide);
- ``outside``: the step's wall time outside the actions (splitting the batch into
  micro-batches, starting the run, gathering the loss).

Each part is printed in ms and as a share of the floor; ``step / floor`` is their sum over
the floor. The floor here is on threads, as the pipelines are; the peers bench's best-floor
ratio also takes the faster of the thread and process floors.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Dict, List

import torch

from bench import _peer_models as pm

SCHEDULES = ("1f1b", "zb-h1", "zb-h2", "zb-h1-bw", "zb-h2-bw")
FIRST = 4          # the first actions of a device counted as "first"
PARTS = ("floor", "actions", "first", "bubble", "waits", "outside")


def _workloads(quick: bool) -> List[pm.Workload]:
    if quick:
        return [pm.Workload("linear", "linear", 128, 8, 128, 8, rounds=3, steps=1),
                pm.Workload("blocks", "block", 64, 8, 128, 8, rounds=3, steps=1)]
    return [pm.Workload("linear", "linear", 512, 16, 512, 8, rounds=12, steps=1),
            pm.Workload("blocks", "block", 256, 8, 512, 8, rounds=10, steps=1)]


class _Floor:
    """Each stage's work on its own thread, both started together; per-stage seconds."""

    def __init__(self, wl: pm.Workload):
        self.stages = pm.split(pm.make_layers(wl), pm.balance(wl, 2))
        self.inputs = pm.floor_inputs(wl, self.stages)

    def measure(self) -> List[float]:
        spans = [0.0] * len(self.stages)
        gate = threading.Barrier(len(self.stages))
        errors: List[BaseException] = []

        def loop(k: int) -> None:
            try:
                torch.set_num_threads(1)
                gate.wait(timeout=60)
                t0 = time.perf_counter()
                pm.stage_work(self.stages[k], *self.inputs[k])
                spans[k] = time.perf_counter() - t0
            except BaseException as err:     # re-raised in the caller
                errors.append(err)

        threads = [threading.Thread(target=loop, args=(k,), daemon=True)
                   for k in range(len(self.stages))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for st in self.stages:
            for q in st.parameters():
                q.grad = None
        if errors:
            raise errors[0]
        return spans


def decompose(stats, simulated_makespan: float, floor: List[float], wall: float) -> Dict[str, float]:
    """The parts of one step's wall time (seconds, see the module docstring) on the device
    with the most busy time. ``stats``: the step's :class:`~pipetrain.stats.StepStats`;
    ``floor``: the floor's per-stage seconds (stage ``d`` on device ``d``)."""
    d = max(range(stats.num_devices), key=lambda k: stats.busy_s[k])
    records = [r for r in stats.records[d] if r.start_ns >= 0]
    by_kind: Dict[str, List[float]] = {}
    for r in records:
        by_kind.setdefault(r.kind, []).append(r.duration_s)
    steady = {k: statistics.median(v) for k, v in by_kind.items()}
    # Actions with nothing to do (a source stage's I) are not "first" work.
    compute = [r for r in records if r.duration_s > 1e-5]
    first = sum(max(0.0, r.duration_s - steady[r.kind]) for r in compute[:FIRST])
    busy = stats.busy_s[d]
    return {"floor": floor[d], "actions": busy - first - floor[d], "first": first,
            "bubble": max(0.0, simulated_makespan - busy),
            "waits": stats.makespan_s - max(simulated_makespan, busy),
            "outside": wall - stats.makespan_s, "device": d}


def _measure(wl: pm.Workload, log=print) -> Dict[str, Dict[str, float]]:
    import pipetrain

    x, y = pm.data(wl)
    floor = _Floor(wl)
    pipes = {name: pipetrain.Pipeline(pm.make_layers(wl), num_devices=2, schedule=name,
                                      num_microbatches=wl.microbatches, loss_fn=pm.mse,
                                      balance=pm.balance(wl, 2))
             for name in SCHEDULES}
    parts: Dict[str, Dict[str, List[float]]] = {n: {k: [] for k in PARTS + ("step", "device")}
                                                 for n in pipes}
    t_start = time.perf_counter()
    try:
        for r in range(wl.rounds + 1):
            f = floor.measure()
            order = list(pipes) if r % 2 else list(reversed(pipes))
            for name in order:
                pipe = pipes[name]
                for q in pipe.parameters():
                    q.grad = None
                t0 = time.perf_counter()
                pipe.step(x, y)
                wall = time.perf_counter() - t0
                if not r:
                    continue            # warm-up round
                st = pipe.stats()
                row = decompose(st, pipe.simulate(st).makespan, f, wall)
                for k, v in row.items():
                    parts[name][k].append(v)
                parts[name]["step"].append(wall)
            if r and r % 4 == 0:
                log(f"  ({wl.name}: round {r}/{wl.rounds}, {time.perf_counter() - t_start:.0f} s)",
                    flush=True)
    finally:
        for pipe in pipes.values():
            pipe.close()
    return {n: {k: statistics.median(v) for k, v in p.items()} for n, p in parts.items()}


def run(quick: bool, out) -> None:
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; p = 2 on threads, "
          f"floor = each stage's F+B of its micro-batches on 2 threads, no dependencies")
    for wl in _workloads(quick):
        print(f"\n{wl.name}: {wl.describe()}")
        res = _measure(wl)
        head = "".join(f"{k:>10}" for k in PARTS)
        print(f"{'schedule':<10}{'dev':>4}{head}{'step ms':>9}{'step/floor':>11}")
        for name, row in res.items():
            fl = row["floor"]
            cells = "".join(f"{row[k] * 1e3:>6.1f}{row[k] / fl:>4.0%}" if k != "floor"
                            else f"{fl * 1e3:>10.1f}" for k in PARTS)
            print(f"{name:<10}{int(row['device']):>4}{cells}{row['step'] * 1e3:>9.1f}"
                  f"{row['step'] / fl:>11.3f}")
        print("  (ms and share of the floor; step/floor sums the parts; medians over rounds,"
              " so the parts add up only roughly)")
