"""Windows of the asynchronous plans (pipetrain.async_windows) against the full validated plan.

The reference here is ``build_async(name, p, m, T)``, the whole run as one plan that the C++
validator proved (deadlock-free, versions after their updates): the windows, concatenated,
must be exactly its actions, and every dependency the full plan gives an action of window c
must lie in window c or earlier (the cut is sound), the earlier ones being the ones a window
drops as carried.
"""

import itertools
import math
import random

import pytest

from pipetrain import async_windows as aw
from pipetrain.async_schedules import ASYNC, _versions, build_async
from pipetrain.plan import Plan


def _combos():
    for name, p, m in itertools.product(ASYNC, (1, 2, 3, 4), (1, 2, 3, 4)):
        if name.startswith("2bw") and m < p:
            continue
        yield name, p, m


COMBOS = list(_combos())


def _windows(name, p, m, T, W, stream):
    """The windows train() runs: ``stream`` leaves ``end`` unknown until the data runs out
    (the lookahead read reaches T), as a generator would."""
    L = aw.lookahead(p, m)
    out, c0 = [], 0
    while c0 < T:
        count = min(W, T - c0)
        known_end = T if (not stream or c0 + W + L >= T) else None
        out.append(aw.window_plan(name, p, m, c0, count, known_end))
        c0 += count
    return out


@pytest.mark.parametrize("name,p,m", COMBOS, ids=[f"{n}-p{p}-m{m}" for n, p, m in COMBOS])
def test_windows_are_the_full_plan_cut_soundly(name, p, m):
    T = 11          # long enough that windows are translated (first > lookahead + 2)
    full = Plan(build_async(name, p, m, T))
    for W, stream in [(1, True), (2, True), (3, False), (4, True), (T, False)]:
        wins = _windows(name, p, m, T, W, stream)
        for d in range(p):
            labels = [str(a) for w in wins for a in w.actions[d]]
            assert labels == [str(a) for a in full.actions[d]], (W, d)
        # Window index and offset of every action of the full plan.
        where, off = {}, [[0] * p]
        for c, w in enumerate(wins):
            for d in range(p):
                for i in range(len(w.actions[d])):
                    where[(d, off[-1][d] + i)] = c
            off.append([off[-1][d] + len(w.actions[d]) for d in range(p)])
        for c, w in enumerate(wins):
            carried = 0
            for d in range(p):
                for i, deps in enumerate(w.deps[d]):
                    g = off[c][d] + i
                    full_deps = full.deps[d][g]
                    # Sound cut: nothing waited for lies in a later window.
                    assert all(where[(dd, j)] <= c for dd, j in full_deps)
                    inside = sorted((dd, j - off[c][dd]) for dd, j in full_deps if where[(dd, j)] == c)
                    assert sorted(deps) == inside
                    carried += sum(1 for dd, j in full_deps if where[(dd, j)] < c)
            assert carried == w.carried
            if c > 0 and p > 1:
                assert w.carried > 0          # windows do lean on earlier ones
        assert wins[-1].end == T and all(w.end is None for w in wins[:-1])


@pytest.mark.parametrize("name,p,m", COMBOS[::3], ids=[f"{n}-p{p}-m{m}" for n, p, m in COMBOS[::3]])
def test_forward_version_closed_form_matches_the_counting(name, p, m):
    T = 9
    for r in range(p):
        table = _versions(name, p, r, m, T)
        assert {k: aw.forward_version(name, p, r, m, k) for k in table} == table


def test_window_data_is_the_lookahead():
    # Window [c0, c1) forwards stage 0's micro-batches up to c1*m + p - 2: the data of
    # ceil((p-1)/m) mini-batches past it, not one more.
    for name, p, m in COMBOS:
        L = aw.lookahead(p, m)
        assert L == math.ceil((p - 1) / m)
        w = aw.window_plan(name, p, m, 5, 2, None)
        assert w.data_minibatches == (5, 7 + L)
        assert max(w.forwards[0], default=-1) == 7 * m + p - 2


def _prefix_leads(plan, rng, tries=30):
    """Random executions of ``plan`` stopped at a random point: the updates each stage has
    applied, for down-closed prefixes (every dependency of a done action done)."""
    p = plan.num_devices
    for _ in range(tries):
        pos = [0] * p
        done = set()
        stop = rng.randrange(sum(map(len, plan.actions)))
        for _ in range(stop):
            ready = [d for d in range(p) if pos[d] < len(plan.actions[d])
                     and all(x in done for x in map(tuple, plan.deps[d][pos[d]]))]
            d = rng.choice(ready)
            done.add((d, pos[d]))
            pos[d] += 1
        yield [sum(1 for a in plan.actions[d][:pos[d]] if a.kind == "U") for d in range(p)]


@pytest.mark.parametrize("name,p,m", [("pipedream", 4, 1), ("pipedream", 3, 2), ("2bw", 4, 4),
                                      ("xpipe", 4, 2), ("spectrain", 2, 1), ("2bw-predict", 1, 1)])
def test_rollback_depth_bounds_how_far_a_stage_runs_ahead(name, p, m):
    depth = aw.rollback_depth(name, p, m)
    plan = Plan(build_async(name, p, m, 8))
    rng = random.Random(0)
    seen = [0] * p
    for u in _prefix_leads(plan, rng, tries=200):
        for r in range(p):
            lead = u[r] - min(u)
            assert lead <= depth[r]
            seen[r] = max(seen[r], lead)
    # Within the rough bound ceil(2(p-1)/m) + 1, and 0 for one stage.
    assert all(d <= math.ceil(2 * (p - 1) / m) + 1 for d in depth)
    if p == 1:
        assert depth == (0,)
    else:
        assert max(seen) >= 1       # stages do run ahead of each other


def test_bad_window_raises():
    with pytest.raises(ValueError, match="window"):
        aw.window_plan("pipedream", 2, 2, 3, 2, end=4)
    with pytest.raises(ValueError, match="window"):
        aw.window_plan("pipedream", 2, 2, 0, 0)
