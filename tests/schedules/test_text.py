"""Text form: the printed grid parses back to the same schedule; hand-written text works."""

import time

import pytest
from hypothesis import given, settings, strategies as st

from pipetrain import schedules

FAST = settings(max_examples=30, deadline=None)


@FAST
@given(name=st.sampled_from(schedules.NAMES), p=st.integers(1, 6), k=st.integers(1, 4),
       v=st.integers(1, 3), lowered=st.booleans())
def test_round_trip(name, p, k, v, lowered):
    kw = {"num_chunks": v} if name == "interleaved-1f1b" else {}
    s = schedules.build(name, p, p * k, **kw)
    if lowered:
        s = s.lower()
    t = schedules.validate(schedules.parse(str(s)))
    assert t.name == name and t.num_stages == s.num_stages
    assert t.num_microbatches == s.num_microbatches and t.edges == s.edges
    for d in range(s.num_devices):
        assert t.actions(d) == s.actions(d)
    assert str(t) == str(s)


def test_hand_written_text_with_comments_and_dag():
    text = """
    # a tiny DAG: stage 0 feeds stages 1 and 2, each on its own device
    # schedule mine stages=3 devices=3 microbatches=1 edges=0>1,0>2
    d0: 0F0  .  0B0
    d1:  .  1F0 1B0
    d2:  .  2F0 2B0
    """
    s = schedules.validate(schedules.parse(text))
    assert s.name == "mine" and s.successors(0) == [1, 2]
    assert s.simulate(forward=1.0, backward=1.0).makespan == 4.0


def test_dag_header_is_printed():
    s = schedules.parse("# schedule x edges=0>1,0>2\nd0: 0F0 0B0\nd1: 1F0 1B0\nd2: 2F0 2B0")
    assert "edges=0>1,0>2" in str(s).splitlines()[0]


@pytest.mark.parametrize("text, words", [
    ("d0: 0F0 0Q0", "cannot parse action"),
    ("0F0 0B0", "expected 'd<device>: <actions>'"),
    ("d0: 0F0 0B0\nd0: 0F1 0B1", "listed twice"),
    ("# nothing", "no device rows"),
    ("d0: 0F0>1", "takes no peer"),
])
def test_parse_errors(text, words):
    with pytest.raises(ValueError, match=words):
        schedules.parse(text)


# -- updates and versions -----------------------------------------------------------------

@pytest.mark.parametrize("text, fields", [
    # (stage, kind, microbatch, peer, version)
    ("1F3", (1, "F", 3, -1, -1)),
    ("1F3@2", (1, "F", 3, -1, 2)),
    ("0W12@0", (0, "W", 12, -1, 0)),
    ("1U0", (1, "U", 0, -1, -1)),
    ("1SF3>2", (1, "SF", 3, 2, -1)),
    ("2RB3<1", (2, "RB", 3, 1, -1)),
])
def test_action_labels_parse_and_print(text, fields):
    a = schedules.Action.parse(f"  {text} ")
    assert (a.stage, a.kind, a.microbatch, a.peer, a.version) == fields
    assert str(a) == text
    assert isinstance(a.kind, schedules.Kind)
    # An Action made in Python prints through the same C++ label.
    assert str(schedules.Action(*fields)) == text


@pytest.mark.parametrize("text, words", [
    ("1U0@1", "allowed only on F, B, I and W"),
    ("1SF3@2", "cannot parse action"),
    ("1F3@", "cannot parse action"),
    ("1F3@x", "cannot parse action"),
    ("1F3>2", "takes no peer"),
    ("1SF3<2", "needs '>"),
    ("1RF3", "needs '<"),
    ("1X3", "cannot parse action"),
    ("1F2147483648", "micro-batch .* too large"),
    ("2147483648F0", "stage .* too large"),
    ("1F0@99999999999", "version .* too large"),
    ("1SF0>2147483648", "peer .* too large"),
])
def test_bad_action_labels(text, words):
    with pytest.raises(ValueError, match=words):
        schedules.Action.parse(text)


@pytest.mark.parametrize("name", schedules.NAMES)
def test_round_trip_with_updates(name):
    kw = {"num_chunks": 2} if name == "interleaved-1f1b" else {}
    s = schedules.build(name, 3, 6, num_minibatches=3, updates=True, **kw)
    text = str(s)
    assert text.splitlines()[0].endswith("microbatches=6 minibatches=3" if name != "interleaved-1f1b"
                                         else "microbatches=6 minibatches=3 placement=0,1,2,0,1,2")
    t = schedules.validate(schedules.parse(text))
    assert (t.num_minibatches, t.num_microbatches) == (3, 6)
    for d in range(s.num_devices):
        assert t.actions(d) == s.actions(d)
    assert str(t) == text


def test_minibatches_are_inferred_from_updates():
    s = schedules.parse("d0: 0F0@0 0B0@0 0U0 0F1@1 0B1@1 0U1")
    assert (s.num_minibatches, s.num_microbatches) == (2, 1)
    schedules.validate(s)


# -- sizes follow from the actions, never from a number alone -----------------------------

def quick(fn):
    """Runs fn; fails if it takes longer than a second (the sizes must not be allocated)."""
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("text, words", [
    ("d30000000: 0F0 0B0", "30000001 devices .* d30000000"),
    ("# schedule x devices=30000000\nd0: 0F0 0B0", "30000000 devices"),
    ("d0: 99999999F0 99999999B0", "num_stages=100000000"),
    ("# schedule x stages=99999999\nd0: 0F0 0B0", "num_stages=99999999"),
    ("d0: 0F0 0B0\nd1:", "device 1 holds no stage"),
    ("d0: 0F3000000000", "micro-batch .* too large"),
    ("d5000000000: 0F0", "device number is too large"),
    ("# schedule x minibatches=2000000000 microbatches=2\nd0: 0F0 0B0",
     "num_minibatches \\* num_microbatches must be < 2\\*\\*31"),
])
def test_sizes_the_actions_cannot_fill_are_value_errors(text, words):
    with pytest.raises(ValueError, match=words):
        quick(lambda: schedules.parse(text))


@pytest.mark.parametrize("text, missing", [
    ("d0: 0F99999999 0B0", "0F0"),
    ("# schedule x microbatches=2000000000\nd0: 0F0 0B0", "0F1"),
    ("# schedule x microbatches=1000 minibatches=1000\nd0: 0F0@0 0B0@0 0U0", "0F1"),
])
def test_huge_microbatch_counts_are_missing_work(text, missing):
    # The validator reports the first missing forward without a stages x micro-batches table.
    s = quick(lambda: schedules.parse(text))
    with pytest.raises(schedules.ScheduleError) as err:
        quick(lambda: schedules.validate(s))
    assert (err.value.rule, err.value.action) == ("missing-forward", missing)


@pytest.mark.parametrize("kwargs, field", [
    ({"per_device": [[schedules.Action(2**31, "F", 0)]]}, "stage"),
    ({"per_device": [[schedules.Action(0, "F", 2**40)]]}, "microbatch"),
    ({"per_device": [[schedules.Action(0, "F", 0, version=2**31)]]}, "version"),
    ({"per_device": [[schedules.Action(0, "SF", 0, peer=2**31)]]}, "peer"),
    ({"per_device": [["0F0", "0B0"]], "num_microbatches": 2**31}, "num_microbatches"),
    ({"per_device": [["0F0", "0B0"]], "num_stages": 2**63}, "num_stages"),
    ({"per_device": [["0F0", "0B0"]], "num_minibatches": 2**31}, "num_minibatches"),
    ({"per_device": [["0F0", "0B0"]], "placement": [2**31]}, "placement"),
    ({"per_device": [["0F0", "0B0"]], "edges": [(0, 2**31)]}, "edge dst"),
])
def test_numbers_beyond_int32_name_their_field(kwargs, field):
    per = kwargs.pop("per_device")
    with pytest.raises(ValueError, match=field):
        schedules.Schedule.from_actions(per, **kwargs)
