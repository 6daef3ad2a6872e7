"""Models, data and stand-in layers shared by the tests (one definition each).

- :func:`mse`: the loss most tests use (a mean, so micro-batch losses weight by size).
- :func:`mlp`: ``n`` blocks of Linear + Tanh, width ``D``, seeded, float64 by default.
- :func:`batch`: a seeded ``(x, y)`` pair for :func:`mlp`.
- :func:`reference`: loss and parameter gradients of the unsplit model on one batch.
- :class:`Stall`: sleeps ``seconds`` in its forward (and, with ``backward=True``, its
  backward) — a slow or stuck action.
"""

from __future__ import annotations

import time

import torch
from torch import nn

D = 6


def mse(out, target):
    return ((out - target) ** 2).mean()


def mlp(n: int = 4, dtype: torch.dtype = torch.float64, width: int = D, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh())
                           for _ in range(n)]).to(dtype)


def batch(n: int = 8, dtype: torch.dtype = torch.float64, width: int = D, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, dtype=dtype, generator=g),
            torch.randn(n, width, dtype=dtype, generator=g))


def reference(model: nn.Module, x, y, loss_fn=mse):
    """(loss, [grad per parameter]) of the unsplit model; leaves ``model``'s grads zeroed."""
    model.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return loss.detach(), grads


def assert_grads(model: nn.Module, grads, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Each parameter's ``.grad`` equals ``grads`` (None where the reference has none)."""
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=rtol, atol=atol)


class _SleepBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.seconds())
        return g, None


class Stall(nn.Module):
    """Identity that sleeps ``seconds`` in its forward, or in its backward with
    ``backward=True`` (the duration is read when the sleep starts)."""

    def __init__(self, seconds: float = 0.0, backward: bool = False):
        super().__init__()
        self.seconds = seconds
        self.backward = backward

    def forward(self, x):
        if not self.backward:
            time.sleep(self.seconds)
            return x * 1.0
        return _SleepBackward.apply(x, lambda: self.seconds)
