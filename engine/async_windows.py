"""Windows of an asynchronous plan: the endless 1F1B order cut into executor runs, no flush.

An asynchronous schedule (:mod:`pipetrain.async_schedules`) is one endless order per stage.
``train()`` streams it: window c covers the mini-batches ``[c0, c1)`` and holds, on every
stage r, that stage's actions after ``U(c0-1)`` up to and including ``U(c1-1)``. Running the
windows one after another, carrying the in-flight state (activations stashed for backward,
values posted but not yet taken, weight versions), is exactly the endless pipeline: no
drain, no fresher weights at a boundary. The cut is sound because every dependency of an
action of window c lies in window c or earlier (upstream stages are ahead in forwards,
backwards flow from the last stage which is ahead in backwards); ``tests/test_async_windows.py``
checks it against the IR's dependencies for many (p, m, window).

Data. Window c forwards, on stage 0, the micro-batches up to ``c1*m + p - 2`` (its warm-up
forwards of the next window), so it needs the data of :func:`lookahead` =
``ceil((p-1)/m)`` further mini-batches. When the data ends (T known) the window holding
``U(T-1)`` is the drain: forwards past ``T*m`` are skipped, every update is applied.

The IR of a window. A window's passes depend on actions of earlier windows (a B whose F ran
before), so a window alone is not a complete schedule. Each window's plan is instead a
*slice of a full plan that was validated*: the full ``build_async`` plan of a few
mini-batches in which the window sits at the same position relative to the warm-up and the
drain; the slice's actions are translated by whole mini-batches (micro-batch ``+ s*m``,
version and U index ``+ s``), which the closed-form versions make exact once out of the
warm-up (checked when the slice is made). Dependencies on actions before the slice are
*carried* (done by an earlier run) and dropped; one after the slice raises (the cut would be
unsound). So versions stay global — the version of micro-batch k is a function of k, never of
the window — and the validator has proved the order and versions of every window.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Any, List, Optional, Sequence, Tuple

from pipetrain import async_schedules
from pipetrain.plan import Plan

__all__ = ["lookahead", "default_window", "forward_version", "WindowPlan", "window_plan",
           "rollback_depth", "CutError"]


class CutError(RuntimeError):
    """A window's action depends on an action of a later window (the cut is unsound)."""


def lookahead(p: int, m: int) -> int:
    """Mini-batches beyond a window whose data the window needs: stage 0's warm-up forwards of
    the next window reach micro-batch ``c1*m + p - 2``, i.e. ``ceil((p-1)/m)`` mini-batches."""
    return -(-(p - 1) // m)


def default_window(p: int, m: int) -> int:
    """Mini-batches per executor run when ``train()`` is not told:
    ``max(2, lookahead + 1, ceil(8 (p-1) / m))``.

    Why: runs are separated by a barrier (every device finishes the run before the next one
    starts), which idles the devices for about the time a backward takes to cross the p-1
    stage boundaries, roughly (p-1)/(W*m) of a run of W mini-batches; 8 (p-1)/m keeps that
    near 1/8 or below. What a larger window costs is only the inputs of W + lookahead
    mini-batches held at once (the stashed activations do not grow with it: the schedule
    bounds them) and losses reported W mini-batches at a time. At least lookahead + 1, so a
    run does more than read ahead, and at least 2."""
    return max(2, lookahead(p, m) + 1, -(-8 * (p - 1) // m))


def forward_version(name: str, p: int, r: int, m: int, k: int) -> int:
    """The weight version F(k) (and B(k)) runs on, stage r (closed forms of
    :mod:`pipetrain.async_schedules`; asserted equal to its counting by the tests)."""
    t = k // m
    if name in ("pipedream", "spectrain"):
        return max((k - p + r + 1) // m, 0)
    if name == "xpipe":
        return max((t * m - p + r + 1) // m, 0)
    return max(t - async_schedules.delay(p), 0)


class WindowPlan(Plan):
    """The plan of one window: mini-batches ``[first, first + num_minibatches)`` have their
    updates here. Same interface as :class:`~pipetrain.plan.Plan` for the runner (actions,
    deps, graph, compiled), micro-batches and versions global.

    Extra attributes: ``first_minibatch`` (c0), ``end`` (T when this window is the drain, else
    None), ``data_minibatches`` (the mini-batches ``[c0, hi)`` whose micro-batches the
    window forwards or computes the loss of), ``forwards`` (per stage, the micro-batches first
    forwarded in this window), ``carried`` (how many dependencies on earlier windows were
    dropped, for tests).
    """

    def __init__(self, base: Plan, lo: Sequence[int], hi: Sequence[int], shift: int,
                 first: int, count: int, end: Optional[int]) -> None:
        # No Plan.__init__: the base plan was validated as a whole; this is its slice.
        self.schedule = base.schedule
        self.graph = base.graph
        self.num_devices = base.num_devices
        self.num_microbatches = m = base.num_microbatches
        self.num_minibatches = count
        self.first_minibatch = first
        self.end = end
        self.has_updates = True
        self._compiled = {}
        self.actions, self.deps = [], []
        self.carried = 0
        for d in range(self.num_devices):
            row = [_shifted(a, shift, m) for a in base.actions[d][lo[d]:hi[d]]]
            deps = []
            for dep in base.deps[d][lo[d]:hi[d]]:
                kept = []
                for dd, i in dep:
                    if i < lo[dd]:
                        self.carried += 1       # done by an earlier window's run
                    elif i >= hi[dd]:
                        raise CutError(f"window of mini-batches [{first}, {first + count}): "
                                       f"device {d} waits for {base.actions[dd][i]} of a later "
                                       "window")
                    else:
                        kept.append((dd, i - lo[dd]))
                deps.append(kept)
            self.actions.append(row)
            self.deps.append(deps)
        self.forwards = [[a.microbatch for a in row if a.kind == "F"] for row in self.actions]
        last = max((k for row in self.forwards for k in row), default=first * m - 1)
        self.data_minibatches = (first, max(first + count, last // m + 1))

    @property
    def total_microbatches(self) -> int:
        return self.num_microbatches * self.num_minibatches

    @property
    def minibatches(self) -> range:
        return range(self.first_minibatch, self.first_minibatch + self.num_minibatches)

    def __repr__(self) -> str:
        return (f"WindowPlan({self.schedule.name!r}, minibatches=[{self.first_minibatch}, "
                f"{self.first_minibatch + self.num_minibatches}), end={self.end}, "
                f"actions={sum(map(len, self.actions))})")


def _shifted(a: Any, s: int, m: int) -> Any:
    if s == 0:
        return a
    if a.kind == "U":
        return dataclasses.replace(a, microbatch=a.microbatch + s)
    return dataclasses.replace(a, microbatch=a.microbatch + s * m, version=a.version + s)


@lru_cache(maxsize=64)
def _base(name: str, p: int, m: int, T: int) -> Tuple[Plan, Tuple[Tuple[int, ...], ...]]:
    """The validated full plan of T mini-batches, and per device the index just after each U."""
    plan = Plan(async_schedules.build_async(name, p, m, T))
    cuts = tuple(tuple(i + 1 for i, a in enumerate(row) if a.kind == "U") for row in plan.actions)
    return plan, cuts


def window_plan(name: str, p: int, m: int, first: int, count: int,
                end: Optional[int] = None) -> WindowPlan:
    """The plan of the window whose updates are those of mini-batches ``[first, first+count)``.

    ``end``: the total number of mini-batches when known (then ``first + count <= end``, and
    ``first + count == end`` makes this the drain); None while the data goes on (the caller
    has the data of ``lookahead(p, m)`` mini-batches past the window).
    """
    if count < 1 or first < 0 or (end is not None and first + count > end):
        raise ValueError(f"window [{first}, {first + count}) outside the run of {end} mini-batches")
    L = lookahead(p, m)
    # Horizon: forwards past it are not in this window; T itself when the data ends sooner.
    horizon = first + count + L if end is None else min(end, first + count + L)
    # Translate windows past the warm-up to one sitting after B mini-batches, so the base
    # plans are few and small: (count, horizon - first) fixes the shape. B leaves the clamps
    # max(., 0) of the closed-form versions behind (checked below).
    B = L + 2
    shift = max(0, first - B)
    base, cuts = _base(name, p, m, horizon - shift)
    f = first - shift
    lo = [cuts[d][f - 1] if f > 0 else 0 for d in range(p)]
    hi = [cuts[d][f + count - 1] for d in range(p)]
    plan = WindowPlan(base, lo, hi, shift, first, count, end if end == first + count else None)
    if shift:
        for r, row in enumerate(plan.actions):
            for a in row:
                if a.kind == "F" and a.version != forward_version(name, p, r, m, a.microbatch):
                    raise CutError(f"{name}: translated window [{first}, {first + count}) puts "
                                   f"{a} on a version other than its closed form")
    return plan


@lru_cache(maxsize=64)
def rollback_depth(name: str, p: int, m: int) -> Tuple[int, ...]:
    """Per stage, the most updates it can have applied beyond the stage with the fewest, at
    any moment of a run (any prefix closed under the plan's dependencies): the updates whose
    pre-update weights and optimizer state a stage keeps so that, after a failure, every stage
    can go back to the largest version all of them have reached.

    Computed on the validated plan of a steady window: for each U(r, t), the U's of every
    other stage that must have finished before it (its ancestors over program order and
    dependencies); the depth of r is the largest ``t + 1 - min over stages of that count``
    (r's own count taken as t + 1). One stage: 0.
    """
    L = lookahead(p, m)
    T = 2 * (L + 2) + 4
    plan, _ = _base(name, p, m, T)
    # done[d][i][s]: updates of stage s guaranteed finished when action i of device d starts
    # (its ancestors), computed in a topological order of program order + dependencies.
    done = [[None] * len(row) for row in plan.actions]
    pos = [0] * p
    remaining = sum(map(len, plan.actions))
    while remaining:
        moved = False
        for d in range(p):
            while pos[d] < len(plan.actions[d]):
                i = pos[d]
                deps = plan.deps[d][i]
                if any(done[dd][j] is None for dd, j in deps):
                    break
                vec = [0] * p
                prev = [(d, i - 1)] if i > 0 else []
                for dd, j in list(deps) + prev:
                    a = plan.actions[dd][j]
                    got = list(done[dd][j])
                    if a.kind == "U":
                        got[a.stage] = max(got[a.stage], a.microbatch + 1)
                    vec = [max(x, y) for x, y in zip(vec, got)]
                done[d][i] = vec
                pos[d] += 1
                remaining -= 1
                moved = True
        if not moved:
            raise CutError(f"{name}: the plan of {T} mini-batches has a cycle")
    depth = [0] * p
    for d in range(p):
        for i, a in enumerate(plan.actions[d]):
            if a.kind == "U":
                vec = list(done[d][i])
                vec[a.stage] = a.microbatch + 1      # the stage itself, once U(t) finished
                depth[a.stage] = max(depth[a.stage], a.microbatch + 1 - min(vec))
    return tuple(depth)
