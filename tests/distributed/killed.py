"""One rank of the dead-peer test (launched with env://): rank ``KILL`` kills itself in the
middle of a step; the others must raise PipelineError naming it. Writes ``OUT/<rank>.json``."""

import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import pipetrain
from tests.distributed import scenarios as sc


def main() -> None:
    out, kill = sys.argv[1], int(os.environ["KILL"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = sc.model(4, False)
    pipe = pipetrain.Pipeline(net, num_devices=dist.get_world_size(), schedule="1f1b",
                              num_microbatches=4, loss_fn=sc.mse, timeout=30,
                              wire=os.environ.get("WIRE", "auto"))
    x, y = sc.batch(8, 0, False)
    pipe.step(x, y)             # one good step first
    if rank == kill:
        for layer in net:
            if any(not p.is_meta for p in layer.parameters()):
                layer.register_forward_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGKILL))
                break
    t0 = time.monotonic()
    result = {"error": None}
    try:
        pipe.step(x, y)
    except pipetrain.PipelineError as err:
        result = {"error": str(err)}
    result["seconds"] = time.monotonic() - t0
    result["pid"] = os.getpid()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)     # the process group is broken: do not wait for a clean shutdown


if __name__ == "__main__":
    main()
