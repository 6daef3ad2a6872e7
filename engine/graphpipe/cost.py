"""The cost model shared by the partitioner, the stage graph and every reference search.

A *stage* is a convex set of operators run on ``d`` devices (data parallel inside the stage:
each device takes ``1/d`` of every micro-batch and holds all of the stage's weights). With
W = sum of forward + backward seconds per sample, P = parameter bytes, A = activation bytes
per sample of its operators, and ``f`` = its in-flight micro-batches (in GraphPipe's DAG 1F1B:
the number of stages on its longest path to the sink, itself included):

* time per sample (seconds)::

      t(d) = W / d + sync(d),   sync(d) = 2 (d - 1) / d * P / (allreduce_bandwidth * B * m)

  (a ring all-reduce of the gradients once per step of ``m`` micro-batches of ``B`` samples,
  not overlapped; 0 when ``d == 1`` or the bandwidth is infinite);
* memory per device (bytes)::

      mem(d, f) = (1 + optimizer_factor) * P + f * A * B / d

The pipeline's steady-state time per sample is the largest stage time (every stage works on
its own devices at the same time). ``step_time_per_sample`` adds the fill/drain bubble of a
pipeline of depth D: ``max_s t_s * (m + D - 1) / m``.

Activation transfers between stages are not charged (a copy stream overlaps them); the
affine transfer model is left for the runtime work.
"""

from __future__ import annotations

import dataclasses

from typing import Optional

import numpy as np

__all__ = ["CostModel"]


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Parameters of the cost model (see the module docstring for the formulas).

    Attributes:
        microbatch_size: B, samples per micro-batch (the whole stage's, before splitting
            over its data-parallel devices).
        num_microbatches: m, micro-batches per optimizer step.
        optimizer_factor: optimizer-state bytes per parameter byte (Adam, fp32: 2).
        memory_limit: bytes per device, or None for unlimited.
        allreduce_bandwidth: bytes per second of the gradient all-reduce inside a
            data-parallel stage, or None for free synchronisation.
        max_replicas: most devices one stage may use (1 = pure pipeline, no data
            parallelism); None = no limit.

    With no memory limit and free synchronisation, one stage over all devices is optimal
    (data parallelism costs nothing); set ``max_replicas`` or a bandwidth to make
    pipelining worth it.
    """

    microbatch_size: float = 1.0
    num_microbatches: int = 8
    optimizer_factor: float = 2.0
    memory_limit: Optional[float] = None
    allreduce_bandwidth: Optional[float] = None
    max_replicas: Optional[int] = None

    def __post_init__(self):
        if not self.microbatch_size > 0 or not self.num_microbatches >= 1:
            raise ValueError("microbatch_size must be > 0 and num_microbatches >= 1")
        if self.memory_limit is not None and not self.memory_limit > 0:
            raise ValueError(f"memory_limit must be > 0 bytes, got {self.memory_limit}")
        if self.allreduce_bandwidth is not None and not self.allreduce_bandwidth > 0:
            raise ValueError("allreduce_bandwidth must be > 0 bytes/s")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ValueError("max_replicas must be >= 1")

    @property
    def sync_per_byte(self) -> float:
        """Seconds per parameter byte per sample of one all-reduce 'unit' (s in the docs)."""
        if self.allreduce_bandwidth is None:
            return 0.0
        return 1.0 / (self.allreduce_bandwidth * self.microbatch_size * self.num_microbatches)

    # --- scalar forms (the reference for the vectorised ones) ----------------------------
    def stage_time(self, work: float, params: float, devices: int) -> float:
        """Seconds per sample of a stage with ``work`` s/sample and ``params`` bytes."""
        d = devices
        return work / d + 2.0 * (d - 1) / d * params * self.sync_per_byte

    def stage_memory(self, params: float, activation: float, devices: int,
                     inflight: int) -> float:
        """Bytes per device of a stage holding ``inflight`` micro-batches."""
        return ((1.0 + self.optimizer_factor) * params
                + inflight * activation * self.microbatch_size / devices)

    def fits(self, params: float, activation: float, devices: int, inflight: int) -> bool:
        if self.memory_limit is None:
            return True
        # Relative slack so that a configuration exactly at the limit fits in every code path.
        return (self.stage_memory(params, activation, devices, inflight)
                <= self.memory_limit * (1 + 1e-12))

    def step_time_per_sample(self, bottleneck: float, depth: int) -> float:
        """Time per sample over a whole step including pipeline fill and drain."""
        m = self.num_microbatches
        return bottleneck * (m + depth - 1) / m

    # --- vectorised: fewest devices for a stage ----------------------------------------
    def min_devices(self, work, params, activation, inflight, target: float,
                    num_devices: int):
        """Fewest devices d (1 <= d <= cap) with ``t(d) <= target`` and the stage fitting
        in memory with ``inflight`` micro-batches; ``inf`` where none does. Broadcasts.

        t(d) <= T  <=>  W - 2sP <= d (T - 2sP)   (multiply t(d) by d), so
        d_time = 1 if W <= T, else ceil((W - 2sP) / (T - 2sP)) when T > 2sP, else none;
        memory: (1+k) P + f A B / d <= M  <=>  d >= f A B / (M - (1+k) P), M > (1+k) P.
        """
        work, params, activation, inflight = (
            a.astype(float) for a in np.broadcast_arrays(work, params, activation, inflight))
        cap = min(num_devices, self.max_replicas or num_devices)
        tol = 1e-12 * max(target, 1e-300)
        two_sp = 2.0 * self.sync_per_byte * params
        with np.errstate(divide="ignore", invalid="ignore"):
            num = work - two_sp
            den = target - two_sp
            d_time = np.where(work <= target + tol, 1.0,
                              np.where(den > 0, np.ceil(num / den - 1e-9), np.inf))
            if self.memory_limit is None:
                d = d_time
            else:
                free = self.memory_limit * (1 + 1e-12) - (1.0 + self.optimizer_factor) * params
                need = inflight * activation * self.microbatch_size
                d_mem = np.where(free > 0, np.maximum(1.0, np.ceil(need / free - 1e-9)),
                                 np.inf)
                d = np.maximum(d_time, d_mem)
        d = np.maximum(d, 1.0)
        return np.where(d <= cap, d, np.inf)


