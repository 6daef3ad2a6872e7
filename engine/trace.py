"""Timeline export: Chrome / Perfetto trace JSON and a picture, one row per device.

The trace uses the Chrome "Trace Event Format" (complete events, ``"ph": "X"``, times in
microseconds): load it in https://ui.perfetto.dev or chrome://tracing. Each device is a
thread (``tid``) of one process; each action is an event named by its label (``"1F3"``) with
category its kind (F, B, I, W) and args ``stage`` and ``microbatch``. Given the executor's
waits, each is an event ``wait <label of the dependency>`` (``wait GIL``: time taken to
acquire the interpreter) of category ``wait`` with arg ``action``, the action that waited.

:func:`chrome_trace` is the one writer: :meth:`pipetrain.timeline.Timeline.to_chrome_trace`
and ``Pipeline.export_trace`` both go through it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Union

from pipetrain.stats import ActionRecord

__all__ = ["chrome_trace", "write_chrome_trace", "save_trace", "plot_timeline", "KIND_COLORS"]

# One colour per action kind (forward blue, backward orange-red, I orange, W green).
KIND_COLORS = {"F": "#4C72B0", "B": "#DD8452", "I": "#C44E52", "W": "#55A868"}


def chrome_trace(records: Sequence[Sequence[ActionRecord]], *,
                 waits: Optional[Sequence[Any]] = None, name: str = "pipetrain",
                 metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The trace as a dict (``json.dump`` it, or use :func:`write_chrome_trace`).

    Args:
        records: per device, every action in issue order (an action that never started,
            ``start_ns < 0``, is left out; it still names waits on it).
        waits: optional, per device, rows ``(index, dep_device, dep_index, start_ns,
            end_ns)`` as in ``Timeline.waits`` / ``StepStats.waits``; ``index`` and
            ``dep_index`` are positions in ``records``; ``dep_device`` -1 means the GIL.
        name: the process name shown by the viewer.
        metadata: flat key/values stored as ``otherData`` (non-scalars as strings).
    """
    events: List[Dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": name}}]
    for d, per_device in enumerate(records):
        events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": d,
                       "args": {"name": f"device {d}"}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": d,
                       "args": {"sort_index": d}})
        for r in per_device:
            if r.start_ns < 0:
                continue
            args = {"stage": r.stage, "microbatch": r.microbatch} if r.stage >= 0 else {}
            events.append({"ph": "X", "name": r.label, "cat": r.kind, "pid": 0, "tid": d,
                           "ts": r.start_ns / 1e3, "dur": (r.end_ns - r.start_ns) / 1e3,
                           "args": args})
        for idx, dep_device, dep_index, start, end in (waits[d] if waits else ()):
            what = "GIL" if dep_device < 0 else records[dep_device][dep_index].label
            events.append({"ph": "X", "name": f"wait {what}", "cat": "wait", "pid": 0, "tid": d,
                           "ts": int(start) / 1e3, "dur": int(end - start) / 1e3,
                           "args": {"action": per_device[idx].label}})
    out: Dict[str, Any] = {"traceEvents": events, "displayTimeUnit": "ms"}
    if metadata:
        out["otherData"] = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                            for k, v in metadata.items()}
    return out


def write_chrome_trace(records: Sequence[Sequence[ActionRecord]], path: Union[str, pathlib.Path],
                       **kwargs: Any) -> pathlib.Path:
    """Write :func:`chrome_trace` to ``path`` as JSON (``kwargs``: its ``waits``, ``name``,
    ``metadata``); returns the path."""
    return save_trace(chrome_trace(records, **kwargs), path)


def save_trace(trace: Dict[str, Any], path: Union[str, pathlib.Path]) -> pathlib.Path:
    """Write a trace dict (from :func:`chrome_trace`) to ``path`` as JSON, creating its
    folder; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(trace, f)
    return path


def plot_timeline(records: Sequence[Sequence[ActionRecord]], path: Union[str, pathlib.Path],
                  title: str = "") -> pathlib.Path:
    """Draw the timeline (matplotlib, Agg): one row per device, one bar per action coloured by
    kind (hatched for an interleaved schedule's later chunks, stage >= p) and labelled with its
    micro-batch where it fits. Returns the path (PNG/SVG by suffix)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = len(records)
    end = max((r.end_ns for d in records for r in d), default=1) / 1e6
    fig, ax = plt.subplots(figsize=(12, 0.55 * p + 1.3))
    for d, per_device in enumerate(records):
        row = p - 1 - d
        for r in per_device:
            x0, w = r.start_ns / 1e6, (r.end_ns - r.start_ns) / 1e6
            # Later chunks of an interleaved schedule (stage >= p) are hatched.
            ax.broken_barh([(x0, w)], (row - 0.4, 0.8), facecolors=KIND_COLORS.get(r.kind, "grey"),
                           edgecolor="white", linewidth=0.3, hatch="//" if r.stage >= p else None)
            if w > end / 120:
                ax.text(x0 + w / 2, row, str(r.microbatch), ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"device {p - 1 - i}" for i in range(p)])
    ax.set_xlabel("time (ms)")
    ax.set_xlim(0, end)
    kinds = sorted({r.kind for d in records for r in d}, key="FBIW".find)
    ax.legend(handles=[Patch(color=KIND_COLORS.get(k, "grey"), label=k) for k in kinds],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=len(kinds),
              frameon=False)
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
