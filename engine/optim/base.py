"""The shared machinery of pipetrain's fused optimizers: kernel dispatch, flat state, prediction.

:class:`FusedOptimizer` is a ``torch.optim.Optimizer`` whose ``step`` runs one fused kernel
per *unit*: a whole :class:`~pipetrain.flat_buffer.FlatBucket` when a param group holds all
of a bucket's parameters (state is then flat too — per-parameter state tensors are views of
flat state buffers), else one parameter. CUDA units go to the Triton kernels
(``pipetrain.kernels``), CPU units to the fused C++ kernels (``pipetrain._cpu_kernels``);
nothing runs the Triton interpreter outside tests.

State is kept in torch's format (``self.state[param]``, same keys, fp32 tensors of the
parameter's shape) so ``state_dict()`` / ``load_state_dict()`` interoperate with the
matching ``torch.optim`` class in both directions, mid-training.

Subclasses (SGD, Adam, AdamW) supply the per-unit maths: ``_state_keys``, ``_init_state``,
``_update`` and ``_predict``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipetrain import flat_buffer

__all__ = ["FusedOptimizer", "kernels_for"]

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: torch.optim options this implementation does not provide (always fused, not differentiable).
_UNSUPPORTED = {"amsgrad": False, "capturable": False, "differentiable": False}


def kernels_for(device: torch.device):
    """The kernel module for a device: the C++ CPU kernels or the Triton CUDA kernels."""
    if device.type == "cpu":
        from pipetrain import _cpu_kernels
        return _cpu_kernels
    if device.type == "cuda":
        import pipetrain.kernels as triton_kernels
        return triton_kernels
    raise ValueError(f"pipetrain.optim runs on cpu or cuda tensors, not {device.type}")


class _Unit:
    """One kernel call's worth of parameters: a flat bucket, or a single parameter."""

    __slots__ = ("params", "bucket")

    def __init__(self, params: tuple[nn.Parameter, ...], bucket: flat_buffer.FlatBucket | None):
        self.params = params
        self.bucket = bucket


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: param groups, torch-format state, fused per-unit kernel calls.

    Args:
        params: parameters or param groups (as torch.optim).
        defaults: the group defaults (torch's keys, plus ``master_weights``).
        skip_nonfinite: check the gradients for inf/NaN on every step and skip the whole
            step (nothing written, step count unchanged) if one is found.

    Raises:
        ValueError: parameters on more than one device, or of a dtype other than
            float32/bfloat16/float16; a torch option this class does not support.
    """

    def __init__(self, params, defaults: dict, *, skip_nonfinite: bool = False):
        for key, allowed in _UNSUPPORTED.items():
            if defaults.get(key, allowed) != allowed:
                raise ValueError(f"{type(self).__name__}: {key}={defaults[key]!r} is not supported "
                                 f"(only {key}={allowed}); use torch.optim.{type(self).__name__}")
        self.skip_nonfinite = bool(skip_nonfinite)
        self._flat: dict[int, dict] = {}   # id(bucket) -> flat state buffers of that bucket
        self._plans: dict[int, tuple] = {}  # group index -> (key, units)
        self._pred_bufs: dict[int, torch.Tensor] = {}  # id(bucket) -> predicted-weights buffer
        super().__init__(params, defaults)

    # --- groups and validation --------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        for key, allowed in _UNSUPPORTED.items():
            if param_group.get(key, allowed) != allowed:
                raise ValueError(f"{type(self).__name__}: {key}={param_group[key]!r} is not "
                                 f"supported (only {key}={allowed})")
        super().add_param_group(param_group)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"{type(self).__name__}: parameters on mixed devices "
                             f"{sorted(map(str, devices))}; one optimizer per device (stage)")
        for p in self.param_groups[-1]["params"]:
            if p.dtype not in _PARAM_DTYPES:
                raise ValueError(f"{type(self).__name__}: parameter of dtype {p.dtype}; allowed: "
                                 "float32, bfloat16, float16")
            if not p.is_contiguous():
                raise ValueError(f"{type(self).__name__}: parameters must be contiguous")
        self._plans.clear()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._group_extras().items():
                group.setdefault(key, value)
        # load_state_dict replaces self.state: flat state must be rebuilt from it.
        self.__dict__.setdefault("_flat", {}).clear()
        self.__dict__.setdefault("_plans", {}).clear()
        self.__dict__.setdefault("_pred_bufs", {})
        self.__dict__.setdefault("skip_nonfinite", False)

    def _group_extras(self) -> dict:
        """Group keys beyond torch's (kept when a torch state_dict is loaded)."""
        return {"master_weights": False}

    def _plan(self, gi: int, group: dict) -> list[_Unit]:
        """Split a group into units: whole flat buckets where possible, else single params."""
        params = group["params"]
        key = (id(params), len(params))
        cached = self._plans.get(gi)
        if cached is not None and cached[0] == key and all(
                u.bucket is None or u.bucket.owns(u.params[0], 0) for u in cached[1]):
            return cached[1]
        ids = {id(p) for p in params}
        units, done = [], set()
        for p in params:
            if id(p) in done:
                continue
            found = flat_buffer.bucket_of(p)
            bucket = found[0] if found else None
            if bucket is not None and all(id(q) in ids for q in bucket.params) and all(
                    bucket.owns(q, i) for i, q in enumerate(bucket.params)):
                units.append(_Unit(bucket.params, bucket))
                done.update(id(q) for q in bucket.params)
            else:
                units.append(_Unit((p,), None))
                done.add(id(p))
        self._plans[gi] = (key, units)
        return units

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients: a flat bucket's buffer in one op, keeping the ``param.grad``
        views (whatever ``set_to_none`` says — a flat parameter's gradient is never None);
        other parameters as torch.optim does."""
        for gi, group in enumerate(self.param_groups):
            for unit in self._plan(gi, group):
                if unit.bucket is not None:
                    unit.bucket.zero_grad()
                    continue
                for p in unit.params:
                    if p.grad is None:
                        continue
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().requires_grad_(False).zero_()

    # --- torch-format state_dict -----------------------------------------------------------
    @staticmethod
    def _process_value_according_to_param_policy(param, value, param_id, param_groups, key=None):
        # torch casts loaded state to the parameter's dtype; ours is always fp32 (mixed
        # precision keeps fp32 moments), and 'step' stays a CPU float tensor as in torch.
        if key == "step":
            if isinstance(value, torch.Tensor):
                return value.detach().clone()
            return torch.tensor(float(value))
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(device=param.device, dtype=torch.float32)
        return value

    def state_dict(self) -> dict:
        """torch's format. Each parameter gets its own 'step' tensor (a flat bucket shares
        one internally; torch.optim would increment a shared one once per parameter)."""
        sd = super().state_dict()
        for st in sd["state"].values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
        return sd

    # --- stepping --------------------------------------------------------------------------
    def _found_inf(self, found_inf: torch.Tensor | None) -> bool:
        """Whether this step must be skipped (one host read of the flag)."""
        if found_inf is not None:
            if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1:
                raise ValueError("found_inf must be a 1-element float32 tensor")
            return bool(found_inf.item() != 0)
        if not self.skip_nonfinite:
            return False
        bad = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    b = ~torch.isfinite(p.grad).all()
                    bad = b if bad is None else bad | b
        return bool(bad.item()) if bad is not None else False

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: torch.Tensor | None = None):
        """One update of every parameter with a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (as torch.optim).
            found_inf: optional 1-element fp32 flag (e.g. from AMP); nonzero skips the step.

        Returns:
            The closure's loss, or None.
        """
        return self._step(closure, found_inf, None, 0.0)

    @torch.no_grad()
    def step_and_predict(self, s: float, out=None, *, closure=None,
                         found_inf: torch.Tensor | None = None):
        """Update, then write the weights predicted ``s`` updates ahead, in one fused pass.

        Args:
            s: version distance >= 0 (SpecTrain / XPipe).
            out: where the prediction goes — see :meth:`predict`.
            closure, found_inf: as :meth:`step`. A skipped step predicts nothing.

        Returns:
            list[Tensor]: the predicted weights, one per parameter (param_groups order).
        """
        s = _check_s(s)
        outs = self._outputs(out)
        self._step(closure, found_inf, outs, s)
        return outs.per_param

    def _step(self, closure, found_inf, outs, s):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._found_inf(found_inf):
            return loss
        for gi, group in enumerate(self.param_groups):
            for unit in self._plan(gi, group):
                if unit.bucket is not None and self._flat_ready(group, unit):
                    self._update_flat(group, unit, outs, s)
                else:
                    for p in unit.params:
                        if p.grad is not None:
                            self._update_param(group, p, outs, s)
                        elif outs is not None:
                            self._predict_param(group, p, outs.of(p), s)
        return loss

    def _flat_ready(self, group: dict, unit: _Unit) -> bool:
        """Make the bucket's grads and state flat; False if this step must go per parameter."""
        b = unit.bucket
        if not b.grads_attached():
            if b.any_grad_missing():
                return False  # torch skips params without grad; so must we
            b.attach_grads()
        flat = self._flat.get(id(b))
        if flat is None or flat["bucket"] is not b:
            flat = self._make_flat_state(group, b)
            if flat is None:
                return False
            self._flat[id(b)] = flat
        return True

    def _make_flat_state(self, group: dict, b: flat_buffer.FlatBucket) -> dict | None:
        """Flat state buffers for bucket b, adopting any per-parameter state (views replace it).

        Returns None when the parameters' states disagree (e.g. different step counts after
        loading a torch state_dict where some parameters had no gradient): that bucket then
        steps per parameter, which is still exact.
        """
        states = [self.state.get(p, {}) for p in b.params]
        has = [bool(st) for st in states]
        if any(has) and not all(has):
            return None
        flat = {"bucket": b}
        if all(has):
            steps = {float(st["step"]) for st in states if "step" in st}
            if len(steps) > 1:
                return None
        for key in self._state_keys(group, b.dtype):
            present = [key in st for st in states]
            if any(present) and not all(present):
                return None
            if not any(present) and any(has):
                if key in ("momentum_buffer",):
                    flat[key] = None  # created lazily at the first step
                    continue
            buf = b.new_buffer(torch.float32)
            views = b.views(buf)
            for p, st, v in zip(b.params, states, views):
                if key in st:
                    v.copy_(st[key])
                elif key == "master_param":
                    v.copy_(p.detach())
            flat[key] = buf
            for p, v in zip(b.params, views):
                self.state[p][key] = v
        self._init_flat_extra(group, b, flat, states)
        return flat

    # --- prediction ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, s: float, out=None) -> list[torch.Tensor]:
        """Write the weights predicted ``s`` updates ahead from the current state (no update).

        Args:
            s: version distance >= 0.
            out: None (internal buffers, reused across calls: a flat one per bucket), a flat
                tensor with the layout of the optimizer's single bucket, a dict
                {FlatBucket: flat tensor}, or a list of tensors, one per parameter in
                param_groups order (each of its parameter's shape and dtype).

        Returns:
            list[Tensor]: the predicted weights, one per parameter (views into flat buffers
            when flat). Zero state (before any step) gives the weights themselves.
        """
        s = _check_s(s)
        outs = self._outputs(out)
        for gi, group in enumerate(self.param_groups):
            for unit in self._plan(gi, group):
                flat = self._flat.get(id(unit.bucket)) if unit.bucket is not None else None
                if flat is not None and outs.flat(unit.bucket) is not None:
                    self._predict_flat(group, unit, flat, outs.flat(unit.bucket), s)
                else:
                    for p in unit.params:
                        self._predict_param(group, p, outs.of(p), s)
        return outs.per_param

    def _outputs(self, out) -> "_Outputs":
        return _Outputs(self, out)

    # --- helpers for subclasses -------------------------------------------------------------
    def _master(self, group: dict, p_or_bucket_dtype: torch.dtype) -> bool:
        return bool(group.get("master_weights", False)) and p_or_bucket_dtype != torch.float32

    def _per_param_state(self, group: dict, p: nn.Parameter) -> dict:
        st = self.state[p]
        if not st:
            self._init_state(group, p, st)
        return st

    # Subclass interface --------------------------------------------------------------------
    def _state_keys(self, group: dict, dtype: torch.dtype) -> list[str]:
        raise NotImplementedError

    def _init_state(self, group: dict, p: nn.Parameter, st: dict) -> None:
        raise NotImplementedError

    def _init_flat_extra(self, group, b, flat, states) -> None:
        raise NotImplementedError

    def _update_flat(self, group, unit, outs, s) -> None:
        raise NotImplementedError

    def _update_param(self, group, p, outs, s) -> None:
        raise NotImplementedError

    def _predict_flat(self, group, unit, flat, out, s) -> None:
        raise NotImplementedError

    def _predict_param(self, group, p, out, s) -> None:
        raise NotImplementedError


def _check_s(s) -> float:
    try:
        value = float(s)
    except (TypeError, ValueError):
        raise ValueError(f"s must be a float >= 0, got {s!r}") from None
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"s must be a finite float >= 0 (a number of future updates), got {s!r}")
    return value


class _Outputs:
    """Resolves a ``predict``/``step_and_predict`` ``out`` argument into per-unit targets."""

    def __init__(self, opt: FusedOptimizer, out):
        self.opt = opt
        params = [p for g in opt.param_groups for p in g["params"]]
        buckets = []
        for gi, g in enumerate(opt.param_groups):
            buckets += [u.bucket for u in opt._plan(gi, g) if u.bucket is not None]
        self._flat: dict[int, torch.Tensor] = {}
        self._per: dict[int, torch.Tensor] = {}
        if out is None:
            for b in buckets:
                buf = opt._pred_bufs.get(id(b))
                if buf is None or buf.numel() != b.numel:
                    buf = b.new_buffer()
                    opt._pred_bufs[id(b)] = buf
                self._flat[id(b)] = buf
        elif isinstance(out, torch.Tensor):
            if len(buckets) != 1 or len(params) != len(buckets[0].params):
                raise ValueError("out as one flat tensor needs the optimizer to hold exactly one "
                                 "flat bucket; pass a {bucket: tensor} dict or a per-parameter "
                                 "list")
            buckets[0]._check_layout("out", out, dtype=buckets[0].dtype)
            self._flat[id(buckets[0])] = out
        elif isinstance(out, dict):
            for b, t in out.items():
                b._check_layout("out", t, dtype=b.dtype)
                self._flat[id(b)] = t
        else:
            out = list(out)
            if len(out) != len(params):
                raise ValueError(f"out has {len(out)} tensors for {len(params)} parameters")
            for p, t in zip(params, out):
                if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype:
                    raise ValueError("each out tensor must have its parameter's shape and dtype")
                if not t.is_contiguous():
                    raise ValueError("out tensors must be contiguous")
                self._per[id(p)] = t
        # Per-parameter views of the flat outputs, so both paths can write and be returned.
        for b in buckets:
            buf = self._flat.get(id(b))
            if buf is not None:
                for p, v in zip(b.params, b.cached_views(buf)):
                    self._per.setdefault(id(p), v)
        for p in params:
            if id(p) not in self._per:
                self._per[id(p)] = torch.empty_like(p)
        self.per_param = [self._per[id(p)] for p in params]

    def flat(self, bucket) -> torch.Tensor | None:
        return self._flat.get(id(bucket))

    def of(self, p) -> torch.Tensor:
        return self._per[id(p)]
