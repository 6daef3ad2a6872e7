"""A stage: one contiguous partition of the model, its forward, backward and I/W-split backward.

A :class:`Stage` owns a list of layers (the user's module objects, never copies), runs them on
one micro-batch at a time, and keeps per micro-batch what its backward will need (its
*stash*) from the forward until the backward is done:

- normal stage: the boundary inputs (detached leaves) and the autograd graph of the forward;
- re-materialized stage: the boundary inputs and the RNG state only; the backward recomputes.

Backward comes whole (``B``: input and weight gradients in one autograd pass) or split for
zero-bubble schedules into ``I`` (gradient w.r.t. the stage inputs, on the critical path) and
``W`` (gradient w.r.t. the parameters, deferred). The split is done on the autograd graph,
without changing the model: before ``I`` the graph is walked from the stage outputs, and every
node that leads to a stage input and also has a child leading only to parameters (the
*frontier*: ``AddmmBackward`` of a Linear, ``NativeLayerNormBackward``...) gets a pre-hook
that saves the gradient flowing into it. ``I`` runs ``autograd.grad`` w.r.t. the inputs only —
the engine skips every weight-gradient computation — and ``W`` later restarts autograd at each
frontier node (``GradientEdge``) asking only for that node's parameters, so weight gradients
are computed once, without recomputing input gradients. A parameter reached both from a
frontier node's weight side and through the input side (weights reused along the chain)
cannot be split this way; those fall back to one full pass from the outputs restricted to
them. ``I + W`` therefore costs about one ``B`` plus the graph walk.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge, saved_tensors_hooks

from pipetrain import checkpoint as ckpt
from pipetrain.microbatch import Spec, flatten, unflatten

__all__ = ["Stage", "Meter"]


class Meter:
    """What a device keeps between forward and backward, now and at peak.

    ``bytes`` / ``count``: boundary inputs (and, without re-materialization, the saved
    activations of the graph) of the micro-batches in flight — from the start of F to the end
    of B, or of I for a split backward (the simulator's definition of in flight).
    ``w_bytes``: what split backwards keep from I until their W. Stages sharing a device
    (interleaved) share one meter; all are touched only by that device's thread.
    """

    def __init__(self) -> None:
        self.bytes = self.count = self.w_bytes = 0
        self.peak_bytes = self.peak_count = self.peak_w_bytes = 0

    def add(self, nbytes: int, count: int = 0, w_bytes: int = 0) -> None:
        self.bytes += nbytes
        self.count += count
        self.w_bytes += w_bytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        self.peak_count = max(self.peak_count, self.count)
        self.peak_w_bytes = max(self.peak_w_bytes, self.w_bytes)

    def reset_peaks(self) -> None:
        self.peak_bytes, self.peak_count, self.peak_w_bytes = self.bytes, self.count, self.w_bytes


@dataclass
class _Saved:
    """What a stage keeps for one micro-batch between its forward and its (last) backward."""

    inputs: List[Any]                     # boundary-input leaves (detached; floats may require grad)
    spec: Spec                            # nesting of the inputs
    target: Any = None                    # last stage: this micro-batch's target
    weight: float = 1.0                   # last stage: loss weight (micro-batch size / batch size)
    rng: Optional[ckpt.RNGState] = None   # re-materialized: RNG state at forward start
    outputs: Optional[List[Any]] = None   # output leaves carrying the graph (None until built)
    nbytes: int = 0                       # bytes counted in the stash (until B or I)
    w_nbytes: int = 0                     # bytes counted as waiting for W (after I)
    inflight: bool = True                 # between F and the end of B / I
    recomputed: List[Any] = field(default_factory=list)  # tensors saved by a recomputation
    # Between I and W: the deferred weight-gradient work.
    w_full: Optional[Tuple[list, list]] = None        # (tensors, grads): one full pass (stage 0)
    w_edges: List[Tuple[list, list, list]] = field(default_factory=list)  # (edges, grads, params)
    w_fallback: Optional[Tuple[list, list, list]] = None  # (tensors, grads, params)


def _tensor_bytes(tensors: Sequence[Any], exclude: Optional[set] = None) -> int:
    """Bytes of distinct tensor data among ``tensors`` (views counted by their own extent)."""
    seen = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.nbytes)
        if key in seen or (exclude and t.data_ptr() in exclude):
            continue
        seen.add(key)
        total += t.nbytes
    return total


class Stage:
    """One pipeline stage.

    Args:
        index: global (virtual) stage id.
        layers: the layers, called in order like ``nn.Sequential`` (one argument in, one out).
        device: where the layers' parameters live and where the stage computes.
        checkpoint: re-materialize (keep only boundary inputs between forward and backward).
        loss_fn: ``loss_fn(output, target) -> scalar`` (mean over the micro-batch); given only
            to the last stage, which then returns the loss from :meth:`forward`.
        input_grad: whether the gradient w.r.t. the boundary inputs is needed (False for the
            first stage: the user's data).
        rng_lock: serialize this stage's forward/recompute with other random stages (see
            :mod:`pipetrain.checkpoint`); ``None`` detects dropout-like modules.
        check_finite: last stage: raise ``FloatingPointError`` on a non-finite loss.
        meter: the device's :class:`Meter` (shared by the stages of one device); own if None.
    """

    def __init__(self, index: int, layers: Sequence[nn.Module], device: Any = "cpu", *,
                 checkpoint: bool = False, loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                 input_grad: bool = True, rng_lock: Optional[bool] = None,
                 check_finite: bool = False, meter: Optional[Meter] = None) -> None:
        self.index = index
        self.layers = list(layers)
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        self.loss_fn = loss_fn
        self.input_grad = input_grad
        self.check_finite = check_finite
        self._rng_lock_setting = rng_lock
        self.params = [p for p in self.parameters() if p.requires_grad]
        self._buffers = list({id(b): b for layer in self.layers for b in layer.buffers()}.values())
        self._accumulators: Optional[List[Any]] = None
        self._stash: Dict[int, _Saved] = {}
        self.meter = meter if meter is not None else Meter()
        self.own = Meter()           # this stage's share of the device meter

    # -- bookkeeping ---------------------------------------------------------------------
    def parameters(self) -> List[nn.Parameter]:
        """The stage's parameters (each once, even if shared between its layers)."""
        seen, out = set(), []
        for layer in self.layers:
            for p in layer.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _training(self) -> bool:
        return any(m.training for layer in self.layers for m in layer.modules())

    @property
    def is_last(self) -> bool:
        return self.loss_fn is not None

    @property
    def uses_rng(self) -> bool:
        if self._rng_lock_setting is not None:
            return self._rng_lock_setting
        return any(ckpt.uses_rng(m) for m in self.layers)

    @property
    def stash_bytes(self) -> int:
        """Bytes this stage keeps now for micro-batches between F and B (or I)."""
        return self.own.bytes

    @property
    def peak_stash_bytes(self) -> int:
        return self.own.peak_bytes

    @property
    def peak_inflight(self) -> int:
        return self.own.peak_count

    def reset_stats(self) -> None:
        self.own.reset_peaks()
        self.meter.reset_peaks()

    def clear(self) -> None:
        """Drop every stashed micro-batch (after a failed step)."""
        self._stash.clear()
        self.meter.add(-self.own.bytes, -self.own.count, -self.own.w_bytes)
        self.own = Meter()

    def inflight(self) -> List[int]:
        """Micro-batches whose forward ran and whose backward has not finished."""
        return sorted(self._stash)

    def _add(self, nbytes: int, count: int = 0, w_bytes: int = 0) -> None:
        self.own.add(nbytes, count, w_bytes)
        self.meter.add(nbytes, count, w_bytes)

    def _leave_inflight(self, saved: _Saved) -> None:
        if saved.inflight:
            self._add(-saved.nbytes, -1)
            saved.nbytes, saved.inflight = 0, False

    def _pop(self, mb: int) -> _Saved:
        saved = self._stash.pop(mb)
        self._leave_inflight(saved)
        if saved.w_nbytes:
            self._add(0, 0, -saved.w_nbytes)
            saved.w_nbytes = 0
        return saved

    def _get(self, mb: int) -> _Saved:
        try:
            return self._stash[mb]
        except KeyError:
            raise RuntimeError(f"stage {self.index} has no forward state for micro-batch {mb} "
                               "(backward before forward, or run twice)") from None

    # -- forward -------------------------------------------------------------------------
    def _run_layers(self, x: Any, saved: _Saved) -> Any:
        for layer in self.layers:
            x = layer(x)
        if self.loss_fn is None:
            return x
        loss = self.loss_fn(x, saved.target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor; got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        return loss.reshape(())

    def forward(self, mb: int, inputs: Any, target: Any = None, weight: float = 1.0) -> Any:
        """Run the stage on micro-batch ``mb``; stash what the backward needs.

        Args:
            mb: micro-batch index.
            inputs: the previous stage's output (or the user's micro-batch for stage 0):
                tensor, tuple/list/dict of tensors and plain values, already on ``device``.
            target: last stage only: this micro-batch's target.
            weight: last stage only: the loss weight (micro-batch size / mini-batch size).

        Returns:
            Not last: the outputs, detached (the autograd graph stays in the stash).
            Last: the micro-batch's loss (unweighted, detached 0-dim tensor).
        """
        if mb in self._stash:
            raise RuntimeError(f"stage {self.index}: forward of micro-batch {mb} ran twice")
        leaves, spec = flatten(inputs)
        x_leaves = [self._boundary(t) for t in leaves]
        saved = _Saved(inputs=x_leaves, spec=spec, target=target, weight=weight)
        x = unflatten(x_leaves, spec)
        random = self.uses_rng
        with ckpt.maybe_lock(random):
            if self.checkpoint:
                # Only a stage with random ops saves (and later restores) the generator: a
                # restore changes the global generator, which other threads may be drawing from.
                saved.rng = ckpt.save_rng_state(self.device) if random else None
                with torch.no_grad():
                    out = self._run_layers(x, saved)
                nbytes = _tensor_bytes(x_leaves)
            else:
                packed: List[torch.Tensor] = []
                with torch.enable_grad(), saved_tensors_hooks(self._pack(packed), _unpack):
                    out = self._run_layers(x, saved)
                saved.outputs = flatten(self._scaled(out, saved))[0]
                exclude = {p.data_ptr() for p in self.params}
                nbytes = _tensor_bytes(x_leaves + packed, exclude)
        self._stash[mb] = saved
        saved.nbytes = nbytes
        self._add(nbytes, 1)
        if self.loss_fn is not None:
            loss = out.detach()
            if self.check_finite and not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"loss is {loss.item()} (check_finite=True)")
            return loss
        return _detach_tree(out)

    def _boundary(self, t: Any) -> Any:
        """A boundary input as the stage sees it: detached; floats require grad if needed."""
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        if self.input_grad and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        return t

    @staticmethod
    def _pack(packed: List[torch.Tensor]):
        def pack(t: torch.Tensor) -> torch.Tensor:
            packed.append(t)
            return t
        return pack

    @staticmethod
    def _scaled(out: Any, saved: _Saved) -> Any:
        # The last stage backpropagates loss * weight, so that summed over micro-batches the
        # gradients are those of the size-weighted mean loss (the unsplit model's).
        return out * saved.weight if isinstance(out, torch.Tensor) and out.dim() == 0 and saved.weight != 1.0 else out

    def _materialize(self, saved: _Saved) -> List[Any]:
        """The output leaves with their graph, recomputing the forward if re-materialized."""
        if saved.outputs is not None:
            return saved.outputs
        x = unflatten(saved.inputs, saved.spec)
        packed: List[torch.Tensor] = []
        random = saved.rng is not None
        replay = ckpt.restore_rng_state(saved.rng) if random else contextlib.nullcontext()
        # The recomputation must not update buffers a second time (BatchNorm running stats):
        # snapshot them and restore after. Through .data, so that autograd's version counters
        # (BatchNorm saves its running stats for backward) do not see a change.
        buffers = [(b, b.detach().clone()) for b in self._buffers] if self._training() else []
        with ckpt.maybe_lock(random), replay, \
                torch.enable_grad(), saved_tensors_hooks(self._pack(packed), _unpack):
            out = self._run_layers(x, saved)
        for b, value in buffers:
            b.data.copy_(value)
        saved.outputs = flatten(self._scaled(out, saved))[0]
        saved.recomputed = packed
        return saved.outputs

    def _pairs(self, outputs: List[Any], grad_outputs: Any) -> Tuple[list, list]:
        """(tensors, grads) to backpropagate: outputs that require grad and received one."""
        if self.loss_fn is not None:
            return ([outputs[0]], [None]) if outputs[0].requires_grad else ([], [])
        grads = flatten(grad_outputs)[0] if grad_outputs is not None else [None] * len(outputs)
        if len(grads) != len(outputs):
            raise RuntimeError(f"stage {self.index}: {len(grads)} output gradients for "
                               f"{len(outputs)} outputs")
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def _input_grads(self, saved: _Saved) -> Any:
        if not self.input_grad:
            return None
        return unflatten([t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None
                          for t in saved.inputs], saved.spec)

    # -- backward ------------------------------------------------------------------------
    def backward(self, mb: int, grad_outputs: Any = None) -> Any:
        """Full backward (``B``) of micro-batch ``mb``: accumulate parameter gradients into
        ``p.grad`` and return the gradients w.r.t. the boundary inputs (same nesting as the
        inputs; ``None`` for leaves without a gradient, and ``None`` for the first stage).

        Args:
            grad_outputs: gradients w.r.t. this stage's outputs, nested like the outputs
                (``None`` entries allowed); ignored by the last stage.
        """
        saved = self._get(mb)
        try:
            tensors, grads = self._pairs(self._materialize(saved), grad_outputs)
            if tensors:
                torch.autograd.backward(tensors, grads)
            return self._input_grads(saved)
        finally:
            self._pop(mb)

    def backward_input(self, mb: int, grad_outputs: Any = None) -> Any:
        """``I`` of micro-batch ``mb``: gradients w.r.t. the boundary inputs only; the weight
        gradients are left for :meth:`backward_weight` (the graph is kept until then)."""
        saved = self._get(mb)
        outputs = self._materialize(saved)
        tensors, grads = self._pairs(outputs, grad_outputs)
        leaves = [t for t in saved.inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        if not tensors or not self.params:
            if tensors and leaves:
                torch.autograd.backward(tensors, grads, inputs=leaves)
            self._after_input(saved, outputs)
            return self._input_grads(saved)
        if not leaves:
            saved.w_full = (tensors, grads)        # nothing to do for I: W is the whole backward
            self._after_input(saved, outputs)
            return None
        if self._accumulators is None:
            # Holding each parameter's AccumulateGrad node keeps it alive, so every later
            # graph uses the same node objects (as DDP does for its hooks).
            self._accumulators = [get_gradient_edge(p).node for p in self.params]
        edges, fallback, ri_nodes = _split_plan(tensors, grads, leaves, self.params,
                                                self._accumulators)
        captured: Dict[Any, tuple] = {}
        handles = []
        for node, _ in edges:
            if _is_custom(node):   # capture what its backward returned (see _split_plan)
                handles.append(node.register_hook(_capture_post(captured, node)))
            elif not isinstance(node, torch.Tensor):
                handles.append(node.register_prehook(_capture(captured, node)))
        try:
            in_grads = torch.autograd.grad(tensors, leaves, grads, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for t, g in zip(leaves, in_grads):
            t.grad = g
        for node, params in edges:
            if isinstance(node, torch.Tensor):     # a root not leading to any input
                saved.w_edges.append(([node], [grads[_index_of(tensors, node)]], params))
                continue
            gs = captured.get(node)
            if gs is None:
                continue
            if _is_custom(node):
                # Restart below the node, at its weight-side children, with the gradients its
                # backward already produced during I.
                slots = [(k, c, nr) for k, (c, nr) in enumerate(node.next_functions)
                         if c is not None and k < len(gs) and gs[k] is not None
                         and c not in ri_nodes]
                if slots:
                    saved.w_edges.append(([GradientEdge(c, nr) for _, c, nr in slots],
                                          [gs[k] for k, _, _ in slots], params))
                continue
            ks = [k for k, g in enumerate(gs) if g is not None]
            if ks:
                saved.w_edges.append(([GradientEdge(node, k) for k in ks], [gs[k] for k in ks], params))
        if fallback:
            saved.w_fallback = (tensors, grads, fallback)
        self._after_input(saved, outputs)
        return self._input_grads(saved)

    def _after_input(self, saved: _Saved, outputs: List[Any]) -> None:
        # I ends the micro-batch's flight; until W the graph stays (kept or recomputed).
        w = saved.nbytes
        if saved.recomputed:
            exclude = {p.data_ptr() for p in self.params}
            w = _tensor_bytes(saved.inputs + saved.recomputed, exclude)
            saved.recomputed = []
        self._leave_inflight(saved)
        saved.w_nbytes = w
        self._add(0, 0, w)

    def backward_weight(self, mb: int) -> None:
        """``W`` of micro-batch ``mb``: accumulate the parameter gradients into ``p.grad``."""
        saved = self._get(mb)
        try:
            if saved.w_full is not None:
                torch.autograd.backward(saved.w_full[0], saved.w_full[1])
            if saved.w_fallback is not None:
                tensors, grads, params = saved.w_fallback
                torch.autograd.backward(tensors, grads, inputs=params, retain_graph=True)
            for edges, grads, params in saved.w_edges:
                torch.autograd.backward(edges, grads, inputs=params, retain_graph=True)
        finally:
            self._pop(mb)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _detach_tree(out: Any) -> Any:
    leaves, spec = flatten(out)
    return unflatten([t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], spec)


def _index_of(tensors: List[torch.Tensor], t: torch.Tensor) -> int:
    for i, x in enumerate(tensors):
        if x is t:
            return i
    raise ValueError("tensor not among the outputs")


def _is_custom(node: Any) -> bool:
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


def _split_plan(tensors: List[torch.Tensor], grads: list, leaves: List[torch.Tensor],
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
