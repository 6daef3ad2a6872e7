"""The executor's timeline: monotone intervals, waits attributed to the right dependency,
busy + wait accounting for the wall time, Chrome trace export."""

import json
import time

import numpy as np
import pytest

from pipetrain import stats, trace
from pipetrain.executor import Executor
from pipetrain.timeline import Timeline

SLEEP = 0.01  # per action; large against thread wake-up and bookkeeping (microseconds)


def chain_plan(p: int, m: int):
    """p devices, m micro-batches, forward only: device d's F k waits on device d-1's F k."""
    return [[(f"{d}F{k}", [(d - 1, k)] if d else []) for k in range(m)] for d in range(p)]


def test_intervals_monotone_and_waits_attributed():
    p, m = 3, 4
    with Executor(p) as ex:
        tl = ex.run(chain_plan(p, m), lambda d, i: time.sleep(SLEEP), timeout=5.0)
    assert tl.labels[2] == ["2F0", "2F1", "2F2", "2F3"]
    for d in range(p):
        s, e = tl.start_ns[d], tl.end_ns[d]
        assert s.dtype == np.int64 and s.shape == (m,)
        assert np.all(np.diff(s) > 0) and np.all(e > s) and np.all(s[1:] >= e[:-1])
        assert np.all(e - s >= SLEEP * 1e9 * 0.9)
    # Device d's first action waited for (d-1, 0): the wait is attributed to it, and it
    # spans the moment that dependency ended.
    for d in (1, 2):
        waits = [w for w in tl.waits[d] if w[0] == 0 and w[1] >= 0]
        assert [(int(w[1]), int(w[2])) for w in waits] == [(d - 1, 0)]
        assert waits[0][3] <= tl.end_ns[d - 1][0] <= waits[0][4]
        assert tl.waits_for(d, 0)[0][2] == waits[0][4] - waits[0][3]
    # Wait intervals end before the action starts.
    for d in range(p):
        for idx, _, _, ws, we in tl.waits[d]:
            assert ws <= we <= tl.start_ns[d][idx]


def test_busy_plus_wait_accounts_for_wall_time():
    p, m = 2, 6
    with Executor(p) as ex:
        ex.run(chain_plan(p, m), lambda d, i: None, timeout=5.0)  # threads started, warm
        tl = ex.run(chain_plan(p, m), lambda d, i: time.sleep(SLEEP), timeout=5.0)
    for d in range(p):
        span = int(tl.end_ns[d][-1])  # from the run's start to this device's last action
        accounted = tl.busy_ns(d) + tl.wait_ns(d)
        # What is left is thread wake-up at the start and bookkeeping between actions.
        assert abs(span - accounted) <= 0.15 * span, (d, span, accounted)
    # Device 1 waits for 0F0 before its first action, from whenever its thread got there
    # (late on a loaded machine) until 0F0 ended; the 2-stage chain has a bubble.
    w0 = [w for w in tl.waits[1] if w[0] == 0 and w[1] == 0]
    assert len(w0) == 1 and w0[0][3] <= tl.end_ns[0][0] <= w0[0][4]
    assert tl.wait_ns(1, gil=False) >= tl.end_ns[0][0] - w0[0][3]
    assert tl.wall_ns >= tl.end_ns[1][-1]
    assert 0.0 < tl.bubble_ratio() < 0.5


def test_chrome_trace(tmp_path):
    with Executor(2) as ex:
        ex.run(chain_plan(2, 2), lambda d, i: None, timeout=5.0)  # threads started, warm
        tl = ex.run(chain_plan(2, 2), lambda d, i: time.sleep(SLEEP), timeout=5.0)
    path = tmp_path / "trace.json"
    out = tl.to_chrome_trace(path)
    assert json.loads(path.read_text()) == out
    names = {(e["tid"], e["name"]) for e in out["traceEvents"] if e["ph"] == "X"}
    assert {(0, "0F0"), (0, "0F1"), (1, "1F0"), (1, "1F1"), (1, "wait 0F0")} <= names
    # One writer: the timeline's trace is trace.chrome_trace of its records and waits.
    assert out == trace.chrome_trace(tl.records(), waits=tl.waits)


def hand_timeline():
    """Device 0 runs 0F0 [100, 200) and 0F1 [200, 300); device 1 waits for 0F0, then the GIL,
    runs 1F0 [250, 350); 1F1 never ran. The run's wall time (1000) is far beyond the
    makespan (100 to 350)."""
    i64 = lambda rows: np.array(rows, dtype=np.int64).reshape(-1, 5)  # noqa: E731
    return Timeline(labels=[["0F0", "0F1"], ["1F0", "x"]],
                    start_ns=[np.array([100, 200]), np.array([250, -1])],
                    end_ns=[np.array([200, 300]), np.array([350, -1])],
                    waits=[i64([]), i64([[0, 0, 0, 110, 200], [0, -1, -1, 200, 250]])],
                    wall_ns=1000)


def test_bubble_ratio_is_the_one_definition():
    tl = hand_timeline()
    assert tl.makespan_ns() == 250
    assert [tl.busy_ns(0), tl.busy_ns(1)] == [200, 100]
    assert [tl.idle_ns(0), tl.idle_ns(1)] == [50, 150]
    # (50 + 150) / (2 * 250), not over the wall time (which would give 1700 / 2000).
    assert tl.bubble_ratio() == stats.bubble_ratio([200, 100], 250) == 0.4
    st = stats.measure(tl.records(), schedule="x", num_stages=2, num_microbatches=2,
                       samples=2, wall_s=1e-6, waits=tl.waits)
    assert st.bubble_ratio == pytest.approx(tl.bubble_ratio())


def test_records_and_trace_with_waits():
    tl = hand_timeline()
    recs = tl.records()
    assert recs[0][1] == stats.ActionRecord(0, "0F1", "F", 0, 1, 200, 300)
    assert recs[1][1] == stats.ActionRecord(1, "x", "action", -1, -1, -1, -1)
    out = tl.to_chrome_trace(name="hand", metadata={"k": (1, 2)})
    xs = [e for e in out["traceEvents"] if e["ph"] == "X"]
    assert [(e["tid"], e["name"], e["cat"], e["ts"], e["dur"]) for e in xs] == [
        (0, "0F0", "F", 0.1, 0.1), (0, "0F1", "F", 0.2, 0.1), (1, "1F0", "F", 0.25, 0.1),
        (1, "wait 0F0", "wait", 0.11, 0.09), (1, "wait GIL", "wait", 0.2, 0.05)]
    assert xs[0]["args"] == {"stage": 0, "microbatch": 0}
    assert xs[3]["args"] == xs[4]["args"] == {"action": "1F0"}
    assert out["otherData"] == {"k": "(1, 2)"}
    assert {"ph": "M", "name": "process_name", "pid": 0, "tid": 0,
            "args": {"name": "hand"}} in out["traceEvents"]
    # Without waits the writer emits the actions only; with IR actions, their fields.
    class A:
        kind, stage, microbatch = "B", 7, 9
    plain = trace.chrome_trace(tl.records([[A(), A()], [A(), A()]]))
    assert [e["name"] for e in plain["traceEvents"] if e["ph"] == "X"] == ["0F0", "0F1", "1F0"]
    assert {e["cat"] for e in plain["traceEvents"] if e["ph"] == "X"} == {"B"}


def test_gil_contention_is_recorded_as_a_wait():
    # Pure-Python actions hold the GIL: the second thread to start must wait for it (CPython
    # hands it over after its 5 ms switch interval), and the timeline says so (dep -1).
    def spin(d, i):
        t = time.perf_counter()
        while time.perf_counter() - t < 0.02:
            pass

    with Executor(2) as ex:
        ex.run([[("0F0", [])], [("1F0", [])]], lambda d, i: None, timeout=5.0)  # warm threads
        tl = ex.run([[("0F0", []), ("0F1", [])], [("1F0", []), ("1F1", [])]], spin, timeout=5.0)
    gil = [w for d in range(2) for w in tl.waits[d] if w[1] == -1]
    assert gil, "no GIL wait recorded"
    assert max(w[4] - w[3] for w in gil) >= 1e6  # at least 1 ms
    for d in range(2):
        assert tl.wait_ns(d) >= tl.wait_ns(d, gil=False)
