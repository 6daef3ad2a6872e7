"""The executor on the CPU backend: ordering, real concurrency, errors, timeouts, timeline."""

import contextlib
import random
import threading
import time

import numpy as np
import pytest

from pipetrain.executor import CompiledPlan, Executor, ExecutorError, cuda_backend_available


def random_dag_plan(seed: int, devices: int, per_device: int, max_deps: int = 3):
    """A random acyclic plan: actions are drawn in a random global interleaving of the
    per-device sequences, and each depends only on actions drawn before it."""
    rng = random.Random(seed)
    remaining = [per_device] * devices
    drawn: list[tuple[int, int]] = []
    plan = [[] for _ in range(devices)]
    while any(remaining):
        d = rng.choice([k for k in range(devices) if remaining[k]])
        i = per_device - remaining[d]
        remaining[d] -= 1
        pool = [a for a in drawn if a[0] != d] or drawn
        deps = rng.sample(pool, min(len(pool), rng.randint(0, max_deps)))
        if deps and rng.random() < 0.2 and i > 0:
            deps.append((d, rng.randrange(i)))  # same-device deps are allowed (and implied)
        plan[d].append((f"{d}F{i}", deps))
        drawn.append((d, i))
    return plan


def one_f_one_b(p: int, m: int):
    """1F1B from its closed form: stage s does p-1-s warm-up forwards, then alternates."""
    plan = []
    for s in range(p):
        warm = min(p - 1 - s, m)
        order = [("F", k) for k in range(warm)]
        f = warm
        for b in range(m):
            if f < m:
                order.append(("F", f))
                f += 1
            order.append(("B", b))
        pos = {a: i for i, a in enumerate(order)}
        plan.append(([f"{s}{k}{mb}" for k, mb in order], pos))
    out = []
    for s, (labels, _) in enumerate(plan):
        row = []
        for label in labels:
            kind, mb = label[1], int(label[2:])
            if kind == "F":
                deps = [(s - 1, plan[s - 1][1][("F", mb)])] if s > 0 else []
            else:
                deps = [(s + 1, plan[s + 1][1][("B", mb)])] if s < p - 1 else []
            row.append((label, deps))
        out.append(row)
    return out


@pytest.fixture
def ex2():
    with Executor(2) as ex:
        yield ex


def check_order(plan, timeline, order):
    """Every action ran once; program order and every dependency respected."""
    expected = {(d, i) for d, row in enumerate(plan) for i in range(len(row))}
    assert sorted(order) == sorted(expected) and len(order) == len(expected)
    pos = {a: k for k, a in enumerate(order)}
    for d, row in enumerate(plan):
        s, e = timeline.start_ns[d], timeline.end_ns[d]
        assert np.all(s >= 0) and np.all(e >= s)
        assert np.all(s[1:] >= e[:-1]), f"device {d} overlapped its own actions"
        for i, (_, deps) in enumerate(row):
            for dd, di in deps:
                assert pos[(dd, di)] < pos[(d, i)]
                assert timeline.end_ns[dd][di] <= s[i], f"{d},{i} started before dep {dd},{di} ended"


@pytest.mark.parametrize("seed", range(8))
def test_random_dags_respect_dependencies(seed):
    devices = 2 + seed % 3
    plan = random_dag_plan(seed, devices, per_device=12)
    order = []
    rng = random.Random(seed)
    delays = {(d, i): rng.choice([0, 0, 1e-4]) for d, row in enumerate(plan) for i in range(len(row))}

    def run_action(d, i):
        order.append((d, i))
        if delays[(d, i)]:
            time.sleep(delays[(d, i)])  # releases the GIL: lets other threads interleave

    with Executor(devices) as ex:
        timeline = ex.run(plan, run_action, timeout=5.0)
    check_order(plan, timeline, order)


def test_1f1b_plan_and_reuse():
    plan = one_f_one_b(4, 8)
    with Executor(4) as ex:
        compiled = ex.compile(plan)
        assert isinstance(compiled, CompiledPlan) and len(compiled) == 4 * 16
        for _ in range(3):  # the executor and the compiled plan are reusable
            order = []
            timeline = ex.run(compiled, lambda d, i: order.append((d, i)), timeout=5.0)
            check_order(plan, timeline, order)
            assert timeline.labels[1][:3] == ["1F0", "1F1", "1F2"]


def test_threads_really_overlap(ex2):
    # Two independent 50 ms sleeps (GIL released) on two devices run at the same time.
    timeline = ex2.run([[("0F0", [])], [("1F0", [])]], lambda d, i: time.sleep(0.05), timeout=5.0)
    s = [timeline.start_ns[d][0] for d in range(2)]
    e = [timeline.end_ns[d][0] for d in range(2)]
    assert max(s) < min(e), "the two actions did not overlap"
    assert timeline.wall_ns < 0.09e9  # sequential would be >= 100 ms


def test_numpy_work_overlaps():
    # A numpy matmul releases the GIL too; each device runs its own chain.
    a = np.random.default_rng(0).standard_normal((300, 300))
    plan = [[(f"{d}F{i}", []) for i in range(4)] for d in range(2)]
    with Executor(2) as ex:
        timeline = ex.run(plan, lambda d, i: a @ a @ a, timeout=10.0)
    spans = [(timeline.start_ns[d][0], timeline.end_ns[d][-1]) for d in range(2)]
    assert max(s for s, _ in spans) < min(e for _, e in spans)


def test_action_error_names_action_and_chains_cause(ex2):
    started = []
    plan = [[(f"0F{i}", []) for i in range(200)], [("1F0", []), ("1B3", [(0, 1)])]]

    def run_action(d, i):
        started.append((d, i))
        if d == 1 and i == 1:
            raise KeyError("boom")
        time.sleep(0.002)

    t0 = time.perf_counter()
    with pytest.raises(ExecutorError) as info:
        ex2.run(plan, run_action, timeout=5.0)
    err = info.value
    assert (err.device, err.index, err.label, err.kind) == (1, 1, "1B3", "action")
    assert isinstance(err.__cause__, KeyError) and "1B3" in str(err)
    # Device 0 stopped issuing: far fewer than its 200 actions (0.4 s) ran.
    assert time.perf_counter() - t0 < 0.3
    assert sum(1 for d, _ in started if d == 0) < 100
    # The executor is reusable.
    order = []
    ex2.run(plan, lambda d, i: order.append((d, i)), timeout=5.0)
    assert len(order) == 202


def test_error_wakes_blocked_waiters():
    # Devices 1 and 2 block on device 0's second action; device 0's first action fails.
    plan = [[("0F0", []), ("0F1", [])], [("1F0", [(0, 1)])], [("2F0", [(0, 1)])]]

    def run_action(d, i):
        time.sleep(0.05)  # long enough for the others to reach their blocking wait
        raise ValueError("bad input")

    with Executor(3, spin=10, yields=1) as ex:
        t0 = time.perf_counter()
        with pytest.raises(ExecutorError) as info:
            ex.run(plan, run_action, timeout=10.0)
        assert time.perf_counter() - t0 < 1.0  # not the 10 s timeout
        assert (info.value.device, info.value.index, info.value.label) == (0, 0, "0F0")
        assert isinstance(info.value.__cause__, ValueError)


def test_cycle_times_out_naming_the_wait(ex2):
    plan = [[("0F0", []), ("0B0", [(1, 1)])], [("1F0", []), ("1B0", [(0, 1)])]]
    t0 = time.perf_counter()
    with pytest.raises(ExecutorError) as info:
        ex2.run(plan, lambda d, i: None, timeout=0.5)
    elapsed = time.perf_counter() - t0
    assert 0.5 <= elapsed < 1.5
    err = info.value
    assert err.kind == "timeout"
    assert (err.device, err.index, err.dependency) in {(0, 1, (1, 1)), (1, 1, (0, 1))}
    assert "0B0" in str(err) and "1B0" in str(err) and "waits on" in str(err)
    ex2.run([[("0F0", [])], [("1F0", [(0, 0)])]], lambda d, i: None, timeout=1.0)


def test_slow_action_times_out_then_executor_recovers(ex2):
    plan = [[("0F0", [])], [("1F0", [(0, 0)])]]
    with pytest.raises(ExecutorError) as info:
        ex2.run(plan, lambda d, i: time.sleep(0.6) if d == 0 else None, timeout=0.4)
    assert info.value.kind == "timeout" and info.value.dependency == (0, 0)
    assert not ex2._core.poisoned
    ex2.run(plan, lambda d, i: None, timeout=1.0)


def test_timeout_without_waiter_names_the_running_action():
    with Executor(1) as ex:
        with pytest.raises(ExecutorError, match="0F1.*running") as info:
            ex.run([[("0F0", []), ("0F1", [])]], lambda d, i: time.sleep(0.4 * i), timeout=0.25)
        assert (info.value.kind, info.value.device, info.value.index) == ("timeout", 0, 1)
        assert info.value.dependency is None


def test_empty_plan(ex2):
    timeline = ex2.run([[], []], lambda d, i: None, timeout=1.0)
    assert [len(s) for s in timeline.start_ns] == [0, 0] and timeline.busy_ns(0) == 0


def test_stuck_action_poisons_executor():
    release = threading.Event()
    ex = Executor(1)
    with pytest.raises(ExecutorError, match="unusable"):
        ex.run([[("0F0", [])]], lambda d, i: release.wait(5.0), timeout=0.2)
    assert ex._core.poisoned
    with pytest.raises(ExecutorError, match="unusable"):
        ex.run([[("0F0", [])]], lambda d, i: None, timeout=0.2)
    release.set()  # let the stuck thread finish; it exits on its own
    ex.close()


@pytest.mark.parametrize("plan, match", [
    ([[("0F0", [(0, 5)])], []], "index must be in"),
    ([[("0F0", [(2, 0)])], []], "device must be in"),
    ([[("0F0", [(-1, 0)])], []], "device must be in"),
    ([[("0F0", []), ("0F1", [(0, 1)])], []], "must come earlier"),
    ([[("0F0", [(1,)])], [("1F0", [])]], r"\(device, index\)"),
    ([[("0F0",)], []], r"\(label, deps\)"),
    ([[("0F0", [])]], "device rows"),
])
def test_bad_plans_raise_value_error_before_running(ex2, plan, match):
    ran = []
    with pytest.raises(ValueError, match=match):
        ex2.run(plan, lambda d, i: ran.append(1), timeout=1.0)
    assert not ran


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_devices"):
        Executor(0)
    with pytest.raises(ValueError, match="backend"):
        Executor(1, backend="tpu")
    with Executor(1) as ex, pytest.raises(ValueError, match="timeout"):
        ex.run([[("0F0", [])]], lambda d, i: None, timeout=0)


def test_gil_released_while_waiting(ex2):
    # Device 1 waits 100 ms for device 0 while the main thread's Python keeps running.
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        ex2.run([[("0F0", [])], [("1F0", [(0, 0)])]],
                lambda d, i: time.sleep(0.1) if d == 0 else None, timeout=5.0)
    finally:
        stop.set()
        t.join()
    assert len(ticks) >= 8


def test_copy_after_event_on_cpu_streams():
    # A stream is an ordered queue: a host callback, then an event, then a copy that must see
    # what the callback wrote; the consumer waits on the copy's event.
    with Executor(2) as ex:
        b = ex._backend
        src = np.zeros(1 << 16, dtype=np.float32)
        dst = np.full_like(src, -1)
        stream = b.create_stream(0)
        try:
            def produce():
                time.sleep(0.05)
                src[:] = np.arange(src.size, dtype=np.float32)
            b.host_callback(stream, produce)
            ready = ex._backend.create_event(0)
            b.record(ready, stream)
            from pipetrain.executor import Event
            ev = ex.copy(src.ctypes.data, dst.ctypes.data, src.nbytes, 0, 1,
                         after=Event(b, ready, 0))
            assert not ev.query()  # still behind the 50 ms callback
            ex.wait(1, ev, timeout=5.0)
            assert ev.query()
            np.testing.assert_array_equal(dst, np.arange(src.size, dtype=np.float32))
        finally:
            b.destroy_stream(stream)


def test_copy_default_after_is_issued_work():
    with Executor(2) as ex:
        src = np.arange(100, dtype=np.int64)
        dst = np.zeros_like(src)
        ev = ex.copy(src.ctypes.data, dst.ctypes.data, src.nbytes, 0, 1)
        ev.synchronize(5.0)
        ex.synchronize(5.0)
        np.testing.assert_array_equal(dst, src)
        with pytest.raises(ValueError, match="dst_device"):
            ex.copy(src.ctypes.data, dst.ctypes.data, 8, 0, 2)


def test_ctrl_c_interrupts_a_run():
    import _thread

    def run_action(d, i):
        if i == 0:
            _thread.interrupt_main()  # as if Ctrl-C arrived while run() waits
        time.sleep(0.01)

    with Executor(1) as ex:
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            ex.run([[(f"0F{i}", []) for i in range(200)]], run_action, timeout=10.0)
        assert time.perf_counter() - t0 < 1.0
        ex.run([[("0F0", [])]], lambda d, i: None, timeout=1.0)


def test_one_run_at_a_time(ex2):
    inner = []

    def run_action(d, i):
        if d == 0:
            with pytest.raises(RuntimeError, match="already running"):
                ex2.run([[("0F0", [])], [("1F0", [])]], lambda *a: None)
            inner.append(1)

    ex2.run([[("0F0", [])], [("1F0", [])]], run_action, timeout=5.0)
    assert inner == [1]


def test_profile_window_validated_and_harmless_on_cpu():
    with pytest.raises(ValueError, match="profile_steps"):
        Executor(1, profile_steps=(3, 3))
    with Executor(1, profile_steps=(1, 2), nvtx=True) as ex:  # no-ops on the CPU backend
        for _ in range(3):
            ex.run([[("0F0", [])]], lambda d, i: None, timeout=1.0)


def test_cuda_only_arguments_rejected_on_cpu():
    with pytest.raises(ValueError, match="CUDA backend"):
        Executor(2, streams=[0, 0])
    with pytest.raises(ValueError, match="CUDA backend"):
        Executor(2, devices=[0, 0])


def _check_handoff(backend: str):
    """Device 0 produces tensor k (slowly, on CUDA), copies it to device 1 through the copy
    stream; device 1 waits on the copy's event and doubles it. Any missing ordering shows up
    as a stale (zero) buffer in the result."""
    import torch

    m, n = 6, 1 << 14
    cuda = backend == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    dev = [torch.device("cuda", min(d, gpus - 1)) if cuda else torch.device("cpu") for d in range(2)]
    streams = [torch.cuda.Stream(dev[d]) for d in range(2)] if cuda else None
    kwargs = dict(streams=[s.cuda_stream for s in streams], devices=[x.index for x in dev]) if cuda else {}
    x = [torch.zeros(n, device=dev[0]) for _ in range(m)]
    buf = [torch.zeros(n, device=dev[1]) for _ in range(m)]
    y = [None] * m
    events = [None] * m
    plan = [[(f"0F{k}", []) for k in range(m)], [(f"1F{k}", [(0, k)]) for k in range(m)]]
    with Executor(2, backend=backend, **kwargs) as ex:
        def run_action(d, k):
            ctx = torch.cuda.stream(streams[d]) if cuda else contextlib.nullcontext()
            with ctx:
                if d == 0:
                    if cuda:
                        torch.cuda._sleep(2_000_000)  # keep the producer's stream busy
                    x[k].fill_(k + 1.0)
                    events[k] = ex.copy(x[k].data_ptr(), buf[k].data_ptr(), x[k].nbytes, 0, 1)
                else:
                    ex.wait(1, events[k])
                    y[k] = buf[k] * 2
        ex.run(plan, run_action, timeout=30.0)
        ex.synchronize(30.0)
    for k in range(m):
        torch.testing.assert_close(y[k].cpu(), torch.full((n,), 2.0 * (k + 1)))


def test_handoff_through_copy_stream_cpu():
    _check_handoff("cpu")


@pytest.mark.skipif(not cuda_backend_available(), reason="needs pipetrain._C_cuda and a CUDA device")
def test_handoff_through_copy_stream_cuda():
    _check_handoff("cuda")


def test_run_releases_the_callable():
    """After run() returns, the executor holds no reference to run_action, so whatever it
    references (a Pipeline, and through it the executor's threads) can be collected."""
    import gc
    import weakref

    class Owner:
        def act(self, device, index):
            pass

    owner = Owner()
    ref = weakref.ref(owner)
    with Executor(2) as ex:
        ex.run([[("0F0", [])], [("1F0", [(0, 0)])]], owner.act, timeout=5.0)
        del owner
        gc.collect()
        assert ref() is None
        assert not ex.poisoned
