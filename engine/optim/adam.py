"""Adam and AdamW over flat buffers: torch.optim.Adam/AdamW semantics, one fused kernel per bucket.

Per element (fp32 maths, fp64 for float64 parameters; ``t`` the step count after this update)::

    g = -grad if maximize else grad
    Adam:  g = g + wd*w            AdamW: w = w * (1 - lr*wd)
    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    w = w - (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

and, fused into the same pass by :meth:`step_and_predict`, XPipe's prediction
``w_hat = w - s*lr*mhat/(sqrt(vhat)+eps)`` with the new bias-corrected moments.
State per parameter is torch's: ``step`` (0-d fp32 CPU tensor), ``exp_avg``, ``exp_avg_sq``
(the parameter's shape; fp32, or fp64 for float64 parameters), plus ``master_param`` (fp32)
with ``master_weights=True`` and a bf16/fp16 parameter.
"""

from __future__ import annotations

import torch

from .base import FusedOptimizer, fits, kernels_for, state_dtype

__all__ = ["Adam", "AdamW"]


class Adam(FusedOptimizer):
    """``torch.optim.Adam`` with fused CPU/CUDA kernels, flat state and weight prediction.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay, maximize: as torch.optim.Adam.
        decoupled_weight_decay: AdamW's decay (torch's flag of the same name).
        master_weights: keep fp32 master weights for bf16/fp16 parameters (the update is
            applied to them; the parameter is their rounding). State is fp32 regardless.
            A no-op for fp32 and fp64 parameters (they are their own master copy); float64
            parameters get fp64 state and fp64 maths, as torch.optim.
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

    @staticmethod
    def _kernels(device, dtype):
        # Resolved through this module's name, which the dispatch tests patch.
        return kernels_for(device, dtype)

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
        st["exp_avg"] = torch.zeros(p.shape, dtype=state_dtype(p.dtype), device=p.device)
        st["exp_avg_sq"] = torch.zeros(p.shape, dtype=state_dtype(p.dtype), device=p.device)
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
        kernels_for(b.device, b.dtype).adam_step(
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
        kernels_for(p.device, p.dtype).adam_step(
            p.data.view(-1), p.grad.contiguous().view(-1), st["exp_avg"].view(-1),
            st["exp_avg_sq"].view(-1), **self._kernel_args(group, t),
            master=None if master is None else master.view(-1),
            predict_out=None if out is None else out.view(-1),
            predict_s=s if out is not None else 0.0)
        st["step"].fill_(t)

    def _predict_flat(self, group, unit, flat, out, s):
        b = unit.bucket
        w = flat.get("master_param", b.data)
        kernels_for(b.device, b.dtype).adam_predict(w, flat["exp_avg"], flat["exp_avg_sq"], out, s=s,
                                           **self._hyper(group), step=int(flat["step"].item()))

    def _predict_param(self, group, p, out, s):
        st = self.state.get(p)
        if not st or "exp_avg" not in st:
            out.copy_(p.detach())  # no state yet: nothing to extrapolate
            return
        w = st.get("master_param", p.detach())
        kernels_for(p.device, p.dtype).adam_predict(
            w.reshape(-1), st["exp_avg"].reshape(-1), st["exp_avg_sq"].reshape(-1), out.view(-1),
            s=s, **self._hyper(group), step=int(st["step"].item()))

    # --- loose CPU parameters: one list kernel call per dtype combination -----------------
    def _update_list(self, group, params, outs, s, validate):
        from pipetrain import _cpu_kernels as K
        calls: dict[tuple, tuple[list, ...]] = {}
        for p in params:
            g = p.grad
            if g.is_sparse:
                raise ValueError("Adam does not support sparse gradients")
            st = self.state[p]
            if not st:
                self._init_state(group, p, st)
                validate = True  # new state: check it once, with everything else
            n = p.numel()
            if not g.is_contiguous():
                g = g.contiguous()
            m, v, step = st["exp_avg"], st["exp_avg_sq"], st["step"]
            master = st.get("master_param")
            # Every call: what p.data / p.grad / state replacement could have changed.
            if not (fits(n, p.dtype, p, g) and fits(n, state_dtype(p.dtype), m, v)
                    and fits(n, torch.float32, master)):
                raise ValueError("Adam: a parameter, its gradient and its state must be "
                                 "contiguous with the same number of elements and the "
                                 "dtypes the optimizer made")
            key = (p.dtype, g.dtype, step.dtype, master is None)
            c = calls.get(key)
            if c is None:
                c = calls[key] = ([], [], [], [], [], [], [])
            c[0].append(p)
            c[1].append(g)
            c[2].append(m)
            c[3].append(v)
            c[4].append(step)
            c[5].append(master)
            if outs is not None:
                c[6].append(outs.checked(p, n))
        args = self._kernel_args(group, 1)
        del args["step"]
        for (_, _, _, no_master), (ps, gs, ms, vs, steps, masters, os_) in calls.items():
            tensors = (ps, gs, ms, vs, masters if not no_master else None, os_ or None)
            if validate:  # the full checks want flat views
                tensors = tuple(None if ts is None else [t.view(-1) for t in ts]
                                for ts in tensors)
            ps, gs, ms, vs, masters, os_ = tensors
            K.adam_step_multi(ps, gs, ms, vs, **args, step_tensors=steps, masters=masters,
                              predict_outs=os_, predict_s=s if os_ else 0.0, validate=validate)

    def _predict_list(self, group, params, outs, s, validate):
        from pipetrain import _cpu_kernels as K
        calls: dict[tuple, tuple[list, ...]] = {}
        for p in params:
            st = self.state.get(p)
            n = p.numel()
            out = outs.checked(p, n)
            if not st or "exp_avg" not in st:
                out.copy_(p.detach())  # no state yet: nothing to extrapolate
                continue
            w = st.get("master_param", p)
            m, v, step = st["exp_avg"], st["exp_avg_sq"], st["step"]
            if not (fits(n, w.dtype, w) and fits(n, state_dtype(p.dtype), m, v)
                    and fits(n, p.dtype, out)):
                raise ValueError("Adam: a parameter and its state must be contiguous with the "
                                 "same number of elements and the dtypes the optimizer made")
            c = calls.setdefault((w.dtype, out.dtype, step.dtype), ([], [], [], [], []))
            for lst, t in zip(c, (w, m, v, out, step)):
                lst.append(t)
        for ws, ms, vs, os_, steps in calls.values():
            if validate:
                ws, ms, vs, os_ = ([t.view(-1) for t in ts] for ts in (ws, ms, vs, os_))
            K.adam_predict_multi(ws, ms, vs, os_, s=s, **self._hyper(group), step_tensors=steps,
                                 validate=validate)


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
