"""The compiled core imports and exposes its component submodules."""

import importlib

import pytest

import pipetrain


def test_core_submodules_present():
    for name in ("schedule", "runtime", "optim"):
        assert hasattr(pipetrain._C, name), name


def test_cuda_backend_is_optional():
    try:
        cuda = importlib.import_module("pipetrain._C_cuda")
    except ImportError:
        pytest.skip("built without nvcc (PIPETRAIN_CUDA=0 or no CUDA toolkit)")
    # No GPU on the machines that run these tests: the probe must say 0, not raise.
    assert cuda.device_count() >= 0
