"""A hand-written DAG of 4 stages (a fan-out and a fan-in) runs on the CPU executor.

Stage 0 feeds stages 1 and 2 (fan-out: its output goes out on two edges, and its backward
sums the two gradients that come back); stages 1 and 2 feed stage 3 (fan-in: it receives a
tuple in edge order). The engine has no special case for chains, so this runs through the
same Plan / Run / Runner as every Pipeline: each value and each gradient must be delivered
exactly once (the mailbox raises on a second delivery and on a missing one, and counts
them), and the gradients must equal those of the same computation done in one piece.
"""

import pytest
import torch
from torch import nn

from pipetrain import schedules
from pipetrain.plan import Plan
from pipetrain.runner import Runner
from pipetrain.stage import Stage
from tests.models import D, mse

EDGES = [(0, 1), (0, 2), (1, 3), (2, 3)]


class Merge(nn.Module):
    """Stage 3's layer: takes (from stage 1, from stage 2)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, pair):
        left, right = pair
        return self.lin(left + 2.0 * right)


def _layers():
    torch.manual_seed(4)
    return [nn.Linear(D, D), nn.Sequential(nn.Linear(D, D), nn.Tanh()),
            nn.Sequential(nn.Linear(D, D), nn.Sigmoid()), Merge()]


def _unsplit(layers, x):
    h = layers[0](x)
    return layers[3]((layers[1](h), layers[2](h)))


SCHEDULES = {
    "gpipe": ["0F0 0F1 0B0 0B1", "1F0 1F1 1B0 1B1", "2F0 2F1 2B0 2B1", "3F0 3F1 3B0 3B1"],
    # backwards as early as possible, branches 1 and 2 concurrently
    "1f1b": ["0F0 0F1 0B0 0B1", "1F0 1B0 1F1 1B1", "2F0 2B0 2F1 2B1", "3F0 3B0 3F1 3B1"],
    # the two branches share device 1 (stage 2 on device 1 after stage 1)
    "shared": ["0F0 0F1 0B0 0B1", "1F0 2F0 1F1 2F1 2B0 1B0 2B1 1B1", "3F0 3B0 3F1 3B1"],
    "split": ["0F0 0F1 0I0 0I1 0W0 0W1", "1F0 1F1 1I0 1W0 1I1 1W1", "2F0 2F1 2I0 2I1 2W0 2W1",
              "3F0 3I0 3F1 3I1 3W0 3W1"],
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("checkpoint", [False, True])
def test_dag_delivers_every_value_and_gradient_once(name, checkpoint):
    rows = SCHEDULES[name]
    placement = [0, 1, 1, 2] if name == "shared" else [0, 1, 2, 3]
    s = schedules.Schedule.from_actions([r.split() for r in rows], num_stages=4,
                                        num_microbatches=2, edges=EDGES, placement=placement)
    s.validate()
    plan = Plan(s)
    graph = plan.graph
    assert not graph.is_chain
    assert [graph.edge(e).dst for e in graph.stage(0).outputs] == [1, 2]
    assert sorted(graph.edge(e).src for e in graph.stage(3).inputs) == [1, 2]

    layers = [layer.double() for layer in _layers()]
    x = torch.randn(6, D, dtype=torch.float64)
    y = torch.randn(6, D, dtype=torch.float64)
    ref = mse(_unsplit(layers, x), y)
    ref.backward()
    ref_grads = [p.grad.clone() for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.zero_grad()

    # Stage 3's layer takes its inputs in the order of its input edges.
    order = [graph.edge(e).src for e in graph.stage(3).inputs]
    merge = layers[3]
    stage3_layers = [merge] if order == [1, 2] else [_Swap(), merge]
    stages = []
    for k, part in enumerate([[layers[0]], [layers[1]], [layers[2]], stage3_layers]):
        info = graph.stage(k)
        stages.append(Stage(k, part, inputs=info.inputs, outputs=info.outputs,
                            loss_fn=None if info.outputs else mse, input_grad=bool(info.inputs),
                            checkpoint=checkpoint))
    runner = Runner(graph.num_devices, [torch.device("cpu")] * graph.num_devices,
                    [(e.id, e.src, e.dst) for e in graph.edges],
                    [graph.stage(k).device for k in range(4)], timeout=30.0)
    try:
        outcome = runner.execute(plan, stages, [(x, y)])
    finally:
        runner.close()
    run = outcome.run
    # Every edge carried one value and one gradient per micro-batch, each taken once.
    assert run.mailbox.puts == run.mailbox.takes == 2 * len(EDGES) * 2
    assert len(run.mailbox) == 0
    loss = run.losses_per_minibatch()[0]
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    grads = [p.grad for layer in layers for p in layer.parameters()]
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


class _Swap(nn.Module):
    def forward(self, pair):
        return pair[1], pair[0]


def test_a_missing_delivery_is_named():
    """A schedule whose stage 3 lacks one input is rejected before running (validator);
    the mailbox names the edge if a value is taken that nobody posted."""
    from pipetrain.mailbox import GRAD, Mailbox, MailboxError
    box = Mailbox({2: "1->3"})
    box.put(GRAD, 2, 0, "g")
    with pytest.raises(MailboxError, match=r"grad of edge 2 \(1->3\), micro-batch 0 was delivered twice"):
        box.put(GRAD, 2, 0, "g")
    assert box.take(GRAD, 2, 0) == "g"
    with pytest.raises(MailboxError, match="micro-batch 0 was never delivered"):
        box.take(GRAD, 2, 0)
