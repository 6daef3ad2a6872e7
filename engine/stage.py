"""A stage: one convex piece of the model with named input and output edges of the stage graph.

A :class:`Stage` owns a list of layers (the user's module objects, never copies) and runs
them on one micro-batch at a time. It is wired by edges, not by neighbours: ``inputs`` and
``outputs`` are edge ids of ``schedule.stage_graph`` (see :mod:`pipetrain.schedules`). A
stage with one input edge receives that edge's value, with several a tuple in edge order,
with none (a source) the user's micro-batch; its output value goes out on every output edge,
and its backward sums the gradients that come back on them. A stage without output edges (a
sink) computes the loss.

Between a micro-batch's forward and its backward the stage keeps its *stash*: the boundary
inputs (detached leaves) and the autograd graph, or only the inputs and the RNG state when
re-materialized (the backward recomputes). Backward comes whole (``B``) or split for
zero-bubble schedules into ``I`` and ``W``: those live in :mod:`pipetrain.stage_backward`
(a mixin of :class:`Stage`; the split itself in :mod:`pipetrain.split_backward`).

Runs and failures. All state a step creates (stash, memory meters, gradients) lives in a
per-run object made by :meth:`Stage.begin_run`; each method picks the run up when it starts.
Parameter gradients of a run are *staged* — accumulated aside — and added to ``p.grad`` only
by :meth:`Stage.commit_grads` (at the run's successful end, or at an update ``U``). So when a
step fails, :meth:`Stage.end_run` drops the run and ``.grad`` is exactly what it was before
the step, and an action of the failed step that is still running (stuck past the timeout)
can only touch its own abandoned run, never the next step's state or ``.grad``. Used on its
own (no ``begin_run``) a stage accumulates straight into ``p.grad``.

Weights. :attr:`Stage.versions` binds the weight version an action runs on
(:mod:`pipetrain.versions`); :meth:`Stage.update` is the ``U`` action when the pipeline owns
the optimizer.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from pipetrain import checkpoint as ckpt
from pipetrain.microbatch import flatten, tree_sum, unflatten
from pipetrain.stage_backward import StageBackward, pack_into, unpack
from pipetrain.stage_run import Meter, Saved as _Saved, StageRun as _Run
from pipetrain.stage_run import accumulate as _accumulate, saved_bytes_key, tensor_bytes as _tensor_bytes
from pipetrain.versions import WeightVersions

__all__ = ["Stage", "Meter"]

_Tensor = torch.Tensor


#: Set True to measure every forward's saved tensors in runs too (the bench's "before" row).
MEASURE_EACH_FORWARD = False


class Stage(StageBackward):
    """One pipeline stage.

    Args:
        index: stage id in the stage graph.
        layers: the layers, called in order like ``nn.Sequential`` (one argument in, one out).
        device: where the layers' parameters live and where the stage computes.
        inputs, outputs: edge ids of the stage graph feeding / fed by this stage (default:
            none; the pipeline builds stages from ``schedule.stage_graph``).
        checkpoint: re-materialize (keep only boundary inputs between forward and backward).
        loss_fn: ``loss_fn(output, target) -> scalar`` (mean over the micro-batch); given only
            to a sink stage, which then returns the loss from :meth:`forward`.
        input_grad: whether gradients w.r.t. the boundary inputs are needed (False for a
            source: the user's data — but an input tensor that requires grad gets its
            gradient anyway, as in the unsplit model).
        rng_lock: serialize this stage's forward/recompute with other random stages (see
            :mod:`pipetrain.checkpoint`); ``None`` detects dropout-like modules.
        check_finite: sink: raise ``FloatingPointError`` on a non-finite loss.
        meter: the device's :class:`Meter` when used without runs; own if None.
    """

    def __init__(self, index: int, layers: Sequence[nn.Module], device: Any = "cpu", *,
                 inputs: Sequence[int] = (), outputs: Sequence[int] = (),
                 checkpoint: bool = False, loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                 input_grad: bool = True, rng_lock: Optional[bool] = None,
                 check_finite: bool = False, meter: Optional[Meter] = None) -> None:
        self.index = index
        self.layers = list(layers)
        self.device = torch.device(device)
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.checkpoint = checkpoint
        self.loss_fn = loss_fn
        self.input_grad = input_grad
        self.check_finite = check_finite
        self._rng_lock_setting = rng_lock
        self._all_params = self.parameters()
        self.params: List[nn.Parameter] = []
        self._accumulators: Optional[List[Any]] = None
        self.refresh_params()
        self._buffers = list({id(b): b for layer in self.layers for b in layer.buffers()}.values())
        # Whether the layers modify their boundary input in place (ReLU(inplace=True) right
        # after a cut): decided on the first forward, which always works on copies.
        self._clone_inputs: Optional[bool] = None
        self.meter = meter if meter is not None else Meter()
        self._run = _Run(self.meter, staged=False)
        self.versions = WeightVersions(self._all_params, name=f"stage {index}")
        self.optimizer: Any = None
        # Called around the optimizer step of each U (pipetrain.tiled_training: snapshots and
        # the count of updates applied, for a rollback after a failure); None: nothing.
        self.update_hook: Any = None
        self.grad_scale: Optional[Callable[[], float]] = None   # see commit_grads
        self.compiled: Optional[Callable[[Any], Any]] = None      # see compiled_stage
        # Sink: the loss fed to backward is multiplied by this (pipetrain.loss_scaling).
        self.loss_scale = 1.0

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

    def refresh_params(self) -> None:
        """Re-read which parameters require grad (users freeze and unfreeze between steps)."""
        params = [p for p in self._all_params if p.requires_grad]
        if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            self.params = params
            self._accumulators = None
        # How many of the parameters autograd_fast may take as plain without looking (all,
        # unless one is a tensor subclass): passed as its ``plain_tail``.
        plain = all(type(p) is torch.Tensor or type(p) is nn.Parameter for p in self.params)
        self._plain_params = len(self.params) if plain else 0

    def _training(self) -> bool:
        return any(m.training for layer in self.layers for m in layer.modules())

    @property
    def is_last(self) -> bool:
        """A sink: it computes the loss (no output edges)."""
        return self.loss_fn is not None

    @property
    def uses_rng(self) -> bool:
        if self._rng_lock_setting is not None:
            return self._rng_lock_setting
        return any(ckpt.uses_rng(m) for m in self.layers)

    @property
    def own(self) -> Meter:
        """This stage's share of its device's meter, in the current run."""
        return self._run.own

    @property
    def stash_bytes(self) -> int:
        """Bytes this stage keeps now for micro-batches between F and B (or I)."""
        return self._run.own.bytes

    @property
    def peak_stash_bytes(self) -> int:
        return self._run.own.peak_bytes

    @property
    def peak_inflight(self) -> int:
        return self._run.own.peak_count

    def reset_stats(self) -> None:
        self._run.own.reset_peaks()
        self._run.meter.reset_peaks()

    # -- runs ----------------------------------------------------------------------------
    def begin_run(self, meter: Meter, resume: bool = False) -> None:
        """Start a run: fresh stash and meters, gradients staged until :meth:`commit_grads`.
        ``resume``: a window of a streamed asynchronous run: the weight versions go on (the
        stream counts them), and the stash and meters a previous window left with
        ``end_run(keep=True)`` are kept."""
        if resume and self._run.staged is not None and self._run.meter is meter:
            return
        self.refresh_params()
        if not resume:
            self.versions.reset()      # version numbers count from the start of the run
        self._run = _Run(meter, staged=True, uses_rng=self.uses_rng,
                         measure_each=MEASURE_EACH_FORWARD)

    def staged_grads(self) -> Optional[Dict[nn.Parameter, torch.Tensor]]:
        """This run's staged gradients, by parameter (None outside a run): a multi-process
        pipeline reduces them across ranks before they are committed."""
        self._run.forget_dense()       # the caller may replace entries
        return self._run.staged

    def commit_grads(self) -> None:
        """Add the gradients staged so far in this run to ``p.grad`` (and stage no more until
        the next one arrives), times ``grad_scale()`` when one is set (token-level losses
        divide by the mini-batch's token count, known only once every forward ran)."""
        run = self._run
        if run.staged:
            scale = self.grad_scale() if self.grad_scale is not None else 1.0
            if scale != 1.0:
                for g in run.staged.values():
                    g.mul_(scale)
            _accumulate(None, list(run.staged), list(run.staged.values()))
            run.staged.clear()
            run.forget_dense()

    def end_run(self, commit: bool, keep: bool = False) -> None:
        """End the run: commit its staged gradients (``commit``) or drop them and everything
        stashed (a failed run). The stage is then as if used on its own. ``keep`` (with
        ``commit``): keep the run's stash and meters for ``begin_run(resume=True)``."""
        if commit:
            self.commit_grads()
        self.versions.release()
        if not (commit and keep):
            self._run = _Run(self.meter, staged=False)

    def clear(self) -> None:
        """Drop every stashed micro-batch and staged gradient (after a failed step)."""
        self.end_run(commit=False)

    def inflight(self) -> List[int]:
        """Micro-batches whose forward ran and whose backward has not finished."""
        return sorted(self._run.stash)

    def update(self) -> None:
        """``U``: commit the staged gradients, step this stage's optimizer, zero its
        gradients; the live weights become the next version."""
        if self.optimizer is None:
            raise RuntimeError(f"stage {self.index}: a U (update) action needs the stage's "
                               "optimizer, and none was given")
        self.commit_grads()
        self.versions.release()
        self.versions.before_update(self.optimizer)   # keeps W(n) if the plan reads it later
        hook = self.update_hook
        if hook is not None:
            hook.before()
        self.optimizer.step()
        if hook is not None:
            hook.after()
        self.optimizer.zero_grad()
        self.versions.advance()

    @staticmethod
    def _leave_inflight(run: _Run, saved: _Saved) -> None:
        if saved.inflight:
            run.add(-saved.nbytes, -1)
            saved.nbytes, saved.inflight = 0, False

    def _pop(self, run: _Run, mb: int) -> _Saved:
        saved = run.stash.pop(mb)
        self._leave_inflight(run, saved)
        if saved.w_nbytes:
            run.add(0, 0, -saved.w_nbytes)
            saved.w_nbytes = 0
        return saved

    def _get(self, run: _Run, mb: int) -> _Saved:
        try:
            return run.stash[mb]
        except KeyError:
            raise RuntimeError(f"stage {self.index} has no forward state for micro-batch {mb} "
                               "(backward before forward, or run twice)") from None

    # -- edges: how values map onto the stage graph's edges -------------------------------
    # A stage of a sequential model takes one value; these four say how the values of
    # several edges become its input and its output goes onto several edges. A stage of an
    # operator graph (GraphPipe) overrides them to route distinct values per edge.
    def join_inputs(self, values: List[Any]) -> Any:
        """The forward input from the values of the input edges (in ``inputs`` order): the
        value itself for one edge, a tuple for several."""
        return values[0] if len(values) == 1 else tuple(values)

    def split_outputs(self, out: Any) -> List[Any]:
        """The value for each output edge (in ``outputs`` order): the whole output on each
        (values used by several later stages are sent once to each)."""
        return [out] * len(self.outputs)

    def join_output_grads(self, grads: List[Any]) -> Any:
        """The gradient w.r.t. the output from those of the output edges: their sum."""
        return tree_sum(grads)

    def split_input_grads(self, grad_inputs: Any) -> List[Any]:
        """The gradient to send back on each input edge, from :meth:`backward`'s result."""
        n = len(self.inputs)
        if n == 1:
            return [grad_inputs]
        return list(grad_inputs) if grad_inputs is not None else [None] * n

    # -- forward -------------------------------------------------------------------------
    def _run_layers(self, x: Any, saved: _Saved) -> Any:
        if self.compiled is not None:          # Pipeline(compile=...): pipetrain.compiled_stage
            x = self.compiled(x)
        else:
            for layer in self.layers:
                x = layer(x)
        if self.loss_fn is None:
            return x
        loss = self.loss_fn(x, saved.target)
        if type(loss) is _Tensor and loss.requires_grad and loss.dim() == 0:
            return loss             # the usual case: every check below passes
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor; got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        if torch.is_grad_enabled() and not loss.requires_grad and self._needs_grad(saved):
            raise TypeError("loss_fn returned a tensor that does not require grad, so no "
                            "gradient can flow back (did it call .item(), .detach() or "
                            "torch.no_grad()?); return the loss as a differentiable tensor")
        return loss if loss.dim() == 0 else loss.reshape(())

    def _needs_grad(self, saved: _Saved) -> bool:
        return bool(self.params) or any(isinstance(t, torch.Tensor) and t.requires_grad
                                        for t in saved.inputs)

    def _call(self, saved: _Saved) -> Any:
        """Run the layers on the saved boundary inputs (on copies if they modify them)."""
        leaves = saved.inputs
        if self._clone_inputs:
            leaves = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        return self._run_layers(unflatten(leaves, saved.spec), saved)

    def forward(self, mb: int, inputs: Any, target: Any = None, weight: float = 1.0) -> Any:
        """Run the stage on micro-batch ``mb``; stash what the backward needs.

        Args:
            mb: micro-batch index.
            inputs: the input edges' value (a tuple in edge order for several edges), or the
                user's micro-batch for a source: a tensor, tuple/list/dict of tensors and plain
                values, already on ``device``.
            target: sink only: this micro-batch's target.
            weight: sink only: the loss weight (micro-batch size / mini-batch size).

        Returns:
            Not a sink: the outputs, detached (the autograd graph stays in the stash).
            Sink: the micro-batch's loss (unweighted, detached 0-dim tensor).
        """
        run = self._run
        if mb in run.stash:
            raise RuntimeError(f"stage {self.index}: forward of micro-batch {mb} ran twice")
        leaves, spec = flatten(inputs)
        x_leaves = [self._boundary(t) for t in leaves]
        saved = _Saved(inputs=x_leaves, spec=spec, target=target, weight=weight * self.loss_scale)
        if target is not None and not (type(target) is _Tensor and not target.requires_grad):
            # A target that requires grad (distillation from a live teacher) gets its
            # gradient, as in the unsplit model: it becomes a leaf of this stage's graph too.
            t_leaves, saved.target_spec = flatten(target)
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in t_leaves):
                saved.target_leaves = [t.detach().requires_grad_(True)
                                       if isinstance(t, torch.Tensor) and t.requires_grad else t
                                       for t in t_leaves]
                saved.target = unflatten(saved.target_leaves, saved.target_spec)
        random = run.uses_rng if run.uses_rng is not None else self.uses_rng
        if random:
            with ckpt.maybe_lock(True):
                out, nbytes = self._forward_stash(run, saved, x_leaves, random)
        else:
            out, nbytes = self._forward_stash(run, saved, x_leaves, random)
        run.stash[mb] = saved
        saved.nbytes = nbytes
        run.add(nbytes, 1)
        if self.loss_fn is not None:
            loss = out.detach()
            if self.check_finite and not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"loss is {loss.item()} (check_finite=True)")
            return loss
        if type(out) is _Tensor:
            return out.detach()
        return _detach_tree(out)

    def _forward_stash(self, run: _Run, saved: _Saved, x_leaves: List[Any],
                       random: bool) -> Tuple[Any, int]:
        """The forward proper: (its output, the bytes it keeps for the backward)."""
        if self.checkpoint:
            # Only a stage with random ops saves (and later restores) the generator: a
            # restore changes the global generator, which other threads may be drawing from.
            saved.rng = ckpt.save_rng_state(self.device) if random else None
            with torch.no_grad():
                out = self._forward_checked(saved)
            nbytes = _tensor_bytes(x_leaves)
        else:
            key = saved_bytes_key(x_leaves, saved.target) if run.saved_bytes is not None else None
            nbytes = run.saved_bytes.get(key) if key is not None else None
            if nbytes is not None and not self.versions.rebinds:
                # Measured before in this run: no hooks. (Weight versions that move the
                # live buffer between passes need the hook path: tensors saved through
                # hooks are read as bound at the backward, with no version-counter check
                # against the update that ran on the parameter in between.)
                if torch.is_grad_enabled():      # the executor's threads: it is
                    out = self._forward_checked(saved)
                else:
                    with torch.enable_grad():
                        out = self._forward_checked(saved)
            else:
                # The first forward works on copies of the inputs (see _forward_checked),
                # which it would count too: its measurement is not kept.
                if self._clone_inputs is None:
                    key = None
                packed: List[torch.Tensor] = []
                with torch.enable_grad(), saved_tensors_hooks(pack_into(packed), unpack):
                    out = self._forward_checked(saved)
                exclude = {p.data_ptr() for p in self.params}
                nbytes = _tensor_bytes(x_leaves + packed, exclude)
                if key is not None:
                    run.saved_bytes[key] = nbytes
            saved.outputs = flatten(out)[0]
        return out, nbytes

    def _forward_checked(self, saved: _Saved) -> Any:
        """The forward, guarding the boundary inputs against in-place modification.

        Unsplit, ``ReLU(inplace=True)`` after a cut modifies the previous layer's output; here
        that output is the stage's leaf input, which torch forbids modifying (with grad) or
        which must survive for the recomputation (re-materialized). The first forward runs on
        copies and watches whether the layers modify them; if they do, every later forward
        does too (one copy of the input), else none does. A stage whose in-place use appears
        only later gets an error naming the stage instead of a wrong gradient.
        """
        if self._clone_inputs is None:
            copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in saved.inputs]
            versions = [t._version for t in copies if isinstance(t, torch.Tensor)]
            original, saved.inputs = saved.inputs, copies
            try:
                self._clone_inputs = False      # _call must not copy the copies again
                out = self._call(saved)
            finally:
                saved.inputs = original
                now = [t._version for t in copies if isinstance(t, torch.Tensor)]
                self._clone_inputs = True if now != versions else None
            if self._clone_inputs is None:
                self._clone_inputs = False
            return out
        inputs = saved.inputs
        lone = len(inputs) == 1 and type(inputs[0]) is _Tensor   # the usual case: no lists
        before = inputs[0]._version if lone else \
            [t._version for t in inputs if isinstance(t, torch.Tensor)]
        try:
            out = self._call(saved)
        except RuntimeError as err:
            if "in-place" in str(err) and "leaf" in str(err):
                raise RuntimeError(self._inplace_message()) from err
            raise
        after = inputs[0]._version if lone else \
            [t._version for t in inputs if isinstance(t, torch.Tensor)]
        if after != before:
            raise RuntimeError(self._inplace_message())
        return out

    def _inplace_message(self) -> str:
        first = type(self.layers[0]).__name__ if self.layers else "?"
        return (f"stage {self.index} modified its boundary input in place (its first layer is "
                f"{first}); this was not seen on its first forward, so the input was not "
                "copied: move the cut so the stage does not begin with an in-place operation")

    def _boundary(self, t: Any) -> Any:
        """A boundary input as the stage sees it: detached; floats require grad if needed
        (always for a user's input that requires grad: the unsplit model gives it .grad)."""
        if not isinstance(t, torch.Tensor):
            return t
        wants = t.requires_grad
        if not wants and not self.input_grad:
            return t        # a source's data: already a leaf without grad, no alias needed
        t = t.detach()
        if (self.input_grad or wants) and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        return t


def _detach_tree(out: Any) -> Any:
    leaves, spec = flatten(out)
    return unflatten([t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], spec)
