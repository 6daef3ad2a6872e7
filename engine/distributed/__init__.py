"""Pipelines across processes on torch.distributed (gloo on CPU, NCCL on GPU).

One concept per module: :mod:`.mesh` (the (dp, pp) layout, its groups, and the control /
data groups of point-to-point traffic), :mod:`.wire` (point-to-point messages: headers on the
control plane, packed tensors on the data plane; bounded waits, the failure board),
:mod:`.shm_wire` (the same streams through shared memory between CPU ranks of one host:
``Pipeline(wire="auto")``, the default, picks it per edge), :mod:`.host_memory` (malloc
settings for CPU ranks), :mod:`.runner` (this rank's row of the lowered plan on the executor), :mod:`.grads`
(data-parallel all-reduce, tied weights, global norm), :mod:`.context` (what a rank holds
and how its step ends: reductions, the inf/NaN check and loss unscaling of
:mod:`pipetrain.loss_scaling`, one all-reduce that every rank decides on), :mod:`.training`
(``train()``: the asynchronous schedules' plans over many mini-batches, and the synchronous
step-then-update loop). Sharded save /
load with torch.distributed.checkpoint is :mod:`pipetrain.checkpointing`.
"""

from pipetrain.distributed.context import Distributed
from pipetrain.distributed.mesh import Mesh, P2PGroups, in_process, wanted

__all__ = ["Distributed", "Mesh", "P2PGroups", "in_process", "wanted"]
