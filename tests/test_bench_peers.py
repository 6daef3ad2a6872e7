"""The ``peers`` bench section's machinery on tiny workloads: every row is in the table with
sane numbers, PiPPy rows included where torch.distributed.pipelining can run, failures are
reported per row, and the worker processes never outlive the bench."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:      # bench/ is not installed; it is run from the repo root
    sys.path.insert(0, str(ROOT))

from bench import _peer_procs, peers  # noqa: E402
from bench._peer_models import Workload  # noqa: E402

TINY = [Workload("blocks", "block", 16, 4, 16, 4, rounds=2, steps=1, warmup=1, budget_s=20),
        Workload("fine", "linear", 8, 4, 8, 8, rounds=2, steps=1, warmup=1, budget_s=20)]
NO_PIPPY = _peer_procs.pippy_available()
# No test here may hang (worker processes, barriers).
pytestmark = pytest.mark.hang_bound(90)


def _expected_rows(wl):
    return [r.name for r in peers.make_rows(wl)]


def test_section_reports_every_row_with_sane_numbers(tmp_path):
    if NO_PIPPY:
        pytest.skip(f"PiPPy rows cannot run here: {NO_PIPPY}")
    report = peers.run_section(True, tmp_path, TINY, log=lambda *a: None)
    assert [w["workload"] for w in report] == ["blocks", "fine"]
    for wl, w in zip(TINY, report):
        names = [r["row"] for r in w["rows"]]
        assert names == _expected_rows(wl)
        assert any(n.startswith("pippy ") for n in names) and "floor, 2 threads" in names
        for r in w["rows"]:
            assert r["error"] is None, (r["row"], r["error"])
            assert r["steps"] == wl.rounds * wl.steps
            assert 0 < r["step_s"] < 30
            assert math.isfinite(r["over_unsplit1"]) and r["over_unsplit1"] > 0
            if r["group"] in ("pipetrain", "pippy", "floor"):
                assert 0.0 <= r["bubble"] <= 1.0, r
        s = w["summary"]
        assert s["best_pippy"].startswith("pippy ") and s["best_pipetrain"].startswith("pipetrain ")
        # No schedule beats its floor by much (noise on shared cores allows a little).
        assert s["pipetrain_over_floor"] > 0.5 and s["pippy_over_pipetrain"] > 0
        # The bound is the floor plus a positive head in every round: each ratio to it is lower.
        assert s["head_ms"] > 0 and s["pipetrain_over_bound"] < s["pipetrain_over_floor"]
    assert {"pipetrain_p1_over_loop", "pipetrain_p1_1thr_over_loop"} <= set(report[1]["summary"])
    assert json.loads((tmp_path / "peers.json").read_text())[0]["workload"] == "blocks"
    assert (tmp_path / "peers.csv").read_text().count("\n") == 1 + sum(len(w["rows"]) for w in report)
    assert (tmp_path / "peers.png").stat().st_size > 0


def test_without_processes_the_other_rows_still_run(tmp_path, capsys):
    report = peers.run_section(True, tmp_path, TINY[:1], use_procs=False, log=lambda *a: None)
    rows = {r["row"]: r for r in report[0]["rows"]}
    assert "process rows disabled" in rows["pippy ScheduleGPipe"]["error"]
    assert "process rows disabled" in rows["floor, 2 processes"]["error"]
    for name in ("unsplit, 1 thr", "pipetrain 1f1b", "floor, 2 threads"):
        assert rows[name]["error"] is None and rows[name]["step_s"] > 0
    assert report[0]["summary"]["best_pippy"] is None
    assert "failed" in capsys.readouterr().out      # the table says so, per row


def test_bubble_uses_pipetrains_definition():
    # Two workers over a makespan of 10: busy 10 and 4 -> idle 6 of 20.
    assert peers._bubble([[(0, 10)], [(2, 4), (6, 8)]]) == pytest.approx(0.3)


def test_bound_is_floor_plus_the_first_forward_per_round():
    a, f1, f2 = (peers.Result(peers.Row(n)) for n in ("a", "floor t", "floor p"))
    a.rounds, f1.rounds, f2.rounds = [[12.0], [9.0], [20.0]], [[9.0], [8.0], [11.0]], [[10.0], [7.0], []]
    # Per round: 12 / (9 + 1), 9 / (7 + 1), 20 / (11 + 1) -> median 1.2.
    assert peers._ratio(a, [f1, f2], 1.0) == pytest.approx(1.2)


def test_head_is_stage_0s_fastest_forward():
    import pipetrain
    from bench import _peer_models as pm
    wl = Workload("linear", "linear", 8, 4, 8, 4, rounds=1, steps=1)
    x, y = pm.data(wl)
    pipe = pipetrain.Pipeline(pm.make_layers(wl), num_devices=2, schedule="1f1b", num_microbatches=4,
                              loss_fn=pm.mse, balance=pm.balance(wl, 2))
    try:
        pipe.step(x, y)
        st = pipe.stats()
    finally:
        pipe.close()
    first = [r for r in st.records[0] if r.start_ns >= 0][0]
    assert (first.kind, first.microbatch) == ("F", 0)
    forwards = [r.duration_s for r in st.records[0] if r.kind == "F"]
    assert len(forwards) == 4 and peers._head(st) == min(forwards) > 0
    # Device 1 starts nothing before that forward has ended.
    assert min(r.start_ns for r in st.records[1] if r.start_ns >= 0) >= first.start_ns + first.duration_s * 1e9 - 1e3


@pytest.mark.skipif(bool(NO_PIPPY), reason=f"{NO_PIPPY}")
def test_worker_failure_ends_the_processes():
    pair = _peer_procs.ProcPair(2)
    procs = list(pair.procs)
    pair.call(("setup", TINY[0]), timeout=60)
    with pytest.raises(_peer_procs.WorkerError, match="no-such-row"):
        pair.call(("run", "no-such-row", 1), timeout=30)
    assert all(not p.is_alive() for p in procs) and pair.procs == []
    with pytest.raises(_peer_procs.WorkerError, match="gone"):
        pair.call(("run", "floor", 1), timeout=5)
