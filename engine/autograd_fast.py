"""``grad``: ``torch.autograd.grad`` for the engine's own backward calls, without its Python toll.

Measured on torch 2.13 (CPU, one thread): ``torch.autograd.grad`` spends ~35 us per call in
Python before the C++ engine starts (argument normalisation, ``_make_grads``' per-output
checks, the torch-function dispatch test, a context copy for device threads), while the
backward of a Linear(16, 16) itself takes ~25 us. A stage calls it once per B, once per I
and once per frontier node per W (8 calls for 8 Linears), so at the fine grain the wrapper
cost more than the arithmetic and made ``I + W`` cost ~2x ``B``.

The engine's calls are all of one shape that needs none of those checks: the outputs are
tensors or ``GradientEdge`` s made by the stage itself, each gradient either a tensor of its
output's shape (received over an edge, produced by the same model) or None for a scalar
loss, and the inputs are parameters and boundary leaves. :func:`grad` calls the autograd
engine directly for them (``allow_unused`` semantics: None for an input the outputs do not
reach), and falls back to ``torch.autograd.grad`` — same result — whenever anything is not a
plain case: tensor subclasses (``__torch_function__``), outputs not on the CPU (their
backward runs on device threads, which ``torch.autograd.grad`` hands the caller's context
to), or a torch without the engine entry point.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch.autograd.graph import GradientEdge

__all__ = ["grad", "ENABLED"]

#: Set False to go through ``torch.autograd.grad`` always (the bench's before/after rows).
ENABLED = True

try:
    _run_backward = torch.autograd.Variable._execution_engine.run_backward
except AttributeError:        # pragma: no cover - a torch without the entry point
    _run_backward = None

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter


def _plain(outputs: Sequence[Any], inputs: Sequence[Any], grads: Sequence[Any],
           checked: int = 0) -> bool:
    for o in outputs:
        if type(o) is _Tensor:
            if not o.is_cpu:
                return False
        elif not isinstance(o, GradientEdge):
            return False
    # GradientEdge inputs: the split backward's capture points
    for t in inputs[:len(inputs) - checked] if checked else inputs:
        if type(t) is not _Tensor and type(t) is not _Parameter and type(t) is not GradientEdge:
            return False
    for g in grads:
        if g is not None and type(g) is not _Tensor:
            return False
    return True


def grad(outputs: Sequence[Any], inputs: Sequence[torch.Tensor], grad_outputs: Sequence[Any],
         retain_graph: bool = False, plain_tail: int = 0) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of ``outputs`` w.r.t. ``inputs`` weighted by ``grad_outputs`` — exactly
    ``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
    allow_unused=True)`` (None for an input the outputs do not reach).

    A None gradient stands for ones (a scalar loss); otherwise each gradient must have its
    output's shape — not checked on the fast path, as the engine produces them itself.
    ``plain_tail``: how many of the last ``inputs`` the caller knows to be plain tensors or
    parameters (a stage checks its parameters once, not at every call).
    """
    outputs, inputs, grad_outputs = tuple(outputs), tuple(inputs), list(grad_outputs)
    if not ENABLED or _run_backward is None or not _plain(outputs, inputs, grad_outputs, plain_tail):
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                                   allow_unused=True)
    for i, g in enumerate(grad_outputs):
        if g is None:
            o = outputs[i]
            if not isinstance(o, _Tensor) or o.numel() != 1:
                return torch.autograd.grad(outputs, inputs, grad_outputs,
                                           retain_graph=retain_graph, allow_unused=True)
            grad_outputs[i] = torch.ones_like(o, memory_format=torch.preserve_format)
    return _run_backward(outputs, tuple(grad_outputs), retain_graph, False, inputs, True, False)
