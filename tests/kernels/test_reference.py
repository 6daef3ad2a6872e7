"""kernels/reference.py against torch.optim: the foundation every other kernel test builds on.

torch.optim runs on the same flat fp32 buffers (single-tensor path, foreach=False) for 20
steps with fresh random gradients; the reference, which issues the same fp32 operations with
the same host-rounded scalars, must match to 1e-6 (in practice it is bit-identical, but the
contract only promises 1e-6 so that C++/Triton twins may contract multiply-adds).
"""

from __future__ import annotations

import pytest
import torch

from pipetrain.kernels import reference as ref

N = 257          # not a multiple of any SIMD width: exercises vector tails in torch's CPU kernels
STEPS = 20
TOL = dict(rtol=1e-6, atol=1e-6)


def _grads(seed: int, n: int = N, steps: int = STEPS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for _ in range(steps)]


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.8, nesterov=True),
    dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    dict(lr=0.05, momentum=0.7, dampening=0.1, weight_decay=0.02, maximize=True),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True),
]


@pytest.mark.parametrize("opts", SGD_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_matches_torch_optim(opts):
    w0 = torch.randn(N, generator=torch.Generator().manual_seed(1))
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], foreach=False, **opts)
    w = w0.clone()
    buf = torch.zeros(N) if opts.get("momentum", 0.0) != 0.0 else None
    for i, g in enumerate(_grads(2)):
        p.grad = g.clone()
        opt.step()
        ref.sgd_step(w, g, buf, first_step=(i == 0), **opts)
        torch.testing.assert_close(w, p.detach(), **TOL)
        if buf is not None:
            torch.testing.assert_close(buf, opt.state[p]["momentum_buffer"], **TOL)


ADAM_CASES = [
    (torch.optim.Adam, dict(lr=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05, maximize=True)),
    (torch.optim.Adam, dict(lr=1e-2, betas=(0.3, 0.9))),   # lerp weight 0.7 >= 0.5: torch's other branch
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.AdamW, dict(lr=3e-3, betas=(0.95, 0.98), eps=1e-5, weight_decay=0.3, maximize=True)),
]


@pytest.mark.parametrize("cls,opts", ADAM_CASES,
                         ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(ADAM_CASES)])
def test_adam_matches_torch_optim(cls, opts):
    w0 = torch.randn(N, generator=torch.Generator().manual_seed(3))
    p = torch.nn.Parameter(w0.clone())
    opt = cls([p], foreach=False, **opts)
    w, m, v = w0.clone(), torch.zeros(N), torch.zeros(N)
    b1, b2 = opts.get("betas", (0.9, 0.999))
    kw = dict(lr=opts["lr"], beta1=b1, beta2=b2, eps=opts.get("eps", 1e-8),
              weight_decay=opts.get("weight_decay", 0.0 if cls is torch.optim.Adam else 1e-2),
              decoupled=cls is torch.optim.AdamW, maximize=opts.get("maximize", False))
    for t, g in enumerate(_grads(4), start=1):
        p.grad = g.clone()
        opt.step()
        ref.adam_step(w, g, m, v, step=t, **kw)
        torch.testing.assert_close(w, p.detach(), **TOL)
        torch.testing.assert_close(m, opt.state[p]["exp_avg"], **TOL)
        torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], **TOL)


@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_master_follows_fp32_and_param_is_master_rounded(kind, pdtype):
    """Low-precision param + fp32 master: master evolves exactly like an fp32 run on the same
    gradients; param is master rounded (RNE) to its dtype after every step."""
    gen = torch.Generator().manual_seed(5)
    w32 = torch.randn(N, generator=gen)
    master, param = w32.clone(), w32.to(pdtype)
    s32 = [torch.zeros(N), torch.zeros(N)]
    s_mp = [torch.zeros(N), torch.zeros(N)]
    for t in range(1, 6):
        g = torch.randn(N, generator=gen).to(pdtype)   # low-precision gradient, as autocast gives
        if kind == "sgd":
            kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, first_step=(t == 1))
            ref.sgd_step(w32, g.float(), s32[0], **kw)
            ref.sgd_step(param, g, s_mp[0], master=master, **kw)
        else:
            kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                      decoupled=True, step=t)
            ref.adam_step(w32, g.float(), *s32, **kw)
            ref.adam_step(param, g, *s_mp, master=master, **kw)
        assert torch.equal(master, w32)
        assert torch.equal(param, master.to(pdtype))


def test_sgd_without_master_rounds_param_each_step():
    """No master: param is read as fp32, updated in fp32, stored rounded (so bf16 drifts from fp32)."""
    w = torch.randn(N, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    g = torch.randn(N, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    expected = (w.float() - 0.1 * g.float()).to(torch.bfloat16)
    ref.sgd_step(w, g, None, lr=0.1, first_step=True)
    assert torch.equal(w, expected)


def test_found_inf_skips_everything_bit_identically():
    gen = torch.Generator().manual_seed(8)
    param = torch.randn(N, generator=gen).to(torch.bfloat16)
    master, buf, out = param.float(), torch.randn(N, generator=gen), torch.randn(N).bfloat16()
    m, v = torch.randn(N, generator=gen), torch.rand(N, generator=gen)
    g = torch.randn(N, generator=gen)
    g[3] = float("inf")
    g[9] = float("nan")
    flag = torch.zeros(1)
    ref.non_finite_check(g, flag)
    assert flag.item() == 1.0
    before = [t.clone() for t in (param, master, buf, out, m, v)]
    ref.sgd_step(param, g, buf, lr=0.1, momentum=0.9, first_step=False, master=master,
                 found_inf=flag, predict_out=out, predict_s=2.0)
    ref.adam_step(param, g, m, v, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, step=3,
                  master=master, found_inf=flag, predict_out=out, predict_s=2.0)
    for b, a in zip(before, (param, master, buf, out, m, v)):
        assert torch.equal(a, b)
    # And a clear flag means the step happens (the skip is not a no-op by accident).
    flag.zero_()
    ref.sgd_step(param, torch.ones(N), buf, lr=0.1, momentum=0.9, first_step=False,
                 master=master, found_inf=flag)
    assert not torch.equal(master, before[1])


def test_non_finite_check_sets_but_never_clears():
    flag = torch.zeros(1)
    ref.non_finite_check(torch.ones(5), flag)
    assert flag.item() == 0.0
    for bad in (float("inf"), float("-inf"), float("nan")):
        g = torch.ones(5, dtype=torch.float16)
        g[4] = bad
        flag.zero_()
        ref.non_finite_check(g, flag)
        assert flag.item() == 1.0
        ref.non_finite_check(torch.ones(5), flag)   # a later finite buffer keeps the flag
        assert flag.item() == 1.0


def test_predict_formulas_at_zero_state_and_step_zero():
    w = torch.randn(N)
    out = torch.empty(N)
    ref.sgd_predict(w, torch.zeros(N), out, s=3.0, lr=0.1)
    assert torch.equal(out, w)
    ref.adam_predict(w, torch.randn(N), torch.rand(N), out, s=3.0, lr=0.1, beta1=0.9,
                     beta2=0.999, eps=1e-8, step=0)
    assert torch.equal(out, w)
    buf = torch.randn(N)
    ref.sgd_predict(w, buf, out, s=2.5, lr=0.1)
    torch.testing.assert_close(out, w - 0.25 * buf, rtol=1e-6, atol=1e-6)


def _valid_sgd():
    return dict(param=torch.zeros(4), grad=torch.zeros(4), momentum_buf=torch.zeros(4))


@pytest.mark.parametrize("change,match", [
    (dict(grad=torch.zeros(5)), "same numel"),
    (dict(grad=torch.zeros(8)[::2]), "contiguous"),
    (dict(grad=torch.zeros(2, 2)), "1-D"),
    (dict(grad=torch.zeros(4, dtype=torch.float64)), "dtype"),
    (dict(momentum_buf=torch.zeros(4, dtype=torch.bfloat16)), "dtype"),
    (dict(param=torch.zeros(4, dtype=torch.int32)), "dtype"),
    (dict(grad=torch.zeros(4, device="meta")), "device"),
    (dict(momentum_buf=None), "momentum_buf"),
])
def test_sgd_rejects_bad_input(change, match):
    args = {**_valid_sgd(), **change}
    with pytest.raises(ValueError, match=match):
        ref.sgd_step(args["param"], args["grad"], args["momentum_buf"], lr=0.1, momentum=0.9,
                     first_step=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(predict_out=torch.zeros(4), predict_s=-1.0), "predict_s"),
    (dict(found_inf=torch.zeros(2)), "found_inf"),
    (dict(master=torch.zeros(4, dtype=torch.float16)), "dtype"),
    (dict(step=0), "step"),
])
def test_adam_rejects_bad_input(kwargs, match):
    kw = {**dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, step=1), **kwargs}
    with pytest.raises(ValueError, match=match):
        ref.adam_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), **kw)


def test_predict_rejects_negative_distance():
    with pytest.raises(ValueError, match="s must be"):
        ref.sgd_predict(torch.zeros(4), torch.zeros(4), torch.zeros(4), s=-0.5, lr=0.1)
    with pytest.raises(ValueError, match="s must be"):
        ref.adam_predict(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), s=-1,
                         lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, step=1)


def test_rejects_aliased_buffers():
    """Outputs are written in place in one pass: a buffer passed twice (or overlapping views of
    one allocation) would make the result depend on load/store order, so it is refused."""
    w, g = torch.zeros(8), torch.zeros(8)
    with pytest.raises(ValueError, match="share memory"):
        ref.sgd_predict(w, g, w, s=1.0, lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        ref.sgd_step(w, g, None, lr=0.1, first_step=True, predict_out=w)
    big = torch.zeros(12)
    with pytest.raises(ValueError, match="share memory"):
        ref.adam_step(big[:8], g, big[4:], torch.zeros(8), lr=0.1, beta1=0.9, beta2=0.99,
                      eps=1e-8, step=1)
    ref.adam_step(big[:4], torch.zeros(4), big[4:8], big[8:], lr=0.1, beta1=0.9, beta2=0.99,
                  eps=1e-8, step=1)   # adjacent, disjoint views of one allocation are fine
