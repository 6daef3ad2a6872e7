"""Workloads of the ``peers`` section: the models, the data and the stage splits.

Kept apart from ``bench/peers.py`` because the benchmark's worker processes (spawned, see
``bench/_peer_procs.py``) import it: every process builds the same model from the same seed
and takes its own stages, so all rows train identical weights on identical data.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

from bench.training import Block  # the pre-norm residual MLP block, one definition

# Where wall clocks come from: CLOCK_MONOTONIC is one clock for every process on the machine,
# so action times recorded in the worker processes line up with each other.
now_ns = time.monotonic_ns


@dataclass(frozen=True)
class Workload:
    """One model at one size. ``layers`` is the number of splittable units (a unit is a
    Linear+GELU pair or one residual block), a multiple of 4 so that the 2-stage split and
    the 4-stage split (interleaved schedules: 2 stages per process) are both even."""

    name: str
    kind: str          # "linear" (Linear+GELU units) or "block" (pre-norm residual MLP)
    width: int
    layers: int
    batch: int
    microbatches: int
    rounds: int        # interleaved measuring rounds (every row once per round)
    steps: int         # measured steps per row per round
    warmup: int = 2
    budget_s: float = 120.0   # stop adding rounds past this (at least 2 rounds run)

    def describe(self) -> str:
        unit = {"linear": "Linear+GELU", "block": "pre-norm residual MLP block (4x)"}[self.kind]
        return (f"{self.layers} x {unit}, width {self.width}, batch {self.batch}, "
                f"m = {self.microbatches} (micro-batch {self.batch // self.microbatches} rows)")


def make_layers(wl: Workload) -> List[nn.Module]:
    """The model as a list of units, identical in every process (fixed seed)."""
    torch.manual_seed(0)
    if wl.kind == "linear":
        return [nn.Sequential(nn.Linear(wl.width, wl.width), nn.GELU()) for _ in range(wl.layers)]
    if wl.kind == "block":
        return [Block(wl.width) for _ in range(wl.layers)]
    raise ValueError(f"unknown workload kind {wl.kind!r}")


def balance(wl: Workload, parts: int) -> List[int]:
    """Contiguous equal split into ``parts`` stages (units per stage)."""
    if wl.layers % parts:
        raise ValueError(f"{wl.layers} units do not split evenly into {parts} stages")
    return [wl.layers // parts] * parts


def split(layers: List[nn.Module], sizes: List[int]) -> List[nn.Sequential]:
    out, i = [], 0
    for n in sizes:
        out.append(nn.Sequential(*layers[i:i + n]))
        i += n
    return out


def data(wl: Workload) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(wl.batch, wl.width, generator=g),
            torch.randn(wl.batch, wl.width, generator=g))


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss of every row: a mean over the micro-batch, so that the mean over equal
    micro-batches equals the unsplit model's loss."""
    return nn.functional.mse_loss(out, target)


def optimizer(params) -> torch.optim.Optimizer:
    """The optimizer of every training row (``bench/peers_training.py``): SGD with momentum,
    a small step so that weights stay put over a benchmark's few hundred mini-batches."""
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9)


def stage_work(stage: nn.Module, x_mbs, y_mbs, out_grads, last: bool) -> None:
    """One stage's share of a step with no pipeline around it: forward + backward of each
    micro-batch. A later stage also computes its input gradient (the pipeline must send it
    back); the last stage starts its backward from the loss, the others from a given output
    gradient. This is the floor's unit of work."""
    for i, x in enumerate(x_mbs):
        if last:
            (mse(stage(x), y_mbs[i]) / len(x_mbs)).backward()
        else:
            stage(x).backward(out_grads[i])


def floor_inputs(wl: Workload, stages: List[nn.Module]):
    """Per stage: the micro-batch inputs it would receive (stage 0 the data, later stages
    activations that need an input gradient), targets, and output gradients."""
    x, y = data(wl)
    m = wl.microbatches
    x_mbs, y_mbs = list(x.chunk(m)), list(y.chunk(m))
    per_stage = []
    with torch.no_grad():
        acts = x_mbs
        for k, st in enumerate(stages):
            ins = acts if k == 0 else [a.clone().requires_grad_(True) for a in acts]
            acts = [st(a) for a in acts]
            grads = [torch.randn_like(a) * 1e-3 for a in acts]
            per_stage.append((ins, y_mbs, grads, k == len(stages) - 1))
    return per_stage


# ---- peak memory: resident set size, per process ------------------------------------------

def _malloc_trim() -> None:
    """Give freed heap pages back to the OS, so a step's peak RSS shows what it allocates
    rather than what an earlier row left in malloc's free lists."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakRSS:
    """Peak resident memory growth over a block of steps, in bytes (Linux: the VmHWM high-water
    mark, reset through /proc/self/clear_refs). None where /proc is not available."""

    def __enter__(self) -> "PeakRSS":
        self.delta = None
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _status_kb("VmRSS")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self._base is not None:
            self.delta = max(0, _status_kb("VmHWM") - self._base) * 1024


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
