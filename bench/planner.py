"""Planner (issue 12): search speed, GPT planning tables next to the papers, and on CPU the
planner's predictions next to measured Pipeline runs.

Sections:
1. search speed: 64 devices x 128 layers, every schedule (async included), median of runs;
2. planning table: GPT 2.5B and 8.3B (Megatron-LM shapes) on 64 V100s of 16 / 32 GB, NVLink
   within a pipeline, InfiniBand for the all-reduce, next to what ../shared/PAPERS.md records;
3. predicted vs measured on CPU: step time (median makespan of several steps) and peak
   memory (weights + gradients + metered stash, from the second step) for configurations of
   two models; the machine's load average is printed beside (2 shared cores: noisy);
4. grid: every runnable configuration of one model measured; where the plan's choice lands.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

import pipetrain
from pipetrain.planner import CostTable, Network, measure_costs
from pipetrain.planner.result import fmt_bytes
from pipetrain.planner.search import evaluate


def _load() -> str:
    return "load average %.2f %.2f %.2f on %d cores" % (*os.getloadavg(), os.cpu_count() or 0)


def search_speed(quick: bool) -> float:
    table = CostTable.transformer(127, 2048, 1024, 16)     # + the embedding: 128 layers
    net = Network.cluster(150, 12.5)
    times, plan = [], None
    for _ in range(3 if quick else 5):
        t0 = time.perf_counter()
        plan = pipetrain.plan(costs=table, devices=64, memory_per_device="80GB",
                              batch_size=2048, allow_async=True, network=net)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"search, 64 devices x 128 layers, all {len(pipetrain.planner.MODELS)} schedules: "
          f"median {med * 1e3:.0f} ms (min {min(times) * 1e3:.0f}), "
          f"{len(plan.candidates)} configurations, {plan.simulations} simulations; {_load()}")
    print(plan)
    return med


# (name, layers, hidden, heads): Megatron-LM's shapes (seq 1024, vocab 51200).
GPTS = [("GPT 2.5B", 54, 1920, 20), ("GPT 8.3B", 72, 3072, 32)]
# What ../shared/PAPERS.md records about configurations (it gives no per-model (w, p, b)).
PAPER = {
    "2bw": "2BW planner: p equal stages x w replicas, largest b that fits; GPT 3.8B on 64 "
           "V100s: up to 20x over Megatron tensor-MP",
    "sync": "PipeDream-Flush / GPipe: same bubble (p-1)/(m+p-1); flush every mini-batch",
}


def paper_table(quick: bool) -> None:
    net = Network.cluster(150, 12.5)    # NVLink ~150 GB/s, InfiniBand EDR 100 Gb/s
    batch = 512
    print(f"\nGPT planning table: 64 V100 (125 TFLOP/s fp16 at 40 %), batch {batch}, seq 1024,"
          " Adam mixed precision (16 bytes/param)")
    print(f"{'model':10s} {'memory':>6s} {'async':>5s}  {'chosen':48s} {'step':>8s} "
          f"{'samples/s':>9s} {'peak':>10s}  paper")
    for name, L, h, a in GPTS:
        table = CostTable.transformer(L, h, 1024, a, vocab=51200, device_flops=125e12,
                                      efficiency=0.4, name=name)
        for gb in (16, 32):
            for async_ in (False, True):
                try:
                    plan = pipetrain.plan(costs=table, devices=64, memory_per_device=gb * 1e9,
                                          batch_size=batch, allow_async=async_, network=net)
                except ValueError as err:
                    print(f"{name:10s} {gb:4d}GB {str(async_):>5s}  {str(err)[:120]}")
                    continue
                print(f"{name:10s} {gb:4d}GB {str(async_):>5s}  {plan.best.label():48s} "
                      f"{plan.step_time:7.2f}s {plan.samples_per_s:9.1f} "
                      f"{fmt_bytes(plan.peak_memory):>10s}  "
                      f"{PAPER['2bw' if async_ else 'sync'][:60]}")


def _mlp(n=8, d=768):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)])


class _Block(nn.Module):
    """A pre-norm transformer block on (batch, seq, d)."""

    def __init__(self, d=128, heads=4):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                                norm_first=True)

    def forward(self, x):
        return self.layer(x)


def _transformer(n=6, d=128):
    torch.manual_seed(0)
    return nn.Sequential(*[_Block(d) for _ in range(n)])


def _measure_all(model, x, y, cands, steps):
    """Per candidate (median makespan s, peak bytes = weights + grads + metered stash). The
    pipelines run round-robin, one step each per round, so a change of the machine's load
    hits every configuration alike; the first round is a warm-up (a stage's first forward
    runs on a copy of its input, which the meter counts: pipetrain.stage)."""
    pipes = [pipetrain.Pipeline(model, c.p, schedule=c.schedule, num_microbatches=c.m,
                                balance=c.balance, loss_fn=nn.functional.mse_loss,
                                num_threads=1, checkpoint="always" if c.recompute else "never",
                                **({"num_chunks": c.v} if c.v > 1 else {})) for c in cands]
    spans = [[] for _ in cands]
    peaks = [[] for _ in cands]
    try:
        for r in range(steps + 1):
            for i, pipe in enumerate(pipes):
                pipe.step(x, y)
                if r:
                    st = pipe.stats()
                    spans[i].append(st.makespan_s)
                    peaks[i].append(st.peak_stash_bytes)
        out = []
        for c, pipe, sp, pk in zip(cands, pipes, spans, peaks):
            params = [0] * c.p
            for k, stage in enumerate(pipe.stages):
                params[k % c.p] += sum(q.nbytes for q in stage.parameters())
            stash = [max(col) for col in zip(*pk)]
            out.append((statistics.median(sp), max(2 * pr + s for pr, s in zip(params, stash))))
        return out
    finally:
        for pipe in pipes:
            pipe.close()
        for q in model.parameters():
            q.grad = None


MODELS_CPU = {
    "mlp 8x768": (_mlp, lambda: (torch.randn(64, 768), torch.randn(64, 768))),
    "transformer 6x128": (_transformer, lambda: (torch.randn(32, 64, 128), torch.randn(32, 64, 128))),
}
CONFIGS = [  # (p, b, schedule, v, recompute)
    (1, 16, "1f1b", 1, False), (2, 8, "1f1b", 1, False), (2, 16, "gpipe", 1, False),
    (2, 8, "zb-h1", 1, False), (2, 16, "1f1b", 1, True), (2, 8, "interleaved-1f1b", 2, False),
]


def predicted_vs_measured(quick: bool) -> list:
    print(f"\npredicted vs measured on CPU (Pipeline, 1 thread per device; {_load()})")
    print(f"{'model':18s} {'configuration':40s} {'pred ms':>8s} {'meas ms':>8s} {'err':>6s} "
          f"{'pred mem':>10s} {'meas mem':>10s} {'err':>6s}")
    rows = []
    steps = 3 if quick else 7
    configs = CONFIGS[:4] if quick else CONFIGS
    for name, (make, data) in MODELS_CPU.items():
        model = make()
        x, y = data()
        n = x.shape[0]
        table = measure_costs(model, (x, y), nn.functional.mse_loss,
                              sizes=[n // 8, n // 4, n // 2], repeats=3 if quick else 5)
        cands = []
        for p, b, sched, v, rc in configs:
            b = min(b, n // 2) if name.startswith("transformer") else b
            m = n // b
            if v > 1 and m % p:
                continue
            cands.append(evaluate(table, Network(), p=p, b=b, m=m, schedule=sched, v=v,
                                  recompute=rc))
        for c, (t, mem) in zip(cands, _measure_all(model, x, y, cands, steps)):
            pm = max(q.metered for q in c.memory)
            rows.append((t, c.step_time, mem, pm))
            print(f"{name:18s} {c.label():40s} {c.step_time * 1e3:8.2f} {t * 1e3:8.2f} "
                  f"{100 * (c.step_time / t - 1):+5.0f}% {fmt_bytes(pm):>10s} "
                  f"{fmt_bytes(mem):>10s} {100 * (pm / mem - 1):+5.1f}%")
    ok_t = sum(abs(pt / t - 1) <= 0.15 for t, pt, _, _ in rows)
    ok_m = sum(abs(pm / mm - 1) <= 0.10 for _, _, mm, pm in rows)
    print(f"within 15 % (time): {ok_t}/{len(rows)}; within 10 % (memory): {ok_m}/{len(rows)}; "
          f"{_load()}")
    return rows


def grid(quick: bool) -> None:
    model = _mlp()
    x, y = torch.randn(64, 768), torch.randn(64, 768)
    fn = nn.functional.mse_loss
    sizes = [8, 16, 32] if quick else [4, 8, 16, 32]
    plan = pipetrain.plan(model, sample=(x, y), loss_fn=fn, devices=2, widths=[1],
                          memory_per_device="1GB", batch_size=64, micro_batch_sizes=sizes,
                          measure_sizes=[8, 16, 32], repeats=3,
                          recompute=(False,) if quick else (False, True))
    print(f"\ngrid on CPU: mlp 8x768, 2 devices, batch 64 ({_load()})")
    print(plan)
    runnable, seen = [], set()
    for c in plan.candidates:
        if c.fits and c.model.runnable and c.label() not in seen:
            seen.add(c.label())
            runnable.append(c)
    results = _measure_all(model, x, y, runnable, 3 if quick else 5)
    measured = sorted(((t, c) for c, (t, _) in zip(runnable, results)), key=lambda r: r[0])
    chosen = next(t for t, c in measured if c is plan.best)
    fastest = measured[0]
    print(f"{len(measured)} configurations measured; fastest {fastest[1].label()} "
          f"{fastest[0] * 1e3:.2f} ms; plan's choice {plan.best.label()} {chosen * 1e3:.2f} ms "
          f"(+{100 * (chosen / fastest[0] - 1):.1f} %, rank "
          f"{[c for _, c in measured].index(plan.best) + 1}/{len(measured)})")


def run(quick: bool, out) -> None:
    search_speed(quick)
    paper_table(quick)
    predicted_vs_measured(quick)
    grid(quick)
