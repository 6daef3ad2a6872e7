"""Compiled stages: each stage's layers run through ``torch.compile`` (``Pipeline(compile=...)``).

Why: the stages of one process share one interpreter, so at p = 2 their Python (module
calls, autograd bookkeeping between small ops) serializes on the GIL. A compiled stage runs
its forward as one generated graph and its backward as one compiled autograd node, so far
fewer Python steps happen per action, and inductor's C++ kernels run with the GIL released.

What is compiled: the stage's layer loop ``x -> layer_n(...layer_1(x))``, per stage, lazily
at its first forward (compilation happens on the executor thread running that action; the
first step is slow, later ones are not), and again when torch's guards fail (a new input
shape, dtype, grad mode: the usual ``torch.compile`` rules, e.g. ``dynamic=None`` marks a
dimension dynamic at its second distinct size). The loss of a sink stage runs eagerly after
the compiled layers. Each stage gets its own compiled function with its own code object, so
the compile caches of different stages do not share torch's per-code recompile limit.

How it combines:

- Zero-bubble schedules (I / W): the compiled backward is one autograd node, which
  :mod:`pipetrain.split_backward` treats as an ``autograd.Function`` — ``I`` runs that node
  once (it produces the input and the weight gradients together). So a compiled stage's
  ``I`` runs the whole backward without retaining the graph (:func:`backward_input`: AOT
  autograd's backwards that donate saved buffers refuse ``retain_graph=True``) and stages
  the weight gradients; its ``W`` has nothing left to do. Gradients are exact, but ``I``
  costs a ``B`` and ``W`` nothing: zero-bubble schedules lose their point on compiled stages.
- Re-materialization: the forward without grad and the recomputation with grad are two
  compiled graphs (grad mode is a guard); the recomputation replays the RNG state as eager
  does (exact with ``backend="aot_eager"``; inductor draws random numbers its own way, so
  dropout masks differ from eager's but a forward and its recomputation still agree).
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Dict, Optional, Sequence

import torch

__all__ = ["check_compile", "CompiledLayers", "compile_stages"]


def _allowed_keys() -> set:
    try:
        return set(inspect.signature(torch.compile).parameters) - {"model"}
    except (TypeError, ValueError):   # pragma: no cover - a torch without a signature
        return {"fullgraph", "dynamic", "backend", "mode", "options", "disable"}


def check_compile(value: Any) -> Optional[Dict[str, Any]]:
    """``compile=``: False / None (off), True (``torch.compile`` defaults), or a dict of
    ``torch.compile`` keyword arguments. Returns the keyword arguments, or None when off.

    Raises:
        ValueError: anything else, or a key ``torch.compile`` does not take.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"compile must be True, False or a dict of torch.compile keyword "
                         f"arguments (e.g. dict(backend='aot_eager')); got {value!r}")
    unknown = sorted(set(value) - _allowed_keys())
    if unknown:
        raise ValueError(f"compile: torch.compile takes no argument {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(sorted(_allowed_keys()))}")
    return dict(value)


def _layer_loop(layers: Sequence[Any], x: Any) -> Any:
    for layer in layers:
        x = layer(x)
    return x


def _fresh_loop(index: int) -> Callable[[Sequence[Any], Any], Any]:
    # torch.compile keeps its cache (and its recompile limit, 8 entries) per code object:
    # one shared loop function would hold every stage's graphs and fall back to eager once
    # there are more than 8 stages x shapes. A copy of the code object per stage keeps the
    # caches apart, and its name shows which stage a compile log line is about.
    name = f"pipetrain_stage{index}_layers"
    code = _layer_loop.__code__.replace(co_name=name)
    return types.FunctionType(code, _layer_loop.__globals__, name)


class CompiledLayers:
    """A stage's layers behind ``torch.compile``: ``CompiledLayers(k, layers, opts)(x)``
    equals running the layers in order on ``x`` (a tensor, or a tuple / dict of tensors).

    Args:
        index: the stage id (names the compiled function).
        layers: the stage's modules (the user's objects; their parameters are graph inputs,
            so optimizer updates in place need no recompilation).
        options: ``torch.compile`` keyword arguments.
    """

    def __init__(self, index: int, layers: Sequence[Any], options: Dict[str, Any]) -> None:
        self.index = index
        self.layers = tuple(layers)
        self.options = dict(options)
        self._fn = torch.compile(_fresh_loop(index), **self.options)

    def __call__(self, x: Any) -> Any:
        return self._fn(self.layers, x)

    def __repr__(self) -> str:
        return f"CompiledLayers(stage={self.index}, layers={len(self.layers)}, options={self.options})"


def compile_stages(stages: Sequence[Any], options: Optional[Dict[str, Any]]) -> None:
    """Give every local stage (None entries are other ranks') compiled layers, or none
    when ``options`` is None."""
    for stage in stages:
        if stage is not None:
            stage.compiled = None if options is None else CompiledLayers(stage.index, stage.layers, options)


def backward_input(stage: Any, run: Any, saved: Any, mb: int, tensors: list, grads: list,
                   leaves: list) -> Any:
    """``I`` of a compiled stage: the whole backward at once (no ``retain_graph``), the
    weight gradients staged now and ``W`` left with nothing to do.

    The compiled backward is one autograd node that computes every gradient whenever it runs,
    so splitting it saves nothing — and AOT autograd's compiled backwards that "donate" saved
    buffers refuse ``retain_graph=True``, which a split I (and W's restarts) need.
    """
    from pipetrain.autograd_fast import grad as fast_grad
    from pipetrain.stage_run import accumulate

    gs = fast_grad(tensors, leaves + stage.params, grads)
    for t, g in zip(leaves, gs):
        t.grad = g
    accumulate(run.staged, stage.params, gs[len(leaves):])
    stage._after_input(run, saved, mb)
    return stage._input_grads(saved)
