"""Bench section ``shm_wire``: the cost of one boundary message between two processes of one
host, pipetrain's shared-memory wire against its gloo wire.

Two processes (one torch thread each) bounce a value through pipetrain's own stream
objects, exactly as the multi-process runner uses them: rank 0 sends on an edge's value
stream, rank 1 takes it and sends it back on the gradient stream, ``n`` round trips per run
(``begin_run`` per run, the gloo sends' works waited at the run's end, as ``finish_sends``
does). Ways:

- ``gloo``: :class:`pipetrain.distributed.wire.Stream` (header on a gloo control group,
  packed buffer on a gloo data group);
- ``shm``: :class:`pipetrain.distributed.shm_wire.ShmStream` (ring of slots in /dev/shm,
  FIFO wake-ups).

Values: one small tensor (64 floats: the per-message overhead), one micro-batch of the
``peers`` linear workload (64 x 512 floats, 128 KiB) and a tuple of 8 x 16384 floats.
Reported: microseconds per message (half a round trip) and shm / gloo, medians over
interleaved rounds (alternating order) of per-round values, so load from other processes
hits both ways alike. Writes ``shm_wire.json`` to ``--out``.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import pathlib
import socket
import statistics
import time
from typing import Dict, List

WAYS = ["gloo", "shm"]
CASES = [("64 floats", 1, 64), ("64 x 512 floats", 1, 64 * 512), ("8 x 16384 floats", 8, 16384)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Groups:
    """The two gloo groups a P2PGroups holds on CPU (control, data)."""

    def __init__(self, ctrl, data):
        self.ctrl, self._data = ctrl, data

    def data(self, edge):
        return self._data


def _worker(rank: int, port: int, n: int, rounds: int, q) -> None:
    import torch
    import torch.distributed as dist
    from pipetrain.distributed.shm_wire import ShmWire, host_id
    from pipetrain.distributed.wire import Board, Stream
    from pipetrain.mailbox import GRAD, VALUE

    torch.set_num_threads(1)
    td = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=td)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=td)
    groups = _Groups(dist.new_group(backend="gloo", timeout=td), dist.new_group(backend="gloo", timeout=td))
    peer = 1 - rank
    board = Board(store, "bench-shm")
    wire = ShmWire({0: host_id(), 1: host_id()}, "shm", store, board)
    streams = {}
    for way in WAYS:
        for direction in (VALUE, GRAD):
            sending = (direction == VALUE) == (rank == 0)
            if way == "gloo":
                st = Stream(0, direction, peer, torch.device("cpu"), "bench", groups)
            else:
                st = wire.make(0, direction, rank, peer, "bench", sending, 60.0, slots=8)
            streams[(way, direction)] = st
    wire.connect([st for (w, _), st in streams.items() if w == "shm"])
    out_dir, in_dir = (VALUE, GRAD) if rank == 0 else (GRAD, VALUE)

    def run(way: str, value, n: int) -> float:
        out, inc = streams[(way, out_dir)], streams[(way, in_dir)]
        out.begin_run(0)
        inc.begin_run(n)
        works = []
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            if rank == 0:
                works += out.send(value)[0]
                inc.post()
                value = inc.take(me=rank, what="bench")
            else:
                inc.post()
                value = inc.take(me=rank, what="bench")
                works += out.send(value)[0]
        for w in works:
            w.wait()
        return (time.perf_counter() - t0) / (2 * n)

    results: Dict[str, Dict[str, List[float]]] = {}
    for name, k, numel in CASES:
        value = tuple(torch.randn(numel) for _ in range(k)) if k > 1 else torch.randn(numel)
        res = results[name] = {w: [] for w in WAYS}
        for r in range(rounds + 1):               # round 0: warm-up
            for way in (WAYS if r % 2 else WAYS[::-1]):
                t = run(way, value, n)
                if r:
                    res[way].append(t)
    for (way, _), st in streams.items():
        if way == "shm":
            st.close()
    if rank == 0:
        q.put(results)
    dist.destroy_process_group()


def measure(n: int, rounds: int) -> Dict[str, Dict[str, List[float]]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, port, n, rounds, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return q.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


def run(quick: bool, out: pathlib.Path) -> None:
    n, rounds = (50, 3) if quick else (200, 9)
    print(f"  measuring {len(CASES)} values x {rounds} rounds of {n} round trips (2 processes) ...",
          flush=True)
    res = measure(n, rounds)
    print(f"{'value':>18} {'gloo us/msg':>12} {'shm us/msg':>11} {'shm/gloo':>9}")
    table = []
    for name, _, _ in CASES:
        r = res[name]
        med = {w: statistics.median(v) for w, v in r.items()}
        ratio = statistics.median([a / b for a, b in zip(r["shm"], r["gloo"])])
        print(f"{name:>18} {med['gloo'] * 1e6:>12.1f} {med['shm'] * 1e6:>11.1f} {ratio:>9.2f}")
        table.append({"value": name, "per_message_s": med, "shm_over_gloo": ratio})
    out.mkdir(parents=True, exist_ok=True)
    (out / "shm_wire.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/out"))
    a = ap.parse_args()
    run(a.quick, a.out)
