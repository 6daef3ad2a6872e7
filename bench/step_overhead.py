"""Per-action engine cost at the fine grain (issue 11, levers 1 and 5), before/after in one run.

Workload: 8 x (Linear(16, 16) + GELU), one-row micro-batches, m = 64, one torch thread. Rows,
measured interleaved (every row once per round), medians of per-round ratios:

- ``plain loop``: ``(mse(model(x_k), y_k) / m).backward()`` for each micro-batch — what a
  p = 1 pipeline competes with;
- ``pipetrain 1f1b / zb-h1, p=1``, each with the step-path levers on (``now``) and off
  (``before``: every forward's saved tensors watched through a Python hook, and every
  backward through ``torch.autograd.grad``'s Python wrapper) — the same code, flags flipped;
- ``B`` vs ``I + W`` on the stage alone, per micro-batch (the split's own cost);
- then thread borrowing on / off at p = 2 on the peers section's linear and blocks
  workloads (:func:`run_threads`).

Engine overhead per action = (pipeline step - plain loop) / actions. Targets: p = 1 within
1.05x of the plain loop, <= 20 us per action, I + W within 1.05x of B. Each row is timed by
the wall clock and by the process's CPU time (every thread's; the executor's threads block
without spinning at p = 1): on a host loaded by other jobs the CPU columns are the steadier.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import statistics
import time

import torch
from torch import nn

import pipetrain
from pipetrain import autograd_fast
from pipetrain import stage as stage_mod
from pipetrain.stage import Meter, Stage


@contextlib.contextmanager
def _levers(on: bool):
    old = autograd_fast.ENABLED, stage_mod.MEASURE_EACH_FORWARD
    autograd_fast.ENABLED, stage_mod.MEASURE_EACH_FORWARD = on, not on
    try:
        yield
    finally:
        autograd_fast.ENABLED, stage_mod.MEASURE_EACH_FORWARD = old


def _layers():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(8)]


def _zero(params):
    for p in params:
        p.grad = None


def run(quick: bool, out: pathlib.Path) -> None:
    m = 16 if quick else 64
    rounds = 5 if quick else 25
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mse = nn.functional.mse_loss
    x, y = torch.randn(m, 16), torch.randn(m, 16)
    model = nn.Sequential(*_layers())
    mparams = list(model.parameters())
    xs, ys = x.chunk(m), y.chunk(m)

    def plain():
        _zero(mparams)
        for xb, yb in zip(xs, ys):
            (mse(model(xb), yb) / m).backward()

    rows = {"plain loop": (plain, None, 0)}
    pipes = []
    for sched in ("1f1b", "zb-h1"):
        layers = _layers()
        pipe = pipetrain.Pipeline(layers, 1, schedule=sched, num_microbatches=m, loss_fn=mse,
                                  num_threads=1)
        pipes.append(pipe)
        params = [q for layer in layers for q in layer.parameters()]
        actions = (3 if sched.startswith("zb") else 2) * m

        def step(pipe=pipe, params=params):
            _zero(params)
            pipe.step(x, y)
        rows[f"pipetrain {sched}, p=1, now"] = (step, True, actions)
        rows[f"pipetrain {sched}, p=1, before"] = (step, False, actions)

    st = Stage(0, _layers())
    xb, gb = torch.randn(1, 16), torch.randn(1, 16)

    def fwd_all():
        st.begin_run(Meter())
        for k in range(m):
            st.forward(k, xb)

    def whole():
        fwd_all()
        t = time.perf_counter()
        for k in range(m):
            st.backward(k, gb)
        d = time.perf_counter() - t
        st.end_run(commit=False)
        return d

    def split():
        fwd_all()
        t = time.perf_counter()
        for k in range(m):
            st.backward_input(k, gb)
        for k in range(m):
            st.backward_weight(k)
        d = time.perf_counter() - t
        st.end_run(commit=False)
        return d

    times = {k: [] for k in rows}
    cpu = {k: [] for k in rows}
    bw = {(name, on): [] for name in ("B", "I+W") for on in (True, False)}
    try:
        for r in range(rounds + 2):
            for name, (fn, on, _) in rows.items():
                with _levers(True if on is None else on):
                    t, c = time.perf_counter(), time.process_time()
                    fn()
                    d, dc = time.perf_counter() - t, time.process_time() - c
                if r >= 2:
                    times[name].append(d)
                    cpu[name].append(dc)
            for on in (True, False):
                with _levers(on):
                    b, iw = whole(), split()
                if r >= 2:
                    bw[("B", on)].append(b)
                    bw[("I+W", on)].append(iw)
    finally:
        for pipe in pipes:
            pipe.close()
        torch.set_num_threads(old_threads)
    print(f"8 x (Linear(16,16)+GELU), m = {m} one-row micro-batches, 1 torch thread, "
          f"{rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    print(f"{'row':34s} {'step ms':>9s} {'/ plain':>8s} {'us/action':>10s} | "
          f"{'CPU ms':>7s} {'/ plain':>8s} {'us/action':>10s}  (us/action: over the plain loop)")

    def cols(series, name, actions):
        base = series["plain loop"]
        med = statistics.median(series[name])
        ratio = statistics.median([a / b for a, b in zip(series[name], base)])
        over = "" if not actions else \
            f"{statistics.median([(a - b) / actions * 1e6 for a, b in zip(series[name], base)]):.1f}"
        return f"{med * 1e3:9.2f} {ratio:8.3f} {over:>10s}"
    for name, (_, _, actions) in rows.items():
        print(f"{name:34s} {cols(times, name, actions)} | {cols(cpu, name, actions)[2:]}")
    for on in (True, False):
        ratio = statistics.median([a / b for a, b in zip(bw[("I+W", on)], bw[("B", on)])])
        print(f"stage alone, {'now   ' if on else 'before'}: B {statistics.median(bw[('B', on)]) / m * 1e6:7.1f} us, "
              f"I + W {statistics.median(bw[('I+W', on)]) / m * 1e6:7.1f} us per micro-batch; "
              f"(I + W) / B = {ratio:.3f}")
    print()
    run_threads(quick, out)


def run_threads(quick: bool, out: pathlib.Path) -> None:
    """Thread borrowing (``pipetrain.dispatch.BORROW_THREADS``) on and off, side by side.

    The peers section's linear and blocks workloads at p = 2, m = 8, ``num_threads`` =
    cores // 2 per device: each schedule with and without letting a busy device take an
    idle device's intra-op threads, interleaved (every row once per round), medians of the
    per-round ratio on / off. Prints progress per workload (a full run takes ~1 minute).
    """
    from bench import peers
    from bench._peer_models import make_layers
    from pipetrain import dispatch

    cores = os.cpu_count() or 1
    per_device = max(1, cores // 2)
    rounds = 3 if quick else 9
    print(f"thread borrowing at p = 2, m = 8, {per_device} intra-op thread(s) per device on "
          f"{cores} cores, {rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"{'workload':8s} {'schedule':10s} {'off ms':>8s} {'on ms':>8s} {'on / off':>9s}")
    for wl in peers.workloads(quick)[:2]:
        x = torch.randn(wl.batch, wl.width)
        y = torch.randn(wl.batch, wl.width)
        rows = {}
        for sched in ("gpipe", "1f1b", "zb-h1"):
            layers = make_layers(wl)
            pipe = pipetrain.Pipeline(layers, 2, schedule=sched, num_microbatches=wl.microbatches,
                                      loss_fn=nn.functional.mse_loss, num_threads=per_device)
            rows[sched] = (pipe, [q for layer in layers for q in layer.parameters()])
        times = {(s, on): [] for s in rows for on in (False, True)}
        old = dispatch.BORROW_THREADS
        try:
            for r in range(rounds + 1):
                for sched, (pipe, params) in rows.items():
                    for on in (False, True):
                        dispatch.BORROW_THREADS = on
                        _zero(params)
                        t = time.perf_counter()
                        pipe.step(x, y)
                        if r:          # round 0 warms up
                            times[(sched, on)].append(time.perf_counter() - t)
        finally:
            dispatch.BORROW_THREADS = old
            for pipe, _ in rows.values():
                pipe.close()
        for sched in rows:
            off, on = times[(sched, False)], times[(sched, True)]
            ratio = statistics.median([a / b for a, b in zip(on, off)])
            print(f"{wl.name:8s} {sched:10s} {statistics.median(off) * 1e3:8.1f} "
                  f"{statistics.median(on) * 1e3:8.1f} {ratio:9.3f}", flush=True)
