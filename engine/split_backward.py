"""The I/W split of a backward on the autograd graph (zero-bubble schedules).

A stage's backward can be split into ``I`` (gradients w.r.t. the stage inputs: on the
critical path) and ``W`` (gradients w.r.t. the parameters: deferred), without changing the
model. Before ``I`` the graph is walked from the stage outputs: every node that leads to a
stage input and also has a child leading only to parameters (the *frontier*:
``AddmmBackward`` of a Linear, ``NativeLayerNormBackward``...) gets a hook that saves the
gradient flowing into it. ``I`` then asks autograd for the input gradients only — the engine
skips every weight-gradient computation — and ``W`` later restarts autograd at each frontier
node (``GradientEdge``) asking only for that node's parameters, so weight gradients are
computed once, without recomputing input gradients. A parameter reached both from a frontier
node's weight side and through the input side (weights reused along the chain) cannot be
split this way; those fall back to one full pass from the outputs restricted to them.
``I + W`` therefore costs about one ``B`` plus the graph walk.

:func:`split_plan` plans the split; :func:`capture_hooks` installs the hooks for ``I``;
:func:`weight_work` turns what ``I`` captured into the restart points ``W`` runs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["split_plan", "capture_hooks", "weight_work", "is_custom"]


def _index_of(tensors: List[torch.Tensor], t: torch.Tensor) -> int:
    for i, x in enumerate(tensors):
        if x is t:
            return i
    raise ValueError("tensor not among the outputs")


def is_custom(node: Any) -> bool:
    """A node of a Python ``autograd.Function``: its backward sees a fixed
    ``ctx.needs_input_grad`` and computes every input's gradient on each call."""
    return isinstance(node, torch.autograd.function.BackwardCFunction)


def _capture_post(store: Dict[Any, tuple], node: Any):
    def hook(grad_inputs, grad_outputs):
        store[node] = tuple(grad_inputs)
    return hook


def _capture(store: Dict[Any, tuple], node: Any):
    def hook(grad_outputs):
        store[node] = tuple(grad_outputs)
    return hook


def _node_of(t: torch.Tensor) -> Any:
    return t.grad_fn if t.grad_fn is not None else get_gradient_edge(t).node


def split_plan(tensors: List[torch.Tensor], grads: list, leaves: List[torch.Tensor],
                params: List[torch.Tensor], accumulators: List[Any]) -> Tuple[list, list, set]:
    """Plan the I/W split of one backward (see the module docstring).

    Returns:
        ``(edges, fallback, input_nodes)``: ``edges`` lists ``(frontier, params)`` — a graph
        node (or an output tensor whose graph reaches no input) and the parameters ``W`` gets
        from it; ``fallback`` the parameters that need one full pass from the outputs;
        ``input_nodes`` the nodes that lead to a stage input (I's part of the graph).

    Built-in nodes compute only the gradients the running pass needs, so ``W`` restarts at a
    frontier node with the gradient captured flowing into it. A Python ``autograd.Function``
    computes all its input gradients whenever it runs (its ``needs_input_grad`` is fixed at
    forward time), so I captures what its backward returned and ``W`` restarts at its
    weight-side children instead — no part of it runs twice.
    """
    input_nodes = {_node_of(t) for t in leaves}
    # Parameters as bits of an int: set unions become integer ORs (the walk runs per action).
    bit_of = {node: 1 << i for i, node in enumerate(accumulators)}
    # Post-order walk: ri[n] = n leads to a stage input; rp[n] = bits of the parameters n
    # leads to; kids caches next_functions (each access builds a new tuple).
    ri: Dict[Any, bool] = {}
    rp: Dict[Any, int] = {}
    kids: Dict[Any, list] = {}
    roots = [_node_of(t) for t in tensors]
    stack = [n for n in roots if n is not None]
    while stack:
        node = stack[-1]
        if node in ri:
            stack.pop()
            continue
        children = kids.get(node)
        if children is None:
            children = kids[node] = [c for c, _ in node.next_functions if c is not None]
            pending = [c for c in children if c not in ri]
            if pending:
                stack.extend(pending)
                continue
        stack.pop()
        reach_in = node in input_nodes
        bits = bit_of.get(node, 0)
        for c in children:
            reach_in = reach_in or ri[c]
            bits |= rp[c]
        ri[node], rp[node] = reach_in, bits
    frontier: List[Tuple[Any, int]] = []
    conflict = 0
    for node, reach_in in ri.items():
        if not reach_in:
            continue
        weight_side = input_side = 0
        for c in kids[node]:
            if ri[c]:
                input_side |= rp[c]
            else:
                weight_side |= rp[c]
        if weight_side:
            conflict |= weight_side & input_side
            frontier.append((node, weight_side))
    for t, n in zip(tensors, roots):
        if n is not None and not ri[n] and rp[n]:
            frontier.append((t, rp[n]))
    edges = []
    for node, bits in frontier:
        keep = [p for i, p in enumerate(params) if bits >> i & 1 and not conflict >> i & 1]
        if keep:
            edges.append((node, keep))
    fallback = [p for i, p in enumerate(params) if conflict >> i & 1]
    return edges, fallback, {n for n, r in ri.items() if r}


def capture_hooks(edges: List[Tuple[Any, list]], captured: Dict[Any, tuple]) -> list:
    """Hooks saving, during ``I``, the gradient flowing into each frontier node (or, for a
    Python ``autograd.Function``, what its backward returned). Returns the handles."""
    handles = []
    for node, _ in edges:
        if is_custom(node):
            handles.append(node.register_hook(_capture_post(captured, node)))
        elif not isinstance(node, torch.Tensor):
            handles.append(node.register_prehook(_capture(captured, node)))
    return handles


def weight_work(edges: List[Tuple[Any, list]], captured: Dict[Any, tuple],
                tensors: List[torch.Tensor], grads: list, input_nodes: set) -> List[Tuple[list, list, list]]:
    """The restart points of ``W``: ``(outputs, grad_outputs, params)`` triples, where
    ``outputs`` are GradientEdges (or output tensors whose graph reaches no stage input)."""
    work: List[Tuple[list, list, list]] = []
    for node, params in edges:
        if isinstance(node, torch.Tensor):     # a root not leading to any input
            work.append(([node], [grads[_index_of(tensors, node)]], params))
            continue
        gs = captured.get(node)
        if gs is None:
            continue
        if is_custom(node):
            # Restart below the node, at its weight-side children, with the gradients its
            # backward already produced during I.
            slots = [(k, c, nr) for k, (c, nr) in enumerate(node.next_functions)
                     if c is not None and k < len(gs) and gs[k] is not None
                     and c not in input_nodes]
            if slots:
                work.append(([GradientEdge(c, nr) for _, c, nr in slots],
                             [gs[k] for k, _, _ in slots], params))
            continue
        ks = [k for k, g in enumerate(gs) if g is not None]
        if ks:
            work.append(([GradientEdge(node, k) for k in ks], [gs[k] for k in ks], params))
    return work
