"""Timeline of one executor run: when every action ran on every device, and every wait.

All times are integer nanoseconds of the steady clock, relative to the start of the run.
On the CPU backend an action's interval is when it ran; on CUDA it is when it was *issued*
(the GPU-side picture is in the NVTX ranges, see :mod:`pipetrain.nvtx`).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np

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

    def busy_ns(self, device: int) -> int:
        """Total time device ``device`` spent inside actions."""
        return int((self.end_ns[device] - self.start_ns[device]).sum())

    def wait_ns(self, device: int, *, gil: bool = True) -> int:
        """Total time ``device`` spent waiting (on dependencies and, if ``gil``, for the GIL)."""
        w = self.waits[device]
        if not gil:
            w = w[w[:, 1] >= 0]
        return int((w[:, 4] - w[:, 3]).sum())

    def idle_ns(self, device: int) -> int:
        """Wall time of the run not spent in actions on ``device``."""
        return self.wall_ns - self.busy_ns(device)

    def bubble_ratio(self) -> float:
        """Measured bubble: idle time over total device time, ``sum(idle) / (p * wall)``."""
        p = self.num_devices
        return sum(self.idle_ns(d) for d in range(p)) / (p * self.wall_ns) if self.wall_ns else 0.0

    def waits_for(self, device: int, index: int) -> list[tuple[int, int, int]]:
        """The waits of action ``index`` on ``device`` as (dep_device, dep_index, duration_ns)."""
        w = self.waits[device]
        rows = w[w[:, 0] == index]
        return [(int(r[1]), int(r[2]), int(r[4] - r[3])) for r in rows]

    def to_chrome_trace(self, path: str | pathlib.Path | None = None) -> dict:
        """Chrome/Perfetto trace (``chrome://tracing``, ui.perfetto.dev): one row per device,
        actions as complete events, waits as ``wait <dep>`` events. Written to ``path`` if given.
        """
        events = []
        for d in range(self.num_devices):
            events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": d,
                           "args": {"name": f"device {d}"}})
            for label, s, e in zip(self.labels[d], self.start_ns[d], self.end_ns[d]):
                if s >= 0:
                    events.append({"ph": "X", "name": label, "pid": 0, "tid": d,
                                   "ts": s / 1e3, "dur": (e - s) / 1e3,
                                   "cat": label.lstrip("0123456789")[:1] or "action"})
            for idx, dd, di, s, e in self.waits[d]:
                what = "GIL" if dd < 0 else self.labels[dd][di]
                events.append({"ph": "X", "name": f"wait {what}", "pid": 0, "tid": d,
                               "ts": s / 1e3, "dur": (e - s) / 1e3, "cat": "wait",
                               "args": {"action": self.labels[d][idx]}})
        trace = {"traceEvents": events, "displayTimeUnit": "ns"}
        if path is not None:
            pathlib.Path(path).write_text(json.dumps(trace))
        return trace
