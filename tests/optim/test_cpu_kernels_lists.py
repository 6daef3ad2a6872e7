"""The C++ CPU kernels in fp64 and in their list (``*_multi``) forms.

fp64: the kernel body compiled for doubles, against kernels.reference in fp64 (plain torch
ops: torch.optim's). SGD and the predictions are bit-identical (torch.equal). Adam differs
only where torch's vectorised sqrt is not correctly rounded (ours is IEEE): 1 ulp of sqrt on
~0.5 % of elements, i.e. an update off by ~1 ulp; we allow max|diff| <= 1e-15 * max|ref|
(~4 ulp of the largest element; element-wise relative error is meaningless where w - update
cancels) — and bit-identical once the reference's sqrt is replaced by a correctly rounded
one (test_adam_fp64_bitwise_with_ieee_sqrt).

Lists: each list call must equal the single-tensor calls bit for bit (same body, same
formula per element, whatever chunk or thread an element lands in).
"""

import math

import pytest
import torch

from pipetrain import _cpu_kernels as K
from pipetrain.kernels import reference as R

F64 = torch.float64
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
# Odd sizes, one over 2 x 32768 (the pool splits it), and a list whose total crosses chunks.
SIZES = [1, 7, 1000, 70_001]
LIST_SIZES = [5, 100, 70_000, 3, 40_001, 0, 17]


def _near(a, b, rtol=1e-15):
    """max|a - b| <= rtol * max|b| (a few ulp of the tensor's scale)."""
    assert a.dtype == b.dtype
    assert (a - b).abs().max().item() <= rtol * b.abs().max().item()


@pytest.fixture(autouse=True)
def _threads():
    K.set_num_threads(2)
    yield
    K.set_num_threads(2)


def _f64(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(w=torch.randn(n, generator=g, dtype=F64), g=torch.randn(n, generator=g, dtype=F64),
                m=0.1 * torch.randn(n, generator=g, dtype=F64),
                v=0.01 * torch.rand(n, generator=g, dtype=F64))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("opts", [dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
                                  dict(momentum=0.8, dampening=0.3, maximize=True),
                                  dict(momentum=0.0, weight_decay=1e-3)])
def test_sgd_fp64_bitwise_equals_reference(n, opts):
    t = _f64(n)
    mine = [t["w"].clone(), t["m"].clone(), torch.empty(n, dtype=F64)]
    ref = [t["w"].clone(), t["m"].clone(), torch.empty(n, dtype=F64)]
    for first in (True, False, False):
        for fn, (w, buf, out) in ((K.sgd_step, mine), (R.sgd_step, ref)):
            fn(w, t["g"], buf, lr=0.05, **opts, first_step=first, predict_out=out, predict_s=2.0)
    for a, b in zip(mine, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("decoupled,maximize", [(False, False), (True, True)])
def test_adam_fp64_equals_reference(n, decoupled, maximize):
    t = _f64(n)
    mine = [t["w"].clone(), t["m"].clone(), t["v"].clone(), torch.empty(n, dtype=F64)]
    ref = [x.clone() for x in mine]
    for step in (1, 2, 3):
        for fn, (w, m, v, out) in ((K.adam_step, mine), (R.adam_step, ref)):
            fn(w, t["g"], m, v, **HP, weight_decay=0.1, decoupled=decoupled, maximize=maximize,
               step=step, predict_out=out, predict_s=1.5)
    for a, b in zip(mine, ref):
        assert a.dtype == F64
        _near(a, b)
    # a prediction alone, from the same state: bit-identical (no sqrt difference: same v)
    o1, o2 = torch.empty(n, dtype=F64), torch.empty(n, dtype=F64)
    K.adam_predict(mine[0], mine[1], mine[2], o1, s=2.0, **HP, step=3)
    R.adam_predict(mine[0], mine[1], mine[2], o2, s=2.0, **HP, step=3)
    _near(o1, o2)


def test_adam_fp64_bitwise_with_ieee_sqrt():
    """torch's ops in torch's order with a correctly rounded sqrt == our kernel, bit for bit:
    the only difference from torch.optim is torch's vector sqrt."""
    t = _f64(5000, seed=2)
    lr, b1, b2, eps, wd, step = 1e-2, 0.9, 0.999, 1e-8, 0.1, 7
    w, m, v = t["w"].clone(), t["m"].clone(), t["v"].clone()
    w.mul_(1 - lr * wd)
    m.lerp_(t["g"], 1 - b1)
    v.mul_(b2).addcmul_(t["g"], t["g"], value=1 - b2)
    root = torch.tensor([math.sqrt(x) for x in v.tolist()], dtype=F64)
    w.addcdiv_(m, (root / (1 - b2 ** step) ** 0.5).add_(eps), value=-lr / (1 - b1 ** step))
    mine = [t["w"].clone(), t["m"].clone(), t["v"].clone()]
    K.adam_step(*mine[:1], t["g"], *mine[1:], lr=lr, beta1=b1, beta2=b2, eps=eps,
                weight_decay=wd, decoupled=True, step=step)
    for a, b in zip(mine, (w, m, v)):
        assert torch.equal(a, b)


def test_sgd_predict_fp64_bitwise():
    t = _f64(1000)
    o1, o2 = torch.empty(1000, dtype=F64), torch.empty(1000, dtype=F64)
    K.sgd_predict(t["w"], t["m"], o1, s=3.0, lr=0.1)
    R.sgd_predict(t["w"], t["m"], o2, s=3.0, lr=0.1)
    assert torch.equal(o1, o2)


@pytest.mark.parametrize("bad", ["grad", "m", "out"])
def test_fp64_does_not_mix_with_fp32(bad):
    t = _f64(10)
    out = torch.empty(10, dtype=F64)
    args = dict(grad=t["g"], m=t["m"], out=out)
    args[bad] = args[bad].float()
    with pytest.raises(ValueError, match="float64"):
        K.adam_step(t["w"], args["grad"], args["m"], t["v"], **HP, step=1,
                    predict_out=args["out"], predict_s=1.0)
    with pytest.raises(ValueError, match="float64"):
        K.adam_step(t["w"].float(), t["g"].float(), t["m"], t["v"].float(), **HP, step=1)


# --- list forms ----------------------------------------------------------------------------
def _lists(dtype, state_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, generator=g).to(dtype) for n in LIST_SIZES]
    gs = [torch.randn(n, generator=g).to(dtype) for n in LIST_SIZES]
    ms = [0.1 * torch.randn(n, generator=g).to(state_dtype) for n in LIST_SIZES]
    vs = [0.01 * torch.rand(n, generator=g).to(state_dtype) for n in LIST_SIZES]
    return ws, gs, ms, vs


def _clone(ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("dtype,state", [(torch.float32, torch.float32),
                                         (torch.bfloat16, torch.float32), (F64, F64)])
def test_adam_list_equals_single_calls(dtype, state):
    ws, gs, ms, vs = _lists(dtype, state)
    outs = [torch.empty_like(w) for w in ws]
    one = [_clone(x) for x in (ws, ms, vs, outs)]
    steps = [torch.tensor(0.0) for _ in ws]
    for t in (1, 2, 3):
        K.adam_step_multi(ws, gs, ms, vs, **HP, weight_decay=0.1, decoupled=True,
                          step_tensors=steps, predict_outs=outs, predict_s=2.0)
        for i in range(len(ws)):
            K.adam_step(one[0][i], gs[i], one[1][i], one[2][i], **HP, weight_decay=0.1,
                        decoupled=True, step=t, predict_out=one[3][i], predict_s=2.0)
    assert [float(s) for s in steps] == [3.0] * len(ws)
    for got, want in zip((ws, ms, vs, outs), one):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    # prediction lists: counters read, not moved; and explicit int steps
    p1, p2 = [torch.empty_like(w) for w in ws], [torch.empty_like(w) for w in ws]
    K.adam_predict_multi(ws, ms, vs, p1, s=1.5, **HP, step_tensors=steps)
    K.adam_predict_multi(ws, ms, vs, p2, s=1.5, **HP, steps=[3] * len(ws))
    assert [float(s) for s in steps] == [3.0] * len(ws)
    for i, w in enumerate(ws):
        single = torch.empty_like(w)
        K.adam_predict(w, ms[i], vs[i], single, s=1.5, **HP, step=3)
        assert torch.equal(p1[i], single) and torch.equal(p2[i], single)


@pytest.mark.parametrize("dtype,state", [(torch.float32, torch.float32), (F64, F64)])
def test_sgd_list_equals_single_calls(dtype, state):
    ws, gs, bufs, _ = _lists(dtype, state)
    outs = [torch.empty_like(w) for w in ws]
    one = [_clone(x) for x in (ws, bufs, outs)]
    firsts = [i % 2 == 0 for i in range(len(ws))]  # per-tensor first step
    opts = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    K.sgd_step_multi(ws, gs, bufs, **opts, first_steps=firsts, predict_outs=outs, predict_s=3.0)
    for i in range(len(ws)):
        K.sgd_step(one[0][i], gs[i], one[1][i], **opts, first_step=firsts[i],
                   predict_out=one[2][i], predict_s=3.0)
    for got, want in zip((ws, bufs, outs), one):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    p1 = [torch.empty_like(w) for w in ws]
    K.sgd_predict_multi(ws, bufs, p1, s=2.0, lr=0.05)
    for i, w in enumerate(ws):
        single = torch.empty_like(w)
        K.sgd_predict(w, bufs[i], single, s=2.0, lr=0.05)
        assert torch.equal(p1[i], single)


def test_list_found_inf_skips_everything():
    ws, gs, ms, vs = _lists(torch.float32, torch.float32)
    before = [_clone(x) for x in (ws, ms, vs)]
    steps = [torch.tensor(4.0) for _ in ws]
    K.adam_step_multi(ws, gs, ms, vs, **HP, step_tensors=steps, found_inf=torch.ones(1))
    assert [float(s) for s in steps] == [4.0] * len(ws)
    for got, want in zip((ws, ms, vs), before):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_list_rejects_bad_input():
    ws, gs, ms, vs = _lists(torch.float32, torch.float32)
    with pytest.raises(ValueError, match="shares memory"):  # the same param twice: a race
        K.adam_step_multi([ws[2], ws[2]], [gs[2], gs[2]], [ms[2], ms[2].clone()],
                          [vs[2], vs[2].clone()], **HP, steps=[1, 1])
    with pytest.raises(ValueError, match="shares memory"):  # an output inside another param
        K.sgd_predict_multi(ws[:2], None, [ws[1][:5], torch.empty(100)], s=1.0, lr=0.1)
    with pytest.raises(ValueError, match="one dtype"):
        K.sgd_step_multi([ws[0], ws[1].double()], [gs[0], gs[1].double()], None, lr=0.1,
                         first_steps=[True, True])
    with pytest.raises(ValueError, match="entries"):
        K.adam_step_multi(ws, gs[:-1], ms, vs, **HP, steps=[1] * len(ws))
    with pytest.raises(ValueError, match="exactly one"):
        K.adam_step_multi(ws, gs, ms, vs, **HP)
    with pytest.raises(ValueError, match="step must be"):
        K.adam_step_multi(ws, gs, ms, vs, **HP, steps=[0] * len(ws))
    with pytest.raises(ValueError, match="elements"):
        K.adam_step_multi(ws[:2], gs[:2], [ms[1], ms[0]], vs[:2], **HP, steps=[1, 1])


def test_fp64_streaming_stores_large_prediction():
    """n >= 2^21 with a 64-byte-aligned fp64 output takes the non-temporal store path."""
    n = 2**21 + 37
    t = _f64(n, seed=3)
    out, ref_out = torch.empty(n, dtype=F64), torch.empty(n, dtype=F64)
    assert out.data_ptr() % 64 == 0
    K.sgd_predict(t["w"], t["m"], out, s=2.0, lr=0.1)
    R.sgd_predict(t["w"], t["m"], ref_out, s=2.0, lr=0.1)
    assert torch.equal(out, ref_out)
    w, buf = t["w"].clone(), t["m"].clone()
    K.sgd_step(w, t["g"], buf, lr=0.1, momentum=0.9, first_step=False, predict_out=out,
               predict_s=1.0)
    R.sgd_step(t["w"], t["g"], t["m"], lr=0.1, momentum=0.9, first_step=False,
               predict_out=ref_out, predict_s=1.0)
    assert torch.equal(w, t["w"]) and torch.equal(out, ref_out)
