"""float64 parameters: pipetrain.optim follows torch.optim in fp64 (fp64 state, fp64 maths).

Tolerances. Our fp64 kernels do torch's operations in torch's order with FMAs where torch's
CPU kernels fuse, so SGD is bit-identical to torch.optim.SGD (asserted with torch.equal).
Adam/AdamW differ only where torch's vectorised CPU sqrt is not correctly rounded (ours is
IEEE): ~0.5 % of elements per step by 1 ulp, which the 50-step trajectory spreads to a few
ulp (measured: max relative difference 4e-16 for the betas below) — so 1e-12 relative, well
above that and far below any real error (a wrong op, or fp32 maths anywhere: >= 1e-8).
Relative means max|ours - torch| <= 1e-12 * max|torch| per tensor (element-wise relative
error is meaningless for elements that cross zero).
Not here: betas like (0.3, 0.9), whose trajectory amplifies those ulps to ~4e-13 in 50 steps
(test_adam.py says the same of fp32).
"""

import copy

import pytest
import torch
from torch import nn

from pipetrain import flat_buffer as fb
from pipetrain import optim as po

from optim_helpers import make_data, make_model, train

F64 = torch.float64
RTOL = 1e-12

SGD_OPTIONS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True, weight_decay=1e-3),
]
ADAM_CASES = [
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, maximize=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, betas=(0.85, 0.99), weight_decay=0.1, maximize=True)),
]
CASES = [("SGD", o) for o in SGD_OPTIONS] + ADAM_CASES


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    """max|ours - ref| <= rtol * max|ref| (dtype and shape equal)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    err = (ours.detach() - ref.detach()).abs().max().item()
    scale = ref.detach().abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} x {scale:.3g}"


def _pair(flat: bool):
    ref, ours = make_model(dtype=F64), make_model(dtype=F64)
    if flat:
        fb.flatten(ours)
    return ref, ours


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("flat", [False, True])
def test_follows_torch_50_steps_fp64(name, opts, flat):
    x, y = make_data(F64)
    ref, ours = _pair(flat)
    ropt = getattr(torch.optim, name)(ref.parameters(), **opts)
    train(ref, ropt, 50, x, y)
    opt = getattr(po, name)(ours.parameters(), **opts)
    train(ours, opt, 50, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert b.dtype == F64
        if name == "SGD":
            assert torch.equal(b, a)  # same ops, same order, same FMAs: bit for bit
        else:
            assert_rel(b, a)
        for key, ref_state in ropt.state[a].items():
            mine = opt.state[b][key]
            if key == "step":
                assert float(mine) == float(ref_state) == 50
                continue
            assert mine.dtype == F64  # fp64 state, as torch.optim
            assert_rel(mine, ref_state)


def test_fp64_per_parameter_route_follows_torch(monkeypatch):
    """CUDA float64 parameters go one at a time to the plain-torch reference in fp64 (the
    Triton kernels compute in fp32). Route CPU parameters the same way and check it too."""
    from pipetrain.kernels import reference
    from pipetrain.optim import adam as adam_mod
    from pipetrain.optim import base as base_mod

    assert base_mod.kernels_for(torch.device("cuda"), F64) is reference
    monkeypatch.setattr(adam_mod, "kernels_for", lambda device, dtype=None: reference)
    x, y = make_data(F64)
    ref, ours = _pair(False)
    opts = dict(lr=1e-2, weight_decay=0.1)
    train(ref, torch.optim.AdamW(ref.parameters(), **opts), 20, x, y)
    train(ours, po.AdamW(ours.parameters(), **opts), 20, x, y)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert_rel(b, a)


def test_triton_kernels_reject_fp64():
    import pipetrain.kernels as triton_kernels

    w = torch.zeros(8, dtype=F64)
    with pytest.raises(ValueError, match="dtype"):
        triton_kernels.sgd_step(w, w.clone(), None, lr=0.1, first_step=True)


# --- prediction against its closed form, from torch.optim's own state ----------------------
def _closed_form(name, opts, ropt, p, s):
    """SpecTrain: w - s*lr*buf.  XPipe: w - s*lr*mhat/(sqrt(vhat)+eps), mhat = m/(1-b1^t),
    vhat = v/(1-b2^t) (the README's and kernels.reference's definition)."""
    st = ropt.state[p]
    w, lr = p.detach(), opts["lr"]
    if name == "SGD":
        return w - s * lr * st["momentum_buffer"]
    b1, b2 = opts.get("betas", (0.9, 0.999))
    eps = opts.get("eps", 1e-8)
    t = float(st["step"])
    mhat = st["exp_avg"] / (1 - b1 ** t)
    vhat = st["exp_avg_sq"] / (1 - b2 ** t)
    return w - s * lr * mhat / (vhat.sqrt() + eps)


PRED_CASES = [("SGD", SGD_OPTIONS[1]), ("SGD", SGD_OPTIONS[3])] + ADAM_CASES


@pytest.mark.parametrize("name,opts", PRED_CASES)
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("s", [0.0, 1.0, 2.5])
def test_predict_fp64_closed_form(name, opts, flat, s):
    x, y = make_data(F64)
    ref, ours = _pair(flat)
    ropt = getattr(torch.optim, name)(ref.parameters(), **opts)
    train(ref, ropt, 10, x, y)
    opt = getattr(po, name)(ours.parameters(), **opts)
    train(ours, opt, 10, x, y)
    pred = opt.predict(s)
    for a, w_hat in zip(ref.parameters(), pred):
        assert w_hat.dtype == F64
        assert_rel(w_hat, _closed_form(name, opts, ropt, a, s))


@pytest.mark.parametrize("name,opts", PRED_CASES)
@pytest.mark.parametrize("flat", [False, True])
def test_step_and_predict_fp64(name, opts, flat):
    """One fused update + prediction equals torch's update, then the closed form."""
    x, y = make_data(F64)
    ref, ours = _pair(flat)
    ropt = getattr(torch.optim, name)(ref.parameters(), **opts)
    opt = getattr(po, name)(ours.parameters(), **opts)
    train(ref, ropt, 5, x, y)
    train(ours, opt, 5, x, y)
    for m, o in ((ref, ropt), (ours, opt)):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
    ropt.step()
    pred = opt.step_and_predict(2.0)
    for a, b, w_hat in zip(ref.parameters(), ours.parameters(), pred):
        assert_rel(b, a)
        assert_rel(w_hat, _closed_form(name, opts, ropt, a, 2.0))


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("flat", [False, True])
def test_master_weights_is_a_no_op_for_fp64(name, flat):
    """master_weights=True keeps fp32 masters for bf16/fp16 only; fp64 (like fp32) params are
    their own master: no 'master_param' state, results identical to master_weights=False."""
    x, y = make_data(F64)
    a, b = _pair(flat)
    if flat:
        fb.flatten(a)
    opts = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
    oa = getattr(po, name)(a.parameters(), **opts, master_weights=True)
    ob = getattr(po, name)(b.parameters(), **opts)
    train(a, oa, 5, x, y)
    train(b, ob, 5, x, y)
    pa, pb = oa.step_and_predict(1.5), ob.step_and_predict(1.5)
    for p, q, u, v in zip(a.parameters(), b.parameters(), pa, pb):
        assert torch.equal(p, q) and torch.equal(u, v)
        assert "master_param" not in oa.state[p]


@pytest.mark.parametrize("flat", [False, True])
def test_mixed_fp64_and_fp32_params_in_one_optimizer(flat):
    """fp64 and fp32 parameters side by side: each dtype its own kernel call (or bucket), each
    follows torch.optim in its own precision. The gradients are given (the same sequence to
    both), so the fp32 parameters' ulps cannot leak into the fp64 ones through a backward."""
    def params():
        g = torch.Generator().manual_seed(3)
        shapes = [((7, 5), F64), ((33,), torch.float32), ((4, 4), F64), ((9,), torch.float32)]
        return [nn.Parameter(torch.randn(*sh, generator=g).to(dt)) for sh, dt in shapes]

    ref, ours = params(), params()
    if flat:
        assert len(fb.flatten(ours)) == 2
    ropt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    opt = po.AdamW(ours, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in ref]
        for ps, o in ((ref, ropt), (ours, opt)):
            for p, gr in zip(ps, grads):
                if p.grad is None:
                    p.grad = gr.clone()
                else:
                    p.grad.copy_(gr)
            o.step()
    for a, b in zip(ref, ours):
        assert b.dtype == a.dtype and opt.state[b]["exp_avg"].dtype == a.dtype
        if a.dtype == F64:
            assert_rel(b, a)
        else:  # fp32: fp32's tolerance, as test_adam.py
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,opts", [CASES[2], ADAM_CASES[3]])
@pytest.mark.parametrize("flat", [False, True])
def test_state_dict_fp64_torch_to_ours_to_torch(name, opts, flat):
    """20 steps torch -> 20 ours -> 10 torch == 50 of torch, in fp64; state stays fp64."""
    x, y = make_data(F64)
    pure = make_model(dtype=F64)
    train(pure, getattr(torch.optim, name)(pure.parameters(), **opts), 50, x, y)
    m = make_model(dtype=F64)
    if flat:
        fb.flatten(m)
    t1 = getattr(torch.optim, name)(m.parameters(), **opts)
    train(m, t1, 20, x, y)
    ours = getattr(po, name)(m.parameters(), **opts)
    ours.load_state_dict(copy.deepcopy(t1.state_dict()))
    train(m, ours, 20, x, y)
    sd = copy.deepcopy(ours.state_dict())
    for st in sd["state"].values():
        for key, value in st.items():
            if key != "step":
                assert value.dtype == F64
    t2 = getattr(torch.optim, name)(m.parameters(), **opts)
    t2.load_state_dict(sd)
    train(m, t2, 10, x, y)
    for a, b in zip(pure.parameters(), m.parameters()):
        assert_rel(b, a)
