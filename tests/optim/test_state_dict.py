"""state_dict() interoperates with torch.optim both ways, mid-training, flat or not."""

import copy

import pytest
import torch
from torch import nn

from pipetrain import flat_buffer as fb
from pipetrain import optim as po

from optim_helpers import make_data, make_model, train

CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-3)),
    ("AdamW", dict(lr=1e-2, betas=(0.85, 0.99))),
]


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("flat", [False, True])
def test_torch_to_ours_to_torch(name, opts, flat):
    """20 steps torch -> 20 steps ours -> 10 steps torch == 50 steps of torch alone."""
    x, y = make_data()
    pure = make_model()
    train(pure, getattr(torch.optim, name)(pure.parameters(), **opts), 50, x, y)

    m = make_model()
    if flat:
        fb.flatten(m)
    t1 = getattr(torch.optim, name)(m.parameters(), **opts)
    train(m, t1, 20, x, y)
    ours = getattr(po, name)(m.parameters(), **opts)
    ours.load_state_dict(copy.deepcopy(t1.state_dict()))  # deepcopy: as a save/load would
    train(m, ours, 20, x, y)
    if flat:  # after loading, the state was made flat (views of one buffer), not left per-param
        (unit,) = ours._plan(0, ours.param_groups[0])
        assert id(unit.bucket) in ours._flat
    t2 = getattr(torch.optim, name)(m.parameters(), **opts)
    t2.load_state_dict(copy.deepcopy(ours.state_dict()))
    train(m, t2, 10, x, y)
    for a, b in zip(pure.parameters(), m.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,opts", CASES)
def test_format_matches_torch(name, opts):
    x, y = make_data()
    a, b = make_model(), make_model()
    fb.flatten(b)
    ta = getattr(torch.optim, name)(a.parameters(), **opts)
    ob = getattr(po, name)(b.parameters(), **opts)
    train(a, ta, 3, x, y)
    train(b, ob, 3, x, y)
    sa, sb = ta.state_dict(), ob.state_dict()
    assert sorted(sa["state"]) == sorted(sb["state"])
    for i in sa["state"]:
        assert sorted(sa["state"][i]) == sorted(sb["state"][i])
        for k, v in sa["state"][i].items():
            assert sb["state"][i][k].dtype == v.dtype and sb["state"][i][k].shape == v.shape
            torch.testing.assert_close(sb["state"][i][k], v, rtol=0, atol=1e-6)
    # each parameter's 'step' is its own tensor (torch would increment a shared one N times)
    steps = [st["step"] for st in sb["state"].values() if "step" in st]
    assert len({id(s) for s in steps}) == len(steps)
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        for k, v in ga.items():
            assert gb[k] == v, k


def test_bf16_state_stays_fp32_on_load():
    m = nn.Linear(4, 3).to(torch.bfloat16)
    fb.flatten(m)
    opt = po.AdamW(m.parameters(), lr=1e-2, master_weights=True)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = po.AdamW(m.parameters(), lr=1e-2, master_weights=True)
    opt2.load_state_dict(sd)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt2.step()
    for p in m.parameters():
        st = opt2.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["master_param"].dtype == torch.float32
        assert float(st["step"]) == 2
    assert opt2.param_groups[0]["master_weights"] is True


def test_unequal_steps_fall_back_per_parameter():
    """A torch state where parameters have different step counts cannot share one flat
    step: that bucket then steps parameter by parameter, still exactly like torch."""
    x, y = make_data()
    a, b = make_model(), make_model()
    ta = torch.optim.Adam(a.parameters(), lr=1e-2)
    train(a, ta, 3, x, y)
    a[2].bias.grad = None
    ta.step()  # the last bias had no gradient: its step count stays 3, the others reach 4
    b.load_state_dict(a.state_dict())
    fb.flatten(b)
    ob = po.Adam(b.parameters(), lr=1e-2)
    ob.load_state_dict(copy.deepcopy(ta.state_dict()))
    train(a, ta, 5, x, y)
    train(b, ob, 5, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert not ob._flat
