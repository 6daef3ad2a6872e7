"""The multi-process pipeline on 2 GPUs with NCCL (one rank per GPU), against the unsplit
model: the wire's NCCL layout (headers on a gloo control group, packed tensors on a NCCL
data group per edge, the compute stream waiting on each transfer) with changing shapes and
interleaved stages, and loss scaling; skipped without 2 CUDA devices (it has not run yet)."""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from tests.distributed.pool import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r"""
import copy, os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from tests.distributed import scenarios as sc
import pipetrain
dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(rank)
# 1f1b: one data group per edge; interleaved: several edges between the same two ranks in both
# directions (NCCL ignores tags: each edge's data group keeps its messages in order). Tuples
# cross every boundary; the batch size changes between steps (the resize path of the wire).
for schedule, v in (("1f1b", 1), ("interleaved-1f1b", 2)):
    net = sc.model(2 * v + 1, False)
    ref = copy.deepcopy(net).cuda()
    pipe = pipetrain.Pipeline(net, num_devices=2, schedule=schedule, num_microbatches=4,
                              loss_fn=sc.mse, timeout=60, loss_scale="dynamic")
    g = pipe.dist.group
    assert g.separate and g.per_edge and g.ctrl is not g.shared
    names = {id(p): n for n, p in net.named_parameters()}
    refp = dict(ref.named_parameters())
    for step, n in enumerate((8, 11, 8)):
        x, y = sc.batch(n, step, False)
        x, y = x.cuda(), y.cuda()
        loss = pipe.step(x, y)
        ref.zero_grad()
        ref_loss = sc.mse(ref(x), y)
        ref_loss.backward()
        err = max(float((p.grad - refp[names[id(p)]].grad).abs().max()) for p in pipe.parameters())
        assert abs(float(loss) - float(ref_loss.detach())) < 1e-10, (schedule, float(loss), float(ref_loss))
        assert err < 1e-10, (schedule, step, err)
        assert not pipe.found_inf
        for p in pipe.parameters():
            p.grad = None
    pipe.close()
print("OK", rank)
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices")
def test_two_gpus_nccl_equal_unsplit(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script), ROOT],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    try:
        outs = [pr.communicate(timeout=120)[0].decode() for pr in procs]
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait(timeout=10)
    for pr, out in zip(procs, outs):
        assert pr.returncode == 0 and "OK" in out, out[-3000:]
