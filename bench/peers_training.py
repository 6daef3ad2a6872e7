"""Bench section ``peers_training``: the peers comparison on the training loop users run.

The ``peers`` section times one gradient step (forward + backward of m micro-batches): what
every engine's ``step`` computes. A user trains: gradient step, then the optimizer step, then
the next mini-batch. This section runs that loop for ``n`` mini-batches in a row, each engine
as its own documentation writes it, on the peers section's ``linear`` and ``blocks``
workloads (p = 2, m = 8, the same split, loss and data), with SGD + momentum
(``_peer_models.optimizer``) everywhere:

- ``unsplit``: ``zero_grad(); mse(model(x), y).backward(); opt.step()``, 1 thread / all;
- ``pippy <Schedule>``: on each of the 2 gloo processes ``schedule.step(...)`` then the
  process's own ``opt.step()`` over its stages' parameters;
- ``pipetrain <schedule>``: ``pipe.train(batches)`` with ``optimizer=`` -- its default path,
  which for a synchronous schedule runs 4 mini-batches per executor run with each stage's
  optimizer step inside the run (:mod:`pipetrain.tiled_training`; the numbers are exactly
  the per-step loop's), so no device idles in a flush between mini-batches;
- ``pipetrain <schedule>, per-step loop``: the same with ``minibatches_per_run=1`` (step()
  then the optimizer steps, per mini-batch), to show what the windows gain;
- ``pipetrain <schedule>, 2 processes``: pipetrain's multi-process runner, whose train()
  keeps the per-step loop;
- ``floor``: each stage's micro-batch work plus its optimizer step, on 2 threads / 2
  processes with no dependency between them.

Columns as in ``peers`` but per mini-batch: time per mini-batch (each measurement is ``n``
mini-batches in one go, divided by ``n``), its ratio to the unsplit model's, the bubble where
the engine reports one, peak memory. Rows are interleaved per round as in ``peers``; ratios
are medians of per-round ratios. Writes ``peers_training.json`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Dict, List, Optional

import torch

from bench import _peer_models as pm
from bench import peers
from bench.peers import FloorThreads, InWorkers, Pipetrain, Result, Row, Sample, Unsplit

#: Mini-batches per measurement: two of train()'s default windows of 4.
MINIBATCHES = 8
#: Schedules that also get a per-step-loop row (what train()'s windows gain over it).
PER_STEP = ["1f1b", "zb-h1"]
#: pipetrain's multi-process rows here (their train() is the per-step loop).
MP = ["1f1b", "zb-h1"]


def workloads(quick: bool) -> List[pm.Workload]:
    """The peers section's linear and blocks workloads, measured in blocks of MINIBATCHES
    mini-batches (``steps``), fewer rounds: each round runs every row for 8 mini-batches."""
    out = []
    for wl in peers.workloads(quick)[:2]:
        out.append(dataclasses.replace(wl, steps=MINIBATCHES, warmup=4,
                                       rounds=3 if quick else 8, budget_s=8 if quick else 60))
    return out


class UnsplitTrain(Unsplit):
    def open(self, wl, ctx):
        super().open(wl, ctx)
        self.opt = pm.optimizer(self.params)

    def measure(self, n):
        with peers._threads(self.threads or pm.cores()), pm.PeakRSS() as mem:
            t0 = time.perf_counter()
            for _ in range(n):
                self.opt.zero_grad(set_to_none=True)
                pm.mse(self.model(self.ctx.x), self.ctx.y).backward()
                self.opt.step()
            t = (time.perf_counter() - t0) / n
        return Sample([t] * n, None, mem.delta)


class PipetrainTrain(Pipetrain):
    """``pipe.train(batches)``, the optimizer inside the pipeline; ``window``: train()'s
    ``minibatches_per_run`` (None: its default)."""

    def __init__(self, schedule: str, window: Optional[int] = None):
        super().__init__(schedule)
        self.window = window
        if window == 1:
            self.name += ", per-step loop"

    def options(self):
        return {**super().options(), "optimizer": pm.optimizer}

    def measure(self, n):
        batches = [(self.ctx.x, self.ctx.y)] * n
        with pm.PeakRSS() as mem:
            t0 = time.perf_counter()
            for _ in self.pipe.train(batches, self.window):
                pass
            t = (time.perf_counter() - t0) / n
        bubble = self.pipe.stats().bubble_ratio    # the last executor run's
        return Sample([t] * n, [bubble], mem.delta)


class FloorThreadsTrain(FloorThreads):
    def __init__(self):
        super().__init__()
        self.opts: Dict[int, torch.optim.Optimizer] = {}

    def unit(self, k, stage, args):
        pm.stage_work(stage, *args)
        if k not in self.opts:
            self.opts[k] = pm.optimizer(stage.parameters())
        self.opts[k].step()
        self.opts[k].zero_grad(set_to_none=True)

    def measure(self, n):
        s = super().measure(n)
        # Per mini-batch, the two threads start together (as in peers); the time of the
        # block of n is the sum of its mini-batches.
        t = sum(s.times) / n
        return Sample([t] * n, s.bubbles, s.mem)


class InWorkersTrain(InWorkers):
    def measure(self, n):
        replies = self.procs.call(("train", self.key, n), timeout=60 + 10 * n)
        t = (max(r["ends"][0] for r in replies) - min(r["starts"][0] for r in replies)) * 1e-9 / n
        mems = [r["mem"] for r in replies]
        return Sample([t] * n, None, None if None in mems else sum(mems))


def make_rows(wl: pm.Workload) -> List[Row]:
    from bench._peer_procs import PIPPY_SCHEDULES
    rows: List[Row] = [UnsplitTrain(1), UnsplitTrain(0)]
    rows += [PipetrainTrain(s) for s in peers.PIPETRAIN_SCHEDULES]
    rows += [PipetrainTrain(s, window=1) for s in PER_STEP]
    rows += [InWorkersTrain(k, f"pippy {k}", "pippy", "4 stages, 2 per process" if per == 2 else "")
             for k, (_, per) in PIPPY_SCHEDULES.items()]
    rows += [InWorkersTrain(f"pipetrain-mp {s}", f"pipetrain {s}, 2 processes", "pipetrain",
                            "shared memory; per-step loop") for s in MP]
    rows += [FloorThreadsTrain(), InWorkersTrain("floor", "floor, 2 processes", "floor")]
    return rows


def windows_gain(results: List[Result]) -> Dict[str, Optional[float]]:
    """Per schedule of PER_STEP: train()'s default windows over its per-step loop (time /
    time, median of per-round ratios; < 1: the windows are faster)."""
    by = {r.row.name: r for r in results if r.median}
    out = {}
    for s in PER_STEP:
        a, b = by.get(f"pipetrain {s}"), by.get(f"pipetrain {s}, per-step loop")
        out[s] = peers._ratio(a, b) if a and b else None
    return out


def run_section(quick: bool, out: pathlib.Path, wls: Optional[List[pm.Workload]] = None,
                use_procs: bool = True, log=print) -> List[Dict[str, object]]:
    """Measure every workload (or ``wls``); returns the report written to ``out``."""
    t0 = time.monotonic()
    log(f"training loop, {MINIBATCHES} mini-batches per measurement, SGD + momentum; "
        f"'step ms' below is the time per mini-batch, optimizer step included")

    def gain_line(results, summary):
        summary["windows_over_per_step"] = gain = windows_gain(results)
        print("train() windows (default) / per-step loop: " + ", ".join(
            f"{s} {peers._fmt(v, '.3f')}" for s, v in gain.items()))
    report = peers.measure_all(wls or workloads(quick), make_rows, use_procs, log, gain_line)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers_training.json").write_text(json.dumps(report, indent=1))
    log(f"peers_training: {time.monotonic() - t0:.0f} s; {out}/peers_training.json")
    return report


def run(quick: bool, out: pathlib.Path) -> None:
    run_section(quick, out)
