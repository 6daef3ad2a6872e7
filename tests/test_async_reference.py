"""The reference trainer for asynchronous pipelines (pipetrain.async_reference), checked against
independent references: plain torch.optim training of the unsplit model, the closed forms of
the issue for the version table, weights derived by hand, and the prediction formulas."""

import copy
import math

import pytest
import torch
from torch import nn

from pipetrain.async_reference import (SCHEDULES, VersionUse, reference_train, stage_events,
                                       versions_used)

DT = torch.float64


def _layers(seed=0):
    """Four layers, so that any p <= 4 splits them; tanh makes the gradients depend on the
    weights of every layer (a linear chain would hide which version a backward used)."""
    torch.manual_seed(seed)
    dims = [3, 5, 5, 5]
    layers = [nn.Sequential(nn.Linear(dims[i], 5), nn.Tanh()) for i in range(3)]
    layers.append(nn.Linear(5, 2))
    return [layer.to(DT) for layer in layers]


def _split(layers, p):
    """p contiguous stages, as even as possible (deep copies)."""
    sizes = [len(layers) // p + (i < len(layers) % p) for i in range(p)]
    out, at = [], 0
    for size in sizes:
        out.append(nn.Sequential(*copy.deepcopy(layers[at:at + size])))
        at += size
    return out


def _data(T, n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT))
            for _ in range(T)]


def _opt_for(schedule, kind=None):
    kind = kind or ("adam" if schedule == "xpipe" else "sgd")
    if kind == "adam":
        return lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.9), eps=1e-6)
    if kind == "adamw":
        return lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1)
    return lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.7, dampening=0.1, weight_decay=0.01)


def _plain(layers, data, opt_factory):
    """Plain synchronous training of the unsplit model on whole mini-batches."""
    model = nn.Sequential(*copy.deepcopy(layers))
    opt = opt_factory(model.parameters())
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [q.detach() for q in model.parameters()]


def _train(layers, data, schedule, p, m, opt_factory, trace=None):
    stages = _split(layers, p)
    losses, weights = reference_train(stages, data, schedule=schedule, num_microbatches=m,
                                      loss_fn=nn.functional.mse_loss,
                                      optimizer_factory=opt_factory, trace=trace)
    flat = [w for sd in weights for w in sd.values()]
    assert all(torch.equal(a, b.detach()) for a, b in
               zip(flat, [q for s in stages for q in s.parameters()])), "modules hold W(T)"
    return losses, flat


def _close(a, b, tol):
    return all(torch.allclose(x, y, rtol=0, atol=tol) for x, y in zip(a, b)) and len(a) == len(b)


# ------------------------------------------------------------ (a), (b): against plain training


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("m", [1, 3])
def test_one_stage_is_plain_training(schedule, m):
    layers, data = _layers(), _data(4)
    for kind in (["adam", "adamw"] if schedule == "xpipe" else
                 ["sgd", "adam"] if schedule == "2bw-predict" else ["sgd"]):
        ref_loss, ref_w = _plain(layers, data, _opt_for(schedule, kind))
        loss, w = _train(layers, data, schedule, 1, m, _opt_for(schedule, kind))
        assert _close(w, ref_w, 1e-12)
        assert max(abs(a - b) for a, b in zip(loss, ref_loss)) < 1e-12


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_sync_is_plain_training(p, m, kind):
    layers, data = _layers(), _data(4)       # 7 samples, m = 3: micro-batches of 3, 2, 2
    ref_loss, ref_w = _plain(layers, data, _opt_for("sync", kind))
    loss, w = _train(layers, data, "sync", p, m, _opt_for("sync", kind))
    assert _close(w, ref_w, 1e-12)
    assert max(abs(a - b) for a, b in zip(loss, ref_loss)) < 1e-12


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s != "sync"])
def test_async_schedules_do_differ_from_plain_training(schedule):
    """The comparisons above can fail: at p = 3 every asynchronous schedule leaves sync."""
    layers, data = _layers(), _data(4)
    _, ref_w = _plain(layers, data, _opt_for(schedule))
    _, w = _train(layers, data, schedule, 3, 3, _opt_for(schedule))
    assert not _close(w, ref_w, 1e-6)


# ------------------------------------------------------------ (c): the version table


def _closed_form(schedule, p, m, T):
    """The issue's closed forms, written out independently of the trainer's event walk."""
    def v(r, k):
        return max((k - p + r + 1) // m, 0)
    d = 1 if p > 1 else 0
    table = {}
    for r in range(p):
        for k in range(T * m):
            t = k // m
            if schedule == "sync":
                use = (t, t, 0)
            elif schedule == "pipedream":
                use = (v(r, k), v(r, k), 0)
            elif schedule == "stale":
                use = (v(r, k), k // m, 0)
            elif schedule == "spectrain":
                use = (v(r, k), v(r, k), t - v(r, k))
            elif schedule == "xpipe":
                vb = v(r, t * m)
                assert t - vb == min(t, math.ceil((p - r - 1) / m))
                use = (vb, vb, t - vb)
            elif schedule == "2bw":
                use = (max(t - d, 0), max(t - d, 0), 0)
            else:
                use = (max(t - d, 0), max(t - d, 0), t - max(t - d, 0))
            table[(r, k)] = VersionUse(*use)
    return table


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_version_table_matches_closed_forms(schedule, p, m):
    if schedule in ("2bw", "2bw-predict") and m < p:
        with pytest.raises(ValueError, match="m >= p"):
            versions_used(schedule, p, m, 5)
        return
    assert versions_used(schedule, p, m, 5) == _closed_form(schedule, p, m, 5)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p,m", [(3, 2), (3, 3), (4, 4), (2, 5)])
def test_trainer_follows_the_table(schedule, p, m):
    """The versions the trainer counted at its own events are the table's."""
    if schedule in ("2bw", "2bw-predict") and m < p:
        pytest.skip("2bw needs m >= p (checked in the table test)")
    trace = {}
    _train(_layers(), _data(4, n=5), schedule, p, m, _opt_for(schedule), trace)
    assert trace["versions"] == _closed_form(schedule, p, m, 4)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_event_order_is_1f1b_without_flush(p, m):
    T = 3
    for r in range(p):
        ev = stage_events("pipedream", p, r, m, T)
        w = p - r - 1
        assert sorted(ev) == sorted([("F", k) for k in range(T * m)] +
                                    [("B", k) for k in range(T * m)] +
                                    [("U", n) for n in range(1, T + 1)])
        assert ev[:min(w, T * m)] == [("F", k) for k in range(min(w, T * m))]
        for k in range(w + 1, T * m):   # F(k) right after B(k-p+r), or after its update
            i = ev.index(("F", k))
            before = ev[i - 1] if ev[i - 1][0] != "U" else ev[i - 2]
            assert before == ("B", k - p + r)
        for n in range(1, T + 1):       # each update right after its mini-batch's last B
            assert ev[ev.index(("U", n)) - 1] == ("B", n * m - 1)


def test_schedule_checks():
    with pytest.raises(ValueError, match="unknown"):
        versions_used("gpipe-async", 2, 2, 1)
    stages, data = _split(_layers(), 2), _data(2)
    for schedule, kind in [("spectrain", "adam"), ("xpipe", "sgd")]:
        with pytest.raises(ValueError, match=schedule):
            reference_train(stages, data, schedule=schedule, num_microbatches=2,
                            loss_fn=nn.functional.mse_loss, optimizer_factory=_opt_for("", kind))
    with pytest.raises(ValueError, match="fewer than m"):
        reference_train(stages, _data(1, n=2), schedule="sync", num_microbatches=3,
                        loss_fn=nn.functional.mse_loss, optimizer_factory=_opt_for("sync"))


# ------------------------------------------------------------ (d): a case worked by hand

A0, C0, B0, LR = 0.9, 1.1, -0.8, 0.1


def _tiny(x, y):
    """Stage 0: h = c * (a * x); stage 1: out = b * h; loss 0.5 (out - y)^2; plain SGD."""
    def scalar(value):
        lin = nn.Linear(1, 1, bias=False).to(DT)
        with torch.no_grad():
            lin.weight.fill_(value)
        return lin
    stages = [nn.Sequential(scalar(A0), scalar(C0)), scalar(B0)]
    data = [(torch.tensor(xs, dtype=DT).reshape(-1, 1), torch.tensor(ys, dtype=DT).reshape(-1, 1))
            for xs, ys in zip(x, y)]
    return stages, data


def _run_tiny(schedule, m, x, y):
    stages, data = _tiny(x, y)
    losses, w = reference_train(stages, data, schedule=schedule, num_microbatches=m,
                                loss_fn=lambda o, t: 0.5 * ((o - t) ** 2).mean(),
                                optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=LR))
    (a, c), b = w[0].values(), w[1]["weight"]
    return losses, (a.item(), c.item(), b.item())


def _sample_grads(a, c, b, x, y):
    """d/d(a, c, b) of 0.5 (b c a x - y)^2, and the loss: by hand."""
    h = c * a * x
    e = b * h - y
    g = e * b                      # gradient reaching h from stage 1
    return (g * c * x, g * a * x, e * h), 0.5 * e * e


def test_hand_worked_pipedream_and_stale():
    """p = 2, m = 1 (an update per micro-batch). Stage 0 (one warm-up forward) runs F0 F1 B0 U1
    F2 B1 U2 B2 U3; stage 1 runs F0 B0 U1 F1 B1 U2 F2 B2 U3. So stage 0 forwards k = 0, 1 on
    W(0), k = 2 on W(1); stage 1 forwards k on W(k). PipeDream's backwards reuse the forward's
    (a, c); stale's stage-0 backwards of k = 1, 2 read the live (a1, c1), (a2, c2)."""
    xs, ys = [[0.5], [-1.0], [2.0]], [[1.0], [0.3], [-0.7]]
    x, y = [v[0] for v in xs], [v[0] for v in ys]
    a, c, b = [A0], [C0], [B0]
    # k = 0: everything at version 0
    e0 = b[0] * c[0] * a[0] * x[0] - y[0]
    b.append(b[0] - LR * e0 * c[0] * a[0] * x[0])
    a.append(a[0] - LR * e0 * b[0] * c[0] * x[0])
    c.append(c[0] - LR * e0 * b[0] * a[0] * x[0])
    # k = 1: stage 0 forward at (a0, c0), stage 1 at b1
    h1 = c[0] * a[0] * x[1]
    e1 = b[1] * h1 - y[1]
    b.append(b[1] - LR * e1 * h1)
    pd_a2 = a[1] - LR * e1 * b[1] * c[0] * x[1]      # stashed c0
    pd_c2 = c[1] - LR * e1 * b[1] * a[0] * x[1]
    st_a2 = a[1] - LR * e1 * b[1] * c[1] * x[1]      # live c1
    st_c2 = c[1] - LR * e1 * b[1] * a[1] * x[1]
    # k = 2: stage 0 forward at (a1, c1), stage 1 at b2
    h2 = c[1] * a[1] * x[2]
    e2 = b[2] * h2 - y[2]
    b3 = b[2] - LR * e2 * h2
    pd = (pd_a2 - LR * e2 * b[2] * c[1] * x[2], pd_c2 - LR * e2 * b[2] * a[1] * x[2], b3)
    st = (st_a2 - LR * e2 * b[2] * st_c2 * x[2], st_c2 - LR * e2 * b[2] * st_a2 * x[2], b3)
    want_losses = [0.5 * e0 ** 2, 0.5 * e1 ** 2, 0.5 * e2 ** 2]
    for schedule, want in [("pipedream", pd), ("stale", st)]:
        losses, got = _run_tiny(schedule, 1, xs, ys)
        assert got == pytest.approx(want, abs=1e-14), schedule
        assert losses == pytest.approx(want_losses, abs=1e-14)
    assert pd[0] != pytest.approx(st[0], abs=1e-6)   # the case tells the two apart
    with pytest.raises(ValueError, match="m >= p"):
        _run_tiny("2bw", 1, xs, ys)


def test_hand_worked_2bw():
    """p = 2, m = 2: mini-batch t runs on W(max(t-1, 0)) on both stages, so
    W1 = W0 - lr G(W0; batch 0), W2 = W1 - lr G(W0; batch 1), W3 = W2 - lr G(W1; batch 2),
    G the mean of the two samples' gradients."""
    xs, ys = [[0.5, -1.5], [-1.0, 0.25], [2.0, 0.75]], [[1.0, -0.2], [0.3, 0.9], [-0.7, 0.1]]

    def G(w, t):
        per = [_sample_grads(*w, xs[t][i], ys[t][i]) for i in range(2)]
        grad = tuple((per[0][0][n] + per[1][0][n]) / 2 for n in range(3))
        return grad, (per[0][1] + per[1][1]) / 2

    W = [(A0, C0, B0)]
    want_losses = []
    for t in range(3):
        grad, loss = G(W[max(t - 1, 0)], t)
        W.append(tuple(wi - LR * gi for wi, gi in zip(W[t], grad)))
        want_losses.append(loss)
    losses, got = _run_tiny("2bw", 2, xs, ys)
    assert got == pytest.approx(W[3], abs=1e-14)
    assert losses == pytest.approx(want_losses, abs=1e-14)


# ------------------------------------------------------------ (e): predictions


def _grad0(stages, data):
    """Each stage's gradient of mini-batch 0's loss at W(0), from the unsplit model."""
    model = nn.Sequential(*copy.deepcopy(stages))
    nn.functional.mse_loss(model(data[0][0]), data[0][1]).backward()
    return [q.grad.clone() for q in model.parameters()]


def _stage_slices(stages):
    at, out = 0, []
    for s in stages:
        n = len(list(s.parameters()))
        out.append(slice(at, at + n))
        at += n
    return out


def _predicted(schedule, p, m, opt_factory, T=3):
    stages, data = _split(_layers(), p), _data(T, n=4)
    w0 = [q.detach().clone() for s in stages for q in s.parameters()]
    g0 = _grad0(stages, data)
    sl = _stage_slices(stages)
    trace = {"weights": {}}
    reference_train(stages, data, schedule=schedule, num_microbatches=m,
                    loss_fn=nn.functional.mse_loss, optimizer_factory=opt_factory, trace=trace)
    return trace, w0, g0, sl


def test_spectrain_prediction():
    """p = 2, m = 2, stage 0 (one warm-up forward): v_0(k) = floor((k-1)/2). Mini-batch 0 runs
    on W(0) everywhere, so W(1) = W0 - lr g0 and buf(1) = g0 (torch's first momentum step)."""
    lr = 0.1
    trace, w0, g0, sl = _predicted("spectrain", 2, 2,
                                   lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9))
    W, w0s, g0s = trace["weights"], w0[sl[0]], g0[sl[0]]
    assert trace["versions"][(0, 2)] == (0, 0, 1)     # t = 1, v = 0: W_hat = W0 (no buffer)
    assert _close(W[(0, 2)], w0s, 1e-15)
    assert trace["versions"][(0, 3)] == (1, 1, 0)     # t = 1, v = 1: W(1) itself
    assert _close(W[(0, 3)], [a - lr * g for a, g in zip(w0s, g0s)], 1e-14)
    assert trace["versions"][(0, 4)] == (1, 1, 1)     # t = 2, v = 1: W(1) - lr buf(1)
    assert _close(W[(0, 4)], [a - 2 * lr * g for a, g in zip(w0s, g0s)], 1e-14)


@pytest.mark.parametrize("m", [1, 2])
def test_xpipe_prediction(m):
    """p = 3, Adam. Step 1 from zero state: m_hat = g0, v_hat = g0^2, so
    W(1) = W0 - lr g0/(|g0| + eps), and the prediction s steps on from W(1) adds s times that.
    m = 1: stage 0 has s = 2 at k = 3 (v = 1). m = 2: bellwether k = 4 of mini-batch 2 has
    v = 1, s = 1 on stages 0 and 1, and k = 5 reuses its W_hat."""
    lr, eps = 0.01, 1e-8
    trace, w0, g0, sl = _predicted("xpipe", 3, m, lambda ps: torch.optim.Adam(ps, lr=lr, eps=eps),
                                   T=4 // m + 1)
    step = [lr * g / (g.abs() + eps) for g in g0]
    W = trace["weights"]
    events = [(0, 3, 2)] if m == 1 else [(0, 4, 1), (0, 5, 1), (1, 4, 1), (1, 5, 1)]
    for r, k, s in events:
        assert trace["versions"][(r, k)] == (1, 1, s)
        want = [a - (1 + s) * d for a, d in zip(w0[sl[r]], step[sl[r]])]
        assert _close(W[(r, k)], want, 1e-13)
    if m == 2:
        assert all(torch.equal(a, b) for a, b in zip(W[(0, 4)], W[(0, 5)]))


def test_2bw_predict_prediction():
    """p = 2, m = 2, SGD with momentum: mini-batch t reads v = t-1, s = 1. t = 1: zero state,
    W_hat = W0. t = 2: W_hat = W(1) - lr buf(1) = W0 - 2 lr g0, on both stages."""
    lr = 0.1
    trace, w0, g0, sl = _predicted("2bw-predict", 2, 2,
                                   lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.5))
    for r in range(2):
        assert _close(trace["weights"][(r, 2)], w0[sl[r]], 1e-15)
        for k in (4, 5):
            want = [a - 2 * lr * g for a, g in zip(w0[sl[r]], g0[sl[r]])]
            assert _close(trace["weights"][(r, k)], want, 1e-14)


# ------------------------------------------------------------ (f): versions held


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_versions_held(m):
    """Peak weight versions held per stage (p = 4, long enough to reach the steady state):
    pipedream ceil((p-r-1)/m) + 1 <= p - r (the versions of the p-r micro-batches in flight);
    2bw exactly 2; the schedules without stashes 1."""
    p, T = 4, 10
    data = _data(T, n=5)
    expected = {"pipedream": [math.ceil((p - r - 1) / m) + 1 for r in range(p)],
                "sync": [1] * p, "stale": [1] * p, "spectrain": [1] * p, "xpipe": [1] * p}
    if m >= p:
        expected["2bw"] = [2] * p
    for schedule, want in expected.items():
        trace = {}
        _train(_layers(), data, schedule, p, m, _opt_for(schedule), trace)
        assert trace["peak_versions"] == want, schedule
        if schedule == "pipedream":
            assert all(v <= p - r for r, v in enumerate(want))
    if m >= p:
        trace = {}
        _train(_layers(), data, "2bw-predict", p, m, _opt_for("2bw-predict"), trace)
        assert max(trace["peak_versions"]) <= 2
