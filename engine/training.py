"""The ``train()`` loop: the optimizer inside the pipeline, for every schedule.

Synchronous schedules (gpipe, 1f1b, interleaved, zero-bubble): per mini-batch, one
``step()`` then each stage's optimizer step (the gradients of that mini-batch only).

Asynchronous schedules (:mod:`pipetrain.async_schedules`): the iterable is cut into chunks of
``minibatches_per_run`` mini-batches; each chunk is one executor run of the asynchronous plan
over those T mini-batches (1F1B with no flush inside the chunk, a U per stage and mini-batch,
every pass on the version the plan names, :class:`~pipetrain.versions.PlannedVersions`
keeping, predicting and dropping versions). At a chunk boundary the pipeline drains: every
update of the chunk is applied, and the next chunk starts from those weights as its version 0
with an empty optimizer-state history. So a chunk boundary is a flush: the first p-1 forwards
of the next chunk see fresher weights than an endless pipeline would, and the warm-up / drain
bubble (about (p-1)/(T*m + p-1) of the run) is paid once per chunk. With one chunk (pass
``minibatches_per_run=None``, the default, which reads the whole iterable first) train() is
exactly the rules of :mod:`pipetrain.async_reference`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List, Optional

import torch

from pipetrain import async_schedules, prediction
from pipetrain.plan import Plan
from pipetrain.versions import PlannedVersions

__all__ = ["make_optimizers", "train", "AsyncStats"]


def make_optimizers(pipe: Any, factory: Optional[Callable]) -> None:
    """Call ``factory(params)`` once per (local) stage; set ``stage.optimizer``. Checks that a
    predicting schedule can read the optimizer (ValueError saying what it needs)."""
    schedule = pipe.schedule_name
    stages = [st for st in pipe.stages if st is not None]
    if async_schedules.is_async(schedule) and getattr(pipe, "dist", None) is not None:
        from pipetrain.distributed.training import check
        check(pipe)         # what an asynchronous schedule cannot do across processes
    if factory is None:
        if async_schedules.is_async(schedule):
            raise ValueError(f"schedule {schedule!r} updates weights inside the pipeline: pass "
                             "optimizer=lambda params: torch.optim.SGD(params, lr=...)")
        return
    if not callable(factory):
        raise ValueError("optimizer must be a factory: optimizer(params) -> optimizer")
    for st in stages:
        opt = factory(st.parameters())
        if not hasattr(opt, "step") or not hasattr(opt, "zero_grad"):
            raise ValueError(f"optimizer(params) must return an optimizer; got {type(opt).__name__}")
        prediction.check_optimizer(schedule, opt)
        st.optimizer = opt


class AsyncStats:
    """Wraps the last run's :class:`~pipetrain.stats.StepStats` with what train() measured.

    Attributes (besides every StepStats one, forwarded): ``minibatches`` in the run,
    ``samples_per_s`` of the whole run, ``steady_samples_per_s`` (T >= 3: the samples of
    mini-batches 1..T-2 over the time stage 0 takes to finish their backwards, from the end of
    B(m-1) to the end of B((T-1)m-1): whole 1F1B periods, no fill or drain), ``peak_versions`` /
    ``peak_predicted`` / ``peak_version_bytes`` / ``peak_buffers`` (live + kept + predicted
    weight buffers at once, what the simulator's ``peak_versions`` predicts) per device.
    """

    def __init__(self, base: Any, **extra: Any) -> None:
        self._base = base
        self.__dict__.update(extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def __repr__(self) -> str:
        return (f"AsyncStats({self.schedule}, T={self.minibatches}, bubble={self.bubble_ratio:.3f}, "
                f"samples/s={self.samples_per_s:.1f}, steady={self.steady_samples_per_s:.1f}, "
                f"peak_versions={self.peak_versions})")


def _chunks(batches: Iterable, size: Optional[int]) -> Iterator[list]:
    if size is None:
        yield list(batches)
        return
    chunk = []
    for b in batches:
        chunk.append(b)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def train(pipe: Any, batches: Iterable, minibatches_per_run: Optional[int] = None) -> Iterator[torch.Tensor]:
    """See :meth:`pipetrain.Pipeline.train`."""
    if getattr(pipe, "dist", None) is not None:     # across processes: every rank runs its row
        from pipetrain.distributed import training as dist_training
        yield from dist_training.train(pipe, batches, minibatches_per_run)
        return
    name = pipe.schedule_name
    unbuilt = not pipe.stages and getattr(pipe, "_optimizer_factory", None) is not None
    if any(st.optimizer is None for st in pipe.stages) or not (pipe.stages or unbuilt):
        raise ValueError("train() needs the optimizer inside the pipeline: "
                         "Pipeline(..., optimizer=lambda params: torch.optim.SGD(params, lr=0.1))")
    if minibatches_per_run is not None and (not isinstance(minibatches_per_run, int)
                                            or minibatches_per_run < 1):
        raise ValueError(f"minibatches_per_run must be an int >= 1 or None; got {minibatches_per_run!r}")
    if not async_schedules.is_async(name):
        for st in pipe.stages:
            st.optimizer.zero_grad()
        for inputs, targets in batches:
            loss = pipe.step(inputs, targets)
            pipe.optimizer_step()     # skipped on every stage if the step found inf / NaN
            for st in pipe.stages:
                st.optimizer.zero_grad()
            yield loss
        return
    p, m = pipe.num_devices, pipe.num_microbatches
    plans = {}
    for chunk in _chunks(batches, minibatches_per_run):
        if not chunk:
            return
        T = len(chunk)
        plan = plans.get(T)
        if plan is None:
            plan = plans[T] = Plan(async_schedules.build_async(name, p, m, T))
        old = [st.versions for st in pipe.stages]
        for st in pipe.stages:
            st.versions = PlannedVersions(st.parameters(), f"stage {st.index}", st.optimizer, name,
                                          plan.actions[st.index])
            st.optimizer.zero_grad()
        try:
            outcome = pipe._execute(plan, chunk)
        except Exception as err:
            _name_version(err, pipe, T)
            raise
        finally:
            kept = [st.versions for st in pipe.stages]
            for st, v in zip(pipe.stages, old):
                st.versions = v
        if getattr(getattr(pipe, "_loss", None), "token_level", False):
            raise ValueError(f"{name}: a token-level loss ((loss_sum, count)) is normalized per "
                             "mini-batch at its commit, which an asynchronous run does not "
                             "have yet; use a mean loss (this run's updates were applied)")
        pipe._stats = _measure(pipe, plan, outcome, kept, name)
        for loss in outcome.run.losses_per_minibatch():
            yield loss


def _name_version(err: Exception, pipe: Any, T: int) -> None:
    """Add to a PipelineError which version each stage's live weights hold now."""
    now = [st.versions.current for st in pipe.stages]
    if hasattr(err, "args") and err.args and isinstance(err.args[0], str) and hasattr(err, "stage"):
        err.args = (err.args[0] + f"; the model holds, per stage, the weights after the updates "
                    f"that ran in this run of {T} mini-batch(es): {now} (the earlier runs' updates "
                    "all applied); a new train() starts from them",)
        err.versions = now


def _measure(pipe: Any, plan: Plan, outcome: Any, versions: List[PlannedVersions], name: str) -> AsyncStats:
    from pipetrain.stats import measure
    timeline, run = outcome.timeline, outcome.run
    records = timeline.records(plan.actions)
    base = measure(records, schedule=name, num_stages=pipe.num_stages,
                   num_microbatches=pipe.num_microbatches, samples=sum(map(sum, run.sizes)),
                   wall_s=outcome.wall_s,
                   peak_stash_bytes=[mt.peak_bytes for mt in run.meters],
                   peak_inflight=[mt.peak_count for mt in run.meters], waits=timeline.waits)
    T, m = plan.num_minibatches, plan.num_microbatches
    steady = base.samples_per_s
    if T >= 3:
        # Steady state: mini-batches 1 .. T-2 on stage 0 (device 0), first F to last B.
        rows = records[0]
        first = max(r.end_ns for r in rows if r.kind == "B" and r.microbatch == m - 1)
        last = max(r.end_ns for r in rows if r.kind == "B" and r.microbatch == (T - 1) * m - 1)
        samples = sum(sum(run.sizes[t]) for t in range(1, T - 1))
        if last > first:
            steady = samples / ((last - first) * 1e-9)
    return AsyncStats(base, minibatches=T, steady_samples_per_s=steady,
                      peak_versions=[v.peak_versions for v in versions],
                      peak_predicted=[v.peak_predicted for v in versions],
                      peak_version_bytes=[v.peak_bytes for v in versions],
                      peak_buffers=[v.peak_buffers for v in versions])

