"""The real pipeline as the convergence bench's trainer (same signature as
:func:`pipetrain.async_reference.reference_train`).

``stages`` become a :class:`pipetrain.Pipeline` with one stage per device (``balance`` of one
module each), ``optimizer=optimizer_factory`` inside the pipeline, and all mini-batches in one
``train()`` run (no drain until the end, exactly the reference's rules). ``sync`` is 1F1B with
a flush per mini-batch (``train()`` on ``"1f1b"``). ``stale`` (no stashing: the backward on
the live weights) is a baseline the runtime does not offer -- the plan always stashes -- so it
is delegated to the reference trainer.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def pipeline_train(stages: list, batches: Iterable, *, schedule: str, num_microbatches: int,
                   loss_fn: Callable, optimizer_factory: Callable, trace=None):
    """Train ``stages`` in place with the real pipeline; returns (losses, final state_dicts)."""
    import pipetrain
    if schedule == "stale":
        from pipetrain.async_reference import reference_train
        return reference_train(stages, batches, schedule=schedule,
                               num_microbatches=num_microbatches, loss_fn=loss_fn,
                               optimizer_factory=optimizer_factory, trace=trace)
    p = len(stages)
    pipe = pipetrain.Pipeline(nn.Sequential(*stages), num_devices=p, balance=[1] * p,
                              schedule="1f1b" if schedule == "sync" else schedule,
                              num_microbatches=num_microbatches, loss_fn=loss_fn,
                              optimizer=optimizer_factory, num_threads=1, timeout=600)
    try:
        losses = [float(x) for x in pipe.train(batches)]
    finally:
        pipe.close()
    return losses, [{k: v.detach().clone() for k, v in st.state_dict().items()} for st in stages]
