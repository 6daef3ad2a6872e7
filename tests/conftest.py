"""Test-wide settings: run Triton kernels under the interpreter (no GPU here), bound every test."""

import faulthandler
import os

import pytest

# Must be set before triton is first imported; kernels run on CPU tensors under it.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _hang_bound(request):
    """``pytest.mark.hang_bound(seconds)``: a test that may hang (worker processes, barriers)
    dumps every thread's stack and ends the run after ``seconds`` instead of stalling CI."""
    mark = request.node.get_closest_marker("hang_bound")
    if mark is None:
        yield
        return
    faulthandler.dump_traceback_later(mark.args[0], exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
