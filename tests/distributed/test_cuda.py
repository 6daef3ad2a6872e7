"""The multi-process pipeline on 2 GPUs with NCCL (one rank per GPU), against the unsplit
model; skipped without 2 CUDA devices."""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from tests.distributed.pool import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from tests.distributed import scenarios as sc
import pipetrain
dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(rank)
net = sc.model(3, False)
import copy
ref = copy.deepcopy(net).cuda()
pipe = pipetrain.Pipeline(net, num_devices=2, schedule="1f1b", num_microbatches=4,
                          loss_fn=sc.mse, timeout=60)
x, y = sc.batch(8, 0, False)
x, y = x.cuda(), y.cuda()
loss = pipe.step(x, y)
out = ref(x); ref_loss = sc.mse(out, y); ref_loss.backward()
names = {id(p): n for n, p in net.named_parameters()}
refp = dict(ref.named_parameters())
err = max(float((p.grad - refp[names[id(p)]].grad).abs().max()) for p in pipe.parameters())
assert abs(float(loss) - float(ref_loss.detach())) < 1e-10, (float(loss), float(ref_loss))
assert err < 1e-10, err
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
