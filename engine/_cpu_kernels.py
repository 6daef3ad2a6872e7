"""Fused CPU optimizer kernels: validated torch-tensor wrappers over ``pipetrain._C.optim``.

Same signatures, semantics and ``ValueError``s as ``pipetrain.kernels.reference``
(CONTRACTS.md §3; the input checks are the shared ``pipetrain.kernels._validate``): every
tensor is a flat 1-D contiguous CPU tensor of the same numel, updated in place. ``param``,
``grad`` and ``predict_out`` may be float32, bfloat16 or float16 (``predict_out`` has
param's dtype); ``momentum_buf``, ``exp_avg``, ``exp_avg_sq``,
``master`` and ``found_inf`` (one element) are float32. All maths is fp32, one pass over
memory, split across ``get_num_threads()`` threads with the GIL released.

Numerics: the C++ applies torch.optim's op order, with an FMA exactly where torch's CPU ops
fuse (add with alpha, lerp, addcmul), so fp32 results equal torch's bit for bit, except that
torch's CPU sqrt is not always correctly rounded (we use IEEE sqrt): an Adam element can
then differ by an ulp (measured: ~1e-3 of elements).
Bad input raises ``ValueError`` naming the argument and what is allowed; nothing reaches
the C++ side unchecked (it trusts raw addresses).
"""

from __future__ import annotations

import torch

from pipetrain import _C

# The shared checks (and the lists of buffers each kernel writes, which may not alias any
# other buffer), so the C++, Triton and reference twins raise the same errors.
from pipetrain.kernels._validate import ADAM_WRITES as _ADAM_WRITES
from pipetrain.kernels._validate import SGD_WRITES as _SGD_WRITES
from pipetrain.kernels._validate import (check_adam_options, check_distance, check_sgd_options,
                                         check_step, check_tensors)

_ops = _C.optim

#: dtype -> the code the C++ kernels take.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

__all__ = ["sgd_step", "adam_step", "sgd_predict", "adam_predict", "set_num_threads",
           "get_num_threads", "simd_level", "DTYPE_CODES"]


def set_num_threads(n: int) -> None:
    """Threads per kernel call, the caller included (default: all cores, or
    ``PIPETRAIN_NUM_THREADS``). The pool is persistent; resizing restarts it."""
    if int(n) < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _ops.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads each kernel call is split across."""
    return int(_ops.get_num_threads())


def simd_level() -> str:
    """The instruction set the kernels run: 'avx512', 'avx2' or 'scalar' (``PIPETRAIN_SIMD``
    forces a lower one)."""
    return str(_ops.simd_level())


def _cpu(**tensors) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; the fused CPU kernels take CPU tensors "
                             "only (CUDA tensors go to pipetrain.kernels)")


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def sgd_step(param, grad, momentum_buf, *, lr, momentum=0.0, dampening=0.0, nesterov=False,
             weight_decay=0.0, maximize=False, first_step: bool, master=None, found_inf=None,
             predict_out=None, predict_s=0.0) -> None:
    """One fused SGD step (torch.optim.SGD semantics), optionally followed in the same pass
    by the SpecTrain prediction ``predict_out = w_new - predict_s*lr*buf_new``.

    ``momentum_buf`` (fp32) is required when ``momentum != 0`` and ignored otherwise;
    ``first_step`` copies the gradient into it instead of blending.
    """
    buf = momentum_buf if momentum != 0 else None
    check_tensors("param", param, param_like={"grad": grad, "predict_out": predict_out},
                  state_like={"momentum_buf": buf, "master": master}, found_inf=found_inf,
                  written=_SGD_WRITES)
    _cpu(param=param)
    check_sgd_options(momentum, dampening, nesterov, buf)
    s = check_distance("predict_s", predict_s)
    _ops.sgd_step(param.data_ptr(), DTYPE_CODES[param.dtype], grad.data_ptr(),
                  DTYPE_CODES[grad.dtype], _addr(buf), param.numel(), float(lr), float(momentum),
                  float(dampening), bool(nesterov), float(weight_decay), bool(maximize),
                  bool(first_step), _addr(master), _addr(found_inf), _addr(predict_out), s)


def adam_step(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay=0.0,
              decoupled=False, maximize=False, step: int, master=None, found_inf=None,
              predict_out=None, predict_s=0.0) -> None:
    """One fused Adam (``decoupled=False``, L2) or AdamW (``decoupled=True``) step, torch
    semantics, ``step`` being the count after this update (>= 1); optionally followed in the
    same pass by the XPipe prediction ``predict_out = w_new - s*lr*mhat/(sqrt(vhat)+eps)``.
    """
    if exp_avg is None or exp_avg_sq is None:
        raise ValueError("exp_avg and exp_avg_sq (fp32, same numel as param) are required")
    check_tensors("param", param, param_like={"grad": grad, "predict_out": predict_out},
                  state_like={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "master": master},
                  found_inf=found_inf, written=_ADAM_WRITES)
    _cpu(param=param)
    check_adam_options(beta1, beta2, eps)
    t = check_step(step, minimum=1)
    s = check_distance("predict_s", predict_s)
    _ops.adam_step(param.data_ptr(), DTYPE_CODES[param.dtype], grad.data_ptr(),
                   DTYPE_CODES[grad.dtype], exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                   param.numel(), float(lr), float(beta1), float(beta2), float(eps),
                   float(weight_decay), bool(decoupled), bool(maximize), t, _addr(master),
                   _addr(found_inf), _addr(predict_out), s)


def sgd_predict(param, momentum_buf, out, *, s, lr) -> None:
    """``out = w - s*lr*v`` (SpecTrain); ``momentum_buf`` None gives ``out = w``.
    ``param`` may be an fp32 master and ``out`` any supported dtype."""
    if out is None:
        raise ValueError("out (fp32/bf16/fp16, same numel as param) is required")
    check_tensors("param", param, param_like={"out": out},
                  state_like={"momentum_buf": momentum_buf}, written=("out",))
    _cpu(param=param)
    s = check_distance("s", s)
    _ops.sgd_predict(param.data_ptr(), DTYPE_CODES[param.dtype], _addr(momentum_buf),
                     out.data_ptr(), DTYPE_CODES[out.dtype], param.numel(), s, float(lr))


def adam_predict(param, exp_avg, exp_avg_sq, out, *, s, lr, beta1, beta2, eps, step) -> None:
    """``out = w - s*lr*mhat/(sqrt(vhat)+eps)`` (XPipe), bias-corrected at ``step``;
    ``step == 0`` (no update yet) gives ``out = w``."""
    if exp_avg is None or exp_avg_sq is None or out is None:
        raise ValueError("exp_avg, exp_avg_sq (fp32) and out are required")
    check_tensors("param", param, param_like={"out": out},
                  state_like={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, written=("out",))
    _cpu(param=param)
    check_adam_options(beta1, beta2, eps)
    t = check_step(step, minimum=0)
    s = check_distance("s", s)
    _ops.adam_predict(param.data_ptr(), DTYPE_CODES[param.dtype], exp_avg.data_ptr(),
                      exp_avg_sq.data_ptr(), out.data_ptr(), DTYPE_CODES[out.dtype],
                      param.numel(), s, float(lr), float(beta1), float(beta2), float(eps), t)
