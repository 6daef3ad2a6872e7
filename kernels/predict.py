"""Triton fused weight prediction: SpecTrain (momentum-based) and XPipe (Adam-based), into a separate buffer.

Each kernel reads the weights and the optimizer state once and writes the predicted weights
once; the weights and the state are not modified. Semantics, signatures and errors are those of
:func:`pipetrain.kernels.reference.sgd_predict` / :func:`~pipetrain.kernels.reference.adam_predict`.
The Adam form uses the same operations as the fused step's prediction, so step-then-predict
equals the fused update-then-predict bit for bit. ``s`` and every other scalar is a plain fp32
argument (no recompilation when the distance changes per stage or per pass).

Bytes moved per element (p = bytes of param/out dtype, fp32 state = 4):
    SpecTrain:  read w (p) + v (4), write out (p)            -> fp32: 12 B, bf16: 8 B
    XPipe:      read w (p) + m (4) + v (4), write out (p)    -> fp32: 16 B, bf16: 12 B
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dtypes import load_f32, store_f32
from ._launch import check_runnable, launch_config
from ._validate import check_adam_options, check_distance, check_step, check_tensors

__all__ = ["sgd_predict", "adam_predict"]


@triton.jit
def _sgd_predict_kernel(param_ptr, buf_ptr, out_ptr, n, neg_s_lr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = load_f32(param_ptr, offs, mask)
    v = tl.load(buf_ptr + offs, mask=mask, other=0.0)
    store_f32(out_ptr, offs, w + neg_s_lr * v, mask)            # w_hat = w - s*lr*v


@triton.jit
def _adam_predict_kernel(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, n,
                         eps, bc2_sqrt, neg_pred_step_size, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = load_f32(param_ptr, offs, mask)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    # w_hat = w - s*lr*m_hat/(sqrt(v_hat)+eps)
    #       = w - (s*lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    store_f32(out_ptr, offs, w + tl.div_rn(neg_pred_step_size * m, denom), mask)


def sgd_predict(param: torch.Tensor, momentum_buf: torch.Tensor, out: torch.Tensor, *,
                s: float, lr: float) -> None:
    """SpecTrain prediction ``out = w - s*lr*v`` on flat CUDA buffers (fp32 maths).

    Args:
        param: (N,) fp32/bf16/fp16 weights (pass the fp32 master for mixed precision).
        momentum_buf: (N,) fp32 momentum v.
        out: (N,) fp32/bf16/fp16, written (rounded RNE).
        s: version distance >= 0.
        lr: learning rate.

    Raises:
        ValueError: bad dtype/shape/device/numel/contiguity, s < 0, or CPU tensors outside
            the Triton interpreter.
    """
    check_tensors("param", param, param_like={"out": out}, state_like={"momentum_buf": momentum_buf},
                  written=("out",))
    s = check_distance("s", s)
    check_runnable(_sgd_predict_kernel, param.device)
    n = param.numel()
    if n == 0:
        return
    launch = launch_config(n)
    _sgd_predict_kernel[launch.grid](param, momentum_buf, out, n, float(-s * lr),
                                     BLOCK=launch.block, num_warps=launch.num_warps)


def adam_predict(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 out: torch.Tensor, *, s: float, lr: float, beta1: float, beta2: float,
                 eps: float, step: int) -> None:
    """XPipe prediction ``out = w - s*lr*mhat/(sqrt(vhat)+eps)`` on flat CUDA buffers (fp32 maths).

    Args:
        param: (N,) fp32/bf16/fp16 weights (pass the fp32 master for mixed precision).
        exp_avg, exp_avg_sq: (N,) fp32 moments after ``step`` updates.
        out: (N,) fp32/bf16/fp16, written (rounded RNE).
        s: version distance >= 0.
        lr, beta1, beta2, eps: as the optimizer.
        step: int >= 0; 0 (no update yet, bias correction undefined) copies w to out.

    Raises:
        ValueError: bad dtype/shape/device/numel/contiguity/options, s < 0, step < 0, or CPU
            tensors outside the Triton interpreter.
    """
    check_tensors("param", param, param_like={"out": out},
                  state_like={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, written=("out",))
    check_adam_options(beta1, beta2, eps)
    t = check_step(step, minimum=0)
    s = check_distance("s", s)
    check_runnable(_adam_predict_kernel, param.device)
    n = param.numel()
    if n == 0:
        return
    if t == 0:
        out.copy_(param)          # m = v = 0 and no bias correction yet: the prediction is w
        return
    step_size = lr / (1.0 - beta1 ** t)                        # fp64 on host, one fp32 rounding
    launch = launch_config(n)
    _adam_predict_kernel[launch.grid](
        param, exp_avg, exp_avg_sq, out, n, float(eps), float(math.sqrt(1.0 - beta2 ** t)),
        float(-s * step_size), BLOCK=launch.block, num_warps=launch.num_warps)
