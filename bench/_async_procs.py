"""The ``async_throughput`` section's multi-process row: an asynchronous schedule and 1F1B
trained with ``Pipeline.train()`` across p = 2 gloo processes (one rank per pipeline device,
:mod:`pipetrain.distributed`), side by side in the same two processes.

The parent spawns the two workers (127.0.0.1, a free port); each builds the process group
once, then runs ``reps`` interleaved repeats of every schedule (so a burst of load from other
processes lands on all of them) and sends back, per schedule and repeat, its wall time of
the ``train()`` call, its measured bubble (idle of its own row between its first and last
compute action, per executor run) and its busy seconds (F / B / U actions). The parent waits
with a timeout and kills the workers on any failure, so no process outlives the bench.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import statistics
import time
import traceback
from typing import Any, Dict, List


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _opt(name: str):
    import torch
    if name == "spectrain":
        return lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)
    return lambda ps: torch.optim.Adam(ps, lr=1e-4)


def _measure(name: str, p: int, m: int, T: int, d: int, batch: int) -> Dict[str, float]:
    import torch
    from bench.training import make_model, mse
    from pipetrain.pipeline import Pipeline

    pipe = Pipeline(make_model(d, 2 * p), num_devices=p, schedule=name, num_microbatches=m,
                    loss_fn=mse, optimizer=_opt(name), num_threads=1, timeout=120)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, d, generator=g), torch.randn(batch, d, generator=g))
            for _ in range(T)]
    try:
        list(pipe.train(data[:2]))              # warm-up (allocator, first messages)
        bubbles, busy = [], 0.0
        t0 = time.perf_counter()
        for _ in pipe.train(data):
            if name in ("gpipe", "1f1b"):       # one run per mini-batch: its stats are per step
                bubbles.append(pipe.stats().bubble_ratio)
                busy += sum(pipe.stats().busy_s)
        wall = time.perf_counter() - t0
        if not bubbles:
            bubbles, busy = [pipe.stats().bubble_ratio], sum(pipe.stats().busy_s)
        return {"wall": wall, "bubble": sum(bubbles) / len(bubbles), "busy": busy}
    finally:
        pipe.close()


def _worker(rank: int, world: int, port: int, cfg: dict, results: Any) -> None:
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        out: Dict[str, List[dict]] = {name: [] for name in cfg["schedules"]}
        try:
            for rep in range(cfg["reps"]):
                for name in cfg["schedules"]:
                    out[name].append(_measure(name, world, cfg["m"], cfg["T"], cfg["d"],
                                              cfg["batch"]))
                if rank == 0:
                    print(f"  2 processes: repeat {rep + 1}/{cfg['reps']} done", flush=True)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001  reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_pair(cfg: dict, timeout: float = 600.0) -> Dict[str, dict]:
    """Run ``cfg`` (schedules, reps, m, T, d, batch) on 2 gloo processes; per schedule the
    medians over repeats of: samples/s (the slower rank's wall), its ratio to the first
    schedule's in the same repeat, bubble (mean of the ranks'), busy fraction (sum of busy over
    2 x the slower wall)."""
    world = 2
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, results), daemon=True)
             for r in range(world)]
    try:
        for pr in procs:
            pr.start()
        got: List[Any] = [None] * world
        deadline = time.monotonic() + timeout
        for _ in range(world):
            rank, ok, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            if not ok:
                raise RuntimeError(f"rank {rank} of the 2-process row failed:\n{value}")
            got[rank] = value
    except queue.Empty:
        raise TimeoutError(f"the 2-process row did not finish in {timeout:.0f} s") from None
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
        for pr in procs:
            pr.join(timeout=5)
            if pr.is_alive():
                pr.kill()
                pr.join(timeout=5)
    rows = {}
    samples = cfg["T"] * cfg["batch"]
    base_walls = None
    for name in cfg["schedules"]:
        reps = list(zip(*(g[name] for g in got)))          # per repeat: (rank 0, rank 1)
        walls = [max(r["wall"] for r in rep) for rep in reps]
        base_walls = base_walls or walls                    # the first schedule's
        rows[name] = {
            "samples_per_s": statistics.median(samples / w for w in walls),
            # Ratio per repeat (the two ran back to back), then the median.
            "vs_first": statistics.median(b / w for b, w in zip(base_walls, walls)),
            "per_repeat": [samples / w for w in walls],
            "bubble": statistics.median(sum(r["bubble"] for r in rep) / world for rep in reps),
            "busy_fraction": statistics.median(sum(r["busy"] for r in rep) / (world * w)
                                               for rep, w in zip(reps, walls)),
        }
    return rows
