"""The ``train()`` loop: the optimizer inside the pipeline, for every schedule.

Synchronous schedules (gpipe, 1f1b, interleaved, zero-bubble): per mini-batch, one
``step()`` then each stage's optimizer step (the gradients of that mini-batch only). A failing
step changes no weight; a failing optimizer step is undone on every stage (each stage's
weights and state are snapshotted before its step), so the model holds the weights of the
last completed mini-batch.

Asynchronous schedules (:mod:`pipetrain.async_schedules`) stream: the endless 1F1B order
(no flush, a U per stage and mini-batch, every pass on the version the plan names) is cut
into windows of ``minibatches_per_run`` mini-batches (:mod:`pipetrain.async_windows`), each
one executor run; the in-flight state (stashed activations, posted values, weight versions
and optimizer-state history, :class:`~pipetrain.versions.PlannedVersions`) carries over, so
the result is exactly :mod:`pipetrain.async_reference`'s for any window size. The iterable is
read with a lookahead of ``ceil((p-1)/m)`` mini-batches past the current window, memory
stays a few mini-batches, and each window's losses are yielded as soon as it ends. When the
iterable ends, the last window is the drain: every update is applied, the model holds W(T).

A failure (:class:`~pipetrain.PipelineError`, naming stage, micro-batch, mini-batch and
action) leaves every stage at one version n: the largest such that every stage has applied
its first n updates; the stages that were ahead are rolled back to W(n) and the optimizer
state of n (:mod:`pipetrain.rollback`), and a new ``train()`` continues from there. Breaking
out of the loop (or a bad mini-batch, ValueError) leaves the model at the last window
boundary, the same version on every stage.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable, Iterator, List, Optional

import torch

from pipetrain import async_schedules, async_windows, prediction, tiled_training
from pipetrain.arguments import check_flag
from pipetrain.dispatch import Carry
from pipetrain.rollback import UpdateLog
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

    Attributes (besides every StepStats one, forwarded, measured over the windows merged on
    one time axis): ``minibatches`` (T, all of train()'s), ``windows`` (executor runs) and
    ``window`` (mini-batches per run), ``samples_per_s`` of the whole stream (the time between
    windows, yielding losses and reading data, included), ``steady_samples_per_s`` (T >= 3:
    the samples of mini-batches a+1..b over the time stage 0 takes from the end of B(a*m+m-1)
    to the end of B(b*m+m-1), a the first mini-batch recorded, b <= T-2 the last: whole 1F1B
    periods, no fill or drain), ``peak_versions`` / ``peak_predicted`` /
    ``peak_version_bytes`` / ``peak_buffers`` (live + kept + predicted weight buffers at once,
    what the simulator's ``peak_versions`` predicts) per device, ``rollback_bytes`` per device (the most bytes of
    pre-update snapshots kept for a rollback). ``bubble_ratio`` spans the whole stream, the
    time between runs (yielding losses, reading data, making the next run) counted as idle;
    ``bubble_in_runs`` is the idle share inside the runs only, ``between_runs_s`` that time.
    ``records`` hold the last windows only (at most ``RECORDS_KEPT`` actions), without waits.
    """

    def __init__(self, base: Any, **extra: Any) -> None:
        self._base = base
        self.__dict__.update(extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def __repr__(self) -> str:
        return (f"AsyncStats({self.schedule}, T={self.minibatches}, windows={self.windows}, "
                f"bubble={self.bubble_ratio:.3f} (in runs {self.bubble_in_runs:.3f}), "
                f"samples/s={self.samples_per_s:.1f}, steady={self.steady_samples_per_s:.1f}, "
                f"peak_versions={self.peak_versions})")


#: At most this many action records are kept for stats() / traces of a stream (the last
#: windows'): a stream of 100k mini-batches stays bounded in memory.
RECORDS_KEPT = 50_000


def train(pipe: Any, batches: Iterable, minibatches_per_run: Optional[int] = None, *,
          undo_failed_updates: bool = True) -> Iterator[torch.Tensor]:
    """See :meth:`pipetrain.Pipeline.train`."""
    check_flag("undo_failed_updates", undo_failed_updates)
    if getattr(pipe, "dist", None) is not None:     # across processes: every rank runs its row
        from pipetrain.distributed import training as dist_training
        return dist_training.train(pipe, batches, minibatches_per_run)
    name = pipe.schedule_name
    unbuilt = not pipe.stages and getattr(pipe, "_optimizer_factory", None) is not None
    if any(st.optimizer is None for st in pipe.stages) or not (pipe.stages or unbuilt):
        raise ValueError("train() needs the optimizer inside the pipeline: "
                         "Pipeline(..., optimizer=lambda params: torch.optim.SGD(params, lr=0.1))")
    if minibatches_per_run is not None and (isinstance(minibatches_per_run, bool) or
                                            not isinstance(minibatches_per_run, int)
                                            or minibatches_per_run < 1):
        raise ValueError(f"minibatches_per_run must be an int >= 1 or None; got {minibatches_per_run!r}")
    if not async_schedules.is_async(name):
        if minibatches_per_run == 1:
            return _train_sync(pipe, batches, undo_failed_updates)
        return _train_sync_tiled(pipe, batches, minibatches_per_run, undo_failed_updates)
    return _train_async(pipe, batches, minibatches_per_run)


def _train_sync_tiled(pipe: Any, batches: Iterable, window: Optional[int],
                      undo: bool) -> Iterator[torch.Tensor]:
    """Several mini-batches per executor run where the pipeline allows it
    (:mod:`pipetrain.tiled_training`), else the per-step loop. Until the loss has been called
    once its kind (mean or token-level) is unknown: the first mini-batch then runs alone."""
    it = iter(batches)
    done = 0
    if pipe._loss.token_level is None:
        first = list(itertools.islice(it, 1))
        yield from _train_sync(pipe, first, undo)
        done = len(first)
    if tiled_training.why_not(pipe) is None:
        yield from tiled_training.train_tiled(pipe, it, window, undo, done)
    else:
        yield from _train_sync(pipe, it, undo, done)


def _train_sync(pipe: Any, batches: Iterable, undo: bool = True,
                done: int = 0) -> Iterator[torch.Tensor]:
    """``undo``: snapshot each stage's weights and optimizer state before its optimizer step
    (~0.5x an Adam step per stage, every mini-batch), so a step that raises on one stage is
    undone on every stage. Without it a raising step leaves the stages that stepped before it
    one version ahead (the error says which)."""
    from pipetrain.errors import PipelineError
    for st in pipe.stages:
        if st is not None:
            st.optimizer.zero_grad()
    logs: dict = {}
    for t, (inputs, targets) in enumerate(batches, done):
        try:
            loss = pipe.step(inputs, targets)  # a failure changes no weight and no p.grad
        except PipelineError as err:
            err.version = t                    # the weights after mini-batches 0..t-1
            raise
        # A graph model builds its stages (and their optimizers) at its first step; a
        # multi-process pipeline holds only its own.
        stages = [st for st in pipe.stages if st is not None]
        for st in stages:
            if undo and id(st) not in logs:
                logs[id(st)] = UpdateLog(st.parameters(), st.optimizer, 0)
        order = [logs.get(id(st)) for st in stages]
        skip = getattr(pipe, "_inf_since_update", False)     # loss scaling found inf / NaN:
        pipe._inf_since_update = False                        # every stage skips its update
        for i, (st, log) in enumerate(zip(stages if not skip else [], order)):
            if log is not None:
                log.save(t)
            try:
                st.optimizer.step()
            except Exception as cause:
                if undo:
                    for done in order[:i + 1]:
                        done.restore(t)
                    what = (f"every stage was put back to the weights and optimizer state before "
                            f"this update (version {t}: the {t} mini-batch(es) completed in this "
                            "train()); a new train() starts from them")
                else:
                    ahead = ", ".join(str(s.index) for s in stages[:i]) or "none"
                    what = (f"train(undo_failed_updates=False): stages updated before it ({ahead}) "
                            f"hold version {t + 1}, stage {st.index} may be partly updated, the "
                            f"others hold version {t}")
                for other in stages:
                    other.optimizer.zero_grad()
                err = PipelineError(
                    f"stage {st.index}, update after mini-batch {t}, action U raised "
                    f"{type(cause).__name__}: {cause}; {what}",
                    stage=st.index, action="U", label=f"{st.index}U{t}", minibatch=t)
                err.version = t if undo else None
                raise err from cause
        for st in stages:
            st.optimizer.zero_grad()
        yield loss


def _register(versions: List[PlannedVersions], name: str, p: int, m: int, t: int) -> None:
    """Mini-batch t's data is known: count the passes its forwards and backwards will make."""
    predicting = name in async_schedules.PREDICTING
    for r, v in enumerate(versions):
        uses = []
        for k in range(t * m, (t + 1) * m):
            ver = async_windows.forward_version(name, p, r, m, k)
            uses += [(ver, t - ver if predicting else 0)] * 2      # F(k) and B(k)
        v.register(uses)


def _train_async(pipe: Any, batches: Iterable, window: Optional[int]) -> Iterator[torch.Tensor]:
    name, p, m = pipe.schedule_name, pipe.num_devices, pipe.num_microbatches
    W = window or async_windows.default_window(p, m)
    L = async_windows.lookahead(p, m)
    depth = async_windows.rollback_depth(name, p, m)
    stages = list(pipe.stages)
    old = [st.versions for st in stages]
    versions = [PlannedVersions(st.parameters(), f"stage {st.index}", st.optimizer, name,
                                log_depth=depth[st.index]) for st in stages]
    carry = Carry(pipe.plan, m)
    feed = carry.feed
    meter = _StreamStats(pipe, name, versions, W)
    it = iter(batches)
    known, end, c0 = 0, None, 0
    try:
        for st, v in zip(stages, versions):
            st.versions = v
            st.optimizer.zero_grad()
        while True:
            while end is None and known < c0 + W + L:
                try:
                    batch = next(it)
                except StopIteration:
                    end = known
                    break
                feed.add(known, batch)
                _register(versions, name, p, m, known)
                known += 1
            if end is not None and c0 >= end:
                break
            count = W if end is None else min(W, end - c0)
            plan = async_windows.window_plan(name, p, m, c0, count, end)
            t_run = time.perf_counter()
            try:
                outcome = pipe._execute(plan, [], carry=carry)
            except BaseException as err:     # PipelineError, or Ctrl-C during the run
                _roll_back(err, stages, versions)
                raise
            if getattr(getattr(pipe, "_loss", None), "token_level", False):
                raise ValueError(f"{name}: a token-level loss ((loss_sum, count)) is normalized "
                                 "per mini-batch at its commit, which an asynchronous run does "
                                 "not have yet; use a mean loss")
            meter.add(plan, outcome, t_run)
            losses = outcome.run.losses_per_minibatch()
            c0 += count
            feed.drop_before(c0)
            for loss in losses:
                yield loss
    finally:
        if carry.runs:
            # Left between windows (break, a bad mini-batch): every stage is at version c0;
            # drop the in-flight micro-batches of later mini-batches. After the drain (or a
            # failure) there are none: this only ends the stages' streamed run.
            for st in stages:
                st.end_run(commit=False)
            carry.mailbox.clear()
        for st, v in zip(stages, old):
            st.versions = v
        if meter.windows:
            pipe._stats = meter.stats()


def _roll_back(err: Exception, stages: List[Any], versions: List[PlannedVersions]) -> None:
    """Every stage to version n = min over stages of the updates applied; name it in err."""
    at_failure = [v.current for v in versions]
    n = min(at_failure)
    for st, v in zip(stages, versions):
        v.rollback(n)
        st.optimizer.zero_grad()
    if not isinstance(err, Exception):
        return                  # KeyboardInterrupt and the like: rolled back, left as they are
    if hasattr(err, "args") and err.args and isinstance(err.args[0], str):
        msg = err.args[0]
        if getattr(err, "minibatch", None) is not None and "mini-batch" not in msg:
            msg += f" (mini-batch {err.minibatch})"
        err.args = (msg + f"; the model is at version {n} on every stage (W({n}): the updates of "
                    f"mini-batches 0..{n - 1} of this train(); the stages had applied "
                    f"{at_failure} updates, those ahead were rolled back with their optimizer "
                    "state); a new train() continues from it",)
    err.version = n
    err.versions = [n] * len(stages)
    err.versions_at_failure = at_failure


class _StreamStats:
    """Merges the windows' timelines onto one time axis (offset by when each run started)."""

    def __init__(self, pipe: Any, name: str, versions: List[PlannedVersions], window: int) -> None:
        self.pipe, self.name, self.versions, self.window = pipe, name, versions, window
        self.windows = 0
        self.t0: Optional[float] = None
        self.t_end = 0.0
        self.samples = 0
        self.kept: List[tuple] = []      # (records per device, actions)
        self.sizes: dict = {}
        self.meters: Any = None
        self.minibatches = 0
        self.busy_ns = self.makespan_ns = 0     # summed over windows (the runs themselves)
        self.run_s = 0.0

    def add(self, plan: Any, outcome: Any, t_run: float) -> None:
        if self.t0 is None:
            self.t0 = t_run
        self.windows += 1
        self.t_end = time.perf_counter()
        run = outcome.run
        self.meters = run.meters
        tl = outcome.timeline
        self.busy_ns += sum(tl.busy_ns(d) for d in range(tl.num_devices))
        self.makespan_ns += tl.makespan_ns() * tl.num_devices
        self.run_s += outcome.wall_s
        self.samples += run.samples()
        self.minibatches = plan.first_minibatch + plan.num_minibatches
        for t in plan.minibatches:
            self.sizes[t] = sum(run.sizes[t])
        off = int((t_run - self.t0) * 1e9)
        records = outcome.timeline.records(plan.actions)
        for row in records:
            for i, r in enumerate(row):
                if r.start_ns >= 0:
                    row[i] = r._replace(start_ns=r.start_ns + off, end_ns=r.end_ns + off)
        self.kept.append((plan.first_minibatch, records))
        total = sum(len(row) for _, recs in self.kept for row in recs)
        while len(self.kept) > 1 and total > RECORDS_KEPT:
            _, gone = self.kept.pop(0)
            total -= sum(map(len, gone))
            first = self.kept[0][0]
            for t in [u for u in self.sizes if u < first - 1]:
                self.sizes.pop(t)

    def stats(self) -> "AsyncStats":
        from pipetrain.stats import measure
        pipe = self.pipe
        records = [[r for _, recs in self.kept for r in recs[d]] for d in range(pipe.num_devices)]
        wall = self.t_end - self.t0
        base = measure(records, schedule=self.name, num_stages=pipe.num_stages,
                       num_microbatches=pipe.num_microbatches, samples=self.samples, wall_s=wall,
                       peak_stash_bytes=[mt.peak_bytes for mt in self.meters],
                       peak_inflight=[mt.peak_count for mt in self.meters])
        m, T = pipe.num_microbatches, self.minibatches
        steady = base.samples_per_s
        ends = {r.microbatch // m: r.end_ns for r in records[0]
                if r.kind == "B" and r.microbatch % m == m - 1 and r.end_ns >= 0}
        if ends and T >= 3:
            a, b = min(ends), min(max(ends), T - 2)
            if b > a and ends[b] > ends[a] and all(t in self.sizes for t in range(a + 1, b + 1)):
                samples = sum(self.sizes[t] for t in range(a + 1, b + 1))
                steady = samples / ((ends[b] - ends[a]) * 1e-9)
        v = self.versions
        inside = 1.0 - self.busy_ns / self.makespan_ns if self.makespan_ns else 0.0
        return AsyncStats(base, minibatches=T, windows=self.windows, window=self.window,
                          steady_samples_per_s=steady, bubble_in_runs=inside,
                          between_runs_s=max(0.0, wall - self.run_s),
                          peak_versions=[x.peak_versions for x in v],
                          peak_predicted=[x.peak_predicted for x in v],
                          peak_version_bytes=[x.peak_bytes for x in v],
                          peak_buffers=[x.peak_buffers for x in v],
                          rollback_bytes=[x.log.peak_bytes if x.log is not None else 0 for x in v])
