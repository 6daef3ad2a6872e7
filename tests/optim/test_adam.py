"""pipetrain.optim.Adam / AdamW follow torch.optim; XPipe prediction from the Adam moments."""

import pytest
import torch
from torch import nn

from pipetrain import flat_buffer as fb
from pipetrain import optim as po

from optim_helpers import assert_triton_route_matches_cpp, make_data, make_model, train


def _set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


CASES = [
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, maximize=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, betas=(0.85, 0.99), weight_decay=0.1)),
]
# Not here: betas like (0.3, 0.9). torch's CPU sqrt is not always correctly rounded (about
# 1 element in 10^3 differs by an ulp from IEEE sqrt, which our kernel uses), and with a small
# beta1 those ulps grow along the trajectory beyond 1e-6 in 50 steps. One step with such
# betas (lerp's large-weight branch) is checked against the reference in
# test_cpu_kernels.py::test_adam_lerp_large_weight_branch.


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("flat", [False, True])
def test_follows_torch_50_steps(name, opts, flat):
    x, y = make_data()
    ref, ours = make_model(), make_model()
    if flat:
        fb.flatten(ours)
    train(ref, getattr(torch.optim, name)(ref.parameters(), **opts), 50, x, y)
    opt = getattr(po, name)(ours.parameters(), **opts)
    train(ours, opt, 50, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    st = opt.state[next(ours.parameters())]
    assert float(st["step"]) == 50 and st["exp_avg"].dtype == torch.float32
    if flat:
        (unit,) = opt._plan(0, opt.param_groups[0])
        flat_m = opt._flat[id(unit.bucket)]["exp_avg"]
        for p, off in zip(unit.bucket.params, unit.bucket.offsets):
            assert opt.state[p]["exp_avg"].data_ptr() == flat_m.data_ptr() + 4 * off


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flat", [False, True])
def test_half_params_with_master_follow_fp32_torch(dtype, flat):
    ref = make_model(dtype=torch.float32)
    ours = make_model(dtype=dtype)
    with torch.no_grad():
        for a, b in zip(ref.parameters(), ours.parameters()):
            a.copy_(b.float())
    if flat:
        fb.flatten(ours)
    oref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = po.AdamW(ours.parameters(), lr=1e-2, master_weights=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in ref.parameters()]
        for p, g in zip(ref.parameters(), grads):
            p.grad = g.float()
        _set_grads(ours, grads)
        oref.step()
        opt.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        master = opt.state[b]["master_param"]
        # fp32 master, fp32 state: same maths as torch on fp32 weights
        torch.testing.assert_close(master, a, rtol=0, atol=1e-6)
        assert torch.equal(b.detach(), master.to(dtype))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("flat", [False, True])
def test_predict_zero_state_is_identity(name, flat):
    m = make_model()
    if flat:
        fb.flatten(m)
    opt = getattr(po, name)(m.parameters(), lr=0.1)
    for p, w in zip(m.parameters(), opt.predict(5.0)):
        assert torch.equal(w, p.detach())


@pytest.mark.parametrize("flat", [False, True])
def test_predict_matches_future_steps_for_constant_gradient(flat):
    """Constant gradient g, m0 = v0 = 0: m_t = (1-b1^t) g and v_t = (1-b2^t) g^2 exactly, so
    the bias-corrected mhat_t = g and vhat_t = g^2 for every t. Every Adam step then moves
    w by -lr*g/(|g|+eps), and the prediction at s, w - s*lr*mhat_t/(sqrt(vhat_t)+eps), is
    exactly the weights s steps later: the bias-correction difference between steps t and
    t+s is zero. (Only fp32 rounding of the moments separates them: atol 1e-6 at lr 1e-3.)"""
    m = make_model()
    if flat:
        fb.flatten(m)
    opt = po.Adam(m.parameters(), lr=1e-3)
    grads = [torch.randn(p.shape) for p in m.parameters()]
    for _ in range(3):
        _set_grads(m, grads)
        opt.step()
    pred1 = [w.clone() for w in opt.predict(1.0)]
    pred3 = [w.clone() for w in opt.predict(3.0)]
    for k in range(3):
        _set_grads(m, grads)
        opt.step()
        if k == 0:
            for p, w in zip(m.parameters(), pred1):
                torch.testing.assert_close(w, p.detach(), rtol=0, atol=1e-6)
    for p, w in zip(m.parameters(), pred3):
        torch.testing.assert_close(w, p.detach(), rtol=0, atol=1e-6)


def test_adamw_prediction_differs_by_the_decay_only():
    """AdamW also decays w by lr*wd*w per step, which the prediction does not extrapolate:
    predicted(s=1) - next = lr*wd*w_t (with a constant gradient, as above)."""
    m = make_model()
    fb.flatten(m)
    lr, wd = 1e-3, 0.5
    opt = po.AdamW(m.parameters(), lr=lr, weight_decay=wd)
    grads = [torch.randn(p.shape) for p in m.parameters()]
    for _ in range(2):
        _set_grads(m, grads)
        opt.step()
    w_t = [p.detach().clone() for p in m.parameters()]
    pred = [w.clone() for w in opt.predict(1.0)]
    _set_grads(m, grads)
    opt.step()
    for p, w, w0 in zip(m.parameters(), pred, w_t):
        torch.testing.assert_close(w - p.detach(), lr * wd * w0, rtol=0, atol=1e-6)


def test_step_and_predict_equals_step_then_predict():
    x, y = make_data()
    a, b = make_model(), make_model()
    fb.flatten(a)
    fb.flatten(b)
    oa, ob = po.AdamW(a.parameters(), lr=1e-2), po.AdamW(b.parameters(), lr=1e-2)
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        fused = ob.step_and_predict(1.5)
        oa.step()
        for u, v in zip(fused, oa.predict(1.5)):
            assert torch.equal(u, v)
    outs = [torch.empty_like(p) for p in a.parameters()]  # per-parameter outputs also work
    res = oa.predict(1.5, out=outs)
    assert all(r is o for r, o in zip(res, outs))
    for u, v in zip(outs, ob.predict(1.5)):
        assert torch.equal(u, v)


def test_found_inf_skips_step_and_count():
    x, y = make_data()
    m = make_model()
    fb.flatten(m)
    opt = po.Adam(m.parameters(), lr=1e-2)
    train(m, opt, 2, x, y)
    p0 = next(m.parameters())
    before = (p0.detach().clone(), opt.state[p0]["exp_avg"].clone())
    opt.step(found_inf=torch.tensor([1.0]))
    assert float(opt.state[p0]["step"]) == 2
    assert torch.equal(p0.detach(), before[0]) and torch.equal(opt.state[p0]["exp_avg"], before[1])
    opt.step(found_inf=torch.tensor([0.0]))
    assert float(opt.state[p0]["step"]) == 3


def test_errors():
    m = make_model()
    for bad in ("amsgrad", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=bad):
            po.Adam(m.parameters(), **{bad: True})
    with pytest.raises(ValueError, match="amsgrad"):
        po.AdamW([{"params": list(m.parameters()), "amsgrad": True}])
    with pytest.raises(ValueError, match="complex64"):  # float64 is supported: test_fp64.py
        po.AdamW([nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="mixed devices"):
        po.Adam([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])
    opt = po.Adam(m.parameters())
    with pytest.raises(ValueError, match="s must be"):
        opt.predict(-0.1)
    with pytest.raises(ValueError, match="flat bucket"):
        opt.predict(1.0, out=torch.zeros(3))  # not flat: a single flat out makes no sense


@pytest.mark.parametrize("flat", [False, True])
def test_cuda_dispatch_calls_triton_kernels_correctly(monkeypatch, flat):
    """CUDA parameters go to pipetrain.kernels (Triton). No GPU here: route CPU tensors to
    the Triton kernels under the interpreter (tests set TRITON_INTERPRET=1) and check the
    optimizer's calls give the C++ path's results (both implement kernels.reference)."""
    from pipetrain.optim import adam as adam_mod

    assert_triton_route_matches_cpp(
        monkeypatch, adam_mod, lambda ps: po.AdamW(ps, lr=1e-2, weight_decay=0.1), flat)


def test_cpu_params_never_reach_triton(monkeypatch):
    """CPU tensors run the C++ kernels, never the Triton interpreter."""
    import pipetrain.kernels as triton_kernels

    def boom(*args, **kwargs):
        raise AssertionError("Triton kernel called for CPU tensors")

    for name in ("adam_step", "adam_predict", "sgd_step", "sgd_predict"):
        monkeypatch.setattr(triton_kernels, name, boom, raising=False)
    x, y = make_data()
    for flat in (False, True):
        m = make_model()
        if flat:
            fb.flatten(m)
        for opt in (po.AdamW(m.parameters()), po.SGD(m.parameters(), lr=0.1, momentum=0.9)):
            train(m, opt, 1, x, y)
            opt.step_and_predict(1.0)
            opt.predict(1.0)
