"""Bench section ``graph_partition``: GraphPipe's partitioner on synthetic operator graphs.

1. Search time of :func:`pipetrain.graphpipe.partition` for 100 / 200 / 1000 operators onto
   8 / 64 devices (a random multi-branch SP graph; median of repeats; CPU seconds of this
   process and wall seconds -- on a shared machine the wall time includes waiting for a
   core), for pure pipelines and with data-parallel stages + a memory limit; beside it the
   SP dynamic programme alone (``refine=False``) and how much the refinement (refine.py, one
   device per stage, up to 200 operators) gains in simulated time per sample.
2. Multi-branch models -- 4 branches x 8 layers (the paper's multi-modal transformer shape)
   and a DLRM-like graph (7 dense towers x 4 layers + 7 embedding lookups, interaction, top
   MLP) -- GraphPipe's predicted time per sample and depth against the best *chain*: the
   same operators in topological order cut into contiguous stages, same cost model.
   Two settings: pure pipelines (one device per stage) and data-parallel stages (all-reduce
   at 10 GB/s) under a 1.5 GiB per-device memory limit. ``+fill`` is the time per sample
   with the fill/drain bubble of a depth-D pipeline, ``max_s t_s (m + D - 1) / m``;
   ``found by`` says which search gave GraphPipe's answer (``sp``: the SP dynamic programme,
   ``chain``: the chain candidate it also tries, kept only when strictly better).
Draws the 4-branch stage graph into ``out/``. Quick mode (pipeline timings, 8 and 16
devices): < 20 s.
"""

from __future__ import annotations

import pathlib
import random
import statistics
import time

from pipetrain.graphpipe import CostModel, OpGraph, partition
from pipetrain.graphpipe.partitioner import REFINE_MAX_OPS

MB = 1 << 20


def random_sp_graph(num_ops: int, seed: int = 0, max_branches: int = 4) -> OpGraph:
    """A chain of blocks; each block is one operator or a parallel region of 2..max_branches
    branches of 1..4 operators (costs uniform in [1, 3] ms fwd, 2x bwd, random sizes)."""
    rng = random.Random(seed)
    g = OpGraph()

    def op(inputs):
        w = rng.uniform(1e-3, 3e-3)
        name = f"op{len(g)}"
        g.add(name, w, 2 * w, rng.uniform(0.5, 2) * MB, rng.uniform(1, 8) * MB, inputs=inputs)
        return name

    last = op([])
    while len(g) < num_ops:
        left = num_ops - len(g)
        if left >= 4 and rng.random() < 0.4:
            ends = []
            for _ in range(rng.randint(2, max_branches)):
                prev = last
                for _ in range(rng.randint(1, 4)):
                    if len(g) >= num_ops - 1:
                        break
                    prev = op([prev])
                ends.append(prev)
            ends = [e for e in ends if e != last] or [last]
            last = op(ends)
        else:
            last = op([last])
    return g


def branches_graph(num_branches=4, layers=8, layer_ms=(4.0, 3.0, 2.0, 1.0)) -> OpGraph:
    """Multi-modal transformer shape: one input, num_branches encoders of `layers` layers
    (branch b: layer_ms[b] ms forward per sample), a fusion op and a head."""
    g = OpGraph()
    g.add("input", 0.1e-3, 0.1e-3, 1 * MB, 0)
    ends = []
    for b in range(num_branches):
        prev = "input"
        for i in range(layers):
            f = layer_ms[b % len(layer_ms)] * 1e-3
            g.add(f"enc{b}.{i}", f, 2 * f, 4 * MB, 48 * MB, inputs=[prev])
            prev = f"enc{b}.{i}"
        ends.append(prev)
    g.add("fusion", 1e-3, 2e-3, 4 * MB, 16 * MB, inputs=ends)
    g.add("head", 1e-3, 2e-3, 1 * MB, 16 * MB, inputs=["fusion"])
    return g


def dlrm_graph(dense=7, depth=4, embeddings=7) -> OpGraph:
    """DLRM-like: dense towers of `depth` FF layers (width 4096) and embedding lookups in
    parallel, then feature interaction and a 3-layer top MLP."""
    g = OpGraph()
    g.add("input", 0.05e-3, 0.05e-3, 0.5 * MB, 0)
    ends = []
    for t in range(dense):
        prev = "input"
        for i in range(depth):
            g.add(f"dense{t}.{i}", 2e-3, 4e-3, 2 * MB, 64 * MB, inputs=[prev])
            prev = f"dense{t}.{i}"
        ends.append(prev)
    for e in range(embeddings):
        g.add(f"emb{e}", 0.5e-3, 1e-3, 0.5 * MB, 256 * MB, inputs=["input"])
        ends.append(f"emb{e}")
    g.add("interact", 1e-3, 2e-3, 4 * MB, 0, inputs=ends)
    prev = "interact"
    for i in range(3):
        g.add(f"top{i}", 2e-3, 4e-3, 2 * MB, 64 * MB, inputs=[prev])
        prev = f"top{i}"
    return g


def _time(fn, repeats):
    """Median (CPU seconds, wall seconds) of `repeats` calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def run(quick: bool, out: pathlib.Path) -> None:
    cost = CostModel(microbatch_size=8, num_microbatches=32, max_replicas=1)
    dp_mem = CostModel(microbatch_size=8, num_microbatches=32, memory_limit=3e9,
                       allreduce_bandwidth=10e9)
    print("search time (random multi-branch SP graphs; 'dp cpu s': the SP dynamic programme "
          "alone, refine=False; the refinement runs for one device per stage up to "
          f"{REFINE_MAX_OPS} operators):")
    print(f"  {'ops':>5} {'devices':>7} {'setting':<22} {'cpu s':>7} {'wall s':>7} "
          f"{'dp cpu s':>8} {'stages':>6} {'depth':>5} {'sim gain':>8}")
    for n, p in [(100, 8), (100, 64), (200, 64), (1000, 8), (1000, 64)]:
        g = random_sp_graph(n, seed=n)
        for sname, c in (("pipeline", cost), ("data-par + 3 GB limit", dp_mem)):
            if sname != "pipeline" and (p < 64 or quick or n == 200):
                continue  # 3 GB per device holds these models on 64 devices only
            cpu, wall = _time(lambda: partition(g, p, c), 1 if quick else 3)
            dp_cpu, _ = _time(lambda: partition(g, p, c, refine=False), 1 if quick else 3)
            sg = partition(g, p, c)
            dp = partition(g, p, c, refine=False)
            gain = (f"{dp.simulated_time_per_sample / sg.simulated_time_per_sample:>7.3f}x"
                    if c.max_replicas == 1 else f"{'-':>8}")
            print(f"  {n:>5} {p:>7} {sname:<22} {cpu:>7.3f} {wall:>7.3f} {dp_cpu:>8.3f} "
                  f"{sg.num_stages:>6} {sg.depth:>5} {gain}", flush=True)
    print("  (sim gain: simulated time per sample of the DP's plan / the refined plan's)")

    print("\nGraphPipe vs the best chain (same cost model; ms per sample; 'sim': the DAG "
          "1F1B / 1F1B schedule in the simulator, pipeline setting only):")
    print(f"  {'graph':<12} {'setting':<14} {'dev':>3} | {'graphpipe':>9} {'+fill':>8} "
          f"{'sim':>8} {'depth':>5} | {'chain':>9} {'+fill':>8} {'sim':>8} {'depth':>5} | "
          f"{'speed-up':>8} {'sim':>6} found by")
    settings = [("pipeline", cost),
                ("mem 1.5 GiB", CostModel(microbatch_size=8, num_microbatches=32,
                                          memory_limit=1.5 * 1024 * MB,  # 1.5 GiB
                                          allreduce_bandwidth=10e9))]
    devices = [8, 16] if quick else [8, 16, 32]
    for gname, g in [("4-branch", branches_graph()), ("dlrm-like", dlrm_graph())]:
        for sname, c in settings:
            for p in devices:
                try:
                    gp = partition(g, p, c)
                    ch = partition(g.as_chain(), p, c, chain_candidate=False)
                except ValueError as err:
                    print(f"  {gname:<12} {sname:<14} {p:>3} | {err}")
                    continue
                if c.max_replicas == 1:
                    gs, cs = gp.simulated_time_per_sample, ch.simulated_time_per_sample
                    gsim, csim = f"{gs * 1e3:>8.3f}", f"{cs * 1e3:>8.3f}"
                    ratio = f"{cs / gs:>5.2f}x"
                else:
                    gsim, csim, ratio = f"{'-':>8}", f"{'-':>8}", f"{'-':>6}"
                print(f"  {gname:<12} {sname:<14} {p:>3} | {gp.time_per_sample * 1e3:>9.3f} "
                      f"{gp.step_time_per_sample * 1e3:>8.3f} {gsim} {gp.depth:>5} | "
                      f"{ch.time_per_sample * 1e3:>9.3f} {ch.step_time_per_sample * 1e3:>8.3f} "
                      f"{csim} {ch.depth:>5} | "
                      f"{ch.step_time_per_sample / gp.step_time_per_sample:>7.2f}x "
                      f"{ratio} {gp.search}", flush=True)
    sg = partition(branches_graph(), 8, cost)
    sg.plot(out / "graph_partition_4branch.png")
    print(f"\n{sg}")
