"""Bench section ``peers``: pipetrain against torch's own pipeline engine and against the floor.

Per workload (a stack of Linear+GELU units, a stack of pre-norm residual MLP blocks, and a
fine-grained stack of 8 x Linear(16,16)+GELU with one-row micro-batches), all at p = 2
stages, the same 2-stage split and the same loss (MSE, mean over each micro-batch), one row
per way of computing the same gradients:

- ``unsplit``: the whole model, whole batch, with 1 torch thread and with all of them;
- ``grad-accum``: the whole model over the m micro-batches one after another, 1 thread (at
  the fine grain this is the plain Python loop that an engine at p = 1 competes with);
- ``pippy <Schedule>``: ``torch.distributed.pipelining`` on 2 gloo processes, one thread
  each (interleaved schedules: the same units split into 4 stages, 2 per process);
- ``pipetrain <schedule>``: ``pipetrain.Pipeline(layers, num_devices=2, schedule=...,
  num_microbatches=m, loss_fn=mse, balance=...)`` with default arguments otherwise
  (interleaved: ``balance`` in 4 stages, the default 2 chunks); at the fine grain also p = 1;
- ``floor``: each stage's micro-batch work (forward + backward of each of its micro-batches)
  run concurrently on 2 threads / 2 processes with no dependency between the stages. No
  schedule can beat it on these cores at this micro-batch size.
- ``bound`` (a line under each table): the floor plus stage 0's forward of one micro-batch
  (the fastest in pipetrain's timelines), during which the last device has nothing to run in any schedule of
  this 2-stage split; ``best PiPPy / bound`` is the most any such schedule could gain over
  PiPPy on these cores.

Rows are objects with ``open / measure(steps) / close`` (:class:`Row`); a new engine (such as
pipetrain's own multi-process runner) is one more object in :func:`make_rows`. Measuring
interleaves the rows: every round runs each row for a few steps (alternating the order), and
ratios are medians over rounds of per-round ratios, so load from other processes on these
shared cores hits all rows alike.

Columns: step time (median over all measured steps), its ratio to the unsplit model on one
thread (time / time, < 1 is faster), the measured bubble (idle fraction of device time over
the makespan of the compute actions: pipetrain's ``stats().bubble_ratio``; for PiPPy the same
formula over its stages' ``forward_one_chunk`` / ``backward_one_chunk`` /
``backward_weight_one_chunk`` calls, timed by wrapping them; for the floor, the two workers'
spans), and peak memory: growth of the resident set (VmHWM) during a block of steps, summed
over processes (malloc's free pages are given back first; approximate, includes allocator
slack). Writes ``peers.json``, ``peers.csv`` and ``peers.png`` to ``--out``.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from bench import _peer_models as pm
from bench._peer_outputs import write_outputs
from pipetrain import schedules
from bench._peer_models import Workload

# Every schedule build() knows (batched-W variants included), so a new one gets its row.
PIPETRAIN_SCHEDULES = list(schedules.NAMES)


def workloads(quick: bool) -> List[Workload]:
    """Sizes: full mode aims at 0.1-0.5 s per unsplit step on one core; quick mode (CI) at a
    few ms. One step per row per round, many rounds: a per-round ratio then compares steps
    taken seconds apart, and the median over rounds shrugs off load from other processes.
    Each workload stops adding rounds past its time budget (at least 3 rounds run), which
    keeps the full section under ~5 minutes even on loaded cores."""
    if quick:
        return [Workload("linear", "linear", 128, 8, 128, 8, rounds=5, steps=1, warmup=1, budget_s=8),
                Workload("blocks", "block", 64, 8, 128, 8, rounds=5, steps=1, warmup=1, budget_s=8),
                # m = 16 rather than 64 in quick mode: PiPPy's interleaved rows take ~1 s a step at m = 64.
                Workload("fine", "linear", 16, 8, 16, 16, rounds=6, steps=1, warmup=1, budget_s=8)]
    return [Workload("linear", "linear", 512, 16, 512, 8, rounds=16, steps=1, warmup=1, budget_s=75),
            Workload("blocks", "block", 256, 8, 512, 8, rounds=16, steps=1, warmup=1, budget_s=75),
            Workload("fine", "linear", 16, 8, 64, 64, rounds=30, steps=1, warmup=2, budget_s=75)]


@dataclass
class Sample:
    """What one ``Row.measure`` call saw: per-step seconds, per-step bubble (or None), the
    peak resident-memory growth in bytes (or None)."""

    times: List[float]
    bubbles: Optional[List[float]] = None
    mem: Optional[int] = None
    overlap: Optional[List[float]] = None   # per step: transfer time hidden under compute
    heads: Optional[List[float]] = None     # per step: seconds of stage 0's fastest forward


class Row:
    """One way of computing a step's gradients. ``group`` is one of ``reference``, ``pippy``,
    ``pipetrain``, ``floor``; ``p`` the pipeline width (0 for reference rows)."""

    group = "reference"
    p = 0
    note = ""

    def __init__(self, name: str):
        self.name = name

    def open(self, wl: Workload, ctx: "Context") -> None:
        raise NotImplementedError

    def measure(self, steps: int) -> Sample:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass
class Context:
    """What rows share: the workload's data and, if launched, the worker processes."""

    wl: Workload
    x: torch.Tensor
    y: torch.Tensor
    procs: object = None              # bench._peer_procs.ProcPair or None
    procs_reason: Optional[str] = None


def _threads(n: int):
    """Context manager: torch intra-op threads = n inside, restored after."""
    class _T:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)
    return _T()


def _zero(params) -> None:
    for p in params:
        p.grad = None


class Unsplit(Row):
    def __init__(self, threads: int, accumulate: bool = False):
        label = "all" if threads == 0 else str(threads)
        super().__init__(f"grad-accum, {label} thr" if accumulate else f"unsplit, {label} thr")
        self.threads, self.accumulate = threads, accumulate

    def open(self, wl, ctx):
        self.model = torch.nn.Sequential(*pm.make_layers(wl))
        self.params = list(self.model.parameters())
        self.ctx, self.m = ctx, wl.microbatches
        if self.accumulate:
            self.x_mbs, self.y_mbs = ctx.x.chunk(self.m), ctx.y.chunk(self.m)

    def measure(self, steps):
        times = []
        with _threads(self.threads or pm.cores()), pm.PeakRSS() as mem:
            for _ in range(steps):
                _zero(self.params)
                t0 = time.perf_counter()
                if self.accumulate:   # the plain loop: one micro-batch after another
                    for xb, yb in zip(self.x_mbs, self.y_mbs):
                        (pm.mse(self.model(xb), yb) / self.m).backward()
                else:
                    pm.mse(self.model(self.ctx.x), self.ctx.y).backward()
                times.append(time.perf_counter() - t0)
        return Sample(times, None, mem.delta)


class Pipetrain(Row):
    group = "pipetrain"

    def __init__(self, schedule: str, p: int = 2, num_threads: Optional[int] = None):
        super().__init__(f"pipetrain {schedule}" + ("" if p == 2 else f", p={p}")
                         + ("" if num_threads is None else f", {num_threads} thr"))
        self.schedule, self.p, self.num_threads = schedule, p, num_threads
        if schedule.startswith("interleaved"):
            self.note = "4 stages, 2 per device"

    def open(self, wl, ctx):
        import pipetrain
        layers = pm.make_layers(wl)
        parts = self.p * (2 if self.schedule.startswith("interleaved") else 1)
        self.params = [q for layer in layers for q in layer.parameters()]
        self.pipe = pipetrain.Pipeline(layers, num_devices=self.p, schedule=self.schedule,
                                       num_microbatches=wl.microbatches, loss_fn=pm.mse,
                                       balance=pm.balance(wl, parts), **self.options())
        self.ctx = ctx

    def options(self) -> dict:
        """Pipeline arguments beyond the shared ones (a training row adds its optimizer)."""
        return {} if self.num_threads is None else {"num_threads": self.num_threads}

    def measure(self, steps):
        times, bubbles, heads = [], [], []
        with pm.PeakRSS() as mem:
            for _ in range(steps):
                _zero(self.params)
                t0 = time.perf_counter()
                self.pipe.step(self.ctx.x, self.ctx.y)
                times.append(time.perf_counter() - t0)
                st = self.pipe.stats()
                bubbles.append(st.bubble_ratio)
                head = _head(st) if self.p == 2 and not self.note else None
                if head is not None:
                    heads.append(head)
        return Sample(times, bubbles, mem.delta, heads=heads)

    def close(self):
        self.pipe.close()


def _head(stats) -> Optional[float]:
    """Seconds the last of 2 devices must wait, in any schedule, before it has anything to run:
    stage 0's forward of micro-batch 0, taken as the fastest of stage 0's forwards in the step
    (the first one runs cold and is slower; the fastest keeps the bound a lower bound)."""
    fs = [r.duration_s for r in stats.records[0] if r.start_ns >= 0 and r.kind == "F"]
    return min(fs) if fs else None


def _bubble(spans_per_worker: List[List[tuple]]) -> float:
    """pipetrain's definition over (start, end) spans per worker: idle / (workers * makespan)."""
    lo = min(s for spans in spans_per_worker for s, _ in spans)
    hi = max(e for spans in spans_per_worker for _, e in spans)
    make = hi - lo
    if make <= 0:
        return 0.0
    busy = [sum(e - s for s, e in spans) for spans in spans_per_worker]
    return sum(make - b for b in busy) / (len(busy) * make)


class FloorThreads(Row):
    group = "floor"
    p = 2

    def __init__(self):
        super().__init__("floor, 2 threads")

    def open(self, wl, ctx):
        stages = pm.split(pm.make_layers(wl), pm.balance(wl, 2))
        self.work = list(zip(stages, pm.floor_inputs(wl, stages)))

    def unit(self, k: int, stage, args) -> None:
        """Worker ``k``'s share of one step (a training floor adds its optimizer step)."""
        pm.stage_work(stage, *args)

    def measure(self, steps):
        times, bubbles = [], []
        gate = threading.Barrier(len(self.work) + 1)
        spans = [[] for _ in self.work]
        errors: List[BaseException] = []

        def loop(k, stage, args):
            try:
                for _ in range(steps):
                    gate.wait()
                    t0 = pm.now_ns()
                    self.unit(k, stage, args)
                    spans[k].append((t0, pm.now_ns()))
                    gate.wait()
            except BaseException as err:   # re-raised below, in the caller
                errors.append(err)
                gate.abort()

        with _threads(1), pm.PeakRSS() as mem:
            threads = [threading.Thread(target=loop, args=(k, st, a), daemon=True)
                       for k, (st, a) in enumerate(self.work)]
            for st, _ in self.work:
                _zero(st.parameters())
            for t in threads:
                t.start()
            try:
                for i in range(steps):
                    gate.wait(timeout=120)     # both threads start step i together
                    gate.wait(timeout=120)     # both have finished it
                    for st, _ in self.work:
                        _zero(st.parameters())
                    times.append((max(s[i][1] for s in spans) - min(s[i][0] for s in spans)) * 1e-9)
                    bubbles.append(_bubble([[s[i]] for s in spans]))
            except threading.BrokenBarrierError:
                pass
            for t in threads:
                t.join(timeout=60)
        if errors:
            raise errors[0]
        return Sample(times, bubbles, mem.delta)


class InWorkers(Row):
    """A row the worker processes run (``bench/_peer_procs.py`` registers it by name)."""

    p = 2

    def __init__(self, key: str, name: str, group: str, note: str = ""):
        super().__init__(name)
        self.key, self.group, self.note = key, group, note

    def open(self, wl, ctx):
        if ctx.procs is None:
            raise RuntimeError(ctx.procs_reason or "no worker processes")
        self.procs = ctx.procs

    def measure(self, steps):
        replies = self.procs.call(("run", self.key, steps), timeout=60 + 10 * steps)
        times, bubbles = [], []
        for i in range(steps):
            times.append((max(r["ends"][i] for r in replies) -
                          min(r["starts"][i] for r in replies)) * 1e-9)
            spans = [r["actions"][i] for r in replies]
            bubbles.append(_bubble(spans) if all(spans) else None)
        mems = [r["mem"] for r in replies]
        mem = None if None in mems else sum(mems)
        # pipetrain's runner measures, per rank, how much of the incoming transfer time the
        # rank spent computing rather than blocked in the receive: pooled over both ranks.
        overlap = None
        if all(r.get("overlap") for r in replies):
            overlap = []
            for i in range(steps):
                total = sum(r["overlap"][i]["transfer_s"] for r in replies)
                exposed = sum(r["overlap"][i]["exposed_s"] for r in replies)
                overlap.append(1.0 - exposed / total if total else 1.0)
        return Sample(times, bubbles if None not in bubbles else None, mem, overlap)


def make_rows(wl: Workload) -> List[Row]:
    """Every row of one workload, in table order."""
    from bench._peer_procs import PIPPY_SCHEDULES
    rows: List[Row] = [Unsplit(1), Unsplit(0), Unsplit(1, accumulate=True)]
    if wl.name == "fine":
        # p = 1 against the plain loop: the default (intra-op threads = cores // p, here all
        # cores) and, to separate the engine's own cost from threading, one thread as the loop.
        rows += [Pipetrain("1f1b", p=1), Pipetrain("1f1b", p=1, num_threads=1)]
    rows += [Pipetrain(s) for s in PIPETRAIN_SCHEDULES]
    rows += [InWorkers(k, f"pippy {k}", "pippy", "4 stages, 2 per process" if per == 2 else "")
             for k, (_, per) in PIPPY_SCHEDULES.items()]
    from bench._peer_procs import PIPETRAIN_MP_GLOO, PIPETRAIN_MP_SCHEDULES
    # The default wire between 2 processes of one host is shared memory; the gloo rows keep
    # the transport PiPPy uses, for comparison.
    per = "4 stages, 2 per process; "
    rows += [InWorkers(f"pipetrain-mp {s}", f"pipetrain {s}, 2 processes", "pipetrain",
                       (per if s.startswith("interleaved") else "") + "shared memory")
             for s in PIPETRAIN_MP_SCHEDULES]
    rows += [InWorkers(f"pipetrain-mp {s} gloo", f"pipetrain {s}, 2 processes (gloo)",
                       "pipetrain", (per if s.startswith("interleaved") else "") + "gloo p2p")
             for s in PIPETRAIN_MP_GLOO]
    rows += [FloorThreads(), InWorkers("floor", "floor, 2 processes", "floor")]
    return rows


@dataclass
class Result:
    row: Row
    rounds: List[List[float]] = field(default_factory=list)   # per round: step seconds
    bubbles: List[float] = field(default_factory=list)
    mem: Optional[int] = None
    error: Optional[str] = None
    overlaps: List[float] = field(default_factory=list)
    heads: List[float] = field(default_factory=list)

    @property
    def median(self) -> Optional[float]:
        all_t = [t for r in self.rounds for t in r]
        return statistics.median(all_t) if all_t else None

    def round_median(self, i: int) -> Optional[float]:
        return statistics.median(self.rounds[i]) if i < len(self.rounds) and self.rounds[i] else None


def _ratio(a: Result, b, plus: float = 0.0) -> Optional[float]:
    """Median over rounds of (a's round median / b's round median): a side-by-side ratio.
    ``b`` may be a list of results: then the fastest of them in each round (the floor).
    ``plus`` seconds are added to the denominator of every round (the bound: the floor plus
    the head of :func:`_head`)."""
    bs = b if isinstance(b, list) else [b]
    rs = []
    for i in range(len(a.rounds)):
        den = [x.round_median(i) for x in bs if x.round_median(i)]
        if a.round_median(i) and den:
            rs.append(a.round_median(i) / (min(den) + plus))
    return statistics.median(rs) if rs else None


def _best(results: List[Result], group: str, p: int = 2) -> Optional[Result]:
    ok = [r for r in results if r.row.group == group and r.row.p == p and r.median]
    return min(ok, key=lambda r: r.median) if ok else None


def measure_workload(wl: Workload, ctx: Context, rows: List[Row], log=print) -> List[Result]:
    """Open every row, warm it up, then interleave measuring rounds; rows that fail are
    reported in the table with their error and do not stop the others."""
    results = [Result(r) for r in rows]
    t_start = time.monotonic()
    for res in results:
        try:
            res.row.open(wl, ctx)
            warm = res.row.measure(wl.warmup)
            log(f"  [{wl.name}] ready: {res.row.name:<36} warm-up step {1e3 * statistics.median(warm.times):8.1f} ms")
        except Exception as err:   # keep going: one engine failing must not hide the others
            res.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            log(f"  [{wl.name}] FAILED: {res.row.name}: {res.error}")
    live = [r for r in results if r.error is None]
    for i in range(wl.rounds):
        order = live if i % 2 == 0 else live[::-1]
        for res in order:
            if res.error:
                continue
            try:
                s = res.row.measure(wl.steps)
            except Exception as err:
                res.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}"
                log(f"  [{wl.name}] FAILED in round {i + 1}: {res.row.name}: {res.error}")
                continue
            res.rounds.append(s.times)
            res.bubbles += [b for b in (s.bubbles or []) if b is not None]
            res.overlaps += list(s.overlap or [])
            res.heads += list(s.heads or [])
            if s.mem is not None:
                res.mem = max(res.mem or 0, s.mem)
        for res in live:   # keep rounds aligned: a row that failed this round gets an empty one
            if len(res.rounds) < i + 1:
                res.rounds.append([])
        elapsed = time.monotonic() - t_start
        log(f"  [{wl.name}] round {i + 1}/{wl.rounds} done, {elapsed:.0f} s")
        if elapsed > wl.budget_s and i >= 2 and i + 1 < wl.rounds:
            log(f"  [{wl.name}] time budget {wl.budget_s:.0f} s reached: stopping after {i + 1} rounds")
            break
    for res in results:
        try:
            res.row.close()
        except Exception:
            pass
    return results


def summarize(wl: Workload, results: List[Result]) -> Dict[str, object]:
    """The headline ratios of one workload (time / time, medians over rounds)."""
    base = next((r for r in results if r.row.name == "unsplit, 1 thr" and r.median), None)
    bp, bt, bf = _best(results, "pippy"), _best(results, "pipetrain"), _best(results, "floor")
    floors = [r for r in results if r.row.group == "floor" and r.median]
    out: Dict[str, object] = {
        "best_pippy": bp.row.name if bp else None, "best_pipetrain": bt.row.name if bt else None,
        "best_floor": bf.row.name if bf else None,
        "pippy_over_pipetrain": _ratio(bp, bt) if bp and bt else None,
        # The floor: per round, the faster of its thread and process forms.
        "pipetrain_over_floor": _ratio(bt, floors) if bt and floors else None,
        # Each form apart: threads share one GIL (what an in-process engine is bound by),
        # processes do not (what a multi-process engine could reach).
        **{f"pipetrain_over_floor_{'threads' if 'thread' in f.row.name else 'processes'}":
           (_ratio(bt, f) if bt else None) for f in floors},
        "pipetrain_over_unsplit1": _ratio(bt, base) if bt and base else None,
    }
    # The bound: the last device idles at least while stage 0 runs a forward (the fastest seen
    # stands for micro-batch 0's), then has at least its floor's work to do; no schedule of
    # this split is faster.
    heads = [h for r in results if r.row.group == "pipetrain" for h in r.heads]
    head = statistics.median(heads) if heads else None
    out["head_ms"] = None if head is None else head * 1e3
    out["pippy_over_bound"] = _ratio(bp, floors, head) if bp and floors and head else None
    out["pipetrain_over_bound"] = _ratio(bt, floors, head) if bt and floors and head else None
    # pipetrain's multi-process rows alone (same processes and transport as PiPPy's).
    mp = [r for r in results if r.row.name.startswith("pipetrain") and "processes" in r.row.name
          and r.median]
    bm = min(mp, key=lambda r: r.median) if mp else None
    out["best_pipetrain_mp"] = bm.row.name if bm else None
    out["pippy_over_pipetrain_mp"] = _ratio(bp, bm) if bp and bm else None
    out["pipetrain_mp_overlap"] = statistics.median(bm.overlaps) if bm and bm.overlaps else None
    loop = next((r for r in results if r.row.name.startswith("grad-accum") and r.median), None)
    for r in results:
        if r.row.group == "pipetrain" and r.row.p == 1 and r.median and loop:
            key = "pipetrain_p1_1thr_over_loop" if getattr(r.row, "num_threads", None) else "pipetrain_p1_over_loop"
            out[key] = _ratio(r, loop)
    return out


def _fmt(v, spec, missing="n/a"):
    return missing if v is None else format(v, spec)


def print_table(wl: Workload, results: List[Result], summary: Dict[str, object]) -> None:
    """The workload's table and its headline ratios; warns where a ratio to the floor below 1
    says the load on the machine changed between rows (no schedule beats the floor)."""
    base = next((r for r in results if r.row.name == "unsplit, 1 thr" and r.median), None)
    print(f"\n{wl.name}: {wl.describe()}; p = 2")
    head = f"{'row':<38}{'step ms':>9}{'t/unsplit1':>11}{'bubble':>8}{'peak RSS MB':>12}{'steps':>6}  note"
    print(head)
    print("-" * len(head))
    for r in results:
        if r.error:
            print(f"{r.row.name:<38}{'failed':>9}  {r.error}")
            continue
        ratio = _ratio(r, base) if base else None
        bub = statistics.median(r.bubbles) * 100 if r.bubbles else None
        n = sum(len(x) for x in r.rounds)
        print(f"{r.row.name:<38}{_fmt(r.median and r.median * 1e3, '9.1f', 'n/a'):>9}"
              f"{_fmt(ratio, '11.2f'):>11}{_fmt(bub, '7.1f'):>7}{'%' if bub is not None else ' '}{_fmt(None if r.mem is None else r.mem / 2**20, '12.1f'):>12}"
              f"{n:>6}  {r.row.note}"
              + (f"{'; ' if r.row.note else ''}transfers hidden {100 * statistics.median(r.overlaps):.0f} %"
                 if r.overlaps else ""))
    s = summary
    print(f"best PiPPy / best pipetrain = {_fmt(s['pippy_over_pipetrain'], '.2f')} "
          f"({s['best_pippy']} / {s['best_pipetrain']}); best pipetrain / floor = "
          f"{_fmt(s['pipetrain_over_floor'], '.2f')} (floor: faster of threads/processes per round; "
          f"vs threads {_fmt(s.get('pipetrain_over_floor_threads'), '.2f')}, vs processes "
          f"{_fmt(s.get('pipetrain_over_floor_processes'), '.2f')})"
          + (f"; pipetrain p=1 / plain loop = {_fmt(s['pipetrain_p1_over_loop'], '.2f')}"
             if "pipetrain_p1_over_loop" in s else "")
          + (f" (1 thread: {_fmt(s['pipetrain_p1_1thr_over_loop'], '.2f')})"
             if "pipetrain_p1_1thr_over_loop" in s else ""))
    print(f"best PiPPy / best pipetrain multi-process = {_fmt(s.get('pippy_over_pipetrain_mp'), '.2f')} "
          f"({s['best_pippy']} / {s.get('best_pipetrain_mp')}); its transfers hidden under compute: "
          f"{_fmt(s.get('pipetrain_mp_overlap') and 100 * s['pipetrain_mp_overlap'], '.0f')} %")
    if s.get("pippy_over_bound") is not None:
        print(f"bound: floor + stage 0's fastest forward ({s['head_ms']:.1f} ms), the least any schedule of "
              f"this 2-stage split can take; best PiPPy / bound = {s['pippy_over_bound']:.2f} (the most "
              f"any such schedule could gain over PiPPy here), best pipetrain / bound = "
              f"{_fmt(s['pipetrain_over_bound'], '.2f')}")
    if s["pipetrain_over_floor"] is not None and s["pipetrain_over_floor"] < 0.95:
        print("  (below the floor: the load from other processes changed between rows; "
              "more rounds or a quieter machine)")


def _report(wl, results, summary) -> Dict[str, object]:
    base = next((r for r in results if r.row.name == "unsplit, 1 thr" and r.median), None)
    return {"workload": wl.name, "describe": wl.describe(), "summary": summary,
            "rows": [{"row": r.row.name, "group": r.row.group, "p": r.row.p, "note": r.row.note,
                      "step_s": r.median, "over_unsplit1": _ratio(r, base) if base and r.median else None,
                      "bubble": statistics.median(r.bubbles) if r.bubbles else None,
                      "peak_rss_bytes": r.mem, "steps": sum(len(x) for x in r.rounds),
                      "round_medians": [r.round_median(i) for i in range(len(r.rounds))],
                      "error": r.error} for r in results]}


def _load() -> str:
    """The 1-minute load average: how contended the cores were (others' processes too)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        return "n/a"


def measure_all(wls: List[Workload], rows_of=None, use_procs: bool = True, log=print,
                extra=None) -> List[Dict[str, object]]:
    """Per workload: the worker processes set up, ``rows_of(wl)`` (default :func:`make_rows`)
    measured, summarized and printed; ``extra(results, summary)`` may add to the summary
    (and print under the table). Returns the reports. The workers start once for all
    workloads and always end (``finally``); without them the process rows say why."""
    from bench import _peer_procs
    reason = None if use_procs else "process rows disabled"
    reason = reason or _peer_procs.pippy_available()
    pair = None
    report = []
    try:
        if reason is None:
            log("starting 2 gloo worker processes (PiPPy rows, floor on processes) ...")
            try:
                pair = _peer_procs.ProcPair(2)
            except Exception as err:
                reason = f"worker processes did not start: {err}"
        if reason:
            log(f"(process rows skipped: {reason})")
        log(f"{torch.get_num_threads()} torch threads by default, {pm.cores()} cores, load "
            f"average {_load()}")
        for wl in wls:
            x, y = pm.data(wl)
            if pair is not None and pair.procs:
                try:
                    pair.call(("setup", wl), timeout=120)
                except Exception as err:
                    reason, pair = f"workers failed to set up {wl.name}: {err}", None
            ctx = Context(wl, x, y, pair if pair is not None and pair.procs else None, reason)
            results = measure_workload(wl, ctx, (rows_of or make_rows)(wl), log)
            summary = summarize(wl, results)
            print_table(wl, results, summary)
            if extra is not None:
                extra(results, summary)
            report.append(_report(wl, results, summary))
    finally:
        if pair is not None:
            pair.close()
    return report


def run_section(quick: bool, out: pathlib.Path, wls: Optional[List[Workload]] = None,
                use_procs: bool = True, log=print) -> List[Dict[str, object]]:
    """Measure every workload (or ``wls``); returns the report written to ``out``."""
    t0 = time.monotonic()
    log(f"{'quick' if quick else 'full'} mode")
    report = measure_all(wls or workloads(quick), make_rows, use_procs, log)
    write_outputs(out, report)
    log("bubble: idle share of device time over the compute actions' makespan (pipetrain: "
        "stats().bubble_ratio; PiPPy: its stages' forward/backward calls, timed by wrapping them; "
        "floor: the two workers' spans). peak RSS: resident-set growth during a step, summed over "
        "processes. t/unsplit1 and the ratios: medians over rounds of per-round ratios.")
    log(f"peers: {time.monotonic() - t0:.0f} s, load average now {_load()}; {out}/peers.json, peers.csv, peers.png")
    return report


def run(quick: bool, out: pathlib.Path) -> None:
    run_section(quick, pathlib.Path(out))
