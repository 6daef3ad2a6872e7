"""Fused CPU optimizer kernels: validated torch-tensor wrappers over ``pipetrain._C.optim``.

Same signatures and semantics as ``pipetrain.kernels.reference`` (CONTRACTS.md §3): every
tensor is a contiguous CPU tensor of the same numel (any shape; flat buffers are 1-D),
updated in place. ``param`` / ``grad`` / ``predict_out`` may be float32, bfloat16 or float16
(``predict_out`` has param's dtype); ``momentum_buf``, ``exp_avg``, ``exp_avg_sq``,
``master`` and ``found_inf`` (one element) are float32. All maths is fp32, one pass over
memory, split across ``get_num_threads()`` threads with the GIL released.

Bad input raises ``ValueError`` naming the argument and what is allowed; nothing reaches
the C++ side unchecked (it trusts raw addresses).
"""

from __future__ import annotations

import torch

from pipetrain import _C

_ops = _C.optim

#: dtype -> the code the C++ kernels take.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_STATE = (torch.float32,)

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


def _check(name: str, t: torch.Tensor | None, numel: int, dtypes, *, optional: bool = False) -> int:
    """Validate one buffer; return its address (0 if absent and allowed)."""
    if t is None:
        if optional:
            return 0
        raise ValueError(f"{name} is required")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the fused CPU kernels take CPU tensors only "
                         "(CUDA tensors go to pipetrain.kernels)")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; allowed: {allowed}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (a flat buffer or a view of one)")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, param has {numel}")
    return t.data_ptr()


def _found_inf(found_inf: torch.Tensor | None) -> int:
    if found_inf is None:
        return 0
    if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1:
        raise ValueError("found_inf must be a 1-element float32 tensor")
    return _check("found_inf", found_inf, 1, _STATE)


def _check_s(name: str, s: float) -> float:
    s = float(s)
    if not s >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0 (a number of future updates), got {s}")
    return s


def sgd_step(param, grad, momentum_buf, *, lr, momentum=0.0, dampening=0.0, nesterov=False,
             weight_decay=0.0, maximize=False, first_step: bool, master=None, found_inf=None,
             predict_out=None, predict_s=0.0) -> None:
    """One fused SGD step (torch.optim.SGD semantics), optionally followed in the same pass
    by the SpecTrain prediction ``predict_out = w_new - predict_s*lr*buf_new``.

    ``momentum_buf`` (fp32) is required when ``momentum != 0`` and ignored otherwise;
    ``first_step`` copies the gradient into it instead of blending.
    """
    n = param.numel() if isinstance(param, torch.Tensor) else -1
    p = _check("param", param, n, DTYPE_CODES)
    g = _check("grad", grad, n, DTYPE_CODES)
    if momentum != 0:
        b = _check("momentum_buf", momentum_buf, n, _STATE)
    else:
        b = 0
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0")
    m = _check("master", master, n, _STATE, optional=True)
    out = _check("predict_out", predict_out, n, (param.dtype,), optional=True)
    s = _check_s("predict_s", predict_s)
    fi = _found_inf(found_inf)
    _ops.sgd_step(p, DTYPE_CODES[param.dtype], g, DTYPE_CODES[grad.dtype], b, n, float(lr),
                  float(momentum), float(dampening), bool(nesterov), float(weight_decay),
                  bool(maximize), bool(first_step), m, fi, out, s)


def adam_step(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay=0.0,
              decoupled=False, maximize=False, step: int, master=None, found_inf=None,
              predict_out=None, predict_s=0.0) -> None:
    """One fused Adam (``decoupled=False``, L2) or AdamW (``decoupled=True``) step, torch
    semantics, ``step`` being the count after this update (>= 1); optionally followed in the
    same pass by the XPipe prediction ``predict_out = w_new - s*lr*mhat/(sqrt(vhat)+eps)``.
    """
    n = param.numel() if isinstance(param, torch.Tensor) else -1
    p = _check("param", param, n, DTYPE_CODES)
    g = _check("grad", grad, n, DTYPE_CODES)
    ea = _check("exp_avg", exp_avg, n, _STATE)
    eas = _check("exp_avg_sq", exp_avg_sq, n, _STATE)
    m = _check("master", master, n, _STATE, optional=True)
    out = _check("predict_out", predict_out, n, (param.dtype,), optional=True)
    s = _check_s("predict_s", predict_s)
    if int(step) < 1:
        raise ValueError(f"step must be >= 1 (the count after this update), got {step}")
    fi = _found_inf(found_inf)
    _ops.adam_step(p, DTYPE_CODES[param.dtype], g, DTYPE_CODES[grad.dtype], ea, eas, n,
                   float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                   bool(decoupled), bool(maximize), int(step), m, fi, out, s)


def sgd_predict(param, momentum_buf, out, *, s, lr) -> None:
    """``out = w - s*lr*v`` (SpecTrain); ``momentum_buf`` None gives ``out = w``.
    ``param`` may be an fp32 master and ``out`` any supported dtype."""
    n = param.numel() if isinstance(param, torch.Tensor) else -1
    p = _check("param", param, n, DTYPE_CODES)
    b = _check("momentum_buf", momentum_buf, n, _STATE, optional=True)
    o = _check("out", out, n, DTYPE_CODES)
    _ops.sgd_predict(p, DTYPE_CODES[param.dtype], b, o, DTYPE_CODES[out.dtype], n,
                     _check_s("s", s), float(lr))


def adam_predict(param, exp_avg, exp_avg_sq, out, *, s, lr, beta1, beta2, eps, step) -> None:
    """``out = w - s*lr*mhat/(sqrt(vhat)+eps)`` (XPipe), bias-corrected at ``step``;
    ``step == 0`` (no update yet) gives ``out = w``."""
    n = param.numel() if isinstance(param, torch.Tensor) else -1
    p = _check("param", param, n, DTYPE_CODES)
    ea = _check("exp_avg", exp_avg, n, _STATE)
    eas = _check("exp_avg_sq", exp_avg_sq, n, _STATE)
    o = _check("out", out, n, DTYPE_CODES)
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    _ops.adam_predict(p, DTYPE_CODES[param.dtype], ea, eas, o, DTYPE_CODES[out.dtype], n,
                      _check_s("s", s), float(lr), float(beta1), float(beta2), float(eps),
                      int(step))
