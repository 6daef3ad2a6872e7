"""Pipeline: train one model split into stages, driven by a schedule on the executor.

A :class:`Pipeline` owns the stages (partitions of the user's model, the same module
objects), a schedule (:mod:`pipetrain.schedules`) and an executor (:mod:`pipetrain.executor`,
one issuing thread per device). ``step(inputs, targets)`` splits the mini-batch into
micro-batches, lets the executor walk every device's action list — each action a forward
(F), backward (B) or split backward (I, W) of one stage on one micro-batch — and returns the
mean loss. Gradients accumulate into the model's own ``p.grad`` exactly as if the unsplit
model had run on the whole mini-batch, so any torch optimizer steps as usual.

Data between stages lives in two tables keyed by (stage, micro-batch): the forward output of
a stage waiting for its successor's F, and the input gradient of a stage waiting for its
predecessor's B / I. The schedule's dependencies guarantee the producer finished first.
For 1F1B with p = 3, m = 4 the action lists are (``print(pipe.schedule)``, unit costs)::

    d0: 0F0 0F1 0F2  .   .  0B0 0F3 0B1  .  0B2  .  0B3
    d1:  .  1F0 1F1  .  1B0 1F2 1B1 1F3 1B2  .  1B3
    d2:  .   .  2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3

``2F1`` waits for ``1F1``'s output in the activation table; ``1B0`` for ``2B0``'s input
gradient in the gradient table.

Between devices a value moves either directly (``Tensor.to``; nothing at all on CPU) or, with
``transfer="copy"`` (and ``"auto"`` across CUDA devices), through the executor's copy stream
(:mod:`pipetrain.transfer`): the producer enqueues the copy right after its action, so it
overlaps the producer's next computation, and the table holds the in-flight parcel, which
the consumer waits on before its action.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pipetrain import checkpoint as ckpt
from pipetrain import partition
from pipetrain import transfer as xfer
from pipetrain.microbatch import scatter, tree_map
from pipetrain.stage import Meter, Stage
from pipetrain.stats import ActionRecord, StepStats, measure

__all__ = ["Pipeline", "PipelineError"]

LossFn = Callable[[Any, Any], torch.Tensor]


class PipelineError(RuntimeError):
    """An action failed during ``Pipeline.step``: which stage, micro-batch and action.

    Attributes:
        stage, microbatch: where it failed (``None`` if no action was at fault, e.g. timeout).
        action: the action kind ("F", "B", "I", "W"); ``label`` the full label ("2B5").
        device: the device whose thread ran it.
    The original exception is ``__cause__``.
    """

    def __init__(self, message: str, *, stage: Optional[int] = None,
                 microbatch: Optional[int] = None, action: Optional[str] = None,
                 label: Optional[str] = None, device: Optional[int] = None) -> None:
        super().__init__(message)
        self.stage, self.microbatch, self.action = stage, microbatch, action
        self.label, self.device = label, device


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Pipeline:
    """Pipeline-parallel training of an ``nn.Sequential`` (or list of modules).

    Args:
        model: the layers, called in order with one argument each (a tensor, or a tuple /
            dict of tensors such as ``(hidden, mask)``).
        num_stages: number of pipeline devices ``p``; with ``num_chunks=v`` the model is cut
            into ``p * v`` stages, stage ``k`` on device ``k % p``. Optional if ``balance``
            or a :class:`~pipetrain.schedules.Schedule` object gives it.
        balance: layers per stage (``p * v`` entries), e.g. ``[3, 3, 2, 2]``; default: equal
            parameter count (:func:`pipetrain.partition.balance_by_size`).
        schedule: a synchronous schedule name (``"gpipe"``, ``"1f1b"``,
            ``"interleaved-1f1b"``, ``"zb-h1"``, ``"zb-h2"``) or a built ``Schedule``.
        num_microbatches: ``m``, micro-batches per mini-batch.
        loss_fn: ``loss_fn(output, target) -> scalar``, the mean over its micro-batch.
        devices: one per pipeline device (``p`` entries); default all ``"cpu"``.
        checkpoint: re-materialization: ``"never"``, ``"always"`` or ``"except_last"``.
        num_chunks: ``v`` for the interleaved schedule (default 2 there, 1 otherwise).
        check_finite: raise if a micro-batch's loss is NaN or infinite.
        num_threads: torch intra-op threads during ``step()`` (restored after); default
            ``max(1, cores // p)`` on CPU so concurrent stages do not oversubscribe the cores;
            ``0`` leaves torch's setting alone.
        rng_lock: serialize forwards of stages with random ops (see
            :mod:`pipetrain.checkpoint`); ``None`` detects dropout-like modules.
        timeout: seconds without progress after which ``step`` fails instead of hanging.
        transfer: how activations (stage -> successor) and gradients (stage -> predecessor)
            cross pipeline devices. ``"auto"`` (default): through the executor's copy
            streams (``cudaMemcpyPeerAsync``, ordered by events, overlapping compute) when
            the two stages sit on different CUDA devices, handed over directly otherwise
            (on CPU in one process: no copy at all). ``"copy"``: always through the copy
            streams when the pipeline devices differ, also on CPU (a ``memcpy`` in stream
            order; for testing that path). ``"direct"``: ``Tensor.to(device,
            non_blocking=True)`` on the consumer's thread. See :mod:`pipetrain.transfer`.
        profile_steps: ``(start, stop)``: on CUDA, ``cudaProfilerStart`` before step number
            ``start`` and ``cudaProfilerStop`` after step ``stop - 1`` (steps counted from 0),
            so ``nsys profile --capture-range=cudaProfilerApi`` records just that window, with
            an NVTX range ``s1/F3`` per action. A no-op on CPU.

    Raises:
        ValueError: inconsistent or unsupported arguments, with what is allowed.
    """

    def __init__(self, model: Union[nn.Module, Sequence[nn.Module]], num_stages: Optional[int] = None, *,
                 balance: Optional[Sequence[int]] = None, schedule: Any = "1f1b",
                 num_microbatches: Optional[int] = None, loss_fn: Optional[LossFn] = None,
                 devices: Optional[Sequence[Any]] = None, checkpoint: str = "never",
                 num_chunks: Optional[int] = None, check_finite: bool = False,
                 num_threads: Optional[int] = None, rng_lock: Optional[bool] = None,
                 timeout: float = 60.0, transfer: str = "auto",
                 profile_steps: Optional[Tuple[int, int]] = None) -> None:
        from pipetrain import schedules
        from pipetrain.executor import Executor

        if loss_fn is None or not callable(loss_fn):
            raise ValueError("loss_fn is required: loss_fn(output, target) -> scalar tensor")
        layers = partition.layers_of(model)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds; got {timeout}")
        self.transfer = xfer.check_mode(transfer)
        self.schedule = self._build_schedule(schedules, schedule, num_stages, balance,
                                             num_microbatches, num_chunks, len(layers))
        s = self.schedule
        p, total, m = s.num_devices, s.num_stages, s.num_microbatches
        self.num_devices, self.num_stages, self.num_microbatches = p, total, m
        for k in range(total):
            preds = list(s.predecessors(k))
            if preds != ([k - 1] if k else []):
                raise ValueError(f"stage {k} has predecessors {preds}: Pipeline runs chains of "
                                 "stages (stage k feeds stage k+1) only")
        flags = ckpt.checkpoint_flags(checkpoint, total)
        self.checkpoint = checkpoint
        self.devices = self._resolve_devices(devices, p)
        parts = partition.split(layers, total, balance)
        self.balance = [len(part) for part in parts]
        self.meters = [Meter() for _ in range(p)]
        self.stages: List[Stage] = []
        for k, part in enumerate(parts):
            d = s.device_of(k)
            device = self.devices[d]
            for layer in part:
                if any(t.device != device for t in list(layer.parameters()) + list(layer.buffers())):
                    layer.to(device)   # in place: the Parameter objects stay the model's
            self.stages.append(Stage(k, part, device, checkpoint=flags[k],
                                     loss_fn=loss_fn if k == total - 1 else None,
                                     input_grad=k > 0, rng_lock=rng_lock,
                                     check_finite=check_finite, meter=self.meters[d]))
        self._actions = [list(s.actions(d)) for d in range(p)]
        deps = [s.dependencies(d) for d in range(p)]
        self._plan = [[(str(a), [tuple(x) for x in deps[d][i]]) for i, a in enumerate(self._actions[d])]
                      for d in range(p)]
        cuda = all(dev.type == "cuda" for dev in self.devices)
        self._backend = "cuda" if cuda else "cpu"
        self._device_of = [s.device_of(k) for k in range(total)]
        # (from device, to device) pairs whose hand-overs go through the copy streams.
        self._copies = {(a, b) for a in range(p) for b in range(p)
                        if xfer.uses_copy(transfer, a, b, self.devices[a], self.devices[b])}
        self.timeout = timeout
        self.profile_steps = profile_steps
        self._new_executor()
        if num_threads is None:
            num_threads = 0 if cuda else max(1, _cores() // p)
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0: leave torch's setting); got {num_threads}")
        self.num_threads = num_threads
        self._stats: Optional[StepStats] = None
        self._lock = threading.Lock()
        self._step_state: Dict[str, Any] = {}
        # Actions running now, device -> label: after a failed step, stage state is cleared
        # only once no action of that step can still touch it.
        self._active: Dict[int, str] = {}
        self._active_cv = threading.Condition()

    # -- construction helpers -------------------------------------------------------------
    @staticmethod
    def _build_schedule(schedules: Any, schedule: Any, num_stages: Optional[int],
                        balance: Optional[Sequence[int]], m: Optional[int],
                        num_chunks: Optional[int], num_layers: int) -> Any:
        if not isinstance(schedule, str):
            s = schedule
            if num_stages is not None and num_stages != s.num_devices:
                raise ValueError(f"num_stages={num_stages} but the schedule has {s.num_devices} devices")
            if m is not None and m != s.num_microbatches:
                raise ValueError(f"num_microbatches={m} but the schedule has {s.num_microbatches}")
            if balance is not None and len(balance) != s.num_stages:
                raise ValueError(f"balance has {len(balance)} entries; the schedule has {s.num_stages} stages")
            if s.num_stages > num_layers:
                raise ValueError(f"the schedule has {s.num_stages} stages but the model only "
                                 f"{num_layers} layers (each stage needs at least one)")
            return s
        name = schedule
        interleaved = name.startswith("interleaved")
        v = num_chunks if num_chunks is not None else (2 if interleaved else 1)
        if v < 1 or (v != 1 and not interleaved):
            raise ValueError(f"num_chunks={num_chunks} is only for the interleaved schedule "
                             f"(>= 1); schedule {name!r} takes one chunk per device")
        if num_stages is None:
            if balance is None:
                raise ValueError("give num_stages (pipeline devices) or balance (layers per stage)")
            if len(balance) % v:
                raise ValueError(f"balance has {len(balance)} entries, not a multiple of num_chunks={v}")
            num_stages = len(balance) // v
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive int; got {num_stages!r}")
        if balance is not None and len(balance) != num_stages * v:
            raise ValueError(f"balance has {len(balance)} entries but num_stages * num_chunks = "
                             f"{num_stages * v} stages")
        if num_stages * v > num_layers:
            raise ValueError(f"num_stages * num_chunks = {num_stages * v} stages but the model has "
                             f"only {num_layers} layers; use at most {num_layers // v} stages")
        if m is None:
            m = 1
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"num_microbatches must be a positive int; got {m!r}")
        kwargs = {"num_chunks": v} if interleaved else {}
        try:
            return schedules.build(name, num_stages=num_stages, num_microbatches=m, **kwargs)
        except (ValueError, getattr(schedules, "ScheduleError", ValueError)) as err:
            raise ValueError(f"cannot build schedule {name!r} with num_stages={num_stages}, "
                             f"num_microbatches={m}{', num_chunks=%d' % v if interleaved else ''}: "
                             f"{err}") from err

    @staticmethod
    def _resolve_devices(devices: Optional[Sequence[Any]], p: int) -> List[torch.device]:
        if devices is None:
            return [torch.device("cpu")] * p
        devices = [torch.device(d) for d in devices]
        if len(devices) != p:
            raise ValueError(f"devices has {len(devices)} entries; give one per pipeline device ({p})")
        types = {d.type for d in devices}
        if not types <= {"cpu", "cuda"} or len(types) > 1:
            raise ValueError(f"devices must be all 'cpu' or all CUDA devices; got {devices}")
        if "cuda" in types and not torch.cuda.is_available():
            raise ValueError("CUDA devices requested but torch.cuda.is_available() is False")
        return devices

    def _new_executor(self) -> None:
        from pipetrain.executor import Executor
        kwargs = {}
        if self._backend == "cuda":
            # Device d of the pipeline is devices[d] (not necessarily cuda:d): give the
            # executor torch's current stream of each, the streams the stages compute on.
            kwargs["streams"] = [torch.cuda.current_stream(dev).cuda_stream for dev in self.devices]
            # ... and their CUDA ordinals: events and peer copies are made on those.
            kwargs["devices"] = [dev.index if dev.index is not None else torch.cuda.current_device()
                                 for dev in self.devices]
        self._executor = Executor(self.num_devices, backend=self._backend,
                                  profile_steps=self.profile_steps, **kwargs)
        self._transfer = xfer.Transfer(self._executor, self.devices, timeout=self.timeout)
        self._compiled = self._executor.compile(self._plan)   # validated once, reused each step

    def _settle(self, wait_s: float, raise_: bool = True) -> None:
        """Wait (at most ``wait_s``) until no action of an earlier step is still running."""
        with self._active_cv:
            if self._active_cv.wait_for(lambda: not self._active, timeout=wait_s):
                return
            busy = ", ".join(f"{label} on device {d}" for d, label in sorted(self._active.items()))
        if raise_:
            raise PipelineError(f"an action of an earlier step is still running ({busy}); "
                                "the pipeline cannot start a new step until it returns")

    # -- the step -------------------------------------------------------------------------
    def parameters(self) -> List[nn.Parameter]:
        """Every parameter of every stage (the model's own objects)."""
        return [p for st in self.stages for p in st.parameters()]

    def step(self, inputs: Any, targets: Any) -> torch.Tensor:
        """One mini-batch: every forward and backward of the schedule.

        Args:
            inputs: the first layer's input for the whole mini-batch (tensor, or tuple /
                dict of tensors sharing dim 0 = batch size >= num_microbatches).
            targets: the matching targets (same batch size), passed to ``loss_fn``.

        Returns:
            The mini-batch loss: the micro-batch losses weighted by micro-batch size
            (equal to the unsplit model's loss when ``loss_fn`` is a mean). Parameter
            gradients have been accumulated into ``p.grad``. A caller's ``torch.autocast``
            applies to the stages' forwards (and recomputations) on the executor's threads.

        Raises:
            ValueError: the batch cannot be split (smaller than num_microbatches, mismatched).
            PipelineError: an action failed (naming stage, micro-batch and action) or the
                run stalled for ``timeout`` seconds; the pipeline stays usable.
        """
        from pipetrain.executor import ExecutorError

        if not self._lock.acquire(blocking=False):
            raise RuntimeError("Pipeline.step is already running (one step at a time)")
        try:
            t0 = time.perf_counter()
            m = self.num_microbatches
            x_mbs, sizes = scatter(inputs, m)
            y_mbs, y_sizes = scatter(targets, m)
            if sizes != y_sizes:
                raise ValueError(f"inputs and targets disagree on the batch size "
                                 f"({sum(sizes)} vs {sum(y_sizes)})")
            total = sum(sizes)
            self._step_state = {
                "x": x_mbs, "y": y_mbs, "w": [n / total for n in sizes],
                "acts": {}, "grads": {}, "losses": [None] * m,
                "threads_set": [False] * self.num_devices,
                # Autocast is thread-local: the caller's carries over to the issuing threads.
                "autocast": [(dt, torch.get_autocast_dtype(dt)) for dt in ("cpu", "cuda")
                             if torch.is_autocast_enabled(dt)],
            }
            self._settle(self.timeout)
            for st in self.stages:
                st.reset_stats()
            old_threads = torch.get_num_threads()
            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            try:
                with _nvtx_range(f"pipetrain/step {getattr(self.schedule, 'name', '')}"):
                    timeline = self._executor.run(self._compiled, self._run_action,
                                                  timeout=self.timeout)
            except ExecutorError as err:
                self._settle(2 * self.timeout, raise_=False)
                if self._copies:
                    # Parcels of the failed step may still be copied into: let the copy
                    # streams finish before the step's tables (and tensors) are dropped.
                    with contextlib.suppress(Exception):
                        self._transfer.drain(self.timeout)
                if self._executor.poisoned:
                    # A thread stuck in an action leaves the executor unusable; a fresh one
                    # serves the next step.
                    old = self._executor
                    self._new_executor()
                    old.close()
                raise self._error(err) from (err.__cause__ or err)
            finally:
                if self.num_threads:
                    torch.set_num_threads(old_threads)
                losses = self._step_state["losses"]
                weights = self._step_state["w"]
                self._step_state = {}
            loss = sum(l * w for l, w in zip(losses, weights))
            wall = time.perf_counter() - t0
            self._stats = self._measure(timeline, total, wall)
            return loss
        except BaseException:
            for st in self.stages:
                st.clear()
            raise
        finally:
            self._lock.release()

    def _run_action(self, device: int, index: int) -> None:
        """Run one action on its device's issuing thread (called by the executor)."""
        state = self._step_state
        if self.num_threads and not state["threads_set"][device]:
            torch.set_num_threads(self.num_threads)   # intra-op threads are per thread
            state["threads_set"][device] = True
        a = self._actions[device][index]
        with self._active_cv:
            self._active[device] = str(a)
        try:
            if state["autocast"] and a.kind != "W":   # F, and B / I which may recompute F
                with contextlib.ExitStack() as stack:
                    for device_type, dtype in state["autocast"]:
                        stack.enter_context(torch.autocast(device_type, dtype=dtype))
                    self._dispatch(state, a)
            else:
                self._dispatch(state, a)
        finally:
            with self._active_cv:
                del self._active[device]
                self._active_cv.notify_all()

    def _dispatch(self, state: Dict[str, Any], a: Any) -> None:
        kind, k, mb = a.kind, a.stage, a.microbatch
        stage = self.stages[k]
        last = k == self.num_stages - 1
        if kind == "F":
            if k == 0:
                x = _to(state["x"][mb], stage.device)
            else:
                x = self._receive(state["acts"].pop((k - 1, mb)), stage.device)
            if last:
                state["losses"][mb] = stage.forward(mb, x, _to(state["y"][mb], stage.device),
                                                    weight=state["w"][mb]).to("cpu")
            else:
                state["acts"][(k, mb)] = self._send(stage.forward(mb, x), k, k + 1)
        elif kind in ("B", "I"):
            g = None if last else self._receive(state["grads"].pop((k + 1, mb)), stage.device)
            gi = stage.backward(mb, g) if kind == "B" else stage.backward_input(mb, g)
            if k > 0:   # zero-bubble: I sends the gradient, W has nothing to send
                state["grads"][(k, mb)] = self._send(gi, k, k - 1)
        elif kind == "W":
            stage.backward_weight(mb)
        # other kinds (transfers of a lowered schedule) need no work: tensors move in F / B.

    def _send(self, value: Any, stage: int, to_stage: int) -> Any:
        """Producer side of a hand-over: start the copy now if this edge copies (the table
        then holds the in-flight :class:`~pipetrain.transfer.Parcel`), else the value."""
        a, b = self._device_of[stage], self._device_of[to_stage]
        if (a, b) in self._copies:
            return self._transfer.send(value, a, b)
        return value

    def _receive(self, obj: Any, device: torch.device) -> Any:
        """Consumer side: wait for a parcel's copies, or move a direct value to ``device``."""
        if isinstance(obj, xfer.Parcel):
            return self._transfer.receive(obj)
        return _to(obj, device)

    def _error(self, err: Exception) -> PipelineError:
        cause = err.__cause__
        device, index = getattr(err, "device", None), getattr(err, "index", None)
        if cause is None or device is None or index is None or index < 0:
            return PipelineError(f"pipeline step failed: {err}", device=device)
        a = self._actions[device][index]
        return PipelineError(
            f"stage {a.stage}, micro-batch {a.microbatch}, action {a.kind} ({a} on device "
            f"{device}) raised {type(cause).__name__}: {cause}",
            stage=a.stage, microbatch=a.microbatch, action=a.kind, label=str(a), device=device)

    # -- measurements ---------------------------------------------------------------------
    def _measure(self, timeline: Any, samples: int, wall: float) -> StepStats:
        records = []
        for d in range(self.num_devices):
            starts, ends = timeline.start_ns[d], timeline.end_ns[d]
            records.append([ActionRecord(d, str(a), a.kind, a.stage, a.microbatch, int(s), int(e))
                            for a, s, e in zip(self._actions[d], starts, ends)])
        return measure(records, schedule=getattr(self.schedule, "name", str(type(self.schedule).__name__)),
                       num_stages=self.num_stages, num_microbatches=self.num_microbatches,
                       samples=samples, wall_s=wall,
                       peak_stash_bytes=[mt.peak_bytes for mt in self.meters],
                       peak_inflight=[mt.peak_count for mt in self.meters])

    def stats(self) -> StepStats:
        """The last step's :class:`~pipetrain.stats.StepStats` (wall time, per-device busy /
        idle, measured bubble ratio, samples/s, per-stage action costs, peak stash)."""
        if self._stats is None:
            raise RuntimeError("no step has run yet: call step() first")
        return self._stats

    def simulate(self, stats: Optional[StepStats] = None) -> Any:
        """The schedule simulator's prediction from the last step's measured per-stage costs
        (F, and B or I + W): ``schedule.simulate(...)``'s result, to compare with ``stats()``."""
        st = stats or self.stats()
        c = st.costs_s
        zeros = [0.0] * self.num_stages
        forward = c.get("F", zeros)
        if "W" in c:
            i_cost, w_cost = c.get("I", zeros), c["W"]
            return self.schedule.simulate(forward=forward,
                                          backward=[a + b for a, b in zip(i_cost, w_cost)],
                                          weight=w_cost)
        return self.schedule.simulate(forward=forward, backward=c.get("B", zeros))

    def export_trace(self, path: Any) -> Any:
        """Write the last step's timeline as Chrome / Perfetto trace JSON; returns the path."""
        from pipetrain.trace import write_chrome_trace
        st = self.stats()
        return write_chrome_trace(st.records, path, name=f"pipetrain {st.schedule}",
                                  metadata={"schedule": st.schedule, "num_devices": st.num_devices,
                                            "num_microbatches": st.num_microbatches,
                                            "bubble_ratio": st.bubble_ratio, "wall_s": st.wall_s})

    def plot_timeline(self, path: Any, title: Optional[str] = None) -> Any:
        """Draw the last step's timeline (one row per device) to an image file."""
        from pipetrain.trace import plot_timeline
        st = self.stats()
        return plot_timeline(st.records, path, title or
                             f"{st.schedule}  p={st.num_devices} m={st.num_microbatches}  "
                             f"bubble {100 * st.bubble_ratio:.1f} %")

    def close(self) -> None:
        """Stop the executor's threads (also done when the pipeline is garbage-collected)."""
        close = getattr(self._executor, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        return (f"Pipeline(schedule={getattr(self.schedule, 'name', self.schedule)!r}, "
                f"p={self.num_devices}, stages={self.num_stages}, m={self.num_microbatches}, "
                f"balance={self.balance}, checkpoint={self.checkpoint!r})")



def _nvtx_range(name: str) -> Any:
    """An NVTX range via :mod:`pipetrain.nvtx` (a no-op on CPU); the executor itself marks
    each action (``s1/F3``) on CUDA."""
    try:
        from pipetrain import nvtx
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return nvtx.range(name)


def _to(obj: Any, device: torch.device) -> Any:
    """Move every tensor of ``obj`` to ``device`` (no copy when already there)."""
    if obj is None:
        return None
    return tree_map(lambda t: t.to(device, non_blocking=True)
                    if isinstance(t, torch.Tensor) and t.device != device else t, obj)
