"""Dispatch (pipetrain.dispatch): the per-plan action table and the step's shortcuts give what
the unsplit model gives, also when the batch changes between steps that reuse the table."""

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain import dispatch


def _layers(seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(6, 6), nn.GELU()).double() for _ in range(4)]


def _unsplit_grads(layers, x, y):
    model = nn.Sequential(*layers)
    for p in model.parameters():
        p.grad = None
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_action_table_is_read_once_per_plan_and_matches_the_ir():
    pipe = pipetrain.Pipeline(_layers(), 2, schedule="zb-h1", num_microbatches=4,
                              loss_fn=nn.functional.mse_loss)
    try:
        plan = pipe.plan
        table = dispatch.action_table(plan)
        assert dispatch.action_table(plan) is table        # cached on the plan
        for row, trow in zip(plan.actions, table):
            assert [(str(a.kind), a.stage, a.microbatch, a.version) for a in row] == \
                [t[:4] for t in trow]
            assert all(t[4] is a for a, t in zip(row, trow))
    finally:
        pipe.close()


def test_edge_table_is_kept_per_transports_and_matches_the_graph():
    pipe = pipetrain.Pipeline(_layers(), 2, schedule="1f1b", num_microbatches=4,
                              loss_fn=nn.functional.mse_loss)
    try:
        plan, transports = pipe.plan, pipe.runner.transports
        out, ins = dispatch.edge_table(plan, transports)
        assert dispatch.edge_table(plan, transports)[0] is out        # cached on the plan
        graph = plan.graph
        dev = [graph.stage(s).device for s in range(graph.num_stages)]
        for s in range(graph.num_stages):
            assert [(e, transports[e], dev[s], dev[graph.edge(e).dst])
                    for e in graph.stage(s).outputs] == out[s]
            assert [(e, transports[e], dev[graph.edge(e).src], dev[s])
                    for e in graph.stage(s).inputs] == ins[s]
        assert sum(map(len, out)) == sum(map(len, ins)) == len(graph.edges) > 0
        # Other transports (a replaced executor): a new table, with those transports.
        other = dict(transports)
        out2, _ = dispatch.edge_table(plan, other)
        assert out2 is not out and out2 == out
    finally:
        pipe.close()


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_a_different_batch_size_after_cached_steps_gives_the_unsplit_gradients(schedule):
    """Steps reuse the plan's action table and each stage's per-run caches (saved-bytes
    signature, the dense gradient list): a later step with another batch size (so other
    micro-batch shapes, and uneven ones) must still give the unsplit model's loss and
    gradients exactly (fp64: 1e-10)."""
    layers = _layers()
    ref_layers = _layers()
    pipe = pipetrain.Pipeline(layers, 2, schedule=schedule, num_microbatches=4,
                              loss_fn=nn.functional.mse_loss)
    params = [p for layer in layers for p in layer.parameters()]
    try:
        for n in (8, 8, 13, 4, 8):          # 13: uneven micro-batches (4, 3, 3, 3)
            x = torch.randn(n, 6, dtype=torch.float64)
            y = torch.randn(n, 6, dtype=torch.float64)
            for p in params:
                p.grad = None
            loss = pipe.step(x, y)
            want_loss, want = _unsplit_grads(ref_layers, x, y)
            torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
            for p, g in zip(params, want):
                torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    finally:
        pipe.close()


def test_step_loss_is_the_size_weighted_mean_of_micro_batch_losses():
    """losses_per_minibatch (one weighted reduction) against the closed form: the per-sample
    mean of an uneven split equals the full-batch mean."""
    layers = _layers()
    pipe = pipetrain.Pipeline(layers, 1, schedule="gpipe", num_microbatches=3,
                              loss_fn=nn.functional.mse_loss)
    try:
        x, y = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
        loss = pipe.step(x, y)
        want = nn.functional.mse_loss(nn.Sequential(*layers)(x), y)
        assert loss.dtype == torch.float64 and loss.dim() == 0 and not loss.requires_grad
        torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0)
    finally:
        pipe.close()


class _ThreadProbe(nn.Module):
    """Identity that records torch's intra-op thread count on the thread running it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        return x


def test_borrowed_threads_follow_who_is_busy_and_keep_gradients(monkeypatch):
    """BORROW_THREADS: an action takes num_threads * p // (devices inside an action) intra-op
    threads. The first forward of stage 0 runs while device 1 can only wait for it, so it
    has both devices' threads; the counts stay within [num_threads, num_threads * p]; and the
    gradients are the unsplit model's (fp64)."""
    monkeypatch.setattr(dispatch, "BORROW_THREADS", True)
    layers, ref = _layers(), _layers()
    probe = _ThreadProbe()
    pipe = pipetrain.Pipeline([probe] + layers, 2, schedule="1f1b", num_microbatches=4,
                              loss_fn=nn.functional.mse_loss, num_threads=1, balance=[3, 2])
    params = [p for layer in layers for p in layer.parameters()]
    try:
        x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
        loss = pipe.step(x, y)
        want_loss, want = _unsplit_grads(ref, x, y)
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
        for p, g in zip(params, want):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
        assert probe.seen[0] == 2
        assert set(probe.seen) <= {1, 2}
    finally:
        pipe.close()
    # without the switch: every action keeps num_threads
    monkeypatch.setattr(dispatch, "BORROW_THREADS", False)
    probe.seen.clear()
    pipe = pipetrain.Pipeline([probe] + _layers(), 2, schedule="1f1b", num_microbatches=4,
                              loss_fn=nn.functional.mse_loss, num_threads=1, balance=[3, 2])
    try:
        pipe.step(torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64))
        assert set(probe.seen) == {1}
    finally:
        pipe.close()


def test_step_records_from_the_action_table_match_the_ir():
    """stats read each action's kind / stage / micro-batch from the run's table (tuples):
    the records must be those of the IR actions, and timeline.records takes both forms."""
    pipe = pipetrain.Pipeline(_layers(), 2, schedule="zb-h1", num_microbatches=4,
                              loss_fn=nn.functional.mse_loss)
    try:
        pipe.step(torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64))
        got = [[(r.kind, r.stage, r.microbatch) for r in row] for row in pipe.stats().records]
        want = [[(str(a.kind), a.stage, a.microbatch) for a in row] for row in pipe.plan.actions]
        assert got == want
        assert all(r.end_ns >= r.start_ns >= 0 for row in pipe.stats().records for r in row)
    finally:
        pipe.close()
