"""Capture with ``torch.export`` where ``torch.fx`` symbolic tracing cannot.

``torch.fx`` traces with proxies, so a forward that branches on ``x.shape[0]``, loops
``for i in range(x.size(1))`` or calls something fx cannot proxy fails. ``torch.export``
(non-strict) runs the forward on fake tensors of the sample's shapes instead: shape-dependent
Python control flow is evaluated once, for those shapes, and the graph records the ATen
operators that ran. :func:`capture_export` turns that graph into the same kind of
``fx.GraphModule`` :func:`~pipetrain.graphpipe.capture.capture` returns, so measuring,
partitioning and the graph stages are unchanged:

* **Parameters are the user's.** The exported module refers to parameters by ``get_attr``;
  each is checked (and if needed re-pointed) to be the very ``nn.Parameter`` object of the
  user's model, so gradients land in the user's model.
* **Module boundaries.** Every ATen operator carries ``nn_module_stack`` metadata (the module
  calls it ran inside). An operator inside a module fx would keep whole -- one of torch's own
  layers (``nn.Linear``, ``nn.LayerNorm``, ...; not containers) or a module in
  ``leaf_modules`` -- is grouped with the operators of the same call: a run of consecutive
  operators (in the exported order) with the same outermost such module becomes one
  sub-``GraphModule`` called by one ``call_module`` node. A run of a topological order is
  convex, so the group never needs a value it produces itself. Operators of the user's own
  code (``torch.cat``, ``+``) stay single operators, as with fx.
* **Shapes are specialised.** The graph is valid for the sample micro-batch's shapes (the
  control flow took the sample's path); micro-batches of other shapes are not re-captured.

The guard-check module export inserts (``_guards_fn``) is removed: it re-checks the shapes
the graph was specialised on, a property of the whole model, not of any stage.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

__all__ = ["capture_export"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_leaf(m: nn.Module, classes: tuple, instances: set) -> bool:
    """The modules fx keeps whole: torch's own layers, and the user's ``leaf_modules``."""
    if id(m) in instances or (classes and isinstance(m, classes)):
        return True
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and \
        not isinstance(m, _CONTAINERS)


def _group_key(node: fx.Node, model: nn.Module, classes: tuple, instances: set
               ) -> Optional[str]:
    """The path of the outermost leaf module ``node`` ran inside, or None (user code)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in stack.values():  # outermost first
        if not path:
            continue
        try:
            sub = model.get_submodule(path)
        except AttributeError:  # a path export spelled differently: treat as user code
            return None
        if _is_leaf(sub, classes, instances):
            return path
    return None


def _share_parameters(gm: fx.GraphModule, model: nn.Module) -> None:
    """Point every parameter/buffer ``get_attr`` of ``gm`` at the user's own tensor."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in own:
            continue
        *parents, leaf = node.target.split(".")
        holder = gm.get_submodule(".".join(parents)) if parents else gm
        current = getattr(holder, leaf, None)
        if current is not own[node.target]:
            if isinstance(own[node.target], nn.Parameter):
                holder._parameters.pop(leaf, None)
                holder.register_parameter(leaf, own[node.target])
            else:
                holder._buffers.pop(leaf, None)
                holder.register_buffer(leaf, own[node.target])


def _outline(gm: fx.GraphModule, members: List[fx.Node], name: str) -> None:
    """Replace ``members`` (consecutive call_function nodes of ``gm``) by one ``call_module``
    node running a sub-GraphModule over them; its output is the value, or a tuple of the
    values used outside (then read back with ``getitem``)."""
    inside = set(members)
    sub = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    inputs: List[fx.Node] = []

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # parameters and constants: read inside the group
            env[a] = sub.get_attr(a.target)
        return env[a]

    # Placeholders first, in first-use order; then copy the members.
    for n in members:
        for a in n.all_input_nodes:
            if a not in inside and a not in env and a.op != "get_attr":
                inputs.append(a)
                env[a] = None
    for a in inputs:
        env[a] = sub.placeholder(a.name)
    for n in members:
        env[n] = sub.node_copy(n, arg)
    outs = [n for n in members if any(u not in inside for u in n.users)]
    sub.output(env[outs[0]] if len(outs) == 1 else tuple(env[o] for o in outs))
    module = fx.GraphModule(gm, sub, name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(members[-1]):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta["nn_module_stack"] = members[0].meta.get("nn_module_stack")
    if len(outs) == 1:
        outs[0].replace_all_uses_with(call, delete_user_cb=lambda u: u not in inside)
    else:
        for i, o in enumerate(outs):
            with gm.graph.inserting_after(call):
                item = gm.graph.call_function(operator.getitem, (call, i))
            o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside
                                    and u is not item)
    for n in reversed(members):
        gm.graph.erase_node(n)


def _plain_signature(gm: fx.GraphModule) -> None:
    """Export's module takes and returns flat lists (pytree codegen); give it the model's
    own signature instead: one placeholder per positional tensor argument (as fx), and the
    model's output structure (a tensor, not a 1-tuple), which the sink stage hands the loss."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None:
        return
    out = gm.graph.output_node()
    flat = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    if info.out_spec is not None:
        out.args = (torch.utils._pytree.tree_unflatten(flat, info.out_spec),)
    gm.graph._codegen = fx.graph.CodeGen()


def capture_export(model: nn.Module, sample_args: Sequence[Any],
                   leaf_modules: Iterable[Any] = ()) -> fx.GraphModule:
    """``model`` exported on ``sample_args`` (``torch.export.export(..., strict=False)``),
    as an ``fx.GraphModule`` over the user's parameters with torch's layers and the
    ``leaf_modules`` grouped into one operator each (see the module docstring).

    Raises whatever ``torch.export`` raises when it cannot capture the model.
    """
    leaves = list(leaf_modules)
    classes = tuple(c for c in leaves if isinstance(c, type))
    instances = {id(m) for m in leaves if isinstance(m, nn.Module)}
    ep = torch.export.export(model, tuple(sample_args), strict=False)
    gm = ep.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and "_guards" in str(node.target):
            gm.graph.erase_node(node)
    _share_parameters(gm, model)
    _plain_signature(gm)
    # Runs of consecutive operators under the same leaf-module call.
    runs: List[Tuple[str, List[fx.Node]]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = _group_key(node, model, classes, instances)
        if key is not None and runs and runs[-1][0] == key and runs[-1][1][-1].next is node:
            runs[-1][1].append(node)
        elif key is not None:
            runs.append((key, [node]))
    for key, members in runs:
        # Named after the module path; a name already taken (the module "a" itself holds
        # the parameters "a.0.weight", or a second call) gets a suffix.
        base = name = key.replace(".", "_")
        i = 0
        while hasattr(gm, name):
            i += 1
            name = f"{base}_op" if i == 1 else f"{base}_op{i}"
        _outline(gm, members, name)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
