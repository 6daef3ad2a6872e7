"""Triton found_inf check (kernels/found_inf.py) against the torch reference and torch.isfinite.

The flag must be set by any inf, -inf or NaN anywhere in the buffer — including the last
element of a ragged final block — in every accepted dtype, must stay 0 for finite buffers
(including the largest finite values and subnormals), and is never cleared.
"""

from __future__ import annotations

import pytest
import torch

import pipetrain.kernels as K
from pipetrain.kernels import reference as ref
from pipetrain.kernels._launch import BLOCK

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = {"triton": K.non_finite_check, "reference": ref.non_finite_check}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, BLOCK + 3, 4 * BLOCK + 1])
def test_flags_exactly_the_non_finite_buffers(impl, dtype, n):
    check = IMPLS[impl]
    info = torch.finfo(dtype)
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    g[0] = info.max                                   # extremes that are still finite
    g[n // 2] = -info.max
    g[n - 1] = info.smallest_normal * info.eps        # smallest subnormal
    flag = torch.zeros(1)
    check(g, flag)
    assert flag.item() == 0.0 and torch.isfinite(g).all()
    for pos in sorted({0, n // 2, n - 1}):
        for bad in (float("inf"), float("-inf"), float("nan")):
            h = g.clone()
            h[pos] = bad
            flag.zero_()
            check(h, flag)
            assert flag.item() == 1.0, (pos, bad)


def test_never_clears_and_accumulates_over_buffers():
    flag = torch.zeros(1)
    bad = torch.ones(BLOCK + 3, dtype=torch.bfloat16)
    bad[BLOCK + 2] = float("nan")
    K.non_finite_check(torch.ones(5), flag)
    assert flag.item() == 0.0
    K.non_finite_check(bad, flag)
    K.non_finite_check(torch.ones(5), flag)
    assert flag.item() == 1.0


def test_rejects_bad_flag():
    with pytest.raises(ValueError, match="found_inf"):
        K.non_finite_check(torch.ones(3), torch.zeros(1, dtype=torch.float16))
    with pytest.raises(ValueError, match="found_inf"):
        K.non_finite_check(torch.ones(3), torch.zeros(2))
    with pytest.raises(ValueError, match="found_inf"):
        K.non_finite_check(torch.ones(3), None)
