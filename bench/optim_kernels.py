"""Bench section ``optim_kernels``: fused AdamW update+predict (ours) vs torch's best, vs bandwidth.

For each size (fp32 parameters; quick: 1 M; full: 1 M, 16 M, 64 M) and in one run, medians
over repeats, interleaved (every repeat times every variant once, so drift hits all alike):

* ours          — one pass: AdamW update then XPipe prediction (``adam_step(...,
                  predict_out=...)``): the C++ kernel on CPU, the Triton kernel on CUDA.
* ours (optim)  — the same through ``pipetrain.optim.AdamW.step_and_predict`` on a flat
                  buffer (adds the Python optimizer overhead).
* torch best    — ``torch.optim.AdamW(fused=True)`` then the prediction in torch ops written
                  as well as torch allows: preallocated buffers, ``out=``/in-place, and the
                  algebra folded to three passes (sqrt, add, addcdiv).
* torch fused   — ``torch.optim.AdamW(fused=True)`` alone (no prediction).
* copy          — ``dst.copy_(src)`` of as many bytes as ours moves: the memory bandwidth.

Bytes-moved model, per fp32 parameter (what each variant must read + write at least):
    ours          read w, g, m, v; write w, m, v, w_hat        = 8 x 4 = 32 B
    torch fused   read w, g, m, v; write w, m, v               = 7 x 4 = 28 B
    torch best    28 + sqrt(v)->t 8 + t+=c 8 + addcdiv(w,m,t)->w_hat 16 = 60 B
    copy          read 4N floats, write 4N floats              = 32 B per parameter
GB/s = model bytes / median time; "% copy" = that over the copy's GB/s. (Write-allocate
traffic is not counted; our kernel avoids it for the prediction with streaming stores.)

Also, ordinary (non-flattened) parameters — 64 tensors of 16 K floats, and one of 1 M — through
``pipetrain.optim.AdamW`` (``step_and_predict``, ``predict``, ``step``; list kernel calls,
prediction buffers reused) next to ``torch.optim.AdamW(fused=True).step()`` on the same
parameters, in one run, cold caches, medians; printed as the ratio to torch fused (target
for step_and_predict: <= 1.25).

Also: swapping a flat bucket's weight version, ``bucket.bind(version)`` (rebind views, no
copy) vs ``bucket.load_(version)`` (one copy_), for a 64-parameter stage of the first size.

Threads: ours uses ``torch.get_num_threads()``, the same as torch.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import time

import torch

LR, BETAS, EPS, WD, S = 1e-4, (0.9, 0.999), 1e-8, 1e-2, 1.0
BYTES = {"ours": 32, "ours (optim)": 32, "torch best": 60, "torch fused": 28, "copy": 32}


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def _variants(n: int, device: torch.device):
    """Build each variant's closure over its own preallocated buffers (one step per call)."""
    from pipetrain import flat_buffer, optim
    if device.type == "cuda":
        import pipetrain.kernels as kernels
    else:
        from pipetrain import _cpu_kernels as kernels

    gen = torch.Generator(device="cpu").manual_seed(0)
    base_w = (torch.randn(n, generator=gen) * 0.1).to(device)
    grad = (torch.randn(n, generator=gen) * 1e-2).to(device)
    out = {}

    # ours: the raw fused kernel
    w, w_hat = base_w.clone(), torch.empty_like(base_w)
    m, v = torch.zeros_like(base_w), torch.zeros_like(base_w)
    step = [0]

    def ours():
        step[0] += 1
        kernels.adam_step(w, grad, m, v, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                          weight_decay=WD, decoupled=True, step=step[0], predict_out=w_hat,
                          predict_s=S)
    out["ours"] = ours

    # ours through the optimizer, on a flat bucket (state flat, one kernel call)
    p = torch.nn.Parameter(base_w.clone())
    bucket = flat_buffer.flatten([p])[0]
    bucket.grad.copy_(grad)
    opt = optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    pred_buf = bucket.new_buffer(zero=False)
    out["ours (optim)"] = lambda: opt.step_and_predict(S, out=pred_buf)

    # torch fused AdamW, alone and followed by the best torch prediction
    def torch_opt():
        q = torch.nn.Parameter(base_w.clone())
        q.grad = grad  # fused AdamW only reads it
        return q, torch.optim.AdamW([q], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)

    q1, o1 = torch_opt()
    out["torch fused"] = o1.step

    q2, o2 = torch_opt()
    tmp, pred = torch.empty_like(base_w), torch.empty_like(base_w)

    def torch_best():
        o2.step()
        st = o2.state[q2]
        t = float(st["step"])
        bc1, bc2s = 1 - BETAS[0] ** t, math.sqrt(1 - BETAS[1] ** t)
        # w - s*lr*(m/bc1)/(sqrt(v)/bc2s + eps) = w - (s*lr*bc2s/bc1) * m/(sqrt(v) + eps*bc2s)
        torch.sqrt(st["exp_avg_sq"], out=tmp)
        tmp.add_(EPS * bc2s)
        torch.addcdiv(q2.detach(), st["exp_avg"], tmp, value=-S * LR * bc2s / bc1, out=pred)
    out["torch best"] = torch_best

    src = torch.empty(4 * n, device=device).uniform_()
    dst = torch.empty_like(src)
    out["copy"] = lambda: dst.copy_(src)
    return out


LOOSE_CASES = {"64 x 16K": [16384] * 64, "1 x 1M": [2**20]}


def _loose_rows(repeats: int) -> list[dict]:
    """Ordinary parameters (not flat): ours vs torch fused AdamW, side by side (CPU)."""
    from pipetrain import optim
    flush = torch.empty(32 * 2**20)  # cold caches before every timed call, as above
    timer = _timer(torch.device("cpu"))
    rows = []
    for label, sizes in LOOSE_CASES.items():
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(k, generator=gen) * 0.1 for k in sizes]
        grads = [torch.randn(k, generator=gen) * 1e-2 for k in sizes]

        def params():
            ps = [torch.nn.Parameter(b.clone()) for b in base]
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            return ps

        kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        variants = {"torch fused": torch.optim.AdamW(params(), **kw, fused=True).step}
        o1, o2, o3 = (optim.AdamW(params(), **kw) for _ in range(3))
        variants["step_and_predict"] = lambda o=o1: o.step_and_predict(S)
        variants["predict"] = lambda o=o2: o.predict(S)
        variants["step"] = o3.step
        o2.step()  # predict from a non-zero state
        for fn in variants.values():
            fn()
        times = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                flush.fill_(1.0)
                times[name].append(timer(fn))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, t in med.items():
            rows.append(dict(case=label, n=sum(sizes), tensors=len(sizes), variant=name,
                             time_ms=t * 1e3, ratio_vs_torch_fused=t / med["torch fused"]))
    return rows


def _print_loose(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'case':<9} {'variant':<17} {'time ms':>9} {'t/torch fused':>14}")
    for r in rows:
        print(f"{r['case']:<9} {r['variant']:<17} {r['time_ms']:>9.2f} "
              f"{r['ratio_vs_torch_fused']:>14.2f}")
    for r in rows:
        if r["variant"] == "step_and_predict":
            print(f"  {r['case']} targets: step_and_predict / torch fused = "
                  f"{r['ratio_vs_torch_fused']:.2f}x (target <= 1.25)")


def _swap_times(n: int, device: torch.device, repeats: int) -> dict[str, float]:
    """bind (rebind 64 param views) vs load_ (one copy of the bucket) for one weight version."""
    from pipetrain import flat_buffer
    sizes = [n // 64] * 63 + [n - 63 * (n // 64)]
    params = [torch.nn.Parameter(torch.zeros(k, device=device)) for k in sizes]
    bucket = flat_buffer.flatten(params, grads=False)[0]
    live, version = bucket.data, bucket.new_buffer()
    timer = _timer(device)
    res = {"bind": [], "load_": []}
    for _ in range(repeats):
        res["bind"].append(timer(lambda: (bucket.bind(version), bucket.bind(live))) / 2)
        res["load_"].append(timer(lambda: bucket.load_(version)))
    return {k: statistics.median(v) for k, v in res.items()}


def _run_device(device: torch.device, sizes: list[int], repeats: int) -> list[dict]:
    timer = _timer(device)
    # Every timed call starts with cold caches, as an optimizer step does after a backward
    # pass: write a buffer larger than the last-level cache first (not timed). Without it,
    # at 1 M parameters (20 MB) results depend on which variant ran just before.
    flush = torch.empty(32 * 2**20, device=device)  # 128 MB
    rows = []
    for n in sizes:
        variants = _variants(n, device)
        for fn in variants.values():  # warm-up: first-touch pages, JIT compile, pool start
            fn()
        times = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                flush.fill_(1.0)
                times[name].append(timer(fn))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        copy_gbs = BYTES["copy"] * n / med["copy"] / 1e9
        for name, t in med.items():
            gbs = BYTES[name] * n / t / 1e9
            rows.append(dict(device=device.type, n=n, variant=name, time_ms=t * 1e3,
                             ratio_vs_ours=t / med["ours"], bytes_per_param=BYTES[name],
                             gb_s=gbs, pct_copy=100 * gbs / copy_gbs))
        del variants
    return rows


def _print(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'params':>8} {'variant':<13} {'time ms':>9} {'t/ours':>7} {'B/param':>8} "
          f"{'GB/s':>7} {'% copy':>7}")
    for r in rows:
        print(f"{r['n'] / 2**20:>7.0f}M {r['variant']:<13} {r['time_ms']:>9.2f} "
              f"{r['ratio_vs_ours']:>7.2f} {r['bytes_per_param']:>8} {r['gb_s']:>7.1f} "
              f"{r['pct_copy']:>6.0f}%")
    by = {}
    for r in rows:
        by.setdefault(r["n"], {})[r["variant"]] = r
    for n, v in by.items():
        o = v["ours"]
        best = v["torch best"]["time_ms"] / o["time_ms"]
        fused = v["torch fused"]["time_ms"] / o["time_ms"]
        print(f"  {n / 2**20:.0f}M targets: torch best / ours = {best:.2f}x "
              f"(target >= 2); torch fused / ours = {fused:.2f}x "
              f"(target >= 0.8); ours = {o['pct_copy']:.0f}% of copy bandwidth (target >= 80%)")


def run(quick: bool, out: pathlib.Path) -> None:
    from pipetrain import _cpu_kernels

    sizes = [2**20] if quick else [2**20, 16 * 2**20, 64 * 2**20]
    repeats = 7 if quick else 9
    threads = torch.get_num_threads()
    _cpu_kernels.set_num_threads(threads)
    cpu = torch.device("cpu")
    rows = _run_device(cpu, sizes, repeats)
    _print(rows, f"CPU, fp32 AdamW (+ prediction s={S}), {threads} threads for torch and ours, "
                 f"pipetrain SIMD: {_cpu_kernels.simd_level()}, median of {repeats}")
    loose = _loose_rows(repeats)
    _print_loose(loose, f"CPU, ordinary (not flat) fp32 parameters, AdamW, {threads} threads, "
                        f"median of {repeats}")
    swap = _swap_times(sizes[0], cpu, repeats)
    print(f"weight-version swap, {sizes[0] / 2**20:.0f}M params in 64 tensors: "
          f"bind (rebind views) {swap['bind'] * 1e6:.1f} us, load_ (one copy_) "
          f"{swap['load_'] * 1e6:.1f} us")
    result = {"cpu": rows, "cpu_loose": loose, "cpu_swap_s": swap, "threads": threads,
              "simd": _cpu_kernels.simd_level()}
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        gsizes = [2**20, 16 * 2**20] if quick else [2**20, 16 * 2**20, 64 * 2**20, 256 * 2**20]
        grows = _run_device(gpu, gsizes, repeats)
        _print(grows, f"CUDA ({torch.cuda.get_device_name()}), Triton kernels, "
                      "HBM bandwidth = copy")
        result["cuda"] = grows
    else:
        print("(no CUDA device: the Triton path of this section was skipped)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "optim_kernels.json").write_text(json.dumps(result, indent=1))
