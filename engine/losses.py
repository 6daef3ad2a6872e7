"""The pipeline's view of ``loss_fn``: mean losses and token-level ``(loss_sum, count)`` losses.

``loss_fn(output, target)`` returns either a scalar, the mean over its micro-batch (the
pipeline weights micro-batches by size), or a pair ``(loss_sum, count)``: the sum over the
micro-batch's counted items (tokens that are not padding) and how many there were. The
mini-batch loss is then ``sum(loss_sum) / sum(count)`` over all micro-batches, which equals
the unsplit model's masked mean even when micro-batches hold different numbers of tokens.

A backward cannot wait for the last micro-batch's count, so for a token-level loss each
micro-batch backpropagates its plain ``loss_sum`` and the step's gradients are divided by the
total count when they are committed (``Stage.grad_scale``). The stage weights a sink's loss by
``n_k / n`` (micro-batch over mini-batch size); :class:`LossFn` returns ``loss_sum * n / n_k``
so that weight cancels.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from pipetrain.microbatch import flatten

__all__ = ["LossFn", "batch_size"]


def batch_size(obj: Any) -> Optional[int]:
    """Dim 0 of the first tensor leaf of ``obj`` (None if it has none)."""
    for leaf in flatten(obj)[0] if obj is not None else ():
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


class LossFn:
    """Wraps the user's ``loss_fn`` (see the module docstring)."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn
        self.token_level: Optional[bool] = None   # known after the first call
        self.counts: Dict[int, float] = {}        # per micro-batch (keyed by its target)
        self.batch = 1
        self.scale: Optional[float] = None        # set by a multi-process step

    def begin(self, targets: Any) -> None:
        """Start a mini-batch whose targets are ``targets`` (None on ranks without them)."""
        self.counts = {}
        self.batch = batch_size(targets) or 1
        self.scale = None

    def __call__(self, output: Any, target: Any) -> Any:
        result = self.fn(output, target)
        if not isinstance(result, tuple):
            self.token_level = False
            return result
        if len(result) != 2:
            raise TypeError("loss_fn returned a tuple: it must be (loss_sum, count)")
        loss_sum, count = result
        self.token_level = True
        leaves = [t for t in flatten(target)[0] if isinstance(t, torch.Tensor)]
        n_k = batch_size(target) or 1
        # A recomputation calls loss_fn again on the same target: the key keeps one count.
        self.counts[id(leaves[0]) if leaves else len(self.counts)] = float(count)
        return loss_sum * (self.batch / n_k)

    @property
    def total_count(self) -> float:
        return sum(self.counts.values())

    def grad_scale(self) -> float:
        """What this step's committed gradients are multiplied by."""
        if self.scale is not None:
            return self.scale
        if self.token_level:
            total = self.total_count
            if total <= 0:
                raise ValueError("a token-level loss counted 0 items in the mini-batch")
            return 1.0 / total
        return 1.0

    def finish(self, loss: torch.Tensor) -> torch.Tensor:
        """The mini-batch loss from the pipeline's size-weighted sum of micro-batch losses."""
        return loss / self.total_count if self.token_level else loss
