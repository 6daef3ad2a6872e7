"""NVTX ranges for Nsight Systems: ``with pipetrain.nvtx.range("s1/F3"): ...``.

Uses ``torch.cuda.nvtx`` when torch has CUDA and a device is visible; otherwise every call is
a no-op (``torch.cuda.nvtx`` raises on a CPU-only torch build). The executor's own per-action
ranges (``Executor(..., nvtx=True)``) are pushed from C++ in the ``pipetrain`` NVTX domain by
the CUDA backend; this module is for ranges around Python code (steps, optimizer, ...).
"""

from __future__ import annotations

import contextlib
import functools

from pipetrain import _C

_NULL = contextlib.nullcontext()


@functools.cache
def enabled() -> bool:
    """True when ranges are recorded: torch built with CUDA and a CUDA device present."""
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None and torch.cuda.is_available()


@contextlib.contextmanager
def _pushed(name: str):
    import torch
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def range(name: str):  # noqa: A001 (mirrors torch.cuda.nvtx.range)
    """Context manager: an NVTX range called ``name`` around the block, or nothing without CUDA."""
    return _pushed(name) if enabled() else _NULL


def range_name(label: str) -> str:
    """The NVTX name of an action label: ``"1F3"`` -> ``"s1/F3"`` (labels of another form
    are kept as they are)."""
    return _C.runtime.range_name(label)
