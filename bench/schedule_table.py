"""Bench section ``schedule_table``: every schedule's simulated bubble against its closed form.

For each (p, m) it prints, per schedule, the simulated bubble ratio, the closed form from
the papers, and the peak in-flight activations (stage 0, simulated and closed form), with
F = 1, B = 2 (I = W = 1 for the zero-bubble schedules). It draws one timeline picture per
schedule into ``out/`` and times generate + validate + simulate of 1F1B at p = 64,
m = 1024 (median of repeats).
"""

from __future__ import annotations

import pathlib
import statistics
import time

from pipetrain import schedules

FULL_CASES = [(4, 8), (8, 16), (8, 64), (16, 64)]
QUICK_CASES = [(4, 8), (8, 32)]
CHUNKS = 2  # interleaved-1f1b virtual stages per device
COLOURS = {"F": "#4c72b0", "B": "#55a868", "I": "#8ac926", "W": "#f4a259", "U": "#c44e52"}


def closed_form(name: str, p: int, m: int, v: int = CHUNKS) -> tuple[float | None, int | None]:
    """(bubble ratio, peak in flight on stage 0) from the papers, F = 1, B = I + W = 2.

    None where the paper gives no form (ZB-H1 needs m >= p; ZB-H2 m >= 2p - 1).
    """
    if name in ("gpipe", "1f1b"):
        peak = m if name == "gpipe" else min(p, m)
        return (p - 1) / (m + p - 1), peak
    if name == "interleaved-1f1b":
        return (p - 1) / (v * m + p - 1), min(2 * (p - 1) + (v - 1) * p + 1, v * m)
    if name.endswith("-bw"):  # a batched W priced as n W's (weight_fixed = 0): the same step
        return closed_form(name[:-3], p, m, v)
    if name == "zb-h1":  # idle (p-1)(F+I-W) = p-1 per device out of 3m + (p-1)
        return ((p - 1) / (3 * m + p - 1) if m >= p else None), min(p, m)
    if name == "zb-h2":  # parallelogram: idle (p-1)F per device
        return ((p - 1) / (3 * m + p - 1) if m >= 2 * p - 1 else None), min(2 * p - 1, m)
    raise ValueError(name)


def _build(name: str, p: int, m: int) -> schedules.Schedule:
    kw = {"num_chunks": CHUNKS} if name == "interleaved-1f1b" else {}
    return schedules.build(name, p, m, **kw)


def draw_timeline(s: schedules.Schedule, r: schedules.SimulationResult,
                  path: pathlib.Path) -> None:
    """One row per device, one box per compute action (colour by kind), micro-batch inside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(max(6.0, r.makespan * 0.28), 0.5 * s.num_devices + 1.2))
    for d in range(s.num_devices):
        for a, t0, t1 in zip(s.actions(d), r.starts(d), r.ends(d)):
            if a.kind not in COLOURS or t1 <= t0:
                continue
            # Later chunks of an interleaved schedule drawn lighter.
            alpha = 1.0 - 0.35 * a.chunk / max(1, s.num_chunks - 1) if s.num_chunks > 1 else 1.0
            ax.barh(d, t1 - t0, left=t0, height=0.8, color=COLOURS[a.kind], alpha=alpha,
                    edgecolor="black", linewidth=0.4)
            ax.text((t0 + t1) / 2, d, str(a.microbatch), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(s.num_devices), [f"device {d}" for d in range(s.num_devices)])
    ax.invert_yaxis()
    ax.set_xlabel("time (F = 1)")
    ax.set_xlim(0, r.makespan)
    kinds = sorted({a.kind for d in range(s.num_devices) for a in s.actions(d)} & set(COLOURS),
                   key="FBIWU".index)
    # Legend above the axes, right; title left: neither covers a box.
    ax.legend(handles=[Patch(color=COLOURS[k], label=k) for k in kinds], loc="lower right",
              bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=len(kinds), frameon=False)
    ax.set_title(f"{s.name}: p={s.num_devices}, m={s.num_microbatches}"
                 + (f", v={s.num_chunks}" if s.num_chunks > 1 else "")
                 + f"  bubble {r.bubble_ratio:.3f}", fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def time_large(repeats: int, p: int = 64, m: int = 1024, minibatches: int = 1,
               updates: bool = False) -> dict[str, float]:
    """Median seconds of build, validate, simulate (and all three) of 1F1B at (p, m), over
    ``minibatches`` mini-batches (with U's and versions if ``updates``)."""
    phases: dict[str, list[float]] = {"build": [], "validate": [], "simulate": [], "total": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        s = schedules.build("1f1b", p, m, num_minibatches=minibatches, updates=updates)
        t1 = time.perf_counter()
        schedules.validate(s)
        t2 = time.perf_counter()
        s.simulate(forward=1.0, backward=2.0, update=1.0)
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            phases[k].append(v)
    return {k: statistics.median(v) for k, v in phases.items()}


def run(quick: bool, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cases = QUICK_CASES if quick else FULL_CASES
    head = (f"{'schedule':<18}{'p':>4}{'m':>6}{'bubble':>10}{'closed form':>13}"
            f"{'peak s0':>9}{'form':>6}  {'peak per device'}")
    print("F = 1, B = 2 (I = W = 1); interleaved v = 2; peak = in-flight activations "
          "(F start .. B/I end), in (stage, micro-batch) units")
    print(head)
    print("-" * len(head))
    for p, m in cases:
        for name in schedules.NAMES:
            if name == "interleaved-1f1b" and m % p:
                continue
            s = _build(name, p, m)
            r = s.simulate(forward=1.0, backward=2.0)
            form, peak = closed_form(name, p, m)
            form_s = f"{form:.4f}" if form is not None else "-"
            per = r.peak_inflight if len(r.peak_inflight) <= 8 else \
                r.peak_inflight[:4] + ["..."] + r.peak_inflight[-2:]
            print(f"{name:<18}{p:>4}{m:>6}{r.bubble_ratio:>10.4f}{form_s:>13}"
                  f"{r.peak_inflight[0]:>9}{peak:>6}  {per}")
        print()

    p, m = cases[0]
    for name in schedules.NAMES:
        s = _build(name, p, m)
        path = out / f"schedule_{name}_p{p}_m{m}.png"
        draw_timeline(s, s.simulate(forward=1.0, backward=2.0), path)
        print(f"wrote {path}")

    repeats = 5 if quick else 15
    print()
    for label, kw in (("1f1b p=64 m=1024", {}),
                      ("1f1b p=64 m=256 T=4 updates", {"m": 256, "minibatches": 4, "updates": True})):
        t = time_large(repeats=repeats, **kw)
        print(f"{label} ({2 * 64 * 1024} passes), median of {repeats}: "
              f"build {t['build'] * 1e3:.1f} ms + validate {t['validate'] * 1e3:.1f} ms + "
              f"simulate {t['simulate'] * 1e3:.1f} ms = {t['total'] * 1e3:.1f} ms "
              f"(expected ~11-20 ms; target: well under 100 ms)")
