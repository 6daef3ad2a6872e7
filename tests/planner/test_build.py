"""TrainingPlan.pipeline(): asynchronous schedules, data-parallel width (one process and gloo
ranks), against the reference trainer and the unsplit model."""

import copy

import pytest
import torch
from torch import nn

import pipetrain
from pipetrain import async_reference as ref
from pipetrain.planner import Affine, CostTable
from tests.distributed.pool import module_pool

FN = nn.functional.mse_loss


def _model(n=2, d=6):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)]).double()


def _batches(T, n=8, d=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, d, generator=g).double(), torch.randn(n, d, generator=g).double())
            for _ in range(T)]


def _table(n=2):
    """Layers of equal cost: the deeper pipeline wins, and without a flush 2bw beats 1f1b."""
    a = Affine(1e-4, 1e-4)
    return CostTable(forward=[a] * n, backward=[a + a] * n, weight=[a] * n,
                     activation=[Affine(0, 100)] * n, input_bytes=[Affine(0, 48)] * n,
                     param_bytes=[200.0] * n)


def _sgd(ps):
    return torch.optim.SGD(ps, lr=0.1)


def test_async_rows_are_runnable_and_chosen_only_when_allowed():
    model, (x, y) = _model(), _batches(1)[0]
    kw = dict(sample=(x, y), loss_fn=FN, devices=2, widths=[1], memory_per_device="1GB",
              batch_size=8, costs=_table())
    sync = pipetrain.plan(model, **kw)
    assert not sync.best.model.asynchronous
    assert all(not c.model.asynchronous for c in sync.candidates)
    both = pipetrain.plan(model, allow_async=True, **kw)
    assert both.schedule in ("2bw", "2bw-predict", "pipedream")   # no flush: faster
    assert both.step_time < sync.step_time
    with pytest.raises(ValueError, match="allow_async"):
        pipetrain.plan(model, schedules=["2bw"], **kw)


def test_async_plan_builds_a_2bw_pipeline_that_trains_like_the_reference():
    model = _model()
    twin = copy.deepcopy(model)
    batches = _batches(4)
    plan = pipetrain.plan(model, sample=batches[0], loss_fn=FN, devices=2, widths=[1],
                          memory_per_device="1GB", batch_size=8, schedules=["2bw"],
                          allow_async=True, optimizer=_sgd, costs=_table(),
                          micro_batch_sizes=[4])
    assert (plan.schedule, plan.depth, plan.num_microbatches) == ("2bw", 2, 2)
    r_losses, r_weights = ref.reference_train(list(twin), batches, schedule="2bw",
                                              num_microbatches=2, loss_fn=FN,
                                              optimizer_factory=_sgd)
    pipe = plan.pipeline(num_threads=1)
    try:
        losses = [float(v) for v in pipe.train(batches)]
    finally:
        pipe.close()
    assert losses == pytest.approx(r_losses, abs=1e-9)
    for r in range(2):
        for k, w in r_weights[r].items():
            assert torch.allclose(model[r].state_dict()[k], w, rtol=0, atol=1e-9), (r, k)


def test_async_plan_without_an_optimizer_says_so():
    plan = pipetrain.plan(_model(), sample=_batches(1)[0], loss_fn=FN, devices=2, widths=[1],
                          memory_per_device="1GB", batch_size=8, schedules=["2bw"],
                          allow_async=True, costs=_table())
    with pytest.raises(ValueError, match="asynchronous.*optimizer"):
        plan.pipeline()
    plan.pipeline(optimizer=_sgd, num_threads=1).close()    # given here instead: builds


def test_width_in_one_process_raises_unless_one_replica():
    model, (x, y) = _model(), _batches(1)[0]
    plan = pipetrain.plan(model, sample=(x, y), loss_fn=FN, devices=2, widths=[2],
                          memory_per_device="1GB", batch_size=8, costs=_table(),
                          micro_batch_sizes=[2])
    assert (plan.width, plan.depth, plan.num_microbatches) == (2, 1, 2)
    with pytest.raises(ValueError, match="torchrun with 2 processes.*one_replica"):
        plan.pipeline()
    twin = copy.deepcopy(model)
    pipe = plan.pipeline(one_replica=True, num_threads=1)
    try:
        assert pipe.num_devices == 1 and pipe.num_microbatches == 2
        pipe.step(x[:4], y[:4])                       # one replica's share: B / w samples
    finally:
        pipe.close()
    FN(twin(x[:4]), y[:4]).backward()
    for q, q_ref in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(q.grad, q_ref.grad, rtol=1e-10, atol=1e-12)


pool = module_pool(2)


def test_data_parallel_plan_on_a_device_mesh_under_gloo(pool):
    # A (dp=2, pp=1) DeviceMesh fixes w = 2, p = 1; each rank builds its replica, the replicas'
    # averaged gradients equal the unsplit model's on the whole batch, and both ranks use rank
    # 0's micro-batch size although rank 1 planned another.
    res = pool.run("tests.planner.plan_ranks", "data_parallel_plan", 2, mesh_shape=(2, 1))
    for w, p, m, err in res:
        assert (w, p, m) == (2, 1, 2)       # rank 0: b = 2, so m = (8 / 2) / 2
        assert err < 1e-10                  # fp64
