"""Triton fused SGD step (momentum, dampening, Nesterov, weight decay, maximize), optionally update-then-predict.

One kernel, one pass: each element of w, g and the momentum buffer is read once and the new w
(and master), the new buffer and, if asked, SpecTrain's predicted weights are written once.
Semantics, signature and errors are those of :func:`pipetrain.kernels.reference.sgd_step`.

Scalars (lr, momentum, dampening, weight decay, s) are ordinary fp32 kernel arguments, so
changing them between steps never recompiles; only the structural switches (momentum on/off,
first step, Nesterov, weight decay on/off, maximize, master / found_inf / predict present) are
compile-time constants — at most a few variants per run. Every host-side scalar is computed in
Python (fp64) and rounded once to fp32 when passed, exactly as torch.optim applies its scalars,
so the kernel issues the reference's fp32 operations in the reference's order.

Bytes moved per element (p = bytes of param/grad/predict dtype, fp32 state = 4):
    read  g (p) + w (4 with master, else p) + buf (4, not on the first step)
    write buf (4) + w (p) + master (4, if given) + predict_out (p, if given)
    e.g. fp32, momentum, no master: 12 read + 8 write = 20 B; +4 B for the fused prediction,
    versus 20 + 12 (a separate predict pass re-reading w and buf) = 32 B unfused.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._dtypes import load_f32, store_f32
from ._launch import check_runnable, launch_config
from ._step import load_weights, step_lanes, store_weights
from ._validate import SGD_WRITES, check_distance, check_sgd_options, check_tensors

__all__ = ["sgd_step"]


@triton.jit
def _sgd_step_kernel(
    param_ptr, grad_ptr, buf_ptr, master_ptr, found_inf_ptr, pred_ptr, n,
    neg_lr, momentum, one_minus_dampening, weight_decay, neg_pred_lr,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
    HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, HAS_PREDICT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask = step_lanes(found_inf_ptr, n, BLOCK, HAS_FOUND_INF)
    w = load_weights(param_ptr, master_ptr, offs, mask, HAS_MASTER)   # all maths in fp32
    g = load_f32(grad_ptr, offs, mask)
    if MAXIMIZE:
        g = -g                                   # g = -grad
    if HAS_WD:
        g = g + weight_decay * w                 # g = g + wd*w          (L2 penalty)
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = g                              # buf = g               (torch clones g)
        else:
            buf = tl.load(buf_ptr + offs, mask=mask, other=0.0)
            buf = buf * momentum + one_minus_dampening * g   # buf = mu*buf + (1-damp)*g
        tl.store(buf_ptr + offs, buf, mask=mask)
        if NESTEROV:
            d = g + momentum * buf               # d = g + mu*buf
        else:
            d = buf                              # d = buf
    else:
        buf = g                                  # no momentum: the direction is g itself
        d = g
    w = w + neg_lr * d                           # w = w - lr*d

    store_weights(param_ptr, master_ptr, offs, w, mask, HAS_MASTER)   # master = w, param = round(w)
    if HAS_PREDICT:
        # SpecTrain: w_hat = w_new - s*lr*buf_new, from the fp32 w_new, same pass.
        store_f32(pred_ptr, offs, w + neg_pred_lr * buf, mask)


def sgd_step(param: torch.Tensor, grad: torch.Tensor, momentum_buf: Optional[torch.Tensor], *,
             lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
             weight_decay: float = 0.0, maximize: bool = False, first_step: bool,
             master: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
             predict_out: Optional[torch.Tensor] = None, predict_s: float = 0.0) -> None:
    """Fused SGD step on flat CUDA buffers; see :func:`pipetrain.kernels.reference.sgd_step`.

    Args:
        param: (N,) fp32/bf16/fp16 weights, updated in place.
        grad: (N,) fp32/bf16/fp16 gradient.
        momentum_buf: (N,) fp32 momentum buffer, updated in place; None allowed iff momentum == 0.
        lr, momentum, dampening, nesterov, weight_decay, maximize: as torch.optim.SGD.
        first_step: True on the buffer's first step (buf = g; buf is not read).
        master: optional (N,) fp32 master weights (mixed precision).
        found_inf: optional 1-element fp32 flag; nonzero -> nothing is read or written.
        predict_out: optional (N,) fp32/bf16/fp16 output: w_new - predict_s*lr*buf_new.
        predict_s: version distance >= 0.

    Raises:
        ValueError: bad dtype/shape/device/numel/contiguity/options, predict_s < 0, or CPU
            tensors outside the Triton interpreter.
    """
    check_tensors("param", param, param_like={"grad": grad, "predict_out": predict_out},
                  state_like={"momentum_buf": momentum_buf, "master": master}, found_inf=found_inf,
                  written=SGD_WRITES)
    check_sgd_options(momentum, dampening, nesterov, momentum_buf)
    s = check_distance("predict_s", predict_s)
    check_runnable(_sgd_step_kernel, param.device)
    n = param.numel()
    if n == 0:
        return
    has_momentum = momentum != 0.0
    launch = launch_config(n)
    _sgd_step_kernel[launch.grid](
        param, grad, momentum_buf if has_momentum else param,
        master if master is not None else param,
        found_inf if found_inf is not None else param,
        predict_out if predict_out is not None else param, n,
        float(-lr), float(momentum), float(1.0 - dampening), float(weight_decay),
        float(-s * lr),
        HAS_MOMENTUM=has_momentum, FIRST_STEP=bool(first_step), NESTEROV=bool(nesterov),
        HAS_WD=weight_decay != 0.0, MAXIMIZE=bool(maximize), HAS_MASTER=master is not None,
        HAS_FOUND_INF=found_inf is not None, HAS_PREDICT=predict_out is not None,
        BLOCK=launch.block, num_warps=launch.num_warps)
