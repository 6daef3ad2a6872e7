"""Synchronous train() with several mini-batches per run (pipetrain.tiled_training).

The reference is the plain-torch synchronous trainer (``async_reference.reference_train``
with ``schedule="sync"``: each mini-batch's gradients, then every stage's optimizer step);
in float64 the pipeline's numbers must match it within 1e-12 (the same operations, summed
in micro-batch order). Against the pipeline's own per-step loop (``minibatches_per_run=1``)
the tiled run must be bitwise equal: every stage runs the same passes on the same weights
in the same order, only interleaved differently with the other stages.
"""

import copy

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain import async_reference as ref
from pipetrain import schedules, tiled_training
from tests.test_async import _adam, _data, _model, _sgd
from tests.test_training import _cached, _FailForward, _failing_opt, _same_weights

FN = nn.functional.mse_loss
TOL = 1e-12
SYNC = [n for n in schedules.NAMES]


def _pipe(layers, p, m, schedule, opt, **kw):
    return pipetrain.Pipeline(nn.Sequential(*layers), num_devices=p, schedule=schedule,
                              num_microbatches=m, loss_fn=FN, optimizer=opt, **kw)


@pytest.mark.parametrize("schedule", SYNC)
@pytest.mark.parametrize("p, m, opt, window, T", [(2, 2, _adam, None, 7), (3, 3, _sgd, 2, 6),
                                                  (2, 4, _sgd, 3, 5), (4, 4, _adam, 8, 4)])
def test_equals_the_reference_and_the_per_step_loop(schedule, p, m, opt, window, T):
    if schedule == "interleaved-1f1b" and m % p:
        pytest.skip("interleaved needs m to be a multiple of p")
    data = _data(T, n=9, last=m + 1)          # uneven micro-batches, an uneven last mini-batch
    layers = 2 * p if schedule.startswith("interleaved") else p      # one layer per stage
    a, b = _model(layers), _model(layers)
    clean = copy.deepcopy(a)
    tiled, stepped = _pipe(a, p, m, schedule, opt), _pipe(b, p, m, schedule, opt)
    try:
        got = [x.detach() for x in tiled.train(data, window)]
        want = [x.detach() for x in stepped.train(data, 1)]
    finally:
        tiled.close()
        stepped.close()
    assert len(got) == T and all(torch.equal(x, y) for x, y in zip(got, want)), (got, want)
    for pa, pb in zip(nn.Sequential(*a).parameters(), nn.Sequential(*b).parameters()):
        assert torch.equal(pa, pb)
    r_losses, r_weights = ref.reference_train(clean, data, schedule="sync", num_microbatches=m,
                                              loss_fn=FN, optimizer_factory=opt)
    assert [float(x) for x in got] == pytest.approx(r_losses, abs=TOL, rel=0)
    _same_weights(a, r_weights)


def test_a_window_is_one_run_with_each_stages_update_inside():
    p, m = 2, 2
    pipe = _pipe(_model(p), p, m, "zb-h1", _sgd)
    try:
        list(pipe.train(_data(5), 4))        # the first mini-batch alone, then one window of 4
        st = pipe.stats()
    finally:
        pipe.close()
    ups = sorted((r.stage, r.microbatch) for row in st.records for r in row if r.kind == "U")
    assert ups == [(s, t) for s in range(p) for t in range(4)]
    # On each device, in the order run: a stage's update after mini-batch t comes after its
    # last backward of t and before its first forward of t + 1 (no other stage in between
    # is waited for: nothing else separates the mini-batches).
    for row in st.records:
        order = [(r.kind, r.stage, r.microbatch if r.kind == "U" else r.microbatch // m)
                 for r in sorted(row, key=lambda r: r.start_ns)]
        for i, (kind, s, t) in enumerate(order):
            if kind != "U":
                continue
            before = [o for o in order[:i] if o[1] == s]
            after = [o for o in order[i + 1:] if o[1] == s]
            assert all(o[2] <= t for o in before) and before[-1][0] in ("B", "W"), order
            assert all(o[2] > t for o in after), order


def test_falls_back_to_the_per_step_loop_where_it_must():
    p, m = 2, 2
    pipe = _pipe(_model(p), p, m, "1f1b", _sgd)
    assert tiled_training.why_not(pipe) == "the loss may be token-level"
    list(pipe.train(_data(1)))
    assert tiled_training.why_not(pipe) is None
    pipe.close()
    scaled = _pipe(_model(p), p, m, "1f1b", _sgd, loss_scale=2.0 ** 10)
    list(scaled.train(_data(1)))
    assert "loss scaling" in tiled_training.why_not(scaled)
    scaled.close()


def test_token_level_loss_runs_per_step_and_matches():
    # (loss_sum, count): the mini-batch's gradients are divided by its count at the commit.
    def token_fn(out, y):
        return ((out - y) ** 2).sum(), y.numel()

    p, m = 2, 2
    data = _data(4)
    a, b = _model(p), _model(p)
    pa = pipetrain.Pipeline(nn.Sequential(*a), num_devices=p, schedule="zb-h1",
                            num_microbatches=m, loss_fn=token_fn, optimizer=_adam)
    pb = pipetrain.Pipeline(nn.Sequential(*b), num_devices=p, schedule="zb-h1",
                            num_microbatches=m, loss_fn=token_fn, optimizer=_adam)
    try:
        got = [float(x) for x in pa.train(data)]
        want = [float(x) for x in pb.train(data, 1)]
        assert "token-level" in tiled_training.why_not(pa)
    finally:
        pa.close()
        pb.close()
    assert got == want
    for x, y in zip(nn.Sequential(*a).parameters(), nn.Sequential(*b).parameters()):
        assert torch.equal(x, y)


FAILURES = [  # (schedule, p, m, opt, where, version): version = what every stage holds after
    ("1f1b", 3, 2, _adam, ("F", 1, 6), 2),    # stage 1's 6th forward: mini-batch 2's first
    ("zb-h1", 2, 2, _sgd, ("F", 1, 7), 3),
    ("1f1b", 3, 2, _adam, ("U", 2, 3), 2),    # stage 2's 3rd update (stages 0, 1 may be ahead)
    ("zb-h2", 3, 3, _sgd, ("U", 0, 4), 3),
]


@pytest.mark.parametrize("schedule,p,m,opt,where,version", FAILURES,
                         ids=[f"{f[0]}-{f[4][0]}{f[4][1]}-{f[4][2]}" for f in FAILURES])
@pytest.mark.parametrize("undo", [True, False])
def test_failure_in_a_window_leaves_one_version_or_says_which(schedule, p, m, opt, where, version,
                                                             undo):
    kind, stage, at = where
    layers = _model(p)
    clean = copy.deepcopy(layers)
    data = _data(6)
    factory = opt
    if kind == "F":
        layers[stage] = nn.Sequential(layers[stage], _FailForward(at))
    else:
        factory = _failing_opt(opt, list(layers[stage].parameters()), at)
    pipe = _pipe(layers, p, m, schedule, factory)
    with pytest.raises(pipetrain.PipelineError) as info:
        list(pipe.train(data, 4, undo_failed_updates=undo))
    err = info.value
    assert err.stage == stage and err.action == kind
    # Named by this train()'s numbering, not the window's.
    assert err.minibatch == (at - 1 if kind == "U" else (at - 1) // m), str(err)
    assert f"mini-batch {err.minibatch}" in str(err)
    ref_opt = _cached(opt)
    if not undo:
        assert err.version is None and err.versions_at_failure[stage] == version
        assert f"versions {err.versions_at_failure}" in str(err)
        pipe.close()
        return
    assert err.version == version and f"version {version} on every stage" in str(err)
    _, r_weights = ref.reference_train(copy.deepcopy(clean) if kind == "F" else clean,
                                       data[:version], schedule="sync", num_microbatches=m,
                                       loss_fn=FN, optimizer_factory=ref_opt)
    inner = [l[0] if isinstance(l, nn.Sequential) and isinstance(l[-1], _FailForward) else l
             for l in layers]
    _same_weights(inner, r_weights)
    assert all(q.grad is None or not q.grad.any() for q in pipe.parameters())
    if kind == "U":
        # And on, from the optimizer state of that version.
        losses = [float(x) for x in pipe.train(data[version:], 4)]
        r_losses, r_weights = ref.reference_train(clean, data[version:], schedule="sync",
                                                  num_microbatches=m, loss_fn=FN,
                                                  optimizer_factory=ref_opt)
        assert losses == pytest.approx(r_losses, abs=TOL, rel=0)
        _same_weights(inner, r_weights)
    pipe.close()


def test_a_batch_that_cannot_be_split_is_named_by_its_number_and_changes_nothing():
    # Mini-batch 4 (the 4th of the window 1..4) has 1 sample for m = 2: the window does not
    # run, the model stays at version 1 (mini-batch 0 ran alone, learning the loss kind).
    p, m = 2, 2
    layers = _model(p)
    clean = copy.deepcopy(layers)
    data = _data(6)
    data[4] = (data[4][0][:1], data[4][1][:1])
    pipe = _pipe(layers, p, m, "zb-h1", _sgd)
    with pytest.raises(ValueError, match="mini-batch 4: batch size 1") as info:
        list(pipe.train(data, 4))
    assert info.value.version == 1
    pipe.close()
    _, r_weights = ref.reference_train(clean, data[:1], schedule="sync", num_microbatches=m,
                                       loss_fn=FN, optimizer_factory=_sgd)
    _same_weights(layers, r_weights)
