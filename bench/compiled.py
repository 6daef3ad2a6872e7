"""Bench section ``compiled``: ``Pipeline(compile=True)`` (inductor) against the same pipeline
uncompiled, on the peers bench's workloads (linear, blocks, fine; p = 2, same split, same loss).

The question: does compiling each stage release the GIL enough for the two stage threads to
overlap? Rows per workload, measured side by side (the peers bench's interleaved rounds;
ratios are medians over rounds of per-round ratios):

- ``unsplit, 1 thr``: the reference of the peers table;
- ``pipetrain 1f1b`` / ``zb-h1``, eager and ``compiled`` (inductor, C++ kernels on CPU);
- ``pipetrain 1f1b, p=1, 1 thr``, eager and compiled: the same work on one thread, so
  ``t(p=1) / t(p=2)`` says how much the second stage thread bought (2.0 = perfect overlap on
  these 2 cores, 1.0 = none).

Columns: step time (median), ratio to the unsplit model, compiled / eager of the same row,
measured bubble, the share of device time spent waiting for the GIL (the executor records
each wait to enter Python, ``stats().waits`` rows with ``dep_device == -1``), and the compile
time: the first step's time minus a steady step's (excluded from every other column).
Writes ``compiled.json``.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Dict, List, Optional

import torch

from bench import _peer_models as pm
from bench.peers import (Context, Pipetrain, Result, Row, Unsplit, _load, _ratio,
                         measure_workload, workloads)

COMPILE = {}          # torch.compile defaults: inductor


class Compiled(Pipetrain):
    """A pipetrain row with ``compile=`` (and ``compile_s``: its first step minus a steady one)."""

    def __init__(self, schedule: str, p: int = 2, num_threads: Optional[int] = None,
                 options: Optional[dict] = None):
        super().__init__(schedule, p, num_threads)
        self.name += ", compiled"
        self.options = dict(COMPILE if options is None else options)
        self.compile_s: Optional[float] = None

    def open(self, wl, ctx):
        import pipetrain
        layers = pm.make_layers(wl)
        self.params = [q for layer in layers for q in layer.parameters()]
        self.pipe = pipetrain.Pipeline(layers, num_devices=self.p, schedule=self.schedule,
                                       num_microbatches=wl.microbatches, loss_fn=pm.mse,
                                       balance=pm.balance(wl, self.p), compile=self.options,
                                       **({} if self.num_threads is None else
                                          {"num_threads": self.num_threads}))
        self.ctx = ctx
        t0 = time.perf_counter()
        self.pipe.step(ctx.x, ctx.y)                      # compiles every stage
        first = time.perf_counter() - t0
        steady = statistics.median(self.measure(2).times)
        self.compile_s = max(0.0, first - steady)


def _gil_share(pipe) -> Optional[float]:
    st = pipe.stats()
    waits = getattr(st, "waits", None) or []
    if not waits or not st.wall_s:
        return None
    gil = sum(float(((w[:, 4] - w[:, 3]) * (w[:, 1] < 0)).sum()) for w in waits if len(w))
    return gil / 1e9 / (len(waits) * st.wall_s)


class _WithGil(Row):
    """Wraps a pipetrain row to record the GIL-wait share of each measured step."""

    def __init__(self, row: Pipetrain):
        super().__init__(row.name)
        self.row, self.group, self.p, self.note = row, row.group, row.p, row.note
        self.gil: List[float] = []

    def open(self, wl, ctx):
        self.row.open(wl, ctx)

    def measure(self, steps):
        s = self.row.measure(steps)
        g = _gil_share(self.row.pipe)
        if g is not None:
            self.gil.append(g)
        return s

    def close(self):
        self.row.close()


def make_rows(wl) -> List[Row]:
    rows: List[Row] = [Unsplit(1)]
    for schedule in ("1f1b", "zb-h1"):
        rows += [_WithGil(Pipetrain(schedule)), _WithGil(Compiled(schedule))]
    rows += [_WithGil(Pipetrain("1f1b", p=1, num_threads=1)),
             _WithGil(Compiled("1f1b", p=1, num_threads=1))]
    return rows


def _eager_twin(res: Result, results: List[Result]) -> Optional[Result]:
    name = res.row.name.replace(", compiled", "")
    return next((r for r in results if r.row.name == name), None) if name != res.row.name else None


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def report(wl, results: List[Result]) -> Dict[str, object]:
    base = next((r for r in results if r.row.name == "unsplit, 1 thr" and r.median), None)
    out = []
    for r in results:
        inner = r.row.row if isinstance(r.row, _WithGil) else r.row
        twin = _eager_twin(r, results)
        out.append({
            "row": r.row.name, "median_s": r.median, "error": r.error,
            "t_over_unsplit1": _ratio(r, base) if base and r.median else None,
            "compiled_over_eager": _ratio(r, twin) if twin and r.median and twin.median else None,
            "bubble": statistics.median(r.bubbles) if r.bubbles else None,
            "gil_wait_share": statistics.median(r.row.gil) if isinstance(r.row, _WithGil) and r.row.gil else None,
            "compile_s": getattr(inner, "compile_s", None)})
    by = {r.row.name: r for r in results}
    overlap = {}
    for tag in ("", ", compiled"):
        p1, p2 = by.get(f"pipetrain 1f1b, p=1, 1 thr{tag}"), by.get(f"pipetrain 1f1b{tag}")
        overlap["compiled" if tag else "eager"] = _ratio(p1, p2) if p1 and p2 and p1.median and p2.median else None
    best = {}
    for tag in ("eager", "compiled"):
        rs = [r for r in results if r.row.group == "pipetrain" and r.row.p == 2 and r.median
              and (", compiled" in r.row.name) == (tag == "compiled")]
        best[tag] = min(rs, key=lambda r: r.median) if rs else None
    best_ratio = _ratio(best["compiled"], best["eager"]) if best["compiled"] and best["eager"] else None
    return {"workload": wl.name, "rows": out, "p1_over_p2": overlap,
            "best_eager": best["eager"].row.name if best["eager"] else None,
            "best_compiled": best["compiled"].row.name if best["compiled"] else None,
            "best_compiled_over_best_eager": best_ratio}


def print_table(rep: Dict[str, object]) -> None:
    print(f"\n{rep['workload']}: {'row':<34} {'step ms':>9} {'t/unsplit1':>10} {'comp/eager':>10} "
          f"{'bubble':>7} {'GIL wait':>8} {'compile s':>9}")
    for r in rep["rows"]:
        if r["error"]:
            print(f"  {r['row']:<40} FAILED: {r['error']}")
            continue
        print(f"  {r['row']:<40} {_fmt(r['median_s'] and 1e3 * r['median_s'], '9.1f')} "
              f"{_fmt(r['t_over_unsplit1'], '10.2f')} {_fmt(r['compiled_over_eager'], '10.2f')} "
              f"{_fmt(r['bubble'], '7.1%')} {_fmt(r['gil_wait_share'], '8.1%')} "
              f"{_fmt(r['compile_s'], '9.1f')}")
    o = rep["p1_over_p2"]
    print(f"  t(p=1, 1 thr) / t(p=2): eager {_fmt(o['eager'], '.2f')}, compiled "
          f"{_fmt(o['compiled'], '.2f')} (2.00 = the two stage threads fully overlap)")
    print(f"  best compiled / best eager = {_fmt(rep['best_compiled_over_best_eager'], '.2f')} "
          f"({rep['best_compiled']} / {rep['best_eager']})")


def run(quick: bool, out: pathlib.Path, log=print) -> List[Dict[str, object]]:
    if quick:
        log("compiled: skipped in --quick mode (inductor compiles take 15-60 s per stage here); "
            "python -m bench --only compiled runs it")
        return []
    t0 = time.monotonic()
    wls = workloads(quick)
    log(f"{torch.get_num_threads()} torch threads by default, {pm.cores()} cores, load average "
        f"{_load()}; {'quick' if quick else 'full'} mode; compile={COMPILE or 'torch.compile defaults (inductor)'}")
    reps = []
    for wl in wls:
        x, y = pm.data(wl)
        ctx = Context(wl, x, y, None, "no process rows in this section")
        results = measure_workload(wl, ctx, make_rows(wl), log)
        rep = report(wl, results)
        print_table(rep)
        reps.append(rep)
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out) / "compiled.json").write_text(json.dumps(reps, indent=1, default=str))
    log(f"compiled: {time.monotonic() - t0:.0f} s, load average now {_load()}; {out}/compiled.json")
    return reps
