"""Plan: the IR actions of one executor run, ready to dispatch.

A plan is a validated :class:`~pipetrain.schedules.Schedule` seen from the runtime: for each
pipeline device, its actions in issue order (structured fields read from the C++ core: kind,
stage, micro-batch, version), the dependencies the executor waits on, and the stage graph the
stages are wired by. It spans ``num_minibatches`` mini-batches of ``num_microbatches`` each;
micro-batches are numbered globally, ``k = t * m + j`` for micro-batch ``j`` of mini-batch
``t``. A synchronous ``step()`` is the one-mini-batch plan, with an update ``U`` per stage when
the pipeline owns the optimizer (none when the user steps it); asynchronous schedules are
plans over many mini-batches with versions on every action and no flush between them. The
runtime never decides order or versions: the plan says, the validator has proved it.

Example (1F1B, p = 2, m = 2, two mini-batches with updates)::

    d0: 0F0@0 0F1@0 0B0@0 0B1@0 0U0 0F2@1 0F3@1 0B2@1 0B3@1 0U1
    d1: 1F0@0 1B0@0 1F1@0 1B1@0 1U0 1F2@1 1B2@1 1F3@1 1B3@1 1U1
"""

from __future__ import annotations

from typing import Any, List, Sequence

__all__ = ["Plan"]


class Plan:
    """The actions of one run of a schedule, compiled for an executor.

    Args:
        schedule: a :class:`~pipetrain.schedules.Schedule` (validated here: a bad one raises
            :class:`~pipetrain.schedules.ScheduleError` before anything runs).

    Attributes:
        schedule, graph: the schedule and its ``stage_graph`` (the C++ object).
        actions: per device, the structured actions in issue order.
        deps: per device, per action, the ``(device, index)`` it waits for.
        num_devices, num_microbatches (m, per mini-batch), num_minibatches (T).
        has_updates: whether the plan contains ``U`` actions.
    """

    def __init__(self, schedule: Any) -> None:
        schedule.validate()
        self.schedule = schedule
        self.graph = schedule.stage_graph
        self.num_devices = schedule.num_devices
        self.num_microbatches = schedule.num_microbatches
        self.num_minibatches = getattr(schedule, "num_minibatches", 1)
        self.actions: List[List[Any]] = [list(schedule.actions(d)) for d in range(self.num_devices)]
        self.deps = [schedule.dependencies(d) for d in range(self.num_devices)]
        self.has_updates = any(a.kind == "U" for row in self.actions for a in row)
        self._compiled = {}

    @property
    def total_microbatches(self) -> int:
        """``T * m``: the micro-batches the plan runs."""
        return self.num_microbatches * self.num_minibatches

    def minibatch_of(self, k: int) -> int:
        """The mini-batch of global micro-batch ``k``."""
        return k // self.num_microbatches

    def executor_plan(self) -> List[List[tuple]]:
        """Per device, ``(label, deps)`` in the executor's plan format."""
        return [[(str(a), [tuple(x) for x in dep]) for a, dep in zip(row, dep_rows)]
                for row, dep_rows in zip(self.actions, self.deps)]

    def compiled(self, executor: Any) -> Any:
        """The plan validated once for ``executor`` (cached per executor)."""
        key = id(executor)
        entry = self._compiled.get(key)
        if entry is None or entry[0] is not executor:
            entry = self._compiled[key] = (executor, executor.compile(self.executor_plan()))
        return entry[1]

    def forget(self, executor: Any) -> None:
        """Drop what was compiled for ``executor`` (it is being replaced)."""
        self._compiled.pop(id(executor), None)

    def count(self, kind: str) -> int:
        """How many actions of ``kind`` the plan holds."""
        return sum(1 for row in self.actions for a in row if a.kind == kind)

    def __repr__(self) -> str:
        return (f"Plan({self.schedule.name!r}, devices={self.num_devices}, "
                f"m={self.num_microbatches}, minibatches={self.num_minibatches}, "
                f"actions={sum(map(len, self.actions))}, updates={self.has_updates})")


def stages_on(graph: Any, device: int) -> Sequence[int]:
    """Ids of the stages placed on ``device``."""
    return [st.id for st in graph.stages if st.device == device]

