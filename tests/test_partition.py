"""Tests for pipetrain.partition: balances by count, size and time against brute force."""

import itertools

import pytest
import torch
from torch import nn

from pipetrain import partition
from tests.models import Stall


def _brute_force_max(costs, k):
    """Smallest achievable largest-part cost over every contiguous split (the reference)."""
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0,) + cuts + (n,)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_balance_costs_is_optimal(seed, k):
    g = torch.Generator().manual_seed(seed)
    costs = torch.randint(0, 20, (7,), generator=g).tolist()
    balance = partition.balance_costs(costs, k)
    assert len(balance) == k and sum(balance) == 7 and min(balance) >= 1
    bounds = [0] + list(itertools.accumulate(balance))
    worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert worst == _brute_force_max(costs, k)


def test_zero_cost_layers_spread_evenly():
    assert partition.balance_costs([0] * 8, 4) == [2, 2, 2, 2]
    assert sorted(partition.balance_costs([0] * 7, 3)) == [2, 2, 3]


def test_balance_by_size_follows_parameter_count():
    layers = [nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4), nn.Linear(4, 4), nn.Linear(4, 4)]
    # 4160 parameters in the first layer dominate: it gets a stage of its own (with its ReLU
    # or not), everything else the other.
    balance = partition.balance_by_size(layers, 2)
    assert balance[0] <= 2 and sum(balance) == 5


def test_balance_by_time_measures():
    # One slow layer first: by time it is a stage alone; by parameter count (all zero) the
    # layers would split 2 / 2.
    layers = [Stall(0.03), Stall(0.001), Stall(0.001), Stall(0.001)]
    assert partition.balance_by_time(layers, torch.ones(2, 2), 2, repeats=1) == [1, 3]
    assert partition.balance_by_size(layers, 2) == [2, 2]
    layers = [nn.Linear(3, 3)]
    layers[0].weight.grad = None
    partition.balance_by_time(layers, torch.ones(2, 3), 1, repeats=1)
    assert layers[0].weight.grad is None  # timing must not leave gradients behind


def test_split_keeps_module_objects():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    parts = partition.split(partition.layers_of(model), balance=[2, 3])
    assert [len(p) for p in parts] == [2, 3]
    assert all(a is b for a, b in zip([m for p in parts for m in p], model))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_parts=6), "between 1 and the number of layers"),
    (dict(num_parts=0), "between 1 and the number of layers"),
    (dict(balance=[2, 2]), "sums to 4 but the model has 5"),
    (dict(balance=[5, 0]), "positive int"),
    (dict(num_parts=3, balance=[2, 3]), "2 entries but 3 stages"),
    (dict(), "num_stages"),
])
def test_split_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition.split([nn.ReLU() for _ in range(5)], **kwargs)


def test_layers_of_rejects_other_models():
    with pytest.raises(ValueError, match="nn.Sequential"):
        partition.layers_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no layers"):
        partition.layers_of(nn.Sequential())
