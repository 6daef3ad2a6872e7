"""Resume over a literal kill and restart: real processes (env://) run an uninterrupted
reference, then train again with a checkpoint and are SIGKILLed in the middle of a later
step; new processes load the checkpoint and go on, and their losses are bit-identical to the
reference's. Every phase is bounded in time and no process outlives the test."""

import os
import subprocess
import sys
import time

import pytest

from tests.distributed.pool import free_port
from tests.distributed.restart import SAVE, STEPS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(out, phase, p, dp, limit=120.0, crash=False):
    world = p * dp
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed.restart", str(out), phase,
                               str(p), str(dp)], env=dict(env, RANK=str(r)), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(world)]
    t0 = time.monotonic()
    try:
        if crash:
            # The job is torn down as torchrun would: once a rank is gone, SIGKILL the rest.
            while all(pr.poll() is None for pr in procs) and time.monotonic() - t0 < limit:
                time.sleep(0.05)
            for pr in procs:
                if pr.poll() is None:
                    pr.kill()
        for pr in procs:
            pr.wait(timeout=max(1.0, limit - (time.monotonic() - t0)))
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait(timeout=10)
    errs = [pr.stderr.read().decode()[-3000:] for pr in procs]
    return [pr.returncode for pr in procs], errs


def _losses(out, phase, rank):
    path = out / f"{phase}_{rank}.txt"
    return [float.fromhex(v) for v in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("p,dp", [(2, 1), (2, 2)])
def test_kill_and_restart_resumes_bit_identical(tmp_path, p, dp):
    world = p * dp
    full = crash = tmp_path
    codes, errs = _launch(crash, "crash", p, dp, crash=True)
    assert codes[0] == -9, (codes, errs)               # rank 0 SIGKILLed itself mid-step
    assert all(c != 0 for c in codes), (codes, errs)   # the job died: no rank finished
    codes, errs = _launch(crash, "resume", p, dp)
    assert codes == [0] * world, errs
    for r in range(world):
        ref = _losses(full, "full", r)
        assert len(ref) == STEPS
        before = _losses(crash, "crash", r)
        assert SAVE <= len(before) <= SAVE + 1 and before == ref[:len(before)]
        # torch.equal on the float64 values: the hex round trip is exact.
        assert _losses(crash, "resume", r) == ref[SAVE:], r
