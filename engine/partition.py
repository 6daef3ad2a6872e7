"""Partitioning: split a sequence of layers into contiguous stages by count, size or time.

A model is an ``nn.Sequential`` (or a list / ``nn.ModuleList`` of modules called in order).
A partition is a *balance*: how many consecutive layers each stage gets, e.g. ``[3, 3, 2, 2]``.
Balances are chosen the way GPipe describes — contiguous layers, the largest stage cost as
small as possible — by an exact dynamic programme over per-layer costs:

    best(i, k) = min over j < i of  max(best(j, k-1), cost[j:i])

ties broken by the sum of squared stage costs (the variance), then by the sum of squared layer
counts (so layers of zero cost, e.g. activations, still spread evenly). Costs are parameter
counts (:func:`balance_by_size`) or measured forward+backward seconds (:func:`balance_by_time`).
Partitioning produces stages; it never runs them.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from pipetrain.microbatch import detach_for_backward

__all__ = ["layers_of", "balance_costs", "balance_by_size", "balance_by_time", "split"]


def layers_of(model: Any) -> List[nn.Module]:
    """The layers of ``model`` in call order (the same module objects, never copies).

    Raises:
        ValueError: ``model`` is not an ``nn.Sequential``, ``nn.ModuleList`` or a list/tuple
            of ``nn.Module``, or it has no layers.
    """
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        layers = list(model)
    elif isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        layers = list(model)
    else:
        raise ValueError("model must be an nn.Sequential, an nn.ModuleList or a list of "
                         f"nn.Module called in order; got {type(model).__name__}")
    if not layers:
        raise ValueError("model has no layers to partition")
    return layers


def balance_costs(costs: Sequence[float], num_parts: int) -> List[int]:
    """Contiguous split of ``costs`` into ``num_parts`` non-empty parts minimising the largest
    part's total cost (ties: smallest variance of part costs, then of part lengths).

    Args:
        costs: non-negative cost per layer, in order.
        num_parts: number of stages, ``1 <= num_parts <= len(costs)``.

    Returns:
        The balance: layer count per part, summing to ``len(costs)``.
    """
    n = len(costs)
    if not 1 <= num_parts <= n:
        raise ValueError(f"num_stages must be between 1 and the number of layers ({n}); got {num_parts}")
    if any(c < 0 for c in costs):
        raise ValueError("layer costs must be non-negative")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = (float("inf"),) * 3
    # best[k][i]: key of the best split of the first i layers into k parts; cut[k][i]: its last cut.
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = (0.0, 0.0, 0.0)
    for k in range(1, num_parts + 1):
        for i in range(k, n - (num_parts - k) + 1):
            for j in range(k - 1, i):
                prev = best[k - 1][j]
                if prev[0] == float("inf"):
                    continue
                part = prefix[i] - prefix[j]
                key = (max(prev[0], part), prev[1] + part * part, prev[2] + (i - j) ** 2)
                if key < best[k][i]:
                    best[k][i], cut[k][i] = key, j
    balance, i = [], n
    for k in range(num_parts, 0, -1):
        j = cut[k][i]
        balance.append(i - j)
        i = j
    return balance[::-1]


def balance_by_size(layers: Sequence[nn.Module], num_parts: int) -> List[int]:
    """Balance by parameter count: each layer costs the number of elements of its parameters."""
    return balance_costs([sum(p.numel() for p in m.parameters()) for m in layers], num_parts)


def balance_by_time(layers: Sequence[nn.Module], sample: Any, num_parts: int,
                    repeats: int = 3) -> List[int]:
    """Balance by measured time: forward + backward of each layer on ``sample``, median of
    ``repeats`` runs, feeding each layer the previous layer's output.

    Args:
        layers: the layers in order.
        sample: an input to the first layer (a micro-batch: tensor, tuple or dict).
        num_parts: number of stages.
        repeats: timed runs per layer (after one warm-up).

    Gradients produced while timing are discarded: every parameter's ``.grad`` is restored.
    """
    params = [p for m in layers for p in m.parameters()]
    saved = [p.grad for p in params]
    costs = []
    x = sample
    try:
        for layer in layers:
            times = []
            for r in range(repeats + 1):
                inp = detach_for_backward(x)
                t0 = time.perf_counter()
                with torch.enable_grad():
                    out = layer(inp)
                    floats = [t for t in _tensors(out) if t.requires_grad]
                    if floats:
                        torch.autograd.backward(floats, [torch.ones_like(t) for t in floats])
                if r:
                    times.append(time.perf_counter() - t0)
            costs.append(sorted(times)[len(times) // 2])
            x = detach_for_backward(out)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return balance_costs(costs, num_parts)


def _tensors(obj: Any) -> List[torch.Tensor]:
    from pipetrain.microbatch import flatten
    return [t for t in flatten(obj)[0] if isinstance(t, torch.Tensor)]


def split(layers: Sequence[nn.Module], num_parts: Optional[int] = None,
          balance: Optional[Sequence[int]] = None) -> List[List[nn.Module]]:
    """Split ``layers`` into contiguous parts, by an explicit ``balance`` or into ``num_parts``
    parts of near-equal parameter count.

    Raises:
        ValueError: neither or both given inconsistently, a part would be empty, or
            ``balance`` does not sum to ``len(layers)``.
    """
    n = len(layers)
    if balance is None:
        if num_parts is None:
            raise ValueError("give num_stages (an int) or balance (layers per stage)")
        if not 1 <= num_parts <= n:
            raise ValueError(f"num_stages must be between 1 and the number of layers ({n}); "
                             f"got {num_parts}")
        balance = balance_by_size(layers, num_parts)
    balance = list(balance)
    if num_parts is not None and len(balance) != num_parts:
        raise ValueError(f"balance has {len(balance)} entries but {num_parts} stages are needed")
    if any(not isinstance(b, int) or b < 1 for b in balance):
        raise ValueError(f"every balance entry must be a positive int (layers per stage); got {balance}")
    if sum(balance) != n:
        raise ValueError(f"balance {balance} sums to {sum(balance)} but the model has {n} layers")
    parts, start = [], 0
    for b in balance:
        parts.append(list(layers[start:start + b]))
        start += b
    return parts
