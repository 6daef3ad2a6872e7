"""The step path's shortcuts (issue 11) give what the long way gives."""

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from pipetrain.autograd_fast import grad as fast_grad
from pipetrain.stage import Meter, Stage


def _graph():
    torch.manual_seed(0)
    w1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    h = torch.tanh(x @ w1.t())
    y = h @ w2.t()
    return x, w1, w2, unused, h, y


def test_fast_grad_equals_autograd_grad():
    x, w1, w2, unused, h, y = _graph()
    g = torch.randn_like(y)
    want = torch.autograd.grad([y], [x, w1, w2, unused], [g], retain_graph=True, allow_unused=True)
    got = fast_grad([y], [x, w1, w2, unused], [g], retain_graph=True)
    assert got[3] is None and want[3] is None
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    # a scalar output with a None gradient means ones, as in torch.autograd.grad
    loss = (y ** 2).sum()
    want = torch.autograd.grad([loss], [w1], [None], retain_graph=True)
    assert torch.equal(fast_grad([loss], [w1], [None], retain_graph=True)[0], want[0])
    # a restart at a graph node (what W does)
    edge = get_gradient_edge(h)
    gh = torch.randn_like(h)
    want = torch.autograd.grad([edge], [w1], [gh], retain_graph=True)
    assert torch.equal(fast_grad([edge], [w1], [gh], retain_graph=True)[0], want[0])


def test_fast_grad_falls_back_for_subclasses():
    class Sub(torch.Tensor):
        pass

    w = torch.randn(3, requires_grad=True)
    y = (w * 2).as_subclass(Sub)
    g = torch.ones(3)
    assert torch.equal(fast_grad([y], [w], [g])[0], torch.full((3,), 2.0))


def test_a_run_measures_saved_bytes_once_per_signature_and_equals_measuring_each():
    """The per-run cache of saved bytes gives every micro-batch the count that watching its
    own forward gives (a stage used on its own measures each one)."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6)]
    inputs = [torch.randn(3, 6), torch.randn(3, 6), torch.randn(5, 6)]   # two signatures
    alone = Stage(0, layers)
    alone.forward(99, inputs[0])     # the first forward (on copies, see Stage) out of the way
    alone.clear()
    each = []
    for k, x in enumerate(inputs):
        before = alone.stash_bytes
        alone.forward(k, x)
        each.append(alone.stash_bytes - before)
    alone.clear()
    staged = Stage(0, layers)
    staged.begin_run(Meter())
    staged.forward(99, inputs[0])
    staged.backward(99, torch.ones(3, 6))
    got = []
    for k, x in enumerate(inputs):
        before = staged.stash_bytes
        staged.forward(k, x)
        got.append(staged.stash_bytes - before)
    assert len(staged._run.saved_bytes) == 2
    assert got == each and each[0] == each[1] and each[2] > each[0]
    assert staged.own.peak_bytes == sum(each)
    staged.end_run(commit=False)
