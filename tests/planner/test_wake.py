"""The wake-up simulation against the schedule simulator and hand-computed timelines."""

import random

import pytest

from pipetrain import schedules
from pipetrain.planner import Affine, CostTable, Network
from pipetrain.planner.search import evaluate
from pipetrain.planner.wake import makespan

SHAPES = [("gpipe", 3, 5, 1), ("1f1b", 4, 8, 1), ("interleaved-1f1b", 2, 4, 2),
          ("interleaved-1f1b", 4, 8, 2), ("zb-h1", 3, 6, 1), ("zb-h2", 4, 8, 1),
          ("zb-h1-bw", 3, 6, 1)]


@pytest.mark.parametrize("name,p,m,v", SHAPES)
def test_without_wake_it_is_the_simulators_makespan(name, p, m, v):
    rng = random.Random(p * 100 + m + v)
    s = schedules.build(name, num_stages=p, num_microbatches=m, num_chunks=v)
    n = s.num_stages
    F = [rng.uniform(1, 2) for _ in range(n)]
    B = [2 * f + rng.uniform(0, 1) for f in F]
    W = [0.4 * b for b in B]
    t = rng.uniform(0.0, 0.5)
    ref = s.simulate(forward=F, backward=B, weight=W if s.split_backward else None,
                     transfer=t).makespan
    assert makespan(s, F, B, W, t, 0.0) == pytest.approx(ref, rel=1e-12)
    # A wake-up is paid on a subset of the edges a transfer is: never more.
    assert makespan(s, F, B, W, 0.0, t) <= ref + 1e-12


def test_every_waiting_hand_off_pays_the_wake():
    # 1F1B, 2 stages, 1 micro-batch: F0, wake, F1, B1, wake, B0 in a row.
    s = schedules.build("1f1b", num_stages=2, num_microbatches=1)
    assert makespan(s, [1.0, 3.0], [2.0, 2.5], [0.0, 0.0], 0.1, 0.5) == \
        pytest.approx(1 + 0.6 + 3 + 2.5 + 0.6 + 2)


def test_a_busy_device_pays_no_wake():
    # GPipe, 2 stages, 2 micro-batches, wake 0.5. Device 1: F(0) 1.5-4.5 (waited: +0.5),
    # F(1) 4.5-7.5 (its input was ready at 2: no wake), B(0) 7.5-9.7, B(1) 9.7-11.9.
    # Device 0: B(0) 10.2-12.2 (idle since 2: +0.5); B(1) 12.2-14.2 (busy when B1(1) ended at
    # 11.9). As a transfer on every edge B(1) would start at 12.4.
    s = schedules.build("gpipe", num_stages=2, num_microbatches=2)
    F, B = [1.0, 3.0], [2.0, 2.2]
    assert makespan(s, F, B, [0.0, 0.0], 0.0, 0.5) == pytest.approx(14.2)
    assert s.simulate(forward=F, backward=B, transfer=0.5).makespan == pytest.approx(14.4)


def _table(handoff):
    n = 4
    return CostTable(forward=[Affine(0.0, 1e-3)] * n, backward=[Affine(0.0, 2e-3)] * n,
                     weight=[Affine(0.0, 1e-3)] * n, activation=[Affine(0, 1e3)] * n,
                     input_bytes=[Affine(0, 1e3)] * n, param_bytes=[1e6] * n,
                     handoff_latency=handoff)


def test_the_search_charges_a_measured_hand_off_as_a_wake():
    # Two stages of two layers, one micro-batch of 4: F 8 ms, B 16 ms per stage, every hand-off
    # waited for: 2 F + 2 B + 2 wakes.
    c = evaluate(_table(1e-3), Network(), p=2, b=4, m=1, schedule="1f1b")
    assert c.step_time == pytest.approx(2 * 8e-3 + 2 * 16e-3 + 2e-3)
    # A link's transfer still delays every hand-off, on top.
    c = evaluate(_table(1e-3), Network(p2p_latency=5e-4), p=2, b=4, m=1, schedule="1f1b")
    assert c.step_time == pytest.approx(2 * 8e-3 + 2 * 16e-3 + 2e-3 + 1e-3)
    # Interleaved, a wake of 1.5 F: cheaper than the same latency on every edge (92 vs 96 ms:
    # some inputs land while their device is still busy with another chunk).
    t = _table(6e-3)
    wake = evaluate(t, Network(), p=2, b=4, m=2, schedule="interleaved-1f1b", v=2)
    F, B, W = wake.costs
    s = schedules.build("interleaved-1f1b", num_stages=2, num_microbatches=2, num_chunks=2)
    assert wake.step_time == pytest.approx(makespan(s, F, B, W, 0.0, 6e-3))
    assert wake.step_time == pytest.approx(0.092)
    assert s.simulate(forward=F, backward=B, transfer=6e-3).makespan == pytest.approx(0.096)
