"""The CUDA bodies of ``bench/gpu_check.py``'s parts. Each runs in its own child process
(``python -m bench.gpu_check --part NAME --result FILE``) so that a hung driver or kernel
is ended by the part's timeout instead of hanging the check. Each returns a JSON-able dict
with ``status`` ("pass", "fail" or "skip"), ``detail`` (one line) and data.

Nothing here runs on a machine without CUDA; the orchestration around it is tested with fakes.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

# Peak DRAM bandwidth, GB/s, from the vendors' datasheets, matched by substring of the device
# name (most specific first). The check also computes the theoretical peak from the device
# properties (2 x memory clock x bus width: DDR); both are reported.
DATASHEET_GBS: List[Tuple[str, float]] = [
    ("GH200", 4000), ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
    ("H800", 3350), ("B200", 8000), ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935),
    ("A100", 1555), ("A800", 2039), ("L40S", 864), ("L40", 864), ("L4", 300), ("A10G", 600),
    ("A10", 600), ("RTX 4090", 1008), ("RTX 3090", 936), ("V100", 900), ("T4", 320),
]


def datasheet_gbs(name: str):
    for key, gbs in DATASHEET_GBS:
        if key.lower() in name.lower():
            return gbs
    return None


def probe() -> Dict[str, Any]:
    """Devices and their peaks; never fails on a machine without CUDA (count 0)."""
    import torch
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        clock_khz = getattr(p, "memory_clock_rate", 0) or 0
        bus_bits = getattr(p, "memory_bus_width", 0) or 0
        devices.append({
            "index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
            "peak_gbs_properties": (2 * clock_khz * 1e3 * bus_bits / 8 / 1e9) if clock_khz and bus_bits else None,
            "peak_gbs_datasheet": datasheet_gbs(p.name),
        })
    try:
        from pipetrain.executor import cuda_backend_available
        backend = bool(cuda_backend_available())
    except Exception:
        backend = False
    return {"status": "pass", "detail": f"{len(devices)} CUDA device(s)", "devices": devices,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "pipetrain_cuda_backend": backend}


# ---- Triton kernels on the GPU against the plain-torch reference ---------------------------

def _kernel_cases(torch) -> List[Tuple[str, str, Callable[[int, Any], Tuple[Dict, Dict]]]]:
    """(case name, function name, make(n, device) -> (tensors, scalar kwargs))."""

    def adam(dtype, **kw):
        def make(n, dev):
            g = torch.Generator(device=dev).manual_seed(n)
            w = torch.randn(n, device=dev, generator=g)
            t = {"param": w.to(dtype), "grad": torch.randn(n, device=dev, generator=g).to(dtype),
                 "exp_avg": 0.1 * torch.randn(n, device=dev, generator=g),
                 "exp_avg_sq": 0.01 * torch.rand(n, device=dev, generator=g)}
            if dtype != torch.float32:
                t["master"] = w.clone()
            return t, dict(dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=3), **kw)
        return make

    def sgd(**kw):
        def make(n, dev):
            g = torch.Generator(device=dev).manual_seed(n)
            t = {"param": torch.randn(n, device=dev, generator=g),
                 "grad": torch.randn(n, device=dev, generator=g),
                 "momentum_buf": torch.randn(n, device=dev, generator=g)}
            return t, dict(dict(lr=1e-2, momentum=0.9, first_step=False), **kw)
        return make

    def predict(kind):
        def make(n, dev):
            t, kw = (adam(torch.float32)(n, dev) if kind == "adam" else sgd()(n, dev))
            t.pop("grad")
            t["out"] = torch.empty(n, device=dev)
            kw = ({k: kw[k] for k in ("lr", "beta1", "beta2", "eps", "step")} if kind == "adam"
                  else {"lr": kw["lr"]})
            return t, dict(kw, s=2.0)
        return make

    def nonfinite(n, dev):
        grad = torch.randn(n, device=dev)
        grad[n // 2] = float("inf")
        return {"grad": grad, "found_inf": torch.zeros(1, device=dev)}, {}

    return [("adamw fp32", "adam_step", adam(torch.float32, weight_decay=0.1, decoupled=True)),
            ("adam fp32 + predict", "adam_step", adam(torch.float32, weight_decay=0.1)),
            ("adamw bf16 + fp32 master", "adam_step", adam(torch.bfloat16, weight_decay=0.1, decoupled=True)),
            ("sgd nesterov fp32", "sgd_step", sgd(nesterov=True, weight_decay=0.01)),
            ("sgd_predict", "sgd_predict", predict("sgd")),
            ("adam_predict", "adam_predict", predict("adam")),
            ("non_finite_check", "non_finite_check", nonfinite)]


def triton_kernels(device: str = "cuda:0", sizes=(1, 1000, 2**20 + 3)) -> Dict[str, Any]:
    """Each Triton kernel on CUDA tensors (compiled, not interpreted) against
    ``pipetrain.kernels.reference`` on the same inputs and device. fp32: within 8 fp32 ulps of
    the largest magnitude (FMA contraction differs); low precision: within one ulp.
    (``device="cpu"`` under ``TRITON_INTERPRET=1`` is how the tests check this code here.)"""
    import torch
    import pipetrain.kernels as K
    from pipetrain.kernels import reference as R

    dev = torch.device(device)
    rows, bad = [], []
    for case, fn, make in _kernel_cases(torch):
        for n in sizes:
            t, kw = make(n, dev)
            if case.endswith("+ predict"):
                t["predict_out"] = torch.empty(n, device=dev)
                kw = dict(kw, predict_s=2.0)
            mine = {k: v.clone() for k, v in t.items()}
            getattr(K, fn)(**mine, **kw)
            getattr(R, fn)(**t, **kw)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            worst = 0.0
            for k, ref in t.items():
                a, b = mine[k].double(), ref.double()
                if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                    bad.append(f"{case} n={n} {k}: non-finite pattern differs")
                    continue
                fin = torch.isfinite(b)
                diff = (a - b)[fin].abs().max().item() if fin.any() else 0.0
                eps = torch.finfo(ref.dtype).eps if ref.is_floating_point() else 0.0
                scale = b[fin].abs().max().item() if fin.any() else 0.0
                tol = (8 * eps * max(scale, 1e-30)) if ref.dtype == torch.float32 else eps * max(scale, 1e-30)
                worst = max(worst, diff / tol if tol else (0.0 if diff == 0 else float("inf")))
                if diff > tol:
                    bad.append(f"{case} n={n} {k}: max |diff| {diff:.3g} > {tol:.3g}")
            rows.append({"case": case, "n": n, "worst_diff_over_tol": worst})
    status = "fail" if bad else "pass"
    return {"status": status, "detail": (f"{len(rows)} kernel cases match the reference" if not bad
                                          else f"{len(bad)} mismatches: {bad[0]}"),
            "rows": rows, "mismatches": bad}


# ---- activation transfers between two GPUs -------------------------------------------------

def transfer_2gpu() -> Dict[str, Any]:
    """Copies cuda:0 -> cuda:1 through the executor's copy stream (``Executor.copy``): bytes
    equal for odd sizes, and bandwidth at 64 MiB, reporting which path the backend took (peer
    or pinned staging). The path is the hardware's choice: on a machine with peer access the
    staging path is not reachable from the public API (noted in the result)."""
    import torch
    if torch.cuda.device_count() < 2:
        return {"status": "skip", "detail": f"needs 2 CUDA devices, found {torch.cuda.device_count()}"}
    import pipetrain._C_cuda as cc
    from pipetrain.executor import Executor

    peer = bool(cc.peer_enabled(0, 1)) and bool(cc.peer_enabled(1, 0))
    path = "peer (cudaMemcpyPeerAsync)" if peer else "pinned host staging"
    checks, bad = [], []
    with Executor(2, "cuda", devices=[0, 1]) as ex:
        for src_dev, dst_dev in ((0, 1), (1, 0)):
            for n in (1, 4099, 3 * 2**20 + 7):
                src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=f"cuda:{src_dev}")
                dst = torch.zeros(n, dtype=torch.uint8, device=f"cuda:{dst_dev}")
                ex.copy(src.data_ptr(), dst.data_ptr(), n, src_dev, dst_dev).synchronize(30)
                ok = torch.equal(src.cpu(), dst.cpu())
                checks.append({"src": src_dev, "dst": dst_dev, "bytes": n, "equal": ok})
                if not ok:
                    bad.append(f"{src_dev}->{dst_dev} {n} B differ")
        n = 64 * 2**20
        src = torch.ones(n, dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        times = []
        for _ in range(12):
            torch.cuda.synchronize(0)
            t0 = time.perf_counter()
            ex.copy(src.data_ptr(), dst.data_ptr(), n, 0, 1).synchronize(30)
            times.append(time.perf_counter() - t0)
        gbs = n / statistics.median(times[2:]) / 1e9
    return {"status": "fail" if bad else "pass",
            "detail": f"path {path}; {len(checks)} copies byte-equal{' (FAILED: ' + bad[0] + ')' if bad else ''}; "
                      f"64 MiB at {gbs:.1f} GB/s (median of 10, host-timed)",
            "path": path, "checks": checks, "gbs_64MiB": gbs,
            "note": None if not peer else "staging path not exercised: peer access is available"}


# ---- the nsys target: two profiled training steps ------------------------------------------

def nsys_target() -> Dict[str, Any]:
    """Run 4 steps of a 2-stage 1F1B pipeline with profile_steps=(1, 3): nsys records steps 1
    and 2 only. Uses two GPUs when present, else both stages on cuda:0."""
    import torch
    import pipetrain
    devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else ["cuda:0", "cuda:0"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]).cuda(0)
    m = 4
    pipe = pipetrain.Pipeline(model, num_devices=2, schedule="1f1b", num_microbatches=m,
                              loss_fn=torch.nn.functional.mse_loss, devices=devices,
                              profile_steps=(1, 3))
    x = torch.randn(32, 256, device=devices[0])
    y = torch.randn(32, 256, device=devices[1])
    for _ in range(4):
        pipe.step(x, y)
    for d in set(devices):
        torch.cuda.synchronize(d)
    pipe.close()
    return {"status": "pass", "detail": f"4 steps on {devices}", "devices": devices,
            "expected": {"stages": 2, "microbatches": m, "kinds": ["F", "B"], "steps": 2}}


def nvtx_ranges_from_sqlite(path: str) -> List[Tuple[str, str]]:
    """(domain, range name) of every NVTX push/pop or start/end range in an nsys sqlite
    export. Event-type ids come from the export's own ENUM table where it has one."""
    import sqlite3
    con = sqlite3.connect(path)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        types = {"NvtxPushPopRange": 59, "NvtxStartEndRange": 60, "NvtxDomainCreate": 75}
        if "ENUM_NSYS_EVENT_TYPE" in tables:
            for i, name in con.execute("SELECT id, name FROM ENUM_NSYS_EVENT_TYPE"):
                if name in types:
                    types[name] = i
        strings = dict(con.execute("SELECT id, value FROM StringIds")) if "StringIds" in tables else {}
        domains = {0: "default"}
        for dom, text, tid in con.execute(
                "SELECT domainId, text, textId FROM NVTX_EVENTS WHERE eventType = ?",
                (types["NvtxDomainCreate"],)):
            domains[dom] = text if text is not None else strings.get(tid, f"domain{dom}")
        out = []
        for dom, text, tid in con.execute(
                "SELECT domainId, text, textId FROM NVTX_EVENTS WHERE eventType IN (?, ?)",
                (types["NvtxPushPopRange"], types["NvtxStartEndRange"])):
            out.append((domains.get(dom or 0, f"domain{dom}"),
                        text if text is not None else strings.get(tid, "")))
        return out
    finally:
        con.close()


def check_nvtx(ranges: List[Tuple[str, str]], stages: int, microbatches: int,
               kinds: List[str], steps: int) -> Dict[str, Any]:
    """Every action label ``s<stage>/<kind><mb>`` in domain ``pipetrain`` exactly ``steps``
    times (profile_steps=(1, 3) captures 2 steps), and nothing else in that domain."""
    import re
    from collections import Counter
    ours = Counter(name for dom, name in ranges if dom == "pipetrain")
    want = {f"s{s}/{k}{i}" for s in range(stages) for k in kinds for i in range(microbatches)}
    missing = sorted(want - set(ours))
    wrong_count = sorted(n for n in want if n in ours and ours[n] != steps)
    extra = sorted(n for n in ours if n not in want and not re.fullmatch(r"s\d+/[FBIW]\d+", n))
    ok = bool(ours) and not missing and not wrong_count and not extra
    return {"status": "pass" if ok else "fail",
            "detail": (f"{sum(ours.values())} ranges in domain 'pipetrain', every action x{steps}"
                       if ok else f"domain 'pipetrain': {sum(ours.values())} ranges; missing "
                       f"{missing[:4]}, wrong counts {wrong_count[:4]}, unexpected {extra[:4]}"),
            "ranges": dict(ours), "other_domains": sorted({d for d, _ in ranges} - {"pipetrain"})}


from bench._gpu_graphs_part import cuda_graphs_step  # noqa: E402  (its own module)

CHILDREN = {"probe": probe, "triton_kernels": triton_kernels, "transfer_2gpu": transfer_2gpu,
            "nsys_target": nsys_target, "cuda_graphs": cuda_graphs_step}
