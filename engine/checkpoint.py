"""Re-materialization: which stages recompute their forward, and replaying their randomness.

A re-materialized ("checkpointed") stage keeps only its boundary inputs between forward and
backward: its forward runs under ``no_grad``, and its backward first re-runs the forward with
grad enabled to rebuild the autograd graph (GPipe, section 2.3). For the recomputation to be
the same function, random ops (dropout) must draw the same numbers: the RNG state is saved
when the forward starts and restored around the recomputation, inside ``fork_rng`` so that
the global stream continues as if the recomputation had drawn nothing (as
``torch.utils.checkpoint`` does).

Stages run concurrently on the executor's threads and, on CPU, share one default generator.
A stage that draws random numbers while another recomputes would break the replay, so the
forwards and recomputations of stages that use randomness (:func:`uses_rng`) are serialized
by :data:`RNG_LOCK`. Stages without random ops never take it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["MODES", "checkpoint_flags", "RNGState", "save_rng_state", "restore_rng_state",
           "uses_rng", "RNG_LOCK"]

MODES = ("never", "always", "except_last")

# Serializes forward/recompute of RNG-consuming stages (see module docstring).
RNG_LOCK = threading.RLock()


def checkpoint_flags(mode: str, num_stages: int) -> List[bool]:
    """Per stage (global stage order), whether it re-materializes.

    Args:
        mode: ``"never"``, ``"always"`` or ``"except_last"`` (all stages but the last: the last
            stage's backward follows its forward at once in every schedule, so recomputing it
            saves nothing).
        num_stages: total number of (virtual) stages.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"checkpoint must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    if mode == "never":
        return [False] * num_stages
    if mode == "always":
        return [True] * num_stages
    return [True] * (num_stages - 1) + [False]


RNGState = Tuple[torch.Tensor, Optional[Tuple[int, torch.Tensor]]]


def save_rng_state(device: torch.device) -> RNGState:
    """The CPU generator's state, plus the CUDA generator's for a CUDA ``device``."""
    cuda = None
    if device.type == "cuda":
        cuda = (device.index or 0, torch.cuda.get_rng_state(device))
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def restore_rng_state(state: RNGState) -> Iterator[None]:
    """Run the body with the generators set to ``state``; restore them afterwards."""
    cpu, cuda = state
    devices = [cuda[0]] if cuda is not None else []
    with torch.random.fork_rng(devices=devices, enabled=True, device_type="cuda"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda[1], cuda[0])
        yield


# Modules whose forward draws from the default generator in training mode.
_RANDOM_TYPES: Tuple[type, ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)


def uses_rng(module: nn.Module) -> bool:
    """Whether ``module`` (in its current train/eval mode) draws random numbers in forward.

    Detects the dropout family, ``RReLU`` and attention / transformer layers with a non-zero
    dropout probability. Code that calls ``torch.rand*`` directly is not detected: pass
    ``rng_lock=True`` to the Pipeline for such models.
    """
    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, _RANDOM_TYPES) and getattr(m, "p", 1.0) != 0:
            return True
        if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            return True
    return False


def maybe_lock(enabled: bool) -> Any:
    """:data:`RNG_LOCK` if ``enabled`` else a no-op context."""
    return RNG_LOCK if enabled else contextlib.nullcontext()
