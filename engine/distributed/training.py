"""``train()`` across processes: the optimizer inside a multi-process pipeline.

Called by :func:`pipetrain.training.train` when the pipeline runs across processes
(``pipe.dist``). Every rank calls ``pipe.train(batches)`` with its own iterable of
``(inputs, targets)`` mini-batches, as it calls ``step``: the first stage's rank reads the
inputs, the last stage's rank the targets, a middle rank may pass ``(None, None)``; each
data-parallel replica feeds its own mini-batches. Every rank gets each mini-batch's loss, in
order: the mean over the replicas' mini-batches (equal to the combined batch's loss when the
replicas' batches have equal sizes).

Synchronous schedules: per mini-batch one multi-process ``step()`` (gradients averaged over
replicas), then each local stage's optimizer steps; a step in which any rank saw a
non-finite gradient commits nothing and steps no optimizer (``pipe.found_inf``).

Asynchronous schedules (:mod:`pipetrain.async_schedules`): the iterable is cut into runs of
``minibatches_per_run`` mini-batches (None: all); each run is one execution of the lowered
asynchronous plan over those T mini-batches, every rank running its own row (its stage's
F / B with the versions the plan names, the transfers, a ``U`` per mini-batch). With
``data_parallel=w`` a stage's gradients of mini-batch t are all-reduced across its replicas
right after the backward that closes t, and its ``U(t)`` waits (bounded) for that
all-reduce, so the replicas keep identical weights and optimizer states. The ranks first
agree on T (a mismatch is a ValueError on every rank). Each run starts from the weights the
previous one left, as version 0, with the pipeline drained in between: one window per run
across processes, as :mod:`pipetrain.training` does in one process. After a failure every
rank raises a PipelineError naming the origin (rank, stage, micro-batch, mini-batch, action)
and the pipeline refuses further runs (restart from a checkpoint); the weights then hold the
updates that ran.

Not supported across processes with an asynchronous schedule (ValueError): a token-level
loss (as in one process) and weights tied across pipeline devices (each holder would update
its copy at its own version).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from pipetrain import async_schedules
from pipetrain.plan import Plan
from pipetrain.versions import PlannedVersions

__all__ = ["train", "check"]


def check(pipe: Any) -> None:
    """Raise ValueError for what an asynchronous schedule cannot do across processes."""
    ctx = pipe.dist
    if async_schedules.is_async(pipe.schedule_name) and ctx.ties:
        raise ValueError(f"{pipe.schedule_name} across processes: weights tied across pipeline "
                         f"devices ({', '.join(t.name for t in ctx.ties)}) are not supported "
                         "(each holder would update its copy at its own weight version); untie "
                         "them or use a synchronous schedule")


def _runs(batches: Iterable, size: Optional[int]) -> Iterator[list]:
    """Runs of ``size`` mini-batches (None: one run of all); an empty run at the end tells the
    other ranks this one has no more."""
    if size is None:
        yield list(batches)
        return
    run: list = []
    for b in batches:
        run.append(b)
        if len(run) == size:
            yield run
            run = []
    yield run


def _local(pipe: Any) -> List[Any]:
    return [pipe.stages[k] for k in pipe.dist.local]


def train(pipe: Any, batches: Iterable, minibatches_per_run: Optional[int] = None) -> Iterator[torch.Tensor]:
    """See :meth:`pipetrain.Pipeline.train` and the module docstring."""
    local = _local(pipe)
    if any(st.optimizer is None for st in local):
        raise ValueError("train() needs the optimizer inside the pipeline: "
                         "Pipeline(..., optimizer=lambda params: torch.optim.SGD(params, lr=0.1))")
    if minibatches_per_run is not None and (isinstance(minibatches_per_run, bool) or not isinstance(
            minibatches_per_run, int) or minibatches_per_run < 1):
        raise ValueError(f"minibatches_per_run must be an int >= 1 or None; got {minibatches_per_run!r}")
    if not async_schedules.is_async(pipe.schedule_name):
        yield from _train_sync(pipe, local, batches)
        return
    check(pipe)
    _refuse_if_broken(pipe)
    for chunk in _runs(batches, minibatches_per_run):
        T = _agree_on_count(pipe, len(chunk))
        if T == 0:
            return
        yield from _run_async(pipe, local, chunk)


def _train_sync(pipe: Any, local: List[Any], batches: Iterable) -> Iterator[torch.Tensor]:
    for st in local:
        st.optimizer.zero_grad()
    for inputs, targets in batches:
        loss = pipe.step(inputs, targets)
        for st in local:
            if not pipe.found_inf:      # every rank agrees on it: no replica steps alone
                st.optimizer.step()
            st.optimizer.zero_grad()
        yield loss


def _refuse_if_broken(pipe: Any) -> None:
    """After a failed run the process group may hold unmatched messages: refuse at once (before
    any collective, which would read the old failure)."""
    from pipetrain.errors import PipelineError
    broken = pipe.dist.runner.broken
    if broken:
        raise PipelineError(f"an earlier step failed ({broken}); the process group may hold "
                            "unmatched messages: restart the job (torchrun restarts it)")


def _agree_on_count(pipe: Any, T: int) -> int:
    """The number of mini-batches of this run, the same on every rank (ValueError if not)."""
    from pipetrain.errors import PipelineError
    from pipetrain.distributed.wire import PeerFailed
    ctx = pipe.dist
    vec = torch.tensor([T, -T], dtype=torch.int64).to(ctx.device)
    try:
        ctx._wait([dist.all_reduce(vec, op=dist.ReduceOp.MAX, async_op=True)],
                  "the agreement on the run's number of mini-batches")
    except PeerFailed as err:
        raise PipelineError(str(err)) from err
    hi, lo = int(vec[0]), -int(vec[1])
    if hi != lo:
        raise ValueError(f"the ranks passed different numbers of mini-batches to train() for this "
                         f"run: between {lo} and {hi} (rank {ctx.mesh.rank} has {T}); every rank "
                         "must pass the same number")
    return T


def _plan(pipe: Any, T: int) -> Plan:
    """The lowered asynchronous plan over T mini-batches (made once per T)."""
    ctx = pipe.dist
    plans: Dict[int, Plan] = ctx.__dict__.setdefault("async_plans", {})
    plan = plans.get(T)
    if plan is None:
        sched = async_schedules.build_async(pipe.schedule_name, pipe.num_devices,
                                            pipe.num_microbatches, T)
        plan = plans[T] = Plan(sched.lower())
    return plan


def _run_async(pipe: Any, local: List[Any], chunk: list) -> Iterator[torch.Tensor]:
    ctx, name = pipe.dist, pipe.schedule_name
    T = len(chunk)
    plan = _plan(pipe, T)
    graph = plan.graph
    old = [st.versions for st in local]
    for st in local:
        st.versions = PlannedVersions(st.parameters(), f"stage {st.index}", st.optimizer, name,
                                      plan.actions[graph.stage(st.index).device])
        st.optimizer.zero_grad()
    # Each U commits its mini-batch's gradients times this: the mean over replicas (the
    # all-reduce sums them).
    pipe._loss.begin(None)
    pipe._loss.scale = 1.0 / ctx.mesh.w
    try:
        batches = [ctx.rank_batch(pipe, x, y) for x, y in chunk]
        run, timeline, wall = ctx.run(pipe, batches, plan=plan)
        kept = [st.versions for st in local]
        try:
            for st in local:
                st.end_run(commit=True)    # every U committed its gradients: nothing is left
            ctx._record(pipe, run, timeline, wall)
            losses, token_level = _agree_on_losses(pipe, run, T)
        except BaseException as err:
            raise ctx.fail_after_run(pipe, err, "ending the run") from err
    except Exception as err:
        _name_versions(err, local)
        raise
    finally:
        for st, v in zip(local, old):
            st.versions = v
    pipe._stats = _stats(pipe, plan, run, kept)
    if token_level:     # every rank knows it from the all-reduce: all raise, none is broken
        raise ValueError(f"{name}: a token-level loss ((loss_sum, count)) is normalized per "
                         "mini-batch at its commit, which an asynchronous run does not have yet; "
                         "use a mean loss (this run's updates were applied)")
    dtype = next((p.dtype for st in local for p in st.params), torch.float32)
    for loss in losses:
        yield loss.to(dtype)


def _agree_on_losses(pipe: Any, run: Any, T: int) -> Tuple[List[torch.Tensor], bool]:
    """Every rank: each mini-batch's loss, the mean over replicas, and whether the loss is
    token-level (one all-reduce)."""
    ctx = pipe.dist
    vec = torch.zeros(T + 1, dtype=torch.float64)
    if ctx.is_sink:
        vec[:T] = torch.stack([torch.as_tensor(x, dtype=torch.float64).reshape(())
                               for x in run.losses_per_minibatch()])
        vec[T] = 1.0 if pipe._loss.token_level else 0.0
    vec = vec.to(ctx.device)
    ctx._wait([dist.all_reduce(vec, async_op=True)], "the all-reduce of the run's losses")
    vec = vec.cpu()
    return list(vec[:T] / ctx.mesh.w), bool(vec[T] > 0)


def _name_versions(err: Exception, local: List[Any]) -> None:
    """Add to a PipelineError which version this rank's stages hold now."""
    now = {st.index: st.versions.current for st in local}
    if hasattr(err, "stage") and err.args and isinstance(err.args[0], str):
        err.args = (err.args[0] + "; on this rank, after the updates that ran in this run, "
                    + ", ".join(f"stage {k} holds version {v}" for k, v in now.items())
                    + " (a multi-process pipeline refuses further runs: restart from a checkpoint)",)
        err.versions = now


def _stats(pipe: Any, plan: Plan, run: Any, versions: List[PlannedVersions]) -> Any:
    """This rank's stats of the run (:class:`~pipetrain.training.AsyncStats`): its row's
    compute, and the steady-state samples/s of its stage over mini-batches 1 .. T-2."""
    from pipetrain.training import AsyncStats
    base = pipe._stats
    T, m = plan.num_minibatches, plan.num_microbatches
    steady = base.samples_per_s
    timeline = pipe.dist.last_timeline
    rows = [r for r in timeline.records([plan.actions[pipe.dist.mesh.pp_rank]])[0]
            if str(r.kind) == "B"]
    if T >= 3 and rows:
        first = max(r.end_ns for r in rows if r.microbatch == m - 1)
        last = max(r.end_ns for r in rows if r.microbatch == (T - 1) * m - 1)
        samples = sum(sum(run.sizes[t]) for t in range(1, T - 1))
        if last > first:
            steady = samples / ((last - first) * 1e-9)
    return AsyncStats(base, minibatches=T, steady_samples_per_s=steady,
                      peak_versions=[v.peak_versions for v in versions],
                      peak_predicted=[v.peak_predicted for v in versions],
                      peak_version_bytes=[v.peak_bytes for v in versions],
                      peak_buffers=[v.peak_buffers for v in versions])
