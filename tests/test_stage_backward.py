"""Tests for pipetrain.stage_backward: the W that is the whole backward (``WHOLE_W_AS_B``).

A stage whose I has no input gradient to compute (a source; every stage at p = 1) leaves W
the whole backward; W then runs as B does instead of through
``split_backward.batched_weight``. Checked against the unsplit model in float64 (the only
differences are summation order across micro-batches: tolerances 1e-10 relative), for every
schedule with split backwards, with the shortcut on and off, and for failures.
"""

import pytest
import torch
from torch import nn

from pipetrain import split_backward, stage_backward
from pipetrain.pipeline import Pipeline, PipelineError
from pipetrain.stage import Meter, Stage

D = 6
mse = nn.functional.mse_loss
SPLIT = ["zb-h1", "zb-h2", "zb-h1-bw", "zb-h2-bw"]


def _layers(n=4):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(D, D), nn.GELU()).double() for _ in range(n)]


def _reference(layers, x, y):
    model = nn.Sequential(*layers)
    model.zero_grad()
    loss = mse(model(x), y)
    loss.backward()
    grads = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    return loss.detach(), grads


@pytest.fixture
def count_batched(monkeypatch):
    """How many times batched_weight ran (the long way for W)."""
    calls = [0]
    real = split_backward.batched_weight

    def counting(works, into):
        calls[0] += 1
        return real(works, into)
    monkeypatch.setattr(split_backward, "batched_weight", counting)
    return calls


@pytest.mark.parametrize("schedule", SPLIT)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("fast", [True, False])
def test_split_schedules_match_the_unsplit_model(schedule, p, fast, count_batched, monkeypatch):
    monkeypatch.setattr(stage_backward, "WHOLE_W_AS_B", fast)
    layers = _layers()
    x = torch.randn(8, D, dtype=torch.float64)
    y = torch.randn(8, D, dtype=torch.float64)
    ref_loss, ref = _reference(layers, x, y)
    pipe = Pipeline(layers, p, schedule=schedule, num_microbatches=4, loss_fn=mse)
    try:
        for _ in range(2):           # the second step too: the run's cached accumulation
            for q in pipe.parameters():
                q.grad = None
            loss = pipe.step(x, y)
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
            for q, g in zip(pipe.parameters(), ref):
                torch.testing.assert_close(q.grad, g, rtol=1e-10, atol=1e-12)
    finally:
        pipe.close()
    if fast and p == 1 and not schedule.endswith("-bw"):
        assert count_batched[0] == 0        # every W took the shortcut
    if not fast:
        assert count_batched[0] > 0


def test_stage_w_after_an_empty_i_equals_b():
    """On a source stage (no input gradient), I + W per micro-batch gives B's gradients, and
    both the unsplit model's; the stash and its bytes are released by W."""
    layers = _layers(3)
    xs = [torch.randn(2, D, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randn(2, D, dtype=torch.float64) for _ in range(3)]
    model = nn.Sequential(*layers)
    for xb, yb in zip(xs, ys):
        (mse(model(xb), yb) / 3).backward()
    ref = [q.grad.clone() for q in model.parameters()]
    for split in (False, True):
        model.zero_grad()
        st = Stage(0, layers, loss_fn=mse, input_grad=False)
        st.begin_run(Meter())
        for k, (xb, yb) in enumerate(zip(xs, ys)):
            st.forward(k, xb, yb, weight=1 / 3)
            if split:
                assert st.backward_input(k) is None
                assert st._run.stash[k].w_full is not None
                st.backward_weight(k)
            else:
                st.backward(k)
        assert st.inflight() == [] and st.own.bytes == 0 and st.own.w_bytes == 0
        st.end_run(commit=True)
        for q, g in zip(model.parameters(), ref):
            torch.testing.assert_close(q.grad, g, rtol=1e-10, atol=1e-12)


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises for one micro-batch."""

    @staticmethod
    def forward(ctx, x, fail):
        ctx.fail = fail
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.fail:
            raise ValueError("boom in backward")
        return g, None


class _Faulty(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.fail_mb = None
        self.calls = 0

    def forward(self, x):
        mb, self.calls = self.calls, self.calls + 1
        return _FailingBackward.apply(self.lin(x), mb == self.fail_mb)


@pytest.mark.parametrize("schedule", ["zb-h1", "zb-h2"])
def test_failing_whole_w_names_stage_and_microbatch(schedule, count_batched):
    """At p = 1 the W is the whole backward (the shortcut): a failure in it names stage 0,
    the micro-batch and action W, keeps every p.grad as it was, and the next step works."""
    torch.manual_seed(0)
    model = nn.Sequential(_Faulty(), nn.Linear(D, D)).double()
    x = torch.randn(8, D, dtype=torch.float64)
    y = torch.randn(8, D, dtype=torch.float64)
    loss = mse(model(x), y)
    loss.backward()
    ref = [q.grad.clone() for q in model.parameters()]
    pipe = Pipeline(model, 1, schedule=schedule, num_microbatches=4, loss_fn=mse, timeout=10.0)
    try:
        before = [q.grad.clone() for q in model.parameters()]
        model[0].calls, model[0].fail_mb = 0, 2
        with pytest.raises(PipelineError) as info:
            pipe.step(x, y)
        err = info.value
        assert (err.stage, err.microbatch, err.action) == (0, 2, "W")
        assert "stage 0, micro-batch 2, action W" in str(err)
        assert "boom in backward" in str(err.__cause__)
        assert all(torch.equal(q.grad, g) for q, g in zip(model.parameters(), before))
        assert all(not st.inflight() and st.stash_bytes == 0 for st in pipe.stages)
        assert count_batched[0] == 0
        model[0].calls, model[0].fail_mb = 0, None
        model.zero_grad()
        pipe.step(x, y)
        for q, g in zip(model.parameters(), ref):
            torch.testing.assert_close(q.grad, g, rtol=1e-10, atol=1e-12)
    finally:
        pipe.close()
