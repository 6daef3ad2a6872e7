"""``gpu_check``'s ``cuda_graphs`` part: a pipeline with ``cuda_graphs=True`` on cuda:0.

Two pipeline devices on one GPU (same-device links, so runs go native after the capture
step), two workloads: the peers bench's fine grain (8 x (Linear(16, 16) + GELU), one-row
micro-batches, m = 64: launch and Python overhead dominate) and a wide one (8 x
(Linear(1024, 1024) + GELU), micro-batches of 64 rows, m = 8). For each schedule (1F1B,
ZB-H1): gradients vs the eager pipeline (float32, 1e-4 relative: same kernels, cuBLAS may
pick other algorithms under capture), how many runs were native, and the step time of
eager vs captured (medians of interleaved steps, capture step excluded and timed apart).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List


def _model(width: int, seed: int = 0) -> Any:
    import torch
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
                                 for _ in range(8)]).cuda()


def _grads(model: Any) -> List[Any]:
    return [p.grad.detach().clone() for p in model.parameters()]


def cuda_graphs_step(steps: int = 15) -> Dict[str, Any]:
    import torch
    import pipetrain
    rows, bad = [], []
    for name, width, batch, m in (("fine", 16, 64, 64), ("wide", 1024, 512, 8)):
        x = torch.randn(batch, width, device="cuda:0")
        y = torch.randn(batch, width, device="cuda:0")
        for schedule in ("1f1b", "zb-h1"):
            pipes, models = {}, {}
            for mode in ("eager", "graphs"):
                models[mode] = _model(width)
                pipes[mode] = pipetrain.Pipeline(
                    models[mode], num_devices=2, schedule=schedule, num_microbatches=m,
                    loss_fn=torch.nn.functional.mse_loss, devices=["cuda:0", "cuda:0"],
                    cuda_graphs=(mode == "graphs"))
            t0 = time.perf_counter()
            pipes["graphs"].step(x, y)               # captures every action
            torch.cuda.synchronize()
            capture_s = time.perf_counter() - t0
            pipes["eager"].step(x, y)
            times: Dict[str, list] = {"eager": [], "graphs": []}
            for _ in range(steps):
                for mode in ("eager", "graphs"):
                    models[mode].zero_grad()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    pipes[mode].step(x, y)
                    torch.cuda.synchronize()
                    times[mode].append(time.perf_counter() - t0)
            worst = max(float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)))
                        for a, b in zip(_grads(models["graphs"]), _grads(models["eager"])))
            native = pipes["graphs"].graphs.native_runs
            if worst > 1e-4:
                bad.append(f"{name}/{schedule}: gradients differ from eager by {worst:.2e} (relative)")
            if native < steps:
                bad.append(f"{name}/{schedule}: only {native} of {steps + 1} runs were native")
            e, g = statistics.median(times["eager"]), statistics.median(times["graphs"])
            rows.append({"workload": name, "schedule": schedule, "eager_ms": 1e3 * e,
                         "graphs_ms": 1e3 * g, "speedup": e / g, "capture_s": capture_s,
                         "native_runs": native, "max_rel_grad_diff": worst})
            for p in pipes.values():
                p.close()
    detail = "; ".join(f"{r['workload']}/{r['schedule']}: eager/graphs {r['speedup']:.2f}x"
                       for r in rows)
    return {"status": "fail" if bad else "pass", "detail": "; ".join(bad) or detail, "rows": rows}
