"""Triton fused SGD step (kernels/sgd.py) against the torch reference, fp64 maths and torch.optim.

Runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py). Sizes cover one element, a
size below one block, a block plus a ragged tail and a multi-block size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipetrain.kernels import reference as ref
from pipetrain.kernels import sgd_step
from pipetrain.kernels._launch import BLOCK

SIZES = [1, 7, BLOCK + 3, 4 * BLOCK + 1]
LOW = [torch.bfloat16, torch.float16]

CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening+wd": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov+maximize": dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True),
    "all": dict(lr=0.05, momentum=0.7, dampening=0.1, weight_decay=0.02, maximize=True),
}


def _inputs(n: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    buf = torch.randn(n, generator=gen)
    return w.to(dtype), g.to(dtype), buf


def _sgd64(w, g, buf, *, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
           maximize=False, first_step):
    """The SGD formula in fp64, written independently of the reference."""
    w, g = w.double(), g.double()
    g = -g if maximize else g
    g = g + weight_decay * w
    if momentum:
        b = g if first_step else momentum * buf.double() + (1 - dampening) * g
        d = g + momentum * b if nesterov else b
    else:
        b = d = g
    return w - lr * d, b


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_matches_reference(name, first_step, n, fp32_close):
    opts = CONFIGS[name]
    w, g, buf = _inputs(n, seed=n)
    pk, pr = torch.empty(n), torch.empty(n)
    bufk = buf.clone() if opts.get("momentum") else None
    bufr = buf.clone() if opts.get("momentum") else None
    wk, wr = w.clone(), w.clone()
    flag = torch.zeros(1)   # a clear flag: the step must run normally
    sgd_step(wk, g, bufk, first_step=first_step, found_inf=flag, predict_out=pk, predict_s=2.5,
             **opts)
    ref.sgd_step(wr, g, bufr, first_step=first_step, predict_out=pr, predict_s=2.5, **opts)
    fp32_close(wk, wr)
    fp32_close(pk, pr)
    if bufk is not None:
        fp32_close(bufk, bufr)
    assert torch.equal(g, _inputs(n, seed=n)[1])      # the gradient is read-only


@pytest.mark.parametrize("name", ["momentum", "all", "nesterov+maximize"])
def test_twenty_steps_match_torch_optim(name, fp32_close):
    """Chained steps (first_step then the steady recurrence) track torch.optim.SGD."""
    opts = CONFIGS[name]
    n = BLOCK + 3
    w0 = torch.randn(n, generator=torch.Generator().manual_seed(11))
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], foreach=False, **opts)
    w, buf = w0.clone(), torch.zeros(n)
    gen = torch.Generator().manual_seed(12)
    for i in range(20):
        g = torch.randn(n, generator=gen)
        p.grad = g.clone()
        opt.step()
        sgd_step(w, g, buf, first_step=(i == 0), **opts)
    # 20 chained steps: per-step differences of an ulp may accumulate, hence 16 ulp.
    fp32_close(w, p.detach(), ulps=16)
    fp32_close(buf, opt.state[p]["momentum_buffer"], ulps=16)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_param_three_way(dtype, n, three_way, within_one_ulp, fp32_close):
    """bf16/fp16 param and grad, no master: fp32 maths inside, one rounding at the store."""
    opts = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)
    w, g, buf = _inputs(n, seed=100 + n, dtype=dtype)
    wk, bufk, pk = w.clone(), buf.clone(), torch.empty(n, dtype=dtype)
    sgd_step(wk, g, bufk, first_step=False, predict_out=pk, predict_s=2.0, **opts)

    wr, bufr, pr = w.clone(), buf.clone(), torch.empty(n, dtype=dtype)
    ref.sgd_step(wr, g, bufr, first_step=False, predict_out=pr, predict_s=2.0, **opts)
    within_one_ulp(wk, wr)
    within_one_ulp(pk, pr)
    fp32_close(bufk, bufr)

    # Plain torch at the same dtype: torch.optim.SGD on a low-precision param (state in dtype).
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([p], foreach=False, **opts)
    opt.state[p]["momentum_buffer"] = buf.to(dtype)
    p.grad = g.clone()
    opt.step()
    w64, b64 = _sgd64(w, g, buf, first_step=False, **opts)
    three_way(wk, p.detach(), w64)
    plain_pred = p.detach() - (2.0 * opts["lr"]) * opt.state[p]["momentum_buffer"]
    three_way(pk, plain_pred, w64 - 2.0 * opts["lr"] * b64)


@pytest.mark.parametrize("dtype", LOW)
def test_master_weights_follow_fp32_exactly(dtype, fp32_close):
    """bf16/fp16 param + fp32 master: the master evolves bit-for-bit like the same kernel on fp32
    weights, stays within fp32 tolerance of the reference, and param == master rounded (RNE)."""
    n = BLOCK + 3
    opts = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    w32 = torch.randn(n, generator=torch.Generator().manual_seed(21))
    master, param = w32.clone(), w32.to(dtype)
    w_fp32, wr = w32.clone(), w32.clone()
    b_mp, b_fp32, br = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    gen = torch.Generator().manual_seed(22)
    for i in range(4):
        g = torch.randn(n, generator=gen).to(dtype)
        sgd_step(param, g, b_mp, master=master, first_step=(i == 0), **opts)
        sgd_step(w_fp32, g.float(), b_fp32, first_step=(i == 0), **opts)
        ref.sgd_step(wr, g.float(), br, first_step=(i == 0), **opts)
        assert torch.equal(master, w_fp32) and torch.equal(b_mp, b_fp32)
        assert torch.equal(param, master.to(dtype))
    fp32_close(master, wr, ulps=16)


@pytest.mark.parametrize("n", [7, BLOCK + 3])
def test_found_inf_leaves_everything_bit_identical(n):
    w, g, buf = _inputs(n, seed=31, dtype=torch.bfloat16)
    g[n - 1] = float("inf")
    master, pred = w.float() + 0.25, torch.full((n,), 7.0, dtype=torch.bfloat16)
    before = [t.clone() for t in (w, buf, master, pred)]
    flag = torch.ones(1)
    sgd_step(w, g, buf, lr=0.1, momentum=0.9, weight_decay=0.1, first_step=False, master=master,
             found_inf=flag, predict_out=pred, predict_s=1.0)
    for a, b in zip((w, buf, master, pred), before):
        assert torch.equal(a, b)
    flag.zero_()                                       # clear flag: the same call now updates
    g[n - 1] = 0.0
    sgd_step(w, g, buf, lr=0.1, momentum=0.9, first_step=False, master=master, found_inf=flag)
    assert not torch.equal(master, before[2])


def test_momentum_zero_needs_no_buffer(fp32_close):
    w, g, _ = _inputs(BLOCK + 3, seed=41)
    wk, wr, pk, pr = w.clone(), w.clone(), torch.empty_like(w), torch.empty_like(w)
    sgd_step(wk, g, None, lr=0.1, weight_decay=0.1, first_step=True, predict_out=pk, predict_s=3.0)
    ref.sgd_step(wr, g, None, lr=0.1, weight_decay=0.1, first_step=True, predict_out=pr,
                 predict_s=3.0)
    fp32_close(wk, wr)
    fp32_close(pk, pr)


@pytest.mark.parametrize("change,match", [
    (dict(grad=torch.zeros(5)), "same numel"),
    (dict(grad=torch.zeros(8)[::2]), "contiguous"),
    (dict(grad=torch.zeros(4, dtype=torch.float64)), "dtype"),
    (dict(momentum_buf=torch.zeros(4, dtype=torch.float16)), "dtype"),
    (dict(master=torch.zeros(4, dtype=torch.bfloat16)), "dtype"),
    (dict(grad=torch.zeros(4, device="meta")), "device"),
    (dict(predict_out=torch.zeros(4), predict_s=-1.0), "predict_s"),
    (dict(found_inf=torch.zeros(1, dtype=torch.int32)), "found_inf"),
])
def test_rejects_bad_input(change, match):
    args = dict(param=torch.zeros(4), grad=torch.zeros(4), momentum_buf=torch.zeros(4))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        sgd_step(args.pop("param"), args.pop("grad"), args.pop("momentum_buf"), lr=0.1,
                 momentum=0.9, first_step=True, **args)



def _sgd_tracked(T, w, g, buf, *, lr, momentum, dampening, nesterov, weight_decay, maximize,
                 first_step, predict_s):
    """SGD in the kernel's op order on :class:`Tracked` values: fp64 result + fp32 error bound."""
    w, g, buf = T(w), T(g), T(buf)
    g = -g if maximize else g
    if weight_decay != 0.0:
        g = g + T.const(weight_decay) * w
    if momentum != 0.0:
        buf = g if first_step else buf * T.const(momentum) + T.const(1.0 - dampening) * g
        d = g + T.const(momentum) * buf if nesterov else buf
    else:
        buf = d = g
    w = w + T.const(-lr) * d
    return w, buf, w + T.const(-predict_s * lr) * buf


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lr=st.floats(1e-4, 1.0), momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       dampening=st.floats(0.0, 0.9), nesterov=st.booleans(), weight_decay=st.floats(0.0, 0.5),
       maximize=st.booleans(), first_step=st.booleans(), s=st.floats(0.0, 8.0),
       n=st.integers(1, 2 * BLOCK + 1))
def test_any_hyperparameters_match_reference(lr, momentum, dampening, nesterov, weight_decay,
                                             maximize, first_step, s, n, tracked, within_bound):
    """Random hyperparameters (torch.optim's valid region) and sizes: kernel and reference both
    lie within the propagated fp32 error bound of the exact result."""
    if nesterov:
        momentum, dampening = max(momentum, 0.5), 0.0
    opts = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                weight_decay=weight_decay, maximize=maximize, first_step=first_step,
                predict_s=s)
    w, g, buf = _inputs(n, seed=n)
    k = [w.clone(), buf.clone() if momentum else None, torch.empty(n)]
    r = [w.clone(), buf.clone() if momentum else None, torch.empty(n)]
    sgd_step(k[0], g, k[1], predict_out=k[2], **opts)
    ref.sgd_step(r[0], g, r[1], predict_out=r[2], **opts)
    exact = _sgd_tracked(tracked, w, g, buf, **opts)
    for name, a, b, t in zip(("w", "buf", "pred"), k, r, exact):
        if a is not None:
            within_bound(a, t, f"kernel {name}")
            within_bound(b, t, f"reference {name}")
