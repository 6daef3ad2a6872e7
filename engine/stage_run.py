"""What one run of one stage keeps: each micro-batch's stash, memory meters, staged gradients.

A :class:`~pipetrain.stage.Stage` creates a :class:`StageRun` per run (``begin_run``); every
action picks the run up when it starts, so an action of an abandoned run (a failed step, a
thread stuck past the timeout) only ever touches that run's objects. :func:`accumulate` adds
parameter gradients either into a run's staging dict (committed to ``p.grad`` on success) or
straight into ``p.grad`` (a stage used on its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pipetrain import checkpoint as ckpt
from pipetrain.microbatch import Spec

__all__ = ["Meter", "Saved", "StageRun", "tensor_bytes", "accumulate"]


class Meter:
    """What a device keeps between forward and backward, now and at peak.

    ``bytes`` / ``count``: boundary inputs (and, without re-materialization, the saved
    activations of the graph) of the micro-batches in flight — from the start of F to the end
    of B, or of I for a split backward (the simulator's definition of in flight).
    ``w_bytes``: what split backwards keep from I until their W. Stages sharing a device
    (interleaved) share one meter; all are touched only by that device's thread.
    """

    def __init__(self) -> None:
        self.bytes = self.count = self.w_bytes = 0
        self.peak_bytes = self.peak_count = self.peak_w_bytes = 0

    def add(self, nbytes: int, count: int = 0, w_bytes: int = 0) -> None:
        self.bytes += nbytes
        self.count += count
        self.w_bytes += w_bytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        self.peak_count = max(self.peak_count, self.count)
        self.peak_w_bytes = max(self.peak_w_bytes, self.w_bytes)

    def reset_peaks(self) -> None:
        self.peak_bytes, self.peak_count, self.peak_w_bytes = self.bytes, self.count, self.w_bytes


@dataclass
class Saved:
    """What a stage keeps for one micro-batch between its forward and its (last) backward."""

    inputs: List[Any]                     # boundary-input leaves (detached; floats may require grad)
    spec: Spec                            # nesting of the inputs
    target: Any = None                    # sink: this micro-batch's target
    target_leaves: List[Any] = field(default_factory=list)  # its leaves (those needing grad marked)
    target_spec: Optional[Spec] = None
    weight: float = 1.0                   # sink: loss weight (micro-batch size / batch size)
    rng: Optional[ckpt.RNGState] = None   # re-materialized: RNG state at forward start
    outputs: Optional[List[Any]] = None   # output leaves carrying the graph (None until built)
    nbytes: int = 0                       # bytes counted in the stash (until B or I)
    w_nbytes: int = 0                     # bytes counted as waiting for W (after I)
    inflight: bool = True                 # between F and the end of B / I
    recomputed: List[Any] = field(default_factory=list)  # tensors saved by a recomputation
    # Between I and W: the deferred weight-gradient work.
    w_full: Optional[Tuple[list, list]] = None        # (tensors, grads): W is the whole backward
    w_edges: List[Tuple[list, list, list]] = field(default_factory=list)  # (outputs, grads, params)
    w_fallback: Optional[Tuple[list, list, list]] = None  # (tensors, grads, params)


class StageRun:
    """The state of one run on one stage (see :mod:`pipetrain.stage`)."""

    __slots__ = ("stash", "own", "meter", "staged", "target_grads", "saved_bytes", "uses_rng")

    def __init__(self, meter: Meter, staged: bool, uses_rng: Optional[bool] = None,
                 measure_each: bool = False) -> None:
        self.stash: Dict[int, Saved] = {}
        self.own = Meter()          # this stage's share of the device meter
        self.meter = meter          # the device's meter (shared by its stages in this run)
        # param -> gradient accumulated in this run; None: accumulate into p.grad directly.
        self.staged: Optional[Dict[nn.Parameter, torch.Tensor]] = {} if staged else None
        self.target_grads: Dict[int, Any] = {}   # sink: mb -> gradient of a target needing one
        # A run (staged) measures what a forward saves once per input signature and reuses
        # the count: watching every saved tensor through a Python hook costs ~1.5 us each,
        # 10-15 % of a fine-grained step. Used on its own, a stage measures every forward.
        self.saved_bytes: Optional[Dict[Any, int]] = {} if staged and not measure_each else None
        # Whether the stage draws random numbers, fixed for the run (None: ask each time).
        self.uses_rng = uses_rng

    def add(self, nbytes: int, count: int = 0, w_bytes: int = 0) -> None:
        self.own.add(nbytes, count, w_bytes)
        self.meter.add(nbytes, count, w_bytes)


def tensor_bytes(tensors: Sequence[Any], exclude: Optional[set] = None) -> int:
    """Bytes of distinct tensor data among ``tensors`` (views counted by their own extent)."""
    seen = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.nbytes)
        if key in seen or (exclude and t.data_ptr() in exclude):
            continue
        seen.add(key)
        total += t.nbytes
    return total


def accumulate(into: Optional[Dict[nn.Parameter, torch.Tensor]], params: Sequence[nn.Parameter],
                grads: Sequence[Optional[torch.Tensor]]) -> None:
    """Add ``grads`` to ``params``' gradients: into the staging dict, or ``p.grad`` if None.

    The first gradient is kept as is (no copy, as autograd's AccumulateGrad does), in the
    parameter's own layout, so optimizers and flat buffers see the strides they expect.
    """
    dst: List[torch.Tensor] = []
    src: List[torch.Tensor] = []
    for p, g in zip(params, grads):
        if g is None:
            continue
        current = p.grad if into is None else into.get(p)
        if current is None:
            if not g.is_sparse and g.stride() != p.stride():
                g = torch.empty_like(p).copy_(g)
            if into is None:
                p.grad = g
            else:
                into[p] = g
        elif current.is_sparse or g.is_sparse:
            current.add_(g)
        else:
            dst.append(current)
            src.append(g)
    if dst:
        # One fused call instead of one add_ per parameter: at the fine grain (16 small
        # parameters per stage) the per-call Python cost exceeded the additions.
        torch._foreach_add_(dst, src)
