"""The executor's lifetime and limits: run results by name, close() and cancel() while a run is
in progress (from another thread, from an action), the interpreter exiting mid-run, and
timeouts (inf, huge, invalid). Every test bounds its own time."""

import math
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pipetrain import _C
from pipetrain.executor import ERROR_KINDS, Executor, ExecutorError

SLEEP = 0.02  # per action in the "long" plans: long against scheduling, short against a test


def chain(p: int, m: int):
    """p devices, m actions each; device d's action k waits on device d-1's action k."""
    return [[(f"{d}F{k}", [(d - 1, k)] if d else []) for k in range(m)] for d in range(p)]


def cycle():
    """Two actions waiting on each other: never ready."""
    return [[("0F0", [(1, 0)])], [("1F0", [(0, 0)])]]


class Background:
    """``ex.run(plan, fn, timeout)`` on another thread; ``.error`` is what it raised."""

    def __init__(self, ex, plan, fn, timeout=30.0):
        self.error = None
        self.timeline = None

        def body():
            try:
                self.timeline = ex.run(plan, fn, timeout=timeout)
            except BaseException as err:  # noqa: BLE001 - the test inspects it
                self.error = err

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def join(self, timeout=10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return"
        return self.error


def started_plan(ex, p=2, m=200):
    """A long chain run in the background; returns once some actions have run."""
    ran = threading.Event()

    def action(d, i):
        if i >= 2:
            ran.set()
        time.sleep(SLEEP)

    bg = Background(ex, chain(p, m), action)
    assert ran.wait(10.0), "the run did not start"
    return bg


def assert_closed(ex):
    assert ex.closed
    for call in (lambda: ex.run(chain(2, 1), lambda d, i: None),
                 lambda: ex.compile(chain(2, 1)), lambda: ex.record(0), lambda: ex.stream(0),
                 lambda: ex.synchronize(), lambda: ex.timeline([[], []])):
        with pytest.raises(RuntimeError, match="^executor is closed$"):
            call()
    ex.close()  # idempotent


# -- results by name -----------------------------------------------------------------------


def test_run_result_has_named_fields():
    core = _C.runtime.Executor(2, _C.runtime.Backend.cpu(), [], [0, 1], 0, 64, False)
    try:
        ok = core.run(chain(2, 2), lambda d, i: None, 5.0)
        assert isinstance(ok, _C.runtime.RunResult)
        assert ok.ok and ok.kind == _C.runtime.RunKind.ok and ok.kind.name == "ok"
        assert (ok.device, ok.index, ok.dep_device, ok.dep_index) == (-1, -1, -1, -1)
        assert ok.label == "" and ok.message == "" and ok.cause is None
        start, end, offsets, waits, wall = ok.timeline
        assert list(offsets) == [0, 2, 4] and len(start) == 4 and wall > 0

        def boom(d, i):
            if (d, i) == (1, 1):
                raise KeyError("x")

        bad = core.run(chain(2, 2), boom, 5.0)
        assert not bad.ok and bad.kind == _C.runtime.RunKind.action
        assert (bad.device, bad.index, bad.label) == (1, 1, "1F1")
        assert isinstance(bad.cause, KeyError)
        late = core.run(cycle(), lambda d, i: None, 0.2)
        assert late.kind.name == "timeout" and {(late.device, late.dep_device)} <= {(0, 1), (1, 0)}
    finally:
        core.close()
    assert core.closed


def test_error_kinds_are_named_once():
    assert set(ERROR_KINDS) == {"action", "backend", "timeout", "interrupted", "stuck",
                                "closed", "cancelled"}
    assert set(_C.runtime.RunKind.__members__) == set(ERROR_KINDS) | {"ok"}


# -- close() and cancel() during a run -----------------------------------------------------


def test_close_from_another_thread_mid_run():
    ex = Executor(2)
    bg = started_plan(ex)
    t0 = time.monotonic()
    ex.close()
    closing = time.monotonic() - t0
    err = bg.join()
    assert isinstance(err, ExecutorError), err
    assert err.kind == "closed"
    assert str(err) == "the executor was closed during the run"
    assert closing < 2.0  # an action is SLEEP long: close waits for one, not for the plan
    assert not ex.poisoned
    assert_closed(ex)


def test_close_gives_up_on_a_stuck_action():
    ex = Executor(2)
    entered = threading.Event()

    def action(d, i):
        if d == 0:
            entered.set()
            time.sleep(3.0)  # "stuck": far longer than close's grace

    bg = Background(ex, chain(2, 1), action)
    assert entered.wait(10.0)
    t0 = time.monotonic()
    ex.close(grace=0.3)
    assert time.monotonic() - t0 < 2.0
    err = bg.join(5.0)
    assert isinstance(err, ExecutorError) and err.kind == "closed"
    assert "did not stop within the timeout" in str(err) and "device 0 action 0 (0F0)" in str(err)
    assert ex.poisoned
    assert_closed(ex)


def test_close_from_inside_an_action():
    ex = Executor(2)

    def action(d, i):
        if (d, i) == (1, 3):
            ex.close()  # cannot wait for its own thread: cancels, returns
        time.sleep(0.001)

    t0 = time.monotonic()
    with pytest.raises(ExecutorError) as info:
        ex.run(chain(2, 100), action, timeout=10.0)
    assert time.monotonic() - t0 < 3.0
    assert info.value.kind == "closed"
    assert_closed(ex)


def test_cancel_from_another_thread_keeps_the_executor_usable():
    with Executor(2) as ex:
        assert ex.cancel("nothing runs") is False
        bg = started_plan(ex)
        assert ex.cancel("enough") is True
        err = bg.join()
        assert isinstance(err, ExecutorError) and err.kind == "cancelled" and str(err) == "enough"
        tl = ex.run(chain(2, 3), lambda d, i: None, timeout=5.0)
        assert all(len(s) == 3 and (s >= 0).all() for s in tl.start_ns)
    assert ex.cancel("closed") is False


# -- the interpreter exiting mid-run -------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent("""
    import atexit, os, sys, threading, time
    done = threading.Event()
    # Registered before pipetrain's hook, so it runs after it (atexit is LIFO): it gives the
    # daemon thread, back in Python, the moment to report how its run ended.
    atexit.register(done.wait, 10)
    from pipetrain.executor import Executor
    ex = Executor(3)
    started = threading.Event()
    def action(d, i):
        started.set()
        if WORK:  # torch inside the action: its frames are on the worker's stack too
            import torch
            torch.mm(torch.ones(128, 128), torch.ones(128, 128)).sum().item()
        time.sleep(0.05)
    plan = [[(f"{d}F{k}", [(d - 1, k)] if d else []) for k in range(1000)] for d in range(3)]
    def body():
        try:
            ex.run(plan, action, timeout=TIMEOUT)
        except Exception as err:
            os.write(1, f"run raised {type(err).__name__} {getattr(err, 'kind', None)}\\n".encode())
        done.set()
    threading.Thread(target=body, daemon=True).start()
    started.wait(20)
    print("main exits", flush=True)
""")


@pytest.mark.parametrize("timeout,work", [("60.0", "False"), ("float('inf')", "True")])
def test_interpreter_exit_mid_run_is_clean(timeout, work):
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    script = EXIT_SCRIPT.replace("TIMEOUT", timeout).replace("WORK", work)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "terminate called" not in proc.stderr and "Fatal Python error" not in proc.stderr
    assert "main exits" in proc.stdout
    # The run was cancelled (not left to finish its 1000 x 50 ms) and got back to Python.
    assert "run raised ExecutorError closed" in proc.stdout, proc.stdout
    assert elapsed < 20.0  # import (~2-5 s on a loaded machine) + close (~50 ms)


# -- timeouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [math.inf, 1e10, 1e300, 9.3e9])
def test_infinite_and_huge_timeouts_never_fire(timeout):
    with Executor(2) as ex:
        tl = ex.run(chain(2, 4), lambda d, i: time.sleep(0.005), timeout=timeout)
        assert all((s >= 0).all() for s in tl.start_ns)
        # Still interruptible: a cycle never completes, and cancel() stops it.
        timer = threading.Timer(0.3, ex.cancel, args=("stop",))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(ExecutorError) as info:
            ex.run(cycle(), lambda d, i: None, timeout=timeout)
        timer.join()
        assert info.value.kind == "cancelled" and time.monotonic() - t0 < 3.0
        assert ex.run(chain(2, 2), lambda d, i: None, timeout=timeout).wall_ns > 0


@pytest.mark.parametrize("timeout", [math.nan, 0, 0.0, -1.0, -math.inf])
def test_invalid_timeouts_raise_value_error_before_running(timeout):
    calls = []
    with Executor(2) as ex:
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            ex.run(chain(2, 2), lambda d, i: calls.append((d, i)), timeout=timeout)
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            ex.synchronize(timeout)
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            ex.wait(1, ex.record(0), timeout)
        assert calls == []
        ex.run(chain(2, 2), lambda d, i: calls.append((d, i)), timeout=5.0)
        assert sorted(calls) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_cpp_rejects_nan_timeout():
    core = _C.runtime.Executor(1, _C.runtime.Backend.cpu(), [], [0], 0, 64, False)
    try:
        with pytest.raises(ValueError, match="timeout must be positive"):
            core.run([[("0F0", [])]], lambda d, i: None, math.nan)
        assert core.run([[("0F0", [])]], lambda d, i: None, math.inf).ok
    finally:
        core.close()


def test_infinite_waits_on_events_and_streams():
    with Executor(2) as ex:
        ev = ex.record(0)
        ev.synchronize(math.inf)
        ex.wait(1, ev, timeout=math.inf)
        ex.synchronize(math.inf)
        ex.synchronize(1e300)


def test_cancel_ends_an_action_blocked_in_wait():
    """An action waiting for an event (a transfer's copy) stops when the run is cancelled,
    instead of blocking until its own timeout or the close's grace."""
    from pipetrain.executor import Event

    with Executor(2) as ex:
        backend = ex._backend
        stream = backend.create_stream(0)
        backend.host_callback(stream, lambda: time.sleep(1.5))  # the "copy": late
        late = Event(backend, backend.create_event(0), 0)
        backend.record(late.handle, stream)
        waiting = threading.Event()

        def action(d, i):
            if d == 1:
                waiting.set()
                ex.wait(1, late, timeout=60.0)

        bg = Background(ex, [[("0F0", [])], [("1F0", [])]], action)
        assert waiting.wait(10.0)
        time.sleep(0.05)
        t0 = time.monotonic()
        assert ex.cancel("stop")
        err = bg.join(5.0)
        assert time.monotonic() - t0 < 1.0
        assert isinstance(err, ExecutorError) and err.kind == "cancelled" and str(err) == "stop"
        assert not ex.poisoned
        # Outside a run the wait is not "cancelled": it completes, or times out.
        with pytest.raises(ExecutorError, match="did not complete") as info:
            ex.wait(1, late, timeout=0.05)
        assert info.value.kind == "timeout"
        ex.wait(1, late, timeout=10.0)
        assert late.query()
        backend.destroy_stream(stream)
