"""Tests for pipetrain.microbatch: scatter/gather of tensors, tuples, dicts; uneven splits."""

import collections

import pytest
import torch

from pipetrain import microbatch as mbm


@pytest.mark.parametrize("n,m", [(8, 1), (8, 2), (8, 3), (7, 7), (10, 4), (5, 3)])
def test_split_sizes_even_as_possible(n, m):
    sizes = mbm.split_sizes(n, m)
    assert sum(sizes) == n and len(sizes) == m
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_split_sizes_rejects_empty_microbatches():
    with pytest.raises(ValueError, match="smaller than num_microbatches"):
        mbm.split_sizes(3, 4)
    with pytest.raises(ValueError, match=">= 1"):
        mbm.split_sizes(3, 0)


def test_scatter_gather_roundtrip_nested():
    Pair = collections.namedtuple("Pair", "a b")
    x = torch.randn(10, 3)
    mask = torch.rand(10, 4) > 0.5
    pos = torch.arange(10)
    batch = {"x": x, "extra": (mask, [pos, 7]), "pair": Pair(x * 2, None), "scalar": torch.tensor(3.0)}
    mbs, sizes = mbm.scatter(batch, 4)
    assert sizes == [3, 3, 2, 2]
    start = 0
    for mb, n in zip(mbs, sizes):
        assert torch.equal(mb["x"], x[start:start + n])
        assert torch.equal(mb["extra"][0], mask[start:start + n])
        assert mb["extra"][0].dtype == torch.bool and mb["extra"][1][0].dtype == torch.int64
        assert mb["extra"][1][1] == 7 and mb["pair"].b is None and isinstance(mb["pair"], Pair)
        assert mb["scalar"] is batch["scalar"]  # 0-dim tensors are replicated, not split
        assert mb["x"].data_ptr() == x[start].data_ptr()  # views, no copy
        start += n
    back = mbm.gather(mbs)
    assert torch.equal(back["x"], x) and torch.equal(back["extra"][0], mask)
    assert torch.equal(back["extra"][1][0], pos) and back["pair"].b is None


def test_batch_size_disagreement_is_an_error():
    with pytest.raises(ValueError, match="same dim-0 size"):
        mbm.scatter((torch.zeros(4, 2), torch.zeros(5)), 2)
    with pytest.raises(ValueError, match="at least one tensor"):
        mbm.batch_size((1, None))


def test_tree_map_and_flatten_order():
    leaves, spec = mbm.flatten({"b": 1, "a": (2, [3])})
    assert leaves == [1, 2, 3]
    assert mbm.unflatten([4, 5, 6], spec) == {"b": 4, "a": (5, [6])}
    assert mbm.tree_map(lambda v: v * 10, [1, (2,)]) == [10, (20,)]
    with pytest.raises(ValueError, match="left over"):
        mbm.unflatten([1, 2, 3, 4], spec)
