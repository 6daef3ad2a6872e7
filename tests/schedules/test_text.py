"""Text form: the printed grid parses back to the same schedule; hand-written text works."""

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
