"""The compiled core imports and exposes its component submodules; the CUDA backend, when
built, imports and is guarded at run time (no GPU on the machines that run these tests)."""

import importlib

import pytest

import pipetrain
from pipetrain import executor


def test_core_submodules_present():
    for name in ("schedule", "runtime", "optim"):
        assert hasattr(pipetrain._C, name), name


def test_runtime_binding_present():
    rt = pipetrain._C.runtime
    for name in ("Backend", "Plan", "Executor", "range_name"):
        assert hasattr(rt, name), name
    cpu = rt.Backend.cpu()
    assert cpu.name == "cpu" and cpu.synchronous


@pytest.fixture
def cuda_module():
    try:
        return importlib.import_module("pipetrain._C_cuda")
    except ImportError:
        pytest.skip("built without nvcc (PIPETRAIN_CUDA=0 or no CUDA toolkit)")


def test_cuda_backend_is_optional(cuda_module):
    # No GPU here: the guard must say 0, not raise.
    assert cuda_module.device_count() >= 0


def test_cuda_backend_maps_the_same_interface(cuda_module):
    backend = pipetrain._C.runtime.Backend.from_capsule(cuda_module.backend())
    assert backend.name == "cuda"
    assert not backend.synchronous  # host dependency = "issued"; device side uses events
    assert backend.device_count() == cuda_module.device_count()


def test_cuda_selected_only_with_a_device(cuda_module):
    if cuda_module.device_count() > 0:
        pytest.skip("a CUDA device is present; this checks the guard without one")
    assert not executor.cuda_backend_available()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        executor.Executor(2, backend="cuda")
    with executor.Executor(2, backend="auto") as ex:
        assert ex.backend == "cpu"


def test_foreign_capsule_rejected():
    import ctypes
    capsule = ctypes.pythonapi.PyCapsule_New
    capsule.restype = ctypes.py_object
    capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    bogus = capsule(ctypes.c_void_p(8), b"something.else", None)
    with pytest.raises(ValueError, match="capsule named"):
        pipetrain._C.runtime.Backend.from_capsule(bogus)
