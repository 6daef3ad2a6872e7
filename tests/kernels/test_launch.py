"""Launch settings (kernels/_launch.py), and what they compile to on a GPU: one pass, 128-bit accesses.

No GPU is needed to check the generated code: Triton compiles the real (non-interpreted)
kernels ahead of time for sm_90 in a subprocess with TRITON_INTERPRET=0. From the PTX we count
the bytes each thread loads and stores and check them against the bytes-moved model written in
each kernel's docstring — every byte of every buffer read or written exactly once, all through
vector (v4) instructions. This is also the only test that runs the GPU code path's compiler.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from pipetrain.kernels._launch import BLOCK, NUM_WARPS, check_runnable, launch_config


@pytest.mark.parametrize("n", [1, BLOCK - 1, BLOCK, BLOCK + 1, 10 * BLOCK + 3])
def test_grid_covers_every_element_once(n):
    launch = launch_config(n)
    assert launch.block == BLOCK and launch.num_warps == NUM_WARPS
    (programs,) = launch.grid
    assert (programs - 1) * BLOCK < n <= programs * BLOCK


def test_cpu_tensors_need_the_interpreter():
    def compiled_kernel():   # stands in for a JIT-compiled (not interpreted) kernel
        pass
    with pytest.raises(ValueError, match="CUDA tensors"):
        check_runnable(compiled_kernel, torch.device("cpu"))
    check_runnable(compiled_kernel, torch.device("cuda", 0))   # CUDA is always accepted


# Compile-time switches per kernel: structural choices only. Every hyperparameter that may change
# between steps or calls (lr, momentum, dampening, betas, eps, weight decay, the bias corrections
# that encode the step, the distance s) must be a run-time argument so it never recompiles.
_CONSTEXPRS = {
    "sgd._sgd_step_kernel": {"HAS_MOMENTUM", "FIRST_STEP", "NESTEROV", "HAS_WD", "MAXIMIZE",
                             "HAS_MASTER", "HAS_FOUND_INF", "HAS_PREDICT", "BLOCK"},
    "adam._adam_step_kernel": {"HAS_WD", "DECOUPLED", "MAXIMIZE", "HAS_MASTER", "HAS_FOUND_INF",
                               "HAS_PREDICT", "BLOCK"},
    "predict._sgd_predict_kernel": {"BLOCK"},
    "predict._adam_predict_kernel": {"BLOCK"},
    "found_inf._non_finite_kernel": {"BLOCK"},
}


@pytest.mark.parametrize("qualname", list(_CONSTEXPRS))
def test_hyperparameters_are_runtime_arguments(qualname):
    module, name = qualname.split(".")
    kernel = getattr(importlib.import_module(f"pipetrain.kernels.{module}"), name)
    params = inspect.signature(kernel.fn).parameters
    constexpr = {p for p, v in params.items() if v.annotation in (tl.constexpr, "tl.constexpr")}
    assert constexpr == _CONSTEXPRS[qualname]


_COMPILE = r"""
import json, re, sys, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pipetrain.kernels import adam, found_inf, predict, sgd
from pipetrain.kernels._launch import BLOCK, NUM_WARPS

F32 = "fp32"
def compile_bytes(fn, sig, consts):
    full = dict(sig, **{k: "constexpr" for k in consts}, BLOCK="constexpr")
    names = list(full)
    consts = dict(consts, BLOCK=BLOCK)
    # Pointers and n divisible by 16: what Triton specialises on for torch allocations.
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(names)
             if full[k].startswith("*") or k == "n"}
    src = ASTSource(fn=fn, signature=full, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": NUM_WARPS}).asm["ptx"]
    out = {"ld_vec": 0, "st_vec": 0, "ld_scalar": 0, "st_scalar": 0}
    for op, vec, bits in re.findall(r"\b(ld|st)\.global[\w:.]*?(?:\.v(\d))?\.b(\d+)\b", ptx):
        kind = "vec" if vec else "scalar"
        out[f"{op}_{kind}"] += int(vec or 1) * int(bits) // 8
    return out

res = {}
for p in ("fp32", "bf16"):
    master = p == "bf16"
    s = dict(param_ptr="*" + p, grad_ptr="*" + p, buf_ptr="*fp32", master_ptr="*fp32",
             found_inf_ptr="*fp32", pred_ptr="*" + p, n="i32", neg_lr=F32, momentum=F32,
             one_minus_dampening=F32, weight_decay=F32, neg_pred_lr=F32)
    c = dict(HAS_MOMENTUM=True, FIRST_STEP=False, NESTEROV=True, HAS_WD=True, MAXIMIZE=True,
             HAS_MASTER=master, HAS_FOUND_INF=True, HAS_PREDICT=True)
    res[f"sgd_step/{p}"] = compile_bytes(sgd._sgd_step_kernel, s, c)
    s = dict(param_ptr="*" + p, grad_ptr="*" + p, exp_avg_ptr="*fp32", exp_avg_sq_ptr="*fp32",
             master_ptr="*fp32", found_inf_ptr="*fp32", pred_ptr="*" + p, n="i32",
             **{k: F32 for k in ("one_minus_beta1 beta2 one_minus_beta2 eps weight_decay "
                                 "decay_factor neg_step_size bc2_sqrt neg_pred_step_size").split()})
    c = dict(HAS_WD=True, DECOUPLED=True, MAXIMIZE=False, HAS_MASTER=master, HAS_FOUND_INF=True,
             HAS_PREDICT=True)
    res[f"adam_step/{p}"] = compile_bytes(adam._adam_step_kernel, s, c)
    res[f"sgd_predict/{p}"] = compile_bytes(predict._sgd_predict_kernel, dict(
        param_ptr="*" + p, buf_ptr="*fp32", out_ptr="*" + p, n="i32", neg_s_lr=F32), {})
    res[f"adam_predict/{p}"] = compile_bytes(predict._adam_predict_kernel, dict(
        param_ptr="*" + p, exp_avg_ptr="*fp32", exp_avg_sq_ptr="*fp32", out_ptr="*" + p,
        n="i32", eps=F32, bc2_sqrt=F32, neg_pred_step_size=F32), {})
    res[f"non_finite_check/{p}"] = compile_bytes(found_inf._non_finite_kernel, dict(
        grad_ptr="*" + p, found_inf_ptr="*fp32", n="i32"), {})
json.dump(res, sys.stdout)
"""

# Bytes per element (read, write) from the kernels' docstrings, fp32 param (no master) and bf16
# param with fp32 master; state is fp32, every optional stream (found_inf aside) switched on.
_MODEL = {
    # read g + w + buf; write buf + w (+ master) + predict_out
    "sgd_step/fp32": (4 + 4 + 4, 4 + 4 + 4),
    "sgd_step/bf16": (2 + 4 + 4, 4 + 2 + 4 + 2),
    # read g + w + m + v; write m + v + w (+ master) + predict_out
    "adam_step/fp32": (4 + 4 + 4 + 4, 4 + 4 + 4 + 4),
    "adam_step/bf16": (2 + 4 + 4 + 4, 4 + 4 + 2 + 4 + 2),
    "sgd_predict/fp32": (4 + 4, 4), "sgd_predict/bf16": (2 + 4, 2),
    "adam_predict/fp32": (4 + 4 + 4, 4), "adam_predict/bf16": (2 + 4 + 4, 2),
    "non_finite_check/fp32": (4, 0), "non_finite_check/bf16": (2, 0),
}


def _ptxas_available() -> bool:
    return (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
def test_gpu_code_moves_each_byte_once_with_vector_accesses():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout)
    threads = 32 * NUM_WARPS
    for name, (read, write) in _MODEL.items():
        got = measured[name]
        # Per thread: BLOCK/threads elements; all streams must use 128-bit (v4) accesses.
        per_elem = {k: v * threads / BLOCK for k, v in got.items()}
        assert per_elem["ld_vec"] == read and per_elem["st_vec"] == write, (name, per_elem)
        # Only scalar access allowed: the found_inf flag (one 4-byte load per thread in the
        # steps, one 4-byte store in the check).
        assert got["ld_scalar"] in (0, 4) and got["st_scalar"] in (0, 4), (name, got)
