"""Bench section ``p2p_batching``: does ``batch_isend_irecv`` help point-to-point on gloo?

Two gloo processes on 127.0.0.1 (one torch thread each) bounce one *action's* worth of
boundary values: ``k`` small tensors (a tuple between stages: hidden state, mask, positions
...), rank 0 -> rank 1 and back, for ``n`` round trips per measurement. Ways to move them:

- ``loop``: one ``isend`` / ``irecv`` per tensor, then wait for all (k messages);
- ``batched``: the same k operations in one ``batch_isend_irecv`` call;
- ``packed``: the tensors copied into one buffer, one message (pipetrain's data plane);
- ``wire``: pipetrain's message as it is now: an int64[5] header on a control group and the
  packed buffer on a data group (two gloo groups, as on CPU since the NCCL-ready split).

Rounds interleave the ways (alternating order); the table shows the median time per round
trip and its ratio to ``loop`` (median over rounds of per-round ratios, so load from other
processes on shared cores hits all ways alike). Writes ``p2p_batching.json`` to ``--out``.
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

WAYS = ["loop", "batched", "packed", "wire"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, k: int, numel: int, n: int, rounds: int, q) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    td = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=td)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=td)
    ctrl = dist.new_group(backend="gloo", timeout=td)
    data = dist.new_group(backend="gloo", timeout=td)
    peer = 1 - rank
    ts = [torch.randn(numel) for _ in range(k)]
    rs = [torch.empty(numel) for _ in range(k)]
    packed = torch.empty(k * numel)
    got = torch.empty(k * numel)
    header, rheader = torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)

    def send(way: str) -> None:
        if way == "loop":
            for w in [dist.isend(t, peer, tag=i) for i, t in enumerate(ts)]:
                w.wait()
        elif way == "batched":
            ops = [dist.P2POp(dist.isend, t, peer, tag=i) for i, t in enumerate(ts)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        elif way == "packed":
            torch.cat(ts, out=packed)
            dist.isend(packed, peer, tag=0).wait()
        else:
            torch.cat(ts, out=packed)
            header[0] += 1
            works = [dist.isend(header, peer, tag=0, group=ctrl), dist.isend(packed, peer, tag=2, group=data)]
            for w in works:
                w.wait()

    def recv(way: str) -> None:
        if way == "loop":
            for w in [dist.irecv(t, peer, tag=i) for i, t in enumerate(rs)]:
                w.wait()
        elif way == "batched":
            ops = [dist.P2POp(dist.irecv, t, peer, tag=i) for i, t in enumerate(rs)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        elif way == "packed":
            dist.irecv(got, peer, tag=0).wait()
            list(got.split(numel))
        else:
            hw = dist.irecv(rheader, peer, tag=0, group=ctrl)
            dw = dist.irecv(got, peer, tag=2, group=data)   # posted ahead, as the wire does
            hw.wait()
            rheader.tolist()
            dw.wait()
            list(got.split(numel))

    results: Dict[str, List[float]] = {w: [] for w in WAYS}
    for r in range(rounds + 1):                      # round 0: warm-up
        order = WAYS if r % 2 else WAYS[::-1]
        for way in order:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                if rank == 0:
                    send(way)
                    recv(way)
                else:
                    recv(way)
                    send(way)
            if r:
                results[way].append((time.perf_counter() - t0) / n)
    if rank == 0:
        q.put(results)
    dist.destroy_process_group()


def measure(k: int, numel: int, n: int, rounds: int) -> Dict[str, List[float]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, port, k, numel, n, rounds, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        res = q.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return res


def run(quick: bool, out: pathlib.Path) -> None:
    cases = [(8, 64), (8, 16384), (2, 64)] if not quick else [(8, 64)]
    n, rounds = (50, 5) if quick else (100, 9)
    table = []
    print(f"{'k x numel':>12} " + " ".join(f"{w + ' us':>11}" for w in WAYS)
          + "   " + " ".join(f"{w + '/loop':>13}" for w in WAYS[1:]))
    for k, numel in cases:
        print(f"  measuring k={k} tensors of {numel} floats ({rounds} rounds) ...", flush=True)
        res = measure(k, numel, n, rounds)
        med = {w: statistics.median(v) for w, v in res.items()}
        ratio = {w: statistics.median([a / b for a, b in zip(res[w], res["loop"])]) for w in WAYS[1:]}
        print(f"{f'{k} x {numel}':>12} " + " ".join(f"{med[w] * 1e6:>11.1f}" for w in WAYS)
              + "   " + " ".join(f"{ratio[w]:>13.2f}" for w in WAYS[1:]))
        table.append({"k": k, "numel": numel, "round_trip_s": med, "ratio_to_loop": ratio})
    out.mkdir(parents=True, exist_ok=True)
    (out / "p2p_batching.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/out"))
    a = ap.parse_args()
    run(a.quick, a.out)
