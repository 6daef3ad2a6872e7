"""Tests for pipetrain.stats: step statistics from action records, against closed forms."""

import numpy as np
import pytest

from pipetrain import schedules
from pipetrain.stats import ActionRecord, bubble_ratio, measure, per_stage_costs


def _records_from_simulation(s, sim):
    """Action records with the simulator's start/end times (seconds -> ns)."""
    out = []
    for d in range(s.num_devices):
        out.append([ActionRecord(d, str(a), a.kind, a.stage, a.microbatch,
                                 round(t0 * 1e9), round(t1 * 1e9))
                    for a, t0, t1 in zip(s.actions(d), sim.starts(d), sim.ends(d))])
    return out


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 2), (4, 8), (3, 5)])
def test_bubble_of_fill_drain_is_closed_form(name, p, m):
    """GPipe / 1F1B with equal stage costs: bubble = (p-1)/(m+p-1) (GPipe paper)."""
    s = schedules.build(name, num_stages=p, num_microbatches=m)
    sim = s.simulate(forward=0.001, backward=0.002)
    st = measure(_records_from_simulation(s, sim), schedule=name, num_stages=p,
                 num_microbatches=m, samples=4 * m, wall_s=sim.makespan * 1.5)
    assert st.bubble_ratio == pytest.approx((p - 1) / (m + p - 1), abs=1e-6)
    assert st.makespan_s == pytest.approx((m + p - 1) * 0.003, rel=1e-6)
    assert st.busy_s == pytest.approx([m * 0.003] * p, rel=1e-6)
    assert st.samples_per_s == pytest.approx(4 * m / (sim.makespan * 1.5))
    assert st.costs_s["F"] == pytest.approx([0.001] * p, rel=1e-6)
    assert st.costs_s["B"] == pytest.approx([0.002] * p, rel=1e-6)
    assert "bubble" in str(st)


def test_per_stage_costs_means_and_missing_kinds():
    recs = [[ActionRecord(0, "0F0", "F", 0, 0, 0, 10), ActionRecord(0, "0F1", "F", 0, 1, 10, 40),
             ActionRecord(0, "2F0", "F", 2, 0, 40, 50)]]
    costs = per_stage_costs(recs, 3)
    assert costs == {"F": pytest.approx([20e-9, 0.0, 10e-9])}


def test_bubble_ratio_divides_by_p_times_makespan():
    # Two devices, makespan 10: busy 10 and 4 -> idle 0 and 6 -> 6 / 20.
    assert bubble_ratio([10.0, 4.0], 10.0) == pytest.approx(0.3)
    assert bubble_ratio([10, 4], 10) == pytest.approx(0.3)  # any unit, ints too
    assert bubble_ratio([12.0], 10.0) == 0.0  # idle floored at 0
    assert bubble_ratio([], 10.0) == 0.0 and bubble_ratio([1.0, 2.0], 0.0) == 0.0
    assert "p * makespan" in bubble_ratio.__doc__ and "simulator" in bubble_ratio.__doc__


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2"])
def test_bubble_ratio_is_the_simulators(name):
    """The simulator's bubble is the same formula: the measured one compares directly."""
    chunks = 2 if name == "interleaved-1f1b" else 1
    s = schedules.build(name, num_stages=4 * chunks, num_microbatches=8, num_chunks=chunks)
    sim = s.simulate(forward=0.001, backward=0.0025)
    assert bubble_ratio(list(sim.busy), sim.makespan) == pytest.approx(sim.bubble_ratio, abs=1e-12)
    st = measure(_records_from_simulation(s, sim), schedule=name, num_stages=s.num_stages,
                 num_microbatches=8, samples=8, wall_s=1.0)
    assert st.bubble_ratio == pytest.approx(sim.bubble_ratio, abs=1e-6)


def test_measure_keeps_the_waits():
    recs = [[ActionRecord(0, "0F0", "F", 0, 0, 0, 10)], [ActionRecord(1, "1F0", "F", 1, 0, 12, 20)]]
    waits = [np.zeros((0, 5), np.int64), np.array([[0, 0, 0, 1, 11]], np.int64)]
    st = measure(recs, schedule="x", num_stages=2, num_microbatches=1, samples=1, wall_s=1.0,
                 waits=waits)
    assert len(st.waits) == 2 and st.waits[1].tolist() == [[0, 0, 0, 1, 11]]
    assert measure(recs, schedule="x", num_stages=2, num_microbatches=1, samples=1,
                   wall_s=1.0).waits == []
    # makespan 20 ns; busy 10 and 8 -> (10 + 12) / 40
    assert st.bubble_ratio == pytest.approx(22 / 40)


def test_batched_w_costs_are_fitted_per_microbatch_and_fixed_part():
    # Stage 0: W's of 1 micro-batch take 3 ms, a W of 4 takes 6 ms: d = a + b n with
    # b = 1 ms, a = 2 ms, so one W is 3 ms and the fixed part 2 ms (closed form).
    from pipetrain.stats import ActionRecord, per_stage_costs

    ms = 1_000_000
    recs = [[ActionRecord(0, "0W0", "W", 0, 0, 0, 3 * ms),
             ActionRecord(0, "0W1", "W", 0, 1, 3 * ms, 6 * ms),
             ActionRecord(0, "0W2-5", "W", 0, 2, 6 * ms, 12 * ms)]]
    c = per_stage_costs(recs, 1)
    assert c["W"][0] == pytest.approx(3e-3)
    assert c["W_fixed"][0] == pytest.approx(2e-3)
    # Without batched W's there is no fixed part and W is the plain mean.
    assert "W_fixed" not in per_stage_costs([recs[0][:2]], 1)
