"""Generators: golden orders for small p, hand-derived from each schedule's definition."""

import pytest
from schedule_helpers import expand, rows

from pipetrain import schedules


def test_gpipe_p2_m3():
    # All forwards in micro-batch order, then all backwards in micro-batch order.
    s = schedules.build("gpipe", num_stages=2, num_microbatches=3)
    assert rows(s) == [["0F0", "0F1", "0F2", "0B0", "0B1", "0B2"],
                       ["1F0", "1F1", "1F2", "1B0", "1B1", "1B2"]]


def test_1f1b_p3_m4():
    # Stage s: p-s-1 warm-up forwards, then F/B pairs, then the remaining backwards.
    want = expand({0: "F0 F1 F2 B0 F3 B1 B2 B3",
                   1: "F0 F1 B0 F2 B1 F3 B2 B3",
                   2: "F0 B0 F1 B1 F2 B2 F3 B3"})
    assert rows(schedules.build("1f1b", 3, 4)) == [want[0], want[1], want[2]]


def test_1f1b_fewer_microbatches_than_stages():
    # p = 4, m = 2: warm-up is capped at m.
    want = expand({0: "F0 F1 B0 B1", 1: "F0 F1 B0 B1", 2: "F0 F1 B0 B1", 3: "F0 B0 F1 B1"})
    assert rows(schedules.build("1f1b", 4, 2)) == [want[k] for k in range(4)]


def test_interleaved_p2_v2_m4():
    # Forward order (group of p micro-batches, chunk 0 then chunk 1): (c0,0) (c0,1) (c1,0)
    # (c1,1) (c0,2) (c0,3) (c1,2) (c1,3); backward walks chunks in reverse. Stage = c*p + d.
    # Warm-up on device d: (p-d-1)*2 + (v-1)*p = 4 on d0, 2 on d1.
    s = schedules.build("interleaved-1f1b", 2, 4, num_chunks=2)
    assert rows(s) == [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3".split(),
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3".split(),
    ]
    assert [s.chunk_of(k) for k in range(4)] == [0, 0, 1, 1]


def test_zb_h1_p3_m4():
    # Warm-up p-s forwards; then per micro-batch j: I(j), W(j - s) if due, next F.
    want = expand({0: "F0 F1 F2 I0 W0 F3 I1 W1 I2 W2 I3 W3",
                   1: "F0 F1 I0 F2 I1 W0 F3 I2 W1 I3 W2 W3",
                   2: "F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3"})
    assert rows(schedules.build("zb-h1", 3, 4)) == [want[0], want[1], want[2]]


def test_zb_h2_p3_m6():
    # Warm-up 2(p-s)-1 forwards, W lag 2s.
    want = expand({0: "F0 F1 F2 F3 F4 I0 W0 F5 I1 W1 I2 W2 I3 W3 I4 W4 I5 W5",
                   1: "F0 F1 F2 I0 F3 I1 F4 I2 W0 F5 I3 W1 I4 W2 I5 W3 W4 W5",
                   2: "F0 I0 F1 I1 F2 I2 F3 I3 F4 I4 W0 F5 I5 W1 W2 W3 W4 W5"})
    assert rows(schedules.build("zb-h2", 3, 6)) == [want[0], want[1], want[2]]


def test_zb_h2_few_microbatches_shortens_the_w_lag():
    # m = 3 < 2p-1 = 5: warm-up min(m, 2(p-s)-1) = 3, 3, 1; lag min(2s, m-(p-s)) = 0, 1, 2.
    want = expand({0: "F0 F1 F2 I0 W0 I1 W1 I2 W2",
                   1: "F0 F1 F2 I0 I1 W0 I2 W1 W2",
                   2: "F0 I0 F1 I1 F2 I2 W0 W1 W2"})
    assert rows(schedules.build("zb-h2", 3, 3)) == [want[0], want[1], want[2]]


def test_single_stage_degenerates_to_alternation():
    for name in ("1f1b", "zb-h1", "zb-h2"):
        s = schedules.build(name, 1, 3)
        kinds = "".join(a.kind for a in s.actions(0))
        assert kinds == ("FBFBFB" if name == "1f1b" else "FIWFIWFIW"), name


def test_printed_grid_shows_time_slots():
    # Unit slots: d1 runs 1F0@1 1F1@2 1B0@3 1B1@4; d0's 0B0 waits for 1B0 (ends 4).
    s = schedules.build("gpipe", 2, 2)
    assert str(s).splitlines() == [
        "# schedule gpipe stages=2 devices=2 microbatches=2",
        "d0: 0F0 0F1  .   .  0B0 0B1",
        "d1:  .  1F0 1F1 1B0 1B1",
    ]


@pytest.mark.parametrize("name", schedules.NAMES)
def test_every_action_is_on_its_stages_device(name):
    kw = {"num_chunks": 3} if name == "interleaved-1f1b" else {}
    s = schedules.build(name, 4, 8, **kw)
    for d in range(s.num_devices):
        for a in s.actions(d):
            assert s.device_of(a.stage) == d == a.device
            assert a.chunk == a.stage // 4


# -- p = 4, derived by hand from each definition ------------------------------------------

def test_gpipe_p4_m3():
    # Fill-drain: every stage runs all forwards, then all backwards, in micro-batch order.
    want = expand({s: "F0 F1 F2 B0 B1 B2" for s in range(4)})
    assert rows(schedules.build("gpipe", 4, 3)) == [want[s] for s in range(4)]


def test_1f1b_p4_m6():
    # Stage s: p-s-1 warm-up forwards, then (F, B) pairs while forwards remain, then drain.
    want = expand({0: "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5",
                   1: "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5",
                   2: "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5",
                   3: "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"})
    assert rows(schedules.build("1f1b", 4, 6)) == [want[s] for s in range(4)]


def test_interleaved_p4_v2_m4():
    # Stage = chunk * p + device. Forward order on a device: chunk 0 for micro-batches 0..3,
    # then chunk 1; backward order: chunk 1 first, then chunk 0. Warm-up forwards on device
    # d: min((p-d-1)*2 + (v-1)*p, m*v) = 8, 8, 6, 4; then (F, B) pairs; then the drain.
    s = schedules.build("interleaved-1f1b", 4, 4, num_chunks=2)
    assert rows(s) == [
        "0F0 0F1 0F2 0F3 4F0 4F1 4F2 4F3 4B0 4B1 4B2 4B3 0B0 0B1 0B2 0B3".split(),
        "1F0 1F1 1F2 1F3 5F0 5F1 5F2 5F3 5B0 5B1 5B2 5B3 1B0 1B1 1B2 1B3".split(),
        "2F0 2F1 2F2 2F3 6F0 6F1 6F2 6B0 6F3 6B1 6B2 6B3 2B0 2B1 2B2 2B3".split(),
        "3F0 3F1 3F2 3F3 7F0 7B0 7F1 7B1 7F2 7B2 7F3 7B3 3B0 3B1 3B2 3B3".split(),
    ]


def test_zb_h1_p4_m5():
    # Warm-up p-s forwards; then for each j: I(j), every W(k) with k <= j - s, the next F;
    # then the remaining W's.
    want = expand({0: "F0 F1 F2 F3 I0 W0 F4 I1 W1 I2 W2 I3 W3 I4 W4",
                   1: "F0 F1 F2 I0 F3 I1 W0 F4 I2 W1 I3 W2 I4 W3 W4",
                   2: "F0 F1 I0 F2 I1 F3 I2 W0 F4 I3 W1 I4 W2 W3 W4",
                   3: "F0 I0 F1 I1 F2 I2 F3 I3 W0 F4 I4 W1 W2 W3 W4"})
    assert rows(schedules.build("zb-h1", 4, 5)) == [want[s] for s in range(4)]


# -- plans over several mini-batches ------------------------------------------------------

def reference_plan(one, T, updates):
    """What build(..., num_minibatches=T, updates=...) promises, written out independently:
    per device, T copies of the one-mini-batch order, micro-batches offset by t*m, passes on
    version t and U(s, t) right after stage s's last B / W of the copy (with updates)."""
    m = one.num_microbatches
    plan = []
    for d in range(one.num_devices):
        acts = one.actions(d)
        last = {a.stage: i for i, a in enumerate(acts) if a.kind in ("B", "W")}
        row = []
        for t in range(T):
            for i, a in enumerate(acts):
                span = f"-{a.microbatch + a.count - 1 + t * m}" if a.count > 1 else ""  # batched W
                row.append(f"{a.stage}{a.kind}{a.microbatch + t * m}{span}"
                           + (f"@{t}" if updates else ""))
                if updates and last[a.stage] == i:
                    row.append(f"{a.stage}U{t}")
        plan.append(row)
    return plan


def test_1f1b_p2_m2_two_minibatches_with_updates():
    # Written by hand: each device repeats its 1F1B order for micro-batches 2, 3 on version
    # 1; U(s, t) follows stage s's last B of mini-batch t.
    s = schedules.build("1f1b", 2, 2, num_minibatches=2, updates=True)
    assert rows(s) == [
        "0F0@0 0F1@0 0B0@0 0B1@0 0U0 0F2@1 0F3@1 0B2@1 0B3@1 0U1".split(),
        "1F0@0 1B0@0 1F1@0 1B1@0 1U0 1F2@1 1B2@1 1F3@1 1B3@1 1U1".split(),
    ]
    assert (s.num_minibatches, s.num_microbatches, s.has_updates, s.versioned) == (2, 2, True, True)
    schedules.validate(s)
    # U waits for its mini-batch's backwards; version 1 waits for U(s, 0).
    assert s.dependencies(0)[4] == [(0, 2), (0, 3)]
    assert s.dependencies(0)[5] == [(0, 4)]


def test_zb_h1_p2_m2_two_minibatches_update_after_last_w():
    s = schedules.build("zb-h1", 2, 2, num_minibatches=2, updates=True)
    assert rows(s)[1] == ("1F0@0 1I0@0 1F1@0 1I1@0 1W0@0 1W1@0 1U0 "
                          "1F2@1 1I2@1 1F3@1 1I3@1 1W2@1 1W3@1 1U1").split()


@pytest.mark.parametrize("name", schedules.NAMES)
@pytest.mark.parametrize("updates", [False, True])
def test_three_minibatch_plans(name, updates):
    kw = {"num_chunks": 2} if name == "interleaved-1f1b" else {}
    one = schedules.build(name, 3, 6, **kw)
    s = schedules.validate(schedules.build(name, 3, 6, num_minibatches=3, updates=updates, **kw))
    assert rows(s) == reference_plan(one, 3, updates)
    assert s.has_updates == s.versioned == updates
    for d in range(s.num_devices):
        for a in s.actions(d):
            t = a.microbatch if a.kind == "U" else a.microbatch // 6
            assert a.minibatch == t
            assert a.version == (-1 if a.kind == "U" or not updates else t)


def test_one_minibatch_without_updates_is_the_plain_schedule():
    for name in ("gpipe", "zb-h2"):
        assert rows(schedules.build(name, 3, 4, num_minibatches=1)) == rows(schedules.build(name, 3, 4))
