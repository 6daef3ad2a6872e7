"""Runner: executes plans on the C++ executor and leaves a defined state when one fails.

The :class:`Runner` owns what outlives a single run: the executor (one issuing thread per
pipeline device), the transport of every edge, and the torch thread setting. ``execute``
runs one :class:`~pipetrain.plan.Plan` over its mini-batches::

    stages begin a run (fresh stash and meters, gradients staged)
    executor.run(plan, Run.dispatch)              every action, dependencies as events
    success: stages commit their gradients into p.grad; user inputs get theirs
    failure: the run is abandoned — nothing is committed, so every p.grad is what it was
             before; an action stuck past the timeout poisons the executor, which is
             replaced, and can only touch the abandoned run's own state when it returns.

A plan with ``U`` actions commits each stage's gradients at its update instead, so after a
failure mid-plan a stage holds the weights of the updates that ran (``Stage.versions``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

from pipetrain import transport as transports_mod
from pipetrain.dispatch import Run

__all__ = ["Runner", "RunOutcome", "check_timeout"]


def check_timeout(timeout: Any) -> float:
    """A ``timeout=`` argument: seconds > 0, ``float("inf")`` for none. Raises ValueError."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) \
            or timeout <= 0:
        raise ValueError(f"timeout must be a number of seconds > 0 (float('inf') for no "
                         f"timeout); got {timeout!r}")
    return float(timeout)


@dataclass
class RunOutcome:
    """What a successful run returns: the run's state, its timeline and its wall time (s)."""

    run: Run
    timeline: Any
    wall_s: float


class Runner:
    """Runs plans for one pipeline (see the module docstring).

    Args:
        num_devices: pipeline devices (executor threads).
        devices: the torch device of each.
        edges: ``(edge id, producer stage, consumer stage)`` of the stage graph.
        device_of_stage: the pipeline device of each stage.
        transfer: ``"auto" | "copy" | "direct"`` (:mod:`pipetrain.transport`).
        timeout: seconds without progress before a run fails (``inf``: never).
        profile_steps: CUDA profiler window in runs, see :class:`~pipetrain.executor.Executor`.
        num_threads: torch intra-op threads per issuing thread during a run (0: leave it).
    """

    def __init__(self, num_devices: int, devices: Sequence[torch.device],
                 edges: Sequence[Tuple[int, int, int]], device_of_stage: Sequence[int], *,
                 transfer: str = "auto", timeout: float = 60.0,
                 profile_steps: Optional[Tuple[int, int]] = None, num_threads: int = 0) -> None:
        self.num_devices = num_devices
        self.devices = list(devices)
        self._edges, self._device_of = list(edges), list(device_of_stage)
        self.transfer = transports_mod.check_mode(transfer)
        self.timeout = check_timeout(timeout)
        self.profile_steps = profile_steps
        self.num_threads = num_threads
        self.backend = "cuda" if all(d.type == "cuda" for d in self.devices) else "cpu"
        self.executor: Any = None
        self.transports: dict = {}
        self.meters: List[Any] = []      # the last run's per-device memory meters
        self.graphs: Any = None          # cuda_graphs.PipelineGraphs (cuda_graphs=True)
        self._new_executor()

    def _new_executor(self) -> None:
        from pipetrain.executor import Executor
        kwargs = {}
        if self.backend == "cuda":
            # Pipeline device d is devices[d] (not necessarily cuda:d): give the executor
            # torch's current stream of each, the streams the stages compute on, and their
            # CUDA ordinals, on which events and peer copies are made.
            kwargs["streams"] = [torch.cuda.current_stream(d).cuda_stream for d in self.devices]
            kwargs["devices"] = [d.index if d.index is not None else torch.cuda.current_device()
                                 for d in self.devices]
        self.executor = Executor(self.num_devices, backend=self.backend,
                                 profile_steps=self.profile_steps, **kwargs)
        self.transports = transports_mod.for_edges(self.transfer, self._edges, self._device_of,
                                                   self.devices, self.executor,
                                                   timeout=min(self.timeout, 1e9))

    def execute(self, plan: Any, stages: Sequence[Any], batches: Sequence[Tuple[Any, Any]],
                before_commit: Any = None, carry: Optional[Any] = None,
                first_minibatch: int = 0) -> RunOutcome:
        """Run ``plan`` over ``batches``; see the module docstring. ``before_commit(run,
        stages) -> bool``, after a successful run: whether to commit its gradients (False: the
        run is dropped as a failed one, e.g. a non-finite gradient under loss scaling).

        ``carry`` (a :class:`~pipetrain.dispatch.Carry`): ``plan`` is one window of a streamed
        asynchronous run (:class:`~pipetrain.async_windows.WindowPlan`); its data comes from
        ``carry.feed`` (``batches`` is ignored), and on success the stages keep their stash,
        versions and meters and the mailbox its pending values for the next window. A failure
        drops all of it, as for any run. ``first_minibatch``: how the caller numbers
        ``batches[0]`` (in the error of a batch that cannot be split).

        Raises:
            ValueError: the batches cannot be split into the plan's micro-batches.
            ExecutorError: an action failed or the run stalled (the caller names it).
        """
        from pipetrain.executor import active

        # Interpreter exit (pipetrain.executor._close_all) waits until no thread is in here:
        # a daemon thread killed by finalization inside a torch op aborts the process.
        with active():
            return self._execute(plan, stages, batches, before_commit, carry, first_minibatch)

    def _execute(self, plan: Any, stages: Sequence[Any], batches: Sequence[Tuple[Any, Any]],
                 before_commit: Any = None, carry: Optional[Any] = None,
                 first_minibatch: int = 0) -> RunOutcome:
        from pipetrain.executor import ExecutorError

        t0 = time.perf_counter()
        run = Run(plan, stages, self.transports, self.devices, batches, self.num_threads, carry,
                  first_minibatch)
        self.meters = run.meters
        # resume / keep only for a window of a stream (stage kinds that never stream, such as
        # CUDA-graphed stages, take neither).
        resume = {"resume": True} if carry is not None else {}
        for st in stages:
            st.begin_run(run.meters[plan.graph.stage(st.index).device], **resume)
        old_threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        ok = False
        try:
            # cuda_graphs: a run whose every action is a linked captured graph goes native.
            native = self.graphs.native(plan, run) if self.graphs is not None else None
            timeline = self.executor.run(plan.compiled(self.executor),
                                         run.dispatch if native is None else native.dispatch,
                                         timeout=self.timeout,
                                         graphs=None if native is None else native.handles)
            if native is not None:
                native.finish(run)
            ok = before_commit is None or bool(before_commit(run, stages))
        except ExecutorError as err:
            if err.kind != "closed":     # closed: nothing to run any more
                self._recover(plan)
            raise
        finally:
            if self.num_threads:
                torch.set_num_threads(old_threads)
            for st in stages:
                st.end_run(commit=ok, **({"keep": True} if carry is not None else {}))
            if not ok:
                run.mailbox.clear()
            elif carry is not None:
                carry.runs += 1
        if ok:
            run.backward_into_user_tensors()
        return RunOutcome(run, timeline, time.perf_counter() - t0)

    def _recover(self, plan: Any) -> None:
        """After a failed run: let copies in flight finish before their tensors are dropped,
        and replace an executor left with a thread stuck in an action."""
        for tr in {id(t): t for t in self.transports.values()}.values():
            with contextlib.suppress(Exception):
                tr.drain(min(self.timeout, 60.0))
        from pipetrain import executor as executor_mod
        if self.executor.poisoned and not executor_mod._exiting:
            # Never replaced once the interpreter is exiting: a new executor would outlive
            # the close-all at exit (Executor() refuses then).
            old = self.executor
            plan.forget(old)
            self._new_executor()
            old.close()

    def close(self) -> None:
        """Stop the executor's threads (idempotent)."""
        if self.executor is not None:
            self.executor.close()
