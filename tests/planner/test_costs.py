"""The cost model's pieces against closed forms (no timings asserted): the CPU-share
contention, the slowdown's extrapolation, the per-action overhead charged per action, and
the first layer probed as the first stage runs it."""

import pytest
import torch
from torch import nn

from pipetrain.planner import Affine, CostTable, Network
from pipetrain.planner.costs import contention, measure_costs
from pipetrain.planner.search import _Evaluator


@pytest.mark.parametrize("n,cores,load,expected", [
    (1, 2, 0.0, 1.0),            # alone
    (2, 2, 0.0, 1.0),            # fits on the cores
    (4, 2, 0.0, 2.0),            # 4 threads on 2 idle cores: half a core each
    (8, 2, 0.0, 4.0),
    (2, 2, 6.0, 8 / 7),          # loaded machine: (load + n) / (load + 1)
    (4, 16, 3.0, 1.0),           # 7 runnable on 16 cores
    (3, 2, 1.5, 4.5 / 2.5),      # the probe had its core (2.5 / 2 > 1): 4.5 / 2.5
])
def test_contention_closed_form(n, cores, load, expected):
    assert contention(n, cores, load) == pytest.approx(expected)


def test_contention_refuses_bad_input():
    with pytest.raises(ValueError, match="threads >= 1"):
        contention(0, 2)


def _table(**kw):
    a = Affine(0.0, 1e-3)
    return CostTable(forward=[a] * 4, backward=[a + a] * 4, weight=[a] * 4,
                     activation=[Affine(0, 10)] * 4, input_bytes=[Affine(0, 10)] * 4,
                     param_bytes=[100.0] * 4, **kw)


def test_slowdown_measured_then_extrapolated_by_contention():
    t = _table(slowdown={1: 1.0, 2: 1.3}, cores=2, load=0.0)
    assert t.slowdown_at(1) == 1.0 and t.slowdown_at(2) == 1.3
    # p = 4 on 2 idle cores: the measured 1.3 at p = 2 times contention(4) / contention(2) = 2.
    assert t.slowdown_at(4) == pytest.approx(1.3 * 2.0)
    # Without cores (not a shared CPU): the nearest measured depth's factor.
    assert _table(slowdown={1: 1.0, 2: 1.3}).slowdown_at(4) == 1.3
    assert _table().slowdown_at(8) == 1.0


def test_overhead_is_per_action_not_per_layer():
    # Per micro-batch of b = 2: each layer F 2 ms, B 4 ms; overhead 0.5 ms per action.
    o = 5e-4
    ev = _Evaluator(_table(forward_overhead=o, backward_overhead=o), Network())
    for balance in ([4], [2, 2], [1, 3]):
        F, B, W = ev.stage_costs(balance, 2, False, False)
        assert F == pytest.approx([n * 2e-3 + o for n in balance])
        assert B == pytest.approx([n * 4e-3 + o for n in balance])
        # Split backward: I and W are two actions, each paying the overhead.
        F, B, W = ev.stage_costs(balance, 2, False, True)
        assert B == pytest.approx([n * 4e-3 + 2 * o for n in balance])
        assert W == pytest.approx([n * 2e-3 + o for n in balance])
    # The total over stages grows by one overhead per added stage.
    one = sum(ev.stage_costs([4], 2, False, False)[0])
    two = sum(ev.stage_costs([2, 2], 2, False, False)[0])
    assert two - one == pytest.approx(o)


def test_first_layer_has_no_input_gradient_like_the_first_stage():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    x, y = torch.randn(16, 32), torch.randn(16, 32)
    t = measure_costs(model, (x, y), nn.functional.mse_loss, sizes=[8, 16], repeats=1,
                      calibrate=False)
    # Layer 0's backward is all weight gradient (I = 0, so W = B); layer 1 computes its
    # input's gradient too.
    for b in (8, 16):
        assert t.weight[0](b) == pytest.approx(t.backward[0](b), rel=0.02, abs=1e-6)
    assert t.cores is None and t.forward_overhead == 0.0
