"""Validator: every generated schedule passes; every kind of broken schedule fails by name."""

import pytest
from hypothesis import given, settings, strategies as st
from schedule_helpers import draw_position, rebuild, rule_of

from pipetrain import schedules
from pipetrain.schedules import Action, Schedule

FAST = settings(max_examples=40, deadline=None)


@st.composite
def generated(draw, max_p=16, max_m=64):
    name = draw(st.sampled_from(schedules.NAMES))
    p = draw(st.integers(1, max_p))
    if name == "interleaved-1f1b":
        v = draw(st.integers(1, 4))
        m = p * draw(st.integers(1, max(1, max_m // p)))
        return schedules.build(name, p, m, num_chunks=v)
    return schedules.build(name, p, draw(st.integers(1, max_m)))


@FAST
@given(s=generated())
def test_every_generated_schedule_validates(s):
    schedules.validate(s)
    counts = {}
    for d in range(s.num_devices):
        for a in s.actions(d):
            counts[a.kind] = counts.get(a.kind, 0) + a.count   # a batched W covers several
    n = s.num_stages * s.num_microbatches
    if s.split_backward:
        assert counts == {"F": n, "I": n, "W": n}
    else:
        assert counts == {"F": n, "B": n}


@FAST
@given(s=generated(max_p=6, max_m=12), data=st.data())
def test_dropped_action_is_missing(s, data):
    per, d, i = draw_position(s, data)
    gone = per[d].pop(i)
    err = rule_of(rebuild(s, per))
    want = {"F": "missing-forward", "B": "missing-backward", "I": "missing-backward",
            "W": "missing-weight"}[gone.kind]
    assert err.rule == want
    assert err.action == str(Action(gone.stage, "B" if gone.kind == "B" else
                                     ("I" if gone.kind == "I" else gone.kind), gone.microbatch))
    assert err.index == -1 and err.device == d


@FAST
@given(s=generated(max_p=6, max_m=12), data=st.data())
def test_duplicated_action_is_named(s, data):
    per, d, i = draw_position(s, data)
    j = data.draw(st.integers(0, len(per[d])))
    copy = per[d][i]
    per[d].insert(j, copy)
    err = rule_of(rebuild(s, per))
    # The second occurrence is the offender: the original shifted to i+1, or the copy at j.
    assert err.rule == "duplicate" and err.action == str(copy)
    assert (err.device, err.index) == (d, i + 1 if j <= i else j)


def dependent_pairs(s):
    """(device, i, j, expected rule) where action i needs action j (j < i) on the same
    device, and j is the latest of i's same-device needs -- swapping them breaks exactly
    that need. The expected rule is read off the two actions' kinds and stages."""
    out = []
    for d in range(s.num_devices):
        acts = s.actions(d)
        for i, deps in enumerate(s.dependencies(d)):
            local = [j for dd, j in deps if dd == d]
            if not local:
                continue
            j = max(local)
            x, y = acts[i], acts[j]
            if x.kind == "F":
                rule = "forward-after-predecessor"
            elif x.kind == "W":
                rule = "weight-after-input-grad"
            elif y.kind == "F" and y.stage == x.stage:
                rule = "backward-after-forward"
            else:
                rule = "backward-after-successor"
            out.append((d, i, j, rule))
    return out


@FAST
@given(s=generated(max_p=6, max_m=12), data=st.data())
def test_swapped_dependent_actions_break_that_dependency(s, data):
    pairs = dependent_pairs(s)
    d, i, j, want = data.draw(st.sampled_from(pairs))
    per = [s.actions(k) for k in range(s.num_devices)]
    per[d][i], per[d][j] = per[d][j], per[d][i]
    err = rule_of(rebuild(s, per))
    assert err.rule == want
    assert (err.device, err.index, err.action) == (d, j, str(per[d][j]))


@FAST
@given(s=generated(max_p=6, max_m=12), data=st.data())
def test_action_on_wrong_device(s, data):
    if s.num_devices < 2:
        return
    per, d, i = draw_position(s, data)
    other = (d + 1) % s.num_devices
    moved = per[d].pop(i)
    per[other].insert(0, moved)
    err = rule_of(rebuild(s, per))
    assert err.rule == "wrong-device" and err.action == str(moved)
    assert (err.device, err.index) == (other, 0)


def test_cross_device_cycle_is_a_deadlock():
    # d1 runs micro-batch 1 first; its 1F1 waits for 0F1, which d0 issues only after 0B0,
    # which waits for 1B0, which d1 issues after 1F1.
    s = Schedule.from_actions([["0F0", "0B0", "0F1", "0B1"], ["1F1", "1B1", "1F0", "1B0"]])
    err = rule_of(s)
    assert err.rule == "deadlock"
    assert (err.action, err.device, err.index) == ("0B0", 0, 1)
    assert "1F1" in str(err) and "0F1" in str(err)


def test_structural_rules():
    two = [["0F0", "0B0"], ["1F0", "1B0"]]
    assert rule_of(Schedule.from_actions(two, num_stages=1, placement=[0])).rule == "stage-range"
    bad_mb = [["0F0", "0B0", "0F5"], ["1F0", "1B0"]]
    assert rule_of(Schedule.from_actions(bad_mb, num_microbatches=1)).rule == "microbatch-range"
    mixed = [["0F0", "0B0", "0W0"], ["1F0", "1B0"]]
    err = rule_of(Schedule.from_actions(mixed))
    assert (err.rule, err.action) == ("mixed-backward", "0W0")
    # A DAG: stage 0 feeds 1 and 2; stage 0's backward needs both successors' backwards.
    dag = [["0F0", "0B0"], ["1F0", "1B0"], ["2F0", "2B0"]]
    ok = Schedule.from_actions(dag, edges=[(0, 1), (0, 2)])
    schedules.validate(ok)
    assert sorted(ok.dependencies(0)[1]) == [(0, 0), (1, 1), (2, 1)]
    assert ok.successors(0) == [1, 2] and ok.predecessors(2) == [0]


def test_error_message_shows_the_row():
    s = Schedule.from_actions([["0B0", "0F0"]])
    err = rule_of(s)
    assert err.rule == "backward-after-forward"
    assert "[0B0] 0F0" in str(err) and "0B0 (device 0, position 0)" in str(err)


def test_bad_stage_graphs_are_value_errors():
    with pytest.raises(ValueError, match="cycle"):
        Schedule.from_actions([["0F0", "0B0"], ["1F0", "1B0"]], edges=[(0, 1), (1, 0)])
    with pytest.raises(ValueError, match="outside"):
        Schedule.from_actions([["0F0", "0B0"]], edges=[(0, 3)])
    with pytest.raises(ValueError, match="cannot parse action"):
        Schedule.from_actions([["0X0"]])


# -- updates and weight versions ----------------------------------------------------------
# The base plan (1F1B, p = 2, m = 2, T = 2, with updates):
#   d0: 0F0@0 0F1@0 0B0@0 0B1@0 0U0 0F2@1 0F3@1 0B2@1 0B3@1 0U1
#   d1: 1F0@0 1B0@0 1F1@0 1B1@0 1U0 1F2@1 1B2@1 1F3@1 1B3@1 1U1

def plan():
    return schedules.build("1f1b", 2, 2, num_minibatches=2, updates=True)


def with_row(device, labels, base=None):
    base = base or plan()
    per = [[str(a) for a in base.actions(d)] for d in range(base.num_devices)]
    per[device] = labels.split()
    return rebuild(base, per)


@pytest.mark.parametrize("device, row, rule, action, index", [
    # U(0, 0) moved before 0B1, one of the gradients it applies.
    (0, "0F0@0 0F1@0 0B0@0 0U0 0B1@0 0F2@1 0F3@1 0B2@1 0B3@1 0U1",
     "update-after-gradient", "0U0", 3),
    # 1B0 on version 1 while its forward ran on version 0.
    (1, "1F0@0 1B0@1 1F1@0 1B1@0 1U0 1F2@1 1B2@1 1F3@1 1B3@1 1U1",
     "version-mismatch", "1B0@1", 1),
    # 0F2 runs on version 1 before U(0, 0) produced it.
    (0, "0F0@0 0F1@0 0B0@0 0B1@0 0F2@1 0U0 0F3@1 0B2@1 0B3@1 0U1",
     "version-after-update", "0F2@1", 4),
    # Stage 1 never updates after mini-batch 1.
    (1, "1F0@0 1B0@0 1F1@0 1B1@0 1U0 1F2@1 1B2@1 1F3@1 1B3@1",
     "missing-update", "1U1", -1),
    # Two U's of mini-batch 0.
    (1, "1F0@0 1B0@0 1F1@0 1B1@0 1U0 1F2@1 1B2@1 1F3@1 1B3@1 1U0",
     "duplicate", "1U0", 9),
    # A mini-batch index the plan does not have.
    (0, "0F0@0 0F1@0 0B0@0 0B1@0 0U0 0F2@1 0F3@1 0B2@1 0B3@1 0U1 0U2",
     "update-range", "0U2", 10),
    # Version 3 needs three updates of stage 0; the plan has two.
    (0, "0F0@0 0F1@0 0B0@0 0B1@0 0U0 0F2@3 0F3@1 0B2@1 0B3@1 0U1",
     "version-range", "0F2@3", 5),
    # With updates every pass names its version.
    (0, "0F0@0 0F1 0B0@0 0B1@0 0U0 0F2@1 0F3@1 0B2@1 0B3@1 0U1",
     "version-mismatch", "0F1", 1),
])
def test_broken_updates_and_versions(device, row, rule, action, index):
    err = rule_of(with_row(device, row))
    assert (err.rule, err.action, err.device, err.index) == (rule, action, device, index)


def test_updates_apply_in_order():
    # Versions stay 0 (stashed weights, as asynchronous plans do), so only U's order is wrong.
    s = Schedule.from_actions([["0F0@0", "0B0@0", "0F1@0", "0B1@0", "0U1", "0U0"]])
    assert s.num_minibatches == 2 and s.num_microbatches == 1
    err = rule_of(s)
    assert (err.rule, err.action, err.index) == ("update-order", "0U1", 4)


def test_versioned_and_unversioned_passes_do_not_mix():
    err = rule_of(Schedule.from_actions([["0F0@0", "0B0"], ["1F0", "1B0"]]))
    assert (err.rule, err.action, err.index) == ("version-mismatch", "0B0", 1)
    # Versions without updates are consistent on their own: a plan may pin version 0.
    schedules.validate(Schedule.from_actions([["0F0@0", "0B0@0"], ["1F0@0", "1B0@0"]]))


def test_split_backward_versions_and_updates():
    base = schedules.build("zb-h1", 2, 2, num_minibatches=2, updates=True)
    # W of micro-batch 0 on another version than its F and I.
    err = rule_of(with_row(1, "1F0@0 1I0@0 1F1@0 1I1@0 1W0@1 1W1@0 1U0 "
                              "1F2@1 1I2@1 1F3@1 1I3@1 1W2@1 1W3@1 1U1", base))
    assert (err.rule, err.action) == ("version-mismatch", "1W0@1")
    # U before the last W it applies (I is not enough).
    err = rule_of(with_row(1, "1F0@0 1I0@0 1F1@0 1I1@0 1W0@0 1U0 1W1@0 "
                              "1F2@1 1I2@1 1F3@1 1I3@1 1W2@1 1W3@1 1U1", base))
    assert (err.rule, err.action, err.index) == ("update-after-gradient", "1U0", 5)


@FAST
@given(s=generated(max_p=5, max_m=8), t=st.integers(2, 3), data=st.data())
def test_dropped_update_is_missing(s, t, data):
    kw = {"num_chunks": s.num_chunks} if s.name == "interleaved-1f1b" else {}
    plan_ = schedules.build(s.name, s.num_devices, s.num_microbatches, num_minibatches=t,
                            updates=True, **kw)
    schedules.validate(plan_)
    per = [plan_.actions(d) for d in range(plan_.num_devices)]
    d = data.draw(st.integers(0, plan_.num_devices - 1))
    us = [i for i, a in enumerate(per[d]) if a.kind == "U"]
    gone = per[d].pop(data.draw(st.sampled_from(us)))
    err = rule_of(rebuild(plan_, per))
    assert (err.rule, err.action, err.device) == ("missing-update", str(gone), d)
