"""keep_freed_memory: glibc takes the thresholds once per process; the env var opts out.
Each case runs in a fresh interpreter (the settings are process-wide and set once)."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = ("from pipetrain.distributed.host_memory import keep_freed_memory as k; "
        "print(k(), k())")


def _run(value):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if value is not None:
        env["PIPETRAIN_KEEP_FREED_MEMORY"] = value
    out = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_glibc_takes_the_thresholds_once():
    assert _run(None) == ["True", "True"]


def test_env_opts_out():
    assert _run("0") == ["False", "False"]


PIPE = ("import torch, pipetrain; from pipetrain.distributed import host_memory as h; "
        "before = h._done; "
        "p = pipetrain.Pipeline([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], 2, "
        "num_microbatches=2, loss_fn=torch.nn.functional.mse_loss); p.close(); "
        "print(before, h._done)")


@pytest.mark.parametrize("value, want", [(None, "True"), ("0", "False")])
def test_in_process_cpu_pipeline_keeps_freed_memory(value, want):
    # Its executor threads allocate in their own arenas, as a CPU rank's do.
    if want == "True" and (platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
        pytest.skip("glibc's mallopt")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PIPETRAIN_KEEP_FREED_MEMORY", None)
    if value is not None:
        env["PIPETRAIN_KEEP_FREED_MEMORY"] = value
    out = subprocess.run([sys.executable, "-c", PIPE], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None", want]
