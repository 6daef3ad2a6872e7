"""Batched W in the schedule IR: text form, validator rules, dependencies, simulator cost,
and the zb-h1-bw / zb-h2-bw generators."""

import pytest
from hypothesis import given, settings, strategies as st

from pipetrain import schedules
from pipetrain.schedules import Action, ScheduleError

FAST = settings(max_examples=30, deadline=None)


def rule(text):
    with pytest.raises(ScheduleError) as e:
        schedules.parse(text).validate()
    return e.value


# -- text form -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, mb, count", [("1W3-5", 3, 3), ("1W3-5@2", 3, 3), ("0W0-1", 0, 2),
                                             ("2W7", 7, 1)])
def test_parse_print_round_trip(text, mb, count):
    a = Action.parse(text)
    assert (a.kind, a.microbatch, a.count, list(a.microbatches)) == \
        ("W", mb, count, list(range(mb, mb + count)))
    assert str(a) == text
    assert Action.parse(str(a)) == a
    assert str(Action(1, "W", 3, count=3)) == "1W3-5"


def test_a_one_element_range_is_a_plain_w():
    assert Action.parse("1W3-3") == Action.parse("1W3")
    assert str(Action.parse("1W3-3")) == "1W3"


@pytest.mark.parametrize("text, match", [("1F3-5", "only on W"), ("1I3-5", "only on W"),
                                         ("1W5-3", "ends \\(3\\) before it starts \\(5\\)"),
                                         ("1W3-", "expected"), ("1W3-99999999999", "too large")])
def test_bad_ranges_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        Action.parse(text)


def test_count_on_another_kind_is_refused_from_lists():
    with pytest.raises(ValueError, match="above 1 only for a W"):
        schedules.Schedule.from_actions([[Action(0, "F", 0, count=2)]])


@FAST
@given(name=st.sampled_from(["zb-h1-bw", "zb-h2-bw"]), p=st.integers(1, 6), m=st.integers(1, 12))
def test_printed_schedule_parses_back_equal(name, p, m):
    s = schedules.build(name, p, m)
    back = schedules.parse(str(s))
    for d in range(p):
        assert back.actions(d) == s.actions(d)


# -- validator ---------------------------------------------------------------------------------

def test_valid_batched_w():
    s = schedules.parse("d0: 0F0 0F1 0F2 0I0 0I1 0I2 0W0-2")
    s.validate()
    # The batched W waits for the I of each micro-batch it covers (same device: program order).
    assert s.dependencies(0)[6] == [(0, 3), (0, 4), (0, 5)]


def test_a_microbatch_w_twice_is_a_duplicate_naming_both():
    e = rule("d0: 0F0 0F1 0I0 0I1 0W0-1 0W1")
    assert (e.rule, e.action, e.index) == ("duplicate", "0W1", 5)
    assert "already covered by 0W0-1 at position 4" in str(e)
    e = rule("d0: 0F0 0F1 0I0 0I1 0W1 0W0-1")
    assert (e.rule, e.action) == ("duplicate", "0W0-1")
    assert "W of micro-batch 1 already appears in 0W1" in str(e)
    e = rule("d0: 0F0 0F1 0F2 0I0 0I1 0I2 0W0-1 0W1-2")
    assert (e.rule, e.action) == ("duplicate", "0W1-2")


def test_a_missing_w_is_named():
    e = rule("d0: 0F0 0F1 0F2 0I0 0I1 0I2 0W0-1")
    assert (e.rule, e.action, e.index) == ("missing-weight", "0W2", -1)


def test_a_batched_w_before_one_of_its_is():
    e = rule("d0: 0F0 0F1 0I0 0W0-1 0I1")
    assert (e.rule, e.action) == ("weight-after-input-grad", "0W0-1")
    assert "waits for 0I1" in str(e)
    # Across devices: stage 1's W cannot cover a micro-batch whose I is on the wrong stage.
    e = rule("d0: 0F0 0F1 0I0 0I1 0W0 0W1\nd1: 1F0 1F1 1W0-1 1I0 1I1")
    assert e.rule == "weight-after-input-grad"


def test_a_range_past_the_microbatches_is_out_of_range():
    e = rule("# schedule x microbatches=2\nd0: 0F0 0F1 0I0 0I1 0W0-2")
    assert (e.rule, e.action) == ("microbatch-range", "0W0-2")


def test_batched_w_with_an_update_and_versions():
    s = schedules.parse("d0: 0F0@0 0F1@0 0I0@0 0I1@0 0W0-1@0 0U0")
    s.validate()
    assert s.dependencies(0)[5] == [(0, 4)]          # U waits for the one batched W, once
    e = rule("d0: 0F0@0 0F1@0 0F2@1 0F3@1 0I0@0 0I1@0 0I2@1 0I3@1 0W0-1@0 0U0 0W2-3@0 0U1")
    assert e.rule == "version-mismatch" and e.action == "0W2-3@0"


# -- simulator ---------------------------------------------------------------------------------

def test_batched_cost_is_a_plus_b_n():
    # One stage: F F F I I I then one W of 3. F = 1, I = 1, W = 2 with a = 0.5:
    # W(3) = 0.5 + 1.5 * 3 = 5.0, so the makespan is 3 + 3 + 5.
    s = schedules.parse("d0: 0F0 0F1 0F2 0I0 0I1 0I2 0W0-2")
    assert s.simulate(forward=1, backward=3, weight=2, weight_fixed=0.5).makespan == 11.0
    assert s.simulate(forward=1, backward=3, weight=2).makespan == 12.0        # a = 0: 3 W's
    assert s.simulate(forward=1, backward=3, weight=2, weight_fixed=2).makespan == 8.0  # one W
    plain = schedules.parse("d0: 0F0 0F1 0F2 0I0 0I1 0I2 0W0 0W1 0W2")
    assert plain.simulate(forward=1, backward=3, weight=2, weight_fixed=2).makespan == 12.0


def test_weight_fixed_above_w_is_refused():
    s = schedules.build("zb-h1-bw", 2, 4)
    with pytest.raises(ValueError, match="weight_fixed of stage 0"):
        s.simulate(forward=1, backward=2, weight=1, weight_fixed=1.5)


@FAST
@given(h2=st.booleans(), p=st.integers(1, 8), m=st.integers(1, 24),
       a=st.sampled_from([0.0, 0.25, 0.5, 1.0]))
def test_bw_variant_is_never_slower_and_equal_at_a_zero(h2, p, m, a):
    # Same order, only the cool-down's W's merged: with a = 0 exactly the plain schedule's
    # makespan; with a > 0 never longer; busy time drops by a per W merged away.
    base = schedules.build("zb-h2" if h2 else "zb-h1", p, m)
    bw = schedules.build("zb-h2-bw" if h2 else "zb-h1-bw", p, m)
    rb = base.simulate(forward=1.0, backward=2.0, weight=1.0)
    r = bw.simulate(forward=1.0, backward=2.0, weight=1.0, weight_fixed=a)
    merged = [sum(x.count - 1 for x in bw.actions(d)) for d in range(p)]
    assert r.makespan <= rb.makespan + 1e-12
    assert r.busy == pytest.approx([b - a * k for b, k in zip(rb.busy, merged)])
    if a == 0.0:
        assert r.makespan == rb.makespan


# -- generators ----------------------------------------------------------------------------------

def test_zb_h1_bw_batches_what_follows_the_last_i():
    s = schedules.build("zb-h1-bw", 4, 8)
    assert [str(a) for a in s.actions(3)][-3:] == ["3F7", "3I7", "3W4-7"]
    assert [str(a) for a in s.actions(0)][-2:] == ["0I7", "0W7"]
    plain = schedules.build("zb-h1", 4, 8)
    for d in range(4):
        # Same order except that the trailing W's after the last I become one.
        got, want = [str(a) for a in s.actions(d)], [str(a) for a in plain.actions(d)]
        last_i = max(i for i, x in enumerate(want) if "I" in x)
        tail = want[last_i + 1:]
        assert got[:last_i + 1] == want[:last_i + 1]
        first, last = int(tail[0].split("W")[1]), int(tail[-1].split("W")[1])
        assert got[last_i + 1:] == [f"{d}W{first}" + (f"-{last}" if last > first else "")]


def test_zb_h2_bw_over_minibatches_with_updates_validates():
    s = schedules.build("zb-h2-bw", 3, 6, num_minibatches=3, updates=True)
    s.validate()
    assert "2W7-11@1" in [str(a) for a in s.actions(2)]
