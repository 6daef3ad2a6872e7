"""PipelineError: what failed in a run — stage, micro-batch, mini-batch and action.

:func:`from_executor` turns the executor's error (device and index of the failing action,
the original exception as ``__cause__``) into a :class:`PipelineError` by reading the
action from the plan, so the message names the stage, micro-batch and action as the IR
prints them (``2B5``, ``1F3@2``, ``0U1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

__all__ = ["PipelineError", "from_executor"]


class PipelineError(RuntimeError):
    """An action failed during a run: which stage, micro-batch and action.

    Attributes:
        stage, microbatch: where it failed (``None`` if no action was at fault, e.g. timeout).
        minibatch: the mini-batch of that micro-batch (plans over several mini-batches).
        action: the action kind ("F", "B", "I", "W", "U"); ``label`` the full label ("2B5").
        device: the device whose thread ran it.
    The original exception is ``__cause__``. After the error every ``p.grad`` is what it was
    before the step, and the next step works.
    """

    def __init__(self, message: str, *, stage: Optional[int] = None,
                 microbatch: Optional[int] = None, action: Optional[str] = None,
                 label: Optional[str] = None, device: Optional[int] = None,
                 minibatch: Optional[int] = None) -> None:
        super().__init__(message)
        self.stage, self.microbatch, self.action = stage, microbatch, action
        self.label, self.device, self.minibatch = label, device, minibatch


def from_executor(plan: Any, err: Any, first_minibatch: int = 0) -> PipelineError:
    """The PipelineError for an :class:`~pipetrain.executor.ExecutorError` of a run of ``plan``.
    ``first_minibatch``: the caller's number of the plan's mini-batch 0 (a run of several
    mini-batches in ``train()``): the action is named by the caller's numbering (micro-batch
    ``+ first * m``, version and update index ``+ first``)."""
    cause = err.__cause__
    device, index = getattr(err, "device", None), getattr(err, "index", None)
    if cause is None or device is None or index is None or index < 0:
        return PipelineError(f"pipeline run failed: {err}", device=device)
    a = plan.actions[device][index]
    if first_minibatch:
        shift = first_minibatch if a.kind == "U" else first_minibatch * plan.num_microbatches
        a = dataclasses.replace(a, microbatch=a.microbatch + shift,
                                version=a.version + first_minibatch if a.version >= 0 else a.version)
    if a.kind == "U":
        mb, t, what = None, a.microbatch, f"update after mini-batch {a.microbatch}"
    else:
        mb, t = a.microbatch, plan.minibatch_of(a.microbatch)
        several = plan.num_minibatches > 1 or first_minibatch
        what = f"micro-batch {mb}" + (f" of mini-batch {t}" if several else "")
    return PipelineError(
        f"stage {a.stage}, {what}, action {a.kind} ({a} on device {device}) raised "
        f"{type(cause).__name__}: {cause}",
        stage=a.stage, microbatch=mb, action=str(a.kind), label=str(a), device=device,
        minibatch=t)
