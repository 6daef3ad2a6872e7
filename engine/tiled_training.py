"""Synchronous ``train()`` without a flush between mini-batches: several mini-batches per run.

Per mini-batch, ``step()`` and then each stage's optimizer step is a flush: every device
waits for the slowest at the end of the step, the optimizer steps run one after another on
the calling thread, and at the start of the next step the last device waits again while
the first stage runs its first forward. None of that is needed for synchronous semantics
when every stage has its own optimizer and nothing global decides the update: stage s's
update after mini-batch t needs only stage s's gradients of mini-batch t, and stage s's
passes of mini-batch t + 1 need only its own weights after that update.

So ``train()`` runs windows of ``W`` mini-batches as one executor run of
``schedules.build(name, p, m, v, num_minibatches=W, updates=True)``: on every device, the
one-mini-batch order of each mini-batch in turn, each stage's ``U`` (commit, optimizer
step, zero grad) right after its last backward of the mini-batch and before its first
forward of the next. The numbers are exactly those of the per-step loop (the same passes on
the same weights in the same order per stage; tested bitwise in fp64); what changes is
that one device's update and the next mini-batch's first forwards overlap the other
devices' cool-down, and the optimizer steps run on the devices' threads, in parallel.

Measured (time per mini-batch against the per-step loop, interleaved rounds on 2 shared
cores, p = 2, m = 8): ``python -m bench --only training`` (8 residual blocks, d = 256) ZB-H1
0.79-0.88x, 1F1B 1.01-1.02x; ``--only peers_training`` (the peers' linear and blocks
models, SGD + momentum) ZB-H1 0.93-1.01x, 1F1B 0.91-1.00x. The pre-update snapshots run on
the devices' threads, inside the critical path (0.81-0.89x for ZB-H1 without them).

When it applies (else the per-step loop runs, as before): one process, a named schedule,
no loss scaling (a non-finite gradient anywhere skips every stage's update: a global
decision per mini-batch), no CUDA graphs, not a graph model, and a mean loss (a token-level
loss divides a mini-batch's gradients by its token count, known only after its last
forward; so the first mini-batch of a pipeline's first ``train()`` runs alone, by step(),
which tells which kind the loss is). ``minibatches_per_run=1`` asks for the per-step loop.

The iterable is read a window ahead (``W - 1`` mini-batches beyond the one being yielded)
and losses come back when the window's run ends.

Failures. Inside a window, stages may have applied different numbers of updates when an
action fails (stage 0 updated after mini-batch t while the last stage was still in its
backward). With ``undo_failed_updates`` (the default) each stage snapshots its weights and
optimizer state before each update (:class:`~pipetrain.rollback.UpdateLog`, one kept, as
the per-step loop keeps). One is enough: a stage starts its update after mini-batch t only
once its backward of t is done, which needs t's forwards from upstream and gradients from
downstream, each produced after that stage's update after t - 1; so when any stage starts
update t, every stage has applied t - 1, no stage is ever two updates ahead, and the one
snapshot a stage ahead holds is of the version to go back to. The stages ahead are rolled
back, so every stage holds version ``n`` = the fewest updates any stage applied
(``err.version``), and a new ``train()`` continues from it. A mini-batch that cannot be
split (too few samples, inputs and targets of different sizes) stops its window before
anything runs: the model stays at the window's start, the earlier mini-batches of that
window not applied, and the error names the mini-batch by ``train()``'s count. Without it the error lists each stage's version (``err.versions_at_failure``).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, List, Optional

import torch

from pipetrain import schedules
from pipetrain.plan import Plan
from pipetrain.rollback import UpdateLog

__all__ = ["DEFAULT_WINDOW", "why_not", "train_tiled"]

#: Mini-batches per executor run when ``train()`` is not told.
DEFAULT_WINDOW = 4


def why_not(pipe: Any) -> Optional[str]:
    """Why the pipeline's ``train()`` must run the per-step loop (None: it can tile). Several
    processes and a missing optimizer are dealt with before (``pipetrain.training.train``)."""
    if pipe.scaler is not None:
        return "loss scaling decides every stage's update together"
    if getattr(getattr(pipe, "runner", None), "graphs", None) is not None:
        return "CUDA graphs"
    if pipe._graph_model is not None:
        return "a graph model"
    if pipe.schedule_name not in schedules.NAMES:
        return f"schedule {pipe.schedule_name!r} is not a named one"
    if pipe._loss.token_level is not False:
        return "the loss may be token-level" if pipe._loss.token_level is None else \
            "a token-level loss is normalized per mini-batch at its commit"
    return None


class _Hook:
    """One stage's count of updates applied in the window, and its pre-update snapshots."""

    def __init__(self, stage: Any, undo: bool) -> None:
        self.stage = stage
        self.log = UpdateLog(stage.parameters(), stage.optimizer, 0) if undo else None
        self.base = 0           # the stage's version when the window started
        self.applied = 0        # updates completed in the window
        self.stepping = False   # inside an optimizer step (a raise leaves it half done)

    def start(self, version: int) -> None:
        self.base, self.applied, self.stepping = version, 0, False

    def before(self) -> None:
        if self.log is not None:
            self.log.save(self.base + self.applied)
        self.stepping = True

    def after(self) -> None:
        self.stepping = False
        self.applied += 1


def _plan(pipe: Any, count: int, cache: dict) -> Plan:
    plan = cache.get(count)
    if plan is None:
        s = pipe.schedule
        plan = cache[count] = Plan(schedules.build(pipe.schedule_name, pipe.num_devices,
                                                   pipe.num_microbatches, s.num_chunks,
                                                   num_minibatches=count, updates=True))
    return plan


def train_tiled(pipe: Any, batches: Iterable, window: Optional[int], undo: bool,
                done: int = 0) -> Iterator[torch.Tensor]:
    """Yield each mini-batch's loss, running ``window`` (None: :data:`DEFAULT_WINDOW`)
    mini-batches per executor run (see the module docstring). ``done``: mini-batches this
    ``train()`` already completed (versions in errors count from them)."""
    from pipetrain.stats import measure_later

    W = window or DEFAULT_WINDOW
    stages: List[Any] = list(pipe.stages)
    hooks = [_Hook(st, undo) for st in stages]
    plans: dict = {}
    it = iter(batches)
    t = done
    try:
        for st, h in zip(stages, hooks):
            st.update_hook = h
        while True:
            chunk = list(itertools.islice(it, W))
            if not chunk:
                return
            for i, b in enumerate(chunk):
                if not isinstance(b, (tuple, list)) or len(b) != 2:
                    raise ValueError(f"mini-batch {t + i}: train() takes (inputs, targets) "
                                     f"pairs, got {type(b).__name__}")
            plan = _plan(pipe, len(chunk), plans)
            for h in hooks:
                h.start(t)
            try:
                outcome = pipe._execute(plan, [tuple(b) for b in chunk], first_minibatch=t)
            except BaseException as err:
                _roll_back(err, hooks, t, undo)
                raise
            pipe._stats = measure_later(outcome, plan, pipe.num_stages)
            t += len(chunk)
            for loss in outcome.run.losses_per_minibatch():
                yield loss
    finally:
        for st in stages:
            st.update_hook = None


def _roll_back(err: BaseException, hooks: List[_Hook], t: int, undo: bool) -> None:
    """After a failed window that started at version ``t``: every stage to version n = t +
    the fewest updates any stage completed (undo), or name each stage's version."""
    at_failure = [h.base + h.applied for h in hooks]
    n = min(at_failure)
    torn = [h.stage.index for h in hooks if h.stepping]
    if undo:
        for h in hooks:
            if (h.base + h.applied > n or h.stepping) and not h.log.restore(n):
                raise RuntimeError(f"stage {h.stage.index}: no snapshot of version {n} to roll "
                                   f"back to (held: {h.log.versions})") from err
    for h in hooks:
        h.stage.optimizer.zero_grad()
    if not isinstance(err, Exception):
        return                  # KeyboardInterrupt and the like: rolled back, left as they are
    if undo:
        what = (f"the model is at version {n} on every stage (the updates of mini-batches "
                f"0..{n - 1} of this train(); the stages had applied {at_failure} updates, those "
                "ahead were rolled back with their optimizer state); a new train() continues "
                "from it")
    else:
        what = (f"train(undo_failed_updates=False): the stages hold versions {at_failure}"
                + (f", stage(s) {torn} possibly half-updated" if torn else ""))
    if err.args and isinstance(err.args[0], str):
        err.args = (f"{err.args[0]}; {what}",) + tuple(err.args[1:])
    err.version = n if undo else None
    err.versions_at_failure = at_failure
