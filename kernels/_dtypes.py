"""Exact fp32 <-> storage-dtype conversions used inside every kernel (load as fp32, store rounded).

Loads upcast to fp32 and stores round fp32 to the destination's dtype with round-to-nearest-
even, exactly as ``torch.Tensor.to`` does. bf16 is converted with integer bit operations rather
than ``.to(tl.bfloat16)``: on a GPU both give the same bits (cvt.rn.bf16.f32), but the Triton
interpreter's bf16 cast truncates and mishandles subnormals, and the tests must run the code the
GPU runs. The bit form costs a handful of integer ops per element, hidden under memory traffic.

    bf16 -> fp32:  bits32 = bits16 << 16                                         (exact)
    fp32 -> bf16:  bits16 = (bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16      (RNE; NaN kept NaN)
"""

import triton
import triton.language as tl


@triton.jit
def load_f32(ptr, offs, mask):
    """Load ``ptr[offs]`` (fp32/bf16/fp16) as fp32; masked lanes read 0."""
    raw = tl.load(ptr + offs, mask=mask, other=0.0)
    if ptr.dtype.element_ty == tl.bfloat16:
        return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def store_f32(ptr, offs, x, mask):
    """Store fp32 ``x`` to ``ptr[offs]`` rounded (RNE) to ptr's dtype (fp32/bf16/fp16)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, 0x7FC00000, bits)   # the carry could turn a NaN into inf or -0
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(ptr + offs, y, mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)
