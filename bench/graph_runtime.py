"""Bench section ``graph_runtime``: GraphPipe end to end on two multi-branch models.

Models (scaled to CPU): ``multimodal`` -- 4 modality branches (a token projection and
attention + MLP blocks each, different input widths) concatenated into a head; ``dlrm`` --
a dense bottom MLP and 8 embedding towers (embedding lookup + MLP) concatenated into a top
MLP. Each runs through ``Pipeline`` with ``schedule="graphpipe"`` (partitioner on measured
per-operator costs, DAG 1F1B) and with the chain schedules ``1f1b`` and ``gpipe`` (the model
linearized into p contiguous stages balancing the same measured costs), on the same p
devices; ``graphpipe-dp`` is GraphPipe with the SP dynamic programme's plan alone (no
refinement against the simulated schedule: the partitioner before refine.py). Per row:

* ``sim op``: samples/s the simulator predicts from the per-operator costs measured on the
  sample (each stage's F / B = the sum of its operators'), before running;
* ``sim step``: the simulator on the per-stage action costs measured in the steps (what the
  schedule would reach with one core per device);
* ``meas``: measured samples/s (median step). This machine has 2 cores shared by every
  device thread, so measured speed-ups of concurrent branches are capped by the cores --
  the simulated columns are the schedule's effect;
* ``depth`` (stages on the longest path; a chain's is p), ``peak`` (simulated peak
  in-flight micro-batch activations per device) and ``part s`` (partitioner seconds).

Writes ``graph_<model>_stages.png`` (the stage graph) and ``graph_<model>_<schedule>.png``
(timelines of the last step) into ``out/``. Quick mode: small models, 2 steps, < 60 s.
"""

from __future__ import annotations

import pathlib
import statistics
import time

import torch
from torch import nn

import pipetrain
from pipetrain.graphpipe.build import measure
from pipetrain.graphpipe import partitioner
from pipetrain.graphpipe.capture import capture


class _Block(nn.Module):
    """Single-head self-attention + MLP, pre-norm residual (plain ops, fx-traceable)."""

    def __init__(self, d: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.scale = d ** -0.5

    def forward(self, x):
        q, k, v = self.qkv(self.n1(x)).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1)
        x = x + self.proj(att @ v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.n2(x))))


class MultiModal(nn.Module):
    """4 branches (input widths ``dims``, ``depth`` blocks each) -> mean-pool, concat, head."""

    def __init__(self, d: int = 64, depth: int = 2, dims=(32, 48, 64, 96), out: int = 16):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(k, d) for k in dims)
        self.towers = nn.ModuleList(nn.Sequential(*[_Block(d) for _ in range(depth)]) for _ in dims)
        self.head = nn.Sequential(nn.Linear(len(dims) * d, d), nn.GELU(), nn.Linear(d, out))

    def forward(self, a, b, c, e):
        feats = [t(emb(x)).mean(1) for x, emb, t in zip((a, b, c, e), self.embed, self.towers)]
        return self.head(torch.cat(feats, -1))


class DLRM(nn.Module):
    """Dense bottom MLP + ``tables`` embedding towers (lookup + MLP) -> concat -> top MLP."""

    def __init__(self, tables: int = 8, rows: int = 1000, d: int = 64, dense: int = 13,
                 hidden: int = 256):
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(dense, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.emb = nn.ModuleList(nn.Embedding(rows, d) for _ in range(tables))
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(),
                                                  nn.Linear(hidden, d)) for _ in range(tables))
        self.top = nn.Sequential(nn.Linear((tables + 1) * d, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.tables = tables

    def forward(self, dense, sparse):
        feats = [self.bottom(dense)]
        for i in range(self.tables):
            feats.append(self.towers[i](self.emb[i](sparse[:, i])))
        return self.top(torch.cat(feats, -1))


def _mse(out, y):
    return ((out - y) ** 2).mean()


def _data(name: str, batch: int, quick: bool):
    g = torch.Generator().manual_seed(0)
    if name == "multimodal":
        tokens = 8 if quick else 16
        xs = tuple(torch.randn(batch, tokens, k, generator=g) for k in (32, 48, 64, 96))
        return xs, torch.randn(batch, 16, generator=g)
    dense = torch.randn(batch, 13, generator=g)
    sparse = torch.randint(0, 1000, (batch, 8), generator=g)
    return (dense, sparse), torch.randn(batch, 1, generator=g)


def _row(name, model, schedule, p, m, xs, y, steps, out, times):
    dp_only = schedule == "graphpipe-dp"
    schedule = "graphpipe" if dp_only else schedule
    pipe = pipetrain.Pipeline(model, num_devices=p, schedule=schedule, num_microbatches=m,
                              loss_fn=_mse, timeout=600.0, op_times=times)
    try:
        saved = partitioner.REFINE_MAX_OPS
        if dp_only:  # the SP dynamic programme's plan alone (GraphPipe before refine.py)
            partitioner.REFINE_MAX_OPS = 0
        try:
            pipe.step(xs, y)        # the first step captures, measures and partitions
        finally:
            partitioner.REFINE_MAX_OPS = saved
        walls = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            pipe.step(xs, y)
            walls.append(time.perf_counter() - t0)
        built = pipe._graph_model.built
        batch = y.shape[0]
        mb = batch // m
        # simulator on the per-operator costs measured on the sample (per sample x mb size)
        fwd = [0.0] * pipe.num_stages
        bwd = [0.0] * pipe.num_stages
        for op, s in built.stage_of.items():
            f, b = built.times.get(op, (0.0, 0.0))
            fwd[s] += f * mb
            bwd[s] += b * mb
        sim_op = pipe.schedule.simulate(forward=fwd, backward=bwd)
        sim_step = pipe.simulate()
        graph = pipe.plan.graph
        longest = [0] * graph.num_stages
        for k in reversed(graph.topological_order()):
            longest[k] = 1 + max((longest[graph.edge(e).dst] for e in graph.stage(k).outputs),
                                 default=0)
        tag = "graphpipe-dp" if dp_only else schedule
        if not dp_only:
            pipe.plot_timeline(out / f"graph_{name}_{tag}.png")
        if schedule == "graphpipe" and not dp_only:
            pipe.plot_stage_graph(out / f"graph_{name}_stages.png")
        return {"schedule": tag, "stages": graph.num_stages, "depth": max(longest),
                "sim_op": batch / sim_op.makespan, "sim_step": batch / sim_step.makespan,
                "meas": batch / statistics.median(walls), "peak": list(sim_op.peak_inflight),
                "part_s": built.partition_s, "graph": str(pipe.stage_graph)}
    finally:
        pipe.close()


def run(quick: bool, out: pathlib.Path) -> None:
    torch.manual_seed(0)
    p, m = 4, 8
    batch = 32 if quick else 128
    steps = 2 if quick else 4
    models = {"multimodal": lambda: MultiModal(depth=1 if quick else 2),
              "dlrm": lambda: DLRM(hidden=128 if quick else 256)}
    print(f"p={p} devices, m={m} micro-batches, batch {batch}; samples/s; 2 shared CPU cores, "
          "one torch thread per device thread")
    for name, make in models.items():
        model = make()
        xs, y = _data(name, batch, quick)
        # Operator costs measured once (best of 5 on one micro-batch), so every schedule plans
        # and is simulated on the same numbers.
        sample = tuple(x[:batch // m] for x in xs)
        times = measure(capture(model), sample, repeats=5)[0]
        rows = []
        for s in ("graphpipe", "1f1b", "gpipe", "graphpipe-dp"):
            print(f"  {name}: {s} ...", flush=True)
            rows.append(_row(name, model, s, p, m, xs, y, steps, out, times))
        chains = rows[1:3]
        print(f"\n{name}: {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M params")
        print(rows[0]["graph"])
        print(f"{'schedule':>10} {'stages':>6} {'depth':>5} {'sim op':>9} {'sim step':>9} "
              f"{'meas':>8} {'part s':>7}  peak in-flight per device")
        for r in rows:
            print(f"{r['schedule']:>10} {r['stages']:>6} {r['depth']:>5} {r['sim_op']:>9.1f} "
                  f"{r['sim_step']:>9.1f} {r['meas']:>8.1f} {r['part_s']:>7.3f}  {r['peak']}")
        best = max(chains, key=lambda r: r["sim_op"])
        for g in (rows[0], rows[3]):
            print(f"{g['schedule']} / best chain ({best['schedule']}): simulated (op costs) "
                  f"{g['sim_op'] / best['sim_op']:.2f}x, simulated (step costs) "
                  f"{g['sim_step'] / max(r['sim_step'] for r in chains):.2f}x, measured "
                  f"{g['meas'] / max(r['meas'] for r in chains):.2f}x")
