"""What one run of one stage keeps: each micro-batch's stash, memory meters, staged gradients.

A :class:`~pipetrain.stage.Stage` creates a :class:`StageRun` per run (``begin_run``); every
action picks the run up when it starts, so an action of an abandoned run (a failed step, a
thread stuck past the timeout) only ever touches that run's objects. :func:`accumulate` adds
parameter gradients either into a run's staging dict (committed to ``p.grad`` on success) or
straight into ``p.grad`` (a stage used on its own).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pipetrain import checkpoint as ckpt
from pipetrain.microbatch import Spec, flatten

__all__ = ["Meter", "Saved", "StageRun", "tensor_bytes", "accumulate", "saved_bytes_key"]


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
        # Called twice per action (stage share and device): plain compares, no max() calls.
        b = self.bytes = self.bytes + nbytes
        if b > self.peak_bytes:
            self.peak_bytes = b
        if count:
            c = self.count = self.count + count
            if c > self.peak_count:
                self.peak_count = c
        if w_bytes:
            w = self.w_bytes = self.w_bytes + w_bytes
            if w > self.peak_w_bytes:
                self.peak_w_bytes = w

    def reset_peaks(self) -> None:
        self.peak_bytes, self.peak_count, self.peak_w_bytes = self.bytes, self.count, self.w_bytes


class Saved:
    """What a stage keeps for one micro-batch between its forward and its (last) backward.

    A plain class with ``__slots__`` (not a dataclass): one is made per forward, and the
    dataclass ``__init__`` with its list factories cost ~2 us of the per-action budget. The
    list fields default to one shared empty tuple and are only ever replaced, never mutated.
    """

    __slots__ = ("inputs", "spec", "target", "target_leaves", "target_spec", "weight", "rng",
                 "outputs", "nbytes", "w_nbytes", "inflight", "recomputed", "w_full",
                 "w_edges", "w_fallback")

    def __init__(self, inputs: List[Any], spec: Spec, target: Any = None,
                 weight: float = 1.0) -> None:
        self.inputs = inputs          # boundary-input leaves (detached; floats may require grad)
        self.spec = spec              # nesting of the inputs
        self.target = target          # sink: this micro-batch's target
        self.target_leaves: Sequence[Any] = ()   # its leaves (those needing grad marked)
        self.target_spec: Optional[Spec] = None
        self.weight = weight          # sink: loss weight (micro-batch size / batch size)
        self.rng: Optional[ckpt.RNGState] = None  # re-materialized: RNG state at forward start
        self.outputs: Optional[List[Any]] = None  # output leaves carrying the graph (None until built)
        self.nbytes = 0               # bytes counted in the stash (until B or I)
        self.w_nbytes = 0             # bytes counted as waiting for W (after I)
        self.inflight = True          # between F and the end of B / I
        self.recomputed: Sequence[Any] = ()      # tensors saved by a recomputation
        # Between I and W: the deferred weight-gradient work.
        self.w_full: Optional[Tuple[list, list]] = None    # (tensors, grads): W is the whole backward
        self.w_edges: Sequence[Any] = ()  # W items: (outputs, grads, params), LinearW, NormW
        self.w_fallback: Optional[Tuple[list, list, list]] = None  # (tensors, grads, params)


class StageRun:
    """The state of one run on one stage (see :mod:`pipetrain.stage`)."""

    __slots__ = ("stash", "own", "meter", "staged", "target_grads", "saved_bytes", "uses_rng",
                 "_dense")

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
        # (params, their staged gradients in that order) once every one of ``params`` has a
        # dense staged gradient: later accumulations are one _foreach_add_ with no per-
        # parameter dict look-ups (see accumulate). None until then, and after a commit.
        self._dense: Optional[Tuple[Sequence[nn.Parameter], List[torch.Tensor]]] = None

    def accumulate(self, params: Sequence[nn.Parameter],
                   grads: Sequence[Optional[torch.Tensor]], cache: bool = False) -> None:
        """Add ``grads`` to ``params``' gradients of this run (the staging dict, or ``p.grad``
        for a stage used on its own): :func:`accumulate`, with a fast path for the common
        case of a stage's every micro-batch reaching the same parameters (``cache``: the
        caller passes the same ``params`` list object each time, e.g. the stage's own)."""
        staged = self.staged
        if staged is None:
            accumulate(None, params, grads)
            return
        dense = self._dense
        if dense is not None and dense[0] is params and len(grads) == len(params):
            for g in grads:
                if g is None or g.is_sparse:
                    break
            else:
                torch._foreach_add_(dense[1], list(grads))
                return
        accumulate(staged, params, grads)
        if cache:
            dst = [staged.get(p) for p in params]
            if dst and all(g is not None and not g.is_sparse for g in dst):
                self._dense = (params, dst)

    def forget_dense(self) -> None:
        """The staging dict was emptied or handed out (its entries may be replaced): the fast
        path must look its tensors up again."""
        self._dense = None

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


def saved_bytes_key(leaves: Sequence[Any], target: Any) -> Any:
    """What decides the bytes a forward saves, for the per-run cache: shape, dtype, device
    and requires-grad of each input leaf and of the target (plain values by identity of
    type); grad and autocast state are fixed for a run's actions."""
    tl = (target,) if type(target) is torch.Tensor else flatten(target)[0] if target is not None else ()
    return (*map(_leaf_key, leaves), None, *map(_leaf_key, tl))


def _leaf_key(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return (t.shape, t.dtype, t.device, t.requires_grad)
    return type(t)
