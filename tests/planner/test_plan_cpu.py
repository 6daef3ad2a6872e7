"""pipetrain.plan on a real model: measured costs, the Pipeline it builds, memory that fits."""

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain.planner import measure_costs
from pipetrain.planner.search import evaluate
from pipetrain.planner import Network
from pipetrain.planner.memory import stage_ranges


def _model(n=6, d=64):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)])


def _sample(n=32, d=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_measured_bytes_are_what_the_pipeline_stashes():
    model, (x, y) = _model(), _sample()
    table = measure_costs(model, (x, y), nn.functional.mse_loss, sizes=[4, 8], repeats=1,
                          calibrate=False)
    # Linear saves its input, Tanh its output: 4 b d bytes each (fp32).
    assert table.input_bytes[0](8) == pytest.approx(8 * 64 * 4)
    assert table.param_bytes[0] == (64 * 64 + 64) * 4
    for sched, p, b, rc in [("1f1b", 2, 4, False), ("gpipe", 3, 8, False),
                            ("zb-h1", 2, 8, False), ("1f1b", 2, 4, True)]:
        m = 32 // b
        c = evaluate(table, Network(), p=p, b=b, m=m, schedule=sched, recompute=rc)
        pipe = pipetrain.Pipeline(model, p, schedule=sched, num_microbatches=m, balance=c.balance,
                                  loss_fn=nn.functional.mse_loss, num_threads=1,
                                  checkpoint="always" if rc else "never")
        # Two steps: a stage's first forward runs on a copy of its input (to detect in-place
        # layers, pipetrain.stage), which the first step's meter counts once more.
        pipe.step(x, y)
        pipe.step(x, y)
        measured = pipe.stats().peak_stash_bytes
        pipe.close()
        predicted = [mem.activations for mem in c.memory]
        assert max(predicted) == pytest.approx(max(measured), rel=0.10), (sched, p, b, rc)
        assert all(pr >= me for pr, me in zip(predicted, measured))   # predicted-fit fits
    for prm in model.parameters():
        prm.grad = None


def test_plan_builds_a_pipeline_that_fits():
    model, (x, y) = _model(), _sample()
    limit = 140_000   # bytes: forces a deep pipeline or small micro-batches
    plan = pipetrain.plan(model, sample=(x, y), loss_fn=nn.functional.mse_loss, devices=3,
                          memory_per_device=limit, batch_size=32, measure_sizes=[4, 8],
                          repeats=1)
    text = str(plan)
    assert "chosen:" in text and "runner-ups" in text and "samples/s" in text
    assert plan.step_time > 0 and plan.samples_per_s == pytest.approx(32 / plan.step_time)
    assert plan.peak_memory <= limit
    pipe = plan.pipeline(num_threads=1)
    assert pipe.num_devices == plan.depth and pipe.balance == plan.balance
    pipe.step(x, y)
    pipe.step(x, y)   # the second step: see above
    st = pipe.stats()
    params = [0] * pipe.num_devices
    for k, stage in enumerate(pipe.stages):
        params[k % pipe.num_devices] += sum(q.nbytes for q in stage.parameters())
    measured = max(2 * pr + s for pr, s in zip(params, st.peak_stash_bytes))   # weights + grads
    assert measured <= plan.peak_memory <= limit
    pipe.close()


def test_plan_from_a_table_has_no_pipeline():
    table = pipetrain.planner.CostTable.transformer(8, 256, 128, 4, vocab=1000)
    plan = pipetrain.plan(table, devices=4, memory_per_device="1GB", batch_size=16)
    with pytest.raises(ValueError, match="cost table"):
        plan.pipeline()


def test_interleaved_memory_from_the_order_is_what_the_pipeline_stashes():
    # Unequal chunks on one device (2 layers and 1 layer): inflight x the largest chunk's
    # stash over-counts; walking the order counts each chunk's own bytes.
    model, (x, y) = _model(6), _sample()
    table = measure_costs(model, (x, y), nn.functional.mse_loss, sizes=[4, 8], repeats=1,
                          calibrate=False)
    balance = [2, 1, 2, 1]
    c = evaluate(table, Network(), p=2, b=4, m=8, schedule="interleaved-1f1b", v=2,
                 balance=balance)
    upper = [c.model.peak_inflight(2, 8, 2)[d] * max(table.stash(f, l, 4)
             for k, (f, l) in enumerate(stage_ranges(balance)) if k % 2 == d)
             for d in range(2)]
    pipe = pipetrain.Pipeline(model, 2, schedule="interleaved-1f1b", num_chunks=2,
                              num_microbatches=8, balance=balance,
                              loss_fn=nn.functional.mse_loss, num_threads=1)
    try:
        pipe.step(x, y)
        pipe.step(x, y)   # the second step: see above
        measured = pipe.stats().peak_stash_bytes
    finally:
        pipe.close()
    predicted = [mem.activations for mem in c.memory]
    assert max(predicted) == pytest.approx(max(measured), rel=0.10)
    assert all(pr >= me for pr, me in zip(predicted, measured))
    assert all(pr <= up for pr, up in zip(predicted, upper))
    assert any(pr < up for pr, up in zip(predicted, upper))     # the bound over-counted
    assert all(pr == pytest.approx(me, rel=0.10) for pr, me in zip(predicted, measured))
    for prm in model.parameters():
        prm.grad = None
