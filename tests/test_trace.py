"""Tests for pipetrain.trace: the Chrome trace and the picture of a real step's timeline."""

import json
import time

import pytest
import torch
from torch import nn

from pipetrain import schedules
from pipetrain.executor import Executor
from pipetrain.pipeline import Pipeline
from pipetrain.stats import measure
from pipetrain.trace import chrome_trace, plot_timeline


def mse(out, target):
    return ((out - target) ** 2).mean()


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(6)])
    pipe = Pipeline(model, 3, schedule="zb-h1", num_microbatches=4, loss_fn=mse)
    pipe.step(torch.randn(8, 8), torch.randn(8, 8))
    return pipe


def test_export_trace_is_valid_chrome_json(pipe, tmp_path):
    path = pipe.export_trace(tmp_path / "step.json")
    with open(path) as f:
        trace = json.load(f)
    # Actions (waits, when the step's stats carry them, are category "wait").
    events = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] != "wait"]
    names = {e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"device 0", "device 1", "device 2"}
    for d in range(3):
        mine = sorted((e for e in events if e["tid"] == d), key=lambda e: e["ts"])
        actions = pipe.schedule.actions(d)
        # Every action of the device, once, in issue order, with its kind as category.
        assert [e["name"] for e in mine] == [str(a) for a in actions]
        assert [e["cat"] for e in mine] == [a.kind for a in actions]
        assert all(e["args"]["stage"] == a.stage and e["args"]["microbatch"] == a.microbatch
                   for e, a in zip(mine, actions))
        # One issuing thread per device: its actions never overlap.
        for a, b in zip(mine, mine[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3
        assert all(e["dur"] >= 0 for e in mine)
    kinds = {e["cat"] for e in events}
    assert kinds == {"F", "I", "W"}
    assert trace["otherData"]["schedule"] == "zb-h1"


def test_trace_matches_stats(pipe):
    st = pipe.stats()
    trace = chrome_trace(st.records)
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == sum(len(pipe.schedule.actions(d)) for d in range(3))
    busy = [sum(e["dur"] for e in events if e["tid"] == d) * 1e-6 for d in range(3)]
    assert busy == pytest.approx(st.busy_s, rel=1e-6)


def test_plot_timeline_writes_png(pipe, tmp_path):
    path = pipe.plot_timeline(tmp_path / "step.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    other = plot_timeline(pipe.stats().records, tmp_path / "again.png", title="x")
    assert other.exists()


def test_no_stats_before_a_step():
    pipe = Pipeline(nn.Sequential(nn.Linear(2, 2)), 1, loss_fn=mse)
    with pytest.raises(RuntimeError, match="no step has run yet"):
        pipe.export_trace("unused.json")


def test_step_stats_waits_reach_the_trace():
    """What Pipeline does with a step: the executor's timeline -> records (with the IR
    actions) and waits -> measure -> one trace with both."""
    s = schedules.build("1f1b", num_stages=2, num_microbatches=3)
    plan = [list(zip(map(str, s.actions(d)), s.dependencies(d))) for d in range(2)]
    with Executor(2) as ex:
        ex.run(plan, lambda d, i: None, timeout=10.0)  # threads started, warm
        tl = ex.run(plan, lambda d, i: time.sleep(0.005), timeout=10.0)
    actions = [s.actions(d) for d in range(2)]
    st = measure(tl.records(actions), schedule="1f1b", num_stages=2, num_microbatches=3,
                 samples=3, wall_s=tl.wall_ns * 1e-9, waits=tl.waits)
    assert st.bubble_ratio == pytest.approx(tl.bubble_ratio())
    trace = chrome_trace(st.records, waits=st.waits)
    assert trace == tl.to_chrome_trace(actions=actions)
    waits = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "wait"]
    # Device 1's first forward waits for device 0's: named by the dependency's label.
    assert any(e["tid"] == 1 and e["name"] == "wait 0F0" and e["args"] == {"action": "1F0"}
               for e in waits), waits
    acts = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] != "wait"]
    assert sorted(e["name"] for e in acts) == sorted(str(a) for row in actions for a in row)
