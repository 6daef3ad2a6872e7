"""UpdateLog (pipetrain.rollback): pre-update snapshots put back exactly.

The reference is a twin trained without the log: after a restore to version v, stepping on
with the same gradients must give bit-identical weights to the twin that only ever took the
first v steps (fp64, exact: the same operations in the same order).
"""

import copy

import pytest
import torch

import pipetrain
from pipetrain.rollback import UpdateLog


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))]


def _grads(i):
    g = torch.Generator().manual_seed(100 + i)
    return [torch.randn(5, 3, generator=g, dtype=torch.float64),
            torch.randn(3, generator=g, dtype=torch.float64)]


def _step(params, opt, i):
    for q, g in zip(params, _grads(i)):
        q.grad = g.clone()
    opt.step()
    opt.zero_grad()


OPTS = {
    "torch-sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "torch-adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "fused-sgd": lambda ps: pipetrain.optim.SGD(ps, lr=0.1, momentum=0.9),
    "fused-adam": lambda ps: pipetrain.optim.Adam(ps, lr=0.01),
}


@pytest.mark.parametrize("make", OPTS.values(), ids=list(OPTS))
@pytest.mark.parametrize("back_to", [0, 2])
def test_restore_then_continue_equals_never_having_stepped(make, back_to):
    params = _params()
    twin = [torch.nn.Parameter(q.detach().clone()) for q in params]
    opt, twin_opt = make(params), make(twin)
    log = UpdateLog(params, opt, depth=3)
    for i in range(4):
        log.save(i)
        _step(params, opt, i)
    for i in range(back_to):
        _step(twin, twin_opt, i)
    assert log.restore(back_to)
    assert log.versions == list(range(max(0, 4 - 4), back_to))     # later snapshots forgotten
    for a, b in zip(params, twin):
        assert torch.equal(a, b)
    for i in range(back_to, back_to + 3):      # state of version back_to: steps agree exactly
        _step(params, opt, i)
        _step(twin, twin_opt, i)
    for a, b in zip(params, twin):
        assert torch.equal(a, b)


def test_depth_bounds_the_snapshots_and_counts_bytes():
    params = _params()
    opt = torch.optim.Adam(params, lr=0.01)
    log = UpdateLog(params, opt, depth=1)
    for i in range(5):
        log.save(i)
        _step(params, opt, i)
    assert log.versions == [3, 4]
    assert not log.restore(2)                  # too old: not held
    n = sum(q.numel() for q in params) * 8
    # Two snapshots, each the weights and Adam's exp_avg / exp_avg_sq (and 0-d step counts).
    assert 2 * 3 * n <= log.peak_bytes <= 2 * 3 * n + 2 * 2 * 8
    log.clear()
    assert log.bytes == 0 and log.versions == []


def test_a_half_applied_update_is_undone():
    params = _params()
    before = [q.detach().clone() for q in params]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    log = UpdateLog(params, opt, depth=0)
    log.save(0)
    with torch.no_grad():
        params[0].add_(1.0)                    # an optimizer that failed half-way
    opt.state[params[0]]["momentum_buffer"] = torch.ones(5, 3, dtype=torch.float64)
    assert log.restore(0)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert not opt.state.get(params[0])        # no state before the first step
