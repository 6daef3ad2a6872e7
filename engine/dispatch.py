"""Dispatch: one run of a plan — its per-run state, and what each action does to a stage.

The executor calls :meth:`Run.dispatch` (device, index) on that device's issuing thread;
the plan says which action it is, and this module turns it into stage calls and mailbox
traffic along the stage graph's edges::

    F  s k    x = stage.join_inputs(the value on each input edge of s)
                  (the user's micro-batch for a source)
              out = stage.forward(k, x)             (a sink: the loss, weighted by size)
              post stage.split_outputs(out)[i] on output edge i
    B/I s k   g = stage.join_output_grads(the gradient on each output edge)  (None: sink)
              gi = stage.backward(k, g) / backward_input(k, g)
              post stage.split_input_grads(gi)[i] on input edge i
                  (a source keeps gi for the user's input)
    W  s k    stage.backward_weight(k)            (a batched W s k..k+n-1:
                                                   stage.backward_weight(k, n))
    U  s t    stage.update()                         (optimizer step; weights -> next version)

Every F / B / I / W runs with its weight version bound (``stage.versions``). Transfer actions
of a lowered schedule need no work in one process: values move with F and B. A :class:`Run`
holds everything one run creates (the mailbox, the inputs and targets of each micro-batch,
losses, gradients for the user's inputs), so an action of a failed run that is still running
touches only its own, abandoned run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from pipetrain.mailbox import GRAD, VALUE, Mailbox
from pipetrain.microbatch import flatten, scatter
from pipetrain.stage_run import Meter
from pipetrain.transport import to_device

__all__ = ["Run", "split_minibatches"]


def split_minibatches(batches: Sequence[Tuple[Any, Any]], m: int) -> Tuple[list, list, list, list]:
    """Scatter each ``(inputs, targets)`` mini-batch into ``m`` micro-batches.

    Returns ``(xs, ys, weights, sizes)``: per global micro-batch ``k = t * m + j`` its inputs,
    targets and loss weight (its size over its mini-batch's size); ``sizes[t]`` the
    micro-batch sizes of mini-batch ``t``. Raises ValueError naming the mini-batch.
    """
    xs, ys, weights, sizes = [], [], [], []
    for t, (inputs, targets) in enumerate(batches):
        try:
            x_mbs, x_sizes = scatter(inputs, m)
            y_mbs, y_sizes = scatter(targets, m)
        except ValueError as err:
            raise ValueError(f"mini-batch {t}: {err}" if len(batches) > 1 else str(err)) from None
        if x_sizes != y_sizes:
            raise ValueError(f"inputs and targets disagree on the batch size "
                             f"({sum(x_sizes)} vs {sum(y_sizes)})")
        total = sum(x_sizes)
        xs += x_mbs
        ys += y_mbs
        weights += [n / total for n in x_sizes]
        sizes.append(x_sizes)
    return xs, ys, weights, sizes


class Run:
    """One run of a :class:`~pipetrain.plan.Plan` over ``len(batches)`` mini-batches.

    Args:
        plan: the plan.
        stages: the :class:`~pipetrain.stage.Stage` of each stage id.
        transports: ``{edge id: Transport}`` (:func:`pipetrain.transport.for_edges`).
        devices: the torch device of each pipeline device.
        batches: ``plan.num_minibatches`` pairs ``(inputs, targets)``.
        num_threads: torch intra-op threads for each issuing thread (0: leave torch's).
    """

    def __init__(self, plan: Any, stages: Sequence[Any], transports: Dict[int, Any],
                 devices: Sequence[torch.device], batches: Sequence[Tuple[Any, Any]],
                 num_threads: int = 0) -> None:
        if len(batches) != plan.num_minibatches:
            raise ValueError(f"the plan runs {plan.num_minibatches} mini-batches, "
                             f"got {len(batches)}")
        self.plan, self.stages, self.transports = plan, stages, transports
        self.batches = batches
        self.x, self.y, self.weights, self.sizes = split_minibatches(batches, plan.num_microbatches)
        graph = plan.graph
        self.mailbox = Mailbox({e.id: e.name for e in graph.edges})
        self.losses: List[Optional[torch.Tensor]] = [None] * plan.total_microbatches
        self.input_grads: Dict[int, Any] = {}
        self.target_grads: Dict[int, Any] = {}
        self.meters = [Meter() for _ in range(plan.num_devices)]
        self.num_threads = num_threads
        self._threads_set = [False] * plan.num_devices
        # Autocast is thread-local: the caller's carries over to the issuing threads.
        self.autocast = [(dt, torch.get_autocast_dtype(dt)) for dt in ("cpu", "cuda")
                         if torch.is_autocast_enabled(dt)]
        dev = [graph.stage(s).device for s in range(graph.num_stages)]
        # Per stage: (edge, transport, from device, to device) of each output / input edge.
        self._out = [[(e, transports[e], dev[s], dev[graph.edge(e).dst])
                      for e in graph.stage(s).outputs] for s in range(graph.num_stages)]
        self._in = [[(e, transports[e], dev[graph.edge(e).src], dev[s])
                     for e in graph.stage(s).inputs] for s in range(graph.num_stages)]
        self.devices = devices

    # -- the executor's callback ----------------------------------------------------------
    def dispatch(self, device: int, index: int) -> None:
        """Run action ``index`` of ``device`` (called on that device's issuing thread)."""
        if self.num_threads and not self._threads_set[device]:
            torch.set_num_threads(self.num_threads)   # intra-op threads are per thread
            self._threads_set[device] = True
        a = self.plan.actions[device][index]
        kind = a.kind
        stage = self.stages[a.stage]
        if kind == "U":
            stage.update()
            return
        if kind not in ("F", "B", "I", "W"):
            return          # transfers of a lowered schedule: values move with F and B here
        versions = stage.versions
        versions.bind(a.version, a)
        try:
            if self.autocast and kind != "W":   # F, and B / I which may recompute F
                with contextlib.ExitStack() as stack:
                    for device_type, dtype in self.autocast:
                        stack.enter_context(torch.autocast(device_type, dtype=dtype))
                    self._compute(kind, stage, a.microbatch)
            elif kind == "W" and a.count > 1:    # a batched W: several micro-batches at once
                stage.backward_weight(a.microbatch, a.count)
            else:
                self._compute(kind, stage, a.microbatch)
        finally:
            versions.release()

    def _compute(self, kind: str, stage: Any, k: int) -> None:
        s = stage.index
        box = self.mailbox
        if kind == "F":
            inputs = self._in[s]
            if inputs:
                x = stage.join_inputs([tr.receive(box.take(VALUE, e, k)) for e, tr, _, _ in inputs])
            else:
                x = to_device(self.x[k], stage.device)
            if stage.is_last:
                loss = stage.forward(k, x, to_device(self.y[k], stage.device),
                                     weight=self.weights[k])
                self.losses[k] = loss.to("cpu")
                return
            out = stage.forward(k, x)
            for (e, tr, a, b), part in zip(self._out[s], stage.split_outputs(out)):
                box.put(VALUE, e, k, tr.send(part, a, b))
        elif kind == "W":
            stage.backward_weight(k)
        else:
            outputs = self._out[s]
            g = stage.join_output_grads([tr.receive(box.take(GRAD, e, k)) for e, tr, _, _ in outputs]) \
                if outputs else None
            gi = stage.backward(k, g) if kind == "B" else stage.backward_input(k, g)
            inputs = self._in[s]
            if inputs:
                for (e, tr, a, b), part in zip(inputs, stage.split_input_grads(gi)):
                    box.put(GRAD, e, k, tr.send(part, b, a))
            elif gi is not None:
                self.input_grads[k] = gi
            if stage.is_last:
                tg = stage.take_target_grad(k)
                if tg is not None:
                    self.target_grads[k] = tg

    # -- after a successful run -------------------------------------------------------------
    def losses_per_minibatch(self) -> List[torch.Tensor]:
        """Each mini-batch's loss: its micro-batch losses weighted by micro-batch size."""
        m = self.plan.num_microbatches
        out = []
        for t in range(self.plan.num_minibatches):
            ks = range(t * m, (t + 1) * m)
            out.append(sum(self.losses[k] * self.weights[k] for k in ks))
        return out

    def backward_into_user_tensors(self) -> None:
        """Give the user's inputs (and targets) that require grad their gradients, as the
        unsplit model's backward would: micro-batch gradients are concatenated back along
        dim 0 (summed for leaves shared by every micro-batch) and backpropagated into them."""
        m = self.plan.num_microbatches
        tensors, grads = [], []
        for which, per_mb, index in ((0, self.input_grads, 0), (1, self.target_grads, 1)):
            if not per_mb:
                continue
            for t, batch in enumerate(self.batches):
                leaves = flatten(batch[index])[0]
                mb_leaves = [flatten(per_mb.get(t * m + j))[0] if per_mb.get(t * m + j) is not None
                             else [None] * len(leaves) for j in range(m)]
                for i, leaf in enumerate(leaves):
                    if not (isinstance(leaf, torch.Tensor) and leaf.requires_grad):
                        continue
                    parts = [row[i] for row in mb_leaves]
                    if any(p is None for p in parts):
                        continue
                    parts = [p.to(leaf.device) for p in parts]
                    g = torch.cat(parts, 0) if leaf.dim() > 0 else torch.stack(parts).sum(0)
                    tensors.append(leaf)
                    grads.append(g)
        if tensors:
            torch.autograd.backward(tensors, grads)
