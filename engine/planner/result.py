"""The planner's answer: the chosen configuration, its predictions, and why the others lost.

A :class:`Candidate` is one configuration (p, w, b, m, schedule, v, recompute, balance) with
its predicted memory per device and, when simulated, its step time. A :class:`TrainingPlan`
is what :func:`pipetrain.plan` returns: the best candidate, the runner-ups, and
:meth:`TrainingPlan.pipeline` to build it. Units: seconds, bytes, samples per second.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List, Optional

from pipetrain.planner.memory import Memory

__all__ = ["Candidate", "TrainingPlan", "fmt_bytes"]


def fmt_bytes(n: float) -> str:
    """Bytes in the largest unit that keeps the number >= 1 (GB = 1e9)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


@dataclasses.dataclass(eq=False)
class Candidate:
    """One configuration and what the planner predicted for it.

    Attributes:
        p, w: pipeline depth and data-parallel width (w * p = devices); b: micro-batch size;
        m: micro-batches per replica per step (w * m * b = batch size); schedule, v: schedule
        name and chunks per device; recompute: re-materialization; balance: layers per stage.
        memory: per device, predicted :class:`Memory`; limit: the memory limit (bytes).
        bound: lower bound on the step time (s); step_time: simulated step time (s), None
        when pruned or over the limit; extra: all-reduce + update seconds in it.
        latency: seconds of every cross-device transfer; wake: seconds a device idle for
        another's output pays to start (CPU threads; :mod:`pipetrain.planner.wake`).
        status: "simulated", "pruned" (bound above the best) or "over" (does not fit).
    """

    p: int
    w: int
    b: int
    m: int
    schedule: str
    v: int
    recompute: bool
    balance: List[int]
    memory: List[Memory]
    bound: float
    extra: float
    latency: float
    costs: tuple
    model: Any
    limit: float
    step_time: Optional[float] = None
    status: str = "new"
    wake: float = 0.0

    @property
    def peak_memory(self) -> float:
        """Largest predicted total over devices (bytes)."""
        return max(mem.total for mem in self.memory)

    @property
    def fits(self) -> bool:
        return self.peak_memory <= self.limit

    @property
    def batch_size(self) -> int:
        return self.w * self.m * self.b

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / self.step_time if self.step_time else 0.0

    def label(self) -> str:
        sched = self.schedule + (f"(v={self.v})" if self.v > 1 else "")
        return (f"p={self.p} w={self.w} b={self.b} m={self.m} {sched}"
                f"{' +recompute' if self.recompute else ''}")

    def why(self, best: "Candidate") -> str:
        """Why this candidate lost to ``best``."""
        if not self.fits:
            return f"does not fit: {fmt_bytes(self.peak_memory)} > {fmt_bytes(self.limit)}"
        if self.step_time is not None and best.step_time and self.step_time < best.step_time:
            from pipetrain.planner.search import handoffs_per_step
            return (f"predicted faster: {fmt_time(self.step_time)} "
                    f"({100 * (self.step_time / best.step_time - 1):+.1f} %), but with "
                    f"{handoffs_per_step(self)} hand-offs per step to the choice's "
                    f"{handoffs_per_step(best)}: within the hand-off tolerance")
        if self.step_time is None:
            return (f"slower: at least {fmt_time(self.bound)} "
                    f"(bound, +{100 * (self.bound / best.step_time - 1):.0f} %)")
        return (f"slower: {fmt_time(self.step_time)} "
                f"(+{100 * (self.step_time / best.step_time - 1):.1f} %)")


class TrainingPlan:
    """The configuration the planner chose (see :func:`pipetrain.plan`).

    Attributes:
        best: the chosen :class:`Candidate`; candidates: all, best first.
        step_time: predicted seconds per training step (one global mini-batch).
        samples_per_s: predicted throughput, batch_size / step_time.
        peak_memory: predicted peak bytes on the fullest device.
        num_devices, depth (p), width (w), micro_batch_size (b), num_microbatches (m),
        schedule, num_chunks (v), recompute, balance: the configuration.
        search_s: seconds the search took; simulations: simulator calls it made.
        optimizer: the optimizer factory :meth:`pipeline` passes on (None: none).
        graph: the model is an operator graph (GraphPipe), not a sequence of layers;
        op_times: then its per-operator times, which :meth:`pipeline` passes on.
    """

    def __init__(self, candidates: List[Candidate], *, table: Any, model: Any = None,
                 loss_fn: Optional[Callable] = None, search_s: float = 0.0,
                 simulations: int = 0, memory_limit: float = math.inf,
                 optimizer: Optional[Callable] = None, graph: bool = False,
                 op_times: Optional[dict] = None) -> None:
        self.candidates = candidates
        self.best = candidates[0]
        self.table, self._model, self._loss_fn = table, model, loss_fn
        self.search_s, self.simulations, self.memory_limit = search_s, simulations, memory_limit
        self.optimizer, self.graph, self.op_times = optimizer, graph, op_times
        c = self.best
        self.step_time, self.samples_per_s, self.peak_memory = c.step_time, c.samples_per_s, c.peak_memory
        self.num_devices, self.depth, self.width = c.p * c.w, c.p, c.w
        self.micro_batch_size, self.num_microbatches = c.b, c.m
        self.schedule, self.num_chunks, self.recompute, self.balance = c.schedule, c.v, c.recompute, c.balance

    def runner_ups(self, n: int = 5) -> List[Candidate]:
        """The next ``n`` candidates: the fastest others that fit, then the ones that do not
        fit and would be fastest by their bound (what memory cost)."""
        fit = [c for c in self.candidates[1:] if c.fits]
        over = sorted((c for c in self.candidates if not c.fits), key=lambda c: c.bound)
        k = max(1, n - 2) if over else n
        return fit[:k] + over[:n - len(fit[:k])]

    def pipeline(self, *, one_replica: bool = False, **kwargs: Any) -> Any:
        """The :class:`~pipetrain.Pipeline` of this plan: in one process when w = 1, this
        rank's part under torchrun with w * p ranks, one replica of the w with
        ``one_replica=True`` (else ValueError when w > 1 in one process); see
        :mod:`pipetrain.planner.build`. Keyword arguments go to ``Pipeline`` (e.g.
        ``num_threads``, ``optimizer``)."""
        from pipetrain.planner.build import build_pipeline
        return build_pipeline(self, one_replica=one_replica, **kwargs)

    def __str__(self) -> str:
        c = self.best
        mem = max(c.memory, key=lambda x: x.total)
        lines = [
            f"plan for {self.num_devices} devices, batch {c.batch_size}, "
            f"{fmt_bytes(self.memory_limit)} per device ({self.table.name}):",
            f"  chosen: {c.label()}",
            f"    balance {c.balance if len(c.balance) <= 16 else str(c.balance[:16])[:-1] + ', ...]'}",
            f"    step {fmt_time(self.step_time)}, {self.samples_per_s:.1f} samples/s, "
            f"peak memory {fmt_bytes(self.peak_memory)} per device "
            f"(weights {fmt_bytes(mem.weights)}, grads {fmt_bytes(mem.gradients)}, "
            f"optimizer {fmt_bytes(mem.optimizer)}, activations "
            f"{fmt_bytes(mem.activations + mem.transient)})",
            f"  searched {len(self.candidates)} configurations, {self.simulations} simulations, "
            f"in {fmt_time(self.search_s)}",
            "  runner-ups:"]
        for r in self.runner_ups():
            lines.append(f"    {r.label():44s} {r.why(c)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"TrainingPlan({self.best.label()}, step_time={self.step_time:.4g}, "
                f"peak_memory={self.peak_memory:.4g})")
