"""Weight versions (buffers) held over a schedule's timeline: what the simulator reports as
``peak_versions``.

A plan with ``U`` actions names, on every pass, the weight version it runs on (``1F3@2``).
On one stage, version 0 exists from the start and version v >= 1 from the end of ``U(v-1)``;
the newest version (the live weights) is always held, and an older version v is held until
the end of the last pass that names it (weight stashing keeps it; once nothing in the plan
needs it, it is freed). So, on stage s at time tau::

    held_s(tau) = 1 + #{ v < live_s(tau) : last_use_s(v) > tau }

A device holds the sum over its stages. The peak over time is reached just after a version
is created (the only moment the count grows), so it is evaluated at the ends of the ``U``
actions (and at time 0). For the schedules of :mod:`pipetrain.async_schedules` this gives
the closed forms the papers state: PipeDream-2BW holds exactly 2 versions per stage once
T >= 2 and p >= 2 (W(t) live, W(t-1) for the in-flight passes); weight stashing
(pipedream, spectrain, xpipe) holds ``ceil((p - r - 1) / m) + 1`` on stage r once the
pipeline is full: right after U(t) its p - r - 1 forwarded micro-batches use the versions
t + 1 - ceil((p - r - 1) / m) .. t, and t + 1 is live. The runtime counts the same way in issue order
(:class:`pipetrain.versions.PlannedVersions`), so both agree; tests check it.

Predicting schedules (SpecTrain / XPipe / 2bw-predict) run a pass of micro-batch k of
mini-batch t on the prediction Ŵ built from base version v with distance s = t - v, so the
buffers are keyed by (v, t) instead: a predicted buffer is held from the first pass that
reads it to the end of the last one, and its base v, once superseded by a newer live
version, is held until that prediction is built (once per base). "Versions held" therefore
counts weight *buffers* (live + stashed + predicted): the memory the papers compare (XPipe
and SpecTrain trade PipeDream's stash for predictions). The runtime's
``stats().peak_buffers`` counts the same buffers in issue order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Sequence

__all__ = ["peak_versions_held"]


def peak_versions_held(schedule, starts: Callable[[int], Sequence[float]],
                       ends: Callable[[int], Sequence[float]]) -> List[int]:
    """Per device, the most weight buffers its stages hold at once (see the module docstring).

    Args:
        schedule: a :class:`pipetrain.schedules.Schedule` (its ``actions(device)``, and its
            ``name`` to tell a predicting schedule).
        starts, ends: per device, the start / end time of each of its actions, in issue
            order (a :class:`~pipetrain.schedules.SimulationResult`'s ``starts``/``ends``).
    Returns:
        one int per device; a schedule without ``U`` holds one version per stage.
    """
    from pipetrain.async_schedules import PREDICTING
    predicting = getattr(schedule, "name", None) in PREDICTING
    m = max(1, schedule.num_microbatches)
    out = []
    for d in range(schedule.num_devices):
        acts, start, end = schedule.actions(d), list(starts(d)), list(ends(d))
        stages = {a.stage for a in acts}
        created: Dict[int, Dict[int, float]] = {s: {0: float("-inf")} for s in stages}
        # A buffer is held over [first start, last end] of the passes that read it:
        # stashing keys it by version v, prediction by (v, t) (one prediction per distance).
        first: Dict[int, Dict[object, float]] = defaultdict(dict)
        last: Dict[int, Dict[object, float]] = defaultdict(dict)
        for a, b, e in zip(acts, start, end):
            s = a.stage
            if a.kind == "U":
                created[s][a.microbatch + 1] = e
            elif a.version >= 0 and a.kind in ("F", "B", "I", "W"):
                t = a.microbatch // m
                key = (a.version, t) if predicting and t > a.version else a.version
                first[s][key] = min(first[s].get(key, b), b)
                last[s][key] = max(last[s].get(key, e), e)
        moments = sorted({0.0} | {t for c in created.values() for t in c.values()
                                  if t > float("-inf")}
                         | {t for f in first.values() for t in f.values()})
        peak = 0
        for tau in moments:
            total = 0
            for s, c in created.items():
                live = max(v for v, t in c.items() if t <= tau)
                held = 1
                for key, t_end in last[s].items():
                    if isinstance(key, tuple):
                        v = key[0]
                        if first[s][key] <= tau < t_end:
                            held += 1                       # the predicted buffer
                        elif tau < first[s][key] and v < live and \
                                not _base_counted(key, last[s], first[s], tau, live):
                            held += 1                       # its base, kept to predict from
                    elif key < live and t_end > tau:
                        held += 1                           # a stashed version
                total += held
            peak = max(peak, total)
        out.append(peak)
    return out


def _base_counted(key, last, first, tau, live) -> bool:
    """True if another pending prediction from the same base version already counted it."""
    v = key[0]
    for other in last:
        if other is key:
            return False
        if isinstance(other, tuple) and other[0] == v and tau < first[other]:
            return True
    return False
