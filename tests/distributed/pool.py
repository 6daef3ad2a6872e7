"""A pool of worker processes reused across tests: each task runs on the first ``world`` workers
inside a fresh gloo process group (127.0.0.1, a free port), so one module pays the start of
the processes (importing torch) once.

Every task is bounded: ``run`` raises after ``timeout`` seconds, and the pool's processes
are killed when the pool closes (also when a test failed).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, List


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, tasks: Any, results: Any) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import importlib

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            return
        module, fn, world, port, kwargs = task
        try:
            store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                                  timeout=__import__("datetime").timedelta(seconds=30))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=__import__("datetime").timedelta(seconds=30))
            try:
                out = getattr(importlib.import_module(module), fn)(**kwargs)
            finally:
                dist.destroy_process_group()
            results.put((rank, True, out))
        except BaseException:  # noqa: BLE001  reported to the test
            results.put((rank, False, traceback.format_exc()))


class Pool:
    """``size`` spawned workers; ``run(module, fn, world, **kwargs)`` -> per-rank results."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.procs = [ctx.Process(target=_worker, args=(r, self.tasks[r], self.results), daemon=True)
                      for r in range(size)]
        for pr in self.procs:
            pr.start()

    def run(self, module: str, fn: str, world: int, timeout: float = 60.0, **kwargs: Any) -> List[Any]:
        port = free_port()
        for r in range(world):
            self.tasks[r].put((module, fn, world, port, kwargs))
        out: List[Any] = [None] * world
        errors = []
        for _ in range(world):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{fn}{kwargs} did not finish in {timeout} s") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise AssertionError("\n".join(errors))
        return out

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put_nowait(None)
            except Exception:  # noqa: BLE001
                pass
        for pr in self.procs:
            pr.join(timeout=2)
            if pr.is_alive():
                pr.kill()
                pr.join(timeout=5)


def module_pool(size: int) -> Any:
    """A module-scoped pytest fixture ``pool``: one :class:`Pool` of ``size`` workers for the
    whole test module, killed at its end (also on failure). Use ``pool = module_pool(4)``."""
    import pytest

    @pytest.fixture(scope="module")
    def pool() -> Any:
        pl = Pool(size)
        yield pl
        pl.close()
    return pool
