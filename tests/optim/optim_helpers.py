"""Helpers shared by the optimizer tests: a small model, fixed data, a training loop.

Imported as ``from optim_helpers import ...``: tests/optim/conftest.py puts this directory on
``sys.path`` (pytest runs with ``--import-mode=importlib``, which does not).
"""

import torch
from torch import nn


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear(9, 17) -> Tanh -> Linear(17, 5), initialised from ``seed``, in ``dtype``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(9, 17), nn.Tanh(), nn.Linear(17, 5)).to(dtype)


def make_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch: x (32, 9), y (32, 5), drawn in fp32 and cast to ``dtype``."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 9, generator=g), torch.randn(32, 5, generator=g)
    return x.to(dtype), y.to(dtype)


def train(model: nn.Module, opt, steps: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """``steps`` full-batch steps of MSE loss: zero_grad, backward, step."""
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def assert_triton_route_matches_cpp(monkeypatch, module, make_opt, flat: bool) -> None:
    """Train two copies 2 steps then ``step_and_predict(2.0)``: one through the C++ kernels,
    one with ``module.kernels_for`` patched to the Triton kernels (run by the interpreter on
    CPU tensors, as CUDA parameters would run them); weights and predictions must agree.
    Both implement ``kernels.reference``, in fp32 with FMAs in the same places, so they agree
    to a few ulp (rtol 1e-6, atol 1e-7)."""
    import pipetrain.kernels as triton_kernels
    from pipetrain import flat_buffer

    x, y = make_data()
    a, b = make_model(), make_model()
    if flat:
        flat_buffer.flatten(a)
        flat_buffer.flatten(b)
    oa, ob = make_opt(a.parameters()), make_opt(b.parameters())
    train(a, oa, 2, x, y)
    pa = [t.clone() for t in oa.step_and_predict(2.0)]
    monkeypatch.setattr(module, "kernels_for", lambda device, dtype=None: triton_kernels)
    train(b, ob, 2, x, y)
    pb = ob.step_and_predict(2.0)
    for u, v in zip(list(a.parameters()) + pa, list(b.parameters()) + pb):
        torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-7)
