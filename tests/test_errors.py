"""Errors: a failing action names its stage, micro-batch and action; the next step works."""

import threading
import time

import pytest
import torch
from torch import nn

from pipetrain.pipeline import Pipeline, PipelineError
from tests.models import D, Stall, mse


class Faulty(nn.Module):
    """A Linear that can fail in one action of one micro-batch.

    ``fail = (kind, mb)``: "F" raises in the forward of micro-batch ``mb``; "B"/"I" raise when
    the gradient w.r.t. its output is computed (the input-gradient path); "W" when the
    gradient w.r.t. its weight is computed. Forwards run in micro-batch order on a stage, so
    the forward call count is the micro-batch index.
    """

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.fail = None
        self.calls = 0

    def forward(self, x):
        mb, self.calls = self.calls, self.calls + 1
        kind = self.fail[0] if self.fail and self.fail[1] == mb else None
        if kind == "F":
            raise ValueError(f"boom in forward {mb}")
        weight = self.lin.weight * 1.0
        if kind == "W":
            weight.register_hook(_raiser(f"boom in weight grad {mb}"))
        y = nn.functional.linear(torch.tanh(x), weight, self.lin.bias)
        if kind in ("B", "I"):
            y.register_hook(_raiser(f"boom in backward {mb}"))
        return y


def _raiser(message):
    def hook(grad):
        raise ValueError(message)
    return hook


def _model(n):
    torch.manual_seed(0)
    return nn.Sequential(*[Faulty() for _ in range(n)]).double()


@pytest.mark.parametrize("schedule,p,kind,stage,mb", [
    ("1f1b", 3, "F", 1, 2),
    ("1f1b", 3, "F", 2, 0),           # the last stage
    ("gpipe", 2, "B", 0, 3),
    ("1f1b", 4, "B", 3, 1),
    ("zb-h1", 3, "I", 1, 2),
    ("zb-h2", 3, "W", 2, 3),
    ("zb-h1", 3, "W", 0, 0),
    ("interleaved-1f1b", 2, "B", 2, 1),  # stage 2 lives on device 0
])
def test_failure_is_named_and_the_next_step_works(schedule, p, kind, stage, mb):
    kwargs = {"num_chunks": 2} if schedule.startswith("interleaved") else {}
    n = p * kwargs.get("num_chunks", 1)
    model = _model(n)
    x, y = torch.randn(8, D, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    ref_loss = mse(model(x), y)
    ref_loss.backward()
    ref = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    pipe = Pipeline(model, p, schedule=schedule, num_microbatches=4, loss_fn=mse,
                    timeout=10.0, **kwargs)
    threads = threading.active_count()
    for layer in model:
        layer.calls = 0
    model[stage].fail = (kind, mb)
    with pytest.raises(PipelineError) as info:
        pipe.step(x, y)
    err = info.value
    assert (err.stage, err.microbatch, err.action) == (stage, mb, kind)
    assert f"stage {stage}, micro-batch {mb}, action {kind}" in str(err)
    assert isinstance(err.__cause__, ValueError) and "boom" in str(err.__cause__)
    assert err.device == pipe.schedule.device_of(stage)
    assert all(not st.inflight() and st.stash_bytes == 0 for st in pipe.stages)
    assert threading.active_count() == threads       # no thread left behind or added
    # The same pipeline runs the next step correctly.
    model[stage].fail = None
    model.zero_grad()
    loss = pipe.step(x, y)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for q, g in zip(model.parameters(), ref):
        torch.testing.assert_close(q.grad, g, rtol=1e-10, atol=1e-12)


def test_nan_loss_is_caught_when_checking():
    model = _model(2)
    x, y = torch.randn(8, D, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    x[5, 0] = float("nan")   # micro-batch 2 of 4 (samples 4, 5)
    pipe = Pipeline(model, 2, num_microbatches=4, loss_fn=mse, check_finite=True)
    with pytest.raises(PipelineError) as info:
        pipe.step(x, y)
    err = info.value
    assert (err.stage, err.microbatch, err.action) == (1, 2, "F")
    assert isinstance(err.__cause__, FloatingPointError)
    unchecked = Pipeline(model, 2, num_microbatches=4, loss_fn=mse)
    assert torch.isnan(unchecked.step(x, y))
    x[5, 0] = 0.0
    assert torch.isfinite(pipe.step(x, y))


def test_stalled_step_times_out():
    """An action that takes longer than ``timeout`` ends the step with an error (no hang)."""
    model = nn.Sequential(nn.Linear(D, D), Stall(0.0), nn.Linear(D, D))
    pipe = Pipeline(model, 3, num_microbatches=2, loss_fn=mse, timeout=0.3)
    model[1].seconds = 1.0
    t0 = time.perf_counter()
    with pytest.raises(PipelineError, match="step failed|timed out|timeout|progress"):
        pipe.step(torch.randn(2, D), torch.randn(2, D))
    assert time.perf_counter() - t0 < 8.0
    model[1].seconds = 0.0
    assert torch.isfinite(pipe.step(torch.randn(2, D), torch.randn(2, D)))
