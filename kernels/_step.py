"""What every fused optimizer-step kernel shares: its lanes, its weights in, its weights out.

A step kernel updates the fp32 weights w of one block of a flat buffer:

    lanes:   offs = block * BLOCK + [0, BLOCK);  mask = offs < n, or nothing at all when the
             found_inf flag is set (read on the device: a skipped step needs no host sync and
             neither loads nor stores a byte)
    load:    w = master[offs] (fp32) if there are master weights, else float(param[offs])
    store:   master[offs] = w;  param[offs] = round_to_param_dtype(w)   (RNE)

so the skip rule and the mixed-precision rule are written once for SGD and Adam alike.
"""

import triton
import triton.language as tl

from ._dtypes import load_f32, store_f32


@triton.jit
def step_lanes(found_inf_ptr, n, BLOCK: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """(offs, mask) of this program's block; every lane masked if the found_inf flag is set."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    limit = n
    if HAS_FOUND_INF:
        # Read the flag on device (no host sync). A set flag shrinks the range to nothing: every
        # lane is masked, so the step neither loads nor stores anything.
        limit = tl.where(tl.load(found_inf_ptr) == 0, n, 0)
    return offs, offs < limit


@triton.jit
def load_weights(param_ptr, master_ptr, offs, mask, HAS_MASTER: tl.constexpr):
    """fp32 weights: the fp32 master if given, else param upcast."""
    if HAS_MASTER:
        return tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        return load_f32(param_ptr, offs, mask)


@triton.jit
def store_weights(param_ptr, master_ptr, offs, w, mask, HAS_MASTER: tl.constexpr):
    """Write fp32 ``w`` back: to the master if given, and to param rounded (RNE)."""
    if HAS_MASTER:
        tl.store(master_ptr + offs, w, mask=mask)
    store_f32(param_ptr, offs, w, mask)
