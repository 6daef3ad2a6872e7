"""The ``peers_training`` bench section: every training row runs the same training (the
in-process rows end at the unsplit model's weights), the table has every row with sane
per-mini-batch numbers, and train()'s windows are compared with its per-step loop."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:      # bench/ is not installed; it is run from the repo root
    sys.path.insert(0, str(ROOT))

from bench import _peer_models as pm  # noqa: E402
from bench import _peer_procs, peers, peers_training as pt  # noqa: E402
from bench._peer_models import Workload  # noqa: E402

TINY = Workload("blocks", "block", 16, 4, 16, 4, rounds=2, steps=pt.MINIBATCHES, warmup=1,
                budget_s=20)
NO_PIPPY = _peer_procs.pippy_available()
# No test here may hang (worker processes, barriers).
pytestmark = pytest.mark.hang_bound(120)


def _params(row):
    if isinstance(row, pt.PipetrainTrain):
        return [p.detach().clone() for p in row.pipe.parameters()]
    return [p.detach().clone() for p in row.model.parameters()]


@pytest.mark.parametrize("schedule, window", [("1f1b", None), ("zb-h1", None), ("zb-h1", 1),
                                              ("interleaved-1f1b", None)])
def test_pipetrain_rows_train_like_the_unsplit_model(schedule, window):
    # Same initial weights, same data, same optimizer, 6 mini-batches (a window of 4, then a
    # shorter one): the weights must agree. fp32, 6 SGD steps at lr 1e-4 over gradients
    # summed in a different order (per micro-batch vs whole batch): 1e-6 relative is ~10x
    # the observed differences and far below one step's change (checked below).
    wl = Workload("blocks", "block", 16, 4, 16, 4, rounds=1, steps=6)
    ctx = peers.Context(wl, *pm.data(wl))
    ref, row = pt.UnsplitTrain(1), pt.PipetrainTrain(schedule, window)
    ref.open(wl, ctx)
    row.open(wl, ctx)
    try:
        start = _params(ref)
        for r in (ref, row):
            s = r.measure(6)
            assert len(s.times) == 6 and all(t > 0 for t in s.times)
        a, b = _params(ref), _params(row)
        assert len(a) == len(b)
        moved = max((x - s0).abs().max().item() for x, s0 in zip(a, start))
        assert moved > 1e-6, "the rows did not train"
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
    finally:
        row.close()
    assert row.name == f"pipetrain {schedule}" + (", per-step loop" if window == 1 else "")


def test_windows_gain_is_the_per_round_ratio():
    rows = {n: peers.Result(peers.Row(n)) for n in
            ("pipetrain 1f1b", "pipetrain 1f1b, per-step loop", "pipetrain zb-h1")}
    rows["pipetrain 1f1b"].rounds = [[9.0], [8.0], [9.0]]
    rows["pipetrain 1f1b, per-step loop"].rounds = [[10.0], [10.0], [9.0]]
    rows["pipetrain zb-h1"].rounds = [[7.0]]
    gain = pt.windows_gain(list(rows.values()))
    assert gain["1f1b"] == pytest.approx(0.9)        # median of 0.9, 0.8, 1.0
    assert gain["zb-h1"] is None                      # no per-step row to compare with


def test_section_reports_every_row(tmp_path):
    if NO_PIPPY:
        pytest.skip(f"PiPPy rows cannot run here: {NO_PIPPY}")
    report = pt.run_section(True, tmp_path, [TINY], log=lambda *a: None)
    (w,) = report
    names = [r["row"] for r in w["rows"]]
    assert names == [r.name for r in pt.make_rows(TINY)]
    assert {"pippy Schedule1F1B", "pipetrain zb-h1, 2 processes", "floor, 2 processes"} <= set(names)
    for r in w["rows"]:
        assert r["error"] is None, (r["row"], r["error"])
        assert r["steps"] == TINY.rounds * pt.MINIBATCHES
        assert 0 < r["step_s"] < 30 and math.isfinite(r["over_unsplit1"])
    s = w["summary"]
    assert s["best_pippy"].startswith("pippy ") and s["best_pipetrain"].startswith("pipetrain ")
    assert all(v > 0 for v in s["windows_over_per_step"].values())
    assert json.loads((tmp_path / "peers_training.json").read_text())[0]["workload"] == "blocks"


def test_without_processes_the_in_process_rows_run(tmp_path):
    report = pt.run_section(True, tmp_path, [TINY], use_procs=False, log=lambda *a: None)
    rows = {r["row"]: r for r in report[0]["rows"]}
    assert "process rows disabled" in rows["pippy ScheduleGPipe"]["error"]
    for name in ("unsplit, 1 thr", "pipetrain zb-h1", "pipetrain zb-h1, per-step loop",
                 "floor, 2 threads"):
        assert rows[name]["error"] is None and rows[name]["step_s"] > 0


@pytest.mark.skipif(bool(NO_PIPPY), reason=f"{NO_PIPPY}")
def test_process_rows_train_like_the_unsplit_model():
    # Every engine's training row in the worker processes (PiPPy with torch.optim on each
    # rank, pipetrain's multi-process train()) ends at the unsplit model's weights after the
    # same mini-batches, compared by the sums of the values and of their squares over all
    # ranks. The bar is 1 % of what training moved those sums (a step missed or run twice
    # moves them by ~1/3 of it); fp32 summation-order differences are ~1e-5 of it.
    wl = Workload("blocks", "block", 16, 4, 16, 4, rounds=1, steps=3)
    n = 3
    model = torch.nn.Sequential(*pm.make_layers(wl))
    x, y = pm.data(wl)

    def digest(ps):
        ps = list(ps)
        return (sum(p.detach().double().sum() for p in ps).item(),
                sum(p.detach().double().pow(2).sum() for p in ps).item())
    start = digest(model.parameters())
    opt = pm.optimizer(model.parameters())
    for _ in range(n):
        opt.zero_grad()
        pm.mse(model(x), y).backward()
        opt.step()
    ref = digest(model.parameters())
    rows = ["Schedule1F1B", "ScheduleInterleaved1F1B", "pipetrain-mp 1f1b", "pipetrain-mp zb-h1"]
    with _peer_procs.ProcPair(2) as pair:
        pair.call(("setup", wl), timeout=120)
        for row in rows:
            pair.call(("train", row, n), timeout=120)
            got = pair.call(("digest", row), timeout=60)
            s, sq = sum(r["sum"] for r in got), sum(r["sumsq"] for r in got)
            for name, a, b, a0 in (("sum", s, ref[0], start[0]), ("sumsq", sq, ref[1], start[1])):
                moved = abs(b - a0)
                assert moved > 0
                assert abs(a - b) <= 1e-2 * moved, (row, name, a, b, moved)
