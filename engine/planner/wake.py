"""Schedule simulation where a hand-off costs a wake-up only to a device that sat idle.

The schedule simulator (:meth:`pipetrain.schedules.Schedule.simulate`) charges its
``transfer`` latency on every cross-device dependency: the consumer starts no earlier than
the producer's end plus the latency, whether it was waiting or still busy. On CPU the
measured hand-off (:func:`pipetrain.planner.calibration.handoffs`) is not a transfer (the
stages share memory) but the time a *sleeping* stage thread takes to wake up and get going
once its input is posted; a thread still busy with other work finds the input waiting and
pays nothing. Charging it on every edge over-predicts the schedules whose devices are often
busy when their input arrives (interleaved 1F1B, whose v chunks give each device other work
to do).

:func:`makespan` replays the built schedule's per-device order with both: ``transfer`` on
every cross-device dependency (a real link), and ``wake`` only when the device was idle at
the moment that dependency became ready. With ``wake = 0`` it is the simulator's makespan.
Units: seconds (or any one unit).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["makespan"]


def makespan(schedule, F: Sequence[float], B: Sequence[float], W: Sequence[float],
             transfer: float = 0.0, wake: float = 0.0) -> float:
    """Makespan of ``schedule`` (a built :class:`~pipetrain.schedules.Schedule` of F, B, I, W
    actions) with per-stage costs F, B (the full backward; I costs B - W when split) and W
    (a batched W covering n micro-batches costs n W), every cross-device dependency ready
    ``transfer`` after its producer's end, and ``wake`` added to an action's start when its
    device was idle before its last cross-device dependency became ready.

    Raises ValueError for a schedule with other actions (updates, transfers) or whose order
    cannot make progress."""
    p = schedule.num_devices
    acts = [schedule.actions(d) for d in range(p)]
    deps = [schedule.dependencies(d) for d in range(p)]
    split = schedule.split_backward
    cost = []
    for d in range(p):
        row = []
        for a in acts[d]:
            k, s = a.kind.value, a.stage
            if k == "F":
                row.append(F[s])
            elif k == "B":
                row.append(B[s])
            elif k == "I":
                row.append(B[s] - W[s] if split else B[s])
            elif k == "W":
                row.append(W[s] * max(1, a.count))
            else:
                raise ValueError(f"wake.makespan simulates F, B, I, W actions; device {d} has "
                                 f"{a} ({k})")
        cost.append(row)
    end = [[-1.0] * len(a) for a in acts]
    pos, free = [0] * p, [0.0] * p
    left = sum(len(a) for a in acts)
    while left:
        progressed = False
        for d in range(p):
            while pos[d] < len(acts[d]):
                i = pos[d]
                same, cross, ready = free[d], -1.0, True
                for dd, j in deps[d][i]:
                    e = end[dd][j]
                    if e < 0:
                        ready = False
                        break
                    if dd == d:
                        same = max(same, e)
                    else:
                        cross = max(cross, e + transfer)
                if not ready:
                    break
                # The device waited for another device's output: it slept, and wakes up.
                start = cross + wake if cross > same else same
                end[d][i] = free[d] = start + cost[d][i]
                pos[d] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"schedule {schedule.name!r} makes no progress at "
                             f"{[str(acts[d][pos[d]]) for d in range(p) if pos[d] < len(acts[d])]}")
    return max(free)
