"""Checkpoints in one process (pipetrain.checkpointing): optimizer hyper-parameters (param_groups,
LR-scheduler fields) travel with the state and map onto another split; the loss scaler's state
too. Multi-process save / load / kill-and-restart: tests/distributed/."""

import pytest
import torch

import pipetrain
from tests.models import batch, mlp, mse


def _groups(model, lr, wd):
    """A decay group (weights) and a no-decay group (biases), as LM recipes do."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "weight_decay": wd}, {"params": biases, "weight_decay": 0.0}], lr


def _train(pipe, opt, sched, steps, start):
    losses = []
    for s in range(start, start + steps):
        opt.zero_grad()
        x, y = batch(8, seed=s)
        losses.append(pipe.step(x, y))
        opt.step()
        sched.step()
    return losses


@pytest.mark.parametrize("p_load", [2, 3])
def test_param_groups_and_scheduler_fields_restored_on_any_split(tmp_path, p_load):
    net = mlp(6)
    pipe = pipetrain.Pipeline(net, num_devices=2, num_microbatches=4, loss_fn=mse)
    groups, lr = _groups(net, 0.02, 0.1)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.8, 0.95), eps=1e-7)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(pipe, opt, sched, 2, 0)
    pipetrain.save_checkpoint(pipe, tmp_path / "c", opt)
    expected = _train(pipe, opt, sched, 2, 2)
    saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    pipe.close()

    net2 = mlp(6, seed=5)                                   # other weights ...
    pipe2 = pipetrain.Pipeline(net2, num_devices=p_load, num_microbatches=4, loss_fn=mse)
    groups2, _ = _groups(net2, 1.0, 0.3)
    opt2 = torch.optim.AdamW(groups2, lr=1.0)               # ... other hyper-parameters
    pipetrain.load_checkpoint(pipe2, tmp_path / "c", opt2)
    # What the checkpoint held: lr after two scheduler halvings, initial_lr from the scheduler.
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.02 / 4, rel=0, abs=0)
    assert opt2.param_groups[0]["initial_lr"] == 0.02
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["eps"] == 1e-7
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.1, 0.0]
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    sched2.load_state_dict(sched.state_dict() | {"last_epoch": 2})
    got = _train(pipe2, opt2, sched2, 2, 2)
    if p_load == 2:
        assert [float(v) for v in got] == [float(v) for v in expected]     # bit for bit
    else:
        # Another split sums micro-batch gradients in the same order; fp64 rounding at most.
        assert [float(v) for v in got] == pytest.approx([float(v) for v in expected], abs=1e-12)
    for g, s in zip(opt2.param_groups, saved_groups):
        assert g["lr"] == s["lr"]
    pipe2.close()


def test_groups_merged_with_different_values_is_a_clear_error(tmp_path):
    net = mlp(4)
    pipe = pipetrain.Pipeline(net, num_devices=2, num_microbatches=2, loss_fn=mse)
    groups, lr = _groups(net, 0.01, 0.1)
    opt = torch.optim.SGD(groups, lr=lr)
    x, y = batch(4)
    pipe.step(x, y)
    opt.step()
    pipetrain.save_checkpoint(pipe, tmp_path / "c", opt)
    merged = torch.optim.SGD(net.parameters(), lr=0.5)       # one group holding both kinds
    with pytest.raises(ValueError, match="weight_decay"):
        pipetrain.load_checkpoint(pipe, tmp_path / "c", merged)
    pipe.close()


def test_stage_optimizers_and_loss_scaler_round_trip(tmp_path):
    net = mlp(4)
    pipe = pipetrain.Pipeline(net, num_devices=2, schedule="gpipe", num_microbatches=2,
                              loss_fn=mse, loss_scale=pipetrain.LossScaler(growth_interval=3),
                              optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    x, y = batch(4)
    list(pipe.train([(x, y)] * 4))      # a growth after 3 clean steps, then one more
    assert (pipe.loss_scale, pipe.scaler.growth_tracker) == (2.0 ** 17, 1)
    pipetrain.save_checkpoint(pipe, tmp_path / "c")          # the stages' optimizers by default
    after = [float(v) for v in pipe.train([(x, y)] * 2)]
    pipe.close()

    net2 = mlp(4, seed=9)
    pipe2 = pipetrain.Pipeline(net2, num_devices=2, schedule="gpipe", num_microbatches=2,
                               loss_fn=mse, loss_scale="dynamic",
                               optimizer=lambda ps: torch.optim.SGD(ps, lr=3.0))
    pipetrain.load_checkpoint(pipe2, tmp_path / "c")
    assert (pipe2.loss_scale, pipe2.scaler.growth_tracker) == (2.0 ** 17, 1)
    for st in pipe2.stages:
        assert st.optimizer.param_groups[0]["lr"] == 0.05
        assert st.optimizer.param_groups[0]["momentum"] == 0.9
    assert [float(v) for v in pipe2.train([(x, y)] * 2)] == after
    pipe2.close()


def test_plain_module_loads_optimizer_hyperparameters(tmp_path):
    net = mlp(4)
    pipe = pipetrain.Pipeline(net, num_devices=2, num_microbatches=2, loss_fn=mse)
    opt = torch.optim.Adam(net.parameters(), lr=0.003, betas=(0.7, 0.9))
    x, y = batch(4)
    pipe.step(x, y)
    opt.step()
    pipetrain.save_checkpoint(pipe, tmp_path / "c", opt)
    plain = mlp(4, seed=3)
    opt2 = torch.optim.Adam(plain.parameters(), lr=1.0)
    pipetrain.load_checkpoint(plain, tmp_path / "c", opt2)
    assert opt2.param_groups[0]["lr"] == 0.003 and opt2.param_groups[0]["betas"] == (0.7, 0.9)
    for a, b in zip(net.parameters(), plain.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])
    pipe.close()
