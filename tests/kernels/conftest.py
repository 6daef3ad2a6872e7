"""Shared comparison helpers for the kernel tests (fixtures, since test folders are not packages).

Tolerances, and why:
- fp32, kernel vs torch reference: both issue the same fp32 operations in the same order with
  the same fp32 scalars; they differ only where one side contracts ``a*b + c`` into an FMA
  (torch's vectorised CPU kernels do, numpy under the interpreter does not, a GPU does), which
  changes an intermediate by at most 1 ulp. Each output is a chain of at most ~7 ops, so 4 ulp
  of the output's magnitude (rtol = atol/max = 4 * 2**-23 ~ 4.8e-7) is tight yet safe; atol is
  scaled by the largest |expected| because ``w - lr*d`` may cancel to a small result whose error
  is an ulp of the operands.
- bf16/fp16 outputs, three-way (flash-attention / Liger style): kernel, plain torch computing at
  that dtype, and an fp64 reference of the formula. Pass if
  ``|kernel - ref| <= 2*|torch - ref| + atol`` with ``atol = ulp_dtype(ref)/2 + 16*2**-23*max|ref|``:
  the kernel computes in fp32 (error a few fp32 ulps of the largest operand, the second term)
  and rounds once to nearest-even (at most half an ulp, the first term), whereas plain torch at
  that dtype rounds after every operation. A truncating store (error up to one ulp) fails it.
- bf16/fp16 outputs, kernel vs the torch reference at the same dtype: both round (RNE) an fp32
  value once, and the fp32 values differ by a few fp32 ulps, so they may only disagree where the
  fp32 value sits within that noise of a rounding boundary — by one ulp, on a vanishing fraction
  of elements (expected ~n * 2**-13 for fp16); we allow one ulp on at most 1 + n/1000 elements.
- fp32 over arbitrary hyperparameters and data (hypothesis sweeps): a fixed ulp budget is wrong
  there, because cancellation (e.g. L2 decay nearly cancelling the gradient) followed by Adam's
  normalisation m/sqrt(v) amplifies a 1-ulp FMA difference into many ulps of the output. Those
  tests use :class:`Tracked`: the formula evaluated in fp64 alongside a first-order bound on the
  error any fp32 evaluation in that op order can have (each op rounds once, <= 2**-24 relative;
  an FMA rounds less). Both kernel and reference must lie within twice that bound of the fp64
  value.
"""

from __future__ import annotations

import pytest
import torch

EPS32 = 2.0 ** -23


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitude of each element of ``x`` (fp64)."""
    info = torch.finfo(dtype)
    _, exp = torch.frexp(x.double().abs().clamp_min(info.smallest_normal))
    return info.eps * torch.pow(2.0, (exp - 1).double())


def _fp32_close(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 4) -> None:
    assert actual.dtype == expected.dtype == torch.float32
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=ulps * EPS32, atol=ulps * EPS32 * scale)


def _three_way(kernel: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor) -> None:
    dtype = kernel.dtype
    assert plain.dtype == dtype and ref64.dtype == torch.float64
    err_k = (kernel.double() - ref64).abs()
    err_t = (plain.double() - ref64).abs()
    bound = 2 * err_t + ulp(ref64, dtype) / 2 + 16 * EPS32 * ref64.abs().max()
    bad = err_k > bound
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())}/{kernel.numel()} elements fail |kernel-ref| <= "
                             f"2|torch-ref| + ulp at {dtype}; first i={i}: kernel={kernel[i].item()}"
                             f" torch={plain[i].item()} ref={ref64[i].item()}")


def _within_one_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same low-precision dtype, both rounded once from fp32: equal, except one ulp on the few
    elements where fp32 noise crossed a rounding boundary."""
    assert actual.dtype == expected.dtype
    diff = (actual.double() - expected.double()).abs()
    assert (diff <= ulp(expected, expected.dtype)).all(), f"max diff {diff.max().item()}"
    differing = int((diff > 0).sum())
    assert differing <= 1 + actual.numel() // 1000, f"{differing}/{actual.numel()} elements differ"


class Tracked:
    """An fp64 value with a first-order bound on the error of computing it in fp32, op by op.

    Inputs given as fp32 tensors are exact (error 0); :meth:`const` is a host scalar rounded once
    to fp32. Every arithmetic operation adds the propagated input errors and one rounding
    (unit roundoff u = 2**-24 of the result).
    """

    U = 2.0 ** -24

    def __init__(self, value, err=None):
        self.v = value.double() if isinstance(value, torch.Tensor) else torch.tensor(float(value),
                                                                                    dtype=torch.float64)
        self.e = torch.zeros_like(self.v) if err is None else err

    @classmethod
    def const(cls, c: float) -> "Tracked":
        return cls(c, torch.tensor(abs(float(c)) * cls.U, dtype=torch.float64))

    @staticmethod
    def _wrap(x) -> "Tracked":
        return x if isinstance(x, Tracked) else Tracked.const(x)

    def _rounded(self, v, e) -> "Tracked":
        return Tracked(v, e + self.U * v.abs())

    def __neg__(self):
        return Tracked(-self.v, self.e)

    def __add__(self, o):
        o = self._wrap(o)
        return self._rounded(self.v + o.v, self.e + o.e)

    def __sub__(self, o):
        return self + (-self._wrap(o))

    def __mul__(self, o):
        o = self._wrap(o)
        return self._rounded(self.v * o.v, self.v.abs() * o.e + o.v.abs() * self.e + self.e * o.e)

    def __truediv__(self, o):
        o = self._wrap(o)
        q = self.v / o.v
        margin = (o.v.abs() - o.e).clamp_min(1e-300)     # the smallest the divisor can be
        return self._rounded(q, (self.e + q.abs() * o.e) / margin)

    def sqrt(self) -> "Tracked":
        r = self.v.clamp_min(0).sqrt()
        # |sqrt(x) - sqrt(v)| <= min(sqrt(e), e / sqrt(v)) for |x - v| <= e
        err = torch.minimum(self.e.sqrt(), self.e / r.clamp_min(1e-300))
        return self._rounded(r, err)


def _within_bound(actual: torch.Tensor, t: Tracked, what: str = "") -> None:
    """|actual - t.v| <= 2 * t.e (+ 1e-30): two for second-order terms and op arrangements
    (torch's lerp/addcmul forms, FMA) that differ from the tracked order."""
    diff = (actual.double() - t.v).abs()
    bound = 2 * t.e + 1e-30
    bad = diff > bound
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements outside the fp32 error bound; "
                             f"first i={i}: got {actual[i].item()} exact {t.v[i].item()} "
                             f"bound {bound[i].item()}")


@pytest.fixture
def within_bound():
    return _within_bound


@pytest.fixture
def fp32_close():
    return _fp32_close


@pytest.fixture
def three_way():
    return _three_way


@pytest.fixture
def within_one_ulp():
    return _within_one_ulp


@pytest.fixture
def tracked():
    return Tracked
