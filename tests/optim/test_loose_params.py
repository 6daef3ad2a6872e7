"""Parameters that are not flattened ("loose"): stepped by list kernel calls, predictions
written to buffers reused across calls (no allocation per call), torch.optim semantics kept."""

import pytest
import torch
from torch import nn

from pipetrain import optim as po

from optim_helpers import make_data, make_model, train

OPTS = {"SGD": dict(lr=0.05, momentum=0.9), "AdamW": dict(lr=1e-2, weight_decay=0.1)}


def _step(model, opt, x, y, predict=None):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return opt.step() if predict is None else opt.step_and_predict(predict)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_prediction_buffers_are_reused(name):
    """out=None: the returned tensors are the optimizer's buffers — the same memory on every
    call, overwritten by the next predict/step_and_predict (documented lifetime)."""
    x, y = make_data()
    m = make_model()
    opt = getattr(po, name)(m.parameters(), **OPTS[name])
    first = _step(m, opt, x, y, predict=2.0)
    kept = [t.clone() for t in first]
    second = _step(m, opt, x, y, predict=2.0)
    assert [t.data_ptr() for t in first] == [t.data_ptr() for t in second]
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # overwritten in place
    assert not all(torch.equal(a, b) for a, b in zip(kept, second))
    third = opt.predict(1.0)
    assert [t.data_ptr() for t in third] == [t.data_ptr() for t in first]
    for t, p in zip(third, m.parameters()):
        assert t.shape == p.shape and t.dtype == p.dtype


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_out_list_is_written_and_returned(name):
    x, y = make_data()
    a, b = make_model(), make_model()
    oa = getattr(po, name)(a.parameters(), **OPTS[name])
    ob = getattr(po, name)(b.parameters(), **OPTS[name])
    train(a, oa, 3, x, y)
    train(b, ob, 3, x, y)
    mine = [torch.full_like(p, float("nan")) for p in b.parameters()]
    got = ob.predict(1.5, out=mine)
    assert all(g is t for g, t in zip(got, mine))
    for u, v in zip(oa.predict(1.5), mine):
        assert torch.equal(u, v)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_swapped_param_storage_is_followed(name):
    """Weight stashing swaps ``p.data`` for a same-shape tensor between steps: the step must
    update the tensor the parameter holds now (addresses are read on every call)."""
    x, y = make_data()
    ref, ours = make_model(), make_model()
    ropt = getattr(torch.optim, name)(ref.parameters(), **OPTS[name])
    opt = getattr(po, name)(ours.parameters(), **OPTS[name])
    train(ref, ropt, 2, x, y)
    train(ours, opt, 2, x, y)
    for p, q in zip(ref.parameters(), ours.parameters()):
        p.data = p.data.clone() * 0.5
        q.data = q.data.clone() * 0.5
    train(ref, ropt, 3, x, y)
    train(ours, opt, 3, x, y)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_params_without_grad_are_skipped_as_torch():
    """torch.optim skips a parameter without .grad (its step count too); so do the lists."""
    x, y = make_data()
    ref, ours = make_model(), make_model()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = po.AdamW(ours.parameters(), lr=1e-2)
    for step in range(6):
        for m, o in ((ref, ropt), (ours, opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if step % 2:
                m[2].bias.grad = None  # the last bias sits out every other step
            o.step()
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
        assert float(opt.state[q]["step"]) == float(ropt.state[p]["step"])
    assert float(opt.state[ours[2].bias]["step"]) == 3


def test_changed_param_shape_is_an_error_not_a_overrun():
    x, y = make_data()
    m = make_model()
    opt = po.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, 1, x, y)
    m[0].bias.data = torch.zeros(40)
    m[0].bias.grad = torch.zeros(40)
    with pytest.raises(ValueError, match="same number of elements"):
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True),
                                          (torch.float16, True), (torch.float64, False)])
def test_loose_and_flat_agree_bit_for_bit(name, dtype, master):
    """The list calls (loose) and the one-bucket call (flat) run the same kernel body per
    element: weights, masters, state and predictions must be identical bits."""
    from pipetrain import flat_buffer as fb

    a, b = make_model(dtype=dtype), make_model(dtype=dtype)
    fb.flatten(b)
    oa = getattr(po, name)(a.parameters(), **OPTS[name], master_weights=master)
    ob = getattr(po, name)(b.parameters(), **OPTS[name], master_weights=master)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in a.parameters()]
        for m in (a, b):
            for p, g in zip(m.parameters(), grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        pa, pb = oa.step_and_predict(2.0), ob.step_and_predict(2.0)
    for p, q, u, v in zip(a.parameters(), b.parameters(), pa, pb):
        assert torch.equal(p, q) and torch.equal(u, v)
        assert set(oa.state[p]) == set(ob.state[q])
        for key, value in oa.state[p].items():
            assert torch.equal(value, ob.state[q][key]), key
        assert ("master_param" in oa.state[p]) == (master and dtype != torch.float32)


@pytest.mark.parametrize("bad", [torch.zeros(17, 9, dtype=torch.float64),   # wrong dtype
                                 torch.zeros(17 * 9 + 1)[1:].view(17, 9).t().contiguous().t()])
def test_replaced_state_of_wrong_kind_is_an_error(bad):
    """The list kernels trust addresses: state swapped by hand for a tensor of another dtype
    or layout must be refused on the next call, not read past its end."""
    x, y = make_data()
    m = make_model()
    opt = po.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, 2, x, y)
    opt.state[m[0].weight]["exp_avg"] = bad
    with pytest.raises(ValueError, match="dtypes the optimizer made"):
        train(m, opt, 1, x, y)
