"""Saving and loading a pipeline's model and optimizer, sharded by stage (torch.distributed.checkpoint).

Not to be confused with :mod:`pipetrain.checkpoint` (activation re-materialization).

Keys name tensors as the unsplit ``nn.Sequential`` does, so they do not depend on how the
model is split::

    model/<layer index>.<name in the layer>        e.g. model/3.lin.weight
    optim/<first name of the parameter>/<state>    e.g. optim/3.lin.weight/exp_avg

Each rank writes the tensors of its own stages (replicas hold equal copies; the checkpoint
planner writes one), so a checkpoint saved with p stages loads into a pipeline with any
other p or number of replicas, or into the plain model (``load_checkpoint(model, path)``).
Optimizer state is keyed by parameter, so it loads into a new optimizer over the new
split's parameters; hyper-parameters (learning rate ...) are the new optimizer's own.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

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


def _optimizer(obj: Any, optimizer: Any) -> Any:
    return optimizer if optimizer is not None else getattr(obj, "optimizer", None)


def state_dict(obj: Any, optimizer: Any = None) -> Dict[str, torch.Tensor]:
    """This rank's share: ``model/...`` tensors of its stages (the live tensors, detached) and
    ``optim/...`` state of ``optimizer`` (or ``obj.optimizer``) for their parameters."""
    tensors, first = _named(obj)
    out = {f"model/{k}": t.detach() for k, t in tensors.items()}
    opt = _optimizer(obj, optimizer)
    if opt is not None:
        for p, st in opt.state.items():
            name = first.get(id(p))
            if name is None:
                continue
            for key, value in st.items():
                out[f"optim/{name}/{key}"] = value if isinstance(value, torch.Tensor) \
                    else torch.tensor(value)
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
    opt = _optimizer(obj, optimizer)
    if opt is None:
        return
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

    target = {k: t.detach().clone() for k, t in state_dict(obj).items()}   # model part
    opt = _optimizer(obj, optimizer)
    if opt is not None:
        _, first = _named(obj)
        names = {first[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in first}
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        for key, md in meta.items():
            if key.startswith("optim/") and isinstance(md, TensorStorageMetadata) \
                    and key[len("optim/"):].rsplit("/", 1)[0] in names:
                target[key] = torch.empty(md.size, dtype=md.properties.dtype)
    dcp.load(target, checkpoint_id=str(path))
    load_state_dict(obj, target, optimizer)
