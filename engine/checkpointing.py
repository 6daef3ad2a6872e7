"""Saving and loading a pipeline's model and optimizer, sharded by stage (torch.distributed.checkpoint).

Not to be confused with :mod:`pipetrain.checkpoint` (activation re-materialization).

Keys name tensors as the unsplit ``nn.Sequential`` does, so they do not depend on how the
model is split::

    model/<layer index>.<name in the layer>        e.g. model/3.lin.weight
    optim/<first name of the parameter>/<state>    e.g. optim/3.lin.weight/exp_avg
    optim_group/<first name of the parameter>      its param_group's hyper-parameters
    loss_scaler/scale, loss_scaler/growth_tracker  (Pipeline(loss_scale=...))

Each rank writes the tensors of its own stages (replicas hold equal copies; the checkpoint
planner writes one), so a checkpoint saved with p stages loads into a pipeline with any
other p or number of replicas, or into the plain model (``load_checkpoint(model, path)``).
Optimizer state is keyed by parameter, so it loads into a new optimizer over the new
split's parameters. So are the hyper-parameters: a param_group (lr, betas, weight_decay, eps,
momentum ..., and what an LR scheduler adds: initial_lr ...) is per stage, and a new split
groups parameters differently, so each parameter carries the hyper-parameters of the group
it was in (every key but ``params``, pickled into a uint8 tensor; equal copies cost bytes,
not a format); on load every group of the new optimizer takes the values its parameters
carry, as ``torch.optim.Optimizer.load_state_dict`` does for a whole optimizer. Parameters of
one new group that carry different values (say a decay and a no-decay group merged) are a
ValueError naming both. The optimizer is ``optimizer=`` (one or a list) or, by default, the
stages' own (``Pipeline(..., optimizer=factory)``).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pickle

import torch
from torch import nn

__all__ = ["state_dict", "load_state_dict", "save_checkpoint", "load_checkpoint"]


def _named(obj: Any) -> Tuple[Dict[str, torch.Tensor], Dict[int, str]]:
    """(model tensors by key, first key of each parameter by id) of a pipeline's local stages
    or of a plain module."""
    tensors: Dict[str, torch.Tensor] = {}
    first: Dict[int, str] = {}
    if isinstance(obj, nn.Module):
        items = obj.state_dict(keep_vars=True).items()
    else:
        order = obj.plan.graph.topological_order()
        items = []
        base = 0
        for i, k in enumerate(order):
            stage = obj.stages[k]
            if stage is not None:
                for j, layer in enumerate(stage.layers):
                    items += [(f"{base + j}.{n}", t) for n, t in
                              layer.state_dict(keep_vars=True).items()]
            base += obj.balance[i]
    for name, t in items:
        tensors[name] = t
        if isinstance(t, nn.Parameter):
            first.setdefault(id(t), name)
    return tensors, first


def _optimizers(obj: Any, optimizer: Any) -> list:
    """``optimizer`` (one or a list), else a pipeline's stage optimizers, else none."""
    if optimizer is not None:
        return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    stages = getattr(obj, "stages", None) or []
    return [st.optimizer for st in stages if st is not None and getattr(st, "optimizer", None) is not None]


def _pack(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
                            dtype=torch.uint8)


def _unpack(t: torch.Tensor) -> Any:
    return pickle.loads(t.cpu().numpy().tobytes())


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def state_dict(obj: Any, optimizer: Any = None) -> Dict[str, torch.Tensor]:
    """This rank's share: ``model/...`` tensors of its stages (the live tensors, detached) and
    ``optim/...`` state of ``optimizer`` (or ``obj.optimizer``) for their parameters."""
    tensors, first = _named(obj)
    out = {f"model/{k}": t.detach() for k, t in tensors.items()}
    for opt in _optimizers(obj, optimizer):
        for p, st in opt.state.items():
            name = first.get(id(p))
            if name is None:
                continue
            for key, value in st.items():
                out[f"optim/{name}/{key}"] = value if isinstance(value, torch.Tensor) \
                    else torch.tensor(value)
        for group in opt.param_groups:
            packed = _pack(_hyper(group))
            for p in group["params"]:
                if id(p) in first:
                    out[f"optim_group/{first[id(p)]}"] = packed
    scaler = getattr(obj, "scaler", None)
    if scaler is not None:
        out["loss_scaler/scale"] = torch.tensor(scaler.scale, dtype=torch.float64)
        out["loss_scaler/growth_tracker"] = torch.tensor(scaler.growth_tracker, dtype=torch.int64)
    return out


def load_state_dict(obj: Any, state: Dict[str, torch.Tensor], optimizer: Any = None,
                    strict: bool = True) -> None:
    """Copy ``state`` (keys as :func:`state_dict`) into the local stages (or module) and the
    optimizer's state. ``strict``: every local tensor must be present (KeyError naming it)."""
    tensors, first = _named(obj)
    with torch.no_grad():
        for k, t in tensors.items():
            src = state.get(f"model/{k}")
            if src is None:
                if strict:
                    raise KeyError(f"the checkpoint has no tensor model/{k}")
                continue
            if src is not t.detach():
                t.detach().copy_(src)
    scaler = getattr(obj, "scaler", None)
    if scaler is not None and "loss_scaler/scale" in state:
        scaler.load_state_dict({"scale": float(state["loss_scaler/scale"]),
                                "growth_tracker": int(state["loss_scaler/growth_tracker"])})
    for opt in _optimizers(obj, optimizer):
        _load_optimizer(opt, first, state)


def _load_optimizer(opt: Any, first: Dict[int, str], state: Dict[str, Any]) -> None:
    by_name = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in first:
                by_name[first[id(p)]] = p
    for key, value in state.items():
        if not key.startswith("optim/"):
            continue
        name, what = key[len("optim/"):].rsplit("/", 1)
        p = by_name.get(name)
        if p is not None:
            opt.state[p][what] = value.clone() if what == "step" else value.to(p.device, copy=True)
    for i, group in enumerate(opt.param_groups):
        chosen, source = None, None
        for p in group["params"]:
            name = first.get(id(p))
            raw = state.get(f"optim_group/{name}") if name is not None else None
            if raw is None:
                continue
            hyper = _unpack(raw) if isinstance(raw, torch.Tensor) else raw
            if chosen is None:
                chosen, source = hyper, name
            elif hyper != chosen:
                diff = sorted(k for k in set(hyper) | set(chosen) if hyper.get(k) != chosen.get(k))
                raise ValueError(f"param_group {i} of the optimizer holds {source} and {name}, "
                                 f"which were in groups with different {diff} when saved; "
                                 "group them as they were (or load without the optimizer)")
        if chosen is not None:
            group.update(chosen)


def save_checkpoint(obj: Any, path: Any, optimizer: Any = None) -> None:
    """Write the model (and optimizer) of a pipeline — every rank calls it with its own
    share — or of a plain module to the directory ``path``."""
    import torch.distributed.checkpoint as dcp
    dcp.save(state_dict(obj, optimizer), checkpoint_id=str(path))


def load_checkpoint(obj: Any, path: Any, optimizer: Any = None) -> None:
    """Load what :func:`save_checkpoint` wrote into a pipeline (any split, every rank calls
    it) or a plain module; the optimizer state of the local parameters too, if given."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # The model part (and the loss scaler's, when both sides have one).
    target = {k: t.detach().clone() for k, t in state_dict(obj, []).items()
              if k.startswith("model/") or k in meta}
    opts = _optimizers(obj, optimizer)
    if opts:
        _, first = _named(obj)
        names = {first[id(p)] for opt in opts for g in opt.param_groups for p in g["params"]
                 if id(p) in first}
        for key, md in meta.items():
            if not isinstance(md, TensorStorageMetadata):
                continue
            if (key.startswith("optim/") and key[len("optim/"):].rsplit("/", 1)[0] in names) \
                    or (key.startswith("optim_group/") and key[len("optim_group/"):] in names):
                target[key] = torch.empty(md.size, dtype=md.properties.dtype)
    dcp.load(target, checkpoint_id=str(path))
    load_state_dict(obj, target, opts)
