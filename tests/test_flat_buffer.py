"""pipetrain.flat_buffer: a flattened module behaves exactly like the original one."""

import pytest
import torch
from torch import nn

from pipetrain import flat_buffer as fb


class Tied(nn.Module):
    """Embedding and output projection share one weight (as in language models)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.mid(self.emb(x)))))


def _pair():
    torch.manual_seed(0)
    a = Tied()
    b = Tied()
    b.load_state_dict(a.state_dict())
    return a, b


def test_state_dict_and_named_parameters_unchanged():
    a, b = _pair()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    names = [n for n, _ in b.named_parameters()]
    flat = fb.flatten(b)
    after = b.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and after[k].shape == before[k].shape
        assert torch.equal(after[k], before[k])
    assert [n for n, _ in b.named_parameters()] == names
    # every parameter is a view of the one flat buffer, aligned to 16 elements
    (bucket,) = flat
    base = bucket.data.data_ptr()
    for p, off in zip(bucket.params, bucket.offsets):
        assert p.data_ptr() == base + off * 4 and off % 16 == 0
        assert fb.bucket_of(p)[0] is bucket


def test_tied_parameters_get_one_slot():
    _, b = _pair()
    flat = fb.flatten(b)
    unique = {id(p): p for p in b.parameters()}
    assert len(list(b.named_parameters(remove_duplicate=False))) == 6
    assert len(flat[0].params) == len(unique) == 5  # emb/out weight once
    assert flat[0].numel >= sum(p.numel() for p in unique.values())
    assert b.out.weight is b.emb.weight


def test_training_identical_to_unflattened():
    a, b = _pair()
    flat = fb.flatten(b)
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    x = torch.randint(0, 11, (8, 5))
    for _ in range(5):
        oa.zero_grad()
        nn.functional.cross_entropy(a(x).flatten(0, 1), x.flatten()).backward()
        flat.zero_grad()  # keeps the gradient views (torch's set_to_none would drop them)
        nn.functional.cross_entropy(b(x).flatten(0, 1), x.flatten()).backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa.grad, pb.grad)
        assert flat[0].grads_attached()  # autograd accumulated into the flat buffer
        oa.step()
        ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # the flat gradient buffer holds exactly the per-parameter gradients (padding zero)
    bucket = flat[0]
    total = sum(p.grad.abs().sum() for p in bucket.params)
    assert torch.allclose(bucket.grad.abs().sum(), total)


def test_mixed_dtypes_make_one_bucket_each():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[1].to(torch.bfloat16)
    flat = fb.flatten(m, grads=False)
    assert [b.dtype for b in flat] == [torch.float32, torch.bfloat16]
    assert flat[0].grad is None and m[0].weight.grad is None


def test_attach_grads_restores_views_after_set_to_none():
    _, b = _pair()
    flat = fb.flatten(b)
    b.zero_grad(set_to_none=True)
    assert not flat[0].grads_attached()
    x = torch.randint(0, 11, (4, 3))
    b(x).sum().backward()
    expect = [p.grad.clone() for p in flat[0].params]
    flat[0].attach_grads()
    assert flat[0].grads_attached()
    for p, g in zip(flat[0].params, expect):
        assert torch.equal(p.grad, g)


def test_weight_versions_bind_and_load():
    torch.manual_seed(1)
    m = nn.Linear(5, 3)
    x = torch.randn(2, 5)
    flat = fb.flatten(m)
    bucket = flat[0]
    live = bucket.data
    y0 = m(x)
    version = bucket.new_buffer()
    version.copy_(live)
    version.mul_(2.0)          # another weight version: w and b doubled
    bucket.bind(version)       # the module now computes with it, no copy
    assert torch.allclose(m(x), 2 * y0)
    assert m.weight.data_ptr() == version.data_ptr() + bucket.offsets[0] * 4
    assert fb.bucket_of(m.weight)[0] is bucket
    bucket.bind(live)          # back: the first version was untouched
    assert torch.equal(m(x), y0)
    bucket.load_(version)      # or one copy_ into the live buffer
    assert torch.allclose(m(x), 2 * y0) and m.weight.data_ptr() == live.data_ptr()


def test_new_buffer_padding_is_zero():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    bucket = fb.flatten(m)[0]
    buf = bucket.new_buffer(zero=False)
    covered = torch.zeros(bucket.numel, dtype=torch.bool)
    for o, n in zip(bucket.offsets, bucket.numels):
        covered[o:o + n] = True
    assert torch.equal(buf[~covered], torch.zeros(int((~covered).sum())))


def test_errors():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="align"):
        fb.flatten(m, align=0)
    with pytest.raises(ValueError, match="no parameters"):
        fb.flatten([])
    bucket = fb.flatten(m)[0]
    with pytest.raises(ValueError, match="flat"):
        bucket.bind(torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        bucket.load_(torch.zeros(bucket.numel, dtype=torch.float16))
