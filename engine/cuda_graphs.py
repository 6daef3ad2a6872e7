"""CUDA-graph capture of each stage's F/B/I/W per micro-batch (``Pipeline(cuda_graphs=True)``).

For static shapes, every action of a stage is captured once per micro-batch *slot* and
replayed afterwards. A slot is what one micro-batch of one stage needs between its F and its
B (or I and W): static input leaves, the captured forward's autograd graph (its saved
activations live in the graph pool and are rewritten in place by each F replay), static
output buffers, static output-gradient buffers and static input-gradient buffers. Slots are
per micro-batch index because up to ``m`` micro-batches are in flight between F and B, each
needing its own activations: memory is that of GPipe (every micro-batch's activations held)
whatever the schedule.

::

    F  k   copy inputs into slot.x (nothing when linked)  -> replay F -> slot.y (static out)
    B  k   copy grads into slot.go (nothing when linked)   -> replay B -> slot.gx, acc += dW
    I  k   ... replay I -> slot.gx, the weight-side gradients kept (split_backward's frontier)
    W  k   replay W -> acc += dW

*Linked* buffers: when a stage's input value is another slot's static output on the same
device (the hand-off transport passes the tensor itself), the consumer captures with that
very tensor as its static input, so no copy happens at all; likewise a producer's static
output gradient is its consumer's static input gradient. Parameter gradients accumulate, in
the graphs, into one persistent buffer per parameter, added to ``p.grad`` when the run
succeeds (:meth:`GraphedStage.commit_grads`; dropped when it fails, as for eager stages).

Two replay modes:

- *Python*: the executor calls the engine's callback for each action, which copies
  values into static buffers, replays, and posts static outputs to the mailbox. Always works.
- *Native*: once every action of the plan has a graph whose inputs are all linked (or fed
  before the run: the source stage's micro-batches, the sink's targets), the runner hands
  the executor one graph handle per action and it launches them itself — cudaGraphLaunch on
  the device's stream, without taking the GIL (csrc/runtime/graph_launch.h). Losses are read
  from the sink's static loss buffers after the run.

Recapture: a slot whose signature (shapes, dtypes, requires-grad of its inputs, target and
loss weight; the stage's trainable parameters; grad and autocast state) changes is captured
again and the old graphs dropped; that step runs in Python mode. A model whose shapes depend
on data, or that synchronizes with the host (``nonzero()``, ``.item()``) cannot be captured:
the capture error names the stage, the micro-batch and the action.

The capture bookkeeping sits behind a :class:`~pipetrain.graph_backends.GraphBackend`
(:mod:`pipetrain.graph_backends`: CUDA graphs with one memory pool per stage, and a CPU fake
the tests use). On CUDA a forward recaptured for a new signature drops all the stage's
graphs first (their shared pool is only safe when graphs replay in capture order); a
backward recaptured for a new output-gradient signature alone is not guarded so (rare: the
forward's outputs kept their shapes). Not supported:
re-materialization (activations stay in the graphs anyway), asynchronous schedules (weight
versions move parameters), several processes, targets that require grad.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pipetrain import split_backward as split
from pipetrain.autograd_fast import grad as fast_grad
from pipetrain.errors import PipelineError
from pipetrain.graph_backends import (CaptureError, CudaGraphBackend, FakeGraphBackend, Graph,
                                      GraphBackend, check_backend)
from pipetrain.microbatch import flatten, unflatten
from pipetrain.stage import Stage

__all__ = ["GraphBackend", "FakeGraphBackend", "CudaGraphBackend", "GraphedStage", "Slot",
           "check_backend", "attach", "PipelineGraphs", "CaptureError"]


# -- signatures ---------------------------------------------------------------------------
def _leaf_sig(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return (tuple(t.shape), t.dtype, t.device, t.requires_grad)
    try:
        hash(t)
        return ("value", t)
    except TypeError:
        return ("type", type(t))


def _sig(leaves: Sequence[Any]) -> tuple:
    return tuple(_leaf_sig(t) for t in leaves)


def _autocast_state() -> tuple:
    return tuple((dt, torch.get_autocast_dtype(dt)) for dt in ("cpu", "cuda")
                 if torch.is_autocast_enabled(dt))


def _static(t: torch.Tensor) -> torch.Tensor:
    t._pipetrain_static = True       # another slot may link to it (same storage, no copy)
    return t


def _copy_into(static: Sequence[Any], values: Sequence[Any]) -> None:
    # Under no_grad: static inputs are leaves that require grad. A linked buffer (the same
    # storage) needs no copy.
    with torch.no_grad():
        for s, v in zip(static, values):
            if isinstance(s, torch.Tensor) and isinstance(v, torch.Tensor) and s.data_ptr() != v.data_ptr():
                s.copy_(v)


def _tagged(kind: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    fn.kind = kind        # type: ignore[attr-defined]  # for the fake's counters
    return fn


class _Target:
    """What ``Stage._run_layers`` reads from a stash entry (the sink's target; the inputs
    when it checks that a loss which does not require grad needed none)."""

    __slots__ = ("target", "inputs")

    def __init__(self, target: Any, inputs: List[Any]) -> None:
        self.target, self.inputs = target, inputs


class Slot:
    """One micro-batch of one stage: static buffers and the graphs captured for it."""

    def __init__(self, mb: int, sig: tuple) -> None:
        self.mb, self.sig = mb, sig
        self.x: List[Any] = []            # static input leaves (requiring grad where needed)
        self.spec: Any = None
        self.target: List[Any] = []       # sink: static target leaves
        self.tspec: Any = None
        self.live: Any = None             # F's result: output leaves with their graph
        self.y: List[Any] = []            # static output leaves (detached)
        self.out_spec: Any = None
        self.loss: Optional[torch.Tensor] = None  # sink: static unweighted loss
        self.go: List[Any] = []           # static output-gradient leaves
        self.go_sig: Any = None
        self.gx: List[Any] = []           # static gradients of the grad-requiring input leaves
        self.w_work: list = []            # I's restart points for W
        self.graphs: Dict[str, Graph] = {}
        self.linked_in = False            # every tensor input leaf is a producer's static output
        self.linked_go = False            # every gradient leaf is a consumer's static buffer


class GraphedStage(Stage):
    """A :class:`~pipetrain.stage.Stage` whose F/B/I/W run as captured graphs (see the module
    docstring). :func:`attach` gives it its backend and pool; until then it is a plain stage."""

    graph_backend: Optional[GraphBackend] = None

    def _setup_graphs(self, backend: GraphBackend, pool: Any) -> None:
        self.graph_backend, self._pool = backend, pool
        self.slots: Dict[int, Slot] = {}
        self._acc: Dict[Any, torch.Tensor] = {}
        self._params_key: tuple = ()

    # -- runs and gradients ----------------------------------------------------------------
    def begin_run(self, meter: Any) -> None:
        super().begin_run(meter)
        key = tuple(id(p) for p in self.params)
        if key != self._params_key:            # frozen / unfrozen: every graph is stale
            self.slots.clear()
            self._acc = {p: torch.zeros_like(p) for p in self.params}
            self._params_key = key

    def staged_grads(self) -> Optional[Dict[Any, torch.Tensor]]:
        """This run's gradients: the graphs' accumulators (loss scaling checks and unscales
        them in place before the commit)."""
        staged = super().staged_grads()
        if self.graph_backend is None:
            return staged
        return {**(staged or {}), **self._acc}

    def commit_grads(self) -> None:
        super().commit_grads()
        scale = self.grad_scale() if self.grad_scale is not None else 1.0
        for p, acc in self._acc.items():
            g = acc * scale if scale != 1.0 else acc
            if p.grad is None:
                p.grad = g.clone() if g is acc else g
            else:
                p.grad.add_(g)
            acc.zero_()

    def end_run(self, commit: bool) -> None:
        if not commit:
            for acc in self._acc.values():
                acc.zero_()
        super().end_run(commit)

    # -- capture and replay ----------------------------------------------------------------
    def _name(self, kind: str, mb: int) -> str:
        return f"stage {self.index}, micro-batch {mb}, action {kind} ({self.index}{kind}{mb})"

    def _capture(self, slot: Slot, kind: str, body: Callable[[], Any],
                 prepare: Callable[[Any], None], epilogue: Callable[[Any], None]) -> Any:
        try:
            graph = self.graph_backend.capture(_tagged(kind, body), prepare, epilogue,
                                               self.device, self._pool)
        except CaptureError:
            raise
        except Exception as err:
            raise CaptureError(f"{self._name(kind, slot.mb)} cannot be captured as a CUDA graph: "
                               f"{type(err).__name__}: {err}. cuda_graphs=True needs static shapes "
                               "and no host synchronization (no data-dependent shapes such as "
                               "nonzero(), no .item()): use cuda_graphs=False for this model") from err
        slot.graphs[kind] = graph
        return self._replay(slot, kind)

    def _replay(self, slot: Slot, kind: str) -> Any:
        graph = slot.graphs[kind]
        try:
            result = self.graph_backend.replay(graph)
        except CaptureError as err:
            raise CaptureError(f"{self._name(kind, slot.mb)}: {err}") from None
        return graph.result if result is None else result

    def _slot(self, mb: int, kind: str) -> Slot:
        slot = self.slots.get(mb)
        if slot is None or "F" not in slot.graphs:
            raise RuntimeError(f"{self._name(kind, mb)}: no captured forward for this micro-batch "
                               "(backward before forward)")
        return slot

    # -- F -----------------------------------------------------------------------------------
    def forward(self, mb: int, inputs: Any, target: Any = None, weight: float = 1.0) -> Any:
        if not torch.is_grad_enabled() or self.graph_backend is None:
            return super().forward(mb, inputs, target, weight)
        weight = weight * self.loss_scale      # a new scale (dynamic loss scaling) recaptures
        leaves, spec = flatten(inputs)
        t_leaves, t_spec = flatten(target) if target is not None else ([], None)
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in t_leaves):
            raise CaptureError(f"{self._name('F', mb)}: a target that requires grad cannot be "
                               "captured (cuda_graphs=True)")
        sig = (_sig(leaves), _sig(t_leaves), weight, self._params_key, _autocast_state())
        slot = self.slots.get(mb)
        if slot is None or slot.sig != sig:
            slot = self._capture_forward(mb, leaves, spec, t_leaves, t_spec, weight, sig)
        else:
            _copy_into(slot.x, leaves)
            _copy_into(slot.target, t_leaves)
            slot.live = self._replay(slot, "F")
        return self._forward_result(slot)

    def _forward_result(self, slot: Slot) -> Any:
        if self.loss_fn is not None:
            if self.check_finite and not bool(torch.isfinite(slot.loss)):
                raise FloatingPointError(f"loss is {slot.loss.item()} (check_finite=True)")
            return slot.loss
        return unflatten(slot.y, slot.out_spec)

    def _static_input(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        linked = getattr(t, "_pipetrain_static", False) and t.device == self.device
        x = t.detach() if linked else t.detach().clone()
        if (self.input_grad or t.requires_grad) and (x.is_floating_point() or x.is_complex()):
            x.requires_grad_(True)
        return x

    def _capture_forward(self, mb, leaves, spec, t_leaves, t_spec, weight, sig) -> Slot:
        if mb in self.slots and self.graph_backend.clear_on_recapture:
            self.slots.clear()                    # see GraphBackend.clear_on_recapture
            self._pool = self.graph_backend.pool(self.device)
        slot = self.slots[mb] = Slot(mb, sig)     # a new signature: the old graphs go
        slot.x = [self._static_input(t) for t in leaves]
        slot.linked_in = all(getattr(t, "_pipetrain_static", False) and t.device == self.device
                             for t in leaves if isinstance(t, torch.Tensor))
        slot.spec = spec
        slot.target = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in t_leaves]
        slot.tspec = t_spec
        sink = self.loss_fn is not None

        def body() -> Any:
            with torch.enable_grad():
                target = unflatten(slot.target, slot.tspec) if sink else None
                out = self._run_layers(unflatten(slot.x, slot.spec), _Target(target, slot.x))
                if sink:
                    return [out, out * weight if weight != 1.0 else out]
                return flatten(out)

        def prepare(result: Any) -> None:
            if sink:
                slot.loss = _static(torch.empty_like(result[0].detach()))
            else:
                slot.y = [_static(torch.empty_like(t.detach())) if isinstance(t, torch.Tensor) else t
                          for t in result[0]]
                slot.out_spec = result[1]

        def epilogue(result: Any) -> None:
            if sink:
                slot.loss.copy_(result[0].detach())
            else:
                _copy_into(slot.y, [t.detach() if isinstance(t, torch.Tensor) else t for t in result[0]])

        slot.live = self._capture(slot, "F", body, prepare, epilogue)
        return slot

    def _live_outputs(self, slot: Slot) -> List[Any]:
        return [slot.live[1]] if self.loss_fn is not None else slot.live[0]

    def _pairs_of(self, slot: Slot) -> Tuple[list, list]:
        outputs = self._live_outputs(slot)
        if self.loss_fn is not None:
            return ([outputs[0]], [None]) if outputs[0].requires_grad else ([], [])
        pairs = [(o, g) for o, g in zip(outputs, slot.go)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def _grad_leaves_of(self, slot: Slot) -> List[torch.Tensor]:
        return [t for t in slot.x if isinstance(t, torch.Tensor) and t.requires_grad]

    def _input_grads_of(self, slot: Slot) -> Any:
        leaves = self._grad_leaves_of(slot)
        if not self.input_grad and not leaves:
            return None
        it = iter(slot.gx)
        return unflatten([next(it) if isinstance(t, torch.Tensor) and t.requires_grad else None
                          for t in slot.x], slot.spec)

    def _set_grad_out(self, slot: Slot, kind: str, grad_outputs: Any) -> bool:
        """Copy the output gradients into the slot (True when the kind must be captured)."""
        if self.loss_fn is not None:
            return kind not in slot.graphs
        grads = flatten(grad_outputs)[0] if grad_outputs is not None else [None] * len(slot.y)
        sig = _sig(grads)
        if kind in slot.graphs and sig == slot.go_sig:
            _copy_into(slot.go, grads)
            return False
        if slot.go_sig != sig:
            for k in ("B", "I", "W"):
                slot.graphs.pop(k, None)
            slot.go_sig = sig
            slot.linked_go = all(getattr(g, "_pipetrain_static", False) and g.device == self.device
                                 for g in grads if isinstance(g, torch.Tensor))
            slot.go = [g.detach() if isinstance(g, torch.Tensor) and getattr(g, "_pipetrain_static", False)
                       and g.device == self.device else
                       (g.detach().clone() if isinstance(g, torch.Tensor) else g) for g in grads]
        return True

    def _prepare_gx(self, slot: Slot, n: int) -> Callable[[Any], None]:
        def prepare(result: Any) -> None:
            gs = result[0] if isinstance(result, tuple) else result
            slot.gx = [_static(torch.empty_like(g)) if g is not None else None for g in gs[:n]]
        return prepare

    def _accumulate(self, params: Sequence[Any], grads: Sequence[Any]) -> None:
        for p, g in zip(params, grads):
            if g is not None:
                self._acc[p].add_(g)

    # -- B -----------------------------------------------------------------------------------
    def backward(self, mb: int, grad_outputs: Any = None) -> Any:
        if self.graph_backend is None:
            return super().backward(mb, grad_outputs)
        slot = self._slot(mb, "B")
        if self._set_grad_out(slot, "B", grad_outputs):
            leaves = self._grad_leaves_of(slot)
            n = len(leaves)

            def body() -> Any:
                tensors, grads = self._pairs_of(slot)
                wrt = leaves + self.params
                if not tensors or not wrt:
                    return [None] * len(wrt)
                return list(fast_grad(tensors, wrt, grads, retain_graph=True))

            def epilogue(gs: Any) -> None:
                _copy_into(slot.gx, gs[:n])
                self._accumulate(self.params, gs[n:])

            self._capture(slot, "B", body, self._prepare_gx(slot, n), epilogue)
        else:
            self._replay(slot, "B")
        return self._input_grads_of(slot)

    # -- I and W -------------------------------------------------------------------------------
    def backward_input(self, mb: int, grad_outputs: Any = None) -> Any:
        if self.graph_backend is None:
            return super().backward_input(mb, grad_outputs)
        slot = self._slot(mb, "I")
        if self._set_grad_out(slot, "I", grad_outputs):
            slot.graphs.pop("W", None)          # W restarts from what this I captures
            leaves = self._grad_leaves_of(slot)
            if self._accumulators is None:
                self._accumulators = [torch.autograd.graph.get_gradient_edge(p).node
                                      for p in self.params]

            def body() -> Any:
                tensors, grads = self._pairs_of(slot)
                if not tensors:
                    return ([None] * len(leaves), [])
                if not self.params:
                    return (list(fast_grad(tensors, leaves, grads, retain_graph=True)), [])
                if not leaves:                  # no input gradient: W is the whole backward
                    return ([], [(tensors, grads, self.params)])
                edges, fallback, ri = split.split_plan(tensors, grads, leaves, self.params,
                                                       self._accumulators)
                gi, captured = split.input_pass(tensors, grads, leaves, edges)
                gi = list(gi)
                work = split.weight_work(edges, captured, tensors, grads, ri)
                if fallback:
                    work.append((tensors, grads, fallback))
                return (gi, work)

            def epilogue(result: Any) -> None:
                _copy_into(slot.gx, result[0])

            result = self._capture(slot, "I", body, self._prepare_gx(slot, len(leaves)), epilogue)
        else:
            result = self._replay(slot, "I")
        slot.w_work = result[1]
        return self._input_grads_of(slot)

    def backward_weight(self, mb: int) -> None:
        if self.graph_backend is None:
            return super().backward_weight(mb)
        slot = self._slot(mb, "W")
        if "I" not in slot.graphs:
            raise RuntimeError(f"{self._name('W', mb)}: W before I")
        if "W" in slot.graphs:
            self._replay(slot, "W")
            return None

        def body() -> Any:
            return [(params, list(fast_grad(outs, params, gs, retain_graph=True)))
                    for outs, gs, params in slot.w_work]

        def epilogue(result: Any) -> None:
            for params, gs in result:
                self._accumulate(params, gs)

        self._capture(slot, "W", body, lambda r: None, epilogue)
        return None

    def take_target_grad(self, mb: int) -> Any:
        return None if self.graph_backend is not None else super().take_target_grad(mb)


# -- the pipeline's view: attach, native runs -------------------------------------------------
def attach(stages: Sequence[Any], devices: Sequence[torch.device], backend: GraphBackend) -> "PipelineGraphs":
    """Give each local :class:`GraphedStage` its backend and its memory pool (one per stage,
    shared by all its graphs)."""
    backend.check_devices([s.device for s in stages if s is not None])
    for st in stages:
        if st is None:
            continue
        if not isinstance(st, GraphedStage):
            raise TypeError(f"stage {st.index} is not a GraphedStage (built without cuda_graphs)")
        st._setup_graphs(backend, backend.pool(st.device))
    return PipelineGraphs(stages, backend)


class PipelineGraphs:
    """The runner's hook: whether a run can go *native* (see the module docstring), and how.

    ``native_runs`` / ``python_runs`` count the runs of each mode."""

    def __init__(self, stages: Sequence[Any], backend: GraphBackend) -> None:
        self.stages, self.backend = stages, backend
        self.native_runs = self.python_runs = 0
        self.enabled = True

    def native(self, plan: Any, run: Any) -> Optional["NativeRun"]:
        """A :class:`NativeRun` when every action of ``plan`` has a graph and its inputs are
        linked or fed from ``run``'s micro-batches; else None (Python mode)."""
        native = self._native(plan, run) if self.enabled else None
        if native is None:
            self.python_runs += 1
        else:
            self.native_runs += 1
        return native

    def _native(self, plan: Any, run: Any) -> Optional["NativeRun"]:
        if plan.num_minibatches != 1 or plan.graph.num_stages != len(self.stages):
            return None
        rows: List[List[Tuple[Any, Slot, str]]] = []
        feeds = []
        for device_actions in plan.actions:
            row = []
            for a in device_actions:
                st = self.stages[a.stage]
                kind = str(a.kind)
                slot = st.slots.get(a.microbatch) if st is not None else None
                if kind not in ("F", "B", "I", "W") or slot is None or kind not in slot.graphs:
                    return None
                k = a.microbatch
                if kind == "F":
                    if st.inputs and not slot.linked_in:
                        return None
                    if not st.inputs or st.loss_fn is not None:
                        x = flatten(run.x[k])[0] if not st.inputs else []
                        y = flatten(run.y[k])[0] if st.loss_fn is not None else []
                        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in x + y):
                            return None        # user tensors wanting .grad: Python mode
                        if not st.inputs and _sig(x) != slot.sig[0]:
                            return None
                        if st.loss_fn is not None and (slot.sig[1] != _sig(y) or slot.sig[2]
                                                       != run.weights[k] * st.loss_scale):
                            return None
                        feeds.append((slot, x, y))
                elif kind in ("B", "I") and st.outputs and not slot.linked_go:
                    return None
                row.append((st, slot, kind))
            rows.append(row)
        for st in self.stages:
            if st is not None and st.grad_scale is not None and st.grad_scale() != 1.0:
                return None
        return NativeRun(self.backend, rows, feeds)


class NativeRun:
    """A run of captured graphs only: inputs fed before, losses read after; ``handles`` for
    the executor (CUDA), ``dispatch`` for a backend without native handles (the fake)."""

    def __init__(self, backend: GraphBackend, rows: List[List[Tuple[Any, Slot, str]]],
                 feeds: list) -> None:
        self.backend, self.rows = backend, rows
        for slot, x, y in feeds:
            _copy_into(slot.x, x)
            _copy_into(slot.target, y)
        self.handles = [[backend.handle(slot.graphs[kind]) for _, slot, kind in row]
                        for row in rows] if backend.native else None

    def dispatch(self, device: int, index: int) -> None:
        """What the executor does for a captured action, as a callback (no mailbox, no
        copies: the links carry every value)."""
        st, slot, kind = self.rows[device][index]
        result = st._replay(slot, kind)
        if kind == "F":
            slot.live = result
        elif kind == "I":
            slot.w_work = result[1]

    def finish(self, run: Any) -> None:
        """After a successful run: the sink's losses into ``run.losses``."""
        for row in self.rows:
            for st, slot, kind in row:
                if kind == "F" and st.loss_fn is not None:
                    try:
                        run.losses[slot.mb] = st._forward_result(slot).to("cpu")
                    except FloatingPointError as err:     # check_finite, read after the run
                        label = f"{st.index}F{slot.mb}"
                        raise PipelineError(
                            f"stage {st.index}, micro-batch {slot.mb}, action F ({label}, a "
                            f"captured graph) raised FloatingPointError: {err}", stage=st.index,
                            microbatch=slot.mb, action="F", label=label) from err
