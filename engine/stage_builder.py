"""Stages of a sequence of layers: one :class:`~pipetrain.stage.Stage` per node of the stage graph.

A sequential model is cut into contiguous parts (``partition.split``), assigned to the stage
graph's stages in topological order (a chain: source to sink). Each stage gets its edges
from the graph, its device from the graph's placement, the loss if it is a sink, and
re-materialization by the ``checkpoint`` mode (``"except_last"`` spares the sinks). Layers
are moved to their stage's device in place, so the Parameter objects stay the model's.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from pipetrain.stage import Stage

__all__ = ["build_stages"]


def build_stages(graph: Any, parts: Sequence[Sequence[nn.Module]], devices: Sequence[torch.device],
                 *, loss_fn: Any, checkpoint: str, rng_lock: Optional[bool], check_finite: bool,
                 grad_scale: Optional[Callable[[], float]] = None,
                 is_local: Callable[[int], bool] = lambda k: True,
                 stage_cls: type = Stage) -> List[Optional[Stage]]:
    """The stages (indexed by stage id; None for another rank's) of ``parts``, in the
    graph's topological order; ``stage_cls`` is a :class:`Stage` subclass (e.g.
    :class:`pipetrain.cuda_graphs.GraphedStage`)."""
    order = graph.topological_order()
    stages: List[Optional[Stage]] = [None] * len(order)
    for part, k in zip(parts, order):
        if not is_local(k):
            continue    # another rank's stage
        info = graph.stage(k)
        device = devices[info.device]
        for layer in part:
            if any(t.device != device for t in list(layer.parameters()) + list(layer.buffers())):
                layer.to(device)
        recompute = checkpoint == "always" or (checkpoint == "except_last" and bool(info.outputs))
        stages[k] = stage_cls(k, part, device, inputs=info.inputs, outputs=info.outputs,
                          checkpoint=recompute, loss_fn=None if info.outputs else loss_fn,
                          input_grad=bool(info.inputs), rng_lock=rng_lock,
                          check_finite=check_finite)
        stages[k].grad_scale = grad_scale
    return stages
