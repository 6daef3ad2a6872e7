"""Launch settings for the element-wise Triton kernels, in one place: block size, warps, grid.

All kernels here stream flat buffers once (memory-bound), so one setting serves them all:
each program handles ``BLOCK = 1024`` consecutive elements with ``num_warps = 4`` (128
threads), i.e. 8 elements per thread — two 128-bit loads per fp32 stream, one per bf16/fp16
stream — which is enough in-flight memory traffic per SM to saturate HBM without spilling.
The grid is ``cdiv(n, BLOCK)``; kernels index with int64 offsets so buffers beyond 2**31
elements are safe. Under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) num_warps is
ignored and each program costs about a millisecond, so the large block also keeps tests fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

BLOCK = 1024
NUM_WARPS = 4


@dataclass(frozen=True)
class Launch:
    """How to launch: ``kernel[l.grid](..., BLOCK=l.block, num_warps=l.num_warps)``."""

    grid: tuple[int]
    block: int
    num_warps: int


def launch_config(n: int) -> Launch:
    """The launch for an element-wise kernel over ``n >= 1`` elements."""
    return Launch(grid=(triton.cdiv(n, BLOCK),), block=BLOCK, num_warps=NUM_WARPS)


def _interpreted(kernel) -> bool:
    # triton.jit returns an InterpretedFunction instead of a JITFunction when TRITON_INTERPRET=1
    # was set before triton was imported; only then can a kernel read CPU tensors.
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_runnable(kernel, device: torch.device) -> None:
    """Raise ValueError unless ``kernel`` can run on tensors on ``device``.

    CUDA tensors always; CPU tensors only under the Triton interpreter (tests).
    """
    if device.type == "cuda" or (device.type == "cpu" and _interpreted(kernel)):
        return
    raise ValueError(
        f"the Triton kernels need CUDA tensors, got tensors on {device}; on CPU use "
        "pipetrain.kernels.reference (or the fused C++ kernels in pipetrain._C.optim), or set "
        "TRITON_INTERPRET=1 before triton is imported (tests only)")
