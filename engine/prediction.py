"""Weight prediction (SpecTrain, XPipe, 2BW-predict): W_hat = W(v) - s * direction(state(v)).

The direction is read from an optimizer's state in torch's format, which both
``torch.optim`` and :mod:`pipetrain.optim` keep (``optimizer.state[param]``):

- SGD with momentum (SpecTrain): ``lr * momentum_buffer``;
- Adam / AdamW (XPipe): ``lr * m_hat / (sqrt(v_hat) + eps)``, ``m_hat = exp_avg / (1 -
  beta1^c)``, ``v_hat = exp_avg_sq / (1 - beta2^c)``, c = ``step`` of that state.

No state (before the first update) means a zero direction: W_hat = W(v). AdamW's decoupled
decay and Nesterov are not extrapolated (the papers' formulas as written; the reference
trainer :mod:`pipetrain.async_reference` does the same).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["check_optimizer", "snapshot_state", "live_state", "apply_prediction"]

_NEEDS = {"spectrain": "SGD with momentum > 0", "xpipe": "Adam or AdamW",
          "2bw-predict": "SGD with momentum > 0, Adam or AdamW"}


def check_optimizer(schedule: str, opt: Any) -> None:
    """Raise ValueError unless ``schedule`` can predict from ``opt``'s state."""
    if schedule not in _NEEDS:
        return
    groups = getattr(opt, "param_groups", None)
    if not groups or not hasattr(opt, "state"):
        raise ValueError(f"{schedule} predicts weights from the optimizer state, so it needs "
                         f"{_NEEDS[schedule]} (torch.optim or pipetrain.optim); got {type(opt).__name__}")
    for g in groups:
        is_adam = "betas" in g and "eps" in g
        is_sgd = "momentum" in g and not is_adam and g["momentum"] > 0
        ok = {"spectrain": is_sgd, "xpipe": is_adam, "2bw-predict": is_sgd or is_adam}[schedule]
        if not ok or g.get("amsgrad") or g.get("maximize") or g.get("nesterov"):
            raise ValueError(f"{schedule} needs {_NEEDS[schedule]} (no amsgrad, maximize or "
                             f"nesterov); got {type(opt).__name__} with {sorted(k for k in g if k != 'params')}")


_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "step")


def live_state(opt: Any, params: Sequence[torch.Tensor]) -> List[Dict[str, Any]]:
    """The optimizer's current per-parameter state (references, not copies)."""
    return [{k: v for k, v in opt.state.get(p, {}).items() if k in _KEYS} for p in params]


def snapshot_state(opt: Any, params: Sequence[torch.Tensor]) -> List[Dict[str, Any]]:
    """A copy of the per-parameter state the prediction reads (the state of this version)."""
    return [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            for st in live_state(opt, params)]


@torch.no_grad()
def apply_prediction(params: Sequence[torch.Tensor], state: List[Dict[str, Any]],
                     groups: List[Dict[str, Any]], s: int) -> None:
    """In place on ``params`` (views of the prediction buffer, holding W(v)):
    ``p -= s * direction``; ``groups[i]`` is param i's param group."""
    for p, st, g in zip(params, state, groups):
        if not st:
            continue            # no update yet: the direction is zero
        if "exp_avg" in st:
            b1, b2 = g["betas"]
            c = int(st["step"])
            denom = (st["exp_avg_sq"] / (1 - b2 ** c)).sqrt_().add_(g["eps"])
            p.addcdiv_(st["exp_avg"], denom, value=-s * g["lr"] / (1 - b1 ** c))
        elif st.get("momentum_buffer") is not None:
            p.add_(st["momentum_buffer"], alpha=-s * g["lr"])


def group_of(opt: Any, params: Sequence[torch.Tensor]) -> List[Dict[str, Any]]:
    """The param group of each parameter."""
    where = {id(q): g for g in opt.param_groups for q in g["params"]}
    return [where[id(p)] for p in params]
