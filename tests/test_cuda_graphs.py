"""Graph capture of F/B/I/W (``Pipeline(cuda_graphs=...)``): its bookkeeping with the CPU fake
backend, the executor's graph-launch path with CPU host graphs, and (CUDA only, skipped
here) the real thing.

The fake backend re-runs the captured Python on each replay, so float64 gradients must equal
the unsplit model's to 1e-10 — and in native runs only the links between static buffers
carry values between stages: a missing link gives wrong gradients, not a small error.
"""

import pytest
import torch
from torch import nn

from pipetrain import Pipeline, PipelineError, _C
from pipetrain.cuda_graphs import FakeGraphBackend, GraphedStage
from pipetrain.executor import Executor
from tests.models import assert_grads, batch, mlp, mse, reference

SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2"]


def make(schedule="1f1b", m=4, model=None, **kw):
    model = model if model is not None else mlp(4)
    fake = FakeGraphBackend()
    pipe = Pipeline(model, num_devices=2, schedule=schedule, num_microbatches=m, loss_fn=mse,
                    cuda_graphs=fake, **kw)
    return model, pipe, fake


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_grads_equal_unsplit_model_python_then_native(schedule):
    model, pipe, fake = make(schedule)
    x, y = batch(8)
    ref_loss, ref = reference(model, x, y)
    for _ in range(3):
        model.zero_grad()
        torch.testing.assert_close(pipe.step(x, y), ref_loss, rtol=1e-10, atol=0)
        assert_grads(model, ref)
    # Step 1 captures (Python mode); steps 2 and 3 run the captured graphs only.
    assert (pipe.graphs.python_runs, pipe.graphs.native_runs) == (1, 2)
    pipe.close()


@pytest.mark.parametrize("schedule, kinds", [("1f1b", "FB"), ("zb-h1", "FIW")])
def test_each_action_captured_once_per_stage_and_microbatch(schedule, kinds):
    model, pipe, fake = make(schedule, m=4)
    x, y = batch(8)
    for _ in range(3):
        pipe.step(x, y)
    stages = pipe.num_stages
    assert fake.captures == {k: stages * 4 for k in kinds}
    assert fake.replays == {k: 3 * stages * 4 for k in kinds}      # capture, then replay
    for st in pipe.stages:
        assert sorted(st.slots) == [0, 1, 2, 3]
        assert all(sorted(slot.graphs) == sorted(kinds) for slot in st.slots.values())
    pipe.close()


def test_static_buffers_linked_and_reused():
    model, pipe, fake = make("zb-h1", m=2)
    x, y = batch(8)
    pipe.step(x, y)
    first, second = pipe.stages
    before = {(s.index, mb, name): getattr(slot, name)[i].data_ptr()
              for s in pipe.stages for mb, slot in s.slots.items()
              for name in ("x", "y", "go", "gx") for i in range(len(getattr(slot, name)))
              if isinstance(getattr(slot, name)[i], torch.Tensor)}
    acc = {id(t): t.data_ptr() for t in first._acc.values()}
    for _ in range(2):
        pipe.step(x, y)
    after = {(s.index, mb, name): getattr(slot, name)[i].data_ptr()
             for s in pipe.stages for mb, slot in s.slots.items()
             for name in ("x", "y", "go", "gx") for i in range(len(getattr(slot, name)))
             if isinstance(getattr(slot, name)[i], torch.Tensor)}
    assert after == before
    assert {id(t): t.data_ptr() for t in first._acc.values()} == acc
    for mb in (0, 1):
        # The consumer reads the producer's static output, and the producer's output
        # gradient is the consumer's static input gradient: the same storage, no copies.
        assert second.slots[mb].x[0].data_ptr() == first.slots[mb].y[0].data_ptr()
        assert first.slots[mb].go[0].data_ptr() == second.slots[mb].gx[0].data_ptr()
        assert second.slots[mb].linked_in and first.slots[mb].linked_go
    pipe.close()


def test_shape_change_recaptures_and_stays_exact():
    model, pipe, fake = make("1f1b", m=2)
    for n in (8, 8, 12, 12, 8):
        x, y = batch(n)
        ref_loss, ref = reference(model, x, y)
        model.zero_grad()
        torch.testing.assert_close(pipe.step(x, y), ref_loss, rtol=1e-10, atol=0)
        assert_grads(model, ref)
    # Captures at steps 1, 3 and 5 (each shape change replaces the slot's graphs).
    assert fake.captures == {"F": 3 * 4, "B": 3 * 4}
    assert (pipe.graphs.python_runs, pipe.graphs.native_runs) == (3, 2)
    pipe.close()


def test_freezing_recaptures():
    model, pipe, fake = make("1f1b", m=2)
    x, y = batch(8)
    pipe.step(x, y)
    model[0][0].weight.requires_grad_(False)
    ref_loss, ref = reference(model, x, y)
    model.zero_grad()
    pipe.step(x, y)
    assert model[0][0].weight.grad is None
    assert_grads(model, ref)
    assert fake.captures["F"] == 2 * 2 + 2      # stage 0 again (it holds the frozen weight)
    pipe.close()


@pytest.mark.parametrize("loss_scale", [1024.0, "dynamic"])
def test_loss_scaling(loss_scale):
    """The sink's loss times the scale is captured (a new scale recaptures); the scaler
    checks and unscales the graphs' accumulators before they are committed."""
    model, pipe, fake = make("zb-h1", m=2, loss_scale=loss_scale)
    x, y = batch(8)
    ref_loss, ref = reference(model, x, y)
    for _ in range(3):
        model.zero_grad()
        torch.testing.assert_close(pipe.step(x, y), ref_loss, rtol=1e-10, atol=0)
        assert_grads(model, ref)
    pipe.close()


def test_failed_step_commits_nothing_and_next_step_is_exact():
    model, pipe, fake = make("1f1b", m=2, check_finite=True)
    x, y = batch(8)
    pipe.step(x, y)
    pipe.step(x, y)                             # native from here
    before = [p.grad.clone() for p in model.parameters()]
    bad = y.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(PipelineError):
        pipe.step(x, bad)
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    ref_loss, ref = reference(model, x, y)
    model.zero_grad()
    torch.testing.assert_close(pipe.step(x, y), ref_loss, rtol=1e-10, atol=0)
    assert_grads(model, ref)
    pipe.close()


class DataDependent(nn.Module):
    """Keeps the rows whose first feature is positive (how many depends on the data)."""

    def forward(self, x):
        return x[x[:, 0] > 0]


def test_data_dependent_shapes_are_an_error_naming_stage_and_action():
    """The fake sees the output shape change under the same input shape; CUDA capture itself
    fails on the host synchronization such a layer needs."""
    torch.manual_seed(0)
    model = nn.Sequential(DataDependent(), nn.Linear(6, 6), nn.Linear(6, 6)).double()
    _, pipe, _ = make("1f1b", m=1, model=model, balance=[2, 1])
    x, y = batch(2)
    x[0, 0], x[1, 0] = 1.0, -1.0          # one row kept
    pipe.step(x, y)
    x[1, 0] = 1.0                         # two rows kept: same input shape, other output shape
    with pytest.raises(PipelineError, match=r"stage 0, micro-batch 0, action F.*data-dependent shapes"):
        pipe.step(x, y)
    pipe.close()


@pytest.mark.parametrize("kw, match", [
    (dict(checkpoint="always"), "re-materialization"),
    (dict(schedule="2bw"), "asynchronous schedule"),
    (dict(compile=True), "compile= and cuda_graphs=True together"),
])
def test_combinations_that_cannot_work(kw, match):
    kw.setdefault("schedule", "1f1b")
    with pytest.raises(ValueError, match=match):
        Pipeline(mlp(4), num_devices=2, num_microbatches=2, loss_fn=mse,
                 cuda_graphs=FakeGraphBackend(), optimizer=lambda ps: torch.optim.SGD(ps, 0.1)
                 if kw["schedule"] == "2bw" else None, **kw)


def test_bad_values():
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        Pipeline(mlp(4), num_devices=2, loss_fn=mse, cuda_graphs="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA devices"):
            Pipeline(mlp(4), num_devices=2, loss_fn=mse, cuda_graphs=True)


def test_stages_are_graphed_stages():
    _, pipe, _ = make()
    assert all(type(st) is GraphedStage for st in pipe.stages)
    pipe.close()


# -- the executor's launch path ---------------------------------------------------------
def test_executor_launches_graphs_without_the_gil():
    ex = Executor(2)
    graphs = _C.runtime.HostGraphs(3)
    calls = []
    plan = [[("0F0", []), ("0F1", [])], [("1F0", [(0, 0)]), ("1F1", [(0, 1)])]]
    ex.run(plan, lambda d, i: calls.append((d, i)),
           graphs=[[graphs.handle(0), 0], [graphs.handle(1), graphs.handle(2)]])
    assert calls == [(0, 1)]                     # only the action without a graph
    assert graphs.counts() == [1, 1, 1]
    assert graphs.launched_with_gil == 0
    with pytest.raises(ValueError, match="device 1 has 2 actions, 1 handles"):
        ex.run(plan, lambda d, i: None, graphs=[[0, 0], [0]])
    ex.close()


# -- CUDA (skipped without a GPU; run by python -m bench --gpu-check) ----------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_cuda_graphs_on_gpu(schedule):
    """Two pipeline devices on one GPU (same-device links): eager vs captured, float32. The
    captured kernels are eager's, so the tolerance only covers cuBLAS choosing other
    algorithms under capture (1e-5 relative)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4)]).cuda()
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 64, device="cuda")
    ref_loss, ref = reference(model, x, y)
    pipe = Pipeline(model, num_devices=2, schedule=schedule, num_microbatches=4, loss_fn=mse,
                    devices=["cuda:0", "cuda:0"], cuda_graphs=True)
    for _ in range(3):
        model.zero_grad()
        torch.testing.assert_close(pipe.step(x, y), ref_loss, rtol=1e-5, atol=1e-6)
        assert_grads(model, ref, rtol=1e-5, atol=1e-6)
    assert pipe.graphs.native_runs == 2
    pipe.close()


def test_backend_that_clears_on_recapture_gets_a_new_pool_per_stage():
    """CUDA's policy (GraphBackend.clear_on_recapture), with the fake: a stage whose forward
    signature changes drops all its slots and takes a fresh memory pool."""
    class Clearing(FakeGraphBackend):
        clear_on_recapture = True
        pools = 0

        def pool(self, device):
            Clearing.pools += 1
            return Clearing.pools

    model = mlp(4)
    backend = Clearing()
    pipe = Pipeline(model, num_devices=2, num_microbatches=2, loss_fn=mse, cuda_graphs=backend)
    assert Clearing.pools == 2                      # one per stage
    for n in (8, 12):
        x, y = batch(n)
        ref_loss, ref = reference(model, x, y)
        model.zero_grad()
        torch.testing.assert_close(pipe.step(x, y), ref_loss, rtol=1e-10, atol=0)
        assert_grads(model, ref)
    assert Clearing.pools == 4 and [st._pool for st in pipe.stages] == [3, 4]
    assert backend.captures["F"] == 2 * 4
    pipe.close()
