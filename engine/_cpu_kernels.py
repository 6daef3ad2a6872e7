"""Fused CPU optimizer kernels: validated torch-tensor wrappers over ``pipetrain._C.optim``.

Same signatures, semantics and ``ValueError``s as ``pipetrain.kernels.reference``
(CONTRACTS.md §3; the input checks are the shared ``pipetrain.kernels._validate``): every
tensor is a flat 1-D contiguous CPU tensor of the same numel, updated in place. ``param``,
``grad`` and ``predict_out`` may be float32, bfloat16 or float16 (``predict_out`` has
param's dtype); ``momentum_buf``, ``exp_avg``, ``exp_avg_sq``,
``master`` and ``found_inf`` (one element) are float32. All maths is fp32, one pass over
memory, split across ``get_num_threads()`` threads with the GIL released.
float64: a float64 ``param`` makes the call fp64 throughout — ``grad``, state, ``master``
and outputs must be float64 too (``found_inf`` stays fp32) — and runs the same kernel body
compiled for doubles (AVX-512/AVX2/scalar), with torch's op order and FMAs.

The ``*_multi`` forms run one kernel over a list of parameters (each its own tensors and, for
Adam, its own step) in one call: the elements of all of them are split across the threads as
one range, so 64 small tensors cost one parallel pass instead of 64 inline calls.

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
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

__all__ = ["sgd_step", "adam_step", "sgd_predict", "adam_predict", "sgd_step_multi",
           "adam_step_multi", "sgd_predict_multi", "adam_predict_multi", "set_num_threads",
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
                  written=_SGD_WRITES, float64=param.dtype == torch.float64)
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
                  found_inf=found_inf, written=_ADAM_WRITES, float64=param.dtype == torch.float64)
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
                  state_like={"momentum_buf": momentum_buf}, written=("out",),
                  float64=param.dtype == torch.float64)
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
                  state_like={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, written=("out",),
                  float64=param.dtype == torch.float64)
    _cpu(param=param)
    check_adam_options(beta1, beta2, eps)
    t = check_step(step, minimum=0)
    s = check_distance("s", s)
    _ops.adam_predict(param.data_ptr(), DTYPE_CODES[param.dtype], exp_avg.data_ptr(),
                      exp_avg_sq.data_ptr(), out.data_ptr(), DTYPE_CODES[out.dtype],
                      param.numel(), s, float(lr), float(beta1), float(beta2), float(eps), t)


# --- lists of parameters ------------------------------------------------------------------
def _addrs(ts) -> list[int]:
    return [] if ts is None else [0 if t is None else t.data_ptr() for t in ts]


def _check_list(n: int, **lists) -> None:
    for name, ts in lists.items():
        if ts is not None and len(ts) != n:
            raise ValueError(f"{name} has {len(ts)} entries for {n} parameters")


def _at(ts, i):
    return None if ts is None else ts[i]


def _check_same_dtype(first: list, second: list, names: str) -> None:
    if len({t.dtype for t in first}) > 1 or len({t.dtype for t in second}) > 1:
        raise ValueError(f"every {names} of a list call has one dtype (group them by dtype)")


def _check_counters(steps, step_tensors, validate: bool) -> bool:
    """Exactly one of steps / step_tensors; the counters are 1-element CPU tensors of one
    dtype (fp32 or fp64). Returns whether they are fp64."""
    if (steps is None) == (step_tensors is None):
        raise ValueError("pass exactly one of steps (ints) and step_tensors (0-d counters)")
    if step_tensors is None or not step_tensors:
        return False
    f64 = step_tensors[0].dtype == torch.float64
    if validate:
        for t in step_tensors:
            if (not isinstance(t, torch.Tensor) or t.numel() != 1 or t.device.type != "cpu"
                    or t.dtype != step_tensors[0].dtype
                    or t.dtype not in (torch.float32, torch.float64)):
                raise ValueError("step_tensors must be 1-element CPU tensors, all float32 or "
                                 "all float64")
    return f64


def _check_disjoint(lists: dict, written: tuple[str, ...]) -> None:
    """No buffer written by a multi call may share memory with any other buffer of the call
    (another parameter's included: the threads would race on it)."""
    spans = []
    for name, ts in lists.items():
        for t in ts or ():
            if t is not None and t.numel() > 0:
                start = t.data_ptr()
                spans.append((start, start + t.numel() * t.element_size(), name in written, name))
    spans.sort()
    reach, reach_written, reach_name = -1, False, ""
    for start, end, w, name in spans:
        if start < reach and (w or reach_written):
            raise ValueError(f"{name} shares memory with {reach_name} (of this or another "
                             "parameter); every written buffer must be separate")
        if end > reach:
            reach, reach_written, reach_name = end, w, name
        elif w:
            reach_written = True


def sgd_step_multi(params, grads, momentum_bufs, *, lr, momentum=0.0, dampening=0.0,
                   nesterov=False, weight_decay=0.0, maximize=False, first_steps, masters=None,
                   found_inf=None, predict_outs=None, predict_s=0.0, validate=True) -> None:
    """:func:`sgd_step` on each parameter of a list, in one parallel pass.

    Args:
        params, grads: lists of N flat tensors (all params one dtype, all grads one dtype).
        momentum_bufs: list of N state tensors (ignored, may be None, when momentum == 0).
        first_steps: list of N bools (each buffer's first step).
        masters, predict_outs: None or lists of N tensors.
        validate: check every tensor as :func:`sgd_step` does, and that no written buffer
            overlaps any other of the call. ``pipetrain.optim`` passes False on calls whose
            state and outputs it has validated before (it checks params and grads itself).
        Other options: as :func:`sgd_step`, shared by the whole list.
    """
    n = len(params)
    bufs = momentum_bufs if momentum != 0 else None
    _check_list(n, grads=grads, momentum_bufs=bufs, first_steps=first_steps, masters=masters,
                predict_outs=predict_outs)
    if validate:
        for i, p in enumerate(params):
            check_tensors("param", p, param_like={"grad": grads[i],
                                                  "predict_out": _at(predict_outs, i)},
                          state_like={"momentum_buf": _at(bufs, i), "master": _at(masters, i)},
                          found_inf=found_inf, written=_SGD_WRITES,
                          float64=p.dtype == torch.float64)
            _cpu(param=p)
            check_sgd_options(momentum, dampening, nesterov, _at(bufs, i))
        _check_same_dtype(params, grads, "param (and every grad)")
        _check_disjoint(dict(param=params, grad=grads, momentum_buf=bufs, master=masters,
                             predict_out=predict_outs), _SGD_WRITES)
    s = check_distance("predict_s", predict_s)
    if n == 0:
        return
    _ops.sgd_step_multi(_addrs(params), DTYPE_CODES[params[0].dtype], _addrs(grads),
                        DTYPE_CODES[grads[0].dtype], _addrs(bufs), [p.numel() for p in params],
                        [bool(f) for f in first_steps], float(lr), float(momentum),
                        float(dampening), bool(nesterov), float(weight_decay), bool(maximize),
                        _addrs(masters), _addr(found_inf), _addrs(predict_outs), s)


def adam_step_multi(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps,
                    weight_decay=0.0, decoupled=False, maximize=False, steps=None,
                    step_tensors=None, masters=None, found_inf=None, predict_outs=None,
                    predict_s=0.0, validate=True) -> None:
    """:func:`adam_step` on each parameter of a list, in one parallel pass.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of N flat tensors (one param dtype, one
            grad dtype per call).
        steps: list of N ints >= 1, each parameter's step count after this update; or
        step_tensors: list of N 0-d CPU step counters (torch's ``state["step"]``, all fp32
            or all fp64), read as the count before this update and incremented in place by
            the call (not when ``found_inf`` is set). All are read before the pass and written
            after it, so a counter shared by several tensors (a flat bucket's) advances once.
            Exactly one of ``steps`` and ``step_tensors``.
        masters, predict_outs: None or lists of N tensors.
        validate: as :func:`sgd_step_multi`.
        Other options: as :func:`adam_step`, shared by the whole list.
    """
    n = len(params)
    _check_list(n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps,
                step_tensors=step_tensors, masters=masters, predict_outs=predict_outs)
    counters_f64 = _check_counters(steps, step_tensors, validate)
    if validate:
        for i, p in enumerate(params):
            check_tensors("param", p, param_like={"grad": grads[i],
                                                  "predict_out": _at(predict_outs, i)},
                          state_like={"exp_avg": exp_avgs[i], "exp_avg_sq": exp_avg_sqs[i],
                                      "master": _at(masters, i)},
                          found_inf=found_inf, written=_ADAM_WRITES,
                          float64=p.dtype == torch.float64)
            _cpu(param=p)
            check_step(steps[i] if steps is not None else int(step_tensors[i]) + 1, minimum=1)
        _check_same_dtype(params, grads, "param (and every grad)")
        _check_disjoint(dict(param=params, grad=grads, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs,
                             master=masters, predict_out=predict_outs), _ADAM_WRITES)
    check_adam_options(beta1, beta2, eps)
    s = check_distance("predict_s", predict_s)
    if n == 0:
        return
    _ops.adam_step_multi(_addrs(params), DTYPE_CODES[params[0].dtype], _addrs(grads),
                         DTYPE_CODES[grads[0].dtype], _addrs(exp_avgs), _addrs(exp_avg_sqs),
                         [p.numel() for p in params], [int(t) for t in steps or ()], float(lr),
                         float(beta1), float(beta2), float(eps), float(weight_decay),
                         bool(decoupled), bool(maximize), _addrs(masters), _addr(found_inf),
                         _addrs(predict_outs), s, _addrs(step_tensors), counters_f64)


def sgd_predict_multi(params, momentum_bufs, outs, *, s, lr, validate=True) -> None:
    """:func:`sgd_predict` on each parameter of a list, in one parallel pass
    (``momentum_bufs`` None, or a None entry: ``out = w``)."""
    n = len(params)
    _check_list(n, momentum_bufs=momentum_bufs, outs=outs)
    if validate:
        for i, p in enumerate(params):
            check_tensors("param", p, param_like={"out": outs[i]},
                          state_like={"momentum_buf": _at(momentum_bufs, i)}, written=("out",),
                          float64=p.dtype == torch.float64)
            _cpu(param=p)
        _check_same_dtype(params, outs, "param (and every out)")
        _check_disjoint(dict(param=params, momentum_buf=momentum_bufs, out=outs), ("out",))
    s = check_distance("s", s)
    if n == 0:
        return
    _ops.sgd_predict_multi(_addrs(params), DTYPE_CODES[params[0].dtype], _addrs(momentum_bufs),
                           _addrs(outs), DTYPE_CODES[outs[0].dtype],
                           [p.numel() for p in params], s, float(lr))


def adam_predict_multi(params, exp_avgs, exp_avg_sqs, outs, *, s, lr, beta1, beta2, eps,
                       steps=None, step_tensors=None, validate=True) -> None:
    """:func:`adam_predict` on each parameter of a list (each its own ``steps[i]`` >= 0, or
    the value of its 0-d counter ``step_tensors[i]``, read only), in one parallel pass."""
    n = len(params)
    _check_list(n, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, outs=outs, steps=steps,
                step_tensors=step_tensors)
    counters_f64 = _check_counters(steps, step_tensors, validate)
    if validate:
        for i, p in enumerate(params):
            check_tensors("param", p, param_like={"out": outs[i]},
                          state_like={"exp_avg": exp_avgs[i], "exp_avg_sq": exp_avg_sqs[i]},
                          written=("out",), float64=p.dtype == torch.float64)
            _cpu(param=p)
            check_step(steps[i] if steps is not None else int(step_tensors[i]), minimum=0)
        _check_same_dtype(params, outs, "param (and every out)")
        _check_disjoint(dict(param=params, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs, out=outs),
                        ("out",))
    check_adam_options(beta1, beta2, eps)
    s = check_distance("s", s)
    if n == 0:
        return
    _ops.adam_predict_multi(_addrs(params), DTYPE_CODES[params[0].dtype], _addrs(exp_avgs),
                            _addrs(exp_avg_sqs), _addrs(outs), DTYPE_CODES[outs[0].dtype],
                            [p.numel() for p in params], s, float(lr), float(beta1),
                            float(beta2), float(eps), [int(t) for t in steps or ()],
                            _addrs(step_tensors), counters_f64)
