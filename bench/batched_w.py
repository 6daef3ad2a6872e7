"""Bench section ``batched_w``: the I/W split's cost against B, and batched weight gradients.

Two grains, one run, rows interleaved (every row once per round), medians of per-round
ratios (the machine is shared, so only ratios measured side by side mean anything):

- fine: 8 x (Linear(16, 16) + GELU), one-row micro-batches, m = 64, one torch thread;
- training: 2 pre-norm residual MLP blocks, d = 256, 64-row micro-batches, m = 8.

Stage alone (one stage, its m forwards then its backwards; the times are the backwards):

- ``B``: the full backward of each micro-batch;
- ``I + W, before``: I capturing through Python pre-hooks, W restarting autograd at every
  frontier node, one accumulation per node and micro-batch (``split_backward.BATCH =
  False``: the path before this work);
- ``I + W``: W per micro-batch as now (Linears as direct GEMMs, one accumulation per W);
- ``I + W(batch m)``: the m W's as one batched W (one GEMM per Linear over m micro-batches).

``acc bytes`` is what the backwards' gradient accumulation moves per step (each add of a
gradient into another reads both and writes one; an in-place GEMM accumulation re-reads
the gradient once), counted in a separate pass. Then, at p = 2, the zero-bubble schedules
with and without batched W (``zb-h1`` vs ``zb-h1-bw``, ``zb-h2`` vs ``zb-h2-bw``).

Rows ``I + W, autograd split`` / ``I + W`` compare the split through autograd (a Python
walk of the graph per micro-batch, an autograd pass with capture points, W reading each
frontier node back) with the hand-written ``I`` of :mod:`pipetrain.manual_backward`
(``manual_backward.ENABLED`` off / on, same code otherwise).

Last, issue 11's zero-bubble target per workload (the two grains and the peers bench's
linear and blocks workloads, p = 2): ZB / 1F1B simulated from each step's measured costs
and measured, interleaved, with a verdict where the simulator says ZB should be faster.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time

import torch
from torch import nn

from pipetrain import manual_backward, split_backward, stage as stage_mod
from pipetrain.pipeline import Pipeline
from pipetrain.stage import Meter, Stage

from bench.training import Block


def _fine(seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(8)]


def _coarse(seed=0):
    torch.manual_seed(seed)
    return [Block(256) for _ in range(2)]


GRAINS = {  # name -> (layers, width, rows per micro-batch, m, torch threads)
    "fine": (_fine, 16, 1, 64, 1),
    "training": (_coarse, 256, 64, 8, 0),
}


def _stage_rows(st: Stage, x: torch.Tensor, g: torch.Tensor, m: int):
    def fwd():
        st.begin_run(Meter())
        for k in range(m):
            st.forward(k, x)

    def timed(body):
        def run():
            fwd()
            t = time.perf_counter()
            body()
            d = time.perf_counter() - t
            st.end_run(commit=False)
            return d
        return run

    def b():
        for k in range(m):
            st.backward(k, g)

    def iw(count):
        def body():
            for k in range(m):
                st.backward_input(k, g)
            for k in range(0, m, count):
                st.backward_weight(k, count)
        return body

    def before():
        for k in range(m):
            st.backward_input(k, g)
        for k in range(m):
            st.backward_weight(k)

    def off(module, flag, fn):
        """``fn`` run with ``module.flag`` False (a lever of the step path), then restored."""
        def run():
            old = getattr(module, flag)
            setattr(module, flag, False)
            try:
                return fn()
            finally:
                setattr(module, flag, old)
        return run

    return {"B": timed(b), "I + W, before": off(split_backward, "BATCH", timed(before)),
            "I + W, autograd split": off(manual_backward, "ENABLED", timed(iw(1))), "I + W": timed(iw(1)),
            f"I + W(batch {m})": timed(iw(m))}


def _bytes(rows: dict) -> dict:
    """Accumulation bytes of one call of each row (B's via the stage's own accumulate)."""
    real = stage_mod._accumulate
    out = {}

    def counting(into, params, grads):
        split_backward._count_accumulation(into, params, grads)
        return real(into, params, grads)

    for name, fn in rows.items():
        split_backward.ACC_BYTES = [0]
        stage_mod._accumulate = counting
        try:
            fn()
        finally:
            stage_mod._accumulate = real
            out[name] = split_backward.ACC_BYTES[0]
            split_backward.ACC_BYTES = None
    return out


def _stage_table(quick: bool) -> None:
    print(f"{'grain':<9}{'row':<23}{'us / micro-batch':>17}{'/ B':>7}{'acc bytes':>11}")
    for grain, (layers, width, rows_, m, threads) in GRAINS.items():
        if quick:
            m = min(m, 16)
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            st = Stage(0, layers())
            x, g = torch.randn(rows_, width), torch.randn(rows_, width)
            rows = _stage_rows(st, x, g, m)
            acc = _bytes(rows)
            rounds = 3 if quick else (15 if grain == "fine" else 8)
            times = {k: [] for k in rows}
            for r in range(rounds + 1):
                for k, fn in rows.items():
                    d = fn()
                    if r:
                        times[k].append(d)
            for k in rows:
                ratio = statistics.median([a / b for a, b in zip(times[k], times["B"])])
                print(f"{grain:<9}{k:<23}{statistics.median(times[k]) / m * 1e6:>17.1f}"
                      f"{ratio:>7.3f}{acc[k]:>11,d}")
        finally:
            torch.set_num_threads(old)


def _pipeline_table(quick: bool) -> None:
    print("\np = 2, zero-bubble schedules with / without batched W (step ms, medians; "
          "ratio = batched / plain, per round)")
    print(f"{'grain':<9}{'schedule':<10}{'plain ms':>10}{'-bw ms':>9}{'-bw / plain':>13}")
    for grain, (layers, width, rows_, m, threads) in GRAINS.items():
        if quick:
            m = min(m, 16)
        steps = 3 if quick else (12 if grain == "fine" else 6)
        x, y = torch.randn(rows_ * m, width), torch.randn(rows_ * m, width)
        for base in ("zb-h1", "zb-h2"):
            pipes = {name: Pipeline(layers(), 2, schedule=name, num_microbatches=m,
                                    loss_fn=nn.functional.mse_loss,
                                    **({"num_threads": threads} if threads else {}))
                     for name in (base, base + "-bw")}
            times = {name: [] for name in pipes}
            try:
                for r in range(steps + 1):
                    for name, pipe in pipes.items():
                        t = time.perf_counter()
                        pipe.step(x, y)
                        if r:
                            times[name].append(time.perf_counter() - t)
            finally:
                for pipe in pipes.values():
                    pipe.close()
            a, b = times[base], times[base + "-bw"]
            ratio = statistics.median([q / w for q, w in zip(b, a)])
            print(f"{grain:<9}{base:<10}{statistics.median(a) * 1e3:>10.2f}"
                  f"{statistics.median(b) * 1e3:>9.2f}{ratio:>13.3f}")


# -- zero-bubble vs 1F1B where the simulator says so ----------------------------------------

ZB_SCHEDULES = ("1f1b", "zb-h1", "zb-h2", "zb-h1-bw", "zb-h2-bw")


def _zb_workloads(quick: bool):
    """name -> (layers factory, width, batch rows, m, torch threads or 0, rounds): the two
    grains above at p = 2 and the peers bench's linear and blocks workloads."""
    from bench import _peer_models as pm

    def peer(kind, width, layers):
        wl = pm.Workload(kind, kind, width, layers, 0, 0, 0, 0)
        return lambda: pm.make_layers(wl)

    if quick:
        return {"fine": (_fine, 16, 16, 16, 1, 3), "linear": (peer("linear", 128, 8), 128, 128, 8, 0, 3)}
    return {"fine": (_fine, 16, 64, 64, 1, 12),
            "training": (_coarse, 256, 512, 8, 0, 10),
            "linear": (peer("linear", 512, 16), 512, 512, 8, 0, 10),
            "blocks": (peer("block", 256, 8), 256, 512, 8, 0, 8)}


def _zero_bubble_table(quick: bool) -> None:
    """Issue 11's target, per workload: every zero-bubble schedule at least as fast as 1F1B
    wherever the simulator, fed each step's measured action costs, says it should be.

    The five pipelines of a workload step in turn (one step each per round, the order
    alternating); per round, ZB / 1F1B of the step times and of the simulated makespans
    (``Pipeline.simulate(stats())``: each pipeline's own measured F / B / I / W costs).
    Medians over rounds. Verdict where the simulated ratio is <= 1: ``holds`` if the
    measured ratio is <= 1 plus the per-round noise (half the interquartile range of the
    measured ratios, at least 0.01), else ``MISSES``; elsewhere ``n/a``."""
    print("\np = 2: zero-bubble vs 1f1b, simulated (each step's measured costs) and measured "
          "(step time), medians of per-round ratios")
    print(f"{'workload':<10}{'schedule':<10}{'1f1b ms':>9}{'zb ms':>8}{'sim zb/1f1b':>13}"
          f"{'meas zb/1f1b':>14}{'noise':>7}  verdict")
    for wname, (layers, width, rows, m, threads, rounds) in _zb_workloads(quick).items():
        t0 = time.perf_counter()
        x = torch.randn(rows, width, generator=torch.Generator().manual_seed(1))
        y = torch.randn(rows, width, generator=torch.Generator().manual_seed(2))
        pipes = {name: Pipeline(layers(), 2, schedule=name, num_microbatches=m,
                                loss_fn=nn.functional.mse_loss,
                                **({"num_threads": threads} if threads else {}))
                 for name in ZB_SCHEDULES}
        wall = {n: [] for n in pipes}
        sim = {n: [] for n in pipes}
        try:
            for r in range(rounds + 1):
                order = list(pipes) if r % 2 else list(reversed(pipes))
                for name in order:
                    pipe = pipes[name]
                    t = time.perf_counter()
                    pipe.step(x, y)
                    d = time.perf_counter() - t
                    if r:
                        wall[name].append(d)
                        sim[name].append(pipe.simulate(pipe.stats()).makespan)
        finally:
            for pipe in pipes.values():
                pipe.close()
        base = "1f1b"
        for name in ZB_SCHEDULES[1:]:
            meas = [a / b for a, b in zip(wall[name], wall[base])]
            sims = [a / b for a, b in zip(sim[name], sim[base])]
            mr, sr = statistics.median(meas), statistics.median(sims)
            q = statistics.quantiles(meas, n=4) if len(meas) >= 4 else [mr, mr, mr]
            noise = max(0.01, (q[2] - q[0]) / 2)
            verdict = ("n/a (simulated slower)" if sr > 1.0 else
                       "holds" if mr <= 1.0 + noise else "MISSES")
            print(f"{wname:<10}{name:<10}{statistics.median(wall[base]) * 1e3:>9.2f}"
                  f"{statistics.median(wall[name]) * 1e3:>8.2f}{sr:>13.3f}{mr:>14.3f}{noise:>7.3f}  {verdict}")
        print(f"  ({wname}: {rounds} rounds, {time.perf_counter() - t0:.0f} s)", flush=True)


def run(quick: bool, out: pathlib.Path) -> None:
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"fine grain: 8 x (Linear(16,16)+GELU), 1-row micro-batches, 1 torch thread; "
          f"training grain: 2 residual blocks d=256, 64-row micro-batches")
    _stage_table(quick)
    _pipeline_table(quick)
    _zero_bubble_table(quick)
