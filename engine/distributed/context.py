"""A Pipeline across processes: what this rank holds and how its step runs.

Built by ``Pipeline(...)`` when the default process group is initialized with more than one
rank (:func:`~pipetrain.distributed.mesh.wanted`). This rank

- checks that every rank built the same pipeline (schedule, m, p, w, stage split, model
  structure): a mismatch raises ValueError naming the rank and what differs;
- keeps only its stages (pipeline device ``pp_rank``): layers of other stages have their
  parameters replaced by ``meta`` tensors, and ``meta`` layers of its own stages are
  materialized on its device by ``init_fn(layer)`` or each module's ``reset_parameters()``;
- holds the lowered plan and a :class:`~pipetrain.distributed.runner.RankRunner`.

``run`` executes this rank's row of a plan (the step's, or an asynchronous plan over several
mini-batches for ``train()``, :mod:`.training`) and turns any failure into a PipelineError
naming its origin on every rank. ``step`` returns the mini-batch loss on every rank (the mean
over replicas' mini-batches; a token-level loss over all their tokens) and leaves in
``p.grad`` of the local stages what the unsplit model would have on the combined batch
(replicas are averaged, as with DDP).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from pipetrain import loss_scaling
from pipetrain.distributed import grads as grads_mod
from pipetrain.distributed.mesh import Mesh, P2PGroups, local_device
from pipetrain.distributed.runner import RankRunner
from pipetrain.distributed.host_memory import keep_freed_memory
from pipetrain.distributed.shm_wire import ShmWire, host_id
from pipetrain.distributed.wire import Board, PeerFailed, wait_all
from pipetrain.plan import Plan

__all__ = ["Distributed"]

_PIPELINES = itertools.count()   # every rank builds its pipelines in the same order


def _materialize(layers: Sequence[nn.Module], device: torch.device,
                 init_fn: Optional[Callable[[nn.Module], None]]) -> None:
    """Give ``meta`` parameters / buffers of ``layers`` storage on ``device`` and initialize
    them (shared parameters stay shared)."""
    done: dict = {}
    for layer in layers:
        fresh = False
        for mod in layer.modules():
            for table in (mod._parameters, mod._buffers):
                for name, t in list(table.items()):
                    if t is None or not t.is_meta:
                        continue
                    if id(t) not in done:
                        new = torch.empty_like(t, device=device)
                        done[id(t)] = nn.Parameter(new, t.requires_grad) \
                            if isinstance(t, nn.Parameter) else new
                    table[name] = done[id(t)]
                    fresh = True
        if fresh:
            if init_fn is not None:
                init_fn(layer)
            else:
                for mod in layer.modules():
                    if hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()


def _free(layers: Sequence[nn.Module], keep: set) -> None:
    """Replace the tensors of ``layers`` (except those in ``keep``, by id) with meta ones."""
    for layer in layers:
        for mod in layer.modules():
            for table in (mod._parameters, mod._buffers):
                for name, t in list(table.items()):
                    if t is None or t.is_meta or id(t) in keep:
                        continue
                    meta = torch.empty_like(t, device="meta")
                    table[name] = nn.Parameter(meta, t.requires_grad) \
                        if isinstance(t, nn.Parameter) else meta


def _fingerprint(pipe: Any, layers: Sequence[nn.Module], mesh: Mesh) -> dict:
    return {"schedule": pipe.schedule.name, "num_microbatches": pipe.num_microbatches,
            "num_devices": pipe.num_devices, "num_stages": pipe.num_stages,
            "data_parallel": mesh.w, "balance": list(pipe.balance),
            "model structure": [(type(layer).__name__,
                                 [(n, tuple(p.shape), str(p.dtype)) for n, p in layer.named_parameters()])
                                for layer in layers]}


def _check_agreement(mine: dict, mesh: Mesh, hosts: Dict[int, str]) -> int:
    """Raise ValueError naming the first rank whose pipeline differs from rank 0's; returns
    rank 0's pipeline number (processes may have built different numbers of pipelines
    before, so the board's keys use rank 0's). Fills ``hosts`` with every rank's host id
    (the same gather: which edges can use shared memory)."""
    everyone: List[Any] = [None] * mesh.world_size
    dist.all_gather_object(everyone, (next(_PIPELINES), mine, host_id()))
    number = everyone[0][0]
    hosts.update({r: e[2] for r, e in enumerate(everyone)})
    everyone = [e[1] for e in everyone]
    ref = everyone[0]
    for r, theirs in enumerate(everyone):
        for key in ref:
            if theirs.get(key) != ref[key]:
                a, b = ref[key], theirs.get(key)
                if key == "model structure":
                    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    a, b = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
                    key = f"model structure at layer {i}"
                raise ValueError(f"rank {r} differs from rank 0 in {key}: rank 0 has {a!r}, "
                                 f"rank {r} has {b!r} (every rank must build the same Pipeline)")
    return number


class Distributed:
    """This rank's share of a multi-process pipeline (see the module docstring)."""

    def __init__(self, pipe: Any, layers: Sequence[nn.Module], parts: Sequence[Sequence[nn.Module]],
                 order: Sequence[int], *, data_parallel: Optional[int], init_fn: Any,
                 timeout: float, wire: str = "auto") -> None:
        graph = pipe.plan.graph
        self.mesh = mesh = Mesh(graph.num_devices, data_parallel)
        self.device = local_device()
        if self.device.type == "cpu":
            keep_freed_memory()   # actions allocate on the executor's thread: see host_memory
        self.timeout = timeout
        pipe.devices = [self.device] * graph.num_devices
        hosts: Dict[int, str] = {}
        number = _check_agreement(_fingerprint(pipe, layers, mesh), mesh, hosts)
        dev_of = [graph.stage(k).device for k in range(graph.num_stages)]
        self.local = [k for k in range(graph.num_stages) if dev_of[k] == mesh.pp_rank]
        stage_of_layer: List[int] = []
        for part, k in zip(parts, order):
            stage_of_layer += [k] * len(part)
        ties = grads_mod.find_ties(layers, stage_of_layer, dev_of)
        mine = [layer for layer, k in zip(layers, stage_of_layer) if dev_of[k] == mesh.pp_rank]
        others = [layer for layer, k in zip(layers, stage_of_layer) if dev_of[k] != mesh.pp_rank]
        _materialize(mine, self.device, init_fn)
        keep = {id(t) for layer in mine for t in list(layer.parameters()) + list(layer.buffers())}
        _free(others, keep)
        self.layer_names = {}
        for i, layer in enumerate(layers):
            for name, p in layer.named_parameters(remove_duplicate=False):
                self.layer_names.setdefault(id(p), f"{i}.{name}")
        self.ties = [t for t, _ in ties]
        for tie in self.ties:
            for r in range(mesh.w):
                tie.groups.append(dist.new_group([mesh.rank_of(d, r) for d in tie.devices]))
            if mesh.pp_rank in tie.devices:
                i, name = tie.name.split(".", 1)
                tie.param = layers[int(i)].get_parameter(name)
                # The holders start from the first holder's values (a meta model is
                # initialized on each holder independently).
                with torch.no_grad():
                    dist.broadcast(tie.param.data, src=mesh.rank_of(tie.devices[0]),
                                   group=tie.groups[mesh.dp_rank])
        self.plan = Plan(pipe.schedule.lower())
        # Point-to-point traffic in groups of its own whose timeout is the pipeline's: a
        # blocking receive is bounded by it (gloo raises), a dead peer fails it at once.
        # Control (headers) on gloo, packed tensors on the device's backend (mesh.P2PGroups).
        self.group = P2PGroups(mesh, [(e.id, dev_of[e.src], dev_of[e.dst]) for e in graph.edges],
                               timeout)
        store = dist.distributed_c10d._get_default_store()
        self.board = Board(store, f"pipetrain/{number}")
        # Same-host CPU edges through shared memory (shm_wire); gloo stays for collectives.
        if wire == "shm" and self.device.type != "cpu":
            raise ValueError(f"wire='shm' carries CPU tensors; this rank's device is "
                             f"{self.device} (use wire='auto' or 'gloo')")
        self.wire = ShmWire(hosts, wire, store, self.board)
        self.runner: Optional[RankRunner] = None
        self.eval_runner: Optional[RankRunner] = None

    def is_local(self, stage: int) -> bool:
        return stage in self.local

    def make_runner(self, pipe: Any) -> RankRunner:
        for k in self.local:
            pipe.stages[k].grad_scale = pipe._loss.grad_scale
        self.runner = RankRunner(self.mesh, self.plan, self.device, timeout=self.timeout,
                                 num_threads=pipe.num_threads, board=self.board, ties=self.ties,
                                 group=self.group, wire=self.wire)
        return self.runner

    def _wait(self, works: Sequence[Any], what: str) -> None:
        wait_all(works, deadline=time.monotonic() + self.timeout, board=self.board, peer=None,
                 me=self.mesh.rank, what=what)

    # -- the step --------------------------------------------------------------------------
    @property
    def is_source(self) -> bool:
        """Whether this rank holds a stage that reads the user's inputs."""
        return any(not self.plan.graph.stage(k).inputs for k in self.local)

    @property
    def is_sink(self) -> bool:
        """Whether this rank holds the stage that computes the loss."""
        return any(not self.plan.graph.stage(k).outputs for k in self.local)

    def rank_batch(self, pipe: Any, inputs: Any, targets: Any) -> Tuple[Any, Any]:
        """The ``(inputs, targets)`` this rank's run splits: the first stage's rank uses
        ``inputs``, the last stage's ``targets``; the other half (and both, on a middle rank)
        is a stand-in of the right micro-batch count whose split is never read."""
        x = inputs if self.is_source else None
        y = targets if self.is_sink else None
        if x is None and y is None:
            x = y = torch.zeros(pipe.num_microbatches)
        return (y if x is None else x), (x if y is None else y)

    def run(self, pipe: Any, batches: Sequence[Tuple[Any, Any]], plan: Any = None) -> Tuple[Any, Any, float]:
        """Run this rank's row of ``plan`` (default: the step's) over ``batches`` (from
        :meth:`rank_batch`); returns (run, timeline, wall seconds).

        Raises:
            PipelineError: on every rank when an action failed on any of them, naming the
                origin: ``rank 1: stage 1, micro-batch 5 of mini-batch 2, action F (1F5@1)
                raised ValueError: ...`` (an update: ``update after mini-batch 2``); or when
                a rank died or stopped answering. The pipeline then refuses further runs.
        """
        from pipetrain.executor import ExecutorError
        from pipetrain.pipeline import PipelineError

        plan = self.plan if plan is None else plan
        mesh = self.mesh
        try:
            return self.runner.execute(pipe.stages, batches, plan=plan)
        except ExecutorError as err:
            cause = err.__cause__
            if isinstance(cause, PeerFailed):
                self.runner.fail(str(cause))
                raise PipelineError(str(cause)) from cause
            index = err.index if err.index is not None and err.index >= 0 else None
            a = plan.actions[mesh.pp_rank][index] if index is not None else None
            if a is None:
                msg = f"rank {mesh.rank}: pipeline run failed: {err}"
                self.runner.fail(msg)
                raise PipelineError(msg) from err
            mb, t = (None, a.microbatch) if a.kind == "U" else (a.microbatch, plan.minibatch_of(a.microbatch))
            where = f"update after mini-batch {t}" if mb is None else f"micro-batch {mb}" + (
                f" of mini-batch {t}" if plan.num_minibatches > 1 else "")
            msg = (f"rank {mesh.rank}: stage {a.stage}, {where}, action {a.kind} ({a}) raised "
                   f"{type(cause).__name__}: {cause}")
            self.runner.fail(msg)
            perr = PipelineError(msg, stage=a.stage, microbatch=mb, action=str(a.kind),
                                 label=str(a), device=mesh.pp_rank, minibatch=t)
            raise perr from cause
        except PeerFailed as err:
            self.runner.fail(str(err))
            raise PipelineError(str(err)) from err

    def fail_after_run(self, pipe: Any, err: BaseException, what: str) -> Any:
        """Something failed after this rank's row ran (``what``: "ending the step"): post it so
        the other ranks do not wait for us past a poll, drop the run, return the PipelineError."""
        from pipetrain.pipeline import PipelineError
        msg = str(err) if isinstance(err, PeerFailed) else \
            f"rank {self.mesh.rank}: {what} failed: {type(err).__name__}: {err}"
        self.runner.fail(msg)
        for k in self.local:
            pipe.stages[k].end_run(commit=False)
        return PipelineError(msg)

    def step(self, pipe: Any, inputs: Any, targets: Any) -> torch.Tensor:
        pipe._loss.begin(targets if self.is_sink else None)
        loss_scaling.begin_step(pipe)
        run, timeline, wall = self.run(pipe, [self.rank_batch(pipe, inputs, targets)])
        try:
            self._record(pipe, run, timeline, wall)
            return self._finish(pipe, run, self.is_sink)
        except BaseException as err:
            raise self.fail_after_run(pipe, err, "ending the step") from err

    def _record(self, pipe: Any, run: Any, timeline: Any, wall: float) -> None:
        """This rank's stats (compute actions only: transfers are waits, not work) and the
        overlap of its incoming transfers with compute."""
        from pipetrain.stats import measure
        d = self.mesh.pp_rank
        row = run.plan.actions[d]
        records = [r for r in timeline.records([row])[0]
                   if str(r.kind) in ("F", "B", "I", "W", "U")]
        pipe._stats = measure([records], schedule=pipe.schedule.name, num_stages=pipe.num_stages,
                              num_microbatches=pipe.num_microbatches,
                              samples=sum(map(sum, run.sizes)), wall_s=wall)
        self.last_overlap = self.runner.overlap(timeline)
        self.last_timeline = timeline

    def _finish(self, pipe: Any, run: Any, sink: bool) -> torch.Tensor:
        """After our row ran: reduce the gradients (replicas, tied copies), check and unscale
        them, agree on loss / count / finiteness in one all-reduce over every rank (the
        pipeline and data-parallel groups at once), commit or drop them everywhere alike."""
        mesh, loss_fn = self.mesh, pipe._loss
        stages = [pipe.stages[k] for k in self.local]
        for red in run.reducers.values():
            red.finish(self._wait)
        if self.ties:
            grads_mod.sum_tied(self.ties, pipe.stages, mesh.dp_rank, self._wait)
        # After the reductions, so a sum that overflowed is caught too; one fused pass that
        # also divides by the loss scale (pipetrain.loss_scaling).
        inv = 1.0 / pipe.scaler.scale if pipe.scaler is not None else 1.0
        flag = loss_scaling.check_and_unscale(loss_scaling.local_grads(stages), inv, sync=False)
        vec = torch.zeros(4, dtype=torch.float64)
        if sink:
            vec[0] = float(run.losses_per_minibatch()[0])
            vec[1] = loss_fn.total_count
            vec[2] = 1.0 if loss_fn.token_level else 0.0
        vec = vec.to(self.device)
        if flag is not None:    # on the device: read on the host only after the all-reduce
            vec[3:4].copy_(flag.reshape(1))
        self._wait([dist.all_reduce(vec, async_op=True)], "the end-of-step all-reduce")
        vec = vec.cpu()
        token = bool(vec[2] > 0)
        if token:
            loss, loss_fn.scale = vec[0] / vec[1], 1.0 / float(vec[1])
        else:
            loss, loss_fn.scale = vec[0] / mesh.w, 1.0 / mesh.w
        loss_scaling.end_step(pipe, bool(vec[3] > 0))   # the same flag and scale on every rank
        for st in stages:
            # A non-finite gradient on any rank skips the step everywhere: nothing committed.
            st.end_run(commit=not pipe.found_inf)
        dtype = next((p.dtype for st in stages for p in st.params), torch.float32)
        return loss.to(dtype)

    def eval(self, pipe: Any, inputs: Any, targets: Any) -> Any:
        """Forward-only run: (outputs on the last stage's rank, else None; loss or None)."""
        from pipetrain.evaluation import EvalPlan, _train_modes, forward_schedule
        from pipetrain.distributed.runner import RankEvalRun
        from pipetrain.microbatch import gather
        from pipetrain.pipeline import PipelineError

        if self.eval_runner is None:
            graph = self.plan.graph
            plan = EvalPlan(forward_schedule(graph, pipe.num_microbatches), graph, lowered=True)
            self.eval_runner = RankRunner(self.mesh, plan, self.device, timeout=self.timeout,
                                          num_threads=pipe.num_threads, board=self.board,
                                          ties=self.ties, group=self.group, wire=self.wire)
            if self.runner is not None:
                self.runner.companions.append(self.eval_runner)
        sink = self.is_sink
        pipe._loss.begin(targets if sink else None)
        x, y = self.rank_batch(pipe, inputs, targets)
        modes = _train_modes(pipe.stages)
        try:
            run_cls = type("EvalRun", (RankEvalRun,), {"has_targets": targets is not None,
                                                       "loss_fn": pipe._loss})
            run, _, _ = self.eval_runner.execute(pipe.stages, [(x, y)], run_cls=run_cls)
        except Exception as err:  # noqa: BLE001
            cause = err.__cause__ or err
            self.eval_runner.fail(f"rank {self.mesh.rank}: evaluation failed: {cause}")
            raise PipelineError(f"rank {self.mesh.rank}: evaluation failed: "
                                f"{type(cause).__name__}: {cause}") from cause
        finally:
            _train_modes(pipe.stages, modes)
        for k in self.local:
            pipe.stages[k].end_run(commit=False)
        out = gather([run.outputs[k] for k in range(pipe.num_microbatches)]) if sink else None
        if targets is None:
            return out, None
        vec = torch.zeros(3, dtype=torch.float64)
        if sink:
            vec[0] = float(run.losses_per_minibatch()[0])
            vec[1] = pipe._loss.total_count
            vec[2] = 1.0 if pipe._loss.token_level else 0.0
        vec = vec.to(self.device)
        try:
            self._wait([dist.all_reduce(vec, async_op=True)], "the evaluation loss all-reduce")
        except PeerFailed as err:
            raise PipelineError(str(err)) from err
        vec = vec.cpu()
        loss = vec[0] / vec[1] if vec[2] > 0 else vec[0] / self.mesh.w
        return out, loss

    # -- global operations ---------------------------------------------------------------------
    def clip_grad_norm_(self, pipe: Any, max_norm: float, norm_type: float) -> torch.Tensor:
        own = set()
        for tie in self.ties:      # a tied weight counts once: on its first holder
            if tie.param is not None and tie.devices[0] != self.mesh.pp_rank:
                own.add(id(tie.param))
        params = [p for p in pipe.parameters() if id(p) not in own]
        copies = [p for p in pipe.parameters() if id(p) in own]
        return grads_mod.clip_grad_norm_(params, max_norm, norm_type, self.mesh.pp_group,
                                         self._wait, also=copies)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
