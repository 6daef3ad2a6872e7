"""The memory model: predicted peak bytes per device for one configuration.

Per device d (all its stages, interleaved chunks included)::

    weights     versions(d) * P_d            (P_d: parameter bytes of d's layers)
    gradients   grad_factor * P_d
    optimizer   optimizer_factor * P_d
    activations inflight(d) * S_d(b)         without re-materialization
                inflight(d) * X_d(b) + S_d(b) with it (stage inputs kept; one micro-batch's
                                              activations rebuilt during its backward)

S_d(b) is the largest per-micro-batch stash of d's stages (:meth:`CostTable.stash`), X_d(b)
their largest input, ``inflight(d)`` the schedule's peak in-flight count (from the schedule's
order, or the table's closed form). This is what :class:`~pipetrain.Pipeline` meters on CPU
(``peak_stash_bytes``) plus the parameter state; the transient gradient buffers of a running
backward and the W-pending bytes of split backwards are not in it (both are one micro-batch of
one layer, small next to the stash). Units: bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence

from pipetrain.planner.costs import CostTable

__all__ = ["Memory", "stage_ranges", "device_memory", "order_activations"]


@dataclasses.dataclass(frozen=True)
class Memory:
    """Predicted bytes on one device, by part; ``total`` their sum."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    transient: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient

    @property
    def metered(self) -> float:
        """What ``Pipeline`` meters on CPU plus the parameters and gradients: everything but
        the optimizer state and the re-materialization transient."""
        return self.weights + self.gradients + self.activations


def stage_ranges(balance: Sequence[int]) -> List[tuple]:
    """``[3, 2]`` -> ``[(0, 2), (3, 4)]``: first and last layer of each stage."""
    out, start = [], 0
    for n in balance:
        out.append((start, start + n - 1))
        start += n
    return out


def order_activations(schedule: Any, table: CostTable, balance: Sequence[int], b: float,
                      recompute: bool) -> List[float]:
    """Per device, the peak activation bytes held, walking the device's actions in the
    schedule's order: an F of stage k adds stage k's per-micro-batch stash (its input with
    re-materialization), its B (or I, for a split backward: W needs only small tensors)
    removes it. Exact where stages of one device differ in size (interleaved chunks of
    unequal layers), where ``inflight x largest stash`` is an upper bound. Bytes."""
    from pipetrain.schedules import _KINDS, Kind
    held_by = [table.input_bytes[first](b) if recompute else table.stash(first, last, b)
               for first, last in stage_ranges(balance)]
    fwd, bwd = _KINDS.index(Kind.F), (_KINDS.index(Kind.B), _KINDS.index(Kind.I))
    out = []
    for d in range(schedule.num_devices):
        held = peak = 0.0
        # The core's raw (kind, stage, ...) rows: no Action objects (a 64-device order has
        # hundreds of thousands of actions).
        for kind, stage, *_ in schedule._core.actions(d):
            if kind == fwd:
                held += held_by[stage]
                if held > peak:
                    peak = held
            elif kind in bwd:
                held -= held_by[stage]
        out.append(peak)
    return out


def device_memory(table: CostTable, balance: Sequence[int], p: int, b: float,
                  inflight: Sequence[int], versions: Sequence[int],
                  recompute: bool, activations: Optional[Sequence[float]] = None
                  ) -> List[Memory]:
    """Per device, the :class:`Memory` of a configuration (stage k on device k % p).

    Args:
        table: per-layer costs; balance: layers per (virtual) stage; p: devices;
        b: micro-batch size; inflight / versions: per device; recompute: re-materialization;
        activations: per device, exact activation bytes from the order
            (:func:`order_activations`) instead of ``inflight x largest stash``.
    """
    ranges = stage_ranges(balance)
    params = [0.0] * p
    stash = [0.0] * p
    inputs = [0.0] * p
    for k, (first, last) in enumerate(ranges):
        d = k % p
        params[d] += sum(table.param_bytes[first:last + 1])
        stash[d] = max(stash[d], table.stash(first, last, b))
        inputs[d] = max(inputs[d], table.input_bytes[first](b))
    out = []
    for d in range(p):
        act = activations[d] if activations is not None else \
            inflight[d] * (inputs[d] if recompute else stash[d])
        out.append(Memory(versions[d] * params[d], table.grad_factor * params[d],
                          table.optimizer_factor * params[d], act,
                          stash[d] if recompute else 0.0))
    return out
