"""The executor: runs a validated plan with one issuing thread per device.

A plan is, per device, a list of ``(label, deps)`` in issue order; ``deps`` lists the
``(device, index)`` of actions (on any device) that must finish before this one starts,
beyond program order on its own device -- exactly what ``Schedule.dependencies(device)``
returns. The executor (C++, ``pipetrain._C.runtime``) starts one thread per device; each
walks its list, waits for missing dependencies with the GIL released, then calls
``run_action(device, index)`` with the GIL held::

    ex = Executor(2)
    plan = [[("0F0", []), ("0B0", [(1, 1)])],
            [("1F0", [(0, 0)]), ("1B0", [])]]
    timeline = ex.run(plan, lambda device, index: ..., timeout=10.0)

Backends: ``"cpu"`` (host threads; a stream is an ordered queue, an event a completion flag)
and ``"cuda"`` (``pipetrain._C_cuda``: real streams and events; the host-side dependency is
"the producer was issued", the device-side one a ``cudaEvent`` the consumer's stream waits
on). ``"auto"`` picks CUDA when a CUDA build and device exist.

Failures raise :class:`ExecutorError` naming the device, index and label, with the action's
exception as ``__cause__``; every thread stops and the executor stays usable. If no action
completes for ``timeout`` seconds the run is cancelled with an error saying which device
waited on which dependency (``timeout=math.inf``: never).

Lifetime: :meth:`Executor.close` may be called from any thread, also while a run is in
progress: it cancels the run (which raises ``ExecutorError(kind="closed")``), waits for the
threads to leave their actions (bounded), then joins them. At interpreter exit every
executor is closed that way before finalization starts, so a daemon thread inside
:meth:`Executor.run` gets back to Python instead of being killed inside C++; exit then waits
until no thread is inside ``Runner.execute`` / ``Pipeline.step`` (:func:`active`), whose torch
work before and after the run would abort the process if finalization killed the thread
there. From then on no executor is created and no step starts (RuntimeError).
"""

from __future__ import annotations

import atexit
import importlib
import math
import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from pipetrain import _C
from pipetrain.timeline import Timeline

_rt = _C.runtime

PlanList = Sequence[Sequence[tuple[str, Sequence[tuple[int, int]]]]]


#: The kinds of :class:`ExecutorError` a run raises, named once (``pipetrain._C.runtime.RunKind``
#: less ``ok``; ``"interrupted"`` re-raises the KeyboardInterrupt itself instead).
ERROR_KINDS: tuple[str, ...] = tuple(name for name in _rt.RunKind.__members__ if name != "ok")


class ExecutorError(RuntimeError):
    """A run failed: an action raised, a dependency never came, or a backend call failed.

    Attributes:
        device, index, label: the action that failed or was left waiting (None if unknown).
        dependency: for a timeout, the (device, index) it waited on; else None.
        kind: one of :data:`ERROR_KINDS`: "action" (an action raised), "backend" (a backend
            call failed), "timeout" (nothing completed for ``timeout``), "stuck" (the
            executor is poisoned), "closed" (:meth:`Executor.close` during the run),
            "cancelled" (:meth:`Executor.cancel`).
    """

    def __init__(self, message: str, *, kind: str = "action", device: int | None = None,
                 index: int | None = None, label: str | None = None,
                 dependency: tuple[int, int] | None = None):
        super().__init__(message)
        self.kind = kind
        self.device = device
        self.index = index
        self.label = label
        self.dependency = dependency


def cuda_backend_available() -> bool:
    """True when ``pipetrain._C_cuda`` was built and sees at least one CUDA device."""
    try:
        cuda = importlib.import_module("pipetrain._C_cuda")
    except ImportError:
        return False
    return cuda.device_count() > 0


def _backend(name: str):
    if name == "auto":
        name = "cuda" if cuda_backend_available() else "cpu"
    if name == "cpu":
        return _rt.Backend.cpu()
    if name == "cuda":
        try:
            cuda = importlib.import_module("pipetrain._C_cuda")
        except ImportError as err:
            raise ValueError("backend='cuda' needs pipetrain._C_cuda, which was not built "
                             "(build with nvcc and PIPETRAIN_CUDA=1)") from err
        if cuda.device_count() == 0:
            raise ValueError("backend='cuda' needs a CUDA device; none is visible")
        return _rt.Backend.from_capsule(cuda.backend())
    raise ValueError(f"backend must be 'cpu', 'cuda' or 'auto', not {name!r}")


class Event:
    """A backend event (CUDA: a ``cudaEvent_t``; CPU: a completion flag)."""

    def __init__(self, backend, handle: int, device: int):
        self._backend, self.handle, self.device = backend, handle, device

    def query(self) -> bool:
        """True once everything before the event's record has run."""
        return self._backend.query(self.handle)

    def synchronize(self, timeout: float = 60.0) -> None:
        """Block (GIL released) until the event completes; ExecutorError after ``timeout``
        (``math.inf``: none; nan, 0 or negative: ValueError)."""
        timeout = _check_timeout(timeout)
        if not self._backend.wait_event(self.handle, timeout):
            raise ExecutorError(f"event on device {self.device} did not complete in {timeout} s",
                                kind="timeout", device=self.device)

    def __del__(self):
        # CUDA releases a pending event once it completes; a CPU event still referenced by a
        # pending stream task must outlive it, so it is leaked then (rare: tiny).
        try:
            if not self._backend.synchronous or self._backend.query(self.handle):
                self._backend.destroy_event(self.handle)
        except Exception:  # interpreter shutdown
            pass


class CompiledPlan:
    """A validated plan, reusable across runs (skips re-validation and conversion)."""

    def __init__(self, num_devices: int, plan: PlanList):
        self._plan = _rt.Plan(num_devices, plan)
        self.labels = [list(self._plan.labels(d)) for d in range(num_devices)]

    @property
    def num_devices(self) -> int:
        return self._plan.num_devices

    def __len__(self) -> int:
        return len(self._plan)


def _check_timeout(timeout: float, name: str = "timeout") -> float:
    """``timeout`` as a float of seconds: positive, ``math.inf`` for none. ValueError for nan,
    0 or negative values (nan would compare as "never" everywhere, silently)."""
    t = float(timeout)
    if math.isnan(t) or t <= 0:
        raise ValueError(f"{name} must be a positive number of seconds (math.inf: none), "
                         f"got {timeout!r}")
    return t


_live: weakref.WeakSet[Executor] = weakref.WeakSet()
_exiting = False

#: How long close() waits for actions still running in a cancelled run before it gives up on
#: them (detaching their threads; the executor is then poisoned).
CLOSE_GRACE_S = 5.0


#: How long interpreter exit waits for threads to leave pipetrain calls (:func:`active`).
EXIT_WAIT_S = CLOSE_GRACE_S + 5.0

_active_cv = threading.Condition(threading.Lock())
_active_count = 0


class _Active:
    """``with active():`` marks the calling thread as inside a pipetrain call that does torch
    work around executor runs (``Runner.execute``, ``Pipeline.step``). Entering raises
    RuntimeError once the interpreter is exiting; :func:`_close_all` waits until no thread
    is inside, so finalization never starts while such a call still runs torch ops. A call
    that overlapped the exit raises RuntimeError instead of returning."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _active_count
        with _active_cv:
            if _exiting:
                raise RuntimeError("pipetrain: the interpreter is exiting")
            _active_count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        global _active_count
        with _active_cv:
            _active_count -= 1
            if _active_count == 0:
                _active_cv.notify_all()
            exiting = _exiting
        if exiting and exc_type is None:
            # A call that overlapped the exit does not return into the caller's (daemon
            # thread's) loop, which would go on issuing torch ops during finalization.
            raise RuntimeError("pipetrain: the interpreter is exiting")


_ACTIVE = _Active()


def active() -> _Active:
    """The context manager described in :class:`_Active` (reentrant, any thread)."""
    return _ACTIVE


#: Test hook: called by :func:`_close_all` after it marked the exit, before closing.
_exit_hook: Callable[[], None] | None = None


@atexit.register
def _close_all() -> None:
    # atexit runs before finalization starts. From then on a thread re-taking the GIL is
    # killed (pthread_exit), which aborts the process ("terminate called without an active
    # exception") if it unwinds through a C++ noexcept frame: a run waiting in C++, a worker,
    # or any torch op, which drops and re-takes the GIL inside pybind11/torch destructors.
    # So: refuse new pipetrain calls and new executors, cancel every run and wait, GIL
    # released, until each run() call is back in Python and every worker has been joined,
    # then until every thread has left Runner.execute / Pipeline.step (which do torch work
    # before and after the run: a daemon thread there would be killed inside torch).
    global _exiting
    with _active_cv:
        _exiting = True
    if _exit_hook is not None:
        _exit_hook()
    for ex in list(_live):
        ex.close()
    with _active_cv:
        _active_cv.wait_for(lambda: _active_count == 0, EXIT_WAIT_S)


class Executor:
    """Runs plans on ``num_devices`` devices, one issuing thread each (created once, reused).

    Args:
        num_devices: number of devices (plan rows).
        backend: "cpu", "cuda" or "auto".
        streams: CUDA only: one raw ``cudaStream_t`` per device, as integers
            (``torch.cuda.Stream.cuda_stream``); default: torch's current stream of each device.
        devices: CUDA only: the CUDA ordinal of each plan device (default ``0..num_devices-1``);
            several plan devices may share a GPU (give them distinct ``streams`` to overlap).
        nvtx: push an NVTX range ``s1/F3`` around each action (default: on for CUDA).
        profile_steps: ``(start, stop)``: call cudaProfilerStart before run number ``start``
            and cudaProfilerStop after run number ``stop - 1`` (runs counted from 0).
        spin, yields: how long a thread busy-polls, then yields, before it blocks on a
            missing dependency (tuning knobs; the defaults suit a loaded CPU).
    """

    def __init__(self, num_devices: int, backend: str = "cpu", *,
                 streams: Sequence[int] | None = None, devices: Sequence[int] | None = None,
                 nvtx: bool | None = None,
                 profile_steps: tuple[int, int] | None = None, spin: int = 0, yields: int = 64):
        if num_devices <= 0:
            raise ValueError(f"num_devices must be positive, got {num_devices}")
        if _exiting:
            # Its threads could outlive the close-all at exit; no executor is made after it.
            raise RuntimeError("cannot create an Executor: the interpreter is exiting")
        self.num_devices = num_devices
        self._backend = _backend(backend)
        self.backend = self._backend.name
        if self._backend.synchronous:
            if streams is not None or devices is not None:
                raise ValueError("streams and devices are for the CUDA backend; "
                                 "the CPU backend issues inline on its threads")
            streams = []
        devices = list(range(num_devices)) if devices is None else [int(d) for d in devices]
        if len(devices) != num_devices:
            raise ValueError(f"expected {num_devices} device ids (one per device), got {len(devices)}")
        if not self._backend.synchronous:
            count = self._backend.device_count()
            if any(not 0 <= d < count for d in devices):
                raise ValueError(f"device ids must be in [0, {count}) (visible CUDA devices), "
                                 f"got {devices}")
            if streams is None:
                import torch
                streams = [torch.cuda.current_stream(d).cuda_stream for d in devices]
        self.devices = devices
        if len(streams) not in (0, num_devices):
            raise ValueError(f"expected {num_devices} streams (one per device), got {len(streams)}")
        if nvtx is None:
            nvtx = self.backend == "cuda"
        self._core = _rt.Executor(num_devices, self._backend, list(streams), devices, spin,
                                  yields, bool(nvtx))
        self._lock = threading.Lock()  # one run at a time
        self._idle = threading.Event()  # clear while a run() call is inside the C++ executor
        self._idle.set()
        if profile_steps is not None:
            a, b = profile_steps
            if not 0 <= a < b:
                raise ValueError(f"profile_steps must be (start, stop) with 0 <= start < stop, "
                                 f"got {profile_steps}")
        self._profile = profile_steps
        self._runs = 0
        self._copy_streams: dict[tuple[int, int], int] = {}
        _live.add(self)

    # -- running -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called; every later call raises RuntimeError."""
        return self._core.closed

    def _check_open(self) -> None:
        if self._core.closed:
            raise RuntimeError("executor is closed")

    def compile(self, plan: PlanList) -> CompiledPlan:
        """Validate ``plan`` once for repeated runs. Raises ValueError for a bad plan."""
        self._check_open()
        return CompiledPlan(self.num_devices, plan)

    def run(self, plan: PlanList | CompiledPlan, run_action: Callable[[int, int], None],
            timeout: float = 60.0, graphs: Sequence[Sequence[int]] | None = None) -> Timeline:
        """Run every action of ``plan`` once, respecting its dependencies.

        Args:
            plan: per device, a list of (label, deps), or a :class:`CompiledPlan`.
            run_action: ``run_action(device, index)``, called on that device's thread with
                the GIL held.
            timeout: seconds without any action completing before the run is cancelled;
                ``math.inf``: never (Ctrl-C, :meth:`cancel` and :meth:`close` still stop
                it). Values too large to represent clamp to ~146 years.
            graphs: per device, one captured-graph handle per action (0: call
                ``run_action``); the issuing thread launches those without the GIL
                (:mod:`pipetrain.cuda_graphs`; CUDA graph execs, or ``_C.runtime.HostGraphs``).
        Returns:
            the run's :class:`Timeline`.
        Raises:
            ValueError: the plan is malformed, or ``timeout`` is nan, 0 or negative (before
                anything runs).
            ExecutorError: an action raised, the run timed out, a backend call failed, or
                the run was cancelled or the executor closed meanwhile (see ``.kind``).
            RuntimeError: the executor is closed, or another run is in progress.
        """
        timeout = _check_timeout(timeout)
        if _exiting:
            raise RuntimeError("executor is closed (the interpreter is exiting)")
        if isinstance(plan, CompiledPlan):
            if plan.num_devices != self.num_devices:
                raise ValueError(f"plan has {plan.num_devices} devices, executor {self.num_devices}")
            core_plan, labels = plan._plan, plan.labels
        else:
            if len(plan) != self.num_devices:
                raise ValueError(f"plan has {len(plan)} device rows, executor has {self.num_devices}")
            core_plan = plan
            labels = [[str(a[0]) for a in row] for row in plan]
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("Executor.run is already running (one run at a time)")
        self._idle.clear()
        try:
            step = self._runs
            self._runs += 1
            if self._profile and step == self._profile[0]:
                self._backend.profiler_start()
            try:
                result = self._core.run(core_plan, run_action, timeout, graphs)
            finally:
                if self._profile and step == self._profile[1] - 1:
                    self._backend.profiler_stop()
        finally:
            # Back in Python, holding the GIL: from here a close() waiting for this run (and
            # interpreter finalization after it) may proceed.
            self._idle.set()
            self._lock.release()
        if not result.ok:
            _raise(result)
        return _timeline(labels, result.timeline)

    def cancel(self, reason: str = "cancelled", grace: float = CLOSE_GRACE_S) -> bool:
        """Cancel the run in progress, if any; callable from any thread (and from an action).

        The run raises ``ExecutorError(kind="cancelled")`` with ``reason`` as its message,
        once every thread has reached its next wait or action boundary; an action that does
        not return within ``grace`` seconds poisons the executor (the run returns anyway).
        Unlike :meth:`close`, the executor stays usable. Returns whether a run was in
        progress (False also once closed).
        """
        return self._core.cancel(str(reason), _check_timeout(grace, "grace"))

    def timeline(self, labels: list[list[str]]) -> Timeline:
        """The timeline of the last run (``labels`` as in the plan)."""
        return _timeline(labels, self._core.timeline())

    # -- streams, events, copies ------------------------------------------------------------

    def stream(self, device: int) -> int:
        """The compute stream handle of ``device`` (CUDA: a cudaStream_t; CPU: 0, inline).
        RuntimeError once closed (as for record, wait, copy, synchronize)."""
        return self._core.stream(device)

    def record(self, device: int) -> Event:
        """An event recorded now on ``device``'s compute stream (after the work issued so far)."""
        ev = Event(self._backend, self._backend.create_event(self.devices[device]), device)
        self._backend.record(ev.handle, self.stream(device))
        return ev

    def wait(self, device: int, event: Event, timeout: float = 60.0) -> None:
        """Make ``device``'s later work wait for ``event``: on CUDA its stream waits (the host
        does not block); on CPU the calling thread blocks (GIL released) at most ``timeout``
        seconds (then ExecutorError kind "timeout"), and no longer than the run in progress
        is alive: once it is cancelled (a failure, :meth:`cancel`, :meth:`close`) the wait
        raises ExecutorError kind "cancelled", so an action blocked here ends promptly."""
        timeout = _check_timeout(timeout)
        self._check_open()
        if self._backend.synchronous:
            kind = self._core.wait_event(event.handle, timeout)
            if kind == _rt.RunKind.timeout:
                raise ExecutorError(f"event on device {event.device} did not complete in "
                                    f"{timeout} s", kind="timeout", device=event.device)
            if kind == _rt.RunKind.cancelled:
                raise ExecutorError(f"device {device} stopped waiting for an event: the run "
                                    "was cancelled", kind="cancelled", device=device)
        else:
            self._backend.stream_wait(self.stream(device), event.handle)

    def copy(self, src_ptr: int, dst_ptr: int, nbytes: int, src_device: int, dst_device: int,
             after: Event | None = None) -> Event:
        """Enqueue a copy of ``nbytes`` from ``src_ptr`` (on ``src_device``) to ``dst_ptr`` (on
        ``dst_device``) on the copy stream of that device pair, after ``after`` (default: an
        event recorded now on ``src_device``'s compute stream). Returns the event the consumer
        passes to :meth:`wait`. On CUDA: ``cudaMemcpyPeerAsync`` with peer access where the
        hardware allows, else staged through pinned host buffers; on CPU: ``memcpy``.
        """
        self._check_open()
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        for name, dev in (("src_device", src_device), ("dst_device", dst_device)):
            if not 0 <= dev < self.num_devices:
                raise ValueError(f"{name} must be in [0, {self.num_devices}), got {dev}")
        key = (src_device, dst_device)
        stream = self._copy_streams.get(key)
        if stream is None:
            stream = self._copy_streams[key] = self._backend.create_stream(self.devices[src_device])
        if after is None:
            after = self.record(src_device)
        self._backend.stream_wait(stream, after.handle)
        self._backend.copy(stream, dst_ptr, self.devices[dst_device], src_ptr,
                           self.devices[src_device], nbytes)
        done = Event(self._backend, self._backend.create_event(self.devices[src_device]), src_device)
        self._backend.record(done.handle, stream)
        done._keep = after  # the copy stream refers to `after` until it has waited on it
        return done

    def synchronize(self, timeout: float = 60.0) -> None:
        """Wait for all work on the compute and copy streams; ExecutorError after ``timeout``
        (``math.inf``: none)."""
        timeout = _check_timeout(timeout)
        streams = [self.stream(d) for d in range(self.num_devices)] + list(self._copy_streams.values())
        for s in streams:
            if not self._backend.synchronize(s, timeout):
                raise ExecutorError(f"stream {s:#x} did not drain within {timeout} s", kind="timeout")

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def poisoned(self) -> bool:
        """True once a thread failed to leave an action within a cancelled run's timeout (or
        a cancel's/close's grace): the executor cannot run again (make a new one)."""
        return bool(self._core.poisoned)

    def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Close the executor for good (idempotent); callable from any thread.

        A run in progress is cancelled: it raises ``ExecutorError(kind="closed")``. close()
        waits, with the GIL released, for the threads to leave their actions (at most
        ``grace`` seconds; one still inside an action then is detached and the executor
        counts as poisoned), joins them, waits until that run() call is back in Python,
        and releases the copy streams. Called from an action or a signal handler during a
        run, it cannot wait for its own thread: it cancels, and the threads exit once their
        actions return. Every later call but ``close``, ``closed``, ``poisoned`` and
        ``cancel`` (which returns False) raises ``RuntimeError("executor is closed")``.
        """
        grace = _check_timeout(grace, "grace")
        waited = self._core.close(grace)
        if waited:
            # The C++ run has returned; its thread still needs the GIL to get back to Python.
            self._idle.wait(grace + 2.0)
        streams, self._copy_streams = self._copy_streams, {}
        if waited and not self.poisoned:
            for s in streams.values():
                self._backend.destroy_stream(s)
        # else an action may still be using a copy stream: leave it (a thread, leaked).

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _raise(result) -> None:
    """Raise what a failed ``RunResult`` (``pipetrain._C.runtime.RunResult``) stands for."""
    kind = result.kind.name
    cause = result.cause
    if kind == "interrupted" and cause is not None:
        raise cause
    device, index = result.device, result.index
    dep = (result.dep_device, result.dep_index) if result.dep_device >= 0 else None
    where = dict(device=device if device >= 0 else None, index=index if index >= 0 else None,
                 label=result.label or None, dependency=dep)
    if kind == "action":
        msg = (f"device {device} action {index} ({result.label}) raised "
               f"{type(cause).__name__}: {cause}")
        raise ExecutorError(msg, kind=kind, **where) from cause
    raise ExecutorError(result.message, kind=kind, **where)


def _timeline(labels: list[list[str]], raw) -> Timeline:
    """A :class:`Timeline` from the C++ timeline tuple (start, end, offsets, waits, wall)."""
    start, end, offsets, waits, wall = raw
    cut = offsets[1:-1]
    return Timeline(labels=labels, start_ns=np.split(start, cut), end_ns=np.split(end, cut),
                    waits=list(waits), wall_ns=int(wall))
