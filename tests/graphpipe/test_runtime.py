"""GraphPipe's runtime path: a graph model through Pipeline, both as a DAG ("graphpipe") and
linearized into a chain ("1f1b"), with gradients equal to the unsplit model's (fp64).

Operator costs are fixed (1 ms forward, 2 ms backward per operator, instead of measured) so
the partition -- and so the test -- does not depend on timing noise.
"""

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain.graphpipe import build as build_mod
from pipetrain.graphpipe.capture import CaptureError, capture
from tests.graphpipe.dag_models import D, FourBranch, SharedBranch, Skip, TwoTower, mse

# (model, number of inputs, devices): with these fixed costs each partition is a real DAG
MODELS = {"two_tower": (TwoTower, 2, 4), "skip": (Skip, 1, 4), "four_branch": (FourBranch, 1, 6),
          "shared_branch": (SharedBranch, 2, 4)}


@pytest.fixture(autouse=True)
def fixed_costs(monkeypatch):
    real = build_mod.measure

    def fake(gm, args, repeats=3):
        times, act, batch = real(gm, args, repeats=1)
        return {k: (1e-3, 2e-3) for k in times}, act, batch
    monkeypatch.setattr(build_mod, "measure", fake)


def _data(n_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = tuple(torch.randn(8, D, dtype=torch.float64, generator=g) for _ in range(n_in))
    return xs, torch.randn(8, D, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("checkpoint", ["never", "always", "except_last"])
@pytest.mark.parametrize("schedule", ["graphpipe", "1f1b"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_equal_unsplit(name, schedule, checkpoint):
    cls, n_in, p = MODELS[name]
    torch.manual_seed(1)
    model = cls().double()
    xs, y = _data(n_in)
    ref = mse(model(*xs), y)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pipe = pipetrain.Pipeline(model, num_devices=p, schedule=schedule, num_microbatches=4,
                              loss_fn=mse, checkpoint=checkpoint)
    try:
        loss = pipe.step(xs if n_in > 1 else xs[0], y)
        graph = pipe.plan.graph
        # the chain schedule linearizes the same model; GraphPipe's stages form a DAG
        assert graph.is_chain == (schedule == "1f1b")
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
        for p, r in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)
    finally:
        pipe.close()


def test_each_value_moves_once_along_its_own_edge():
    """TwoTower as a DAG: the image input goes from a source straight to the stage using it,
    and no edge carries a value its destination does not use."""
    torch.manual_seed(0)
    model = TwoTower().double()
    xs, y = _data(2)
    pipe = pipetrain.Pipeline(model, num_devices=4, schedule="graphpipe", num_microbatches=2,
                              loss_fn=mse, example_inputs=tuple(x[:4] for x in xs))
    try:
        b = pipe._graph_model.built
        for k, st in enumerate(b.stages):
            sub = st.layers[0].module
            used = {n.name for n in sub.graph.nodes if n.op == "placeholder" and n.users}
            declared = {n.name for n in sub.graph.nodes if n.op == "placeholder"}
            assert used == declared, f"stage {k} receives values it does not use"
        text = str(pipe.stage_graph)
        assert "edge" in text and "stage 0" in text
        pipe.step(xs, y)
    finally:
        pipe.close()


@pytest.mark.parametrize("m", [1, 3, 8])
def test_dag_1f1b_peak_inflight_equals_formula(m):
    torch.manual_seed(0)
    model = FourBranch().double()
    xs, _ = _data(1)
    pipe = pipetrain.Pipeline(model, num_devices=6, schedule="graphpipe", num_microbatches=m,
                              loss_fn=mse, example_inputs=xs[0][:1])
    try:
        s = pipe.schedule
        g = s.stage_graph
        n = g.num_stages
        succ = [[g.edge(e).dst for e in g.stage(k).outputs] for k in range(n)]
        longest = [0] * n
        for k in reversed(g.topological_order()):
            longest[k] = 1 + max((longest[t] for t in succ[k]), default=0)
        sim = s.simulate(forward=1.0, backward=2.0)
        assert list(sim.peak_inflight) == [min(f, m) for f in longest]
    finally:
        pipe.close()


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        if x.sum() > 0:            # data-dependent: fx cannot trace this
            return self.lin(x)
        return x


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Branchy()
        self.head = nn.Linear(D, D)

    def forward(self, x):
        return self.head(self.inner(x))


def test_untraceable_model_names_the_line_and_the_leaf_fix():
    with pytest.raises(CaptureError, match=r"test_runtime\.py:\d+ `if x.sum\(\) > 0:.*leaf_modules"):
        capture(_Outer())
    gm = capture(_Outer(), leaf_modules=[_Branchy])
    assert [n.op for n in gm.graph.nodes].count("call_module") == 2
    x = torch.randn(3, D)
    model = _Outer()
    torch.testing.assert_close(capture(model, leaf_modules=[_Branchy])(x), model(x))
