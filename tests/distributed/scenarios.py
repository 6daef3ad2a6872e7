"""What each rank runs in the multi-process tests; every check is against the unsplit model.

Each function runs on every rank of a gloo group and returns plain numbers (errors against
the reference computed in the same process on a copy of the model taken before the pipeline
freed other ranks' stages).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import pipetrain

D = 6


class Embed(nn.Module):
    """x -> (h, c): a tuple crosses every stage boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return (self.lin(x), x[:, :3] * 1.0)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, hc):
        h, c = hc
        return (torch.tanh(self.lin(h)) + 0.1 * c.sum(-1, keepdim=True), c * 0.5)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, hc):
        return self.lin(hc[0])


def model(num_blocks: int, tied: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [Embed()] + [Block() for _ in range(num_blocks)] + [Head()]
    if tied:   # the output head shares the embedding's weight (an LM's tied embedding)
        layers[-1].lin.weight = layers[0].lin.weight
    return nn.Sequential(*layers).double()


def mse(out, y):
    return ((out - y) ** 2).mean()


def masked(out, target):
    """Token-level: (sum over real rows, how many)."""
    mask = target["mask"]
    return (((out - target["y"]) ** 2).sum(-1) * mask).sum(), mask.sum()


def batch(n: int, seed: int, token: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = torch.randn(n, D, generator=g, dtype=torch.float64)
    if token:
        mask = (torch.rand(n, generator=g) < 0.6).double()
        mask[0] = 1.0
        return x, {"y": y, "mask": mask}
    return x, y


def _names(model_: nn.Module) -> dict:
    out = {}
    for name, p in model_.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), name)
    return out


def train(schedule: str, p: int, m: int, tied: bool = False, clip: bool = False,
          token: bool = False, data_parallel=None, sizes=(8, 11), num_chunks=None,
          wire: str = "auto") -> dict:
    """Steps with changing batch sizes; max |loss - ref| and |grad - ref| per step."""
    import torch.distributed as dist
    v = 2 if schedule == "interleaved-1f1b" else 1
    net = model(p * v + 1, tied)
    ref = copy.deepcopy(net)
    names = _names(net)
    loss_fn = masked if token else mse
    pipe = pipetrain.Pipeline(net, num_devices=p, schedule=schedule, num_microbatches=m,
                              loss_fn=loss_fn, data_parallel=data_parallel, timeout=30,
                              num_chunks=num_chunks, wire=wire)
    w = data_parallel or 1
    ref_params = dict(ref.named_parameters())
    errs = []
    for step, n in enumerate(sizes):
        x, y = batch(n * w, step, token)
        lo, hi = pipe.dp_rank * n, (pipe.dp_rank + 1) * n
        mine_x = x[lo:hi]
        mine_y = {k: t[lo:hi] for k, t in y.items()} if token else y[lo:hi]
        loss = pipe.step(mine_x, mine_y)
        ref.zero_grad()
        out = ref(x)
        if token:
            s, c = masked(out, y)
            ref_loss = s / c
        else:
            ref_loss = mse(out, y)
        ref_loss.backward()
        err = {"loss": abs(float(loss) - float(ref_loss.detach()))}
        if clip:
            total = pipe.clip_grad_norm_(0.05)
            ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            err["norm"] = abs(float(total) - float(ref_total))
        g = 0.0
        count = 0
        for prm in pipe.parameters():
            rp = ref_params[names[id(prm)]] if id(prm) in names else None
            assert rp is not None, "a local parameter has no name in the model"
            g = max(g, float((prm.grad - rp.grad).abs().max()))
            count += 1
        err["grad"], err["params"] = g, count
        errs.append(err)
        for prm in pipe.parameters():
            prm.grad = None
    wires = sorted({type(st).__name__ for st in pipe.dist.runner.streams.values()})
    pipe.close()
    return {"errs": errs, "pp_rank": pipe.pp_rank, "dp_rank": pipe.dp_rank,
            "world": dist.get_world_size(), "wires": wires}


def fail_in_stage(p: int, bad_rank: int, wire: str = "auto") -> dict:
    """A stage raises on ``bad_rank``: every rank gets a PipelineError naming the origin."""
    import time
    net = model(p + 1, False)
    rank = __import__("torch.distributed", fromlist=["x"]).get_rank()
    if rank == bad_rank:
        block = net[1 + rank] if rank < p else net[-1]

        def boom(*_):
            raise ValueError("boom in a stage")
        block.register_forward_pre_hook(boom)
    pipe = pipetrain.Pipeline(net, num_devices=p, schedule="1f1b", num_microbatches=4,
                              loss_fn=mse, timeout=20, wire=wire)
    x, y = batch(8, 0, False)
    t0 = time.monotonic()
    try:
        pipe.step(x, y)
    except pipetrain.PipelineError as err:
        return {"error": str(err), "seconds": time.monotonic() - t0}
    finally:
        pipe.close()
    return {"error": None, "seconds": time.monotonic() - t0}


def disagree(p: int) -> dict:
    """Rank 1 builds a different m: construction fails on every rank, naming rank 1."""
    import torch.distributed as dist
    net = model(p + 1, False)
    m = 4 if dist.get_rank() != 1 else 2
    try:
        pipetrain.Pipeline(net, num_devices=p, schedule="1f1b", num_microbatches=m, loss_fn=mse)
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def resume(phase: str, p: int, path: str, steps: int = 2) -> dict:
    """``save``: 2 steps with Adam, checkpoint, ``steps`` more (their losses returned).
    ``load``: a fresh model (other seed) and optimizer, load, the same ``steps`` steps."""
    import torch.distributed as dist
    torch.manual_seed(0 if phase == "save" else 123)
    net = model(5, False)
    if phase == "load":
        with torch.no_grad():
            for prm in net.parameters():
                prm.add_(1.0)           # anything but the saved weights
    pipe = pipetrain.Pipeline(net, num_devices=p, schedule="1f1b", num_microbatches=4,
                              loss_fn=mse, timeout=30)
    opt = torch.optim.Adam(pipe.parameters(), lr=0.01)

    def one(step):
        opt.zero_grad()
        x, y = batch(8, step, False)
        loss = pipe.step(x, y)
        opt.step()
        return float(loss)

    if phase == "save":
        for s in range(2):
            one(s)
        pipetrain.save_checkpoint(pipe, path, opt)
    else:
        pipetrain.load_checkpoint(pipe, path, opt)
    losses = [one(2 + s) for s in range(steps)]
    pipe.close()
    return {"losses": losses, "rank": dist.get_rank()}


def evaluate(p: int, schedule: str = "1f1b", token: bool = False) -> dict:
    """``pipe.eval`` (other batch size than training) against the unsplit model's forward."""
    import torch.distributed as dist
    v = 2 if schedule == "interleaved-1f1b" else 1
    net = model(p * v + 1, False)
    ref = copy.deepcopy(net)
    pipe = pipetrain.Pipeline(net, num_devices=p, schedule=schedule, num_microbatches=2 * p,
                              loss_fn=masked if token else mse, timeout=30)
    x, y = batch(4 * p, 0, token)
    pipe.step(x, y)
    x, y = batch(2 * p + 3, 1, token)       # another batch size, uneven micro-batches
    out, loss = pipe.eval(x, y)
    with torch.no_grad():
        ref_out = ref(x)
        ref_loss = (lambda sc: sc[0] / sc[1])(masked(ref_out, y)) if token else mse(ref_out, y)
    only = pipe.eval(x)
    res = {"loss": abs(float(loss) - float(ref_loss)), "rank": dist.get_rank(),
           "out": None if out is None else float((out - ref_out).abs().max()),
           "only": None if only is None else float((only - ref_out).abs().max())}
    pipe.close()
    return res


def bad_schedule(p: int) -> dict:
    """A schedule that cannot run this m fails at construction on every rank (no hang)."""
    net = model(2 * p + 1, False)
    try:
        pipetrain.Pipeline(net, num_devices=p, schedule="interleaved-1f1b", num_microbatches=p + 1,
                           loss_fn=mse)
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def nonfinite(p: int) -> dict:
    """An infinite gradient on rank 0 only: every rank sees found_inf and commits nothing."""
    import torch.distributed as dist
    net = model(p + 1, False)
    pipe = pipetrain.Pipeline(net, num_devices=p, schedule="1f1b", num_microbatches=2,
                              loss_fn=mse, timeout=30)
    if dist.get_rank() == 0:
        first = pipe.parameters()[0]
        first.register_hook(lambda g: g * float("inf"))
    x, y = batch(4, 0, False)
    pipe.step(x, y)
    out = {"found_inf": pipe.found_inf,
           "committed": any(prm.grad is not None for prm in pipe.parameters())}
    pipe.close()
    return out


def meta_init(p: int) -> dict:
    """A model built on the meta device: each rank materializes only its own stages (by
    ``init_fn``), the others stay meta; with a deterministic init_fn the pipeline then equals
    the unsplit model initialized the same way."""
    with torch.device("meta"):
        net = model(p + 1, False).float()
    ref = model(p + 1, False).float()

    def init_fn(layer):
        torch.manual_seed(7)
        for prm in layer.parameters():
            with torch.no_grad():
                prm.copy_(torch.randn(prm.shape) * 0.3)

    for layer in ref:
        init_fn(layer)
    pipe = pipetrain.Pipeline(net, num_devices=p, schedule="1f1b", num_microbatches=2,
                              loss_fn=mse, init_fn=init_fn, timeout=30)
    local = {id(q) for q in pipe.parameters()}
    x, y = batch(4, 0, False)
    loss = pipe.step(x.float(), y.float())
    ref_loss = mse(ref(x.float()), y.float())
    res = {"local_meta": any(q.is_meta for q in pipe.parameters()),
           "others_meta": all(q.is_meta for q in net.parameters() if id(q) not in local),
           "num_local": len(local),
           "loss": abs(float(loss) - float(ref_loss.detach()))}
    pipe.close()
    return res


def loss_scaled(p: int, poison_rank: int, data_parallel=None) -> dict:
    """``loss_scale`` with a growth every 2 clean steps; step 1 has an infinite gradient on
    ``poison_rank`` only. Per step: found_inf, the scale, whether optimizer_step stepped, and
    on clean steps the error of loss and gradients against the unsplit model (unscaled)."""
    import torch.distributed as dist
    net = model(p + 1, False)
    ref = copy.deepcopy(net)
    names = _names(net)
    pipe = pipetrain.Pipeline(net, num_devices=p, schedule="1f1b", num_microbatches=3,
                              loss_fn=mse, data_parallel=data_parallel, timeout=30,
                              loss_scale=pipetrain.LossScaler(growth_interval=2))
    opt = torch.optim.SGD(pipe.parameters(), lr=0.0)    # lr 0: the reference stays valid
    poison = {"on": False}
    if dist.get_rank() == poison_rank:
        pipe.parameters()[0].register_hook(lambda g: g * float("inf") if poison["on"] else g)
    w = data_parallel or 1
    ref_params = dict(ref.named_parameters())
    steps = []
    for step in range(4):
        poison["on"] = step == 1
        x, y = batch(6 * w, step, False)
        lo, hi = pipe.dp_rank * 6, (pipe.dp_rank + 1) * 6
        loss = pipe.step(x[lo:hi], y[lo:hi])
        rec = {"found_inf": pipe.found_inf, "scale": pipe.loss_scale,
               "stepped": pipe.optimizer_step(opt),
               "committed": any(q.grad is not None for q in pipe.parameters())}
        ref.zero_grad()
        ref_loss = mse(ref(x), y)
        ref_loss.backward()
        rec["loss"] = abs(float(loss) - float(ref_loss.detach()))
        if rec["committed"]:
            rec["grad"] = max(float((q.grad - ref_params[names[id(q)]].grad).abs().max())
                              for q in pipe.parameters())
        steps.append(rec)
        for q in pipe.parameters():
            q.grad = None
    pipe.close()
    return {"steps": steps, "rank": dist.get_rank()}
