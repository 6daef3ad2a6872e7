"""What each rank runs in tests/planner/test_build.py's multi-process test (gloo)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import pipetrain

D, N = 8, 8


def _model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(4)]).double()


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, D, generator=g).double(), torch.randn(N, D, generator=g).double()


def data_parallel_plan(mesh_shape):
    """Plan on a DeviceMesh of ``mesh_shape`` = (dp, pp) over this world, build this rank's part,
    step once on this replica's share of the global batch, and return (w, p, m, the largest
    relative gradient error against the unsplit model on the whole batch). Ranks plan with
    different micro-batch sizes (rank 0: 2, the others: 4): pipeline() must use rank 0's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "pp"))
    model, (x, y) = _model(), _data()
    ref = copy.deepcopy(model)
    fn = nn.functional.mse_loss
    plan = pipetrain.plan(model, sample=(x, y), loss_fn=fn, devices=mesh, batch_size=N,
                          memory_per_device="1GB", measure_sizes=[1, 2], repeats=1,
                          micro_batch_sizes=[2] if rank == 0 else [4])
    pipe = plan.pipeline(num_threads=1)
    try:
        w, p = plan.width, plan.depth
        share = N // w
        r = pipe.dist.mesh.dp_rank
        pipe.step(x[r * share:(r + 1) * share], y[r * share:(r + 1) * share])
        fn(ref(x), y).backward()
        mine = {id(q) for q in pipe.parameters()}
        err = 0.0
        for q, q_ref in zip(model.parameters(), ref.parameters()):
            if id(q) in mine:
                err = max(err, float((q.grad - q_ref.grad).norm() / q_ref.grad.norm()))
        return w, p, pipe.num_microbatches, err
    finally:
        pipe.close()
