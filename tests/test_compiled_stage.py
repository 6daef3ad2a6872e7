"""Compiled stages (``Pipeline(compile=...)``): gradients equal the unsplit model's.

``backend="aot_eager"`` traces each stage with torch.compile's front end (dynamo, AOT
autograd) but runs the traced aten ops eagerly: the same arithmetic as eager, so float64
gradients match the unsplit model to 1e-10 (only the summation order over micro-batches
differs). One inductor test checks float32 to 1e-4 relative: inductor fuses and reorders
the pointwise ops and reductions, so results differ from eager by a few float32 ulps per
op, accumulated over two Linear layers and the loss.
"""

import pytest
import torch
from torch import nn

from pipetrain import Pipeline
from pipetrain.compiled_stage import CompiledLayers, check_compile
from tests.models import assert_grads, batch, mlp, mse, reference

AOT = dict(backend="aot_eager")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "zb-h2"])
@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_grads_equal_unsplit_model(schedule, checkpoint):
    model = mlp(4)
    x, y = batch(8)
    ref_loss, ref = reference(model, x, y)
    pipe = Pipeline(model, num_devices=2, schedule=schedule, num_microbatches=4, loss_fn=mse,
                    checkpoint=checkpoint, compile=AOT)
    for _ in range(2):             # the second step replays the compiled graphs
        model.zero_grad()
        loss = pipe.step(x, y)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
        assert_grads(model, ref)
    assert all(isinstance(st.compiled, CompiledLayers) for st in pipe.stages)
    pipe.close()


def test_recompiles_on_shape_change():
    model = mlp(4)
    pipe = Pipeline(model, num_devices=2, schedule="1f1b", num_microbatches=2, loss_fn=mse,
                    compile=AOT)
    for n in (8, 12, 8):
        x, y = batch(n)
        ref_loss, ref = reference(model, x, y)
        model.zero_grad()
        torch.testing.assert_close(pipe.step(x, y), ref_loss, rtol=1e-10, atol=0)
        assert_grads(model, ref)
    pipe.close()


def test_stages_have_their_own_compiled_function():
    model = mlp(4)
    pipe = Pipeline(model, num_devices=2, loss_fn=mse, compile=AOT)
    codes = [st.compiled._fn._torchdynamo_orig_callable.__code__ for st in pipe.stages]
    assert codes[0] is not codes[1]
    assert [c.co_name for c in codes] == ["pipetrain_stage0_layers", "pipetrain_stage1_layers"]
    pipe.close()


def test_dropout_recomputation_replays_the_same_masks():
    """Re-materialization recomputes each forward with the RNG state of the original one:
    with dropout, checkpoint='always' must give exactly the gradients of 'never'. (Dropout in
    the first stage only: two random stages draw from the global generator in thread order.)"""
    def run(checkpoint):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 6),
                              nn.Tanh()).double()
        x, y = batch(8)
        pipe = Pipeline(model, num_devices=2, balance=[3, 2], num_microbatches=2, loss_fn=mse,
                        checkpoint=checkpoint, compile=AOT, rng_lock=True)
        torch.manual_seed(1)
        loss = pipe.step(x, y)
        pipe.close()
        return loss, [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = run("never")
    loss_b, grads_b = run("always")
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_inductor_float32_then_split_backward():
    """Inductor (C++ kernels on CPU; needs gcc) against the unsplit model in float32: a 1F1B
    pipeline, then a ZB one of the same layers. The second finds the first's compiled
    graphs in torch's caches, with saved buffers donated to the backward — which then
    refuses ``retain_graph=True``, so a compiled stage's I must not retain the graph."""
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    for schedule in ("1f1b", "zb-h1"):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(8)])
        ref_loss, ref = reference(model, x, y)
        pipe = Pipeline(model, num_devices=2, schedule=schedule, num_microbatches=4,
                        loss_fn=mse, compile=True)
        loss = pipe.step(x, y)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
        assert_grads(model, ref, rtol=1e-4, atol=1e-6)
        pipe.close()


@pytest.mark.parametrize("bad, match", [
    ("yes", "compile must be True, False or a dict"),
    (dict(backend="aot_eager", bogus=1), "takes no argument 'bogus'"),
])
def test_bad_compile_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        check_compile(bad)
    with pytest.raises(ValueError, match=match):
        Pipeline(mlp(4), num_devices=2, loss_fn=mse, compile=bad)


def test_compile_arguments_pass_through():
    assert check_compile(False) is None and check_compile(None) is None
    assert check_compile(True) == {}
    assert check_compile(dict(backend="aot_eager", dynamic=False)) == dict(backend="aot_eager",
                                                                           dynamic=False)
