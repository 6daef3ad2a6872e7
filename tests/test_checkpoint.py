"""Tests for pipetrain.checkpoint: modes, RNG replay in recomputation, RNG-use detection."""

import pytest
import torch
from torch import nn

from pipetrain import checkpoint as ckpt
from pipetrain.stage import Stage


def test_modes():
    assert ckpt.checkpoint_flags("never", 3) == [False, False, False]
    assert ckpt.checkpoint_flags("always", 3) == [True, True, True]
    assert ckpt.checkpoint_flags("except_last", 3) == [True, True, False]
    assert ckpt.checkpoint_flags("except_last", 1) == [False]
    with pytest.raises(ValueError, match="'never', 'always', 'except_last'"):
        ckpt.checkpoint_flags("sometimes", 2)


def _dropout_layers():
    torch.manual_seed(0)
    return [nn.Linear(8, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 8), nn.Dropout(0.3)]


def test_recomputation_replays_dropout():
    """A re-materialized stage with dropout gives the gradients of the kept-graph stage run
    from the same RNG state, and leaves the global RNG stream where the kept run leaves it."""
    layers = _dropout_layers()
    x, g = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    for m in layers:
        m.double()
    results = []
    for checkpoint in (False, True):
        for p in (q for m in layers for q in m.parameters()):
            p.grad = None
        torch.manual_seed(123)
        stage = Stage(1, layers, checkpoint=checkpoint)
        out = stage.forward(0, x)
        torch.rand(3)  # other work draws between forward and backward
        grad_in = stage.backward(0, g)
        after = torch.rand(4)
        results.append((out, grad_in, [p.grad.clone() for p in stage.params], after))
    (o0, gi0, gp0, a0), (o1, gi1, gp1, a1) = results
    assert (o0 == 0).any()  # dropout did drop something
    assert torch.equal(o0, o1) and torch.equal(gi0, gi1) and torch.equal(a0, a1)
    for a, b in zip(gp0, gp1):
        assert torch.equal(a, b)


def test_recompute_without_replay_would_differ():
    """Sanity check of the test above: a different RNG state gives a different mask."""
    layers = _dropout_layers()
    x = torch.randn(16, 8)
    torch.manual_seed(1)
    a = nn.Sequential(*layers)(x)
    torch.manual_seed(2)
    b = nn.Sequential(*layers)(x)
    assert not torch.equal(a, b)


def test_uses_rng():
    drop = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    assert ckpt.uses_rng(drop)
    drop.eval()
    assert not ckpt.uses_rng(drop)
    assert not ckpt.uses_rng(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))
    assert ckpt.uses_rng(nn.MultiheadAttention(4, 2, dropout=0.1))
    assert not ckpt.uses_rng(nn.MultiheadAttention(4, 2))
    assert ckpt.uses_rng(nn.RReLU())
    assert Stage(0, [nn.Linear(2, 2)], rng_lock=True).uses_rng
    assert not Stage(0, [nn.Dropout(0.5)], rng_lock=False).uses_rng


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_recomputation_does_not_update_batchnorm_twice(schedule):
    """BatchNorm sees each micro-batch's statistics (as in any micro-batched run) and its
    running stats advance once per micro-batch forward: the reference is a plain loop over
    micro-batches; re-materialized or not, the pipeline must match it exactly."""
    from pipetrain.pipeline import Pipeline

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(),
                             nn.Linear(4, 4), nn.BatchNorm1d(4)).double()

    def mse(o, t):
        return ((o - t) ** 2).mean()

    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    ref = make()
    for xj, yj in zip(x.split(2), y.split(2)):
        (mse(ref(xj), yj) / 4).backward()
    for mode in ("never", "always"):
        model = make()
        Pipeline(model, balance=[3, 2], schedule=schedule, num_microbatches=4, loss_fn=mse,
                 checkpoint=mode).step(x, y)
        for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{mode}: {name}")
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
