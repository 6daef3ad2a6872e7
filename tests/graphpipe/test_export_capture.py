"""The torch.export fallback of graph capture (engine/graphpipe/export_capture.py): a model
fx cannot trace (Python control flow on shapes) is exported, grouped back into the user's
layers, and pipelined -- gradients land in the user's parameters and equal the unsplit
model's (fp64, 1e-10: the same operators in the same order, only the cut differs)."""

import pytest
import torch
from torch import fx, nn

import pipetrain
from pipetrain.graphpipe.capture import CaptureError, capture
from tests.graphpipe.dag_models import D, mse
from tests.graphpipe.test_runtime import fixed_costs  # noqa: F401  (autouse: fixed operator costs)


class ShapeBranchy(nn.Module):
    """Two towers and a head; the forward branches on ``x.shape[0]`` and loops over
    ``x.size(1)`` -- fx's proxies cannot drive either, export evaluates both for the sample."""

    def __init__(self):
        super().__init__()
        self.text = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D), nn.Tanh())
        self.image = nn.Linear(D, D)
        self.small = nn.Linear(D, D)
        self.head = nn.Linear(2 * D, D)

    def forward(self, x):
        h = self.text(x) if x.shape[0] > 1 else self.small(x)
        for _ in range(x.size(1) // 4):  # D = 8: two scaled residual steps
            h = h + 0.5 * torch.tanh(h)
        return self.head(torch.cat([h, self.image(x)], -1))


class Block(nn.Module):
    """A user's module (traced through by default; kept whole as a leaf)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + x


class WithBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])

    def forward(self, x):
        for i in range(x.shape[1] // 8 * len(self.blocks)):  # a loop over a size
            x = self.blocks[i](x)
        return x


class ValueBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        if x.sum() > 0:  # on a tensor's value: neither fx nor export can capture this
            return self.lin(x)
        return x


def test_fx_fails_export_captures_with_module_boundaries():
    model = ShapeBranchy().double()
    x = torch.randn(4, D, dtype=torch.float64)
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    gm = capture(model, sample_args=(x,))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    # torch's layers are one operator each (the sample took the `text` path); the user's
    # own code (tanh, +, *, cat) stays single ATen operators, as fx would give.
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(calls) == 6  # text.0..3, image, head; `small` never ran
    assert sorted(n.target for n in calls) == sorted(
        ["text_0", "text_1", "text_2", "text_3", "image_op", "head_op"])
    # The parameters are the user's objects, not copies.
    assert {id(p) for p in gm.parameters()} == {id(p) for p in model.parameters()}
    assert gm.get_submodule("head_op").get_parameter("head.weight") is model.head.weight


def test_leaf_modules_group_a_users_module_into_one_operator():
    model = WithBlocks().double()
    x = torch.randn(4, D, dtype=torch.float64)
    gm = capture(model, leaf_modules=[Block], sample_args=(x,))
    assert [n.op for n in gm.graph.nodes] == ["placeholder"] + ["call_module"] * 3 + ["output"]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    plain = capture(model, sample_args=(x,))  # traced through: Linear, tanh, Linear, add
    assert sum(n.op == "call_module" for n in plain.graph.nodes) == 6


@pytest.mark.parametrize("checkpoint", ["never", "always", "except_last"])
@pytest.mark.parametrize("schedule", ["graphpipe", "1f1b"])
@pytest.mark.parametrize("cls,p,dag", [(ShapeBranchy, 4, True), (WithBlocks, 3, False)])
def test_exported_model_gradients_equal_unsplit(cls, p, dag, schedule, checkpoint):
    torch.manual_seed(0)
    model = cls().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, D, dtype=torch.float64, generator=g)
    y = torch.randn(8, D, dtype=torch.float64, generator=g)
    # Unsplit reference, micro-batch by micro-batch (the shape-dependent path is the one
    # a micro-batch of 2 takes), mean over micro-batches as the pipeline's loss.
    m = 4
    ref = sum(mse(model(xi), yi) for xi, yi in zip(x.chunk(m), y.chunk(m))) / m
    ref.backward()
    ref_grads = [None if q.grad is None else q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    pipe = pipetrain.Pipeline(model, num_devices=p, schedule=schedule, num_microbatches=m,
                              loss_fn=mse, checkpoint=checkpoint)
    try:
        loss = pipe.step(x, y)
        assert pipe.plan.graph.num_stages == p
        # ShapeBranchy's towers become a DAG under graphpipe; WithBlocks is a chain anyway.
        assert pipe.plan.graph.is_chain == (schedule == "1f1b" or not dag)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
        for q, r in zip(model.parameters(), ref_grads):
            if r is None:  # `small`: not on the captured path, no gradient either way
                assert q.grad is None
            else:
                torch.testing.assert_close(q.grad, r, rtol=1e-10, atol=1e-12)
    finally:
        pipe.close()


def test_both_fail_error_names_line_export_reason_and_leaf_fix():
    x = torch.randn(3, D)
    with pytest.raises(CaptureError) as err:
        capture(ValueBranchy(), sample_args=(x,))
    msg = str(err.value)
    assert "test_export_capture.py:" in msg and "`if x.sum() > 0:" in msg
    assert "torch.export failed too" in msg and "leaf_modules" in msg


def test_pipeline_on_value_branchy_model_raises_capture_error():
    pipe = pipetrain.Pipeline(ValueBranchy(), num_devices=2, schedule="graphpipe",
                              num_microbatches=2, loss_fn=mse)
    try:
        with pytest.raises(CaptureError, match="leaf_modules"):
            pipe.step(torch.randn(4, D), torch.randn(4, D))
    finally:
        pipe.close()
