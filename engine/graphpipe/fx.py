"""Build an :class:`OpGraph` from a ``torch.fx`` trace: the entry point for real models.

Every ``call_module`` / ``call_function`` / ``call_method`` node becomes an operator named
after the fx node (``module`` = its module path for ``call_module``); ``placeholder`` nodes
become zero-cost sources; ``get_attr`` and ``output`` nodes are dropped. Edges follow
``node.all_input_nodes``.

Costs per operator:

* ``params``: bytes of the called module's parameters (a module called twice counts once,
  at its first call);
* ``activation``: bytes per sample of the node's output, from ``ShapeProp`` on
  ``example_inputs`` (divided by the batch size: the first input's first dimension);
* ``forward`` / ``backward``: from ``times[node_name] = (forward_s, backward_s)`` per
  sample when given (profile them); otherwise a placeholder proportional to the bytes the
  operator touches (``1e-12 s`` per byte of params + activation, backward = 2 x forward),
  enough to exercise the partitioner, not to plan a real run.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from pipetrain.graphpipe.opgraph import OpGraph

__all__ = ["opgraph_from_fx"]

PLACEHOLDER_S_PER_BYTE = 1e-12


def opgraph_from_fx(model, example_inputs: Sequence = (), *,
                    times: Optional[Dict[str, Tuple[float, float]]] = None) -> OpGraph:
    """Trace ``model`` (an ``nn.Module`` or an ``fx.GraphModule``) into an OpGraph."""
    import torch
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp

    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    batch = 1
    if example_inputs:
        ShapeProp(gm).propagate(*example_inputs)
        batch = int(example_inputs[0].shape[0]) if example_inputs[0].dim() else 1
    g = OpGraph()
    seen_modules = set()
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output"):
            continue
        inputs = [a.name for a in node.all_input_nodes if a.name in g._index]
        if node.op == "placeholder":
            g.add(node.name, inputs=inputs)
            continue
        params = 0.0
        module = None
        if node.op == "call_module":
            module = str(node.target)
            if module not in seen_modules:
                seen_modules.add(module)
                params = float(sum(p.numel() * p.element_size()
                                   for p in gm.get_submodule(module).parameters()))
        act = 0.0
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            act = float(torch.Size(meta.shape).numel() * torch.empty((), dtype=meta.dtype)
                        .element_size()) / batch
        if times and node.name in times:
            fwd, bwd = times[node.name]
        else:
            fwd = PLACEHOLDER_S_PER_BYTE * (params + act)
            bwd = 2 * fwd
        g.add(node.name, fwd, bwd, act, params, module=module, inputs=inputs)
    return g
