"""Triton found_inf check: flag a flat gradient buffer that holds inf or NaN, without a host sync.

Callers zero a 1-element fp32 flag once per step, run this over each gradient buffer, then pass
the flag as ``found_inf`` to the fused steps, which skip on device when it is set (as AMP's
GradScaler does). Semantics: :func:`pipetrain.kernels.reference.non_finite_check`.

Bytes moved per element: read g once (p bytes: 4 fp32, 2 bf16/fp16); the flag write is one
4-byte store per block that found a bad value (all such stores write the same 1.0, so the race
between blocks is benign).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dtypes import load_f32
from ._launch import check_runnable, launch_config
from ._validate import check_tensors

__all__ = ["non_finite_check"]



@triton.jit
def _non_finite_kernel(grad_ptr, found_inf_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = load_f32(grad_ptr, offs, mask)            # masked lanes read 0 (finite)
    # finite  <=>  |g| <= FLT_MAX  (false for +-inf, and for NaN, whose comparisons are false)
    bad = tl.sum(tl.where(tl.abs(g) <= 3.4028234663852886e38, 0, 1), axis=0)
    tl.store(found_inf_ptr, 1.0, mask=bad > 0)


def non_finite_check(grad: torch.Tensor, found_inf: torch.Tensor) -> None:
    """Set ``found_inf`` to 1.0 if ``grad`` holds any inf/NaN; never clears it.

    Args:
        grad: (N,) fp32/bf16/fp16 gradient buffer on CUDA.
        found_inf: 1-element fp32 flag on grad's device, updated in place.

    Raises:
        ValueError: bad dtype/shape/device/contiguity, or CPU tensors outside the interpreter.
    """
    check_tensors("grad", grad, param_like={}, state_like={}, found_inf=found_inf,
                  written=("found_inf",))
    if found_inf is None:
        raise ValueError("found_inf (a 1-element float32 tensor) is required")
    check_runnable(_non_finite_kernel, grad.device)
    n = grad.numel()
    if n == 0:
        return
    launch = launch_config(n)
    _non_finite_kernel[launch.grid](grad, found_inf, n, BLOCK=launch.block,
                                    num_warps=launch.num_warps)
