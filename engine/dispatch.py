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
from pipetrain.versions import LIVE, WeightVersions

__all__ = ["Run", "Feed", "Carry", "split_minibatches", "action_table", "edge_table"]

_Tensor = torch.Tensor
_COMPUTE = frozenset(("F", "B", "I", "W"))

#: Let a device borrow the intra-op threads of devices that have nothing to run (CPU runs
#: with ``num_threads`` set): before each action its issuing thread takes
#: ``num_threads * num_devices // (devices inside an action now)`` threads, so in warm-up,
#: cool-down and waits the busy stage computes on the idle stage's cores too. Off by
#: default: on the shared 2-core host it made steps 1.08-1.6x slower in 5 of 6 rows
#: (``bench/step_overhead.py``'s thread rows) -- no core is idle there to lend, and a
#: device that starts while another holds its threads oversubscribes the cores for an
#: action. Kept for measuring on hosts with idle cores.
BORROW_THREADS = False


def action_table(plan: Any) -> List[List[Tuple[str, int, int, int, Any, int]]]:
    """Per device, per action of ``plan``: ``(kind, stage, micro-batch, version, action,
    count)`` (``count``: micro-batches a batched W covers, else 1).

    Read once per plan and kept on it (the plan's actions never change): each field of a
    C++ action costs a pybind11 call (~0.2 us) and a new ``str`` for ``kind``, five per
    action per run otherwise. Shapes do not enter: the table holds only what the IR says.
    """
    table = getattr(plan, "_dispatch_table", None)
    if table is None or table[0] is not plan.actions:
        rows = [[(str(a.kind), a.stage, a.microbatch, a.version, a, getattr(a, "count", 1))
                 for a in row]
                for row in plan.actions]
        table = (plan.actions, rows)
        plan._dispatch_table = table
    return table[1]


def edge_table(plan: Any, transports: Dict[int, Any]) -> Tuple[list, list]:
    """Per stage of ``plan``'s graph, ``(edge, transport, from device, to device)`` of each
    output edge and of each input edge. Kept on the plan for the transports it was made with
    (a runner keeps its transports until its executor is replaced), like :func:`action_table`:
    rebuilt only when they change, not at every run."""
    cached = getattr(plan, "_edge_table", None)
    if cached is not None and cached[0] is transports:
        return cached[1]
    graph = plan.graph
    dev = [graph.stage(s).device for s in range(graph.num_stages)]
    out = [[(e, transports[e], dev[s], dev[graph.edge(e).dst]) for e in graph.stage(s).outputs]
           for s in range(graph.num_stages)]
    ins = [[(e, transports[e], dev[graph.edge(e).src], dev[s]) for e in graph.stage(s).inputs]
           for s in range(graph.num_stages)]
    plan._edge_table = (transports, (out, ins))
    return out, ins


def split_minibatches(batches: Sequence[Tuple[Any, Any]], m: int,
                      first_minibatch: int = 0) -> Tuple[list, list, list, list]:
    """Scatter each ``(inputs, targets)`` mini-batch into ``m`` micro-batches.

    Returns ``(xs, ys, weights, sizes)``: per global micro-batch ``k = t * m + j`` its inputs,
    targets and loss weight (its size over its mini-batch's size); ``sizes[t]`` the
    micro-batch sizes of mini-batch ``t``. Raises ValueError naming the mini-batch (as the
    caller numbers it: ``first_minibatch + t``).
    """
    xs, ys, weights, sizes = [], [], [], []
    for t, (inputs, targets) in enumerate(batches):
        try:
            x_mbs, x_sizes = scatter(inputs, m)
            y_mbs, y_sizes = scatter(targets, m)
        except ValueError as err:
            several = len(batches) > 1 or first_minibatch
            raise ValueError(f"mini-batch {first_minibatch + t}: {err}" if several else str(err)) from None
        if x_sizes != y_sizes:
            raise ValueError(f"inputs and targets disagree on the batch size "
                             f"({sum(x_sizes)} vs {sum(y_sizes)})")
        total = sum(x_sizes)
        xs += x_mbs
        ys += y_mbs
        weights += [n / total for n in x_sizes]
        sizes.append(x_sizes)
    return xs, ys, weights, sizes


class Feed:
    """Micro-batches by global index, for runs that cover a window of a longer stream.

    ``add(t, batch)`` scatters mini-batch ``t`` once; ``x[k]``, ``y[k]``, ``weights[k]``
    (dicts by global micro-batch ``k = t*m + j``) and ``sizes[t]`` are what :class:`Run`
    reads; ``drop_before(t)`` forgets the mini-batches every stage is done with (bounded
    memory while streaming).
    """

    def __init__(self, m: int) -> None:
        self.m = m
        self.x: Dict[int, Any] = {}
        self.y: Dict[int, Any] = {}
        self.weights: Dict[int, float] = {}
        self.sizes: Dict[int, List[int]] = {}
        self.batches: Dict[int, Tuple[Any, Any]] = {}

    def add(self, t: int, batch: Tuple[Any, Any]) -> None:
        """Scatter mini-batch ``t`` (ValueError naming it when it cannot be split)."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"mini-batch {t}: expected a pair (inputs, targets), got "
                             f"{type(batch).__name__}")
        try:
            xs, ys, ws, sizes = split_minibatches([batch], self.m)
        except ValueError as err:
            raise ValueError(f"mini-batch {t}: {err}") from None
        for j in range(self.m):
            k = t * self.m + j
            self.x[k], self.y[k], self.weights[k] = xs[j], ys[j], ws[j]
        self.sizes[t] = sizes[0]
        self.batches[t] = batch

    def drop_before(self, t: int) -> None:
        for old in [u for u in self.sizes if u < t]:
            for j in range(self.m):
                k = old * self.m + j
                self.x.pop(k, None), self.y.pop(k, None), self.weights.pop(k, None)
            self.sizes.pop(old)
            self.batches.pop(old, None)

    def __len__(self) -> int:
        return len(self.sizes)


class Carry:
    """What one window's run hands to the next (a streamed asynchronous run,
    :mod:`pipetrain.async_windows`): the mailbox (values posted and not yet taken), the
    devices' memory meters (their peaks span the whole stream) and the :class:`Feed`. The
    stages keep their stash and weight versions themselves (``Stage.end_run(keep=True)``).
    """

    def __init__(self, plan: Any, m: int) -> None:
        graph = plan.graph
        self.mailbox = Mailbox({e.id: e.name for e in graph.edges})
        self.meters = [Meter() for _ in range(plan.num_devices)]
        self.feed = Feed(m)
        self.runs = 0          # windows run so far (the first one starts the stages' runs)


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
                 num_threads: int = 0, carry: Optional[Carry] = None,
                 first_minibatch: int = 0) -> None:
        self.plan, self.stages, self.transports = plan, stages, transports
        self.carry = carry
        graph = plan.graph
        if carry is None:
            if len(batches) != plan.num_minibatches:
                raise ValueError(f"the plan runs {plan.num_minibatches} mini-batches, "
                                 f"got {len(batches)}")
            self.batches = batches
            self.x, self.y, self.weights, self.sizes = split_minibatches(
                batches, plan.num_microbatches, first_minibatch)
            self.mailbox = Mailbox({e.id: e.name for e in graph.edges})
            self.meters = [Meter() for _ in range(plan.num_devices)]
        else:
            # A window of a stream: data by global micro-batch, in-flight values carried.
            feed = carry.feed
            self.batches = [feed.batches[t] for t in plan.minibatches]
            self.x, self.y, self.weights, self.sizes = feed.x, feed.y, feed.weights, feed.sizes
            self.mailbox, self.meters = carry.mailbox, carry.meters
        self.losses: Dict[int, torch.Tensor] = {}
        self.input_grads: Dict[int, Any] = {}
        self.target_grads: Dict[int, Any] = {}
        self.num_threads = num_threads
        self._threads_set = [False] * plan.num_devices
        # Thread borrowing (BORROW_THREADS): who is inside an action, and each issuing
        # thread's current intra-op thread count (0: not set in this run).
        self.borrow = bool(BORROW_THREADS and num_threads and plan.num_devices > 1)
        self._inside = [False] * plan.num_devices
        self._threads_now = [0] * plan.num_devices
        self.threads_used: List[List[int]] = [[] for _ in range(plan.num_devices)] \
            if self.borrow else []
        if self.borrow:
            self.dispatch = self._dispatch_borrowing     # what the executor is handed
        # Autocast is thread-local: the caller's carries over to the issuing threads.
        self.autocast = [(dt, torch.get_autocast_dtype(dt)) for dt in ("cpu", "cuda")
                         if torch.is_autocast_enabled(dt)]
        self._out, self._in = edge_table(plan, transports)
        self.devices = devices
        self.table = action_table(plan)      # per device: (kind, stage, mb, version, action, count)

    # -- the executor's callback ----------------------------------------------------------
    def dispatch(self, device: int, index: int) -> None:
        """Run action ``index`` of ``device`` (called on that device's issuing thread)."""
        if self.num_threads and not self._threads_set[device]:
            torch.set_num_threads(self.num_threads)   # intra-op threads are per thread
            self._threads_set[device] = True
        kind, s, k, version, a, count = self.table[device][index]
        stage = self.stages[s]
        if kind not in _COMPUTE:
            if kind == "U":
                stage.update()
            return          # transfers of a lowered schedule: values move with F and B here
        versions = stage.versions
        if version == LIVE and type(versions) is WeightVersions:
            # Binding the live weights is a no-op, and so is the release after it (every
            # action releases what it bound): skip both calls and the try.
            if self.autocast and kind != "W":
                self._compute_autocast(kind, stage, k)
            elif count > 1:                     # a batched W: several micro-batches at once
                stage.backward_weight(k, count)
            else:
                self._compute(kind, stage, k)
            return
        versions.bind(version, a)
        try:
            if self.autocast and kind != "W":   # F, and B / I which may recompute F
                self._compute_autocast(kind, stage, k)
            elif count > 1:                     # a batched W: several micro-batches at once
                stage.backward_weight(k, count)
            else:
                self._compute(kind, stage, k)
        finally:
            versions.release()

    def _dispatch_borrowing(self, device: int, index: int) -> None:
        """:meth:`dispatch` with the intra-op threads of idle devices lent to this one.

        ``_inside`` is read and written under the GIL (each issuing thread holds it in
        dispatch), so the count is exact at the moment the action starts; a device that
        starts later in this action's lifetime oversubscribes the cores until one of them
        ends (at most ``num_threads`` extra threads, for one action)."""
        inside = self._inside
        inside[device] = True
        try:
            n = max(1, self.num_threads * len(inside) // sum(inside))
            if n != self._threads_now[device]:
                torch.set_num_threads(n)        # intra-op threads are per issuing thread
                self._threads_now[device] = n
            self.threads_used[device].append(n)
            self._threads_set[device] = True    # the plain dispatch must not reset it
            Run.dispatch(self, device, index)
        finally:
            inside[device] = False

    def _compute_autocast(self, kind: str, stage: Any, k: int) -> None:
        with contextlib.ExitStack() as stack:
            for device_type, dtype in self.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            self._compute(kind, stage, k)

    def _compute(self, kind: str, stage: Any, k: int) -> None:
        s = stage.index
        box = self.mailbox
        if kind == "F":
            inputs = self._in[s]
            if inputs:
                x = stage.join_inputs([tr.receive(box.take(VALUE, e, k)) for e, tr, _, _ in inputs])
            else:
                x = _on(self.x[k], stage.device)
            if stage.loss_fn is not None:      # a sink
                loss = stage.forward(k, x, _on(self.y[k], stage.device), weight=self.weights[k])
                self.losses[k] = loss if loss.is_cpu else loss.to("cpu")
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
            if stage.loss_fn is not None:
                tg = stage.take_target_grad(k)
                if tg is not None:
                    self.target_grads[k] = tg

    # -- after a successful run -------------------------------------------------------------
    def losses_per_minibatch(self) -> List[torch.Tensor]:
        """Each mini-batch's loss: its micro-batch losses weighted by micro-batch size."""
        m = self.plan.num_microbatches
        out = []
        for t in getattr(self.plan, "minibatches", range(self.plan.num_minibatches)):
            ks = range(t * m, (t + 1) * m)
            ls, ws = [self.losses[k] for k in ks], [self.weights[k] for k in ks]
            if all(type(x) is _Tensor and x.dtype == ls[0].dtype for x in ls):
                # Three ops instead of 2m (a multiply and an add per micro-batch: ~2 us of
                # every action at the fine grain); the sum is a reduction, not left to right.
                out.append((torch.stack(ls) * torch.tensor(ws, dtype=ls[0].dtype)).sum())
            else:
                out.append(sum(x * w for x, w in zip(ls, ws)))
        return out

    def samples(self) -> int:
        """Samples of the mini-batches whose updates this run applied."""
        return sum(sum(self.sizes[t]) for t in getattr(self.plan, "minibatches",
                                                        range(self.plan.num_minibatches)))

    def backward_into_user_tensors(self) -> None:
        """Give the user's inputs (and targets) that require grad their gradients, as the
        unsplit model's backward would: micro-batch gradients are concatenated back along
        dim 0 (summed for leaves shared by every micro-batch) and backpropagated into them."""
        if self.carry is not None:
            return       # a stream's window: inputs' gradients span windows (not given)
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


def _on(obj: Any, device: torch.device) -> Any:
    """``obj`` on ``device``: :func:`~pipetrain.transport.to_device`, skipping its tree walk
    for a lone tensor already there (the user's micro-batch, on every F of a source)."""
    if type(obj) is _Tensor and obj.device == device:
        return obj
    return to_device(obj, device)
