"""The calibration's arithmetic on synthetic runs: per-round ratios cancel a load drift, and
hand-offs are read from records as defined (no timings asserted)."""

import statistics
import types

import pytest

from pipetrain.planner.calibration import _ratio, handoffs


def test_per_round_ratio_cancels_a_load_drift():
    # A 2-stage run that is truly 0.6x the one-stage run, measured in the same rounds on a
    # machine whose speed drifts 3x over the rounds: every per-round ratio is 0.6.
    drift = [1.0, 1.5, 3.0, 2.0, 1.2]
    one = [10.0 * d for d in drift]
    deep = [6.0 * d for d in drift]
    assert _ratio(deep, one, statistics.median) == pytest.approx(0.6)
    assert _ratio(deep, one, min) == pytest.approx(0.6)     # minima: each series' best round
    # A one-off disturbance of either series in one round does not move the median ratio.
    assert _ratio([6.0, 6.0, 18.0], [10.0, 10.0, 10.0], statistics.median) == pytest.approx(0.6)
    assert _ratio([6.0, 6.0, 6.0], [10.0, 30.0, 10.0], statistics.median) == pytest.approx(0.6)


def _rec(kind, stage, mb, start, end):
    return types.SimpleNamespace(kind=kind, stage=stage, microbatch=mb, start_ns=start,
                                 end_ns=end)


def test_handoffs_count_only_waits_for_another_device():
    ms = 1_000_000
    d0 = [_rec("F", 0, 0, 0, 10 * ms), _rec("F", 0, 1, 10 * ms, 20 * ms),
          _rec("B", 0, 0, 33 * ms, 40 * ms)]            # waited for 1B0 (ends 31): 2 ms
    d1 = [_rec("F", 1, 0, 11 * ms, 21 * ms),            # waited for 0F0 (ends 10): 1 ms
          _rec("B", 1, 0, 21 * ms, 31 * ms),            # its own device's order: not a hand-off
          _rec("F", 1, 1, 31 * ms, 35 * ms)]            # 0F1 ended at 20, device busy: not one
    assert sorted(handoffs([d0, d1], 2)) == pytest.approx([1e-3, 2e-3])
