"""Simulator: closed forms from the papers, and a plain-Python reference simulator."""

from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from pipetrain import schedules

FAST = settings(max_examples=40, deadline=None)

ps = st.integers(1, 16)
ms = st.integers(1, 64)


@FAST
@given(p=ps, m=ms, f=st.sampled_from([0.5, 1.0, 2.0]), b=st.sampled_from([1.0, 2.0, 3.0]))
def test_gpipe_and_1f1b_bubble(p, m, f, b):
    # GPipe / PipeDream-Flush: bubble (p-1)/(m+p-1) with equal per-stage costs.
    for name in ("gpipe", "1f1b"):
        r = schedules.build(name, p, m).simulate(forward=f, backward=b)
        assert r.bubble_ratio == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
        assert r.makespan == pytest.approx((m + p - 1) * (f + b))


@FAST
@given(p=ps, k=st.integers(1, 4), v=st.integers(1, 4))
def test_interleaved_bubble(p, k, v):
    # Megatron interleaving: (p-1)/(v*m+p-1) when each of the v*p stages costs the same.
    m = p * k
    r = schedules.build("interleaved-1f1b", p, m, num_chunks=v).simulate(forward=1.0, backward=2.0)
    assert r.bubble_ratio == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)


@FAST
@given(p=ps, extra=st.integers(0, 48), fiw=st.sampled_from([(1, 1, 1), (1, 2, 1), (2, 1.5, 0.5)]))
def test_zb_h1_makespan(p, extra, fiw):
    # ZB-H1 (Qi et al. sec. 2.1): bubble (p-1)(F+I-W) per device (W <= I, m >= p).
    m = p + extra
    f, i, w = fiw
    r = schedules.build("zb-h1", p, m).simulate(forward=f, backward=i + w, weight=w)
    assert r.makespan == pytest.approx(m * (f + i + w) + (p - 1) * (f + i - w))


@FAST
@given(p=st.integers(2, 16), extra=st.integers(0, 48))
def test_zb_h1_is_a_third_of_1f1b(p, extra):
    m = p + extra
    zb = schedules.build("zb-h1", p, m).simulate(forward=1.0, backward=2.0)   # F = I = W = 1
    ref = schedules.build("1f1b", p, m).simulate(forward=1.0, backward=2.0)
    idle_zb, idle_ref = sum(zb.idle) / p, sum(ref.idle) / p
    assert idle_zb == pytest.approx((p - 1) * 1.0) and idle_ref == pytest.approx((p - 1) * 3.0)
    assert zb.bubble_ratio == pytest.approx((p - 1) / (3 * m + p - 1))


@FAST
@given(p=ps, m=ms, fiw=st.sampled_from([(1, 1, 1), (1, 2, 1), (1, 1.5, 0.5), (2, 1, 1)]))
def test_zb_h2_not_worse_than_h1(p, m, fiw):
    f, i, w = fiw
    h1 = schedules.build("zb-h1", p, m).simulate(forward=f, backward=i + w, weight=w)
    h2 = schedules.build("zb-h2", p, m).simulate(forward=f, backward=i + w, weight=w)
    assert h2.makespan <= h1.makespan + 1e-9


@FAST
@given(p=ps, extra=st.integers(0, 32))
def test_zb_h2_is_a_parallelogram(p, extra):
    # F = I = W, m >= 2p-1: device d is busy from d*F to its last action with no gap, so
    # every device idles exactly (p-1)F (Qi et al. sec. 2.2, Figure 3 bottom).
    m = 2 * p - 1 + extra
    r = schedules.build("zb-h2", p, m).simulate(forward=1.0, backward=2.0)
    for d in range(p):
        starts, ends = r.starts(d), r.ends(d)
        assert starts[0] == d
        assert starts[1:] == ends[:-1]
        assert r.idle[d] == p - 1


@FAST
@given(p=ps, m=ms)
def test_peak_inflight(p, m):
    # GPipe holds m micro-batches; 1F1B holds min(p-s, m) on stage s (PipeDream-Flush);
    # ZB-H1 the same as 1F1B; ZB-H2 min(2(p-s)-1, m) (Qi et al. sec. 2.2).
    got = {n: schedules.build(n, p, m).simulate().peak_inflight
           for n in ("gpipe", "1f1b", "zb-h1", "zb-h2")}
    assert got["gpipe"] == [m] * p
    assert got["1f1b"] == [min(p - s, m) for s in range(p)]
    assert got["zb-h1"] == got["1f1b"]
    assert got["zb-h2"] == [min(2 * (p - s) - 1, m) for s in range(p)]


@FAST
@given(p=ps, k=st.integers(1, 4), v=st.integers(2, 4))
def test_interleaved_peak_inflight(p, k, v):
    # Device d: (p-d-1)*2 + (v-1)*p warm-up forwards, then one more before the first B.
    m = p * k
    got = schedules.build("interleaved-1f1b", p, m, num_chunks=v).simulate().peak_inflight
    assert got == [min((p - d - 1) * 2 + (v - 1) * p + 1, m * v) for d in range(p)]


@FAST
@given(p=ps, m=ms, t=st.sampled_from([0.0, 0.25, 3.0]))
def test_gpipe_transfer_latency(p, m, t):
    # Each of the p-1 hops costs t on the way down and again on the way up.
    r = schedules.build("gpipe", p, m).simulate(forward=1.0, backward=2.0, transfer=t)
    assert r.makespan == pytest.approx((m + p - 1) * 3.0 + 2 * (p - 1) * t)


def test_transfer_bytes_over_bandwidth():
    s = schedules.build("gpipe", 3, 2)
    a = s.simulate(transfer=0.5, transfer_bytes=100.0, bandwidth=50.0)
    b = s.simulate(transfer=2.5)
    assert a.makespan == b.makespan
    with pytest.raises(ValueError, match="bandwidth"):
        s.simulate(transfer_bytes=1.0)


def test_bad_costs():
    s = schedules.build("zb-h1", 2, 2)
    with pytest.raises(ValueError, match="exceeds its backward"):
        s.simulate(backward=1.0, weight=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        s.simulate(forward=-1.0)


def reference_makespan(s, fwd, bwd, wgt, transfer, fixed=None):
    """Plain fixed-point simulation: sweep until no start time changes. A batched W of n
    micro-batches costs fixed + (W - fixed) * n (fixed None: n W's)."""
    acts = [s.actions(d) for d in range(s.num_devices)]
    deps = [s.dependencies(d) for d in range(s.num_devices)]

    def dur(a):
        w = wgt[a.stage] if wgt is not None else bwd[a.stage] / 2
        if a.kind == "W":
            a0 = fixed[a.stage] if fixed is not None else 0.0
            return a0 + (w - a0) * a.count
        return {"F": fwd[a.stage], "B": bwd[a.stage], "I": bwd[a.stage] - w}.get(a.kind, 0)

    end = [[0.0] * len(r) for r in acts]
    changed = True
    while changed:
        changed = False
        for d, row in enumerate(acts):
            t = 0.0
            for i, a in enumerate(row):
                for dd, j in deps[d][i]:
                    t = max(t, end[dd][j] + (transfer if dd != d else 0.0))
                e = t + dur(a)
                if e != end[d][i]:
                    end[d][i], changed = e, True
                t = e
    return max(max(r, default=0.0) for r in end)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(schedules.NAMES), p=st.integers(1, 5), k=st.integers(1, 3),
       v=st.integers(1, 3), lowered=st.booleans(), data=st.data())
def test_matches_reference_with_random_costs(name, p, k, v, lowered, data):
    kw = {"num_chunks": v} if name == "interleaved-1f1b" else {}
    s = schedules.build(name, p, p * k, **kw)
    if lowered:
        s = s.lower()
    n = s.num_stages
    cost = st.integers(1, 8).map(lambda x: x / 4)
    fwd = data.draw(st.lists(cost, min_size=n, max_size=n))
    bwd = data.draw(st.lists(cost, min_size=n, max_size=n))
    wgt = data.draw(st.one_of(st.none(), st.just([b * Fraction(1, 3) for b in bwd])))
    wgt = None if wgt is None else [float(x) for x in wgt]
    t = data.draw(st.sampled_from([0.0, 0.5]))
    # Batched W's: the fixed part of a + b * n, a fraction of each stage's W.
    share = data.draw(st.sampled_from([None, 0.0, 0.5, 1.0]))
    fixed = None if share is None else [
        share * (wgt[i] if wgt is not None else bwd[i] / 2) for i in range(n)]
    r = s.simulate(forward=fwd, backward=bwd, weight=wgt, transfer=t,
                   weight_fixed=0.0 if fixed is None else fixed)
    assert r.makespan == pytest.approx(reference_makespan(s, fwd, bwd, wgt, t, fixed))
    assert sum(r.busy) + sum(r.idle) == pytest.approx(r.makespan * s.num_devices)


# -- updates ------------------------------------------------------------------------------

@FAST
@given(p=st.integers(1, 8), m=st.integers(1, 12), T=st.integers(1, 4),
       fb=st.sampled_from([(1.0, 2.0), (0.5, 1.5), (2.0, 2.0)]),
       u=st.sampled_from([0.0, 0.5, 1.0, 4.0]))
def test_update_cost_over_minibatches(p, m, T, fb, u):
    # GPipe / 1F1B over T mini-batches: stage 0 is the last to finish each mini-batch (the
    # backward chain ends there), then runs its U, then starts the next mini-batch; every
    # other stage's U ends before the next forward reaches it. So each mini-batch takes
    # (m+p-1)(F+B) + u, and U adds exactly T*u.
    f, b = fb
    for name in ("gpipe", "1f1b"):
        s = schedules.build(name, p, m, num_minibatches=T, updates=True)
        r = s.simulate(forward=f, backward=b, update=u)
        assert r.makespan == pytest.approx(T * ((m + p - 1) * (f + b) + u))
        assert r.busy == pytest.approx([T * (m * (f + b) + u)] * p)


def test_update_cost_per_stage_and_where_it_lands():
    # 1F1B, p = 2, m = 2, T = 2; F = 1, B = 2, U costs 3 on stage 0 and 1 on stage 1.
    # d1: 1F0 [1,2] 1B0 [2,4] 1F1 [4,5] 1B1 [5,7]; d0: 0F0 0F1 [0,2], 0B0 [4,6], 0B1 [7,9]:
    # mini-batch 0 ends on d0 at 9; 0U0 [9,12]; mini-batch 1 repeats the first 9 time units
    # shifted by 12; 0U1 [21,24].
    s = schedules.build("1f1b", 2, 2, num_minibatches=2, updates=True)
    r = s.simulate(forward=1.0, backward=2.0, update=[3.0, 1.0])
    assert r.starts(0) == [0, 1, 4, 7, 9, 12, 13, 16, 19, 21]
    assert r.ends(0)[-1] == r.makespan == 24.0
    # d1's U(1, 0) [7,8] right after its last B, well before its next forward at 13.
    assert r.starts(1)[4:6] == [7.0, 13.0]
    with pytest.raises(ValueError, match="update needs a scalar or one cost per stage"):
        s.simulate(update=[1.0])


def grid_slots(s):
    """Start slot of every action, read off the printed grid's columns."""
    lines = str(s).splitlines()[1:]
    out = []
    for line in lines:
        cells = line.split(":", 1)[1].split()
        out.append([i for i, c in enumerate(cells) if c != "."])
    return out


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(schedules.NAMES), p=st.integers(1, 4), k=st.integers(1, 2),
       T=st.integers(1, 2), updates=st.booleans())
def test_printed_grid_is_the_unit_cost_simulation(name, p, k, T, updates):
    # The grid and the simulator share one play-out loop: with every action one unit long
    # (B = 1 unsplit, I = W = 1 split, U = 1) the grid's columns are the simulated starts.
    kw = {"num_chunks": 2} if name == "interleaved-1f1b" else {}
    s = schedules.build(name, p, p * k, num_minibatches=T, updates=updates, **kw)
    unit_b = 2.0 if s.split_backward else 1.0
    r = s.simulate(forward=1.0, backward=unit_b, weight=1.0 if s.split_backward else None,
                   update=1.0, weight_fixed=1.0 if s.split_backward else 0.0)  # batched W: 1
    assert grid_slots(s) == [[int(x) for x in r.starts(d)] for d in range(s.num_devices)]
