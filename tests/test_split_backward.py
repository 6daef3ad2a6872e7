"""The I/W split and batched W (pipetrain.split_backward) against the unsplit model.

Batched W sums the same per-micro-batch products as the unbatched W in another order
(one GEMM over stacked rows, or one autograd call over several graphs), so in float64 it
equals the unsplit model to 1e-10 relative like every schedule; in float32 the difference
to the unbatched zero-bubble schedule is summation-order rounding, a few ulps of the
largest partial sums: rtol 1e-5 / atol 1e-6 (gradients here are O(1e-2..1)) leaves two
orders of magnitude of margin over float32's 6e-8 while a wrong micro-batch set (a
missing or doubled micro-batch changes a gradient by ~1/m) fails by far.
"""

import copy

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain import split_backward as split
from pipetrain.stage import Stage
from tests.models import assert_grads, mse, reference


class Scale(torch.autograd.Function):
    """A Python autograd.Function with a weight: its W cannot be a GEMM (fallback path)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


class ScaleLayer(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return Scale.apply(x, self.w)


def mixed(dtype=torch.float64, width=6, seed=0):
    """Linears with and without bias, a 3-D Linear input, LayerNorm, a custom Function."""
    torch.manual_seed(seed)

    class Seq3(nn.Module):              # Linear on (rows, 2, width/2): addmm on a view
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(width // 2, width // 2)

        def forward(self, x):
            return self.lin(x.view(x.shape[0], 2, width // 2)).reshape(x.shape[0], width)

    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width, bias=False),
                         nn.Tanh(), Seq3(), nn.LayerNorm(width), ScaleLayer(width),
                         nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)).to(dtype)


def data(n, dtype=torch.float64, width=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, dtype=dtype, generator=g),
            torch.randn(n, width, dtype=dtype, generator=g))


@pytest.mark.parametrize("schedule", ["zb-h1-bw", "zb-h2-bw"])
@pytest.mark.parametrize("p, m", [(2, 1), (2, 8), (3, 3), (4, 8)])
@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_batched_schedules_equal_the_unsplit_model_fp64(schedule, p, m, checkpoint):
    model = mixed()
    x, y = data(2 * m + 1)                  # uneven micro-batches too
    loss, grads = reference(model, x, y)
    pipe = pipetrain.Pipeline(model, num_devices=p, schedule=schedule, num_microbatches=m,
                              loss_fn=mse, checkpoint=checkpoint)
    assert any(a.count > 1 for row in pipe.plan.actions for a in row) == (m > 1)
    got = pipe.step(x, y)
    torch.testing.assert_close(got, loss, rtol=1e-10, atol=0)
    assert_grads(model, grads, rtol=1e-10, atol=1e-12)
    pipe.close()


@pytest.mark.parametrize("h2", [False, True])
def test_batched_equals_unbatched_fp32(h2):
    model = mixed(torch.float32, width=16)
    twin = copy.deepcopy(model)
    x, y = data(64, torch.float32, width=16)
    name = "zb-h2" if h2 else "zb-h1"
    for mdl, sched in ((model, name), (twin, name + "-bw")):
        pipe = pipetrain.Pipeline(mdl, num_devices=3, schedule=sched, num_microbatches=16,
                                  loss_fn=mse)
        pipe.step(x, y)
        pipe.close()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


def _stage_with_pending_w(model, xs, gs):
    """A stand-alone stage that ran F and I of each micro-batch; W left to do."""
    stage = Stage(0, list(model), input_grad=True)
    for k, (x, g) in enumerate(zip(xs, gs)):
        stage.forward(k, x)
        stage.backward_input(k, g)
    return stage


def _expected(model, xs, gs):
    model.zero_grad()
    for x, g in zip(xs, gs):
        (model(x) * g).sum().backward()
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


def test_linear_stage_is_one_gemm_and_one_accumulation(monkeypatch):
    # Only Linears (and activations): the batched W makes no autograd call at all, one
    # GEMM per Linear, and a single accumulation call for the biases.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 4, bias=False)).double()
    xs = [torch.randn(3, 5, dtype=torch.float64) for _ in range(4)]
    gs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(4)]
    want = _expected(model, xs, gs)
    stage = _stage_with_pending_w(model, xs, gs)
    calls = {"grad": 0, "acc": 0, "mm": 0}

    def no_autograd(*a, **k):
        calls["grad"] += 1
        raise AssertionError("batched W of Linears went through autograd")

    real_acc, real_mm = split._accumulate, torch.mm

    def counting_acc(*a, **k):
        calls["acc"] += 1
        return real_acc(*a, **k)

    def counting_mm(*a, **k):
        calls["mm"] += 1
        return real_mm(*a, **k)

    monkeypatch.setattr(split, "fast_grad", no_autograd)
    monkeypatch.setattr(split, "_accumulate", counting_acc)
    monkeypatch.setattr(torch, "mm", counting_mm)
    stage.backward_weight(0, count=4)
    assert calls == {"grad": 0, "acc": 3, "mm": 2}  # weight 1, weight 2 (fresh), the bias
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_second_batched_w_accumulates_in_place():
    # p.grad already holds something: the batched W adds into it (addmm_), no new tensor.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7)).double()
    xs = [torch.randn(2, 5, dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn(2, 7, dtype=torch.float64) for _ in range(3)]
    want = _expected(model, xs, gs)
    stage = _stage_with_pending_w(model, xs, gs)
    before = [torch.ones_like(p) for p in model.parameters()]
    for p, b in zip(model.parameters(), before):
        p.grad = b.clone()
    ptr = model[0].weight.grad.data_ptr()
    stage.backward_weight(0, count=3)
    assert model[0].weight.grad.data_ptr() == ptr
    for p, g, b in zip(model.parameters(), want, before):
        torch.testing.assert_close(p.grad, g + b, rtol=1e-12, atol=1e-14)


def test_fallback_layers_run_per_microbatch_in_the_same_action():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), ScaleLayer(4), nn.Linear(4, 4)).double()
    xs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    want = _expected(model, xs, gs)
    stage = _stage_with_pending_w(model, xs, gs)
    stage.backward_weight(0, count=3)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_reused_weight_falls_back_and_stays_exact():
    # One Linear applied twice: its weight is reached from both sides of a frontier node,
    # which the split hands to the full-pass fallback; batched W must count it once.
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()

    class Twice(nn.Module):
        def forward(self, x):
            return lin(torch.tanh(lin(x)))

    model = nn.Sequential(Twice())
    model.register_module("lin", lin)
    xs = [torch.randn(2, 4, dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn(2, 4, dtype=torch.float64) for _ in range(3)]
    want = _expected(model, xs, gs)
    stage = Stage(0, [model], input_grad=True)
    for k, (x, g) in enumerate(zip(xs, gs)):
        stage.forward(k, x)
        stage.backward_input(k, g)
    stage.backward_weight(0, count=3)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_linear_parts_recognises_linears_only():
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    lin = nn.Linear(4, 2)
    out = lin(x)
    g = torch.randn(3, 2)
    edge = torch.autograd.graph.GradientEdge(out.grad_fn, 0)
    parts = split.linear_parts([edge], [g], [lin.weight, lin.bias])
    assert parts is not None and parts[2] is lin.weight and parts[3] is lin.bias
    torch.testing.assert_close(parts[0], x)
    # Wrong parameter set, another op, a 3-arg custom: not a Linear.
    assert split.linear_parts([edge], [g], [lin.weight]) is None
    ln = nn.LayerNorm(4)
    out2 = ln(x)
    assert split.linear_parts([torch.autograd.graph.GradientEdge(out2.grad_fn, 0)],
                              [torch.randn(3, 4)], list(ln.parameters())) is None


def test_parameter_hooks_fire_once_per_w_action():
    # A hooked parameter's W goes through autograd, so its hook fires -- once per W action,
    # with the sum over the micro-batches it covers (one autograd call); the others take
    # the GEMM.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)).double()
    fired = []
    model[2].weight.register_hook(lambda g: fired.append(g.clone()))
    xs = [torch.randn(2, 4, dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn(2, 4, dtype=torch.float64) for _ in range(3)]
    want = _expected(model, xs, gs)
    fired.clear()
    stage = _stage_with_pending_w(model, xs, gs)
    stage.backward_weight(0, count=3)
    assert len(fired) == 1
    torch.testing.assert_close(fired[0], want[2], rtol=1e-12, atol=1e-14)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule", ["zb-h1-bw", "zb-h2-bw"])
def test_batched_w_with_pipeline_updates_matches_unsplit_training(schedule):
    # The plan's U(s, t) waits for the batched W covering mini-batch t's last micro-batches;
    # three SGD steps equal the unsplit model's three steps (fp64).
    model, twin = mixed(), mixed()
    batches = [data(8, seed=s) for s in range(3)]
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        mse(twin(x), y).backward()
        opt.step()
    pipe = pipetrain.Pipeline(model, num_devices=3, schedule=schedule, num_microbatches=4,
                              loss_fn=mse,
                              optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    list(pipe.train(batches))
    pipe.close()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bench_lever_off_gives_the_same_gradients(monkeypatch):
    # split_backward.BATCH = False (hooks in I, per-node autograd restarts in W) is the
    # bench's "before" path: same gradients as the unsplit model.
    monkeypatch.setattr(split, "BATCH", False)
    model = mixed()
    x, y = data(12)
    loss, grads = reference(model, x, y)
    pipe = pipetrain.Pipeline(model, num_devices=2, schedule="zb-h1-bw", num_microbatches=4,
                              loss_fn=mse)
    pipe.step(x, y)
    pipe.close()
    assert_grads(model, grads, rtol=1e-10, atol=1e-12)
