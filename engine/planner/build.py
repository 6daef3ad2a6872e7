"""``TrainingPlan.pipeline()``: the :class:`~pipetrain.Pipeline` a plan describes.

- Width w = 1: the plan's Pipeline in this process (p executor threads, or ``devices=``).
- Under ``torchrun`` (the default process group initialized) with world size ``w * p``: this
  rank's part of the ``w`` replicas of a ``p``-deep pipeline (``Pipeline(..., data_parallel=w)``,
  the layout of :mod:`pipetrain.distributed.mesh`); each rank then feeds its replica's
  ``batch_size / w`` samples per step. Every rank measured its own costs, so ranks could
  choose differently: rank 0's configuration is broadcast and used by all (the others'
  own choices are ignored), so every rank builds the same pipeline.
- Width w > 1 in one process: ValueError (it needs w * p processes), unless
  ``one_replica=True``: then one replica of the w, which trains on ``batch_size / w`` samples
  per step (what each replica does; their gradient averaging is not run).
- Asynchronous schedules (2bw, 2bw-predict, pipedream) need the optimizer factory given to
  :func:`pipetrain.plan` (``optimizer=``) or here; train them with ``pipe.train(batches)``.
- Graph models: ``schedule="graphpipe"`` (or the chain schedule chosen) on the operator graph;
  the Pipeline partitions the graph itself (GraphPipe's partitioner or a time-balanced chain),
  so the plan's balance is not passed.
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["build_pipeline", "configuration"]


def configuration(plan: Any) -> Dict[str, Any]:
    """The plan's choice as plain values (what ranks agree on)."""
    c = plan.best
    return dict(p=c.p, w=c.w, b=c.b, m=c.m, schedule=c.schedule, v=c.v, recompute=c.recompute,
                balance=list(c.balance))


def _agreed(config: Dict[str, Any]) -> Dict[str, Any]:
    """Rank 0's configuration on every rank."""
    import torch.distributed as dist
    box = [config]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_pipeline(plan: Any, *, one_replica: bool = False, **kwargs: Any) -> Any:
    """See the module docstring. Keyword arguments go to ``Pipeline`` (and win over the
    plan's). Raises ValueError: a plan from a cost table (no model), a schedule this build
    cannot run, width > 1 without enough processes, or an asynchronous schedule without an
    optimizer factory."""
    import torch.distributed as dist
    from pipetrain.pipeline import Pipeline
    if plan._model is None:
        raise ValueError("this plan was made from a cost table: there is no model to build; "
                         "call pipetrain.plan(model, sample=...) to get a runnable plan")
    if not plan.best.model.runnable:
        raise ValueError(f"schedule {plan.schedule!r} has no runtime in this build; plan with "
                         "schedules=[...] of runnable ones to get a Pipeline")
    cfg = configuration(plan)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and plan.graph:
        raise ValueError("a graph model's Pipeline runs in one process (GraphPipe has no "
                         "multi-process form yet): call pipeline() without torch.distributed")
    if distributed:
        cfg = _agreed(cfg)
        world = dist.get_world_size()
        if world != cfg["w"] * cfg["p"]:
            raise ValueError(f"the plan is w={cfg['w']} replicas x p={cfg['p']} pipeline devices "
                             f"= {cfg['w'] * cfg['p']} ranks, but the world size is {world}: "
                             f"plan with devices={world} (or a DeviceMesh of this world)")
    elif cfg["w"] > 1 and not one_replica:
        raise ValueError(
            f"the plan is w={cfg['w']} data-parallel replicas of a p={cfg['p']} pipeline: "
            f"run it under torchrun with {cfg['w'] * cfg['p']} processes (pipeline() then "
            f"returns this rank's part), or pass one_replica=True for one replica in this "
            f"process (it trains on batch_size / w = {cfg['m'] * cfg['b']} samples per step)")
    optimizer = kwargs.pop("optimizer", plan.optimizer)
    if plan.best.model.asynchronous and optimizer is None:
        raise ValueError(f"schedule {cfg['schedule']!r} is asynchronous: its Pipeline steps the "
                         "optimizer itself; give pipetrain.plan(..., optimizer=lambda params: "
                         "torch.optim.SGD(params, lr=...)) or pipeline(optimizer=...)")
    opts: Dict[str, Any] = dict(num_devices=cfg["p"], schedule=cfg["schedule"],
                                num_microbatches=cfg["m"], loss_fn=plan._loss_fn,
                                checkpoint="always" if cfg["recompute"] else "never")
    if not plan.graph:
        opts["balance"] = cfg["balance"]
    else:       # the same operator times, so the Pipeline partitions as planned
        opts["op_times"] = plan.op_times
    if cfg["v"] > 1:
        opts["num_chunks"] = cfg["v"]
    if optimizer is not None:
        opts["optimizer"] = optimizer
    if distributed:
        opts["data_parallel"] = cfg["w"]
    opts.update(kwargs)
    return Pipeline(plan._model, **opts)
