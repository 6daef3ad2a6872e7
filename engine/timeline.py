"""Timeline of one executor run: when every action ran on every device, and every wait.

All times are integer nanoseconds of the steady clock, relative to the start of the run.
On the CPU backend an action's interval is when it ran; on CUDA it is when it was *issued*
(the GPU-side picture is in the NVTX ranges, see :mod:`pipetrain.nvtx`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipetrain import stats, trace
from pipetrain.stats import ActionRecord

#: ``Timeline.waits[d]`` columns: the waiting action's index on device d, the dependency it
#: waited for (device, index; (-1, -1) = taking the GIL), and the wait's start and end (ns).
WAIT_COLUMNS = ("index", "dep_device", "dep_index", "start_ns", "end_ns")


@dataclass(frozen=True)
class Timeline:
    """Per-device action intervals and waits of one run.

    Attributes:
        labels: per device, the action labels (``"1F3"``) in issue order.
        start_ns, end_ns: per device, int64 arrays (one entry per action) of when the action's
            ``run_action`` call started and returned.
        waits: per device, an int64 array of shape (n, 5) with columns :data:`WAIT_COLUMNS`.
        wall_ns: duration of the whole run.
    """

    labels: list[list[str]]
    start_ns: list[np.ndarray]
    end_ns: list[np.ndarray]
    waits: list[np.ndarray]
    wall_ns: int

    @property
    def num_devices(self) -> int:
        return len(self.start_ns)

    def _ran(self, device: int) -> np.ndarray:
        """Mask of the actions of ``device`` that ran (a failed run leaves the rest at -1)."""
        return (self.start_ns[device] >= 0) & (self.end_ns[device] >= 0)

    def busy_ns(self, device: int) -> int:
        """Total time device ``device`` spent inside actions."""
        ran = self._ran(device)
        return int((self.end_ns[device][ran] - self.start_ns[device][ran]).sum())

    def makespan_ns(self) -> int:
        """From the first action's start to the last action's end, over all devices (0 if
        nothing ran): the time the bubble ratio divides by, unlike ``wall_ns``."""
        starts = [s[self._ran(d)] for d, s in enumerate(self.start_ns)]
        ends = [e[self._ran(d)] for d, e in enumerate(self.end_ns)]
        first = min((int(s.min()) for s in starts if s.size), default=None)
        last = max((int(e.max()) for e in ends if e.size), default=None)
        return 0 if first is None else last - first

    def wait_ns(self, device: int, *, gil: bool = True) -> int:
        """Total time ``device`` spent waiting (on dependencies and, if ``gil``, for the GIL)."""
        w = self.waits[device]
        if not gil:
            w = w[w[:, 1] >= 0]
        return int((w[:, 4] - w[:, 3]).sum())

    def idle_ns(self, device: int) -> int:
        """Time of the makespan not spent in actions on ``device``: ``makespan - busy``
        (floored at 0), as in :func:`pipetrain.stats.bubble_ratio`."""
        return max(0, self.makespan_ns() - self.busy_ns(device))

    def bubble_ratio(self) -> float:
        """Measured bubble: :func:`pipetrain.stats.bubble_ratio`, ``sum(idle) / (p * makespan)``
        (makespan, not ``wall_ns``: thread wake-up before the first action is not bubble)."""
        return stats.bubble_ratio([self.busy_ns(d) for d in range(self.num_devices)],
                                  self.makespan_ns())

    def waits_for(self, device: int, index: int) -> list[tuple[int, int, int]]:
        """The waits of action ``index`` on ``device`` as (dep_device, dep_index, duration_ns)."""
        w = self.waits[device]
        rows = w[w[:, 0] == index]
        return [(int(r[1]), int(r[2]), int(r[4] - r[3])) for r in rows]

    def records(self, actions: Sequence[Sequence[Any]] | None = None) -> list[list[ActionRecord]]:
        """The run as :class:`~pipetrain.stats.ActionRecord` lists, one per device, every
        action in issue order (one that never ran has start/end -1).

        ``actions``: per device, the plan's IR actions (objects with ``kind``, ``stage``,
        ``microbatch``, e.g. ``Schedule.actions(d)``, or the tuples ``(kind, stage,
        microbatch, ...)`` of :func:`pipetrain.dispatch.action_table`); without them each label is parsed
        (``"1F3"``: stage 1, kind F, micro-batch 3), and one that does not parse gets stage
        and micro-batch -1 and kind "action".
        """
        out = []
        for d in range(self.num_devices):
            row = []
            # tolist(): Python ints at once, not one numpy scalar (and int()) per action.
            starts, ends = self.start_ns[d].tolist(), self.end_ns[d].tolist()
            for i, (label, s, e) in enumerate(zip(self.labels[d], starts, ends)):
                if actions is not None:
                    a = actions[d][i]
                    if type(a) is tuple:        # a row of dispatch.action_table
                        kind, stage, mb = a[0], a[1], a[2]
                    else:
                        kind, stage, mb = a.kind, a.stage, a.microbatch
                else:
                    kind, stage, mb = _parse(label)
                row.append(ActionRecord(d, label, kind, stage, mb, s, e))
            out.append(row)
        return out

    def to_chrome_trace(self, path: str | pathlib.Path | None = None, *,
                        actions: Sequence[Sequence[Any]] | None = None,
                        name: str = "pipetrain", metadata: dict | None = None) -> dict:
        """Chrome/Perfetto trace (``chrome://tracing``, ui.perfetto.dev) of the run, actions and
        waits, by :func:`pipetrain.trace.chrome_trace` (``actions`` as in :meth:`records`).
        Written to ``path`` if given; returns the trace dict."""
        out = trace.chrome_trace(self.records(actions), waits=self.waits, name=name,
                                 metadata=metadata)
        if path is not None:
            trace.save_trace(out, path)
        return out


def _parse(label: str) -> tuple:
    """(kind, stage, micro-batch) of a label, read by the schedule IR's one parser (C++);
    ("action", -1, -1) for a label that is not an action."""
    from pipetrain.schedules import Action
    try:
        a = Action.parse(label)
    except ValueError:
        return "action", -1, -1
    return str(a.kind), a.stage, a.microbatch
