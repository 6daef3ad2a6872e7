"""bench/floor_gap.py: the split of a step's wall time into floor, actions, first actions,
bubble, waits and outside (closed form on a made-up timeline; identity on real steps)."""

from __future__ import annotations

import pathlib
import sys
from types import SimpleNamespace

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import floor_gap  # noqa: E402
from bench._peer_models import Workload  # noqa: E402

MS = 1e-3


def _record(kind: str, ms: float, start: int = 0) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, duration_s=ms * MS, start_ns=start)


def test_parts_of_a_made_up_step():
    # Device 1 is critical (busy 22 ms vs 10). Steady costs (medians per kind): F 3, I 2,
    # W 1; of its first 4 actions F5 and I4 ran 2 ms over theirs: first = 4.
    d1 = [_record(k, ms) for k, ms in [("F", 5), ("F", 3), ("I", 4), ("I", 2), ("W", 1),
                                        ("F", 3), ("I", 2), ("W", 1), ("W", 1)]]
    d0 = [_record("F", 5), _record("W", 5), _record("F", 9, start=-1)]   # not run: ignored
    stats = SimpleNamespace(num_devices=2, busy_s=[10 * MS, 22 * MS], records=[d0, d1],
                            makespan_s=27 * MS)
    parts = floor_gap.decompose(stats, simulated_makespan=25 * MS, floor=[9 * MS, 15 * MS],
                                wall=28 * MS)
    want = {"floor": 15, "actions": 22 - 4 - 15, "first": 4, "bubble": 25 - 22,
            "waits": 27 - 25, "outside": 28 - 27}
    assert parts["device"] == 1
    for key, ms in want.items():
        assert parts[key] == pytest.approx(ms * MS), key
    # A simulated makespan below the busy time: no bubble, the rest is waiting.
    parts = floor_gap.decompose(stats, simulated_makespan=20 * MS, floor=[9 * MS, 15 * MS],
                                wall=28 * MS)
    assert parts["bubble"] == 0 and parts["waits"] == pytest.approx(5 * MS)


def test_parts_add_up_to_each_measured_step():
    # One measured round: every part is that step's own, and they sum to its wall time.
    wl = Workload("linear", "linear", 8, 4, 8, 4, rounds=1, steps=1)
    res = floor_gap._measure(wl, log=lambda *a, **k: None)
    assert set(res) == set(floor_gap.SCHEDULES)
    for name, row in res.items():
        total = sum(row[k] for k in floor_gap.PARTS)
        assert total == pytest.approx(row["step"], rel=1e-9), name
        assert row["floor"] > 0 and row["first"] >= 0 and row["bubble"] >= 0, (name, row)
