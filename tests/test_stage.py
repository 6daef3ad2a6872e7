"""Tests for pipetrain.stage: forward/backward and the I/W split against the unsplit model."""

import pytest
import torch
from torch import nn

from pipetrain.stage import Stage
from tests.models import D
from tests.models import mse as _loss


def _reference(model, x, y):
    model.zero_grad()
    loss = _loss(model(x), y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def _run_stages(stages, xs, ys, n, split):
    """Drive stages by hand: all forwards, then per micro-batch B (or I then W)."""
    total = 0.0
    for j, (x, y) in enumerate(zip(xs, ys)):
        h = x
        for s in stages[:-1]:
            h = s.forward(j, h)
        w = len(y) / n
        total += stages[-1].forward(j, h, y, weight=w).item() * w
    for j in range(len(xs)):
        g = None
        for s in reversed(stages):
            g = s.backward_input(j, g) if split else s.backward(j, g)
        if split:
            for s in stages:
                s.backward_weight(j)
    return total


def _mlp():
    return nn.Sequential(*[nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D), nn.Tanh()) for _ in range(4)])


@pytest.mark.parametrize("split", [False, True], ids=["B", "IW"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["keep", "recompute"])
def test_stages_match_unsplit_model(split, checkpoint):
    torch.manual_seed(0)
    model = _mlp().double()
    x, y = torch.randn(7, D, dtype=torch.float64), torch.randn(7, D, dtype=torch.float64)
    ref_loss, ref_grads = _reference(model, x, y)
    model.zero_grad()
    layers = list(model)
    stages = [Stage(0, layers[:1], checkpoint=checkpoint, input_grad=False),
              Stage(1, layers[1:3], checkpoint=checkpoint),
              Stage(2, layers[3:], checkpoint=checkpoint, loss_fn=_loss)]
    loss = _run_stages(stages, x.split([3, 2, 2]), y.split([3, 2, 2]), 7, split)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    assert all(s.stash_bytes == 0 and not s.inflight() for s in stages)


class _Reuse(nn.Module):
    """The same Linear applied twice, plus a parameter used outside any submodule: the I/W
    split must fall back for the reused weight and still give exact gradients."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.scale = nn.Parameter(torch.full((D,), 0.5))

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x))) * self.scale + x


class _TupleLayer(nn.Module):
    """Takes and returns (hidden, mask, positions): a bool mask and int positions pass through."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, inp):
        h, mask, pos = inp
        return torch.tanh(self.lin(h)) * mask.unsqueeze(-1) + pos.unsqueeze(-1).to(h.dtype) * 0.01, mask, pos


@pytest.mark.parametrize("split", [False, True], ids=["B", "IW"])
def test_reused_weights_and_tuples(split):
    torch.manual_seed(1)
    model = nn.Sequential(_TupleLayer(), _TupleLayer(), _TupleLayer()).double()
    reuse = _Reuse().double()
    head = nn.Linear(D, D).double()
    full = nn.Sequential(*model, _First(), reuse, head)
    n = 5
    h = torch.randn(n, D, dtype=torch.float64)
    mask = torch.rand(n) > 0.3
    pos = torch.arange(n)
    y = torch.randn(n, D, dtype=torch.float64)
    ref_loss, ref_grads = _reference(full, (h, mask, pos), y)
    full.zero_grad()
    layers = list(full)
    stages = [Stage(0, layers[:1], input_grad=False), Stage(1, layers[1:3]),
              Stage(2, layers[3:5]), Stage(3, layers[5:], loss_fn=_loss)]
    sizes = [3, 2]
    xs = list(zip(h.split(sizes), mask.split(sizes), pos.split(sizes)))
    loss = _run_stages(stages, xs, y.split(sizes), n, split)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for p, g in zip(full.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


class _First(nn.Module):
    def forward(self, inp):
        return inp[0]


def test_input_gradient_step_leaves_weights_alone():
    """I computes no weight gradient (parameter hooks do not fire); W fires each once."""
    torch.manual_seed(2)
    layers = list(_mlp())
    stage = Stage(1, layers)
    fired = []
    for i, p in enumerate(stage.params):
        p.register_hook(lambda g, i=i: fired.append(i))
    stage.forward(0, torch.randn(4, D))
    grad_in = stage.backward_input(0, torch.randn(4, D))
    assert grad_in.shape == (4, D) and fired == []
    assert all(p.grad is None for p in stage.params)
    stage.backward_weight(0)
    assert sorted(fired) == list(range(len(stage.params)))
    assert all(p.grad is not None for p in stage.params)


def test_stash_holds_only_inputs_when_recomputing():
    torch.manual_seed(3)
    layers = list(_mlp())
    keep, recompute = Stage(1, layers), Stage(1, layers, checkpoint=True)
    x = torch.randn(4, D)
    for j in range(3):
        keep.forward(j, x)
        recompute.forward(j, x)
    assert recompute.stash_bytes == 3 * x.nbytes and recompute.peak_inflight == 3
    assert keep.stash_bytes > 4 * recompute.stash_bytes   # the graph's activations are kept
    for j in range(3):
        keep.backward(j, torch.ones(4, D))
        recompute.backward(j, torch.ones(4, D))
    assert keep.stash_bytes == 0 and recompute.stash_bytes == 0 and recompute.peak_stash_bytes == 3 * x.nbytes


def test_misuse_is_reported():
    stage = Stage(4, [nn.Linear(D, D)])
    with pytest.raises(RuntimeError, match="stage 4 has no forward state for micro-batch 2"):
        stage.backward(2, torch.ones(1, D))
    stage.forward(0, torch.ones(1, D))
    with pytest.raises(RuntimeError, match="ran twice"):
        stage.forward(0, torch.ones(1, D))
    last = Stage(5, [nn.Linear(D, D)], loss_fn=lambda o, t: o - t)
    with pytest.raises(TypeError, match="scalar"):
        last.forward(0, torch.ones(2, D), torch.zeros(2, D))
    nan = Stage(5, [nn.Linear(D, D)], loss_fn=lambda o, t: (o * float("nan")).mean(), check_finite=True)
    with pytest.raises(FloatingPointError, match="nan"):
        nan.forward(0, torch.ones(2, D), None)


class _Scale(torch.autograd.Function):
    """y = x * w with a hand-written backward that counts its calls."""

    calls = 0

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        _Scale.calls += 1
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


class _ScaleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, D, dtype=torch.float64))

    def forward(self, x):
        return _Scale.apply(torch.tanh(x), self.w)


def test_custom_function_split_runs_its_backward_once():
    """A Python autograd.Function computes both gradients whenever it runs; the split keeps
    its weight gradient from I instead of running it again in W."""
    layers = [_ScaleLayer(), nn.Linear(D, D).double(), _ScaleLayer()]
    x, g = torch.randn(3, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    ref_stage = Stage(1, layers)
    ref_stage.forward(0, x)
    ref_in = ref_stage.backward(0, g)
    ref = [p.grad.clone() for p in ref_stage.params]
    for p in ref_stage.params:
        p.grad = None
    stage = Stage(1, layers)
    stage.forward(0, x)
    _Scale.calls = 0
    grad_in = stage.backward_input(0, g)
    stage.backward_weight(0)
    assert _Scale.calls == 2  # once per use, all in I
    torch.testing.assert_close(grad_in, ref_in, rtol=1e-12, atol=1e-14)
    for p, r in zip(stage.params, ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)
