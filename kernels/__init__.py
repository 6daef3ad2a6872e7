"""pipetrain.kernels: Triton kernels (fused optimizer updates, weight prediction) and their torch references.

``pipetrain.kernels.reference`` holds the plain-torch versions (the authoritative semantics, no
Triton import). The Triton versions — same signatures — are imported lazily on first use, so
``from pipetrain.kernels import reference`` works without initialising Triton:

    sgd_step, adam_step          fused optimizer updates (optionally update-then-predict)
    sgd_predict, adam_predict    fused weight prediction (SpecTrain, XPipe)
    non_finite_check             found_inf flag for a flat gradient buffer

They run on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import importlib

from . import reference

__all__ = ["sgd_step", "adam_step", "sgd_predict", "adam_predict", "non_finite_check", "reference"]

_LAZY = {
    "sgd_step": "sgd",
    "adam_step": "adam",
    "sgd_predict": "predict",
    "adam_predict": "predict",
    "non_finite_check": "found_inf",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipetrain.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
