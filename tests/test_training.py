"""train() (pipetrain.training): streamed asynchronous runs and rollback after a failure.

Every number is checked against :func:`pipetrain.async_reference.reference_train`, the
independent plain-torch trainer, in fp64 within 1e-9 (the two compute the same sums in
different orders: rounding stays ~1e-15 relative over these few steps).
"""

import copy
import math
import time

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain import async_reference as ref
from pipetrain import async_windows
from pipetrain.async_schedules import ASYNC

from tests.test_async import _adam, _allowed, _data, _model, _sgd

FN = nn.functional.mse_loss
TOL = 1e-9


def _same_weights(stages, weights):
    for r, w in enumerate(weights):
        for k, v in w.items():
            assert torch.allclose(stages[r].state_dict()[k], v, rtol=0, atol=TOL), (r, k)


CASES = [(name, p, m, opt) for name in ASYNC for p in (1, 2, 3, 4) for m in (1, 2, 4)
         for opt in (_sgd, _adam) if _allowed(name, p, m, opt) and not (p == 1 and m == 4)]


@pytest.mark.parametrize("name,p,m,opt", CASES,
                         ids=[f"{c[0]}-p{c[1]}-m{c[2]}-{c[3].__name__[1:]}" for c in CASES])
def test_streamed_windows_match_the_reference(name, p, m, opt):
    T = 6
    data = _data(T, last=7)                     # the last mini-batch uneven (7 of 8 samples)
    stages = _model(p)
    r_losses, r_weights = ref.reference_train(copy.deepcopy(stages), data, schedule=name,
                                              num_microbatches=m, loss_fn=FN, optimizer_factory=opt)
    L = async_windows.lookahead(p, m)
    for window in (1, 2, 3, None, T):
        trained = copy.deepcopy(stages)
        pipe = pipetrain.Pipeline(nn.Sequential(*trained), num_devices=p, schedule=name,
                                  num_microbatches=m, loss_fn=FN, optimizer=opt)
        W = window or async_windows.default_window(p, m)
        consumed = [0]

        def stream():
            # Reads ahead of the window being run by at most the lookahead: mini-batch i is
            # read only once the losses of every mini-batch before i - W - L came back.
            for i, batch in enumerate(data):
                assert i < consumed[0] + W + L, (i, consumed[0], W, L)
                yield batch

        losses = []
        for loss in pipe.train(stream(), minibatches_per_run=window):
            losses.append(float(loss))
            consumed[0] += 1
        assert len(losses) == T
        assert losses == pytest.approx(r_losses, abs=TOL, rel=0)
        _same_weights(trained, r_weights)
        st = pipe.stats()
        assert st.minibatches == T and st.windows == math.ceil(T / W) and st.window == W
        pipe.close()


def test_losses_come_back_while_the_stream_goes_on():
    # An endless generator: train() yields losses as windows finish, never reading it all.
    p, m = 3, 2
    pipe = pipetrain.Pipeline(nn.Sequential(*_model(p)), num_devices=p, schedule="pipedream",
                              num_microbatches=m, loss_fn=FN, optimizer=_sgd)
    read = [0]

    def endless():
        g = torch.Generator().manual_seed(0)
        while True:
            read[0] += 1
            yield torch.randn(8, 5, generator=g, dtype=torch.float64), \
                torch.randn(8, 2, generator=g, dtype=torch.float64)

    W, L = 2, async_windows.lookahead(p, m)
    for i, loss in enumerate(pipe.train(endless(), minibatches_per_run=W)):
        assert math.isfinite(float(loss)) and read[0] <= i + W + L + 1
        if i == 9:
            break
    # Broken out between windows: every stage at the same version, and training goes on.
    losses = [float(x) for x in pipe.train(_data(3))]
    assert len(losses) == 3
    pipe.close()


def test_stats_merge_windows():
    p, m, T = 2, 2, 8
    stages = _model(p)
    pipe = pipetrain.Pipeline(nn.Sequential(*stages), num_devices=p, schedule="2bw",
                              num_microbatches=m, loss_fn=FN, optimizer=_sgd)
    list(pipe.train(_data(T), minibatches_per_run=2))
    st = pipe.stats()
    # Records of every window on one time axis: each device ran every action of the stream
    # (T*m F, T*m B, T U), in issue order with non-decreasing start times.
    for d in range(p):
        assert len(st.records[d]) == 2 * T * m + T
        starts = [r.start_ns for r in st.records[d]]
        assert starts == sorted(starts)
    trace = {}
    ref.reference_train(_model(p), _data(T), schedule="2bw", num_microbatches=m, loss_fn=FN,
                        optimizer_factory=_sgd, trace=trace)
    assert st.peak_versions == trace["peak_versions"] == [2, 2]   # 2bw: two versions
    assert st.samples == T * 8 and 0 <= st.bubble_ratio < 1 and st.steady_samples_per_s > 0
    nbytes = [sum(q.numel() * 8 for q in s.parameters()) for s in stages]
    depth = async_windows.rollback_depth("2bw", p, m)
    for r in range(p):
        # Rollback snapshots: (depth + 1) x (weights + momentum buffers), flat-padded.
        assert 2 * (depth[r] + 1) * nbytes[r] <= st.rollback_bytes[r] <= 4 * (depth[r] + 1) * nbytes[r]
    assert all(b > 0 for b in st.peak_stash_bytes)
    pipe.close()


# -- failures --------------------------------------------------------------------------------

# A failing action first sleeps: meanwhile every other device runs whatever does not depend
# on it, so the stages downstream deterministically get ahead (what the rollback undoes).
DELAY_S = 0.5


class _FailForward(nn.Module):
    """Identity that raises on its ``at``-th forward call (1-based)."""

    def __init__(self, at):
        super().__init__()
        self.calls, self.at = 0, at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            time.sleep(DELAY_S)
            raise RuntimeError("forward boom")
        return x


class _Raise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.box[0] += 1
        if ctx.box[0] == ctx.box[1]:
            time.sleep(DELAY_S)
            raise RuntimeError("backward boom")
        return g, None


class _FailBackward(nn.Module):
    """Identity whose ``at``-th backward raises."""

    def __init__(self, at):
        super().__init__()
        self.box = [0, at]

    def forward(self, x):
        return _Raise.apply(x, self.box)


def _failing_opt(base, stage_params, at):
    """A factory: ``base`` optimizers, the one of the stage owning ``stage_params`` raising
    in its ``at``-th step (after changing half its parameters: a half-applied update)."""
    target = {id(q) for q in stage_params}
    calls = [0]

    def factory(ps):
        ps = list(ps)
        opt = base(ps)
        if {id(q) for q in ps} & target:
            step = opt.step

            def failing(*a, **k):
                calls[0] += 1
                if calls[0] == at:
                    time.sleep(DELAY_S)
                    with torch.no_grad():
                        ps[0].add_(1.0)
                    raise RuntimeError("update boom")
                return step(*a, **k)
            opt.step = failing
        return opt
    return factory


def _cached(base):
    """An optimizer factory handing the same optimizer back for the same parameters (the
    reference then continues from the optimizer state a previous run left)."""
    made = {}

    def factory(ps):
        ps = list(ps)
        key = tuple(id(q) for q in ps)
        if key not in made:
            made[key] = base(ps)
        return made[key]
    return factory


FAILURES = [  # (schedule, p, m, opt, stage, kind, at, window, ahead): ahead = the versions
    # the stages had reached when the failure stopped the run (the sleep makes them certain)
    ("pipedream", 3, 2, _sgd, 1, "F", 6, 4, [2, 2, 2]),
    ("pipedream", 4, 1, _adam, 0, "F", 7, 3, [3, 4, 5, 6]),
    ("pipedream", 3, 1, _sgd, 1, "B", 4, 3, [3, 3, 5]),
    ("2bw", 3, 4, _adam, 0, "B", 9, 4, [2, 2, 2]),
    ("xpipe", 3, 2, _adam, 1, "B", 5, None, [2, 2, 3]),
    ("spectrain", 4, 2, _sgd, 0, "F", 9, 5, [2, 3, 3, 4]),
    ("2bw-predict", 2, 2, _sgd, 0, "U", 3, 2, [2, 3]),
    ("pipedream", 4, 2, _adam, 3, "U", 2, 1, [2, 2, 2, 1]),
    ("xpipe", 2, 1, _adam, 1, "U", 4, 3, [4, 3]),
]


@pytest.mark.parametrize("name,p,m,opt,stage,kind,at,window,ahead", FAILURES,
                         ids=[f"{f[0]}-p{f[1]}-m{f[2]}-s{f[4]}{f[5]}{f[6]}" for f in FAILURES])
def test_failure_leaves_one_version_and_train_continues(name, p, m, opt, stage, kind, at, window,
                                                        ahead):
    T = 7
    data, more = _data(T), _data(4, seed=5)
    layers = _model(p)
    clean = copy.deepcopy(layers)
    factory = opt
    if kind == "F":
        layers[stage] = nn.Sequential(layers[stage], _FailForward(at))
    elif kind == "B":
        layers[stage] = nn.Sequential(layers[stage], _FailBackward(at))
    else:
        factory = _failing_opt(opt, list(layers[stage].parameters()), at)
    pipe = pipetrain.Pipeline(nn.Sequential(*layers), num_devices=p, schedule=name,
                              num_microbatches=m, loss_fn=FN, optimizer=factory)
    with pytest.raises(pipetrain.PipelineError) as info:
        for _ in pipe.train(data, minibatches_per_run=window):
            pass
    err = info.value
    assert err.stage == stage and err.action == kind and err.minibatch is not None
    if kind != "U":
        assert err.microbatch is not None and err.minibatch == err.microbatch // m
    n = err.version
    assert err.versions_at_failure == ahead       # the stages ahead were rolled back
    assert f"version {n} on every stage" in str(err) and f"mini-batch {err.minibatch}" in str(err)
    assert n == min(err.versions_at_failure) and n <= err.minibatch
    # The model is W(n): the reference trained on mini-batches 0..n-1.
    ref_opt = _cached(opt)
    twin = copy.deepcopy(clean)
    _, r_weights = ref.reference_train(twin, data[:n], schedule=name, num_microbatches=m,
                                       loss_fn=FN, optimizer_factory=ref_opt) if n else \
        (None, [{k: v.clone() for k, v in s.state_dict().items()} for s in twin])
    live = [nn.Sequential(*(l for l in layer if not isinstance(l, (_FailForward, _FailBackward))))
            if isinstance(layer, nn.Sequential) and kind in "FB" and i == stage else layer
            for i, layer in enumerate(layers)]
    for r in range(p):
        got = [q.detach() for q in live[r].parameters()]
        want = list(r_weights[r].values())
        assert all(torch.allclose(a, b, rtol=0, atol=TOL) for a, b in zip(got, want)), r
    # A new train() continues from W(n) and the optimizer state of n: the reference continued
    # on the new mini-batches with the same optimizers.
    losses = [float(x) for x in pipe.train(more)]
    r_losses, r_weights = ref.reference_train(twin, more, schedule=name, num_microbatches=m,
                                              loss_fn=FN, optimizer_factory=ref_opt)
    assert losses == pytest.approx(r_losses, abs=TOL, rel=0)
    for r in range(p):
        got = [q.detach() for q in live[r].parameters()]
        assert all(torch.allclose(a, b, rtol=0, atol=TOL)
                   for a, b in zip(got, r_weights[r].values())), r
    pipe.close()


def test_sync_schedule_failed_update_keeps_the_last_completed_minibatch():
    p, m = 3, 2
    layers = _model(p)
    clean = copy.deepcopy(layers)
    # Stage 2's optimizer fails in its 3rd step, after stages 0 and 1 stepped for mini-batch 2.
    pipe = pipetrain.Pipeline(nn.Sequential(*layers), num_devices=p, schedule="1f1b",
                              num_microbatches=m, loss_fn=FN,
                              optimizer=_failing_opt(_adam, list(layers[2].parameters()), 3))
    data = _data(5)
    with pytest.raises(pipetrain.PipelineError) as info:
        list(pipe.train(data))
    err = info.value
    assert (err.stage, err.action, err.minibatch, err.version) == (2, "U", 2, 2)
    assert "version 2" in str(err)
    ref_opt = _cached(_adam)
    _, r_weights = ref.reference_train(clean, data[:2], schedule="sync", num_microbatches=m,
                                       loss_fn=FN, optimizer_factory=ref_opt)
    _same_weights(layers, r_weights)
    assert all(q.grad is None or not q.grad.any() for q in pipe.parameters())
    # And on: the optimizers' state is that of version 2 (Adam's step counts included).
    losses = [float(x) for x in pipe.train(data[2:])]
    r_losses, r_weights = ref.reference_train(clean, data[2:], schedule="sync", num_microbatches=m,
                                              loss_fn=FN, optimizer_factory=ref_opt)
    assert losses == pytest.approx(r_losses, abs=TOL, rel=0)
    _same_weights(layers, r_weights)
    pipe.close()


def test_sync_train_without_undo_matches_and_says_which_stages_stepped():
    p, m = 3, 2
    data = _data(4)
    layers = _model(p)
    clean = copy.deepcopy(layers)
    pipe = pipetrain.Pipeline(nn.Sequential(*layers), num_devices=p, schedule="1f1b",
                              num_microbatches=m, loss_fn=FN, optimizer=_adam)
    losses = [float(x) for x in pipe.train(data, undo_failed_updates=False)]
    r_losses, r_weights = ref.reference_train(clean, data, schedule="sync", num_microbatches=m,
                                              loss_fn=FN, optimizer_factory=_cached(_adam))
    assert losses == pytest.approx(r_losses, abs=TOL, rel=0)
    _same_weights(layers, r_weights)
    pipe.close()
    # A raising update: stages 0 and 1 stepped for mini-batch 2 and are not put back.
    layers = _model(p)
    clean = copy.deepcopy(layers)
    pipe = pipetrain.Pipeline(nn.Sequential(*layers), num_devices=p, schedule="1f1b",
                              num_microbatches=m, loss_fn=FN,
                              optimizer=_failing_opt(_adam, list(layers[2].parameters()), 3))
    # The per-step loop (minibatches_per_run=1): the stages step one after another.
    with pytest.raises(pipetrain.PipelineError) as info:
        list(pipe.train(data, 1, undo_failed_updates=False))
    err = info.value
    assert (err.stage, err.minibatch, err.version) == (2, 2, None)
    assert "stages updated before it (0, 1) hold version 3" in str(err)
    _, w2 = ref.reference_train(copy.deepcopy(clean), data[:2], schedule="sync", num_microbatches=m,
                                loss_fn=FN, optimizer_factory=_cached(_adam))
    _, w3 = ref.reference_train(clean, data[:3], schedule="sync", num_microbatches=m,
                                loss_fn=FN, optimizer_factory=_cached(_adam))
    for r, want in ((0, w3), (1, w3)):
        assert all(torch.allclose(a.detach(), b, rtol=0, atol=TOL)
                   for a, b in zip(layers[r].parameters(), want[r].values())), r
    assert not all(torch.allclose(a.detach(), b, rtol=0, atol=TOL)
                   for a, b in zip(layers[0].parameters(), w2[0].values()))
    with pytest.raises(ValueError, match="undo_failed_updates"):
        list(pipe.train(data, undo_failed_updates="no"))
    pipe.close()


def test_sync_schedule_failed_step_changes_no_weight():
    p, m = 2, 2
    layers = _model(p)
    layers[1] = nn.Sequential(layers[1], _FailForward(5))   # mini-batch 2's first forward
    pipe = pipetrain.Pipeline(nn.Sequential(*layers), num_devices=p, schedule="gpipe",
                              num_microbatches=m, loss_fn=FN, optimizer=_sgd)
    data = _data(4)
    seen = []
    with pytest.raises(pipetrain.PipelineError) as info:
        for loss in pipe.train(data, 1):     # per step: each loss as its mini-batch ends
            seen.append([q.detach().clone() for q in pipe.parameters()])
    assert len(seen) == 2 and info.value.version == 2
    assert all(torch.equal(a, b) for a, b in zip(seen[-1], pipe.parameters()))
    pipe.close()


def test_a_bad_minibatch_mid_stream_stops_at_a_window_boundary():
    p, m, W = 2, 2, 2
    layers = _model(p)
    clean = copy.deepcopy(layers)
    data = _data(8)
    data[5] = (data[5][0][:1], data[5][1][:1])      # 1 sample for m = 2 micro-batches
    pipe = pipetrain.Pipeline(nn.Sequential(*layers), num_devices=p, schedule="pipedream",
                              num_microbatches=m, loss_fn=FN, optimizer=_adam)
    losses = []
    with pytest.raises(ValueError, match="mini-batch 5"):
        for loss in pipe.train(data, minibatches_per_run=W):
            losses.append(float(loss))
    # Mini-batch 5 is read (lookahead 1) before the window [4, 6) runs: the model is W(4)
    # on every stage, the reference's after mini-batches 0..3, and training goes on from it.
    assert len(losses) == 4
    ref_opt = _cached(_adam)
    r_losses, r_weights = ref.reference_train(clean, data[:4], schedule="pipedream",
                                              num_microbatches=m, loss_fn=FN,
                                              optimizer_factory=ref_opt)
    assert losses == pytest.approx(r_losses, abs=TOL, rel=0)
    _same_weights(layers, r_weights)
    more = _data(3, seed=9)
    losses = [float(x) for x in pipe.train(more)]
    r_losses, r_weights = ref.reference_train(clean, more, schedule="pipedream",
                                              num_microbatches=m, loss_fn=FN,
                                              optimizer_factory=ref_opt)
    assert losses == pytest.approx(r_losses, abs=TOL, rel=0)
    _same_weights(layers, r_weights)
    pipe.close()
