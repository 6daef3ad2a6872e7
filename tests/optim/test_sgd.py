"""pipetrain.optim.SGD follows torch.optim.SGD; SpecTrain prediction from its momentum."""

import pytest
import torch
from torch import nn

from pipetrain import flat_buffer as fb
from pipetrain import optim as po

from optim_helpers import assert_triton_route_matches_cpp, make_data, make_model, train


OPTIONS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True),
]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("flat", [False, True])
def test_follows_torch_sgd_50_steps(opts, flat):
    x, y = make_data()
    ref, ours = make_model(), make_model()
    if flat:
        fb.flatten(ours)
    train(ref, torch.optim.SGD(ref.parameters(), **opts), 50, x, y)
    opt = po.SGD(ours.parameters(), **opts)
    train(ours, opt, 50, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    if flat:  # one kernel call for the whole model, and the state is flat
        (unit,) = opt._plan(0, opt.param_groups[0])
        assert unit.bucket is not None
        if opts.get("momentum"):
            bufs = [opt.state[p]["momentum_buffer"] for p in ours.parameters()]
            base = opt._flat[id(unit.bucket)]["momentum_buffer"].data_ptr()
            assert all(b.data_ptr() >= base for b in bufs)


def test_param_groups_with_different_options():
    x, y = make_data()
    ref, ours = make_model(), make_model()
    fb.flatten(ours)
    groups = lambda m: [{"params": list(m[0].parameters()), "lr": 0.1},  # noqa: E731
                        {"params": list(m[2].parameters()), "momentum": 0.5}]
    train(ref, torch.optim.SGD(groups(ref), lr=0.02, momentum=0.9), 20, x, y)
    opt = po.SGD(groups(ours), lr=0.02, momentum=0.9)
    train(ours, opt, 20, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # the bucket is split across groups, so each parameter was its own unit (still exact)
    assert all(u.bucket is None for u in opt._plan(0, opt.param_groups[0]))


@pytest.mark.parametrize("flat", [False, True])
def test_bf16_master_weights_follow_fp32_torch(flat):
    """bf16 params + fp32 master: the master follows torch.optim on fp32 weights fed the
    same gradients; the bf16 param is the master rounded (exactly)."""
    ref = make_model(dtype=torch.float32)
    ours = make_model(dtype=torch.bfloat16)
    with torch.no_grad():
        for a, b in zip(ref.parameters(), ours.parameters()):
            a.copy_(b.float())  # same starting point, representable in bf16
    if flat:
        fb.flatten(ours)
    oref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = po.SGD(ours.parameters(), lr=0.05, momentum=0.9, master_weights=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        for a, b in zip(ref.parameters(), ours.parameters()):
            g = torch.randn(a.shape, generator=gen).to(torch.bfloat16)
            a.grad, b.grad = g.float(), g.clone()
        oref.step()
        opt.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        master = opt.state[b]["master_param"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, a, rtol=0, atol=1e-6)
        assert torch.equal(b.detach(), master.to(torch.bfloat16))
        assert opt.state[b]["momentum_buffer"].dtype == torch.float32


@pytest.mark.parametrize("flat", [False, True])
def test_predict_zero_state_is_identity(flat):
    m = make_model()
    if flat:
        fb.flatten(m)
    opt = po.SGD(m.parameters(), lr=0.1, momentum=0.9)
    pred = opt.predict(3.0)
    for p, w in zip(m.parameters(), pred):
        assert torch.equal(w, p.detach())


@pytest.mark.parametrize("flat", [False, True])
def test_predict_one_step_ahead_at_momentum_steady_state(flat):
    """Constant gradient g: buf -> g/(1-mu); then w - lr*buf (the prediction at s=1) is
    exactly the next step's weights, w - lr*(mu*buf + g) = w - lr*buf."""
    m = make_model()
    if flat:
        fb.flatten(m)
    opt = po.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    grads = [torch.randn(p.shape) for p in m.parameters()]
    for _ in range(300):  # 0.9**300 ~ 2e-14: steady state to fp32 precision
        for p, g in zip(m.parameters(), grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        opt.step()
    pred = [w.clone() for w in opt.predict(1.0)]
    opt.step()
    for p, w in zip(m.parameters(), pred):
        torch.testing.assert_close(w, p.detach(), rtol=0, atol=1e-6)


def test_step_and_predict_equals_step_then_predict():
    x, y = make_data()
    a, b = make_model(), make_model()
    fa, fbk = fb.flatten(a), fb.flatten(b)
    oa = po.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = po.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        out = fbk[0].new_buffer()
        fused = ob.step_and_predict(2.0, out=out)  # one pass over the bucket
        oa.step()
        sep = oa.predict(2.0)
        for u, v in zip(fused, sep):
            assert torch.equal(u, v)
        assert fused[0].data_ptr() == out.data_ptr() + fbk[0].offsets[0] * 4
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["arg", "option"])
def test_found_inf_skips_the_step(how):
    x, y = make_data()
    m = make_model()
    fb.flatten(m)
    opt = po.SGD(m.parameters(), lr=0.1, momentum=0.9, skip_nonfinite=(how == "option"))
    train(m, opt, 2, x, y)
    before = [p.detach().clone() for p in m.parameters()]
    buf = [opt.state[p]["momentum_buffer"].clone() for p in m.parameters()]
    if how == "arg":
        opt.step(found_inf=torch.ones(1))
    else:
        next(m.parameters()).grad[0] = float("nan")
        opt.step()
    for p, w, b in zip(m.parameters(), before, buf):
        assert torch.equal(p.detach(), w) and torch.equal(opt.state[p]["momentum_buffer"], b)


def test_errors():
    m = make_model()
    with pytest.raises(ValueError, match="differentiable"):
        po.SGD(m.parameters(), lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match="complex64"):  # float64 is supported: test_fp64.py
        po.SGD([nn.Parameter(torch.zeros(3, dtype=torch.complex64))], lr=0.1)
    with pytest.raises(ValueError, match="mixed devices"):
        po.SGD([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])
    with pytest.raises(ValueError, match="Nesterov"):
        po.SGD(m.parameters(), lr=0.1, nesterov=True)
    opt = po.SGD(m.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="s must be"):
        opt.predict(-1.0)
    with pytest.raises(ValueError, match="s must be"):
        opt.step_and_predict(-2)


def test_cuda_dispatch_calls_triton_kernels_correctly(monkeypatch):
    """As test_adam's twin: the Triton route (interpreted on CPU) equals the C++ route."""
    from pipetrain.optim import sgd as sgd_mod

    assert_triton_route_matches_cpp(
        monkeypatch, sgd_mod, lambda ps: po.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
        flat=True)
