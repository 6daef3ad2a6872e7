"""One rank of the dead-peer test (launched with env://): rank ``KILL`` kills itself in the
middle of a step; the others must raise PipelineError naming it. Writes ``OUT/<rank>.json``."""

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Tuple

import torch
import torch.distributed as dist

import pipetrain
from tests.distributed import scenarios as sc
from tests.distributed.pool import free_port


def launch(out_dir: Any, world: int, kill: int, **env: str) -> Tuple[list, Dict[int, dict]]:
    """Run this module as ``world`` ranks on env:// (rank ``kill`` SIGKILLs itself mid-step),
    wait for all (at most 90 s, then kill what is left) and return (the processes, each
    survivor's result from ``out_dir/<rank>.json``). Asserts every process ended, the killed
    one with a non-zero code, and every survivor wrote its result."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                WORLD_SIZE=str(world), KILL=str(kill), PYTHONPATH=root, TRITON_INTERPRET="1",
                **env)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed.killed", str(out_dir)],
                              env=dict(base, RANK=str(r)), cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(world)]
    t0 = time.monotonic()
    try:
        for pr in procs:
            pr.wait(timeout=max(1.0, 90 - (time.monotonic() - t0)))
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait(timeout=10)
    assert all(pr.poll() is not None for pr in procs)
    assert procs[kill].returncode != 0
    results = {}
    for r in range(world):
        if r == kill:
            continue
        path = os.path.join(str(out_dir), f"{r}.json")
        assert os.path.exists(path), procs[r].stderr.read().decode()[-2000:]
        with open(path) as f:
            results[r] = json.load(f)
    return procs, results


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
