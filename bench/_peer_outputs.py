"""The ``peers`` section's files: ``peers.json`` (the report), ``peers.csv`` (a row per
workload and engine row) and ``peers.png`` (each row's step time over the unsplit model's,
one panel per workload). Kept apart from ``bench/peers.py``, which measures."""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Dict, List


def write_outputs(out: pathlib.Path, report: List[Dict[str, object]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(report, indent=1))
    with open(out / "peers.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "row", "group", "step_s_median", "time_over_unsplit1",
                    "bubble_median", "peak_rss_bytes", "steps", "error"])
        for wlr in report:
            for r in wlr["rows"]:
                w.writerow([wlr["workload"], r["row"], r["group"], r["step_s"], r["over_unsplit1"],
                            r["bubble"], r["peak_rss_bytes"], r["steps"], r["error"] or ""])
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no peers.png)")
        return
    colours = {"reference": "#888888", "pippy": "#d62728", "pipetrain": "#1f77b4", "floor": "#2ca02c"}
    fig, axes = plt.subplots(1, len(report), figsize=(6 * len(report), 6), squeeze=False)
    for ax, wlr in zip(axes[0], report):
        rows = [r for r in wlr["rows"] if r["over_unsplit1"] is not None]
        ax.barh([r["row"] for r in rows], [r["over_unsplit1"] for r in rows],
                color=[colours[r["group"]] for r in rows])
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")     # the fine grain spans 1x (unsplit) to ~500x (PiPPy)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for i, r in enumerate(rows):
            ax.text(r["over_unsplit1"], i, f" {r['over_unsplit1']:.2f}", va="center", fontsize=7)
        ax.set_title(f"{wlr['workload']}: step time / unsplit (1 thread)", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "peers.png", dpi=110)
    plt.close(fig)
