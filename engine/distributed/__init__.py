"""Pipelines across processes on torch.distributed (gloo on CPU, NCCL on GPU).

One concept per module: :mod:`.mesh` (the (dp, pp) layout and groups), :mod:`.wire`
(point-to-point messages, bounded waits, the failure board), :mod:`.runner` (this rank's row
of the lowered plan on the executor), :mod:`.grads` (data-parallel all-reduce, tied weights,
global norm), :mod:`.context` (what a rank holds and how its step ends), :mod:`.training`
(``train()``: the asynchronous schedules' plans over many mini-batches, and the synchronous
step-then-update loop), :mod:`.checkpoint` (sharded save / load with
torch.distributed.checkpoint).
"""

from pipetrain.distributed.context import Distributed
from pipetrain.distributed.mesh import Mesh, wanted

__all__ = ["Distributed", "Mesh", "wanted"]
