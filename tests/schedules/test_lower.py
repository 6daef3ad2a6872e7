"""Lowering: inserted sends and receives match one to one, validate, and cost what edges cost."""

import pytest
from hypothesis import given, settings, strategies as st

from schedule_helpers import edited, rows, rule_of

from pipetrain import schedules
from pipetrain.schedules import Schedule, ScheduleError

FAST = settings(max_examples=30, deadline=None)


def test_lowered_gpipe_p2_m1():
    # F on stage 0 is followed by its send; stage 1 receives before F and sends the
    # gradient after B; stage 0 receives it before its B.
    s = schedules.build("gpipe", 2, 1).lower()
    assert rows(s) == [["0F0", "0SF0>1", "0RB0<1", "0B0"],
                               ["1RF0<0", "1F0", "1B0", "1SB0>0"]]
    schedules.validate(s)
    assert s.dependencies(1)[0] == [(0, 1)]        # 1RF0<0 after 0SF0>1
    assert s.dependencies(1)[1] == [(1, 0)]        # 1F0 after its receive (same device)


@FAST
@given(name=st.sampled_from(schedules.NAMES), p=st.integers(1, 8), k=st.integers(1, 4),
       v=st.integers(1, 3), t=st.sampled_from([0.0, 0.5, 2.0]), T=st.integers(1, 2),
       updates=st.booleans())
def test_lowered_validates_and_simulates_the_same(name, p, k, v, t, T, updates):
    kw = {"num_chunks": v} if name == "interleaved-1f1b" else {}
    s = schedules.build(name, p, p * k, num_minibatches=T, updates=updates, **kw)
    low = schedules.validate(s.lower())
    sends = recvs = 0
    for d in range(low.num_devices):
        for a in low.actions(d):
            if a.kind in ("SF", "SB"):
                sends += 1
                assert low.device_of(a.peer) != d
            elif a.kind in ("RF", "RB"):
                recvs += 1
    cross = sum(1 for a, b in s.edges if s.device_of(a) != s.device_of(b))
    assert sends == recvs == 2 * cross * s.num_microbatches * s.num_minibatches
    assert low.lowered == (cross > 0) and not s.lowered
    # Transfers take no device time; the send -> receive edge carries the latency that the
    # compute -> compute edge carries unlowered, so the timing is identical.
    a = s.simulate(forward=1.0, backward=2.0, transfer=t, update=0.5)
    b = low.simulate(forward=1.0, backward=2.0, transfer=t, update=0.5)
    assert b.makespan == pytest.approx(a.makespan)
    assert b.peak_inflight == a.peak_inflight


@pytest.mark.parametrize("device, edit, rule, action", [
    (1, lambda r: r.remove(r[0]), "unmatched-send", "0SF0>1"),          # drop 1RF0<0
    (0, lambda r: r.remove(r[1]), "unmatched-recv", "1RF0<0"),          # drop 0SF0>1
    (0, lambda r: r.insert(0, r.pop(1)), "send-after-compute", "0SF0>1"),
    (1, lambda r: r.insert(1, r.pop(0)), "forward-after-recv", "1F0"),
    (0, lambda r: r.insert(2, r.pop(3)), "backward-after-recv", "0B0"),
])
def test_broken_transfers(device, edit, rule, action):
    s = schedules.build("gpipe", 2, 1).lower()
    err = rule_of(edited(s, device, edit))
    assert (err.rule, err.action) == (rule, action)


def test_missing_both_ends_and_bad_peers():
    s = schedules.build("gpipe", 2, 1).lower()
    both = Schedule.from_actions([["0F0", "0RB0<1", "0B0"], ["1F0", "1B0", "1SB0>0"]])
    with pytest.raises(ScheduleError) as err:
        schedules.validate(both)
    assert (err.value.rule, err.value.action) == ("missing-transfer", "0SF0>1")
    wrong_peer = Schedule.from_actions([["0F0", "0SF0>1", "0RB0<1", "0B0"],
                                        ["1RF0<0", "1F0", "1B0", "1SB0>2"], ["2F0", "2B0"]])
    with pytest.raises(ScheduleError) as err:
        schedules.validate(wrong_peer)
    assert err.value.rule == "not-an-edge"
    with pytest.raises(ValueError, match="already lowered"):
        s.lower()


@pytest.mark.parametrize("name", ["1f1b", "zb-h1"])
def test_lowered_plan_with_updates(name):
    # Transfers carry no version; U stays where it was; the lowered plan times the same.
    s = schedules.build(name, 3, 3, num_minibatches=2, updates=True)
    low = schedules.validate(s.lower())
    for d in range(low.num_devices):
        acts = low.actions(d)
        assert [a for a in acts if a.kind in ("F", "B", "I", "W", "U")] == s.actions(d)
        assert all(a.version == -1 for a in acts if a.kind in ("SF", "RF", "SB", "RB"))
    a = s.simulate(update=1.0, transfer=0.5)
    b = low.simulate(update=1.0, transfer=0.5)
    assert b.makespan == pytest.approx(a.makespan)
