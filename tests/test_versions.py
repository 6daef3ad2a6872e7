"""Tests for pipetrain.versions: a stage binds a weight version (flat-buffer views) for an action.

The reference for "runs on version v" is the same layers with v's weights loaded by hand
(``copy.deepcopy`` of the model at that point): outputs and gradients must be equal, and
after ``release`` the live weights are back, untouched.
"""

import copy

import pytest
import torch

from pipetrain.stage import Stage
from pipetrain.versions import LIVE, VersionError, WeightVersions
from tests.models import D, mlp


def test_live_binding_is_free_and_versions_count_updates():
    model = mlp(2)
    v = WeightVersions(list(model.parameters()))
    ptrs = [p.data_ptr() for p in model.parameters()]
    v.bind(LIVE)
    v.bind(0)
    v.release()
    assert [p.data_ptr() for p in model.parameters()] == ptrs      # nothing was flattened
    v.advance()
    assert v.current == 1 and v.held == [1]
    with pytest.raises(VersionError, match="version 0 is not held"):
        v.bind(0)


def test_a_stage_runs_an_action_on_a_kept_version():
    model = mlp(2)
    old = copy.deepcopy(model)
    stage = Stage(0, list(model), input_grad=False)
    stage.versions.keep()                           # version 0 = the weights now
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-0.5).add_(0.25)                 # the live weights move on (an "update")
    stage.versions.advance()
    live = copy.deepcopy(model)
    x = torch.randn(3, D, dtype=torch.float64)
    g = torch.randn(3, D, dtype=torch.float64)

    stage.versions.bind(0)
    out = stage.forward(0, x)
    stage.backward(0, g)
    stage.versions.release()
    torch.testing.assert_close(out, old(x), rtol=0, atol=0)
    (old(x) * g).sum().backward()
    for p, q in zip(model.parameters(), old.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    # Released: the live weights are back, unchanged.
    for p, q in zip(model.parameters(), live.parameters()):
        assert torch.equal(p, q)
    torch.testing.assert_close(stage.forward(1, x), live(x), rtol=0, atol=0)
    stage.versions.drop(0)
    assert stage.versions.held == [1]


def test_an_update_while_an_old_version_is_bound_is_refused():
    model = mlp(1)
    v = WeightVersions(list(model.parameters()), name="stage 3")
    v.keep()
    v.advance()
    v.bind(0)
    with pytest.raises(VersionError, match="stage 3: an update ran while version 0 was bound"):
        v.advance()
