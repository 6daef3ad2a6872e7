"""Triton fused Adam / AdamW step (bias correction, L2 or decoupled decay), optionally update-then-predict.

One kernel, one pass: each element of w, g, m and v is read once; the new w (and master), m, v
and, if asked, XPipe's predicted weights are written once. Semantics, signature and errors are
those of :func:`pipetrain.kernels.reference.adam_step`.

Bias correction is computed on the host in fp64 and passed as two fp32 scalars,
``step_size = lr / (1 - b1**t)`` and ``bc2_sqrt = sqrt(1 - b2**t)`` — one rounding each, the
same values torch.optim.Adam applies (it computes them as Python floats). Computing them in
the kernel in fp32 would be worse: ``1 - 0.999**t`` cancels catastrophically for small t
(relative error ~1e-4 at t = 1 after rounding 0.999 to fp32). They are ordinary arguments, not
constexpr, so a new step (or lr, betas, s) never recompiles. (Not CUDA-graph capturable as a
consequence: a captured launch would replay its step's scalars.)

Bytes moved per element (p = bytes of param/grad/predict dtype, fp32 state = 4):
    read  g (p) + w (4 with master, else p) + m (4) + v (4)
    write m (4) + v (4) + w (p) + master (4, if given) + predict_out (p, if given)
    e.g. fp32, no master: 16 read + 12 write = 28 B; +4 B for the fused prediction, versus
    28 + 16 (a separate predict pass re-reading w, m, v and writing out) = 44 B unfused.
    bf16 param/grad + fp32 master: 14 read + 14 write = 28 B (+2 B with prediction).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._dtypes import load_f32, store_f32
from ._launch import check_runnable, launch_config
from ._step import load_weights, step_lanes, store_weights
from ._validate import (ADAM_WRITES, check_adam_options, check_distance, check_step,
                        check_tensors)

__all__ = ["adam_step"]


@triton.jit
def _adam_step_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, found_inf_ptr, pred_ptr, n,
    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
    neg_step_size, bc2_sqrt, neg_pred_step_size,
    HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_MASTER: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_PREDICT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask = step_lanes(found_inf_ptr, n, BLOCK, HAS_FOUND_INF)
    w = load_weights(param_ptr, master_ptr, offs, mask, HAS_MASTER)
    g = load_f32(grad_ptr, offs, mask)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    if MAXIMIZE:
        g = -g                                         # g = -grad
    if HAS_WD:
        if DECOUPLED:
            w = w * decay_factor                       # AdamW: w = w*(1 - lr*wd)
        else:
            g = g + weight_decay * w                   # Adam:  g = g + wd*w
    # m = b1*m + (1-b1)*g, written as torch's lerp(m, g, 1-b1) to match it op for op:
    #   weight < 0.5:  m + wt*(g - m)     else:  g - (g - m)*(1 - wt)
    diff = g - m
    m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * diff,
                 g - diff * (1.0 - one_minus_beta1))
    v = v * beta2 + one_minus_beta2 * g * g            # v = b2*v + (1-b2)*g^2
    # denom = sqrt(v_hat) + eps = sqrt(v)/sqrt(1-b2^t) + eps; IEEE-rounded sqrt and division
    # (tl.sqrt / "/" are approximate on GPUs) so the GPU matches the reference to an ulp or so.
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w + tl.div_rn(neg_step_size * m, denom)        # w = w - lr/(1-b1^t) * m/denom

    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    store_weights(param_ptr, master_ptr, offs, w, mask, HAS_MASTER)   # master = w, param = round(w)
    if HAS_PREDICT:
        # XPipe: w_hat = w_new - s*lr*m_hat/(sqrt(v_hat)+eps), new moments, same denominator.
        store_f32(pred_ptr, offs, w + tl.div_rn(neg_pred_step_size * m, denom), mask)


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
              weight_decay: float = 0.0, decoupled: bool = False, maximize: bool = False,
              step: int, master: Optional[torch.Tensor] = None,
              found_inf: Optional[torch.Tensor] = None, predict_out: Optional[torch.Tensor] = None,
              predict_s: float = 0.0) -> None:
    """Fused Adam/AdamW step on flat CUDA buffers; see :func:`pipetrain.kernels.reference.adam_step`.

    Args:
        param: (N,) fp32/bf16/fp16 weights, updated in place.
        grad: (N,) fp32/bf16/fp16 gradient.
        exp_avg, exp_avg_sq: (N,) fp32 moments, updated in place.
        lr, beta1, beta2, eps, weight_decay, maximize: as torch.optim.Adam.
        decoupled: False = Adam (L2 added to g), True = AdamW (w *= 1 - lr*wd).
        step: int >= 1, the step count after this update.
        master: optional (N,) fp32 master weights (mixed precision).
        found_inf: optional 1-element fp32 flag; nonzero -> nothing is read or written.
        predict_out: optional (N,) fp32/bf16/fp16 output for XPipe's predicted weights.
        predict_s: version distance >= 0.

    Raises:
        ValueError: bad dtype/shape/device/numel/contiguity/options, step < 1, predict_s < 0,
            or CPU tensors outside the Triton interpreter.
    """
    check_tensors("param", param, param_like={"grad": grad, "predict_out": predict_out},
                  state_like={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "master": master},
                  found_inf=found_inf, written=ADAM_WRITES)
    check_adam_options(beta1, beta2, eps)
    t = check_step(step, minimum=1)
    s = check_distance("predict_s", predict_s)
    check_runnable(_adam_step_kernel, param.device)
    n = param.numel()
    if n == 0:
        return
    step_size = lr / (1.0 - beta1 ** t)                # fp64 on host, rounded once to fp32
    launch = launch_config(n)
    _adam_step_kernel[launch.grid](
        param, grad, exp_avg, exp_avg_sq,
        master if master is not None else param,
        found_inf if found_inf is not None else param,
        predict_out if predict_out is not None else param, n,
        float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps), float(weight_decay),
        float(1.0 - lr * weight_decay), float(-step_size), float(math.sqrt(1.0 - beta2 ** t)),
        float(-s * step_size),
        HAS_WD=weight_decay != 0.0, DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize),
        HAS_MASTER=master is not None, HAS_FOUND_INF=found_inf is not None,
        HAS_PREDICT=predict_out is not None, BLOCK=launch.block, num_warps=launch.num_warps)
