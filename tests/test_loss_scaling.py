"""Loss scaling in one process (pipetrain.loss_scaling): the update rule against its closed
form, clean steps equal to an unscaled run bit for bit (fp64, power-of-two scales), an
injected inf in one stage skipping the step on every stage, fp16 autocast against
torch.amp.GradScaler on the unsplit model. Multi-process: tests/distributed/test_loss_scaling.py."""

import copy

import pytest
import torch

import pipetrain
from pipetrain.loss_scaling import LossScaler, check_and_unscale, resolve
from tests.models import batch, mlp, mse


def test_scaler_rule_closed_form():
    s = LossScaler(init_scale=8.0, growth_interval=3)
    seq = [False, False, True, False, False, False, False, True]
    scales = []
    for found in seq:
        s.update(found)
        scales.append(s.scale)
    # 8 -> (clean, clean) 8 8 -> inf: 4 -> 3 clean: 8 at the third -> clean 8 -> inf 4
    assert scales == [8.0, 8.0, 4.0, 4.0, 4.0, 8.0, 8.0, 4.0]
    assert s.skipped == 2
    d = LossScaler()
    assert (d.scale, d.growth_factor, d.backoff_factor, d.growth_interval) == (2.0 ** 16, 2.0, 0.5, 2000)
    fixed = resolve(1024.0)
    fixed.update(True)
    fixed.update(False)
    assert fixed.scale == 1024.0 and fixed.skipped == 1
    assert resolve(None) is None and resolve("dynamic").scale == 2.0 ** 16
    for bad in ("static", 0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="loss_scale"):
            resolve(bad)
    with pytest.raises(ValueError, match="growth_interval"):
        LossScaler(growth_interval=0)


def test_check_and_unscale_fused():
    a = torch.tensor([2.0, 4.0], dtype=torch.float64)
    b = torch.tensor([8.0], dtype=torch.float16)
    assert check_and_unscale([a, b, a], 0.5) is False      # `a` twice: divided once
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [4.0]
    c = torch.tensor([1.0, float("nan")])
    assert check_and_unscale([a, c], 1.0) is True


def _pipes(scale, schedule="1f1b", p=3, m=4, **kw):
    net = mlp(6)
    ref = copy.deepcopy(net)
    a = pipetrain.Pipeline(net, num_devices=p, schedule=schedule, num_microbatches=m, loss_fn=mse,
                           loss_scale=scale, **kw)
    b = pipetrain.Pipeline(ref, num_devices=p, schedule=schedule, num_microbatches=m, loss_fn=mse, **kw)
    return net, ref, a, b


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1", "interleaved-1f1b"])
def test_clean_steps_equal_unscaled_run_bit_for_bit(schedule):
    p = 2 if schedule == "interleaved-1f1b" else 3
    net, ref, a, b = _pipes(LossScaler(growth_interval=2), schedule=schedule, p=p)
    opt_a = torch.optim.Adam(net.parameters(), lr=0.01)
    opt_b = torch.optim.Adam(ref.parameters(), lr=0.01)
    for step in range(4):
        x, y = batch(10, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        opt_a.zero_grad()
        opt_b.zero_grad()
        la, lb = a.step(xa, y), b.step(xb, y)
        assert torch.equal(la, lb)
        assert not a.found_inf
        for pa, pb in zip(net.parameters(), ref.parameters()):
            assert torch.equal(pa.grad, pb.grad)       # unscaled on commit, no bit changed
        assert torch.equal(xa.grad, xb.grad)           # the user's input gradient too
        assert torch.equal(a.clip_grad_norm_(0.1), b.clip_grad_norm_(0.1))   # sees true grads
        assert a.optimizer_step(opt_a) is True
        opt_b.step()
    # Two clean steps per growth: 2**16 -> 2**17 -> 2**18.
    assert a.loss_scale == 2.0 ** 18 and a.scaler.growth_tracker == 0
    for pa, pb in zip(net.parameters(), ref.parameters()):
        assert torch.equal(pa, pb)
    a.close()
    b.close()


def test_inf_in_one_stage_skips_the_step_on_every_stage():
    net, ref, a, b = _pipes("dynamic")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    poison = {"on": False}
    middle = a.stages[1].params[0]                # a parameter of stage 1 only
    middle.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    x, y = batch(8)
    a.step(x, y)                                   # clean: committed
    assert not a.found_inf and a.optimizer_step(opt)
    before = [q.detach().clone() for q in net.parameters()]
    grads = [q.grad.clone() for q in net.parameters()]
    poison["on"] = True
    loss = a.step(x, y)
    assert torch.isfinite(loss)                    # the loss itself is fine
    assert a.found_inf and a.loss_scale == 2.0 ** 15 and a.scaler.skipped == 1
    for q, g in zip(net.parameters(), grads):      # nothing committed, on any stage
        assert torch.equal(q.grad, g)
    assert a.optimizer_step(opt) is False          # skipped ...
    for q, w in zip(net.parameters(), before):
        assert torch.equal(q, w)
    poison["on"] = False
    opt.zero_grad()
    a.step(x, y)
    assert not a.found_inf and a.loss_scale == 2.0 ** 15
    assert a.optimizer_step(opt) is True           # ... only that once
    assert any(not torch.equal(q, w) for q, w in zip(net.parameters(), before))
    a.close()
    b.close()


def test_train_skips_the_optimizer_step_on_every_stage():
    net = mlp(4)
    pipe = pipetrain.Pipeline(net, num_devices=2, schedule="gpipe", num_microbatches=2,
                              loss_fn=mse, loss_scale=LossScaler(init_scale=4.0),
                              optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    poison = {"on": False}
    pipe.stages[0].params[0].register_hook(lambda g: g * float("nan") if poison["on"] else g)
    x, y = batch(4)
    list(pipe.train([(x, y)]))
    before = [q.detach().clone() for q in net.parameters()]
    poison["on"] = True
    list(pipe.train([(x, y)]))
    assert pipe.found_inf and pipe.loss_scale == 2.0
    for q, w in zip(net.parameters(), before):   # momentum would have moved them
        assert torch.equal(q, w)
    pipe.close()


def test_fp16_autocast_matches_grad_scaler_on_the_unsplit_model():
    """An init scale so large that fp16 gradients overflow: the pipeline skips and halves
    exactly where torch.amp.GradScaler does on the unsplit model, then trains alike. One
    micro-batch, so that every fp16 operation is the unsplit model's (with m > 1 the
    micro-batch gradients are smaller, and the overflow boundary moves by design)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
                                for _ in range(4)])
    ref = copy.deepcopy(net)
    pipe = pipetrain.Pipeline(net, num_devices=2, schedule="1f1b", num_microbatches=1,
                              loss_fn=mse, loss_scale=LossScaler(init_scale=2.0 ** 22))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 22)
    g = torch.Generator().manual_seed(3)
    flags, ref_flags = [], []
    for _ in range(14):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
        opt.zero_grad()
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            pipe.step(x, y)
            ref_loss = mse(ref(x).float(), y)
        pipe.optimizer_step(opt)
        flags.append(pipe.found_inf)
        before = scaler.get_scale()
        scaler.scale(ref_loss).backward()
        scaler.step(ref_opt)
        scaler.update()
        ref_flags.append(scaler.get_scale() < before)
        assert pipe.loss_scale == scaler.get_scale()
    assert flags == ref_flags and flags[0] and not flags[-1]
    for q, r in zip(net.parameters(), ref.parameters()):
        assert torch.equal(q, r)
    pipe.close()


def test_refused_with_async_schedules_and_graph_models():
    with pytest.raises(ValueError, match="asynchronous"):
        pipetrain.Pipeline(mlp(4), num_devices=2, schedule="pipedream", num_microbatches=2,
                           loss_fn=mse, loss_scale="dynamic",
                           optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match="loss_scale"):
        pipetrain.Pipeline(mlp(4), num_devices=2, loss_fn=mse, loss_scale="big")


def test_token_level_loss_with_scaling_equals_unscaled():
    """(loss_sum, count) losses divide by the token count at the commit; the scale is undone
    in the same commit path and no bit changes (fp64, power-of-two scale)."""
    def masked(out, target):
        return (((out - target["y"]) ** 2).sum(-1) * target["mask"]).sum(), target["mask"].sum()

    net = mlp(4)
    ref = copy.deepcopy(net)
    a = pipetrain.Pipeline(net, num_devices=2, num_microbatches=3, loss_fn=masked, loss_scale="dynamic")
    b = pipetrain.Pipeline(ref, num_devices=2, num_microbatches=3, loss_fn=masked)
    x, y = batch(7)
    target = {"y": y, "mask": (torch.arange(7) % 3 != 0).double()}
    assert torch.equal(a.step(x, target), b.step(x, target))
    for pa, pb in zip(net.parameters(), ref.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    a.close()
    b.close()
