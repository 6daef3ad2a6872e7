"""Input checks shared by the torch references and the Triton wrappers.

Every public kernel entry point (reference or Triton) calls these before touching memory, so
both raise the same ``ValueError`` for the same bad input: tensors must be flat (1-D),
contiguous, on one device, of equal numel; params/grads/prediction outputs are fp32, bf16 or
fp16; optimizer state and master weights are fp32 — or, where a kernel accepts float64
(``float64=True``: the torch reference and the C++ CPU kernels, not Triton), every tensor but
``found_inf`` is float64; ``found_inf`` is a 1-element fp32 tensor;
no buffer that is written shares memory with any other buffer (outputs are written in place in
one pass, so an alias would make the result depend on the order of loads and stores); the
prediction distance ``s`` is a finite float >= 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

#: dtypes accepted for weights, gradients and predicted-weight outputs (maths is fp32 inside).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtype required for optimizer state (momentum, exp_avg, exp_avg_sq) and master weights.
STATE_DTYPE = torch.float32
#: the one dtype of every tensor (weights, gradient, state, outputs) of an fp64 call.
F64 = torch.float64
#: buffers the fused steps write (grad and found_inf are read-only).
SGD_WRITES = ("param", "momentum_buf", "master", "predict_out")
ADAM_WRITES = ("param", "exp_avg", "exp_avg_sq", "master", "predict_out")


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensors(
    ref_name: str,
    ref: torch.Tensor,
    *,
    param_like: dict[str, Optional[torch.Tensor]],
    state_like: dict[str, Optional[torch.Tensor]],
    found_inf: Optional[torch.Tensor] = None,
    written: tuple[str, ...] = (),
    float64: bool = False,
) -> None:
    """Check that every given tensor is flat, contiguous, on ``ref``'s device, with ``ref``'s numel.

    Args:
        ref_name: name of ``ref`` for messages (e.g. ``"param"``).
        ref: the tensor the others are compared to (itself checked as param-like).
        param_like: name -> tensor that must be fp32/bf16/fp16 (None entries are skipped).
        state_like: name -> tensor that must be fp32 (None entries are skipped).
        found_inf: optional 1-element fp32 flag on the same device.
        written: names of the tensors the kernel writes; each must not overlap any other tensor
            (read-only tensors may alias each other).
        float64: the kernel does fp64 maths when ``ref`` is float64 (callers pass
            ``ref.dtype == torch.float64``); then every param-like and state-like tensor must
            be float64 (fp64 maths needs fp64 state; no mixing with 16/32-bit buffers).

    Raises:
        ValueError: naming the offending argument and what is allowed.
    """
    if not isinstance(ref, torch.Tensor):
        raise ValueError(f"{ref_name} must be a torch.Tensor, got {type(ref).__name__}")
    if float64:
        groups = [({ref_name: ref, **param_like, **state_like}, (F64,))]
    else:
        groups = [({ref_name: ref, **param_like}, PARAM_DTYPES), (state_like, (STATE_DTYPE,))]
    for tensors, allowed in groups:
        for name, t in tensors.items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in allowed:
                raise ValueError(f"{name} has dtype {t.dtype}; allowed: {_names(allowed)}")
            if t.dim() != 1:
                raise ValueError(f"{name} must be a flat 1-D buffer, got shape {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous (flat buffers only)")
            if t.device != ref.device:
                raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                                 "all tensors must be on one device")
            if t.numel() != ref.numel():
                raise ValueError(f"{name} has {t.numel()} elements but {ref_name} has "
                                 f"{ref.numel()}; all buffers must have the same numel")
    if found_inf is not None:
        if not isinstance(found_inf, torch.Tensor):
            raise ValueError(f"found_inf must be a torch.Tensor, got {type(found_inf).__name__}")
        if found_inf.dtype != torch.float32 or found_inf.numel() != 1:
            raise ValueError("found_inf must be a 1-element float32 tensor, got "
                             f"{found_inf.numel()} element(s) of {found_inf.dtype}")
        if found_inf.device != ref.device:
            raise ValueError(f"found_inf is on {found_inf.device} but {ref_name} is on "
                             f"{ref.device}; it must be on the same device (read without host sync)")
    named = {ref_name: ref, **param_like, **state_like, "found_inf": found_inf}
    _check_no_overlap({k: t for k, t in named.items() if t is not None}, written)


def _check_no_overlap(tensors: dict[str, torch.Tensor], written: tuple[str, ...]) -> None:
    """Raise ValueError if a written tensor shares bytes with any other (real devices only)."""
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
             for name, t in tensors.items() if t.device.type != "meta" and t.numel() > 0]
    for i, (start_a, end_a, name_a) in enumerate(spans):
        for start_b, end_b, name_b in spans[i + 1:]:
            if (name_a in written or name_b in written) and start_a < end_b and start_b < end_a:
                raise ValueError(f"{name_a} and {name_b} share memory; a buffer the kernel "
                                 "writes must be separate from every other buffer "
                                 "(predictions go to their own buffer)")


def check_distance(name: str, s) -> float:
    """Return ``s`` as a float after checking it is a finite number >= 0 (a version distance)."""
    try:
        value = float(s)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float >= 0, got {s!r}") from None
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a finite float >= 0 (a version distance), got {s!r}")
    return value


def check_step(step, *, minimum: int) -> int:
    """Return the Adam step count as an int after checking ``step >= minimum``."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < minimum:
        raise ValueError(f"step must be an int >= {minimum} (the count after this update), "
                         f"got {step!r}")
    return int(step)


def check_sgd_options(momentum: float, dampening: float, nesterov: bool,
                      momentum_buf: Optional[torch.Tensor]) -> None:
    """Reject option combinations torch.optim.SGD rejects, and a missing momentum buffer."""
    if momentum < 0.0:
        raise ValueError(f"momentum must be >= 0, got {momentum}")
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("nesterov requires momentum > 0 and dampening == 0")
    if momentum != 0.0 and momentum_buf is None:
        raise ValueError("momentum_buf (fp32, same numel as param) is required when momentum != 0")


def check_adam_options(beta1: float, beta2: float, eps: float) -> None:
    """Reject betas outside [0, 1) and eps < 0, as torch.optim.Adam does."""
    if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
        raise ValueError(f"betas must be in [0, 1), got ({beta1}, {beta2})")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
