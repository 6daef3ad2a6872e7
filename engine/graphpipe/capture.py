"""Capture a model's operator graph with ``torch.fx``, keeping the user's module boundaries.

``capture(model, leaf_modules=...)`` symbolically traces ``model``: torch's own layers
(``nn.Linear``, ``nn.Embedding``, ...) stay one ``call_module`` operator each, and the user's
modules named in ``leaf_modules`` (classes or instances) are kept whole, as one operator,
rather than traced through. Dead code (values the output does not use) is removed: every
operator then reaches the output, which the stage builder relies on (one sink stage).

A model fx cannot trace (Python control flow on shapes, calls fx cannot proxy) is captured
with ``torch.export`` instead when a sample input is given
(:mod:`pipetrain.graphpipe.export_capture`: ATen operators, grouped back into the user's
layers, over the user's parameters). If that fails too (control flow on tensor *values*),
the :class:`CaptureError` names the failing line of the user's code and how to mark the
module around it as a leaf.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Iterable, Optional, Sequence

from torch import fx, nn

__all__ = ["CaptureError", "capture"]


class CaptureError(ValueError):
    """The model could not be traced; the message names the line and the fix."""


class _Tracer(fx.Tracer):
    def __init__(self, classes: tuple, instances: set) -> None:
        super().__init__()
        self._classes, self._instances = classes, instances

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._instances or (self._classes and isinstance(m, self._classes)):
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(tb) -> Any:
    """The innermost traceback frame outside torch (the user's line that failed)."""
    import torch
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.dirname(__file__))
    frames = [f for f in traceback.extract_tb(tb)
              if not f.filename.startswith(torch_dir) and not f.filename.startswith(here)]
    return frames[-1] if frames else None


def capture(model: nn.Module, leaf_modules: Iterable[Any] = (),
            sample_args: Optional[Sequence[Any]] = None) -> fx.GraphModule:
    """``model`` as an ``fx.GraphModule`` sharing its parameters (the same objects).

    Args:
        model: an ``nn.Module`` (or an ``fx.GraphModule``, returned as is after dead-code
            elimination).
        leaf_modules: module classes or instances to keep as single operators.
        sample_args: the model's positional arguments for one micro-batch; with them, a model
            fx cannot trace is exported with ``torch.export`` (specialised to these shapes).

    Raises:
        CaptureError: tracing failed (and exporting, if tried); the message names the file,
            line and code where fx failed, and why export failed.
    """
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        leaves = list(leaf_modules)
        classes = tuple(c for c in leaves if isinstance(c, type))
        instances = {id(m) for m in leaves if isinstance(m, nn.Module)}
        tracer = _Tracer(classes, instances)
        try:
            graph = tracer.trace(model)
        except Exception as err:  # noqa: BLE001 -- any tracing failure gets the same advice
            fx_err = err
        else:
            fx_err = None
        if fx_err is not None:
            export_err = None
            if sample_args is not None:
                from pipetrain.graphpipe.export_capture import capture_export
                try:
                    gm = capture_export(model, sample_args, leaves)
                except Exception as err:  # noqa: BLE001 -- reported with fx's failure
                    export_err = err
                else:
                    gm.graph.eliminate_dead_code()
                    gm.recompile()
                    return gm
            frame = _user_frame(fx_err.__traceback__)
            where = (f" at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
                     if frame else "")
            first_line = (str(export_err).strip().splitlines() or [""])[0] \
                if export_err is not None else ""
            tried = ("" if export_err is None else
                     f" torch.export failed too: {type(export_err).__name__}: {first_line}.")
            raise CaptureError(
                f"cannot trace {type(model).__name__} with torch.fx{where}: "
                f"{type(fx_err).__name__}: {fx_err}.{tried} Mark the module whose forward "
                "contains this line as a leaf (leaf_modules=[ThatModule]) so it runs as one "
                "operator, or remove the data-dependent control flow") from fx_err
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
