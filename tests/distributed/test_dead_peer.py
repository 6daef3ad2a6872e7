"""A rank killed mid-step (SIGKILL): the others raise PipelineError naming it, in well under
the 60 s default, and no process is left behind. Ranks are launched directly with env://
(torchrun would kill everyone when one dies)."""

import json
import os
import subprocess
import sys
import time

from tests.distributed.pool import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_killed_rank_is_named_by_the_survivors(tmp_path):
    world, kill = 3, 1
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), KILL=str(kill), PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed.killed", str(tmp_path)],
                              env=dict(env, RANK=str(r)), cwd=ROOT,
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
    for r in range(world):
        if r == kill:
            continue
        path = tmp_path / f"{r}.json"
        assert path.exists(), procs[r].stderr.read().decode()[-2000:]
        res = json.loads(path.read_text())
        assert res["error"] is not None and f"rank {kill}" in res["error"], res
        assert res["seconds"] < 60, res
