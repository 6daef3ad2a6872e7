"""The Python contract of pipetrain.schedules (CONTRACTS.md section 1)."""

import pytest

from pipetrain import schedules


def test_build_shape_and_placement():
    s = schedules.build("interleaved-1f1b", num_stages=4, num_microbatches=8, num_chunks=2)
    assert (s.num_devices, s.num_stages, s.num_microbatches, s.num_chunks) == (4, 8, 8, 2)
    assert [s.device_of(k) for k in range(8)] == [k % 4 for k in range(8)]
    assert [s.chunk_of(k) for k in range(8)] == [k // 4 for k in range(8)]
    assert s.predecessors(0) == [] and s.successors(7) == []
    assert s.predecessors(5) == [4] and s.successors(5) == [6]


def test_action_fields_and_text():
    s = schedules.build("1f1b", num_stages=4, num_microbatches=8)
    a = s.actions(1)[0]
    assert (a.kind, a.stage, a.chunk, a.microbatch, a.device) == ("F", 1, 0, 0, 1)
    assert str(a) == "1F0"
    assert a == schedules.Action.parse("1F0") and hash(a) == hash(schedules.Action.parse("1F0"))
    assert {x.kind for d in range(4) for x in s.actions(d)} == {"F", "B"}
    z = schedules.build("zb-h1", num_stages=4, num_microbatches=8)
    assert {x.kind for d in range(4) for x in z.actions(d)} == {"F", "I", "W"}


def test_dependencies_point_at_the_right_actions():
    s = schedules.build("1f1b", num_stages=3, num_microbatches=4)
    for d in range(3):
        acts = s.actions(d)
        for a, deps in zip(acts, s.dependencies(d)):
            named = sorted(str(s.actions(dd)[i]) for dd, i in deps)
            if a.kind == "F":
                want = [] if a.stage == 0 else [f"{a.stage - 1}F{a.microbatch}"]
            else:
                want = [f"{a.stage}F{a.microbatch}"]
                if a.stage < 2:
                    want.append(f"{a.stage + 1}B{a.microbatch}")
            assert named == sorted(want), (str(a), named)


def test_interleaved_same_device_dependencies_are_listed():
    # p = 1, v = 2: stage 1 lives on device 0 with stage 0; its F waits for 0F<mb>.
    s = schedules.build("interleaved-1f1b", num_stages=1, num_microbatches=2, num_chunks=2)
    acts, deps = s.actions(0), s.dependencies(0)
    for a, ds in zip(acts, deps):
        if a.kind == "F" and a.stage == 1:
            assert [str(acts[i]) for _, i in ds] == [f"0F{a.microbatch}"]


def test_text_round_trip_and_hand_written():
    for name in schedules.NAMES:
        kw = {"num_chunks": 2} if name == "interleaved-1f1b" else {}
        s = schedules.build(name, num_stages=3, num_microbatches=6, **kw)
        t = schedules.validate(schedules.parse(str(s)))
        for d in range(s.num_devices):
            assert t.actions(d) == s.actions(d)
        assert [t.device_of(k) for k in range(t.num_stages)] == \
               [s.device_of(k) for k in range(s.num_stages)]
    hand = schedules.Schedule.from_actions([["0F0", "0F1", "0B0", "0B1"],
                                            ["1F0", "1B0", "1F1", "1B1"]])
    schedules.validate(hand)
    # d0: F0 [0,1] F1 [1,2] ... B0 [4,6] B1 [7,9]; d1: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7].
    assert hand.simulate(forward=1.0, backward=2.0).makespan == 9.0


def test_bad_schedule_raises_schedule_error():
    bad = schedules.Schedule.from_actions([["0F0", "0B0"], ["1B0", "1F0"]])
    with pytest.raises(schedules.ScheduleError) as err:
        schedules.validate(bad)
    assert err.value.rule == "backward-after-forward"
    assert err.value.action == "1B0" and (err.value.device, err.value.index) == (1, 0)
    with pytest.raises(schedules.ScheduleError):
        bad.simulate()
    with pytest.raises(schedules.ScheduleError):
        bad.dependencies(0)


@pytest.mark.parametrize("args, words", [
    (("nope", 4, 8), "allowed: gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2"),
    (("1f1b", 0, 8), "num_stages must be >= 1"),
    (("gpipe", 4, 0), "num_microbatches must be >= 1"),
    (("interleaved-1f1b", 4, 6, 2), "multiple of num_stages"),
    (("1f1b", 4, 8, 2), "interleaved-1f1b only"),
    (("interleaved-1f1b", 4, 8, 0), "num_chunks must be >= 1"),
    (("interleaved-1f1b", 4, 6, 0), "num_chunks must be >= 1"),
    (("1f1b", 2**31, 8), "num_stages must be < 2\\*\\*31"),
    (("1f1b", 4, 8, 1, 0), "num_minibatches must be >= 1"),
    (("1f1b", 4096, 4096, 1, 4096), "over 2\\*\\*31 actions"),
])
def test_invalid_arguments(args, words):
    name, p, m, *rest = args
    kw = {"num_chunks": rest[0]} if rest else {}
    if len(rest) > 1:
        kw["num_minibatches"] = rest[1]
    with pytest.raises(ValueError, match=words):
        schedules.build(name, p, m, **kw)


def test_simulate_accepts_per_stage_lists():
    s = schedules.build("gpipe", num_stages=2, num_microbatches=1)
    r = s.simulate(forward=[1.0, 3.0], backward=[2.0, 5.0])
    # F0 on 0 [0,1], F0 on 1 [1,4], B0 on 1 [4,9], B0 on 0 [9,11].
    assert r.makespan == 11.0
    assert r.busy == [3.0, 8.0] and r.idle == [8.0, 3.0]
    assert r.starts(1) == [1.0, 4.0] and r.ends(0) == [1.0, 11.0]
    with pytest.raises(ValueError, match="one cost per stage"):
        s.simulate(forward=[1.0])


def test_kinds_are_named_constants():
    assert [k.value for k in schedules.Kind] == ["F", "B", "I", "W", "U", "SF", "RF", "SB", "RB"]
    assert schedules.Kind.F == "F" and "U" in {schedules.Kind.U}
    a = schedules.Action.parse("2F5@1")
    assert a.kind is schedules.Kind.F and a.kind == "F" and f"{a.kind}" == "F"


def test_plan_over_minibatches_contract():
    s = schedules.build("1f1b", num_stages=2, num_microbatches=2, num_minibatches=2,
                        updates=True)
    assert (s.num_minibatches, s.num_microbatches, s.has_updates, s.versioned) == (2, 2, True, True)
    acts = s.actions(0)
    u = acts[4]
    assert (str(u), u.kind, u.stage, u.microbatch, u.minibatch, u.version) == ("0U0", "U", 0, 0, 0, -1)
    f = acts[5]
    assert (str(f), f.microbatch, f.minibatch, f.version, f.chunk, f.device) == ("0F2@1", 2, 1, 1, 0, 0)
    assert f == schedules.Action.parse("0F2@1") and f != schedules.Action.parse("0F2@0")
    assert hash(f) == hash(schedules.Action.parse("0F2@1"))
    # The update costs time on its device; 2 mini-batches of (m+p-1)(F+B) + u each.
    assert s.simulate(forward=1.0, backward=2.0, update=0.5).makespan == 2 * (3 * 3.0 + 0.5)


def test_stage_graph_is_the_schedules_own():
    s = schedules.build("interleaved-1f1b", num_stages=2, num_microbatches=2, num_chunks=2)
    g = s.stage_graph
    assert (g.num_stages, g.num_devices, g.is_chain) == (4, 2, True)
    assert [st.device for st in g.stages] == [s.device_of(k) for k in range(4)] == [0, 1, 0, 1]
    assert [st.chunk for st in g.stages] == [s.chunk_of(k) for k in range(4)] == [0, 0, 1, 1]
    assert s.edges == [(e.src, e.dst) for e in g.edges] == [(0, 1), (1, 2), (2, 3)]
    assert g.stage(2).inputs == [1] and g.stage(2).outputs == [2]


def test_label_follows_the_fields():
    import dataclasses
    a = schedules.build("1f1b", num_stages=2, num_microbatches=2).actions(0)[0]
    assert str(a) == "0F0"
    b = dataclasses.replace(a, microbatch=1, version=3)
    assert str(b) == "0F1@3" and str(a) == "0F0"
