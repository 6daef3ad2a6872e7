"""Plain-torch references for the fused optimizer and weight-prediction kernels (the authoritative semantics).

Every function here has the same signature and semantics as its Triton twin exported by
``pipetrain.kernels`` and as the fused C++ CPU kernel behind ``pipetrain._C.optim``. All tensors
are flat 1-D contiguous buffers with equal numel; updates are in place.

Numerics. Maths is fp32: ``param``/``grad`` may be bf16/fp16/fp32 and are upcast; state and
``master`` are fp32. Or maths is fp64: a float64 ``param`` makes every tensor float64 (as
torch.optim on float64 parameters); the Triton twins do not take float64, the C++ ones do. The operations, their order and the host-side scalars are exactly those of
``torch.optim.SGD`` / ``torch.optim.Adam`` / ``torch.optim.AdamW`` (single-tensor path): scalars
such as ``1 - dampening``, ``lr / (1 - beta1**step)`` and ``(1 - beta2**step) ** 0.5`` are computed
in Python floats (fp64) and rounded once to fp32 when applied (kept in fp64 maths), as torch does. The first Adam
moment uses ``lerp`` (``m + (1-b1)*(g-m)``), torch's form of ``b1*m + (1-b1)*g``. On flat fp32
buffers the results are bit-identical to torch.optim (tests/kernels/test_reference.py checks
1e-6 over 20 steps); twins that follow the op order written in each docstring (the Triton
kernels, the C++ CPU kernels) agree to a few ulp, the rest being FMA contraction.

found_inf. If given (1-element fp32, nonzero = skip), the step computes its results and then
selects the old values with ``torch.where`` — no ``.item()``, so no host sync on CUDA — leaving
param, master, state and predict_out bit-identical when the flag is set.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._validate import (ADAM_WRITES as _ADAM_WRITES, SGD_WRITES as _SGD_WRITES,
                        check_adam_options, check_distance, check_sgd_options, check_step,
                        check_tensors)

__all__ = ["sgd_step", "adam_step", "sgd_predict", "adam_predict", "non_finite_check"]


def _commit(dst: torch.Tensor, new: torch.Tensor, skip: Optional[torch.Tensor]) -> None:
    """dst <- new (rounded to dst's dtype), or dst unchanged where the found_inf flag is set."""
    if skip is not None:
        new = torch.where(skip, dst.to(new.dtype), new)
    dst.copy_(new)


def _skip_mask(found_inf: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if found_inf is None else (found_inf != 0)


def _maths_dtype(param: torch.Tensor) -> torch.dtype:
    """fp64 maths for float64 parameters (every buffer is then float64), else fp32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def sgd_step(param: torch.Tensor, grad: torch.Tensor, momentum_buf: Optional[torch.Tensor], *,
             lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
             weight_decay: float = 0.0, maximize: bool = False, first_step: bool,
             master: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
             predict_out: Optional[torch.Tensor] = None, predict_s: float = 0.0) -> None:
    """One SGD step (momentum, dampening, Nesterov, L2 weight decay, maximize), in place.

    Maths (fp32), as torch.optim.SGD::

        g = -grad if maximize else grad
        g = g + wd * w                                  (if wd != 0)
        buf = g                          if first_step  (if momentum != 0)
        buf = momentum * buf + (1 - dampening) * g      otherwise
        d = g + momentum * buf if nesterov else buf     (d = g if momentum == 0)
        w = w - lr * d
        predict_out = w - predict_s * lr * buf          (SpecTrain; buf is d when momentum == 0)

    Args:
        param: (N,) fp32/bf16/fp16 weights; updated in place (= master rounded if master given).
        grad: (N,) fp32/bf16/fp16 gradient; not modified.
        momentum_buf: (N,) fp32 momentum buffer, updated in place; may be None iff momentum == 0.
        lr, momentum, dampening, nesterov, weight_decay, maximize: as torch.optim.SGD.
        first_step: True on the first step with this buffer (buf = g, no dampening, as torch).
        master: optional (N,) fp32 master weights; the update is applied to it.
        found_inf: optional 1-element fp32 flag; nonzero -> nothing is written.
        predict_out: optional (N,) fp32/bf16/fp16 output for the predicted weights.
        predict_s: version distance s >= 0 for the prediction.

    Raises:
        ValueError: bad dtype, shape, device, numel, contiguity, options, or predict_s < 0.
    """
    check_tensors("param", param, param_like={"grad": grad, "predict_out": predict_out},
                  state_like={"momentum_buf": momentum_buf, "master": master}, found_inf=found_inf,
                  written=_SGD_WRITES, float64=param.dtype == torch.float64)
    check_sgd_options(momentum, dampening, nesterov, momentum_buf)
    s = check_distance("predict_s", predict_s)
    skip = _skip_mask(found_inf)

    dt = _maths_dtype(param)
    w = master.clone() if master is not None else param.to(dt)
    g = grad.to(dt)
    if maximize:
        g = -g
    if weight_decay != 0.0:
        g = g.add(w, alpha=weight_decay)
    if momentum != 0.0:
        if first_step:
            buf = g.clone()
        else:
            buf = momentum_buf.mul(momentum).add_(g, alpha=1.0 - dampening)
        d = g.add(buf, alpha=momentum) if nesterov else buf
    else:
        buf = d = g
    w = w.add(d, alpha=-lr)

    if predict_out is not None:
        _commit(predict_out, w.add(buf, alpha=-s * lr), skip)
    if momentum != 0.0:
        _commit(momentum_buf, buf, skip)
    if master is not None:
        _commit(master, w, skip)
    _commit(param, w, skip)


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
              weight_decay: float = 0.0, decoupled: bool = False, maximize: bool = False,
              step: int, master: Optional[torch.Tensor] = None,
              found_inf: Optional[torch.Tensor] = None, predict_out: Optional[torch.Tensor] = None,
              predict_s: float = 0.0) -> None:
    """One Adam (decoupled=False, L2) or AdamW (decoupled=True) step, in place.

    Maths (fp32), as torch.optim.Adam / AdamW, ``t = step`` the count after this update::

        g = -grad if maximize else grad
        g = g + wd * w                  (Adam, wd != 0)      w = w * (1 - lr*wd)   (AdamW)
        m = m + (1 - b1) * (g - m)      (= b1*m + (1-b1)*g, torch's lerp)
        v = b2 * v + (1 - b2) * g * g
        denom = sqrt(v) / (1 - b2**t)**0.5 + eps      (torch's `** 0.5`: libm pow)
        w = w - (lr / (1 - b1**t)) * m / denom
        predict_out = w - (s * lr / (1 - b1**t)) * m / denom   (XPipe: w - s*lr*mhat/(sqrt(vhat)+eps))

    Args:
        param: (N,) fp32/bf16/fp16 weights; updated in place (= master rounded if master given).
        grad: (N,) fp32/bf16/fp16 gradient; not modified.
        exp_avg, exp_avg_sq: (N,) fp32 moments, updated in place.
        lr, beta1, beta2, eps, weight_decay, maximize: as torch.optim.Adam.
        decoupled: False = Adam's L2 penalty, True = AdamW's decoupled decay.
        step: int >= 1, the step count after this update (1 on the first step).
        master, found_inf, predict_out, predict_s: as in :func:`sgd_step`.

    Raises:
        ValueError: bad dtype, shape, device, numel, contiguity, options, step < 1, predict_s < 0.
    """
    check_tensors("param", param, param_like={"grad": grad, "predict_out": predict_out},
                  state_like={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "master": master},
                  found_inf=found_inf, written=_ADAM_WRITES, float64=param.dtype == torch.float64)
    check_adam_options(beta1, beta2, eps)
    t = check_step(step, minimum=1)
    s = check_distance("predict_s", predict_s)
    skip = _skip_mask(found_inf)

    dt = _maths_dtype(param)
    w = master.clone() if master is not None else param.to(dt)
    g = grad.to(dt)
    if maximize:
        g = -g
    if weight_decay != 0.0:
        if decoupled:
            w = w.mul(1.0 - lr * weight_decay)
        else:
            g = g.add(w, alpha=weight_decay)
    m = exp_avg.lerp(g, 1.0 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1.0 - beta2)
    step_size = lr / (1.0 - beta1 ** t)
    denom = (v.sqrt() / (1.0 - beta2 ** t) ** 0.5).add_(eps)
    w = w.addcdiv(m, denom, value=-step_size)

    if predict_out is not None:
        _commit(predict_out, w.addcdiv(m, denom, value=-s * step_size), skip)
    _commit(exp_avg, m, skip)
    _commit(exp_avg_sq, v, skip)
    if master is not None:
        _commit(master, w, skip)
    _commit(param, w, skip)


def sgd_predict(param: torch.Tensor, momentum_buf: torch.Tensor, out: torch.Tensor, *,
                s: float, lr: float) -> None:
    """SpecTrain momentum-based prediction: ``out = w - s * lr * v`` (fp32 maths, rounded to out).

    Args:
        param: (N,) fp32/bf16/fp16 weights (pass the fp32 master for mixed precision).
        momentum_buf: (N,) fp32 momentum v.
        out: (N,) fp32/bf16/fp16 predicted weights, written.
        s: version distance >= 0 (how many updates happen before this version's gradient lands).
        lr: learning rate.
    """
    check_tensors("param", param, param_like={"out": out}, state_like={"momentum_buf": momentum_buf},
                  written=("out",), float64=param.dtype == torch.float64)
    s = check_distance("s", s)
    out.copy_(param.to(_maths_dtype(param)).add(momentum_buf, alpha=-s * lr))


def adam_predict(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 out: torch.Tensor, *, s: float, lr: float, beta1: float, beta2: float,
                 eps: float, step: int) -> None:
    """XPipe Adam-based prediction: ``out = w - s*lr*mhat/(sqrt(vhat)+eps)``, bias-corrected at ``step``.

    Computed in the update's op order, ``w - (s*lr/(1-b1**t)) * m / (sqrt(v)/sqrt(1-b2**t) + eps)``,
    so a fused update-then-predict equals update followed by this. ``step == 0`` (no update yet,
    bias correction undefined) gives ``out = w``.

    Args:
        param: (N,) fp32/bf16/fp16 weights (pass the fp32 master for mixed precision).
        exp_avg, exp_avg_sq: (N,) fp32 moments m, v after ``step`` updates.
        out: (N,) fp32/bf16/fp16 predicted weights, written.
        s: version distance >= 0.
        lr, beta1, beta2, eps: as the optimizer.
        step: int >= 0, the number of updates folded into m and v.
    """
    check_tensors("param", param, param_like={"out": out},
                  state_like={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, written=("out",),
                  float64=param.dtype == torch.float64)
    check_adam_options(beta1, beta2, eps)
    t = check_step(step, minimum=0)
    s = check_distance("s", s)
    w = param.to(_maths_dtype(param))
    if t == 0:
        out.copy_(w)
        return
    step_size = lr / (1.0 - beta1 ** t)
    denom = (exp_avg_sq.sqrt() / (1.0 - beta2 ** t) ** 0.5).add_(eps)
    out.copy_(w.addcdiv(exp_avg, denom, value=-s * step_size))


def non_finite_check(grad: torch.Tensor, found_inf: torch.Tensor) -> None:
    """Set ``found_inf`` to 1.0 if any element of ``grad`` is inf or NaN; otherwise leave it as is.

    Never clears the flag, so several buffers can be checked into one flag (zero it once per
    step, as AMP's GradScaler does). No host sync.

    Args:
        grad: (N,) fp32/bf16/fp16 gradient buffer.
        found_inf: 1-element fp32 flag on grad's device, updated in place.
    """
    check_tensors("grad", grad, param_like={}, state_like={}, found_inf=found_inf,
                  written=("found_inf",))
    if found_inf is None:
        raise ValueError("found_inf (a 1-element float32 tensor) is required")
    bad = ~torch.isfinite(grad).all()
    found_inf.copy_(torch.where(bad, torch.ones_like(found_inf), found_inf))
