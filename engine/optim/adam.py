"""Adam and AdamW over flat buffers: torch.optim.Adam/AdamW semantics, one fused kernel per bucket.

Per element (fp32; ``t`` the step count after this update)::

    g = -grad if maximize else grad
    Adam:  g = g + wd*w            AdamW: w = w * (1 - lr*wd)
    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    w = w - (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

and, fused into the same pass by :meth:`step_and_predict`, XPipe's prediction
``w_hat = w - s*lr*mhat/(sqrt(vhat)+eps)`` with the new bias-corrected moments.
State per parameter is torch's: ``step`` (0-d fp32 CPU tensor), ``exp_avg``, ``exp_avg_sq``
(fp32, the parameter's shape), plus ``master_param`` (fp32) with ``master_weights=True``
and a bf16/fp16 parameter.
"""

from __future__ import annotations

import torch

from .base import FusedOptimizer, kernels_for

__all__ = ["Adam", "AdamW"]


class Adam(FusedOptimizer):
    """``torch.optim.Adam`` with fused CPU/CUDA kernels, flat state and weight prediction.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay, maximize: as torch.optim.Adam.
        decoupled_weight_decay: AdamW's decay (torch's flag of the same name).
        master_weights: keep fp32 master weights for bf16/fp16 parameters (the update is
            applied to them; the parameter is their rounding). State is fp32 regardless.
        skip_nonfinite: skip a step whose gradients contain inf/NaN.
        amsgrad, capturable, differentiable: must be False (not supported: ValueError).
        foreach, fused: accepted for compatibility and ignored (always fused).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach=None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused=None, decoupled_weight_decay: bool = False, master_weights: bool = False,
                 skip_nonfinite: bool = False):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= float(betas[0]) < 1.0 or not 0.0 <= float(betas[1]) < 1.0:
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay,
                        master_weights=master_weights)
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite)

    _DECOUPLED = False

    def _group_extras(self) -> dict:
        return {"master_weights": False, "decoupled_weight_decay": self._DECOUPLED}

    def _hyper(self, group: dict) -> dict:
        b1, b2 = group["betas"]
        return dict(lr=float(group["lr"]), beta1=float(b1), beta2=float(b2),
                    eps=float(group["eps"]))

    def _state_keys(self, group, dtype):
        keys = ["exp_avg", "exp_avg_sq"]
        if self._master(group, dtype):
            keys.append("master_param")
        return keys

    def _init_state(self, group, p, st):
        st["step"] = torch.tensor(0.0)
        st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if self._master(group, p.dtype):
            st["master_param"] = p.detach().float().clone()

    def _init_flat_extra(self, group, b, flat, states):
        value = float(states[0]["step"]) if states and "step" in states[0] else 0.0
        step = torch.tensor(value)
        flat["step"] = step
        for p in b.params:
            self.state[p]["step"] = step  # one shared tensor; state_dict() clones per param

    def _kernel_args(self, group, step: int) -> dict:
        return dict(**self._hyper(group), weight_decay=float(group["weight_decay"]),
                    decoupled=bool(group.get("decoupled_weight_decay", self._DECOUPLED)),
                    maximize=bool(group["maximize"]), step=step)

    def _update_flat(self, group, unit, outs, s):
        b = unit.bucket
        flat = self._flat[id(b)]
        t = int(flat["step"].item()) + 1
        out = outs.flat(b) if outs is not None else None
        kernels_for(b.device).adam_step(
            b.data, b.grad, flat["exp_avg"], flat["exp_avg_sq"], **self._kernel_args(group, t),
            master=flat.get("master_param"), predict_out=out,
            predict_s=s if out is not None else 0.0)
        flat["step"].fill_(t)
        if outs is not None and out is None:
            for p in b.params:
                self._predict_param(group, p, outs.of(p), s)

    def _update_param(self, group, p, outs, s):
        if p.grad.is_sparse:
            raise ValueError("Adam does not support sparse gradients")
        st = self._per_param_state(group, p)
        t = int(st["step"].item()) + 1
        out = outs.of(p) if outs is not None else None
        master = st.get("master_param")
        kernels_for(p.device).adam_step(
            p.data.view(-1), p.grad.contiguous().view(-1), st["exp_avg"].view(-1),
            st["exp_avg_sq"].view(-1), **self._kernel_args(group, t),
            master=None if master is None else master.view(-1),
            predict_out=None if out is None else out.view(-1),
            predict_s=s if out is not None else 0.0)
        st["step"].fill_(t)

    def _predict_flat(self, group, unit, flat, out, s):
        b = unit.bucket
        w = flat.get("master_param", b.data)
        kernels_for(b.device).adam_predict(w, flat["exp_avg"], flat["exp_avg_sq"], out, s=s,
                                           **self._hyper(group), step=int(flat["step"].item()))

    def _predict_param(self, group, p, out, s):
        st = self.state.get(p)
        if not st or "exp_avg" not in st:
            out.copy_(p.detach())  # no state yet: nothing to extrapolate
            return
        w = st.get("master_param", p.detach())
        kernels_for(p.device).adam_predict(
            w.reshape(-1), st["exp_avg"].reshape(-1), st["exp_avg_sq"].reshape(-1), out.view(-1),
            s=s, **self._hyper(group), step=int(st["step"].item()))


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2). Same options
    as :class:`Adam`."""

    _DECOUPLED = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach=None, capturable: bool = False, differentiable: bool = False, fused=None,
                 master_weights: bool = False, skip_nonfinite: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, master_weights=master_weights,
                         skip_nonfinite=skip_nonfinite)
