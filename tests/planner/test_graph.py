"""The planner on a multi-branch model: graphpipe on the partitioner's stage DAG next to the
chain linearizations, against closed forms; plan.pipeline() builds it and matches the unsplit
model's gradients."""

import copy

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain.graphpipe.capture import capture

F, BWD = 3e-3, 6e-3     # seconds per sample of each tower's (and the head's) F / B


class TwoTower(nn.Module):
    """Two towers on two inputs, concatenated into a head: three operators of equal cost (the
    partitioner cannot split them), so three devices hold a | b -> head, a DAG of depth 2."""

    def __init__(self, d=6):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.head = nn.Linear(2 * d, d)

    def forward(self, x, z):
        return self.head(torch.cat([self.a(x), self.b(z)], -1))


def _times(model):
    """Towers and head cost F / BWD per sample; the concatenation is free."""
    gm = capture(model)
    return {n.name: ((F, BWD) if n.op == "call_module" else (0.0, 0.0))
            for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")}


def _data(n=2, d=6):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(n, d, generator=g).double(), torch.randn(n, d, generator=g).double()), \
        torch.randn(n, d, generator=g).double()


def test_graphpipe_beats_the_chain_on_two_towers_by_the_closed_forms():
    torch.manual_seed(0)
    model = TwoTower().double()
    xs, y = _data()
    plan = pipetrain.plan(model, sample=(xs, y), loss_fn=nn.functional.mse_loss, devices=3,
                          memory_per_device="1GB", batch_size=2, micro_batch_sizes=[1],
                          op_times=_times(model), recompute=(False,),
                          schedules=["graphpipe", "1f1b"])
    # graphpipe, p = 3: a | b -> head, DAG depth d = 2. DAG 1F1B with m = 2 micro-batches
    # of 9 ms stages (F 3 + B 6): (m + d - 1) (F + B) = 27 ms (a: F0 F1 [0, 6], head: F0 B0
    # F1 B1 [3, 21], a: B0 [12, 18], B1 [21, 27]).
    assert plan.schedule == "graphpipe" and plan.depth == 3
    assert plan.step_time == pytest.approx(3 * (F + BWD), rel=1e-9)
    # The chain a -> b -> head: 1F1B's (m + p - 1) (F + B) = 36 ms.
    chain = {c.label(): c.step_time for c in plan.candidates if c.schedule != "graphpipe"}
    assert chain["p=3 w=1 b=1 m=2 1f1b"] == pytest.approx(4 * (F + BWD), rel=1e-9)
    assert "graphpipe" in str(plan)


def test_graph_plan_builds_the_graphpipe_pipeline_with_exact_gradients():
    torch.manual_seed(0)
    model = TwoTower().double()
    twin = copy.deepcopy(model)
    xs, y = _data(4)
    plan = pipetrain.plan(model, sample=(xs, y), loss_fn=nn.functional.mse_loss, devices=3,
                          memory_per_device="1GB", batch_size=4, micro_batch_sizes=[2],
                          op_times=_times(model), schedules=["graphpipe"])
    pipe = plan.pipeline(num_threads=1)
    try:
        pipe.step(xs, y)
        assert pipe.schedule.name == "graphpipe" and pipe.num_devices == plan.depth
        assert pipe.num_microbatches == 2
    finally:
        pipe.close()
    nn.functional.mse_loss(twin(*xs), y).backward()
    for q, q_ref in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(q.grad, q_ref.grad, rtol=1e-10, atol=1e-12)


def test_graphpipe_needs_a_graph_model():
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="graphpipe.*multi-branch"):
        pipetrain.plan(seq, sample=(torch.randn(4, 4), torch.randn(4, 4)),
                       loss_fn=nn.functional.mse_loss, devices=2, memory_per_device="1GB",
                       batch_size=4, schedules=["graphpipe"])


def test_graph_plan_passes_the_optimizer_on():
    torch.manual_seed(0)
    model = TwoTower().double()
    twin = copy.deepcopy(model)
    xs, y = _data(4)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)   # noqa: E731
    plan = pipetrain.plan(model, sample=(xs, y), loss_fn=nn.functional.mse_loss, devices=3,
                          memory_per_device="1GB", batch_size=4, micro_batch_sizes=[2],
                          op_times=_times(model), schedules=["graphpipe"], optimizer=sgd)
    pipe = plan.pipeline(num_threads=1)
    try:
        list(pipe.train([(xs, y)]))
    finally:
        pipe.close()
    opt = sgd(twin.parameters())
    nn.functional.mse_loss(twin(*xs), y).backward()
    opt.step()
    for q, q_ref in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(q, q_ref, rtol=1e-10, atol=1e-12)
