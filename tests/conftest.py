"""Test-wide settings: run Triton kernels under the interpreter (no GPU here), bound every test."""

import os

# Must be set before triton is first imported; kernels run on CPU tensors under it.
os.environ.setdefault("TRITON_INTERPRET", "1")
