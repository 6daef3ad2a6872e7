"""What each rank runs in the multi-process tests of ``train()`` (asynchronous schedules and
the synchronous path): every number is checked against a reference computed in the same
process — :func:`pipetrain.async_reference.reference_train` (plain torch, one process) for
the asynchronous schedules, plain torch training of the unsplit model for the synchronous
ones — on a copy of the model taken before the pipeline freed other ranks' stages.

Each function returns plain numbers: per case, the largest loss and weight errors.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch import nn

import pipetrain
from pipetrain import async_reference as ref

FN = nn.functional.mse_loss
N = 8          # samples per mini-batch and replica


def stages(p: int, seed: int = 1) -> list:
    """One module per stage (what the reference trainer takes); fp64."""
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double() for _ in range(p - 1)] + \
        [nn.Linear(5, 2).double()]


def data(T: int, n: int, seed: int = 2) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64),
             torch.randn(n, 2, generator=g, dtype=torch.float64)) for _ in range(T)]


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.02),
    "fused-sgd": lambda ps: pipetrain.optim.SGD(ps, lr=0.1, momentum=0.9),
    "fused-adam": lambda ps: pipetrain.optim.Adam(ps, lr=0.02),
}


def replica_share(batch: tuple, m: int, w: int, r: int) -> tuple:
    """Replica r's mini-batch out of a combined one of w * N samples: for each micro-batch j,
    its slice of the combined micro-batch j, so that combined micro-batch j (``tensor_split``
    into m) is the union of the replicas' micro-batches j, which run on the same weight
    version. Needs N % m == 0."""
    c = N // m
    idx = torch.cat([torch.arange(j * w * c + r * c, j * w * c + (r + 1) * c) for j in range(m)])
    return tuple(t[idx] for t in batch)


def async_cases(cases: list, T: int = 4) -> list:
    """``cases``: (schedule, m, optimizer name[, minibatches_per_run]). Per case on this rank:
    max |loss - reference| over the mini-batches (every rank gets every loss) and max |w -
    reference| over its stages' weights. With ``data_parallel`` (world = w * p) the reference
    trains on the combined batches of the w replicas."""
    out = []
    for case in cases:
        name, m, opt = case[:3]
        per_run = case[3] if len(case) > 3 else None
        p = case[4] if len(case) > 4 else dist.get_world_size()
        w = dist.get_world_size() // p
        mods = stages(p)
        twin = copy.deepcopy(mods)
        combined = data(T, N * w)
        ref_data = combined[:per_run] if per_run else combined
        r_losses, r_weights = ref.reference_train(twin, ref_data, schedule=name,
                                                  num_microbatches=m, loss_fn=FN,
                                                  optimizer_factory=OPTIMIZERS[opt])
        pipe = pipetrain.Pipeline(nn.Sequential(*mods), num_devices=p, schedule=name,
                                  num_microbatches=m, loss_fn=FN, optimizer=OPTIMIZERS[opt],
                                  timeout=30, data_parallel=w if w > 1 else None)
        mine = [replica_share(b, m, w, pipe.dp_rank) for b in combined]
        if not pipe.dist.is_source and not pipe.dist.is_sink:
            mine = [(None, None)] * T          # a middle rank needs no data
        losses = [float(x) for x in pipe.train(mine, minibatches_per_run=per_run)]
        if per_run:      # the first run is the reference's T = per_run training
            losses = losses[:per_run]
        assert len(losses) == len(r_losses), (case, losses)
        err_w = max(float((mods[k].state_dict()[key] - val).abs().max())
                    for k in pipe.dist.local for key, val in r_weights[k].items()) \
            if not per_run else 0.0
        out.append({"case": case, "loss": max(abs(a - b) for a, b in zip(losses, r_losses)),
                    "weights": err_w, "stages": list(pipe.dist.local), "dp_rank": pipe.dp_rank,
                    "peak_buffers": pipe.stats().peak_buffers, "T": T, "p": p})
        pipe.close()
    return out


def sync_train(schedule: str, p: int, m: int, T: int = 3) -> dict:
    """Synchronous ``train()`` across processes (step, then each stage's optimizer) against
    the unsplit model trained by plain torch on the same batches (Adam)."""
    mods = stages(p)
    net = nn.Sequential(*copy.deepcopy(mods))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    batches = data(T, N)
    r_losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = FN(net(x), y)
        loss.backward()
        opt.step()
        r_losses.append(float(loss))
    pipe = pipetrain.Pipeline(nn.Sequential(*mods), num_devices=p, schedule=schedule,
                              num_microbatches=m, loss_fn=FN, timeout=30,
                              optimizer=OPTIMIZERS["adam"])
    losses = [float(x) for x in pipe.train(batches)]
    err_w = max(float((a - b).abs().max())
                for k in pipe.dist.local
                for a, b in zip(mods[k].parameters(), net[k].parameters()))
    pipe.close()
    return {"loss": max(abs(a - b) for a, b in zip(losses, r_losses)), "weights": err_w,
            "n": len(losses)}


def fail_in_forward(name: str, p: int, m: int, bad_rank: int, bad_k: int, T: int = 3) -> dict:
    """Stage ``bad_rank`` raises in the forward of global micro-batch ``bad_k``: every rank
    must raise a PipelineError naming the origin, within seconds."""
    mods = stages(p)
    if dist.get_rank() == bad_rank:
        calls = {"n": 0}

        def boom(*_):
            calls["n"] += 1
            if calls["n"] > bad_k:        # forwards run in micro-batch order on a stage
                raise ValueError("boom in a forward")
        mods[bad_rank % p].register_forward_pre_hook(boom)
    pipe = pipetrain.Pipeline(nn.Sequential(*mods), num_devices=p, schedule=name,
                              num_microbatches=m, loss_fn=FN, optimizer=OPTIMIZERS["adam"],
                              timeout=20)
    t0 = time.monotonic()
    res = {"error": None}
    try:
        list(pipe.train(data(T, N)))
    except pipetrain.PipelineError as err:
        res = {"error": str(err), "stage": err.stage, "microbatch": err.microbatch,
               "minibatch": err.minibatch, "action": err.action}
    res["seconds"] = time.monotonic() - t0
    # The pipeline refuses further runs, clearly (no hang).
    try:
        list(pipe.train(data(1, N)))
        res["again"] = None
    except Exception as err:  # noqa: BLE001
        res["again"] = f"{type(err).__name__}: {err}"
    pipe.close()
    return res


def disagree_on_count(name: str, p: int) -> dict:
    """Rank 0 passes one mini-batch fewer: every rank raises ValueError saying so."""
    pipe = pipetrain.Pipeline(nn.Sequential(*stages(p)), num_devices=p, schedule=name,
                              num_microbatches=2, loss_fn=FN, optimizer=OPTIMIZERS["sgd"],
                              timeout=20)
    T = 2 if dist.get_rank() == 0 else 3
    try:
        list(pipe.train(data(T, N)))
        return {"error": None}
    except ValueError as err:
        return {"error": str(err)}
    finally:
        pipe.close()


def tied_refused(name: str, p: int) -> dict:
    """Weights tied across pipeline devices: an asynchronous schedule refuses at construction."""
    mods = stages(p)
    mods[-1] = nn.Linear(5, 5).double()
    mods[-1].weight = mods[0][0].weight
    try:
        pipetrain.Pipeline(nn.Sequential(*mods), num_devices=p, schedule=name,
                           num_microbatches=2, loss_fn=FN, optimizer=OPTIMIZERS["sgd"])
        return {"error": None}
    except ValueError as err:
        return {"error": str(err)}
