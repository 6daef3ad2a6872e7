"""Triton fused Adam/AdamW step (kernels/adam.py) against the torch reference, fp64 maths and torch.optim.

Runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py). Tolerances: see
tests/kernels/conftest.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipetrain.kernels import adam_step
from pipetrain.kernels import reference as ref
from pipetrain.kernels._launch import BLOCK

SIZES = [1, 7, BLOCK + 3, 4 * BLOCK + 1]
LOW = [torch.bfloat16, torch.float16]
BASE = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)

CONFIGS = {
    "adam": dict(BASE),
    "adam-l2-maximize": dict(BASE, weight_decay=0.1, maximize=True),
    "adamw": dict(BASE, weight_decay=0.1, decoupled=True),
    "adamw-odd-betas": dict(lr=3e-3, beta1=0.3, beta2=0.9, eps=1e-6, weight_decay=0.3,
                            decoupled=True),   # 1-beta1 >= 0.5: torch's other lerp branch
}


def _inputs(n: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    m = 0.1 * torch.randn(n, generator=gen)
    v = 0.01 * torch.rand(n, generator=gen)
    return w.to(dtype), g.to(dtype), m, v


def _adam64(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False,
            maximize=False, step, s=0.0):
    """The Adam/AdamW formula in fp64 with explicit bias-corrected moments (independent of the
    reference's op order). Returns (w_new, m_new, v_new, predicted)."""
    w, g, m, v = (t.double() for t in (w, g, m, v))
    g = -g if maximize else g
    if decoupled:
        w = w * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    u = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
    w = w - lr * u
    return w, m, v, w - s * lr * u


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("step", [1, 7])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_matches_reference(name, step, n, fp32_close):
    opts = CONFIGS[name]
    w, g, m, v = _inputs(n, seed=n + step)
    k = [t.clone() for t in (w, m, v)] + [torch.empty(n)]
    r = [t.clone() for t in (w, m, v)] + [torch.empty(n)]
    adam_step(k[0], g, k[1], k[2], step=step, found_inf=torch.zeros(1), predict_out=k[3],
              predict_s=1.5, **opts)
    ref.adam_step(r[0], g, r[1], r[2], step=step, predict_out=r[3], predict_s=1.5, **opts)
    for a, b in zip(k, r):
        fp32_close(a, b)
    # And the reference itself is the formula: fp64 maths agrees to fp32 accuracy.
    w64, m64, v64, p64 = _adam64(w, g, m, v, step=step, s=1.5, **opts)
    for a, b in zip(k, (w64, m64, v64, p64)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_twenty_steps_match_torch_optim(cls, fp32_close):
    n = BLOCK + 3
    w0 = torch.randn(n, generator=torch.Generator().manual_seed(13))
    p = torch.nn.Parameter(w0.clone())
    opt = cls([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, foreach=False)
    w, m, v = w0.clone(), torch.zeros(n), torch.zeros(n)
    gen = torch.Generator().manual_seed(14)
    for t in range(1, 21):
        g = torch.randn(n, generator=gen)
        p.grad = g.clone()
        opt.step()
        adam_step(w, g, m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05,
                  decoupled=cls is torch.optim.AdamW, step=t)
    # 20 chained steps: per-step ulp differences may accumulate, hence 16 ulp.
    fp32_close(w, p.detach(), ulps=16)
    fp32_close(m, opt.state[p]["exp_avg"], ulps=16)
    fp32_close(v, opt.state[p]["exp_avg_sq"], ulps=16)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_param_three_way(dtype, n, three_way, within_one_ulp, fp32_close):
    """bf16/fp16 param and grad, no master: fp32 maths inside, one rounding at the store."""
    opts, step, s = CONFIGS["adamw"], 4, 2.0
    w, g, m, v = _inputs(n, seed=200 + n, dtype=dtype)
    k = [w.clone(), m.clone(), v.clone(), torch.empty(n, dtype=dtype)]
    r = [w.clone(), m.clone(), v.clone(), torch.empty(n, dtype=dtype)]
    adam_step(k[0], g, k[1], k[2], step=step, predict_out=k[3], predict_s=s, **opts)
    ref.adam_step(r[0], g, r[1], r[2], step=step, predict_out=r[3], predict_s=s, **opts)
    within_one_ulp(k[0], r[0])
    within_one_ulp(k[3], r[3])
    fp32_close(k[1], r[1])
    fp32_close(k[2], r[2])

    # Plain torch at the same dtype: torch.optim.AdamW on a low-precision param, state in dtype.
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([p], lr=opts["lr"], betas=(opts["beta1"], opts["beta2"]),
                            eps=opts["eps"], weight_decay=opts["weight_decay"], foreach=False)
    opt.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.to(dtype),
                    "exp_avg_sq": v.to(dtype)}
    p.grad = g.clone()
    opt.step()
    w64, _, _, p64 = _adam64(w, g, m, v, step=step, s=s, **opts)
    three_way(k[0], p.detach(), w64)
    st = opt.state[p]
    plain_u = (st["exp_avg"] / (1 - opts["beta1"] ** step)) / (
        (st["exp_avg_sq"] / (1 - opts["beta2"] ** step)).sqrt() + opts["eps"])
    three_way(k[3], p.detach() - (s * opts["lr"]) * plain_u, p64)


@pytest.mark.parametrize("dtype", LOW)
def test_master_weights_follow_fp32_exactly(dtype, fp32_close):
    """bf16/fp16 param + fp32 master: master and moments evolve bit-for-bit like the same kernel
    on fp32 weights, within fp32 tolerance of the reference; param == master rounded (RNE)."""
    n = BLOCK + 3
    opts = CONFIGS["adamw"]
    w32 = torch.randn(n, generator=torch.Generator().manual_seed(23))
    master, param, w_fp32, wr = w32.clone(), w32.to(dtype), w32.clone(), w32.clone()
    st_mp, st_32, st_r = ([torch.zeros(n), torch.zeros(n)] for _ in range(3))
    gen = torch.Generator().manual_seed(24)
    for t in range(1, 5):
        g = torch.randn(n, generator=gen).to(dtype)
        adam_step(param, g, *st_mp, master=master, step=t, **opts)
        adam_step(w_fp32, g.float(), *st_32, step=t, **opts)
        ref.adam_step(wr, g.float(), *st_r, step=t, **opts)
        assert torch.equal(master, w_fp32)
        assert all(torch.equal(a, b) for a, b in zip(st_mp, st_32))
        assert torch.equal(param, master.to(dtype))
    fp32_close(master, wr, ulps=16)


@pytest.mark.parametrize("n", [7, BLOCK + 3])
def test_found_inf_leaves_everything_bit_identical(n):
    w, g, m, v = _inputs(n, seed=33, dtype=torch.float16)
    g[0] = float("nan")
    master, pred = w.float() - 0.5, torch.full((n,), -3.0, dtype=torch.float16)
    before = [t.clone() for t in (w, m, v, master, pred)]
    flag = torch.full((1,), 1.0)
    adam_step(w, g, m, v, step=3, master=master, found_inf=flag, predict_out=pred, predict_s=2.0,
              **CONFIGS["adamw"])
    for a, b in zip((w, m, v, master, pred), before):
        assert torch.equal(a, b)
    flag.zero_()
    g[0] = 0.0
    adam_step(w, g, m, v, step=3, master=master, found_inf=flag, **CONFIGS["adamw"])
    assert not torch.equal(m, before[1])


@pytest.mark.parametrize("beta2", [0.999, 0.9999])
@pytest.mark.parametrize("step", [1, 2, 10])
def test_bias_correction_is_accurate_in_early_steps(step, beta2, tracked, within_bound):
    """Bias corrections are formed on the host in fp64 and rounded once to fp32. Forming
    1 - beta2**t from beta2 rounded to fp32 (as an in-kernel fp32 computation would) is off by
    ~1e-5 relative at t = 1 (fp32(0.999) = 0.99900001287...), i.e. ~6e-6 in the update — far
    outside the fp32 error bound once the update dominates w (here w = 0, lr = 1)."""
    n = BLOCK + 3
    _, g, m, v = _inputs(n, seed=50 + step)
    w = torch.zeros(n)
    opts = dict(lr=1.0, beta1=0.9, beta2=beta2, eps=1e-8, weight_decay=0.0, decoupled=False,
                maximize=False, step=step, predict_s=2.0)
    k = [w.clone(), m.clone(), v.clone(), torch.empty(n)]
    adam_step(k[0], g, k[1], k[2], predict_out=k[3], **opts)
    exact = _adam_tracked(tracked, w, g, m, v, **opts)
    within_bound(k[0], exact[0], "w")
    within_bound(k[3], exact[3], "pred")


@pytest.mark.parametrize("kwargs,match", [
    (dict(grad=torch.zeros(3)), "same numel"),
    (dict(exp_avg=torch.zeros(8)[::2]), "contiguous"),
    (dict(exp_avg_sq=torch.zeros(4, dtype=torch.bfloat16)), "dtype"),
    (dict(grad=torch.zeros(4, dtype=torch.int8)), "dtype"),
    (dict(exp_avg=torch.zeros(4, device="meta")), "device"),
    (dict(step=0), "step"),
    (dict(predict_out=torch.zeros(4), predict_s=-0.1), "predict_s"),
])
def test_rejects_bad_input(kwargs, match):
    args = dict(param=torch.zeros(4), grad=torch.zeros(4), exp_avg=torch.zeros(4),
                exp_avg_sq=torch.zeros(4), step=1, **BASE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        adam_step(args.pop("param"), args.pop("grad"), args.pop("exp_avg"),
                  args.pop("exp_avg_sq"), **args)


def _adam_tracked(T, w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                  step, predict_s):
    """Adam in the kernel's op order on :class:`Tracked` values: fp64 result + fp32 error bound."""
    w, g, m, v = T(w), T(g), T(m), T(v)
    g = -g if maximize else g
    if weight_decay != 0.0:
        if decoupled:
            w = w * T.const(1.0 - lr * weight_decay)
        else:
            g = g + T.const(weight_decay) * w
    w1 = T.const(1.0 - beta1)
    diff = g - m
    small = float(torch.tensor(1.0 - beta1, dtype=torch.float32)) < 0.5   # the fp32 weight
    m = m + w1 * diff if small else g - diff * (T(1.0) - w1)
    v = v * T.const(beta2) + T.const(1.0 - beta2) * g * g
    step_size = lr / (1.0 - beta1 ** step)
    denom = v.sqrt() / T.const((1.0 - beta2 ** step) ** 0.5) + T.const(eps)
    w = w + T.const(-step_size) * m / denom
    return w, m, v, w + T.const(-predict_s * step_size) * m / denom


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lr=st.floats(1e-5, 0.1), beta1=st.floats(0.0, 0.999), beta2=st.floats(0.0, 0.9999),
       eps=st.sampled_from([1e-8, 1e-6, 1e-3]), weight_decay=st.floats(0.0, 0.5),
       decoupled=st.booleans(), maximize=st.booleans(), step=st.integers(1, 10_000),
       s=st.floats(0.0, 8.0), n=st.integers(1, 2 * BLOCK + 1))
def test_any_hyperparameters_match_reference(lr, beta1, beta2, eps, weight_decay, decoupled,
                                             maximize, step, s, n, tracked, within_bound):
    """Random hyperparameters (both lerp branches, late steps, cancellation) and sizes: kernel and
    reference both lie within the propagated fp32 error bound of the exact result."""
    opts = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                decoupled=decoupled, maximize=maximize, step=step, predict_s=s)
    w, g, m, v = _inputs(n, seed=n)
    k = [w.clone(), m.clone(), v.clone(), torch.empty(n)]
    r = [w.clone(), m.clone(), v.clone(), torch.empty(n)]
    adam_step(k[0], g, k[1], k[2], predict_out=k[3], **opts)
    ref.adam_step(r[0], g, r[1], r[2], predict_out=r[3], **opts)
    exact = _adam_tracked(tracked, w, g, m, v, **opts)
    for name, a, b, t in zip(("w", "m", "v", "pred"), k, r, exact):
        within_bound(a, t, f"kernel {name}")
        within_bound(b, t, f"reference {name}")
