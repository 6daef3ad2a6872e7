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

:func:`split_plan` plans the split; :func:`input_pass` runs ``I`` and captures what flows
into the frontier nodes; :func:`weight_work` turns that into the restart points ``W`` runs.

**Batched W.** A schedule may run the W of several micro-batches as one action (``"1W3-5"``,
:mod:`pipetrain.schedules`); :func:`batched_weight` then computes them together. Every
weight gradient is a sum over micro-batches, and for a Linear (``AddmmBackward0`` /
``MmBackward0`` with the weight reached through its transpose) also a sum over rows:
``dW = sum_k G_k^T X_k = G^T X`` with ``G``, ``X`` the output gradients and saved inputs of
the covered micro-batches stacked by rows. So each Linear gets one GEMM over the
concatenated rows and one accumulation into its gradient (``addmm_`` into the staged
gradient: no temporary, no separate add) instead of one GEMM and one add per micro-batch;
its bias one row sum (a parameter with tensor hooks goes through autograd, where they
fire: once per W action, with the gradient summed over the micro-batches it covers). Any other frontier node (LayerNorm, a Python ``autograd.Function``,
weights reused along the chain) is run per micro-batch as before, but all micro-batches'
restart points for the same parameters go into one autograd call, which sums them in the
engine and returns one gradient per parameter: one accumulation for the batch there too.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from pipetrain import manual_backward as manual
from pipetrain.autograd_fast import grad as fast_grad
from pipetrain.manual_backward import LinearW, NormW
from pipetrain.stage_run import accumulate as _accumulate

__all__ = ["split_plan", "capture_hooks", "input_pass", "weight_work", "is_custom", "batched_weight",
           "linear_parts", "split_input", "BATCH", "ACC_BYTES"]

#: Bench lever: False runs the split as before this work -- I capturing through a Python
#: pre-hook per frontier node, W restarting autograd at every node with one accumulation per
#: node and micro-batch (the "before" rows). Same results either way.
BATCH = True

#: Bench counter: a one-element list to which W adds the bytes its gradient accumulation
#: moves (an add of a gradient into another reads both and writes one: 3x its bytes; an
#: in-place GEMM accumulation reads the gradient once more than a fresh GEMM: 1x); None:
#: not counted (the default: no cost in the step path).
ACC_BYTES: Optional[list] = None


def _count_accumulation(into: Optional[Dict[Any, torch.Tensor]], params: Sequence[Any],
                        grads: Sequence[Any]) -> None:
    total, seen = 0, set()
    for p, g in zip(params, grads):
        if g is None:
            continue
        current = p.grad if into is None else into.get(p)
        if current is not None or id(p) in seen:
            total += 3 * g.nbytes
        elif g.stride() != p.stride():
            total += 2 * g.nbytes       # the copy into the parameter's layout
        seen.add(id(p))
    ACC_BYTES[0] += total


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


def _node_of(t: Any) -> Any:
    if type(t) is GradientEdge:
        return t.node
    return t.grad_fn if t.grad_fn is not None else get_gradient_edge(t).node


_ROOT = (torch.Tensor, GradientEdge)     # a root of the split: an output or a restart edge


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
    # Leaves are known without visiting them: each parameter's AccumulateGrad node (two of
    # a Linear's five nodes) and each stage input's. Seeding them saves their visits, about
    # a third of the walk's Python time at the fine grain.
    ri: Dict[Any, bool] = {}
    rp: Dict[Any, int] = {}
    kids: Dict[Any, list] = {}
    for node, bit in bit_of.items():
        ri[node], rp[node], kids[node] = False, bit, []
    for node in input_nodes:
        if type(node).__name__ == "AccumulateGrad":
            ri[node], kids[node] = True, []
            rp.setdefault(node, 0)
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


def capture_hooks(edges: List[Tuple[Any, list]], captured: Dict[Any, tuple],
                  builtin: bool = True) -> list:
    """Hooks saving, during ``I``, the gradient flowing into each frontier node (or, for a
    Python ``autograd.Function``, what its backward returned). Returns the handles.
    ``builtin=False``: hooks on Python ``autograd.Function`` nodes only (:func:`input_pass`
    asks the engine for the others' gradients directly)."""
    handles = []
    for node, _ in edges:
        if is_custom(node):
            handles.append(node.register_hook(_capture_post(captured, node)))
        elif builtin and not isinstance(node, _ROOT):
            handles.append(node.register_prehook(_capture(captured, node)))
    return handles


def input_pass(tensors: List[Any], grads: list, leaves: List[torch.Tensor],
               edges: List[Tuple[Any, list]]) -> Tuple[tuple, Dict[Any, tuple]]:
    """``I``: the gradients w.r.t. ``leaves`` and, in the same autograd call, what flows into
    each frontier node of ``edges`` (``{node: gradients of its outputs}``, for
    :func:`weight_work`). The graph is kept for ``W``.

    A built-in frontier node's incoming gradients are asked of the engine as extra inputs
    (``GradientEdge(node, k)``), captured in C++ while the pass goes on to the leaves --
    instead of a Python pre-hook per node, registered, called and removed per micro-batch,
    which cost about a fifth of ``I`` at the fine grain. A Python ``autograd.Function``
    keeps its post-hook (what its backward returned is what ``W`` restarts from)."""
    captured: Dict[Any, tuple] = {}
    if not BATCH:               # the "before" path (bench lever)
        handles = capture_hooks(edges, captured)
        try:
            return tuple(fast_grad(tensors, leaves, grads, retain_graph=True)), captured
        finally:
            for h in handles:
                h.remove()
    nodes, points, spans = [], [], []
    for node, _ in edges:
        if isinstance(node, _ROOT) or is_custom(node):
            continue
        n = len(node._input_metadata)
        spans.append((node, len(points), len(points) + n))
        points += [GradientEdge(node, k) for k in range(n)]
    handles = capture_hooks(edges, captured, builtin=False)
    try:
        res = fast_grad(tensors, list(leaves) + points, grads, retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    n_leaves = len(leaves)
    for node, a, b in spans:
        captured[node] = tuple(res[n_leaves + a:n_leaves + b])
    return tuple(res[:n_leaves]), captured


def weight_work(edges: List[Tuple[Any, list]], captured: Dict[Any, tuple],
                tensors: List[torch.Tensor], grads: list, input_nodes: set) -> List[Tuple[list, list, list]]:
    """The restart points of ``W``: ``(outputs, grad_outputs, params)`` triples, where
    ``outputs`` are GradientEdges (or output tensors whose graph reaches no stage input)."""
    work: List[Tuple[list, list, list]] = []
    for node, params in edges:
        if isinstance(node, _ROOT):     # a root not leading to any input
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


# -- I of one micro-batch: hand-written where it can be, the autograd split for the rest ---

#: Per stage: ``{"run": (run, usable), signature: Program or None}`` (weak: a stage dropped
#: drops its programs).
_PROGRAMS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _signature(tensors: Sequence[Any], grads: Sequence[Any], leaves: Sequence[Any]) -> Optional[tuple]:
    """Shapes and dtypes of the outputs and the stage inputs (what decides the graph's shape
    for a given model); None if a gradient is not a plain tensor of its output's shape and
    dtype (then the engine's own checks must run: the autograd split)."""
    key = []
    for t, g in zip(tensors, grads):
        if type(t) is not torch.Tensor or not t.is_cpu:
            return None
        shape, dtype = t.shape, t.dtype
        if g is not None and (type(g) is not torch.Tensor or g.dtype is not dtype
                              or not g.is_cpu or g.shape != shape):
            return None
        key.append(shape)
        key.append(dtype)
    key.append(None)
    for t in leaves:
        key.append(t.shape)
        key.append(t.dtype)
    return tuple(key)


def _hand_written(stage: Any, tensors: list, grads: list, leaves: list) -> Optional[tuple]:
    """The hand-written part of ``I`` (:mod:`pipetrain.manual_backward`) for this
    micro-batch, or None when the stage cannot use it."""
    cache = _PROGRAMS.get(stage)
    if cache is None:
        cache = _PROGRAMS[stage] = {}
    run = stage._run
    usable = cache.get("run")
    if usable is None or usable[0] is not run:      # module hooks are checked once per run
        usable = cache["run"] = (run, manual.usable(stage.layers))
    if not usable[1] or torch.is_anomaly_enabled():
        return None
    key = _signature(tensors, grads, leaves)
    if key is None:
        return None
    params, accs = stage.params, stage._accumulators
    prog = cache.get(key, _MISSING)
    for _ in range(2):
        if prog is _MISSING:
            prog = cache[key] = manual.compile_program(tensors, leaves, params, accs)
        if prog is None:
            return None
        try:
            return manual.replay(prog, tensors, grads, leaves)
        except manual.Mismatch:
            # Another graph shape under the same signature (control flow): recompile for it.
            prog = _MISSING
    cache[key] = None
    return None


_MISSING = object()


def split_input(stage: Any, tensors: list, grads: list, leaves: list) -> Tuple[list, list, Optional[tuple]]:
    """``I`` of one micro-batch of ``stage`` (a :class:`~pipetrain.stage.Stage` with
    ``params`` and ``_accumulators`` set): the gradients w.r.t. ``leaves``, and what ``W``
    needs.

    Returns ``(leaf_grads, w_items, fallback)``: ``w_items`` a list of
    :class:`~pipetrain.manual_backward.LinearW` / :class:`~pipetrain.manual_backward.NormW`
    items and autograd restart points ``(outputs, grads, params)``, as
    :func:`batched_weight` takes them; ``fallback`` ``(outputs, grads, params)`` for the
    parameters only a full pass reaches, or None.

    The hand-written ``I`` of :mod:`pipetrain.manual_backward` runs from the outputs down
    to the first node it does not know; the rest of the graph, from the edges where it left
    gradients, goes through the autograd split (:func:`split_plan`, :func:`input_pass`,
    :func:`weight_work`), and the stage inputs' gradients of both parts are summed.
    """
    hand = None
    if BATCH and manual.ENABLED:
        hand = _hand_written(stage, tensors, grads, leaves)
    if hand is None:
        outs, gs, w, leaf_grads = tensors, grads, [], None
    else:
        leaf_grads, w, outs, gs = hand
        if not outs:
            return leaf_grads, w, None
    params, accs = stage.params, stage._accumulators
    edges, fallback, ri_nodes = split_plan(outs, gs, leaves, params, accs)
    in_grads, captured = input_pass(outs, gs, leaves, edges)
    w += weight_work(edges, captured, outs, gs, ri_nodes)
    if leaf_grads is not None:
        in_grads = [a if b is None else b if a is None else a + b
                    for a, b in zip(leaf_grads, in_grads)]
    return list(in_grads), w, ((outs, gs, fallback) if fallback else None)


# -- batched W ----------------------------------------------------------------------------

_ACCUMULATE_GRAD = "AccumulateGrad"


def _leaf_param(fn: Any) -> Any:
    """The parameter an ``AccumulateGrad`` node accumulates into, else None."""
    return fn.variable if fn is not None and type(fn).__name__ == _ACCUMULATE_GRAD else None


def linear_parts(outputs: list, grads: list, params: list) -> Optional[tuple]:
    """``(x, g, weight, bias)`` if the W restart point ``(outputs, grads, params)`` is the
    weight side of a Linear: ``outputs`` one GradientEdge into an ``AddmmBackward0``
    (alpha = beta = 1, bias reached directly) or ``MmBackward0`` whose second operand is
    ``weight.t()`` of a leaf parameter, and ``params`` exactly that weight (and bias).
    ``x`` (rows, in) is the saved input, ``g`` (rows, out) the captured output gradient, both
    of the weight's dtype and device; then ``dW = g^T x`` and ``db = g.sum(0)``. Else None:
    the caller runs the restart point through autograd. (Runs per Linear per W: each
    attribute read counts at the fine grain, so ``next_functions`` is built once.)"""
    if len(outputs) != 1 or len(grads) != 1:
        return None
    edge, g = outputs[0], grads[0]
    if type(edge) is not GradientEdge or edge.output_nr != 0 or type(g) is not torch.Tensor:
        return None
    node = edge.node
    name = type(node).__name__
    bias = None
    try:
        if name == "AddmmBackward0":
            if node._saved_alpha != 1 or node._saved_beta != 1:
                return None
            nf = node.next_functions
            bias_fn, t_fn = nf[0][0], nf[2][0]
            if bias_fn is not None:
                bias = _leaf_param(bias_fn)
                if bias is None:
                    return None
            x = node._saved_mat1
        elif name == "MmBackward0":
            t_fn = node.next_functions[1][0]
            x = node._saved_self
        else:
            return None
    except RuntimeError:        # a saved tensor already freed: let autograd say so
        return None
    if t_fn is None or type(t_fn).__name__ != "TBackward0":
        return None
    weight = _leaf_param(t_fn.next_functions[0][0])
    # A parameter with tensor hooks (p.register_hook) must see its gradient pass through
    # autograd, where the hooks fire: leave it to the restart.
    if weight is None or weight._backward_hooks or (bias is not None and bias._backward_hooks):
        return None
    n = len(params)
    if bias is None:
        if n != 1 or params[0] is not weight:
            return None
    elif n != 2 or not ((params[0] is weight and params[1] is bias)
                        or (params[0] is bias and params[1] is weight)):
        return None
    # Shapes and dtypes: (rows, out) = (rows, in) @ (in, out); anything else is not ours.
    ws = weight.shape
    if (x is None or g.dim() != 2 or x.dim() != 2 or len(ws) != 2 or g.shape[0] != x.shape[0]
            or g.shape[1] != ws[0] or x.shape[1] != ws[1]
            or x.dtype != weight.dtype or g.dtype != weight.dtype
            or x.device != weight.device or g.device != weight.device):
        return None
    if bias is not None and bias.shape != (ws[0],):
        return None
    return x, g, weight, bias


def _add_product(into: Optional[Dict[Any, torch.Tensor]], p: torch.Tensor, g: torch.Tensor,
                 x: torch.Tensor) -> None:
    """Accumulate ``g^T x`` into ``p``'s gradient (staged in ``into``, or ``p.grad``) in one
    GEMM: ``addmm_`` into the gradient when there is one, else a fresh ``mm``."""
    current = p.grad if into is None else into.get(p)
    if current is None or current.is_sparse or current.dtype != p.dtype:
        dw = torch.mm(g.t(), x)
        if ACC_BYTES is not None:
            _count_accumulation(into, [p], [dw])
        _accumulate(into, [p], [dw])
    else:
        if ACC_BYTES is not None:
            ACC_BYTES[0] += current.nbytes
        current.addmm_(g.t(), x)


def batched_weight(works: Sequence[List[Tuple[list, list, list]]],
                   into: Optional[Dict[Any, torch.Tensor]]) -> None:
    """Run the W of several micro-batches as one computation (see the module docstring).

    Args:
        works: per covered micro-batch, its restart points ``(outputs, grads, params)``
            (:func:`weight_work`, plus the whole-backward and fallback entries).
        into: where gradients accumulate: a run's staging dict, or None for ``p.grad``.

    Restart points for the same parameters are grouped across micro-batches (first-seen
    order). A group of Linears gets one GEMM over the stacked rows; any other group one
    autograd call over all its restart points. The sum over micro-batches is the same
    as the unbatched W's, up to floating-point summation order.
    """
    if not BATCH:
        for work in works:
            for outputs, grads, params in work:
                gs = fast_grad(outputs, params, grads, retain_graph=True)
                if ACC_BYTES is not None:
                    _count_accumulation(into, params, gs)
                _accumulate(into, params, gs)
        return
    if len(works) == 1 and ACC_BYTES is None and all(type(it) is LinearW for it in works[0]):
        # One micro-batch of Linears only (the fine grain's W): no grouping to do.
        with torch.no_grad():
            _linears_weight(works[0], into)
        return
    groups: Dict[tuple, list] = {}
    for work in works:
        for item in work:
            tp = type(item)
            if tp is LinearW or tp is NormW:
                key = (tp, id(item.weight), id(item.bias))
            else:
                key = tuple(id(p) for p in item[2])
            groups.setdefault(key, []).append(item)
    with torch.no_grad():       # gradients are plain values (as autograd's own are)
        _batched_weight(groups, into)


def _linear_weight(items: list, into: Optional[Dict[Any, torch.Tensor]], acc_params: list,
                   acc_grads: list) -> None:
    """W of one Linear over the micro-batches of ``items`` (:class:`LinearW`): one GEMM over
    their stacked rows into the weight's gradient, the bias's row sum to ``acc_*``."""
    first = items[0]
    weight, bias = first.weight, first.bias
    if len(items) == 1:
        g, x = first.g, first.x
    else:
        g = torch.cat([it.g for it in items])
        x = torch.cat([it.x for it in items]) if weight is not None else None
    if weight is not None:
        _add_product(into, weight, g, x)
    if bias is not None:
        acc_params.append(bias)
        acc_grads.append(g.sum(0))


def _linears_weight(items: list, into: Optional[Dict[Any, torch.Tensor]]) -> None:
    """W of one micro-batch's :class:`LinearW` items: each weight's ``g^T x`` accumulated in
    place (``addmm_``) where a gradient exists, the biases' row sums in one accumulation."""
    bias_p: list = []
    bias_g: list = []
    get = into.get if into is not None else None
    for it in items:
        w = it.weight
        if w is not None:
            cur = w.grad if get is None else get(w)
            if cur is None or cur.is_sparse or cur.dtype != w.dtype:
                _add_product(into, w, it.g, it.x)
            else:
                cur.addmm_(it.g.t(), it.x)
        if it.bias is not None:
            bias_p.append(it.bias)
            bias_g.append(it.g.sum(0))
    if bias_p:
        _accumulate(into, bias_p, bias_g)


def _norm_weight(items: list, acc_params: list, acc_grads: list) -> None:
    """W of one LayerNorm over the micro-batches of ``items`` (:class:`NormW`): the weight /
    bias half of ``native_layer_norm_backward``, on their stacked rows when every item has
    the same trailing shape (normalisation is per row), else per item."""
    first = items[0]
    mask = [False, first.weight is not None, first.bias is not None]
    if len(items) > 1 and all(it.x.dim() > 1 and it.x.shape[1:] == first.x.shape[1:]
                              for it in items):
        batches = [(torch.cat([it.g for it in items]), torch.cat([it.x for it in items]),
                    torch.cat([it.mean for it in items]), torch.cat([it.rstd for it in items]))]
    else:
        batches = [(it.g, it.x, it.mean, it.rstd) for it in items]
    for g, x, mean, rstd in batches:
        _, dw, db = manual._ln_bw(g, x, first.shape, mean, rstd, first.gamma, first.beta, mask)
        if first.weight is not None:
            acc_params.append(first.weight)
            acc_grads.append(dw)
        if first.bias is not None:
            acc_params.append(first.bias)
            acc_grads.append(db)


def _batched_weight(groups: Dict[tuple, list], into: Optional[Dict[Any, torch.Tensor]]) -> None:
    acc_params: list = []
    acc_grads: list = []
    for items in groups.values():
        tp = type(items[0])
        if tp is LinearW:
            _linear_weight(items, into, acc_params, acc_grads)
            continue
        if tp is NormW:
            _norm_weight(items, acc_params, acc_grads)
            continue
        parts = [linear_parts(*item) for item in items]
        if all(pt is not None for pt in parts):
            weight, bias = parts[0][2], parts[0][3]
            if all(pt[2] is weight and pt[3] is bias for pt in parts):
                g = torch.cat([pt[1] for pt in parts]) if len(parts) > 1 else parts[0][1]
                x = torch.cat([pt[0] for pt in parts]) if len(parts) > 1 else parts[0][0]
                _add_product(into, weight, g, x)
                if bias is not None:
                    acc_params.append(bias)
                    acc_grads.append(g.sum(0))
                continue
        outputs = [o for item in items for o in item[0]]
        grads = [gr for item in items for gr in item[1]]
        params = items[0][2]
        acc_params += params
        acc_grads += list(fast_grad(outputs, params, grads, retain_graph=True))
    if acc_params:
        # One accumulation for the whole batch; a parameter met twice is summed first.
        merged: Dict[int, int] = {}
        ps: list = []
        gs: list = []
        for p, g in zip(acc_params, acc_grads):
            if g is None:
                continue
            i = merged.get(id(p))
            if i is None:
                merged[id(p)] = len(ps)
                ps.append(p)
                gs.append(g)
            else:
                gs[i] = gs[i] + g
        if ACC_BYTES is not None:
            _count_accumulation(into, ps, gs)
        _accumulate(into, ps, gs)
