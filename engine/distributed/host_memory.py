"""Keep freed host memory in the process between micro-batches (glibc's malloc settings).

A rank's actions run on the executor's thread, and glibc gives a non-main thread its own
malloc arena: heaps it maps itself and shrinks (``madvise(MADV_DONTNEED)``) as soon as
more than ``M_TRIM_THRESHOLD`` bytes at their top are free, and blocks above
``M_MMAP_THRESHOLD`` (128 KiB at first: one Linear(512)'s weight gradient is 1 MiB) are
separate mappings unmapped at ``free``. A backward allocates and frees such blocks every
micro-batch, so every micro-batch page-faults its memory in again. Measured on the peers
``linear`` workload (2 processes, 1F1B, loaded 2-core machine): a B action took 1.2-1.4x
the same backward run by a plain loop on the main thread in the same process; with the
settings below 0.9-1.1x.

:func:`keep_freed_memory` raises both thresholds (``mallopt``), as a torch CPU training
process would with ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` in its
environment. It is process-wide: the multi-process runner calls it for CPU ranks, and a
``Pipeline`` on CPU devices in one process (its executor threads have the same arenas: on the
peers ``linear`` workload, 1F1B on 2 threads, B took 8.8 ms without and 6.3 ms with, the step
122 vs 96 ms), unless ``PIPETRAIN_KEEP_FREED_MEMORY=0``; elsewhere (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

__all__ = ["keep_freed_memory", "TRIM_THRESHOLD", "MMAP_THRESHOLD", "TOP_PAD"]

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3   # glibc's mallopt parameters
TRIM_THRESHOLD = 256 << 20   # free bytes at a heap's top kept before giving them back
MMAP_THRESHOLD = 32 << 20    # blocks this large or larger get their own mapping (glibc's max)
TOP_PAD = 64 << 20           # extra bytes to grow a heap by, so it grows rarely

_done: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; True if glibc took them."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("PIPETRAIN_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                (M_TOP_PAD, TOP_PAD)))
    return _done
