"""Gradients across ranks: data-parallel all-reduce, tied weights, global norm clipping.

A run stages each stage's parameter gradients aside (:meth:`Stage.staged_grads`) and commits
them into ``p.grad`` at its end, so everything here works on this step's gradients only
(``p.grad`` may hold accumulated gradients of earlier steps, which are already reduced):

- data parallel: per stage, after its last backward of the step, the staged gradients are
  packed into buckets (one dtype each, at most ``BUCKET_BYTES``) and all-reduced (sum) over
  the stage's replicas asynchronously; the run waits for them at its end.
- tied weights: one Parameter used by stages on several pipeline devices (an embedding and
  the output head) has a copy on each holder; after the step each holder's gradient is the
  sum over all holders (all-reduce over the holders' group), so the copies stay identical.
- the sums are then scaled by the step's factor (1/w for mean losses, 1/tokens for
  token-level losses) when committed (``Stage.grad_scale``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["BUCKET_BYTES", "Reduction", "start_allreduce", "Tie", "find_ties", "clip_grad_norm_"]

BUCKET_BYTES = 25 * 2 ** 20


class Reduction:
    """The bucketed all-reduce of one stage's staged gradients (in flight)."""

    def __init__(self, stage: Any, buckets: List[Tuple[List[nn.Parameter], torch.Tensor]],
                 works: List[Any]) -> None:
        self.stage, self.buckets, self.works = stage, buckets, works

    def finish(self, wait: Any) -> None:
        """Wait (``wait(works, what)``, bounded), then make the reduced buckets the stage's
        staged gradients."""
        wait(self.works, f"the data-parallel all-reduce of stage {self.stage.index}")
        staged = self.stage.staged_grads()
        for params, flat in self.buckets:
            offset = 0
            for p in params:
                n = p.numel()
                staged[p] = flat[offset:offset + n].view_as(p)
                offset += n


def start_allreduce(stage: Any, group: Any) -> Reduction:
    """Start the all-reduce (sum over ``group``) of ``stage``'s staged gradients. Every
    parameter that requires grad takes part (zeros where this replica produced none), so
    all replicas pack identical buckets."""
    staged = stage.staged_grads()
    buckets: List[Tuple[List[nn.Parameter], torch.Tensor]] = []
    works = []
    # Reverse order: the last layers' gradients are the first ones ready in a backward.
    pending: Dict[torch.dtype, List[nn.Parameter]] = {}

    def flush(dtype: torch.dtype) -> None:
        params = pending.pop(dtype, [])
        if not params:
            return
        flat = torch.cat([(staged[p] if staged.get(p) is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        buckets.append((params, flat))
        works.append(dist.all_reduce(flat, group=group, async_op=True))

    sizes: Dict[torch.dtype, int] = {}
    for p in reversed(stage.params):
        pending.setdefault(p.dtype, []).append(p)
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel() * p.element_size()
        if sizes[p.dtype] >= BUCKET_BYTES:
            flush(p.dtype)
            sizes[p.dtype] = 0
    for dtype in list(pending):
        flush(dtype)
    return Reduction(stage, buckets, works)


class Tie:
    """A parameter shared by stages on several pipeline devices.

    Attributes:
        name: its first qualified name in the model (``"0.weight"``).
        devices: the pipeline devices holding a copy (sorted).
        groups: per replica, the process group of its holders (None in one process).
        param: this rank's copy (None if this rank holds none).
    """

    def __init__(self, name: str, devices: List[int]) -> None:
        self.name, self.devices = name, devices
        self.groups: List[Any] = []
        self.param: Optional[nn.Parameter] = None

    def __repr__(self) -> str:
        return f"Tie({self.name!r}, devices={self.devices})"


def find_ties(layers: Sequence[nn.Module], stage_of_layer: Sequence[int],
              device_of_stage: Sequence[int]) -> List[Tuple[Tie, nn.Parameter]]:
    """Parameters (by identity) used by layers on more than one pipeline device."""
    where: Dict[int, Tuple[str, nn.Parameter, set]] = {}
    for i, layer in enumerate(layers):
        dev = device_of_stage[stage_of_layer[i]]
        for name, p in layer.named_parameters(remove_duplicate=False):
            entry = where.setdefault(id(p), (f"{i}.{name}", p, set()))
            entry[2].add(dev)
    return [(Tie(name, sorted(devs)), p) for name, p, devs in where.values() if len(devs) > 1]


def sum_tied(ties: Sequence[Tie], stages: Sequence[Any], replica: int, wait: Any) -> None:
    """Make each local tied copy's staged gradient the sum over all its holders."""
    works, grads = [], []
    for tie in ties:
        p = tie.param
        if p is None or not p.requires_grad:
            continue
        holders = [st for st in stages if st is not None and any(q is p for q in st.params)]
        total = None
        for st in holders:
            g = st.staged_grads().pop(p, None)
            if g is not None:
                total = g.clone() if total is None else total.add_(g)
        if total is None:
            total = torch.zeros_like(p)
        holders[0].staged_grads()[p] = total
        grads.append(total)
        works.append(dist.all_reduce(total, group=tie.groups[replica], async_op=True))
    wait(works, "the gradient sum of tied weights")


def clip_grad_norm_(params: Sequence[nn.Parameter], max_norm: float, norm_type: float,
                    group: Any, wait: Any, also: Sequence[nn.Parameter] = ()) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the parameters of every rank of ``group``
    (each parameter counted once across ranks: ``params`` excludes duplicate tied copies,
    which are given in ``also`` and scaled like the rest)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm_type = float(norm_type)
    dev = grads[0].device if grads else torch.device("cpu")
    if math.isinf(norm_type):
        local = max((g.detach().abs().max().double() for g in grads),
                    default=torch.zeros((), dtype=torch.float64))
        op = dist.ReduceOp.MAX
    else:
        local = sum((g.detach().double().norm(norm_type) ** norm_type for g in grads),
                    torch.zeros((), dtype=torch.float64))
        op = dist.ReduceOp.SUM
    total = local.reshape(1).to(dev).clone()
    if group is not None:
        wait([dist.all_reduce(total, op=op, group=group, async_op=True)], "the global gradient norm")
    total = total[0] if math.isinf(norm_type) else total[0] ** (1.0 / norm_type)
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for g in grads + [p.grad for p in also if p.grad is not None]:
        g.detach().mul_(coef.to(g.dtype))
    return total
