"""Triton fused weight prediction (kernels/predict.py): SpecTrain's momentum form and XPipe's Adam form.

Checks against the torch reference and fp64 maths, the closed forms the papers rely on (zero
state -> identity; at a fixed point / under a constant gradient the prediction for distance s
equals the weights s real steps later), and that the fused update-then-predict equals a step
followed by a prediction, bit for bit. Runs under TRITON_INTERPRET=1 on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

import pipetrain.kernels as K
from pipetrain.kernels import reference as ref
from pipetrain.kernels._launch import BLOCK

SIZES = [1, 7, BLOCK + 3, 4 * BLOCK + 1]
LOW = [torch.bfloat16, torch.float16]
ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
EPS32 = 2.0 ** -23
IMPLS = {"triton": K, "reference": ref}


def _state(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen),
            0.01 * torch.rand(n, generator=gen))


def _ulp32(x: torch.Tensor) -> torch.Tensor:
    _, e = torch.frexp(x.double().abs().clamp_min(2.0 ** -126))
    return EPS32 * torch.pow(2.0, (e - 1).double())


# ---- kernel vs reference -------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("s", [0.0, 1.0, 2.5])
def test_sgd_predict_fp32_matches_reference(s, n, fp32_close):
    w, v, _ = _state(n, seed=n)
    out_k, out_r = torch.empty(n), torch.empty(n)
    K.sgd_predict(w, v, out_k, s=s, lr=0.1)
    ref.sgd_predict(w, v, out_r, s=s, lr=0.1)
    fp32_close(out_k, out_r)
    torch.testing.assert_close(out_k.double(), w.double() - s * 0.1 * v.double(),
                               rtol=4 * EPS32, atol=4 * EPS32 * w.abs().max().item())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("s,step", [(1.0, 1), (2.5, 10), (0.0, 3)])
def test_adam_predict_fp32_matches_reference(s, step, n, fp32_close):
    w, m, v = _state(n, seed=n + 1)
    out_k, out_r = torch.empty(n), torch.empty(n)
    K.adam_predict(w, m, v, out_k, s=s, step=step, **ADAM)
    ref.adam_predict(w, m, v, out_r, s=s, step=step, **ADAM)
    fp32_close(out_k, out_r)
    mhat, vhat = m.double() / (1 - 0.9 ** step), v.double() / (1 - 0.999 ** step)
    w64 = w.double() - s * ADAM["lr"] * mhat / (vhat.sqrt() + ADAM["eps"])
    torch.testing.assert_close(out_k.double(), w64, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_three_way(dtype, n, three_way, within_one_ulp):
    """bf16/fp16 weights and output: fp32 maths, one rounding; plain torch computes in dtype."""
    w32, m, v = _state(n, seed=300 + n)
    w, s, lr = w32.to(dtype), 3.0, 0.1
    out_k, out_r = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    K.sgd_predict(w, m, out_k, s=s, lr=lr)
    ref.sgd_predict(w, m, out_r, s=s, lr=lr)
    within_one_ulp(out_k, out_r)
    three_way(out_k, w - (s * lr) * m.to(dtype), w.double() - s * lr * m.double())

    K.adam_predict(w, m, v, out_k, s=s, step=5, **ADAM)
    ref.adam_predict(w, m, v, out_r, s=s, step=5, **ADAM)
    within_one_ulp(out_k, out_r)
    b1, b2 = 1 - ADAM["beta1"] ** 5, 1 - ADAM["beta2"] ** 5
    plain = w - (s * ADAM["lr"]) * (m.to(dtype) / b1) / ((v.to(dtype) / b2).sqrt() + ADAM["eps"])
    u64 = (m.double() / b1) / ((v.double() / b2).sqrt() + ADAM["eps"])
    three_way(out_k, plain, w.double() - s * ADAM["lr"] * u64)


def test_fp32_master_into_low_precision_out(within_one_ulp):
    """Mixed precision: predict from the fp32 master straight into a bf16 buffer."""
    w, m, v = _state(BLOCK + 3, seed=7)
    out_k, out_r = (torch.empty(BLOCK + 3, dtype=torch.bfloat16) for _ in range(2))
    K.adam_predict(w, m, v, out_k, s=2.0, step=4, **ADAM)
    ref.adam_predict(w, m, v, out_r, s=2.0, step=4, **ADAM)
    within_one_ulp(out_k, out_r)


# ---- closed forms ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl", list(IMPLS))
def test_zero_state_is_identity(impl):
    """v = 0 (SpecTrain) or m = v = 0 (XPipe, any step; m/(sqrt(0)+eps) = 0), and step = 0 with
    any moments (no update yet): the prediction is the weights themselves, bit for bit."""
    mod = IMPLS[impl]
    n = BLOCK + 3
    w, m, v = _state(n, seed=9)
    zeros, out = torch.zeros(n), torch.empty(n)
    mod.sgd_predict(w, zeros, out, s=4.0, lr=0.5)
    assert torch.equal(out, w)
    mod.adam_predict(w, zeros, zeros, out, s=4.0, step=3, **ADAM)
    assert torch.equal(out, w)
    out.fill_(123.0)
    mod.adam_predict(w, m, v, out, s=4.0, step=0, **ADAM)
    assert torch.equal(out, w)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.9, 0.1, False), (0.8, 0.0, True),
                                                          (0.5, 0.5, False)])
@pytest.mark.parametrize("s", [1, 3])
def test_sgd_prediction_is_exact_at_the_momentum_fixed_point(impl, momentum, dampening,
                                                             nesterov, s):
    """Constant gradient g. The buffer recurrence buf <- mu*buf + (1-d)*g has the fixed point
        v* = mu*v* + (1-d)*g   =>   v* = (1-d)*g / (1-mu).
    With buf = v*, every later step moves w by -lr*v* (Nesterov with d = 0 too: g + mu*v* =
    g/(1-mu) = v*), so after s steps w_s = w - s*lr*v* = the prediction for distance s."""
    mod = IMPLS[impl]
    n, lr = BLOCK + 3, 0.05
    w, g, _ = _state(n, seed=10)
    v_star = (1 - dampening) * g / (1 - momentum)
    pred = torch.empty(n)
    mod.sgd_predict(w, v_star, pred, s=float(s), lr=lr)
    w_run, buf = w.clone(), v_star.clone()
    for _ in range(s):
        mod.sgd_step(w_run, g, buf, lr=lr, momentum=momentum, dampening=dampening,
                     nesterov=nesterov, first_step=False)
    # Exact in real arithmetic; fp32 rounding of w (an ulp per step) and of v* (a few ulps).
    tol = (s + 1) * _ulp32(w) + 8 * s * lr * EPS32 * v_star.abs().double()
    assert ((pred.double() - w_run.double()).abs() <= tol).all()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_sgd_prediction_error_off_the_fixed_point(impl):
    """Off the fixed point (buf = v arbitrary), one real step gives
        w_1 = w - lr*(mu*v + (1-d)*g),   prediction w - lr*v,
    so prediction - w_1 = lr*(mu*v + (1-d)*g - v) = lr*(1-mu)*(v* - v), v* = (1-d)g/(1-mu)."""
    mod = IMPLS[impl]
    n, lr, mu, d = BLOCK + 3, 0.05, 0.9, 0.2
    w, g, v = _state(n, seed=12)
    pred, w1, buf = torch.empty(n), w.clone(), v.clone()
    mod.sgd_predict(w, v, pred, s=1.0, lr=lr)
    mod.sgd_step(w1, g, buf, lr=lr, momentum=mu, dampening=d, first_step=False)
    v_star = (1 - d) * g.double() / (1 - mu)
    expected = lr * (1 - mu) * (v_star - v.double())
    tol = 2 * _ulp32(w) + 8 * lr * EPS32 * (v.abs() + g.abs()).double()
    assert ((pred.double() - w1.double() - expected).abs() <= tol).all()
    assert expected.abs().max() > 1000 * tol.max()    # the difference is real, not rounding


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("t,s", [(1, 1), (5, 1), (5, 3)])
def test_adam_prediction_under_constant_gradient(impl, t, s):
    """Constant gradient g from zero moments. After t steps
        m_t = (1 - b1^t) g,  v_t = (1 - b2^t) g^2   =>   mhat_t = g,  vhat_t = g^2  for every t,
    so each step moves w by -lr*u with u = g/(|g| + eps), whatever t. The prediction from step t
    for distance s is w_t - s*lr*mhat_t/(sqrt(vhat_t)+eps) = w_t - s*lr*u = w_{t+s}: the
    difference due to bias correction between predicting from t and stepping to t+s is exactly
    0. Without bias correction the predictor would be off by
        s*lr*(u - (1-b1^t) g / (sqrt(1-b2^t)|g| + eps)),
    which we also compute, to show that this test can tell the two apart."""
    mod = IMPLS[impl]
    n, lr, b1, b2, eps = BLOCK + 3, ADAM["lr"], ADAM["beta1"], ADAM["beta2"], ADAM["eps"]
    w, g, _ = _state(n, seed=14)
    m, v = torch.zeros(n), torch.zeros(n)
    for k in range(1, t + 1):
        mod.adam_step(w, g, m, v, step=k, **ADAM)
    pred = torch.empty(n)
    mod.adam_predict(w, m, v, pred, s=float(s), step=t, **ADAM)
    w_run = w.clone()
    for k in range(t + 1, t + s + 1):
        mod.adam_step(w_run, g, m, v, step=k, **ADAM)

    g64 = g.double()
    u = g64 / (g64.abs() + eps)
    torch.testing.assert_close(w_run.double(), w.double() - s * lr * u, rtol=0,
                               atol=4 * s * _ulp32(w).max().item())
    tol = (s + 1) * _ulp32(w) + 16 * s * lr * EPS32
    diff = (pred.double() - w_run.double()).abs()
    assert (diff <= tol).all(), f"max {diff.max().item()} vs tol {tol.max().item()}"
    uncorrected = s * lr * (u - (1 - b1 ** t) * g64 / ((1 - b2 ** t) ** 0.5 * g64.abs() + eps))
    assert uncorrected.abs().min() > 100 * tol.max()


# ---- fused update-then-predict --------------------------------------------------------------

@pytest.mark.parametrize("master", [False, True])
def test_fused_sgd_step_equals_step_then_predict(master):
    """One pass (step + prediction) equals a step followed by a prediction from the new fp32
    weights (the master in mixed precision), bit for bit."""
    n, s = 4 * BLOCK + 1, 2.0
    w, g, buf = _state(n, seed=16)
    dtype = torch.bfloat16 if master else torch.float32
    opts = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, first_step=False)

    def fresh():   # param (copied even when dtype is fp32), buffer, master, prediction
        return (w.to(dtype, copy=True), buf.clone(), w.clone() if master else None,
                torch.empty(n, dtype=dtype))

    (pa, ba, ma, outa), (pb, bb, mb, outb) = fresh(), fresh()
    K.sgd_step(pa, g, ba, master=ma, predict_out=outa, predict_s=s, **opts)
    K.sgd_step(pb, g, bb, master=mb, **opts)
    K.sgd_predict(mb if master else pb, bb, outb, s=s, lr=opts["lr"])
    for a, b in ((pa, pb), (ba, bb), (outa, outb)) + (((ma, mb),) if master else ()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("master", [False, True])
def test_fused_adam_step_equals_step_then_predict(master):
    n, s, step = 4 * BLOCK + 1, 3.0, 6
    w, m, v = _state(n, seed=17)
    g = torch.randn(n, generator=torch.Generator().manual_seed(18))
    dtype = torch.float16 if master else torch.float32
    opts = dict(ADAM, weight_decay=0.1, decoupled=True, step=step)

    def fresh():   # param (copied even when dtype is fp32), m, v, master, prediction
        return [w.to(dtype, copy=True), m.clone(), v.clone(), w.clone() if master else None,
                torch.empty(n, dtype=dtype)]

    a, b = fresh(), fresh()
    K.adam_step(a[0], g, a[1], a[2], master=a[3], predict_out=a[4], predict_s=s, **opts)
    K.adam_step(b[0], g, b[1], b[2], master=b[3], **opts)
    K.adam_predict(b[3] if master else b[0], b[1], b[2], b[4], s=s, step=step, **ADAM)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", list(IMPLS))
def test_rejects_bad_input(impl):
    mod = IMPLS[impl]
    z = torch.zeros(4)
    with pytest.raises(ValueError, match="s must be"):
        mod.sgd_predict(z, z, torch.zeros(4), s=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="s must be"):
        mod.adam_predict(z, z, z, torch.zeros(4), s=float("nan"), step=1, **ADAM)
    with pytest.raises(ValueError, match="dtype"):
        mod.sgd_predict(z, z, torch.zeros(4, dtype=torch.float64), s=1.0, lr=0.1)
    with pytest.raises(ValueError, match="same numel"):
        mod.adam_predict(z, z, torch.zeros(5), torch.zeros(4), s=1.0, step=1, **ADAM)
    with pytest.raises(ValueError, match="step"):
        mod.adam_predict(z, z, z, torch.zeros(4), s=1.0, step=-1, **ADAM)
