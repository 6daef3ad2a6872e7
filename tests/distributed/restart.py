"""One rank of the kill-and-restart test, launched as a real process with env:// (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    python -m tests.distributed.restart OUT PHASE P DP

PHASE ``crash``: first the reference, steps 0 .. STEPS-1 uninterrupted (``full``); then a
new model and optimizer from the same seed run the same steps with a checkpoint
(pipetrain.save_checkpoint) after step SAVE-1, and during step SAVE + 1 rank 0 kills itself
with SIGKILL in a forward (the test then SIGKILLs the others, as torchrun tears a job down).
PHASE ``resume``: new processes build the model with other weights and a fresh optimizer
with other hyper-parameters, load the checkpoint and run steps SAVE .. STEPS-1. Each step's
loss is appended to ``OUT/<run>_<rank>.txt`` as ``float.hex`` (exact) as soon as it is known.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist

import pipetrain
from tests.distributed import scenarios as sc

SAVE, STEPS = 2, 4


def main() -> None:
    out, phase, p, dp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if phase == "crash":
        run(out, "full", p, dp)
    run(out, phase, p, dp)
    dist.destroy_process_group()


def run(out: str, phase: str, p: int, dp: int) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0 if phase != "resume" else 77)
    net = sc.model(5, False)
    if phase == "resume":
        with torch.no_grad():
            for prm in net.parameters():
                prm.mul_(-0.5)                     # anything but the saved weights
    pipe = pipetrain.Pipeline(net, num_devices=p, schedule="1f1b", num_microbatches=3,
                              loss_fn=sc.mse, data_parallel=dp, timeout=30, loss_scale="dynamic")
    opt = torch.optim.AdamW(pipe.parameters(), lr=0.01 if phase != "resume" else 0.5,
                            weight_decay=0.05 if phase != "resume" else 0.0)
    ckpt = os.path.join(out, "ckpt")
    first = 0
    if phase == "resume":
        pipetrain.load_checkpoint(pipe, ckpt, opt)
        first = SAVE
    log = open(os.path.join(out, f"{phase}_{rank}.txt"), "w")
    for step in range(first, STEPS):
        if phase == "crash" and step == SAVE:
            pipetrain.save_checkpoint(pipe, ckpt, opt)
        if phase == "crash" and step == SAVE + 1 and rank == 0:
            calls = {"n": 0}

            def die(*_):
                calls["n"] += 1
                if calls["n"] == 2:                # mid-step: the second micro-batch's forward
                    os.kill(os.getpid(), signal.SIGKILL)
            pipe.stages[0].layers[0].register_forward_pre_hook(die)
        x, y = sc.batch(6 * dp, step, False)
        lo, hi = pipe.dp_rank * 6, (pipe.dp_rank + 1) * 6
        opt.zero_grad()
        loss = pipe.step(x[lo:hi], y[lo:hi])
        pipe.optimizer_step(opt)
        log.write(float(loss).hex() + "\n")
        log.flush()
    log.close()
    pipe.close()


if __name__ == "__main__":
    main()
