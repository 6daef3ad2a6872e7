"""The backward half of a :class:`~pipetrain.stage.Stage`: ``B``, and ``I`` / ``W`` split.

:class:`StageBackward` is a mixin of :class:`~pipetrain.stage.Stage` (kept apart so each file
holds one concept: the forward and the run bookkeeping in :mod:`pipetrain.stage`, the three
backward actions here). Every method works on the stage's current run (``self._run``, a
:class:`~pipetrain.stage_run.StageRun`) and on the micro-batch's stash entry
(:class:`~pipetrain.stage_run.Saved`) that the forward made::

    B  mb   gradients of params and boundary inputs in one autograd call (the graph is freed)
    I  mb   gradients of the boundary inputs only; what W needs is kept on the stash entry
            (restart points from pipetrain.split_backward, or the whole backward when the
            stage has no input needing a gradient)
    W  mb   the parameter gradients (one or ``count`` micro-batches at once)

Parameter gradients go to ``run.accumulate`` (staged until the run commits). A stage that was
re-materialized recomputes its forward first (:meth:`StageBackward._materialize`).
"""

from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Tuple

import torch
from torch.autograd.graph import get_gradient_edge, saved_tensors_hooks

from pipetrain import checkpoint as ckpt
from pipetrain import split_backward as split
from pipetrain.autograd_fast import grad as fast_grad
from pipetrain.compiled_stage import backward_input as compiled_backward_input
from pipetrain.microbatch import _LEAF, flatten, unflatten
from pipetrain.stage_run import Saved as _Saved, StageRun as _Run
from pipetrain.stage_run import tensor_bytes as _tensor_bytes

__all__ = ["StageBackward", "pack_into", "unpack", "WHOLE_W_AS_B"]

#: A ``W`` that is the whole backward (its ``I`` had no input gradient to compute: a source
#: stage, every stage at p = 1) runs as ``B`` does: one autograd call without keeping the
#: graph, accumulated through the run's cached path. False: through
#: :func:`pipetrain.split_backward.batched_weight` like every other W (the bench's "before").
WHOLE_W_AS_B = True


def pack_into(packed: List[torch.Tensor]):
    """A ``saved_tensors_hooks`` pack function that also lists every tensor it sees in
    ``packed`` (to count what a forward saves)."""
    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t
    return pack


def unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class StageBackward:
    """``B``, ``I`` and ``W`` of a :class:`~pipetrain.stage.Stage` (a mixin: it uses the
    stage's ``_run``, ``params``, ``loss_fn``, ``input_grad``, ``_call``, ``_get``, ``_pop``
    and meters; see the module docstring)."""

    def _materialize(self, saved: _Saved) -> List[Any]:
        """The output leaves with their graph, recomputing the forward if re-materialized."""
        if saved.outputs is not None:
            return saved.outputs
        packed: List[torch.Tensor] = []
        random = saved.rng is not None
        replay = ckpt.restore_rng_state(saved.rng) if random else contextlib.nullcontext()
        # The recomputation must not update buffers a second time (BatchNorm running stats):
        # snapshot them and restore after. Through .data, so that autograd's version counters
        # (BatchNorm saves its running stats for backward) do not see a change.
        buffers = [(b, b.detach().clone()) for b in self._buffers] if self._training() else []
        with ckpt.maybe_lock(random), replay, \
                torch.enable_grad(), saved_tensors_hooks(pack_into(packed), unpack):
            out = self._call(saved)
        for b, value in buffers:
            b.data.copy_(value)
        saved.outputs = flatten(out)[0]
        saved.recomputed = packed
        return saved.outputs

    def _pairs(self, outputs: List[Any], grad_outputs: Any, weight: float = 1.0) -> Tuple[list, list]:
        """(tensors, grads) to backpropagate: outputs that require grad and received one.

        A sink backpropagates its loss with gradient ``weight`` (micro-batch size / batch
        size), so that summed over micro-batches the gradients are those of the size-weighted
        mean loss (the unsplit model's). The weight is the loss's incoming gradient rather
        than a ``loss * weight`` node in the forward: the same values (the multiply's backward
        would hand ``ones * weight`` to the loss's backward), one op and one node fewer."""
        if self.loss_fn is not None:
            loss = outputs[0]
            if not loss.requires_grad:
                return [], []
            return [loss], [None if weight == 1.0 else
                            torch.full((), weight, dtype=loss.dtype, device=loss.device)]
        grads = flatten(grad_outputs)[0] if grad_outputs is not None else [None] * len(outputs)
        if len(grads) != len(outputs):
            raise RuntimeError(f"stage {self.index}: {len(grads)} output gradients for "
                               f"{len(outputs)} outputs")
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        return [o for o, _ in pairs], [g for _, g in pairs]

    @staticmethod
    def _grad_leaves(saved: _Saved) -> List[torch.Tensor]:
        out = [t for t in saved.inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        if saved.target_leaves:
            out += [t for t in saved.target_leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        return out

    def take_target_grad(self, mb: int) -> Any:
        """Sink: the gradient w.r.t. micro-batch ``mb``'s target (nested like it), if the
        target required grad; None otherwise. Available after the backward (B or I)."""
        return self._run.target_grads.pop(mb, None)

    @staticmethod
    def _keep_target_grad(run: _Run, mb: int, saved: _Saved) -> None:
        if saved.target_leaves:
            run.target_grads[mb] = unflatten(
                [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None
                 for t in saved.target_leaves], saved.target_spec)

    def _input_grads(self, saved: _Saved, leaves: Optional[List[Any]] = None) -> Any:
        """The gradients w.r.t. the boundary inputs, nested like them (``leaves``: the
        stage's :meth:`_grad_leaves` for this micro-batch, if the caller has them)."""
        if not self.input_grad and not (self._grad_leaves(saved) if leaves is None else leaves):
            return None
        if saved.spec is _LEAF:
            t = saved.inputs[0]
            return t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None
        return unflatten([t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None
                          for t in saved.inputs], saved.spec)

    # -- backward ------------------------------------------------------------------------
    def backward(self, mb: int, grad_outputs: Any = None) -> Any:
        """Full backward (``B``) of micro-batch ``mb``: accumulate parameter gradients and
        return the gradients w.r.t. the boundary inputs (same nesting as the inputs; ``None``
        for leaves without a gradient, and ``None`` for a source whose inputs need none).

        Args:
            grad_outputs: gradients w.r.t. this stage's outputs, nested like the outputs
                (``None`` entries allowed; the sum over output edges); ignored by a sink.
        """
        run = self._run
        saved = self._get(run, mb)
        try:
            outputs = saved.outputs if saved.outputs is not None else self._materialize(saved)
            tensors, grads = self._pairs(outputs, grad_outputs, saved.weight)
            leaves = self._grad_leaves(saved)
            params = self.params
            if tensors and (leaves or params):
                if leaves:
                    gs = fast_grad(tensors, leaves + params, grads, plain_tail=self._plain_params)
                    for t, g in zip(leaves, gs):
                        t.grad = g
                    gs = gs[len(leaves):]
                else:
                    gs = fast_grad(tensors, params, grads, plain_tail=self._plain_params)
                run.accumulate(params, gs, cache=True)
            if saved.target_leaves:
                self._keep_target_grad(run, mb, saved)
            return self._input_grads(saved, leaves)
        finally:
            self._pop(run, mb)

    def backward_input(self, mb: int, grad_outputs: Any = None) -> Any:
        """``I`` of micro-batch ``mb``: gradients w.r.t. the boundary inputs only; the weight
        gradients are left for :meth:`backward_weight` (the graph is kept until then)."""
        run = self._run
        saved = self._get(run, mb)
        outputs = self._materialize(saved)
        tensors, grads = self._pairs(outputs, grad_outputs, saved.weight)
        leaves = self._grad_leaves(saved)
        if not tensors or not self.params:
            if tensors and leaves:
                for t, g in zip(leaves, fast_grad(tensors, leaves, grads)):
                    t.grad = g
            self._after_input(run, saved, mb)
            return self._input_grads(saved)
        if self.compiled is not None:    # one compiled node computes all: no split (compiled_stage)
            return compiled_backward_input(self, run, saved, mb, tensors, grads, leaves)
        if not leaves:
            saved.w_full = (tensors, grads)        # nothing to do for I: W is the whole backward
            self._after_input(run, saved, mb)
            return self._input_grads(saved, leaves)
        if self._accumulators is None:
            # Holding each parameter's AccumulateGrad node keeps it alive, so every later
            # graph uses the same node objects (as DDP does for its hooks).
            self._accumulators = [get_gradient_edge(p).node for p in self.params]
        # Hand-written where the layers allow (pipetrain.manual_backward), else the autograd
        # split; W gets Linear / LayerNorm items and autograd restart points.
        in_grads, saved.w_edges, saved.w_fallback = split.split_input(self, tensors, grads, leaves)
        for t, g in zip(leaves, in_grads):
            t.grad = g
        self._after_input(run, saved, mb)
        return self._input_grads(saved)

    def _after_input(self, run: _Run, saved: _Saved, mb: int) -> None:
        # I ends the micro-batch's flight; until W the graph stays (kept or recomputed).
        if saved.target_leaves:
            self._keep_target_grad(run, mb, saved)
        w = saved.nbytes
        if saved.recomputed:
            exclude = {p.data_ptr() for p in self.params}
            w = _tensor_bytes(saved.inputs + saved.recomputed, exclude)
            saved.recomputed = []
        saved.w_nbytes = w
        if saved.inflight:      # leaving the flight and waiting for W: one meter update
            run.add(-saved.nbytes, -1, w)
            saved.nbytes, saved.inflight = 0, False
        else:
            run.add(0, 0, w)

    def backward_weight(self, mb: int, count: int = 1) -> None:
        """``W`` of micro-batch ``mb``: accumulate the parameter gradients. ``count > 1``: a
        batched W of micro-batches ``mb .. mb + count - 1`` as one computation
        (:func:`pipetrain.split_backward.batched_weight`)."""
        # One micro-batch or several, W is the same computation (batched_weight): each
        # Linear's gradient as one GEMM accumulated in place, other layers restarted through
        # autograd, one accumulation call -- instead of one autograd call and one
        # accumulation per frontier node, the per-call toll that made I + W cost ~1.9x B at
        # the fine grain.
        run = self._run
        if count == 1:
            saved = self._get(run, mb)
            if saved.w_full is not None and not saved.w_edges and saved.w_fallback is None \
                    and WHOLE_W_AS_B and split.ACC_BYTES is None:
                # W is the whole backward (I had no input gradient to compute: a source
                # stage, every stage at p = 1): the graph has no other user, so B's path --
                # one autograd call without retain_graph, the run's cached accumulation --
                # instead of batched_weight's grouping and its per-parameter dict look-ups.
                try:
                    tensors, grads = saved.w_full
                    params = self.params
                    run.accumulate(params, fast_grad(tensors, params, grads,
                                                     plain_tail=self._plain_params), cache=True)
                finally:
                    self._pop(run, mb)
                return
        mbs = range(mb, mb + count)
        saveds = [self._get(run, k) for k in mbs]
        try:
            works = []
            for saved in saveds:
                work = list(saved.w_edges)
                if saved.w_full is not None:
                    work.append((saved.w_full[0], saved.w_full[1], self.params))
                if saved.w_fallback is not None:
                    work.append(saved.w_fallback)
                works.append(work)
            split.batched_weight(works, run.staged)
        finally:
            for k in mbs:
                self._pop(run, k)
