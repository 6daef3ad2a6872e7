"""Executor overhead per action: the C++ executor against a plain single-threaded Python loop.

Both run the same 1F1B plan (p stages, m micro-batches, from ``schedules.build``) with an
empty stage compute, so everything measured is scheduling: for the executor, dependency
checks and waits across threads, taking and dropping the GIL, and one Python call per action;
for the loop, one Python call per action in a precomputed topological order (the floor any
Python-driven schedule pays). Medians over repeats, measured in the same process.
"""

from __future__ import annotations

import pathlib
import statistics
import time

from pipetrain import schedules
from pipetrain.executor import Executor


def one_f_one_b(p: int, m: int) -> list[list[tuple[str, list[tuple[int, int]]]]]:
    """The 1F1B plan the pipeline runs: labels and dependencies from the schedule IR."""
    sched = schedules.build("1f1b", num_stages=p, num_microbatches=m)
    return [[(str(a), list(deps)) for a, deps in zip(sched.actions(d), sched.dependencies(d))]
            for d in range(sched.num_devices)]


def topological_order(plan) -> list[tuple[int, int]]:
    """A valid sequential order: repeatedly issue the next action of any device whose deps ran."""
    nxt = [0] * len(plan)
    done: set[tuple[int, int]] = set()
    order = []
    total = sum(len(row) for row in plan)
    while len(order) < total:
        progressed = False
        for d, row in enumerate(plan):
            while nxt[d] < len(row) and all(dep in done for dep in row[nxt[d]][1]):
                done.add((d, nxt[d]))
                order.append((d, nxt[d]))
                nxt[d] += 1
                progressed = True
        if not progressed:
            raise ValueError("plan has a cycle")
    return order


def _noop(device: int, index: int) -> None:
    pass


def _median_us_per_action(fn, n_actions: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3 / n_actions


def measure(p: int, m: int, repeats: int) -> dict[str, float]:
    plan = one_f_one_b(p, m)
    n = sum(len(row) for row in plan)
    order = topological_order(plan)

    def loop():
        for d, i in order:
            _noop(d, i)

    with Executor(p) as ex:
        compiled = ex.compile(plan)
        ex.run(compiled, _noop)  # start the threads
        executor = _median_us_per_action(lambda: ex.run(compiled, _noop), n, repeats)
        uncompiled = _median_us_per_action(lambda: ex.run(plan, _noop), n, repeats)
    with Executor(1) as ex1:  # same calls, one thread: no cross-thread waits at all
        flat = ex1.compile([[(f"0F{k}", []) for k in range(n)]])
        ex1.run(flat, _noop)
        single = _median_us_per_action(lambda: ex1.run(flat, _noop), n, repeats)
    python = _median_us_per_action(loop, n, repeats * 5)
    return {"actions": n, "executor": executor, "uncompiled": uncompiled, "single": single,
            "python": python}


def run(quick: bool, out: pathlib.Path) -> None:
    configs = [(4, 16)] if quick else [(2, 64), (4, 64), (8, 32)]
    repeats = 7 if quick else 31
    print("executor overhead per action, empty stage compute (1F1B plan; median of "
          f"{repeats} runs; µs/action)")
    header = (f"{'p':>3} {'m':>4} {'actions':>8} {'executor':>9} {'+validate':>10} "
              f"{'1 thread':>9} {'py loop':>8} {'ratio':>7}")
    print(header)
    print("-" * len(header))
    lines = [header]
    for p, m in configs:
        r = measure(p, m, repeats)
        line = (f"{p:>3} {m:>4} {r['actions']:>8} {r['executor']:>9.2f} {r['uncompiled']:>10.2f} "
                f"{r['single']:>9.2f} {r['python']:>8.3f} {r['executor'] / r['python']:>7.1f}")
        print(line)
        lines.append(line)
    print("executor: compiled plan, p threads; +validate: plan list converted and validated each "
          "run; 1 thread: same number of actions on one device (no cross-thread waits); "
          "py loop: single-threaded loop in topological order; ratio: executor / py loop. "
          "Target: executor <= 2 µs/action.")
    (out / "executor_overhead.txt").write_text("\n".join(lines) + "\n")
