"""Pipeline: train one model split into stages, driven by a schedule on the executor.

The facade over the engine: it checks the arguments (:mod:`pipetrain.arguments`), builds the
schedule and its :class:`~pipetrain.plan.Plan`, cuts the model into one
:class:`~pipetrain.stage.Stage` per node of the schedule's stage graph (the same module
objects, never copies), and hands runs to the :class:`~pipetrain.runner.Runner` (executor,
per-edge transports, failure handling). ``step(inputs, targets)`` is one mini-batch: every
forward and backward of the schedule; gradients land in the model's own ``p.grad`` exactly as
if the unsplit model had run on the whole mini-batch, so any torch optimizer steps as usual.

For 1F1B with p = 3, m = 4 the action lists are (``print(pipe.schedule)``, unit costs)::

    d0: 0F0 0F1 0F2  .   .  0B0 0F3 0B1  .  0B2  .  0B3
    d1:  .  1F0 1F1  .  1B0 1F2 1B1 1F3 1B2  .  1B3
    d2:  .   .  2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3

``2F1`` takes ``1F1``'s output from the mailbox slot of edge 1->2; ``1B0`` takes the
gradient ``2B0`` posted back on the same edge (:mod:`pipetrain.dispatch`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pipetrain import arguments as args, checkpoint as ckpt
from pipetrain import async_schedules, distributed, errors, loss_scaling, losses, partition, transport
from pipetrain.errors import PipelineError
from pipetrain.graphpipe import pipeline_model as graph_build
from pipetrain.plan import Plan
from pipetrain.runner import Runner, check_timeout
from pipetrain.stage_builder import build_stages
from pipetrain.global_ops import GlobalOps
from pipetrain.reporting import Reporting
from pipetrain.stats import StepStats, measure_later

__all__ = ["Pipeline", "PipelineError"]

LossFn = Callable[[Any, Any], torch.Tensor]


class Pipeline(GlobalOps, Reporting):
    """Pipeline-parallel training of an ``nn.Sequential`` (or list of modules).

    Args:
        model: the layers, called in order with one argument each (a tensor, or a tuple /
            dict of tensors such as ``(hidden, mask)``); or any other ``nn.Module`` (a graph
            model, :mod:`pipetrain.graphpipe.build`): traced with torch.fx and cut into
            stages forming a DAG (``schedule="graphpipe"``) or a chain (a chain schedule).
        num_devices: pipeline devices ``p`` (issuing threads; GPUs with ``devices=``). The
            model is cut into ``num_stages = p * num_chunks`` stages, stage ``k`` on device
            ``k % p``. Optional if ``balance`` or a built schedule gives it.
        num_stages: deprecated alias of ``num_devices`` (it always counted devices).
        balance: layers per stage (``num_stages`` entries), e.g. ``[3, 3, 2, 2]``; default:
            equal parameter count (:func:`pipetrain.partition.balance_by_size`).
        schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved-1f1b"``, ``"zb-h1"``, ``"zb-h2"``,
            ``"zb-h1-bw"``, ``"zb-h2-bw"`` (the W's after each stage's last I as one batched
            W), or a built :class:`~pipetrain.schedules.Schedule` whose stages form a chain;
            asynchronous (``train()`` only): ``"pipedream"``, ``"2bw"``, ``"spectrain"``,
            ``"xpipe"``, ``"2bw-predict"`` (:mod:`pipetrain.async_schedules`).
        num_microbatches: ``m``, micro-batches per mini-batch (default 1).
        loss_fn: ``loss_fn(output, target) -> scalar``, the mean over its micro-batch; or
            ``(loss_sum, count)``, a token-level loss divided by the mini-batch's total count
            (:mod:`pipetrain.losses`).
        devices: one per pipeline device (``p`` entries); default all ``"cpu"``.
        checkpoint: re-materialization: ``"never"``, ``"always"`` or ``"except_last"``.
        num_chunks: ``v``, stages per device for the interleaved schedule (default 2 there).
        check_finite: raise if a micro-batch's loss is NaN or infinite.
        num_threads: torch intra-op threads during ``step()`` (restored after); default
            ``max(1, cores // p)`` on CPU so concurrent stages do not oversubscribe the cores;
            ``0`` leaves torch's setting alone.
        rng_lock: serialize forwards of stages with random ops (see
            :mod:`pipetrain.checkpoint`); ``None`` detects dropout-like modules.
        timeout: seconds without progress after which ``step`` fails instead of hanging;
            ``float("inf")`` never times out.
        transfer: how values cross pipeline devices, per edge (:mod:`pipetrain.transport`):
            ``"auto"`` (copy streams between CUDA devices, hand-off on CPU), ``"copy"``
            (copy streams whenever the devices differ), ``"direct"`` (``Tensor.to``).
        profile_steps: ``(start, stop)``: on CUDA, ``cudaProfilerStart`` before step ``start``
            and ``cudaProfilerStop`` after step ``stop - 1`` (from 0), so ``nsys profile
            --capture-range=cudaProfilerApi`` records that window with an NVTX range ``s1/F3``
            per action. A no-op on CPU.
        data_parallel: across processes (the default process group initialized with several
            ranks, :mod:`pipetrain.distributed`): ``w`` pipeline replicas of ``p`` ranks each
            (default ``world_size // p``); gradients are averaged over replicas.
        init_fn: across processes, ``init_fn(layer)`` initializes a local layer built on the
            ``meta`` device (default: each module's ``reset_parameters()``).
        leaf_modules, memory_limit, example_inputs, op_times: graph models only: module
            classes / instances kept as one operator; bytes per device for the partitioner;
            a sample micro-batch to build at construction (default: the first step's); given
            per-operator ``(forward_s, backward_s)`` per sample instead of measuring.
        wire: across processes, how ranks exchange boundary values
            (:func:`pipetrain.arguments.check_wire`): ``"auto"`` (shared memory between ranks
            on one host with CPU tensors, :mod:`pipetrain.distributed.shm_wire`; else the
            process group), ``"shm"``, ``"gloo"``.

        optimizer: ``optimizer(params) -> optimizer``, called once per stage with its
            parameters; the pipeline then steps it (``train()``). Required by asynchronous
            schedules; spectrain needs SGD with momentum, xpipe Adam / AdamW, 2bw-predict
            either (torch.optim or pipetrain.optim: prediction reads their state).
        loss_scale: ``"dynamic"``, a fixed number or a LossScaler (:mod:`pipetrain.loss_scaling`).
        compile, cuda_graphs: ``torch.compile`` each stage (:mod:`pipetrain.compiled_stage`);
            capture F/B/I/W per micro-batch as CUDA graphs (:mod:`pipetrain.cuda_graphs`).

    Raises:
        ValueError: an argument that is not allowed, saying what is.
    """

    def __init__(self, model: Union[nn.Module, Sequence[nn.Module]], num_devices: Optional[int] = None, *,
                 num_stages: Optional[int] = None, balance: Optional[Sequence[int]] = None,
                 schedule: Any = "1f1b", num_microbatches: Optional[int] = None,
                 loss_fn: Optional[LossFn] = None, devices: Optional[Sequence[Any]] = None,
                 checkpoint: str = "never", num_chunks: Optional[int] = None,
                 check_finite: bool = False, num_threads: Optional[int] = None,
                 rng_lock: Optional[bool] = None, timeout: float = 60.0, transfer: str = "auto",
                 profile_steps: Optional[Tuple[int, int]] = None,
                 data_parallel: Optional[int] = None, init_fn: Any = None,
                 leaf_modules: Sequence[Any] = (), memory_limit: Optional[float] = None,
                 example_inputs: Any = None, op_times: Optional[dict] = None,
                 optimizer: Optional[Callable[[Any], Any]] = None, loss_scale: Any = None,
                 compile: Any = False, cuda_graphs: bool = False, wire: str = "auto") -> None:
        if loss_fn is None or not callable(loss_fn):
            raise ValueError("loss_fn is required: loss_fn(output, target) -> scalar tensor")
        accel = args.check_acceleration(compile, cuda_graphs, checkpoint, schedule, model)
        # A model that is not a sequence of layers is an operator graph (GraphPipe path):
        # built from a sample micro-batch, at the first step unless example_inputs is given.
        self._graph_model = None if isinstance(model, (nn.Sequential, nn.ModuleList, list, tuple)) \
            else graph_build.GraphModel(model, leaf_modules, memory_limit, op_times)
        layers = partition.layers_of(model) if self._graph_model is None else []
        timeout = check_timeout(timeout)
        transport.check_mode(transfer)
        args.check_wire(wire)
        ckpt.checkpoint_flags(checkpoint, 1)
        args.check_flag("check_finite", check_finite)
        args.check_flag("rng_lock", rng_lock, allow_none=True)
        self.profile_steps = args.check_profile_steps(profile_steps)
        p = args.resolve_num_devices(num_devices, num_stages)
        self.checkpoint, self.timeout, self.transfer = checkpoint, timeout, transfer
        self._stats: Optional[StepStats] = None
        self._lock, self.found_inf, self.dist = threading.Lock(), False, None
        self.scaler = args.resolve_loss_scale(loss_scale, schedule, self._graph_model is not None)
        self.schedule_name = schedule if isinstance(schedule, str) else getattr(schedule, "name", "")
        if self._graph_model is not None:     # one process (no data_parallel) for now
            if async_schedules.is_async(schedule):
                raise ValueError("a graph model runs the synchronous schedules (graphpipe or a "
                                 "chain schedule); asynchronous schedules need a sequence of layers")
            if optimizer is not None and not callable(optimizer):
                raise ValueError("optimizer must be a factory: optimizer(params) -> optimizer")
            self.stages, self._optimizer_factory = [], optimizer   # stages: at the first step
            if data_parallel not in (None, 1):
                raise ValueError("a graph model runs in one process: data_parallel is not supported")
            self._loss = losses.LossFn(loss_fn)
            self._graph_model.configure(self, schedule=schedule, num_devices=p, devices=devices,
                                        num_microbatches=num_microbatches, num_chunks=num_chunks,
                                        loss_fn=self._loss, checkpoint=checkpoint, rng_lock=rng_lock,
                                        check_finite=check_finite, num_threads=num_threads)
            if example_inputs is not None:
                self._graph_model.build(example_inputs)
            return
        if async_schedules.is_async(schedule):
            # The one-mini-batch form, for printing and stats; train() builds the T-mini-batch plans.
            self.schedule = async_schedules.from_arguments(schedule, p, balance, num_microbatches,
                                                           num_chunks, len(layers))
        else:
            self.schedule = args.build_schedule(schedule, p, balance, num_microbatches, num_chunks,
                                                len(layers))
        self.schedule_name = self.schedule.name
        self.plan = Plan(self.schedule)
        graph = self.plan.graph
        if not graph.is_chain:
            raise ValueError("Pipeline cuts a sequence of layers, so its schedule's stages must "
                             "form a chain; this schedule's stage graph is a DAG")
        self.num_devices, self.num_stages = graph.num_devices, graph.num_stages
        self.num_microbatches = self.schedule.num_microbatches
        self.devices = args.resolve_devices(devices, self.num_devices)
        self.checkpoint = checkpoint
        order = graph.topological_order()          # a chain: source to sink
        parts = partition.split(layers, len(order), balance)
        self.balance = [len(part) for part in parts]
        loss_fn = self._loss = losses.LossFn(loss_fn)
        self.dist = distributed.wanted(data_parallel) and distributed.Distributed(
            self, layers, parts, order, data_parallel=data_parallel, init_fn=init_fn,
            timeout=timeout, wire=wire) or None
        self.stages = build_stages(
            graph, parts, self.devices, loss_fn=loss_fn, checkpoint=checkpoint, rng_lock=rng_lock,
            check_finite=check_finite, grad_scale=self._loss.grad_scale, stage_cls=accel.stage_cls,
            is_local=self.dist.is_local if self.dist is not None else (lambda k: True))
        self._start_runner(num_threads)
        accel.apply(self)
        from pipetrain.training import make_optimizers
        make_optimizers(self, optimizer)

    def _start_runner(self, num_threads: Optional[int]) -> None:
        graph = self.plan.graph
        cuda = all(dev.type == "cuda" for dev in self.devices)
        self.num_threads = args.check_num_threads(num_threads, cuda, args.cores(), self.num_devices)
        if self.dist is None and all(dev.type == "cpu" for dev in self.devices):
            # Actions run on the executor's threads, each with its own glibc arena that gives
            # freed blocks back and page-faults them in again every micro-batch: keep them,
            # as CPU ranks do (host_memory; peers linear, 1F1B: B 8.8 -> 6.3 ms, step -21 %).
            distributed.host_memory.keep_freed_memory()
        self.runner = Runner(self.num_devices, self.devices,
                             [(e.id, e.src, e.dst) for e in graph.edges],
                             [graph.stage(k).device for k in range(self.num_stages)],
                             transfer=self.transfer, timeout=self.timeout,
                             profile_steps=self.profile_steps, num_threads=self.num_threads) \
            if self.dist is None else self.dist.make_runner(self)

    def parameters(self) -> List[nn.Parameter]:
        """Every parameter of every stage (the model's own objects)."""
        return [p for st in self.stages if st is not None for p in st.parameters()]

    # -- the step -------------------------------------------------------------------------
    def step(self, inputs: Any, targets: Any) -> torch.Tensor:
        """One mini-batch: every forward and backward of the schedule.

        Args:
            inputs: the first layer's input for the whole mini-batch (tensor, or tuple /
                dict of tensors sharing dim 0 = batch size >= num_microbatches).
            targets: the matching targets (same batch size), passed to ``loss_fn``.

        Returns:
            The mini-batch loss: the micro-batch losses weighted by micro-batch size
            (equal to the unsplit model's loss when ``loss_fn`` is a mean). Parameter
            gradients have been accumulated into ``p.grad`` (and into ``inputs`` / ``targets``
            that require grad). A caller's ``torch.autocast`` applies to the stages'
            forwards (and recomputations) on the executor's threads.

        Raises:
            ValueError: the batch cannot be split (smaller than num_microbatches, mismatched).
            PipelineError: an action failed (naming stage, micro-batch and action) or the run
                stalled for ``timeout`` seconds. Nothing of the failed step is kept: every
                ``p.grad`` is what it was before the call, and the next step works.
        """
        from pipetrain.executor import active

        if async_schedules.is_async(self.schedule_name):
            raise ValueError(f"step() runs one synchronous mini-batch; {self.schedule_name!r} is "
                             "asynchronous (no flush between mini-batches): use "
                             "pipe.train(batches), or a synchronous schedule (gpipe, 1f1b, ...)")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("Pipeline.step is already running (one step at a time)")
        try:
            # Interpreter exit waits for this (torch work after the run included); a step
            # started once exit began raises RuntimeError at once.
            with active():
                if self._graph_model is not None and self._graph_model.built is None:
                    self._graph_model.build_from_batch(inputs)
                if self.dist is not None:
                    return self.dist.step(self, inputs, targets)
                self._loss.begin(targets)
                outcome = self._execute(self.plan, [(inputs, targets)], loss_scaling.begin_step(self))
                loss = self._loss.finish(outcome.run.losses_per_minibatch()[0])
                self._stats = measure_later(outcome, self.plan, self.num_stages)
            return loss
        finally:
            self._lock.release()

    def train(self, batches: Any, minibatches_per_run: Optional[int] = None, *,
              undo_failed_updates: bool = True) -> Any:
        """Train on ``batches`` (an iterable of ``(inputs, targets)`` mini-batches) with the
        optimizer inside the pipeline (``optimizer=`` factory); yields each mini-batch's loss
        in order. Synchronous schedules: each mini-batch's gradients, then each stage's
        optimizer step on them -- run ``minibatches_per_run`` mini-batches at a time (None: 4)
        as one executor run with each stage's update inside it, right after its last
        backward of the mini-batch, so nothing waits for a flush between mini-batches; the
        numbers are exactly the per-step loop's (:mod:`pipetrain.tiled_training`), losses
        come back as each run ends. ``minibatches_per_run=1``, loss scaling, a token-level
        loss, a graph model, CUDA graphs or several processes: step() then the optimizer
        steps, per mini-batch. Asynchronous ones (pipedream, 2bw, spectrain, xpipe, 2bw-predict): the
        endless 1F1B order with no flush, streamed in executor runs of
        ``minibatches_per_run`` mini-batches (None: :func:`pipetrain.async_windows.default_window`)
        that carry the in-flight state between them, so the numbers do not depend on it; the
        iterable is read ``ceil((p-1)/m)`` mini-batches ahead of the run, losses come back
        as each run ends, and when it ends the pipeline drains: the model holds W(T). See
        :mod:`pipetrain.training`. Raises ValueError (no optimizer, bad batches) and
        PipelineError (naming stage, micro-batch, mini-batch and action; every stage is then
        at one version, ``err.version``, and a new train() continues from it).

        ``undo_failed_updates`` (synchronous schedules in one process): True snapshots each
        stage's weights and optimizer state before its optimizer step (about half an Adam
        step's time per stage and mini-batch) so that a failure while some stages have
        stepped and others not (an optimizer step raising; inside a run of several
        mini-batches, any action) leaves every stage at one version (``err.version``); False
        skips the copies, and such a failure leaves the stages that stepped first one version
        ahead (``err.version`` is None; ``err.versions_at_failure`` lists them)."""
        from pipetrain.training import train
        return train(self, batches, minibatches_per_run, undo_failed_updates=undo_failed_updates)

    def _execute(self, plan: Plan, batches: Sequence[Tuple[Any, Any]], gate: Any = None,
                 carry: Any = None, first_minibatch: int = 0) -> Any:
        """Run ``plan`` over ``batches`` on the runner, naming a failure as a PipelineError.
        ``gate``: the runner's ``before_commit``; ``carry``: a window of a streamed
        asynchronous run (:meth:`Runner.execute`); ``first_minibatch``: how the caller numbers
        the plan's mini-batch 0, for the names in its errors."""
        from pipetrain.executor import ExecutorError
        from pipetrain.nvtx import range as nvtx_range

        with nvtx_range(f"pipetrain/run {self.schedule.name}"):
            try:
                return self.runner.execute(plan, self.stages, batches, gate, carry=carry,
                                           first_minibatch=first_minibatch)
            except ExecutorError as err:
                raise errors.from_executor(plan, err, first_minibatch) from (err.__cause__ or err)

    # -- measurements ---------------------------------------------------------------------
    @property
    def stage_graph(self) -> Any:
        """A graph model's stages: operators, edges and devices (printable); None for a
        sequence of layers or before the first step."""
        return None if self._graph_model is None else self._graph_model.summary()

    def plot_stage_graph(self, path: Any) -> Any:
        """Draw a graph model's operator graph coloured by stage device (after the build)."""
        if self._graph_model is None or self._graph_model.built is None:
            raise RuntimeError("plot_stage_graph needs a graph model, built (after step())")
        return self._graph_model.plot(path)

    def close(self) -> None:
        """Stop the executor's threads (also done when the pipeline is garbage-collected). A
        step running in another thread then fails with a PipelineError."""
        if hasattr(self, "runner"):
            self.runner.close()

    def __repr__(self) -> str:
        return (f"Pipeline(schedule={self.schedule.name!r}, num_devices={self.num_devices}, "
                f"num_stages={self.num_stages}, m={self.num_microbatches}, "
                f"balance={self.balance}, checkpoint={self.checkpoint!r})")
