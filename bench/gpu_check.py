"""GPU readiness: ``python -m bench --gpu-check [--out DIR]`` (or ``python -m bench.gpu_check``).

On a machine with CUDA devices it runs, each part with its own timeout and the whole under
10 minutes:

1. ``cuda_tests``: the tests that skip without CUDA (pytest ``-k "cuda or gpu or nvtx"``:
   every such test is named so), from a JUnit report; a test still skipped for want of CUDA
   on this machine is a failure, except the 2-GPU tests where fewer than 2 devices exist.
2. ``triton_kernels``: every Triton kernel compiled for the GPU (no ``TRITON_INTERPRET``) vs
   ``pipetrain.kernels.reference`` on the same CUDA inputs (the test suite's kernel tests run
   on CPU tensors under the interpreter, so they cannot do this).
3. ``optim_bandwidth``: the optimizer bench's GPU rows (``python -m bench --only
   optim_kernels --quick``): achieved GB/s of our fused kernel and of a plain copy, as a
   share of the device's peak (2 x memory clock x bus width from the device properties, and
   the vendor's datasheet figure, see ``_peer_gpu_parts.DATASHEET_GBS``).
4. ``transfer_2gpu``: activation copies between two GPUs through the executor's copy stream
   (peer or pinned staging, whichever the hardware gives; skipped with < 2 GPUs).
5. ``cuda_graphs``: ``Pipeline(cuda_graphs=True)`` on cuda:0 (``bench/_gpu_graphs_part.py``):
   gradients vs the eager pipeline, runs launched natively by the executor, step time of
   eager vs captured on a fine-grained and a wide workload.
6. ``nsys_nvtx``: ``nsys profile --capture-range=cudaProfilerApi`` of a pipeline with
   ``profile_steps=(1, 3)``; the sqlite export must hold every action's NVTX range
   (``s1/F3``, domain ``pipetrain``) exactly twice.

It writes ``gpu_check.md`` and ``gpu_check.json`` to the output folder and exits 1 if any part
failed (a skip with its reason is not a failure). Without a CUDA device it says so, lists
what it would have run, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

TOTAL_BUDGET_S = 540.0     # the parts; with the probe (45 s at most) the whole stays under 10 minutes
ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass
class Part:
    name: str
    what: str
    timeout_s: float
    fn: Callable[["Ctx", float], Dict[str, Any]]


@dataclass
class Ctx:
    out: pathlib.Path
    info: Dict[str, Any]                        # the probe: devices, peaks, backend
    python: str = sys.executable
    work: pathlib.Path = field(default_factory=lambda: pathlib.Path(tempfile.mkdtemp(prefix="gpucheck.")))


def run_cmd(cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None,
            cwd: Optional[pathlib.Path] = None) -> Dict[str, Any]:
    """Run a command bounded in time; its own process group, so a timeout ends its children
    too. Returns rc (None on timeout), the output's tail and seconds taken."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd or ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        import signal
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        rc = None
    return {"rc": rc, "tail": (out or "")[-4000:], "seconds": time.monotonic() - t0}


def run_child(ctx: Ctx, name: str, timeout: float, env: Optional[Dict[str, str]] = None,
              wrap: Optional[List[str]] = None) -> Dict[str, Any]:
    """One body of bench/_peer_gpu_parts.py in a child process; its result dict, or a failure
    saying why there is none (timeout, crash)."""
    result = ctx.work / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = (wrap or []) + [ctx.python, "-m", "bench.gpu_check", "--part", name, "--result", str(result)]
    r = run_cmd(cmd, timeout, env)
    if r["rc"] is None:
        return {"status": "fail", "detail": f"timed out after {timeout:.0f} s", "tail": r["tail"]}
    if not result.exists():
        return {"status": "fail", "detail": f"child exited {r['rc']} without a result", "tail": r["tail"]}
    res = json.loads(result.read_text())
    if r["rc"] != 0 and res.get("status") == "pass":
        res = dict(res, status="fail", detail=f"exit code {r['rc']}: {res.get('detail')}")
    res.setdefault("tail", r["tail"][-1500:])
    return res


# ---- the parts -----------------------------------------------------------------------------

CUDA_SKIP_WORDS = ("cuda", "gpu", "nvcc", "_c_cuda")


def junit_summary(xml_path: pathlib.Path, gpus: int) -> Dict[str, Any]:
    """Counts from a pytest JUnit report; skips that blame a missing CUDA device are failures
    on a CUDA machine (the point of this part), unless they need more GPUs than exist."""
    import xml.etree.ElementTree as ET
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    bad_skips, ok_skips, failures = [], [], []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        kids = {c.tag: c for c in case}
        if "failure" in kids or "error" in kids:
            counts["failed"] += 1
            failures.append(test)
        elif "skipped" in kids:
            counts["skipped"] += 1
            reason = (kids["skipped"].get("message") or "").lower()
            needs_more = ("two" in reason or "2 " in reason) and gpus < 2
            blames_cuda = any(w in reason for w in CUDA_SKIP_WORDS) and "present" not in reason
            (bad_skips if blames_cuda and not needs_more else ok_skips).append(f"{test}: {reason}")
        else:
            counts["passed"] += 1
    return dict(counts, failures=failures, bad_skips=bad_skips, ok_skips=ok_skips)


def part_cuda_tests(ctx: Ctx, timeout: float) -> Dict[str, Any]:
    xml = ctx.work / "cuda_tests.xml"
    # tests/test_gpu_check.py matches "gpu" by its module name; it tests this command, not CUDA.
    r = run_cmd([ctx.python, "-m", "pytest", "tests", "-k", "cuda or gpu or nvtx", "-rs",
                 "--ignore=tests/test_gpu_check.py",
                 "-p", "no:cacheprovider", f"--junitxml={xml}"], timeout)
    if r["rc"] is None:
        return {"status": "fail", "detail": f"timed out after {timeout:.0f} s", "tail": r["tail"]}
    if not xml.exists():
        return {"status": "fail", "detail": f"pytest exited {r['rc']} without a report", "tail": r["tail"]}
    s = junit_summary(xml, len(ctx.info.get("devices", [])))
    ok = r["rc"] == 0 and not s["failed"] and not s["bad_skips"] and s["passed"] > 0
    detail = f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped"
    if s["bad_skips"]:
        detail += f"; skipped for want of CUDA on a CUDA machine: {s['bad_skips'][0]}"
    return dict(s, status="pass" if ok else "fail", detail=detail, tail=r["tail"][-1500:])


def part_triton(ctx: Ctx, timeout: float) -> Dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return run_child(ctx, "triton_kernels", timeout, env)


def bandwidth_rows(result: Dict[str, Any], peak_gbs: Optional[float]) -> List[Dict[str, Any]]:
    """The optimizer bench's CUDA rows (ours and the copy), with % of the device's peak."""
    rows = []
    for r in result.get("cuda", []):
        if r["variant"] in ("ours", "copy"):
            rows.append({"n": r["n"], "variant": r["variant"], "gb_s": r["gb_s"],
                         "pct_peak": 100 * r["gb_s"] / peak_gbs if peak_gbs else None})
    return rows


def part_optim(ctx: Ctx, timeout: float) -> Dict[str, Any]:
    out = ctx.work / "optim"
    r = run_cmd([ctx.python, "-m", "bench", "--quick", "--only", "optim_kernels", "--out", str(out)], timeout)
    if r["rc"] is None:
        return {"status": "fail", "detail": f"timed out after {timeout:.0f} s", "tail": r["tail"]}
    f = out / "optim_kernels.json"
    if r["rc"] != 0 or not f.exists():
        return {"status": "fail", "detail": f"optim bench exited {r['rc']}", "tail": r["tail"]}
    dev = (ctx.info.get("devices") or [{}])[0]
    peak = dev.get("peak_gbs_properties") or dev.get("peak_gbs_datasheet")
    rows = bandwidth_rows(json.loads(f.read_text()), peak)
    if not rows:
        return {"status": "fail", "detail": "the optimizer bench wrote no CUDA rows", "tail": r["tail"]}
    big = max(r["n"] for r in rows)
    best = {r["variant"]: r for r in rows if r["n"] == big}
    pct = lambda v: "n/a" if v is None else f"{v:.0f} %"   # noqa: E731
    return {"status": "pass", "rows": rows, "peak_gbs": peak,
            "peak_source": "device properties (2 x memory clock x bus width)"
            if dev.get("peak_gbs_properties") else "datasheet table",
            "detail": f"at {big / 2**20:.0f} M params: ours {best['ours']['gb_s']:.0f} GB/s "
                      f"({pct(best['ours']['pct_peak'])} of peak {peak or 'unknown'} GB/s), copy "
                      f"{best.get('copy', {}).get('gb_s', 0):.0f} GB/s "
                      f"({pct(best.get('copy', {}).get('pct_peak'))})"}


def part_transfer(ctx: Ctx, timeout: float) -> Dict[str, Any]:
    if len(ctx.info.get("devices", [])) < 2:
        return {"status": "skip", "detail": f"needs 2 CUDA devices, found {len(ctx.info.get('devices', []))}"}
    return run_child(ctx, "transfer_2gpu", timeout)


def part_nsys(ctx: Ctx, timeout: float) -> Dict[str, Any]:
    from bench import _peer_gpu_parts as gp
    nsys = os.environ.get("NSYS") or shutil.which("nsys")
    if not nsys:
        return {"status": "fail", "detail": "nsys not found (install Nsight Systems, or set NSYS=/path/to/nsys)"}
    rep = ctx.work / "steps"
    t0 = time.monotonic()
    res = run_child(ctx, "nsys_target", timeout * 0.7, wrap=[
        nsys, "profile", "--capture-range=cudaProfilerApi", "--capture-range-end=stop",
        "--trace=cuda,nvtx", "--force-overwrite=true", "-o", str(rep)])
    if res["status"] != "pass":
        return res
    rep_file = next(iter(sorted(ctx.work.glob("steps*.nsys-rep"))), None)
    if rep_file is None:
        return {"status": "fail", "detail": "nsys wrote no report", "tail": res.get("tail")}
    db = ctx.work / "steps.sqlite"
    left = max(10.0, timeout - (time.monotonic() - t0))
    r = run_cmd([nsys, "export", "--type=sqlite", "--force-overwrite=true", "-o", str(db), str(rep_file)], left)
    if r["rc"] != 0 or not db.exists():
        return {"status": "fail", "detail": f"nsys export failed ({r['rc']})", "tail": r["tail"]}
    shutil.copy(rep_file, ctx.out / "gpu_check_steps.nsys-rep")
    e = res["expected"]
    return gp.check_nvtx(gp.nvtx_ranges_from_sqlite(str(db)), e["stages"], e["microbatches"],
                         e["kinds"], e["steps"])


def part_cuda_graphs(ctx: Ctx, timeout: float) -> Dict[str, Any]:
    return run_child(ctx, "cuda_graphs", timeout)


PARTS = [
    Part("cuda_tests", "pytest tests -k 'cuda or gpu or nvtx': every CUDA-only test, none skipped for want of CUDA", 150, part_cuda_tests),
    Part("triton_kernels", "Triton kernels compiled for the GPU vs pipetrain.kernels.reference on CUDA tensors", 90, part_triton),
    Part("optim_bandwidth", "python -m bench --quick --only optim_kernels: GPU rows, GB/s vs the device's peak", 150, part_optim),
    Part("transfer_2gpu", "cuda:0 <-> cuda:1 copies through the executor's copy stream (peer / pinned staging)", 60, part_transfer),
    Part("cuda_graphs", "Pipeline(cuda_graphs=True) on cuda:0: gradients vs eager, native runs, eager/graphs step time (fine grain, wide)", 90, part_cuda_graphs),
    Part("nsys_nvtx", "nsys capture of profile_steps=(1, 3); every NVTX range s<k>/<kind><mb> in domain pipetrain x2", 120, part_nsys),
]


# ---- orchestration and the report ----------------------------------------------------------

def run_parts(ctx: Ctx, parts: List[Part], budget_s: float = TOTAL_BUDGET_S, log=print) -> List[Dict[str, Any]]:
    """Every part in turn, each bounded by its timeout and by what is left of the budget; a
    part that raises is a failure, and the next part still runs."""
    deadline = time.monotonic() + budget_s
    results = []
    for part in parts:
        left = deadline - time.monotonic()
        t0 = time.monotonic()
        if left < 5:
            res = {"status": "fail", "detail": "not run: the check's 10-minute budget is spent"}
        else:
            log(f"[gpu-check] {part.name}: {part.what} (timeout {min(part.timeout_s, left):.0f} s) ...")
            try:
                res = part.fn(ctx, min(part.timeout_s, left))
            except Exception as err:
                res = {"status": "fail", "detail": f"{type(err).__name__}: {err}"}
        res = dict(res, part=part.name, what=part.what, seconds=round(time.monotonic() - t0, 1))
        log(f"[gpu-check] {part.name}: {res['status'].upper()} - {res.get('detail', '')}")
        results.append(res)
    return results


def write_report(out: pathlib.Path, info: Dict[str, Any], results: List[Dict[str, Any]]) -> int:
    """gpu_check.json + gpu_check.md; returns the exit code (1 if any part failed)."""
    out.mkdir(parents=True, exist_ok=True)
    failed = [r["part"] for r in results if r["status"] == "fail"]
    verdict = "no CUDA device" if not info.get("devices") else ("FAIL: " + ", ".join(failed) if failed else "PASS")
    (out / "gpu_check.json").write_text(json.dumps({"verdict": verdict, "info": info, "parts": results},
                                                   indent=1, default=str))
    lines = ["# pipetrain GPU check", "", f"**{verdict}**", ""]
    for d in info.get("devices", []):
        lines.append(f"- cuda:{d['index']} {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB, "
                     f"peak {d.get('peak_gbs_properties') or 'n/a'} GB/s from properties, "
                     f"{d.get('peak_gbs_datasheet') or 'n/a'} GB/s datasheet)")
    if info.get("torch"):
        lines.append(f"- torch {info['torch']} (CUDA {info.get('torch_cuda')}), pipetrain CUDA backend: "
                     f"{info.get('pipetrain_cuda_backend')}")
    lines += ["", "| part | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['part']} | {r['status']} | {r.get('seconds', '')} | "
                     f"{str(r.get('detail', '')).replace('|', '/')} |")
    for r in results:
        if r["status"] == "fail" and r.get("tail"):
            lines += ["", f"## {r['part']}: output tail", "```", r["tail"][-3000:], "```"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


def _probe(python: str) -> Dict[str, Any]:
    """The devices, probed in a child process (a broken driver cannot hang the check)."""
    ctx = Ctx(pathlib.Path("."), {}, python)
    res = run_child(ctx, "probe", 45)
    if res.get("status") != "pass":
        raise RuntimeError(f"could not probe CUDA devices: {res.get('detail')}\n{res.get('tail', '')}")
    return res


def main(argv=None, parts: Optional[List[Part]] = None,
         probe: Optional[Callable[[], Dict[str, Any]]] = None, log=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/out"))
    ap.add_argument("--part", help=argparse.SUPPRESS)      # internal: run one child body
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        from bench._peer_gpu_parts import CHILDREN
        try:
            res = CHILDREN[args.part]()
        except Exception:
            import traceback
            res = {"status": "fail", "detail": traceback.format_exc().strip().splitlines()[-1],
                   "traceback": traceback.format_exc()}
        pathlib.Path(args.result).write_text(json.dumps(res, default=str))
        return 0 if res["status"] != "fail" else 1
    parts = PARTS if parts is None else parts
    info = (probe or (lambda: _probe(sys.executable)))()
    if not info.get("devices"):
        log("gpu-check: found no CUDA device (torch.cuda.device_count() == 0); nothing run. "
            "On a CUDA machine it would run:")
        for p in parts:
            log(f"  - {p.name} ({p.timeout_s:.0f} s max): {p.what}")
        write_report(args.out, info, [dict(part=p.name, what=p.what, status="not run",
                                           detail="no CUDA device") for p in parts])
        return 0
    names = ", ".join(f"cuda:{d['index']} {d['name']}" for d in info["devices"])
    log(f"gpu-check: {names}; report in {args.out}/gpu_check.md")
    ctx = Ctx(args.out, info)
    ctx.out.mkdir(parents=True, exist_ok=True)
    try:
        results = run_parts(ctx, parts, log=log)
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    rc = write_report(args.out, info, results)
    log(f"gpu-check: {'PASS' if rc == 0 else 'FAIL'} ({args.out}/gpu_check.md)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
