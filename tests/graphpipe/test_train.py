"""train() on a graph model (GraphPipe DAG stages and the chain linearization): each
mini-batch is step() then every stage's optimizer step, equal to plain torch training of the
unsplit model (fp64)."""

import copy

import pytest
import torch

import pipetrain
from tests.graphpipe.dag_models import D, TwoTower, mse
from tests.graphpipe.test_runtime import fixed_costs  # noqa: F401  (autouse: fixed operator costs)


def _batches(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(8, D, dtype=torch.float64, generator=g),
              torch.randn(8, D, dtype=torch.float64, generator=g)),
             torch.randn(8, D, dtype=torch.float64, generator=g)) for _ in range(T)]


def _sgd(ps):
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("schedule", ["graphpipe", "1f1b"])
def test_train_equals_plain_torch(schedule):
    torch.manual_seed(1)
    model = TwoTower().double()
    twin = copy.deepcopy(model)
    opt = _sgd(twin.parameters())
    expected = []
    for xs, y in _batches(3):
        opt.zero_grad()
        loss = mse(twin(*xs), y)
        loss.backward()
        opt.step()
        expected.append(loss.item())
    pipe = pipetrain.Pipeline(model, num_devices=4, schedule=schedule, num_microbatches=4,
                              loss_fn=mse, optimizer=_sgd)
    try:
        losses = [loss.item() for loss in pipe.train(_batches(3))]
        assert losses == pytest.approx(expected, rel=1e-12)
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert not pipe.plan.graph.is_chain or schedule == "1f1b"
    finally:
        pipe.close()


def test_train_without_an_optimizer_says_how():
    pipe = pipetrain.Pipeline(TwoTower().double(), num_devices=2, schedule="graphpipe",
                              num_microbatches=2, loss_fn=mse)
    try:
        with pytest.raises(ValueError, match="optimizer"):
            next(iter(pipe.train(_batches(1))))
    finally:
        pipe.close()


def test_async_schedule_on_a_graph_model_is_refused():
    with pytest.raises(ValueError, match="asynchronous"):
        pipetrain.Pipeline(TwoTower().double(), num_devices=2, schedule="2bw",
                           num_microbatches=2, loss_fn=mse, optimizer=_sgd)
