"""Hand-written ``I`` for common layers, read off the autograd graph, and their ``W`` items.

The autograd split (:mod:`pipetrain.split_backward`) pays for the split in Python: a walk
of the whole graph per micro-batch to find the frontier, an autograd pass with capture
points, then ``W`` re-reading every frontier node. At the fine grain (8 x Linear(16) + GELU,
one-row micro-batches) that made ``I + W`` ~1.4x ``B``, although the arithmetic is the
same. This module computes ``I`` directly instead, node by node, calling the same aten
backward kernels autograd's nodes call (``gelu_backward``, ``threshold_backward``,
``native_layer_norm_backward``, ``mse_loss_backward``, ``mm``...) on the tensors the
nodes saved, and hands ``W`` each Linear's ``(x, g, weight, bias)`` and each LayerNorm's
saved values -- so nothing runs twice and nothing goes through autograd.

**Program, compiled once, replayed per micro-batch.** Every micro-batch of a stage builds a
graph of the same shape, so the graph walk (which nodes lead to a stage input, their
topological order, which layer each node is) is done once per output/input signature
(shapes and dtypes) and kept as a :class:`Program`. The replay then follows the program
from the outputs' ``grad_fn`` and checks as it goes that every node has the recorded type,
every ``next_functions`` slot the recorded child (the same parameter's ``AccumulateGrad``
node, the same stage input, or a node of the recorded type) -- any difference abandons the
replay (nothing was written yet) and recompiles for that graph.

**Supported nodes** (:data:`HANDLERS`): ``AddmmBackward0`` / ``MmBackward0`` of a Linear
(weight through ``TBackward0``, bias directly, alpha = beta = 1), ``GeluBackward0``,
``ReluBackward0``, ``SiluBackward0``, ``TanhBackward0``, ``SigmoidBackward0``,
``ViewBackward0`` / ``UnsafeViewBackward0``, ``CloneBackward0``, ``AddBackward0`` and ``MulBackward0`` between
activations of one shape (residuals, dropout masks), ``NativeLayerNormBackward0``,
``MseLossBackward0``. Anything else (a Python ``autograd.Function``, a parameter used by
another op, broadcasting, a node with hooks the graph shows) stops the hand-written part
*there*: nodes below it go to the autograd split (:mod:`pipetrain.split_backward`),
restarted at the edges where the hand-written part left gradients (``GradientEdge``). A
graph with no supported node at its top costs one dictionary look-up over the autograd
split.

**What the hand-written part cannot see.** A tensor hook registered on an intermediate
activation inside a forward (``h.register_hook``, ``h.retain_grad()``) lives on its node
without a Python-visible trace, and would not fire. Module hooks (forward, backward, global)
are visible: a stage with any runs the autograd split (:func:`usable`).
``pipetrain.manual_backward.ENABLED = False`` turns the hand-written part off.

Semantics are autograd's: the same kernels on the same saved tensors (saved-tensor unpack
hooks and version checks apply as they do for autograd, on ``_saved_*`` reads); gradients
are summed where autograd's input buffers would sum them; a stage input no path reaches
gets None. CPU only (CUDA backwards run on autograd's device threads and streams; there
the autograd split runs).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["ENABLED", "HANDLERS", "LinearW", "NormW", "Program", "compile_program", "replay",
           "usable", "Mismatch"]

#: Lever (bench rows, escape hatch): False runs every I through the autograd split.
ENABLED = True

_aten = torch.ops.aten
_gelu_bw = _aten.gelu_backward.default
_threshold_bw = _aten.threshold_backward.default
_silu_bw = _aten.silu_backward.default
_tanh_bw = _aten.tanh_backward.default
_sigmoid_bw = _aten.sigmoid_backward.default
_ln_bw = _aten.native_layer_norm_backward.default
_mse_bw = _aten.mse_loss_backward.default
_I_ONLY = [True, False, False]

_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled
_T_TYPE = type(torch.zeros(1, 1, requires_grad=True).t().grad_fn)     # TBackward0


class Mismatch(Exception):
    """The graph differs from the program (replay abandoned; recompile)."""


class LinearW:
    """``W`` of one Linear for one micro-batch: ``weight.grad += g^T x``,
    ``bias.grad += g.sum(0)``. ``x`` (rows, in) is the Linear's saved input (None when only
    the bias trains), ``g`` (rows, out) the gradient of its output; ``weight`` / ``bias`` the
    parameters (None: frozen or absent)."""

    __slots__ = ("x", "g", "weight", "bias")

    def __init__(self, x: Optional[torch.Tensor], g: torch.Tensor,
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
        self.x, self.g, self.weight, self.bias = x, g, weight, bias


class NormW:
    """``W`` of one LayerNorm for one micro-batch: ``native_layer_norm_backward`` with only
    the weight / bias gradients asked for, on the values its node saved."""

    __slots__ = ("g", "x", "shape", "mean", "rstd", "gamma", "beta", "weight", "bias")

    def __init__(self, g, x, shape, mean, rstd, gamma, beta, weight, bias) -> None:
        self.g, self.x, self.shape, self.mean, self.rstd = g, x, shape, mean, rstd
        self.gamma, self.beta, self.weight, self.bias = gamma, beta, weight, bias


# -- slot kinds of a program step ---------------------------------------------------------
_NONE, _FIRST, _AGAIN, _LEAF, _PARAM, _TPARAM = range(6)


class _Step:
    """One hand-written node: where to find it, what its slots must hold, what it does."""

    __slots__ = ("j", "handler", "nslots", "checks", "deliver", "need", "weight", "bias",
                 "w_acc", "b_acc")

    def __init__(self, j: int, handler: Any, nslots: int) -> None:
        self.j, self.handler, self.nslots = j, handler, nslots
        self.checks: List[Tuple[int, int, Any]] = []    # (slot, kind, arg)
        self.deliver: List[Tuple[int, int]] = []         # (slot, buffer index)
        self.need = [False] * nslots                      # slots receiving a gradient
        self.weight = self.bias = None                    # parameters this node's W covers
        self.w_acc = self.b_acc = None                    # ... and their AccumulateGrad nodes


class Program:
    """A compiled hand-written ``I`` for one graph shape (see the module docstring).

    ``types[j]``: the node type expected at index j (steps first, in processing order, then
    the remainder's targets); ``roots``: ``(output index, j, first)``; ``steps``: the
    hand-written nodes; ``rest``: ``(j, nr)`` edges where the autograd split takes over;
    ``outside``: indices of outputs handed to the autograd split as they are."""

    __slots__ = ("types", "roots", "steps", "rest", "outside", "n_leaves", "uses_leaves")

    def __init__(self) -> None:
        self.types: List[type] = []
        self.roots: List[Tuple[int, int, bool]] = []
        self.steps: List[_Step] = []
        self.rest: List[Tuple[int, int]] = []
        self.outside: List[int] = []
        self.n_leaves = 0
        self.uses_leaves = False


# -- handlers: (node, g, step, w) -> per-slot gradients (None where not needed) -------------
def _addmm(node, g, st, w):
    if node._saved_alpha != 1 or node._saved_beta != 1:
        raise Mismatch
    gi = g.mm(node._saved_mat2.t()) if st.need[1] else None
    if st.weight is not None:
        w.append(LinearW(node._saved_mat1, g, st.weight, st.bias))
    elif st.bias is not None:
        w.append(LinearW(None, g, None, st.bias))
    return None, gi, None


def _mm(node, g, st, w):
    gi = g.mm(node._saved_mat2.t()) if st.need[0] else None
    if st.weight is not None:
        w.append(LinearW(node._saved_self, g, st.weight, None))
    return gi, None


def _gelu(node, g, st, w):
    return (_gelu_bw(g, node._saved_self, approximate=node._saved_approximate),)


def _relu(node, g, st, w):
    return (_threshold_bw(g, node._saved_result, 0),)


def _silu(node, g, st, w):
    return (_silu_bw(g, node._saved_self),)


def _tanh(node, g, st, w):
    return (_tanh_bw(g, node._saved_result),)


def _sigmoid(node, g, st, w):
    return (_sigmoid_bw(g, node._saved_result),)


def _view(node, g, st, w):
    return (g.reshape(node._saved_self_sym_sizes),)


def _identity(node, g, st, w):
    return (g,)


def _add(node, g, st, w):
    a = node._saved_alpha
    return g, (g if a == 1 else g * a) if st.need[1] else None


def _mul(node, g, st, w):
    return (g * node._saved_other if st.need[0] else None,
            g * node._saved_self if st.need[1] else None)


def _layer_norm(node, g, st, w):
    x, shape = node._saved_input, node._saved_normalized_shape
    mean, rstd = node._saved_result1, node._saved_result2
    gamma, beta = node._saved_weight, node._saved_bias
    gi = _ln_bw(g, x, shape, mean, rstd, gamma, beta, _I_ONLY)[0] if st.need[0] else None
    if st.weight is not None or st.bias is not None:
        w.append(NormW(g, x, shape, mean, rstd, gamma, beta, st.weight, st.bias))
    return gi, None, None


def _mse(node, g, st, w):
    x, target, red = node._saved_self, node._saved_target, node._saved_reduction
    return (_mse_bw(g, x, target, red) if st.need[0] else None,
            _mse_bw(g, target, x, red) if st.need[1] else None)


#: node type name -> (handler, per-slot role): "in" a gradient slot (a node, a stage input
#: or nothing), "w" a weight through TBackward0, "b" a bias / "p" a norm parameter directly.
#: Elementwise ones (``same``) need every gradient slot's shape and dtype equal to the
#: output's (no broadcasting, no promotion: the engine would reduce or cast there).
HANDLERS: Dict[str, Tuple[Any, Tuple[str, ...], bool]] = {
    "AddmmBackward0": (_addmm, ("b", "in", "w"), False),
    "MmBackward0": (_mm, ("in", "w"), False),
    "GeluBackward0": (_gelu, ("in",), True),
    "ReluBackward0": (_relu, ("in",), True),
    "SiluBackward0": (_silu, ("in",), True),
    "TanhBackward0": (_tanh, ("in",), True),
    "SigmoidBackward0": (_sigmoid, ("in",), True),
    "ViewBackward0": (_view, ("in",), False),
    "UnsafeViewBackward0": (_view, ("in",), False),
    "CloneBackward0": (_identity, ("in",), True),
    "AddBackward0": (_add, ("in", "in"), True),
    "MulBackward0": (_mul, ("in", "in"), True),
    "NativeLayerNormBackward0": (_layer_norm, ("in", "p", "p"), False),
    "MseLossBackward0": (_mse, ("in", "in"), False),
}

_global_hook_dicts = None


def usable(layers: Sequence[torch.nn.Module]) -> bool:
    """Whether a stage made of ``layers`` may use the hand-written ``I``: the lever is on and
    no module (nor a global registration) has forward or backward hooks, which could attach
    hooks to activations that only autograd would call."""
    global _global_hook_dicts
    if not ENABLED:
        return False
    if _global_hook_dicts is None:
        mod = torch.nn.modules.module
        _global_hook_dicts = [getattr(mod, name) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks") if hasattr(mod, name)]
    if any(_global_hook_dicts):
        return False
    for layer in layers:
        for m in layer.modules():
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks \
                    or m._backward_pre_hooks:
                return False
    return True


def _node_of(t: torch.Tensor) -> Any:
    return t.grad_fn if t.grad_fn is not None else get_gradient_edge(t).node


def _meta(node: Any, nr: int) -> Optional[tuple]:
    try:
        m = node._input_metadata[nr]
        return tuple(m.shape), m.dtype
    except (AttributeError, IndexError, RuntimeError):
        return None


def _weight_of(c: Any, param_of: Dict[Any, Any]) -> Any:
    """The parameter behind ``c`` if ``c`` is ``TBackward0`` of a parameter's
    ``AccumulateGrad`` (a Linear's weight as ``weight.t()``) and the parameter has no tensor
    hooks (those must see autograd), else None."""
    if type(c) is not _T_TYPE:
        return None
    nf = c.next_functions
    p = param_of.get(nf[0][0]) if len(nf) == 1 else None
    return None if p is None or p._backward_hooks else p


def compile_program(tensors: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor],
                    params: Sequence[torch.Tensor], accumulators: Sequence[Any]) -> Optional[Program]:
    """Compile the hand-written ``I`` of the graph from ``tensors`` to the stage inputs
    ``leaves`` (see the module docstring). ``accumulators[i]`` is ``params[i]``'s
    ``AccumulateGrad`` node. Returns None when no node can be hand-written."""
    if not tensors or any(type(t) is not _Tensor or t.grad_fn is None or not t.is_cpu
                          or t.is_complex() for t in tensors):
        return None
    leaf_nodes = [_node_of(t) for t in leaves]
    leaf_of = {n: i for i, n in enumerate(leaf_nodes)}
    param_of = {n: p for n, p in zip(accumulators, params)}
    # Post-order walk: reach[n] = n leads to a stage input.
    reach: Dict[Any, bool] = {n: True for n in leaf_nodes}
    for n in accumulators:
        reach.setdefault(n, False)
    kids: Dict[Any, tuple] = {}
    post: List[Any] = []
    stack = [t.grad_fn for t in tensors]
    while stack:
        node = stack[-1]
        if node in reach:
            stack.pop()
            continue
        nf = kids.get(node)
        if nf is None:
            nf = kids[node] = node.next_functions
            pending = [c for c, _ in nf if c is not None and c not in reach]
            if pending:
                stack.extend(pending)
                continue
        stack.pop()
        reach[node] = any(reach[c] for c, _ in nf if c is not None)
        post.append(node)
    chain = [n for n in reversed(post) if reach[n]]       # topological: parents first
    chain_set = set(chain)
    # Which chain nodes can be hand-written (their slots are what their handler knows).
    ok: Dict[Any, bool] = {}
    roles: Dict[Any, list] = {}
    for node in chain:
        entry = HANDLERS.get(type(node).__name__)
        if entry is None or len(kids[node]) != len(entry[1]):
            ok[node] = False
            continue
        _, slot_roles, same = entry
        out_meta = _meta(node, 0) if same else None
        good, r = True, []
        for (c, nr), role in zip(kids[node], slot_roles):
            if c is None:
                r.append((_NONE, None))
            elif role == "in" and (c in chain_set or c in leaf_of):
                if nr != 0 and c in chain_set:
                    good = False
                if same and (out_meta is None or _meta(c, nr) != out_meta):
                    good = False
                r.append((_LEAF, leaf_of[c]) if c in leaf_of else (_FIRST, c))
            elif role in ("b", "p") and c in param_of and not param_of[c]._backward_hooks:
                r.append((_PARAM, c))
            elif role == "w" and _weight_of(c, param_of) is not None:
                r.append((_TPARAM, c.next_functions[0][0]))
            else:
                good = False
        if good and type(node).__name__ == "AddmmBackward0":
            good = node._saved_alpha == 1 and node._saved_beta == 1
            if good and r[0][0] == _PARAM:
                bias = param_of[r[0][1]]
                good = bias.dim() == 1 and _meta(node, 0) is not None \
                    and bias.shape[0] == _meta(node, 0)[0][-1]
        ok[node] = good
        roles[node] = r
    # Roots: an output whose node is a chain node at output 0 is delivered to; the rest go to
    # the autograd split as they are. Any other delivery with nr != 0 bars the node.
    root_of: Dict[Any, List[int]] = {}
    prog = Program()
    for i, t in enumerate(tensors):
        n = t.grad_fn
        if n in chain_set and t.output_nr == 0:
            root_of.setdefault(n, []).append(i)
        else:
            prog.outside.append(i)
            if n in chain_set:
                ok[n] = False
    parents: Dict[Any, List[Any]] = {n: [] for n in chain}
    for node in chain:
        for c, nr in kids[node]:
            if c in chain_set:
                parents[c].append(node)
                if nr != 0:
                    ok[c] = False
    done: Dict[Any, int] = {}
    order = []
    for node in chain:
        if ok[node] and all(p in done for p in parents[node]):
            done[node] = len(order)
            order.append(node)
    if not order:
        return None
    index: Dict[Any, int] = dict(done)
    prog.types = [type(n) for n in order]
    located = set()

    def target(c: Any) -> int:
        j = index.get(c)
        if j is None:
            j = index[c] = len(prog.types)
            prog.types.append(type(c))
            prog.rest.append((j, 0))
        return j

    for n, outs in root_of.items():
        j = target(n)
        for i in outs:
            prog.roots.append((i, j, j not in located))
            located.add(j)
    for node in order:
        entry = HANDLERS[type(node).__name__]
        st = _Step(done[node], entry[0], len(kids[node]))
        for k, ((kind, arg), role) in enumerate(zip(roles[node], entry[1])):
            if kind == _FIRST:
                j = target(arg)
                st.checks.append((k, _FIRST if j not in located else _AGAIN, j))
                located.add(j)
                st.deliver.append((k, j))
                st.need[k] = True
            elif kind == _LEAF:
                st.checks.append((k, _LEAF, arg))
                st.deliver.append((k, -1 - arg))
                st.need[k] = True
                prog.uses_leaves = True
            elif kind == _PARAM:
                st.checks.append((k, _PARAM, arg))
                if role == "b" or k == 2:
                    st.bias, st.b_acc = param_of[arg], arg
                else:
                    st.weight, st.w_acc = param_of[arg], arg
            elif kind == _TPARAM:
                st.checks.append((k, _TPARAM, arg))
                st.weight, st.w_acc = param_of[arg], arg
            else:
                st.checks.append((k, _NONE, None))
        prog.steps.append(st)
    prog.n_leaves = len(leaves)
    return prog


def replay(prog: Program, tensors: Sequence[torch.Tensor], grads: Sequence[Any],
           leaves: Sequence[torch.Tensor]) -> Tuple[list, list, list, list]:
    """Run the hand-written ``I`` of ``prog`` on this micro-batch's graph, without recording
    a graph of it (as autograd's engine runs a backward: saved activations carry their
    ``grad_fn``, and with grad mode on every kernel here would build a double-backward
    graph).

    Returns ``(leaf_grads, w_items, rest_outputs, rest_grads)``: the stage inputs' gradients
    from the hand-written part (None where it delivered none), the ``W`` items
    (:class:`LinearW` / :class:`NormW`), and what the autograd split must still run
    (``GradientEdge`` s or output tensors with their gradients). Raises :class:`Mismatch`
    (before anything is written anywhere) if the graph is not the program's."""
    if not _grad_enabled():
        return _replay(prog, tensors, grads, leaves)
    _set_grad_enabled(False)            # torch.no_grad() without its context-manager toll
    try:
        return _replay(prog, tensors, grads, leaves)
    finally:
        _set_grad_enabled(True)


def _replay(prog: Program, tensors: Sequence[torch.Tensor], grads: Sequence[Any],
            leaves: Sequence[torch.Tensor]) -> Tuple[list, list, list, list]:
    n = len(prog.types)
    nodes: List[Any] = [None] * n
    buf: List[Any] = [None] * (n + prog.n_leaves)
    types = prog.types
    for i, j, first in prog.roots:
        node = tensors[i].grad_fn
        if first:
            if type(node) is not types[j]:
                raise Mismatch
            nodes[j] = node
        elif node is not nodes[j]:
            raise Mismatch
        g = grads[i]
        if g is None:
            g = torch.ones_like(tensors[i], memory_format=torch.preserve_format)
        buf[j] = g if buf[j] is None else buf[j] + g
    leaf_nodes = [_node_of(t) for t in leaves] if prog.uses_leaves else ()
    w: list = []
    for st in prog.steps:
        node = nodes[st.j]
        g = buf[st.j]
        buf[st.j] = None
        nf = node.next_functions
        if len(nf) != st.nslots:
            raise Mismatch
        for k, kind, arg in st.checks:
            c, nr = nf[k]
            if kind == _FIRST:
                if type(c) is not types[arg] or nr:
                    raise Mismatch
                nodes[arg] = c
            elif kind == _AGAIN:
                if c is not nodes[arg] or nr:
                    raise Mismatch
            elif kind == _NONE:
                if c is not None:
                    raise Mismatch
            elif kind == _PARAM:
                if c is not arg:
                    raise Mismatch
            elif kind == _TPARAM:
                if type(c) is not _T_TYPE or c.next_functions[0][0] is not arg:
                    raise Mismatch
            elif c is not leaf_nodes[arg]:    # _LEAF
                raise Mismatch
        outs = st.handler(node, g, st, w)
        for k, b in st.deliver:
            x = outs[k]
            cur = buf[b]
            buf[b] = x if cur is None else cur + x
    rest_out: list = [tensors[i] for i in prog.outside]
    rest_grads: list = [grads[i] for i in prog.outside]
    for j, nr in prog.rest:
        if buf[j] is not None:
            rest_out.append(GradientEdge(nodes[j], nr))
            rest_grads.append(buf[j])
    return [buf[-1 - i] for i in range(prog.n_leaves)], w, rest_out, rest_grads
