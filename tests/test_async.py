"""Asynchronous schedules (issue 8) against the independent plain-torch reference trainer.

Every number asserted comes from outside the runtime: losses and final weights from
:func:`pipetrain.async_reference.reference_train` (fp64, 1e-9), versions and prediction
distances from the closed forms of the issue and from ``async_reference.versions_used``.
"""

import copy
import math

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain import async_reference as ref
from pipetrain.async_schedules import ASYNC, build_async, delay, prediction_distance

FN = nn.functional.mse_loss


def _model(p, seed=1):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double() for _ in range(p - 1)] + \
        [nn.Linear(5, 2).double()]


def _data(T, n=8, seed=2, last=None):
    """T mini-batches of n samples; the last one of ``last`` samples (uneven) if given."""
    g = torch.Generator().manual_seed(seed)
    sizes = [n] * T
    if last is not None:
        sizes[-1] = last
    return [(torch.randn(s, 5, generator=g, dtype=torch.float64),
             torch.randn(s, 2, generator=g, dtype=torch.float64)) for s in sizes]


def _sgd(ps):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9)


def _adam(ps):
    return torch.optim.Adam(ps, lr=0.02)


def _fused_sgd(ps):
    return pipetrain.optim.SGD(ps, lr=0.1, momentum=0.9)


def _fused_adam(ps):
    return pipetrain.optim.Adam(ps, lr=0.02)


def _allowed(name, p, m, opt):
    if name.startswith("2bw") and m < p:
        return False
    if name == "spectrain":
        return opt in (_sgd, _fused_sgd)
    if name == "xpipe":
        return opt in (_adam, _fused_adam)
    return True


def _compare(name, p, m, opt, T=5, n=8, **kw):
    stages = _model(p)
    twin = copy.deepcopy(stages)
    trace = {}
    r_losses, r_weights = ref.reference_train(twin, _data(T, n), schedule=name, num_microbatches=m,
                                              loss_fn=FN, optimizer_factory=opt, trace=trace)
    pipe = pipetrain.Pipeline(nn.Sequential(*stages), num_devices=p, schedule=name,
                              num_microbatches=m, loss_fn=FN, optimizer=opt, **kw)
    try:
        losses = [float(x) for x in pipe.train(_data(T, n))]
        assert len(losses) == T
        for a, b in zip(losses, r_losses):
            assert abs(a - b) <= 1e-9
        for r in range(p):
            for k, w in r_weights[r].items():
                assert torch.allclose(stages[r].state_dict()[k], w, rtol=0, atol=1e-9), (r, k)
        return pipe.stats(), trace
    finally:
        pipe.close()


CASES = [(name, p, m, opt) for name in ASYNC for p in (1, 2, 3, 4) for m in (1, 2, 4)
         for opt in (_sgd, _adam) if _allowed(name, p, m, opt) and not (p == 1 and m == 4)]


@pytest.mark.parametrize("name,p,m,opt", CASES,
                         ids=[f"{c[0]}-p{c[1]}-m{c[2]}-{c[3].__name__[1:]}" for c in CASES])
def test_matches_reference_fp64(name, p, m, opt):
    stats, trace = _compare(name, p, m, opt)
    # Weight versions held: the same count as the reference's, which keeps only what it needs.
    assert stats.peak_versions == [max(1, v) for v in trace["peak_versions"]]
    if name == "2bw" and p > 1:
        assert max(stats.peak_versions) == 2
    if name == "pipedream":
        # At most ceil((p-r-1)/m) + 1 (reached once T*m covers the warm-up).
        assert all(v <= math.ceil((p - r - 1) / m) + 1 for r, v in enumerate(stats.peak_versions))


@pytest.mark.parametrize("name,opt", [("spectrain", _fused_sgd), ("xpipe", _fused_adam),
                                      ("2bw-predict", _fused_adam), ("pipedream", _fused_adam)])
def test_pipetrain_optim_matches_reference(name, opt):
    _compare(name, 3, 3, opt)


def test_uneven_last_minibatch_and_rematerialization():
    # 7 samples into m = 2 micro-batches (4 + 3): losses weighted by size, as the reference.
    _compare("pipedream", 3, 2, _sgd, n=7, checkpoint="always")
    _compare("xpipe", 3, 2, _adam, n=7, checkpoint="except_last")


@pytest.mark.parametrize("name", ASYNC)
@pytest.mark.parametrize("p,m", [(1, 1), (2, 2), (3, 2), (4, 1), (4, 4), (4, 6)])
def test_versions_from_the_plan_match_closed_forms(name, p, m):
    if name.startswith("2bw") and m < p:
        pytest.skip("m < p is a ValueError for 2bw")
    T = 5
    s = build_async(name, p, m, T)
    table = ref.versions_used(name, p, m, T)
    for r in range(p):
        fwd = {}
        for a in s.actions(r):
            if a.kind == "U":
                continue
            k, t = a.microbatch, a.microbatch // m
            if a.kind == "F":
                fwd[k] = a.version
            assert a.version == fwd[k]                         # B on the F's version
            closed = {"pipedream": max((k - p + r + 1) // m, 0),
                      "spectrain": max((k - p + r + 1) // m, 0),
                      "xpipe": max((t * m - p + r + 1) // m, 0),
                      "2bw": max(t - delay(p), 0), "2bw-predict": max(t - delay(p), 0)}[name]
            assert a.version == closed
            use = table[(r, k)]
            assert (use.forward, use.distance) == (a.version, prediction_distance(name, a))
            if name == "xpipe" and t * m >= p:
                assert prediction_distance(name, a) == math.ceil((p - r - 1) / m)


@pytest.mark.parametrize("name", ASYNC)
def test_simulated_steady_state_bubble_tends_to_zero(name):
    p, m = 4, 4
    bubbles = [build_async(name, p, m, T).simulate(forward=1, backward=2).bubble_ratio
               for T in (1, 4, 32)]
    # Unit costs: the fill / drain (p - 1)(F + B) per device over T*m*(F+B) + that.
    for T, b in zip((1, 4, 32), bubbles):
        assert b == pytest.approx((p - 1) / (T * m + p - 1), abs=1e-9)


def test_bad_combinations_raise_value_error():
    def make(name, opt=_sgd, m=4, p=4, **kw):
        return pipetrain.Pipeline(nn.Sequential(*_model(p)), num_devices=p, schedule=name,
                                  num_microbatches=m, loss_fn=FN, optimizer=opt, **kw)
    with pytest.raises(ValueError, match="SGD with momentum"):
        make("spectrain", _adam)
    with pytest.raises(ValueError, match="SGD with momentum"):
        make("spectrain", lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match="Adam or AdamW"):
        make("xpipe", _sgd)
    with pytest.raises(ValueError, match="m >= p|num_microbatches >= num_devices"):
        make("2bw", m=2)
    with pytest.raises(ValueError, match="optimizer"):
        make("pipedream", None)
    with pytest.raises(ValueError, match="num_chunks"):
        make("pipedream", num_chunks=2)
    pipe = make("pipedream")
    with pytest.raises(ValueError, match="train"):
        pipe.step(*_data(1)[0])
    pipe.close()


class _Boom(nn.Module):
    """Raises on its ``fail_at``-th call (counting forwards)."""

    def __init__(self, fail_at):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return x


def test_failing_stage_names_it_and_a_new_train_works():
    p, m = 3, 2
    layers = _model(p)
    boom = _Boom(fail_at=6)         # the 6th forward of stage 1: micro-batch 5 of mini-batch 2
    layers[1] = nn.Sequential(layers[1], boom)
    pipe = pipetrain.Pipeline(nn.Sequential(*layers), num_devices=p, schedule="pipedream",
                              num_microbatches=m, loss_fn=FN, optimizer=_sgd)
    with pytest.raises(pipetrain.PipelineError) as info:
        list(pipe.train(_data(4)))
    err = info.value
    assert (err.stage, err.microbatch, err.minibatch, err.action) == (1, 5, 2, "F")
    # Every stage is at one version, said in the message (the rollback itself is checked
    # against the reference in tests/test_training.py).
    assert f"version {err.version} on every stage" in str(err) and err.versions == [err.version] * p
    # Consistent: each stage's live weights are finite and a new train() runs on from them.
    before = [q.detach().clone() for q in pipe.parameters()]
    losses = [float(x) for x in pipe.train(_data(2))]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, pipe.parameters()))
    pipe.close()


def test_train_on_a_sync_schedule_is_step_then_optimizer_step():
    stages = _model(3)
    twin = copy.deepcopy(stages)
    pipe = pipetrain.Pipeline(nn.Sequential(*stages), num_devices=3, schedule="1f1b",
                              num_microbatches=2, loss_fn=FN, optimizer=_adam)
    losses = [float(x) for x in pipe.train(_data(3))]
    # The sync reference: every micro-batch of t on W(t).
    r_losses, r_weights = ref.reference_train(twin, _data(3), schedule="sync", num_microbatches=2,
                                              loss_fn=FN, optimizer_factory=_adam)
    assert losses == pytest.approx(r_losses, abs=1e-9)
    for r in range(3):
        for k, w in r_weights[r].items():
            assert torch.allclose(stages[r].state_dict()[k], w, rtol=0, atol=1e-9)
    pipe.close()


def test_runs_of_two_minibatches_do_not_flush():
    # minibatches_per_run=2: four executor runs, the same numbers as one endless pipeline.
    stages = _model(2)
    pipe = pipetrain.Pipeline(nn.Sequential(*stages), num_devices=2, schedule="2bw",
                              num_microbatches=2, loss_fn=FN, optimizer=_sgd)
    data = _data(8)
    r_losses, r_weights = ref.reference_train(copy.deepcopy(stages), data, schedule="2bw",
                                              num_microbatches=2, loss_fn=FN,
                                              optimizer_factory=_sgd)
    losses = [float(x) for x in pipe.train(data, minibatches_per_run=2)]
    assert losses == pytest.approx(r_losses, abs=1e-9)
    for r in range(2):
        for k, w in r_weights[r].items():
            assert torch.allclose(stages[r].state_dict()[k], w, rtol=0, atol=1e-9)
    assert pipe.stats().minibatches == 8 and pipe.stats().windows == 4
    pipe.close()


class _Split(nn.Module):
    """x -> (h, scale): a tuple between stages."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), torch.full((x.shape[0], 1), 2.0, dtype=x.dtype)


class _Join(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, pair):
        h, scale = pair
        return self.inner(h * scale / 2.0)    # scale / 2 == 1: the same function as inner(h)


def test_tuples_between_stages_train_like_tensors():
    p, m, T = 3, 2, 4
    plain = _model(p)
    tupled = copy.deepcopy(plain)
    tupled[1] = _Split(tupled[1])
    tupled[2] = _Join(tupled[2])
    out = []
    for layers in (plain, tupled):
        pipe = pipetrain.Pipeline(nn.Sequential(*layers), num_devices=p, schedule="xpipe",
                                  num_microbatches=m, loss_fn=FN, optimizer=_adam)
        out.append([float(x) for x in pipe.train(_data(T))])
        pipe.close()
    assert out[0] == pytest.approx(out[1], abs=1e-12)
    for a, b in zip(nn.Sequential(*plain).parameters(), nn.Sequential(*tupled).parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_stats_after_train_report_versions_and_bytes():
    p, m, T = 2, 2, 4
    stages = _model(p)
    pipe = pipetrain.Pipeline(nn.Sequential(*stages), num_devices=p, schedule="2bw-predict",
                              num_microbatches=m, loss_fn=FN, optimizer=_sgd)
    list(pipe.train(_data(T)))
    st = pipe.stats()
    nbytes = [sum(q.numel() * 8 for q in s.parameters()) for s in stages]
    # 2bw-predict: stage 0 builds W_hat for t from W(t-1) before U(t-1) (F(2t) precedes it),
    # so it keeps no old version; stage 1 runs F(2t) after U(t-1) and keeps W(t-1) until then.
    # Predicted buffers: stage 0 holds W_hat of t+1 (built at F(2t+2)) while B(2t+1) still
    # runs on W_hat of t; stage 1 one at a time. The reference counts the same.
    trace = {}
    ref.reference_train(_model(p), _data(T), schedule="2bw-predict", num_microbatches=m,
                        loss_fn=FN, optimizer_factory=_sgd, trace=trace)
    assert st.peak_versions == [1, 2] and st.peak_predicted == trace["peak_predicted"] == [2, 1]
    # Bytes beyond the live weights: kept versions + predicted buffers (2 each here), each a
    # stage's flat buffer (its parameters plus alignment padding, < 64 elements per tensor).
    for r, b in enumerate(st.peak_version_bytes):
        padding = 64 * 8 * len(list(stages[r].parameters()))
        assert 2 * nbytes[r] <= b <= 2 * (nbytes[r] + padding)
    assert st.minibatches == T and 0 <= st.bubble_ratio < 1 and st.steady_samples_per_s > 0
    assert len(st.records) == p
    pipe.close()
