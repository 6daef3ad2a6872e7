"""The fused C++ CPU kernels (pipetrain._cpu_kernels) against kernels.reference, the authority.

Tolerances. The C++ applies torch's op order with an FMA exactly where torch's CPU ops fuse
(add with alpha, lerp, addcmul — vector body and, by compiler contraction, scalar remainder
alike); the reference runs those torch ops. The one known difference: torch's CPU sqrt is
not always correctly rounded (~1e-3 of elements are 1 ulp off IEEE sqrt, which we use), so
an Adam element can differ by an ulp or two of fp32. So: fp32 within rtol 1e-6 (~8 ulp) and
bitwise equal on >= 99.9 % of elements for large n; bf16/fp16 results (rounded once from
those fp32 values) within one ulp of their format (rtol 2^-7 / 2^-10), which only an fp32
ulp landing on a rounding tie can cause.
"""

import os
import subprocess
import sys

import pytest
import torch

from pipetrain import _cpu_kernels as K
from pipetrain.kernels import reference as R

# 1 element, odd sizes (not multiples of 8/16-lane vectors or of 64-element chunks), and sizes
# above 2 x 32768 so the thread pool splits them (2 threads here, 3 in the split test).
SIZES = [1, 7, 31, 1000, 70_001, 262_147]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.fixture(autouse=True)
def _threads():
    K.set_num_threads(2)
    yield
    K.set_num_threads(2)


def _inputs(n, pdtype, gdtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    return dict(
        param=w.to(pdtype), grad=torch.randn(n, generator=gen).to(gdtype),
        m=torch.randn(n, generator=gen) * 0.1, v=torch.rand(n, generator=gen) * 0.01,
        master=w.clone())


def _close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), rtol=ULP_RTOL[dtype], atol=1e-7)
    if got.numel() >= 1000:
        assert (got == want).float().mean().item() >= 0.999


def _run_both(fn_name, bufs, **kw):
    """Run the C++ kernel and the reference on identical copies; return both sets."""
    mine = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in bufs.items()}
    ref = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in bufs.items()}
    getattr(K, fn_name)(**mine, **kw)
    getattr(R, fn_name)(**ref, **kw)
    return mine, ref


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("pdtype", DTYPES)
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_step_matches_reference(n, pdtype, decoupled):
    x = _inputs(n, pdtype, pdtype, seed=n)
    bufs = dict(param=x["param"], grad=x["grad"], exp_avg=x["m"], exp_avg_sq=x["v"],
                predict_out=torch.empty_like(x["param"]))
    mine, ref = _run_both("adam_step", bufs, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.1, decoupled=decoupled, step=5, predict_s=2.5)
    for key in ("exp_avg", "exp_avg_sq"):
        _close(mine[key], ref[key], torch.float32)
    _close(mine["param"], ref["param"], pdtype)
    _close(mine["predict_out"], ref["predict_out"], pdtype)


@pytest.mark.parametrize("beta1", [0.3, 0.5])
def test_adam_lerp_large_weight_branch(beta1):
    """1 - beta1 >= 0.5 takes torch's other lerp form, end - (1-w)*(end-start)."""
    x = _inputs(1037, torch.float32, torch.float32, seed=9)
    bufs = dict(param=x["param"], grad=x["grad"], exp_avg=x["m"], exp_avg_sq=x["v"])
    mine, ref = _run_both("adam_step", bufs, lr=1e-2, beta1=beta1, beta2=0.9, eps=1e-8, step=4)
    assert torch.equal(mine["exp_avg"], ref["exp_avg"])  # lerp: bit-identical
    _close(mine["param"], ref["param"], torch.float32)


@pytest.mark.parametrize("n", [1, 1000, 70_001])
@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gdtype", [torch.float32, "same"])
def test_adam_mixed_precision_master(n, pdtype, gdtype):
    gdtype = pdtype if gdtype == "same" else gdtype
    x = _inputs(n, pdtype, gdtype, seed=3)
    bufs = dict(param=x["param"], grad=x["grad"], exp_avg=x["m"], exp_avg_sq=x["v"],
                master=x["master"], predict_out=torch.empty_like(x["param"]))
    mine, ref = _run_both("adam_step", bufs, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6,
                          maximize=True, step=1, predict_s=1.0)
    _close(mine["master"], ref["master"], torch.float32)
    # param is master rounded to its dtype: exactly, whatever the tolerance above allowed
    assert torch.equal(mine["param"], mine["master"].to(pdtype))
    _close(mine["param"], ref["param"], pdtype)
    _close(mine["predict_out"], ref["predict_out"], pdtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("pdtype", DTYPES)
@pytest.mark.parametrize("opts", [
    dict(momentum=0.9, nesterov=True, first_step=False),
    dict(momentum=0.9, dampening=0.3, weight_decay=1e-2, maximize=True, first_step=False),
    dict(momentum=0.5, first_step=True),
    dict(momentum=0.0, weight_decay=1e-2, first_step=True),
])
def test_sgd_step_matches_reference(n, pdtype, opts):
    x = _inputs(n, pdtype, pdtype, seed=n + 1)
    bufs = dict(param=x["param"], grad=x["grad"], momentum_buf=x["m"],
                predict_out=torch.empty_like(x["param"]))
    mine, ref = _run_both("sgd_step", bufs, lr=0.05, predict_s=3.0, **opts)
    if opts["momentum"]:
        _close(mine["momentum_buf"], ref["momentum_buf"], torch.float32)
    _close(mine["param"], ref["param"], pdtype)
    _close(mine["predict_out"], ref["predict_out"], pdtype)


@pytest.mark.parametrize("n", [1, 33, 70_001])
@pytest.mark.parametrize("pdtype", DTYPES)
def test_sgd_master(n, pdtype):
    x = _inputs(n, pdtype, torch.float32, seed=7)
    bufs = dict(param=x["param"], grad=x["grad"], momentum_buf=x["m"], master=x["master"])
    mine, ref = _run_both("sgd_step", bufs, lr=0.1, momentum=0.9, first_step=False)
    _close(mine["master"], ref["master"], torch.float32)
    assert torch.equal(mine["param"], mine["master"].to(pdtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("pdtype", DTYPES)
@pytest.mark.parametrize("odtype", [torch.float32, "same"])
def test_predict_kernels_match_reference(n, pdtype, odtype):
    odtype = pdtype if odtype == "same" else odtype
    x = _inputs(n, pdtype, pdtype, seed=11)
    out = torch.empty(n, dtype=odtype)
    mine, ref = _run_both("sgd_predict", dict(param=x["param"], momentum_buf=x["m"], out=out),
                          s=2.0, lr=0.1)
    _close(mine["out"], ref["out"], odtype)
    for step in (0, 1, 7):
        mine, ref = _run_both("adam_predict", dict(param=x["param"], exp_avg=x["m"],
                                                   exp_avg_sq=x["v"], out=out),
                              s=1.5, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=step)
        _close(mine["out"], ref["out"], odtype)
        if step == 0:  # no update yet: the prediction is the weights themselves
            assert torch.equal(mine["out"], x["param"].to(odtype))


@pytest.mark.parametrize("kernel", ["adam", "sgd"])
def test_found_inf_skips_everything(kernel):
    x = _inputs(70_001, torch.bfloat16, torch.bfloat16)
    out = torch.full_like(x["param"], 7.0)
    before = {k: v.clone() for k, v in x.items()}
    flag = torch.ones(1)
    if kernel == "adam":
        K.adam_step(x["param"], x["grad"], x["m"], x["v"], lr=1.0, beta1=0.9, beta2=0.99,
                    eps=1e-8, step=3, master=x["master"], found_inf=flag, predict_out=out,
                    predict_s=1.0)
    else:
        K.sgd_step(x["param"], x["grad"], x["m"], lr=1.0, momentum=0.9, first_step=False,
                   master=x["master"], found_inf=flag, predict_out=out, predict_s=1.0)
    for k in before:
        assert torch.equal(x[k], before[k]), k
    assert torch.equal(out, torch.full_like(out, 7.0))
    # a zero flag is a normal step
    K.sgd_step(x["param"], x["grad"], x["m"], lr=1.0, momentum=0.9, first_step=False,
               found_inf=torch.zeros(1))
    assert not torch.equal(x["m"], before["m"])


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_split_is_bitwise_invariant(threads):
    """Each element's result depends only on its inputs: any split gives the same bits."""
    x = _inputs(262_147, torch.float32, torch.float32, seed=5)
    outs = []
    for t in (2, threads):
        K.set_num_threads(t)
        p, m, v, o = x["param"].clone(), x["m"].clone(), x["v"].clone(), torch.empty(262_147)
        K.adam_step(p, x["grad"], m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=2,
                    predict_out=o, predict_s=1.0)
        outs.append((p, m, v, o))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert K.get_num_threads() == threads


_SIMD_SCRIPT = """
import torch, sys
from pipetrain import _cpu_kernels as K
g = torch.Generator().manual_seed(0)
n = 1037
w = torch.randn(n, generator=g).to(torch.bfloat16); gr = torch.randn(n, generator=g)
m = torch.randn(n, generator=g) * 0.1; v = torch.rand(n, generator=g) * 0.01
ms = w.float(); o = torch.empty_like(w)
K.adam_step(w, gr, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
            decoupled=True, step=3, master=ms, predict_out=o, predict_s=2.0)
b = torch.zeros(n); K.sgd_step(ms, gr, b, lr=0.1, momentum=0.9, nesterov=True, first_step=True)
print(K.simd_level())
torch.save([w, m, v, ms, o, b], sys.argv[1])
"""


def test_simd_variants_agree_bitwise(tmp_path):
    """AVX-512, AVX2 and scalar code compute the same formula (same FMAs): same bits."""
    results = {}
    for level in ("scalar", "avx2", ""):
        env = dict(os.environ, PIPETRAIN_SIMD=level)
        path = tmp_path / f"{level or 'best'}.pt"
        run = subprocess.run([sys.executable, "-c", _SIMD_SCRIPT, str(path)], env=env,
                             capture_output=True, text=True, check=True)
        results[run.stdout.strip()] = torch.load(path)
    assert "scalar" in results
    base = results["scalar"]
    for level, tensors in results.items():
        for a, b in zip(base, tensors):
            assert torch.equal(a, b), level


def test_bad_input_raises_value_error():
    w, g, m, v = torch.randn(10), torch.randn(10), torch.zeros(10), torch.zeros(10)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="predict_s"):
        K.adam_step(w, g, m, v, **hp, step=1, predict_out=torch.empty(10), predict_s=-1.0)
    with pytest.raises(ValueError, match="s must be"):
        K.sgd_predict(w, m, torch.empty(10), s=-0.5, lr=0.1)
    with pytest.raises(ValueError, match="elements"):
        K.adam_step(w, g, m, v[:5], **hp, step=1)
    with pytest.raises(ValueError, match="contiguous"):
        K.sgd_step(torch.randn(20)[::2], g, m, lr=0.1, momentum=0.9, first_step=True)
    with pytest.raises(ValueError, match="dtype"):
        K.adam_step(w.double(), g, m, v, **hp, step=1)
    with pytest.raises(ValueError, match="dtype"):
        K.adam_step(w, g, m.half(), v, **hp, step=1)
    with pytest.raises(ValueError, match="device"):
        K.sgd_step(w, torch.empty(10, device="meta"), None, lr=0.1, first_step=True)
    with pytest.raises(ValueError, match="CPU"):
        K.sgd_step(*(torch.empty(10, device="meta") for _ in range(2)), None, lr=0.1,
                   first_step=True)
    with pytest.raises(ValueError, match="step"):
        K.adam_step(w, g, m, v, **hp, step=0)
    with pytest.raises(ValueError, match="momentum_buf"):
        K.sgd_step(w, g, None, lr=0.1, momentum=0.9, first_step=True)
    with pytest.raises(ValueError, match=">= 1"):
        K.set_num_threads(0)
    assert K.simd_level() in ("avx512", "avx2", "scalar")


def test_aliased_written_buffer_rejected():
    w, g, m = torch.randn(10), torch.randn(10), torch.zeros(10)
    with pytest.raises(ValueError, match="share memory"):
        K.sgd_step(w, g, m, lr=0.1, momentum=0.9, first_step=True, predict_out=w)


def test_concurrent_calls_from_two_threads():
    """Pipeline stages step their optimizers on their own threads at once (the GIL is
    released): one call gets the pool, the other runs on its own thread; both are exact."""
    import threading

    sets = [_inputs(300_007, torch.float32, torch.float32, seed=s) for s in (21, 22)]
    expect = []
    for x in sets:
        p, m, v = x["param"].clone(), x["m"].clone(), x["v"].clone()
        R.adam_step(p, x["grad"], m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=2)
        expect.append(p)
    errors = []

    def work(x):
        try:
            for _ in range(8):  # re-run from the same start: each result must be exact
                p, m, v = x["param"].clone(), x["m"].clone(), x["v"].clone()
                K.adam_step(p, x["grad"], m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                            step=2)
                x.setdefault("results", []).append(p)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(x,)) for x in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for x, want in zip(sets, expect):
        for got in x["results"]:
            _close(got, want, torch.float32)


def test_pool_restart_is_safe():
    """Resizing restarts the workers; a new worker must not run a call that is not yet
    published (it used to wake on a stale generation and call a null task: a segfault)."""
    n = 70_001
    g = torch.Generator().manual_seed(11)
    grad = torch.randn(n, generator=g)
    expect = None
    for i in range(200):
        K.set_num_threads(2 + i % 2)
        p, buf = torch.ones(n), torch.zeros(n)
        K.sgd_step(p, grad, buf, lr=0.5, momentum=0.9, first_step=True)
        if expect is None:
            expect = p.clone()
        assert torch.equal(p, expect), i
    K.set_num_threads(torch.get_num_threads())
