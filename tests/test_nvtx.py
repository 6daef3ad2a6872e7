"""NVTX helpers: names follow the s<stage>/<kind><micro-batch> convention; no-op without CUDA."""

import pytest
import torch

from pipetrain import nvtx


@pytest.mark.parametrize("label, name", [("1F3", "s1/F3"), ("0B0", "s0/B0"), ("12W7", "s12/W7"),
                                         ("step", "step"), ("3", "3"), ("", "")])
def test_range_name(label, name):
    assert nvtx.range_name(label) == name


def test_enabled_matches_torch():
    assert nvtx.enabled() == (torch.version.cuda is not None and torch.cuda.is_available())


def test_range_is_a_context_manager_that_propagates_errors():
    ran = []
    with nvtx.range("s0/F0"):
        ran.append(1)
    assert ran == [1]
    with pytest.raises(ZeroDivisionError), nvtx.range("s0/B0"):
        1 / 0


@pytest.mark.skipif(nvtx.enabled(), reason="checks the CPU fallback")
def test_cpu_fallback_never_touches_torch_nvtx(monkeypatch):
    # torch.cuda.nvtx raises on a CPU build; the fallback must not call it at all.
    def boom(*args, **kwargs):
        raise AssertionError("torch.cuda.nvtx called without CUDA")
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", boom)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", boom)
    with nvtx.range("s1/F3"):
        pass
