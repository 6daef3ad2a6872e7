"""Tests for pipetrain.trace: the Chrome trace and the picture of a real step's timeline."""

import json

import pytest
import torch
from torch import nn

from pipetrain.pipeline import Pipeline
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
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
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
