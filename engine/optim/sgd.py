"""SGD (momentum, dampening, Nesterov, weight decay) over flat buffers: torch.optim.SGD semantics.

Per element (fp32 maths, fp64 for float64 parameters)::

    g = -grad if maximize else grad;  g = g + wd*w
    buf = g (first step) | momentum*buf + (1-dampening)*g
    d = g + momentum*buf (nesterov) | buf;   w = w - lr*d

and, fused into the same pass by :meth:`step_and_predict`, SpecTrain's prediction
``w_hat = w - s*lr*buf``. State per parameter is torch's ``momentum_buffer`` (fp32, the
parameter's shape, fp64 for float64 parameters; none when momentum == 0), plus
``master_param`` with ``master_weights=True`` and a bf16/fp16 parameter.
"""

from __future__ import annotations

import torch

from .base import FusedOptimizer, fits, kernels_for, state_dtype

__all__ = ["SGD"]


class SGD(FusedOptimizer):
    """``torch.optim.SGD`` with fused CPU/CUDA kernels, flat state and weight prediction.

    Args:
        params: parameters or param groups.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD.
        master_weights: fp32 master weights for bf16/fp16 parameters (a no-op for fp32 and
            fp64 ones; float64 parameters get fp64 state and fp64 maths, as torch.optim).
        skip_nonfinite: skip a step whose gradients contain inf/NaN.
        differentiable: must be False (ValueError). foreach, fused: ignored (always fused).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach=None, differentiable: bool = False, fused=None,
                 master_weights: bool = False, skip_nonfinite: bool = False):
        if float(lr) < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused, master_weights=master_weights)
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite)

    @staticmethod
    def _kernels(device, dtype):
        # Resolved through this module's name, which the dispatch tests patch.
        return kernels_for(device, dtype)

    def _state_keys(self, group, dtype):
        keys = ["momentum_buffer"] if group["momentum"] != 0 else []
        if self._master(group, dtype):
            keys.append("master_param")
        return keys

    def _init_state(self, group, p, st):
        if self._master(group, p.dtype):
            st["master_param"] = p.detach().float().clone()

    def _init_flat_extra(self, group, b, flat, states):
        # A buffer adopted from existing state continues; a new one starts with buf = g.
        flat["first"] = not any("momentum_buffer" in st for st in states)
        if flat.get("momentum_buffer", 0) is None:
            flat["first"] = True

    def _kernel_args(self, group) -> dict:
        return dict(lr=float(group["lr"]), momentum=float(group["momentum"]),
                    dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]),
                    weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]))

    def _update_flat(self, group, unit, outs, s):
        b = unit.bucket
        flat = self._flat[id(b)]
        momentum = group["momentum"] != 0
        if momentum and flat.get("momentum_buffer") is None:
            buf = b.new_buffer(state_dtype(b.dtype))
            flat["momentum_buffer"] = buf
            for p, v in zip(b.params, b.views(buf)):
                self.state[p]["momentum_buffer"] = v
            flat["first"] = True
        out = outs.flat(b) if outs is not None else None
        kernels_for(b.device, b.dtype).sgd_step(
            b.data, b.grad, flat.get("momentum_buffer") if momentum else None,
            **self._kernel_args(group), first_step=bool(flat.get("first", True)),
            master=flat.get("master_param"), predict_out=out,
            predict_s=s if out is not None else 0.0)
        flat["first"] = False
        if outs is not None and out is None:
            for p in b.params:
                self._predict_param(group, p, outs.of(p), s)

    def _update_param(self, group, p, outs, s):
        if p.grad.is_sparse:
            raise ValueError("SGD does not support sparse gradients")
        st = self._per_param_state(group, p)
        buf = st.get("momentum_buffer")
        first = buf is None
        if group["momentum"] != 0 and first:
            buf = torch.empty(p.shape, dtype=state_dtype(p.dtype), device=p.device)
            st["momentum_buffer"] = buf
        out = outs.of(p) if outs is not None else None
        master = st.get("master_param")
        kernels_for(p.device, p.dtype).sgd_step(
            p.data.view(-1), p.grad.contiguous().view(-1),
            buf.view(-1) if group["momentum"] != 0 else None, **self._kernel_args(group),
            first_step=first, master=None if master is None else master.view(-1),
            predict_out=None if out is None else out.view(-1),
            predict_s=s if out is not None else 0.0)

    def _predict_flat(self, group, unit, flat, out, s):
        b = unit.bucket
        w = flat.get("master_param", b.data)
        buf = flat.get("momentum_buffer") if group["momentum"] != 0 else None
        kernels_for(b.device, b.dtype).sgd_predict(w, buf, out, s=s, lr=float(group["lr"]))

    def _predict_param(self, group, p, out, s):
        st = self.state.get(p) or {}
        buf = st.get("momentum_buffer")
        w = st.get("master_param", p.detach())
        if buf is None:
            out.copy_(w)  # no momentum: nothing to extrapolate
            return
        kernels_for(p.device, p.dtype).sgd_predict(w.reshape(-1), buf.reshape(-1), out.view(-1), s=s,
                                          lr=float(group["lr"]))

    # --- loose CPU parameters: one list kernel call per dtype combination -----------------
    def _update_list(self, group, params, outs, s, validate):
        from pipetrain import _cpu_kernels as K
        momentum = group["momentum"] != 0
        calls: dict[tuple, tuple[list, ...]] = {}
        for p in params:
            g = p.grad
            if g.is_sparse:
                raise ValueError("SGD does not support sparse gradients")
            st = self._per_param_state(group, p)
            n = p.numel()
            buf = st.get("momentum_buffer")
            first = buf is None
            if momentum and first:
                buf = torch.empty(p.shape, dtype=state_dtype(p.dtype), device=p.device)
                st["momentum_buffer"] = buf
                validate = True  # new state: check it once, with everything else
            if not g.is_contiguous():
                g = g.contiguous()
            master = st.get("master_param")
            # Every call: what p.data / p.grad / state replacement could have changed.
            if not (fits(n, p.dtype, p, g) and fits(n, torch.float32, master)
                    and (not momentum or fits(n, state_dtype(p.dtype), buf))):
                raise ValueError("SGD: a parameter, its gradient and its state must be "
                                 "contiguous with the same number of elements and the "
                                 "dtypes the optimizer made")
            c = calls.setdefault((p.dtype, g.dtype, master is None), ([], [], [], [], [], []))
            c[0].append(p)
            c[1].append(g)
            c[2].append(buf if momentum else None)
            c[3].append(first)
            c[4].append(master)
            if outs is not None:
                c[5].append(outs.checked(p, n))
        for (_, _, no_master), (ps, gs, bufs, firsts, masters, os_) in calls.items():
            tensors = (ps, gs, bufs if momentum else None, None if no_master else masters,
                       os_ or None)
            if validate:  # the full checks want flat views
                tensors = tuple(None if ts is None else [t.view(-1) for t in ts]
                                for ts in tensors)
            ps, gs, bufs, masters, os_ = tensors
            K.sgd_step_multi(ps, gs, bufs, **self._kernel_args(group), first_steps=firsts,
                             masters=masters, predict_outs=os_, predict_s=s if os_ else 0.0,
                             validate=validate)

    def _predict_list(self, group, params, outs, s, validate):
        from pipetrain import _cpu_kernels as K
        calls: dict[tuple, tuple[list, ...]] = {}
        for p in params:
            st = self.state.get(p) or {}
            n = p.numel()
            out = outs.checked(p, n)
            buf = st.get("momentum_buffer")
            w = st.get("master_param", p)
            if buf is None:
                out.copy_(w.detach())  # no momentum: nothing to extrapolate
                continue
            if not (fits(n, w.dtype, w) and fits(n, state_dtype(p.dtype), buf)
                    and fits(n, p.dtype, out)):
                raise ValueError("SGD: a parameter and its state must be contiguous with the "
                                 "same number of elements and the dtypes the optimizer made")
            c = calls.setdefault((w.dtype, out.dtype), ([], [], []))
            c[0].append(w)
            c[1].append(buf)
            c[2].append(out)
        for ws, bufs, os_ in calls.values():
            if validate:
                ws, bufs, os_ = ([t.view(-1) for t in ts] for ts in (ws, bufs, os_))
            K.sgd_predict_multi(ws, bufs, os_, s=s, lr=float(group["lr"]), validate=validate)
