"""The shared machinery of pipetrain's fused optimizers: kernel dispatch, flat state, prediction.

:class:`FusedOptimizer` is a ``torch.optim.Optimizer`` whose ``step`` runs one fused kernel
per *unit*: a whole :class:`~pipetrain.flat_buffer.FlatBucket` when a param group holds all
of a bucket's parameters (state is then flat too — per-parameter state tensors are views of
flat state buffers). The other parameters of a group ("loose" ones) are stepped together: on
CPU one list call of the fused C++ kernel per (dtype) group of them, which splits all their
elements across the thread pool at once; on CUDA one kernel per parameter. CUDA units go to
the Triton kernels (``pipetrain.kernels``; float64 ones to the plain-torch reference, which
computes in fp64), CPU units to the fused C++ kernels (``pipetrain._cpu_kernels``, fp32 maths
for fp32/bf16/fp16 parameters, fp64 maths for float64 ones); nothing runs the Triton
interpreter outside tests.

State is kept in torch's format (``self.state[param]``, same keys, tensors of the parameter's
shape: fp32, or fp64 for float64 parameters, as torch.optim) so ``state_dict()`` /
``load_state_dict()`` interoperate with the matching ``torch.optim`` class in both
directions, mid-training.

Not done: the step counter lives on the CPU (torch's format), so ``step(found_inf=flag)``
reads the flag on the host — a device sync on CUDA. The kernels themselves take the flag on
the device; moving the count there would remove the sync.

Subclasses (SGD, Adam, AdamW) supply the per-unit maths: ``_state_keys``, ``_init_state``,
``_update_flat`` / ``_predict_flat`` (a bucket), ``_update_param`` / ``_predict_param`` (one
parameter: CUDA) and ``_update_list`` / ``_predict_list`` (loose CPU parameters, one list
kernel call per dtype combination; every call checks each tensor's dtype, size and
contiguity, since the kernels trust addresses).

Prediction outputs with ``out=None`` are the optimizer's own buffers, made once (a flat one
per bucket, one per loose parameter) and overwritten by every later ``predict`` /
``step_and_predict``: no allocation per call.
"""

from __future__ import annotations

import torch
from torch import nn

from pipetrain import flat_buffer

__all__ = ["FusedOptimizer", "kernels_for"]

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: torch.optim options this implementation does not provide (always fused, not differentiable).
_UNSUPPORTED = {"amsgrad": False, "capturable": False, "differentiable": False}


def kernels_for(device: torch.device, dtype: torch.dtype | None = None):
    """The kernel module for a device (and parameter dtype): the C++ CPU kernels (every
    dtype, float64 included), the Triton CUDA kernels, or for float64 CUDA tensors the
    plain-torch reference (the Triton kernels compute in fp32 only)."""
    if device.type == "cpu":
        from pipetrain import _cpu_kernels
        return _cpu_kernels
    if device.type == "cuda":
        if dtype == torch.float64:
            from pipetrain.kernels import reference
            return reference
        import pipetrain.kernels as triton_kernels
        return triton_kernels
    raise ValueError(f"pipetrain.optim runs on cpu or cuda tensors, not {device.type}")


def fits(n: int, dtype: torch.dtype, *tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor (None skipped) is contiguous with ``n`` elements of
    ``dtype``: the per-call check of state and master tensors before a list kernel call
    (the kernels trust addresses; a replaced state tensor must not make them overrun)."""
    for t in tensors:  # a plain loop: this runs for every parameter on every step
        if t is not None and (t.dtype != dtype or t.numel() != n or not t.is_contiguous()):
            return False
    return True


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of optimizer state (and master weights) for parameters of ``param_dtype``:
    fp64 for float64 parameters (fp64 maths, as torch.optim), else fp32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


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
            float32/bfloat16/float16/float64; a torch option this class does not support.
    """

    def __init__(self, params, defaults: dict, *, skip_nonfinite: bool = False):
        for key, allowed in _UNSUPPORTED.items():
            if defaults.get(key, allowed) != allowed:
                raise ValueError(f"{type(self).__name__}: {key}={defaults[key]!r} is not supported "
                                 f"(only {key}={allowed}); use torch.optim.{type(self).__name__}")
        self.skip_nonfinite = bool(skip_nonfinite)
        self._flat: dict[int, dict] = {}   # id(bucket) -> flat state buffers of that bucket
        self._plans: dict[int, tuple] = {}  # group index -> (key, units)
        self._pred_bufs: dict[int, torch.Tensor] = {}  # id(bucket or param) -> prediction buffer
        self._default_outs: _Outputs | None = None     # out=None targets, reused across calls
        self._lists_checked: set = set()  # (id(group), kind) list calls fully validated
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
                                 "float32, bfloat16, float16, float64")
            if not p.is_contiguous():
                raise ValueError(f"{type(self).__name__}: parameters must be contiguous")
        self._invalidate()

    def _invalidate(self) -> None:
        """Forget the cached plans, default outputs and list validation (groups or state
        changed)."""
        self._plans.clear()
        self.__dict__["_default_outs"] = None
        self.__dict__["_lists_checked"] = set()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._group_extras().items():
                group.setdefault(key, value)
        # load_state_dict replaces self.state: flat state must be rebuilt from it.
        self.__dict__.setdefault("_flat", {}).clear()
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_pred_bufs", {})
        self.__dict__.setdefault("skip_nonfinite", False)
        self._invalidate()

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
        # torch casts loaded state to the parameter's dtype; ours is fp32 for 16/32-bit
        # parameters (mixed precision keeps fp32 moments) and fp64 for float64 ones, and
        # 'step' stays a CPU float tensor (fp32 or fp64, as torch) of its own.
        if key == "step":
            if isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float64):
                return value.detach().cpu().clone().reshape(())
            return torch.tensor(float(value))
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(device=param.device, dtype=state_dtype(param.dtype),
                            memory_format=torch.contiguous_format)
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
            out: where the prediction goes — see :meth:`predict` (None: the optimizer's own
                buffers, overwritten by the next ``predict``/``step_and_predict``).
            closure, found_inf: as :meth:`step`. A skipped step predicts nothing.

        Returns:
            list[Tensor]: the predicted weights, one per parameter (param_groups order), each
            of its parameter's shape and dtype.
        """
        s = _check_s(s)
        outs = self._outputs(out)
        self._step(closure, found_inf, outs, s)
        return list(outs.per_param)

    def _step(self, closure, found_inf, outs, s):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._found_inf(found_inf):
            return loss
        for gi, group in enumerate(self.param_groups):
            loose = []
            for unit in self._plan(gi, group):
                if unit.bucket is not None and self._flat_ready(group, unit):
                    self._update_flat(group, unit, outs, s)
                else:
                    loose += unit.params
            if loose:
                self._update_loose(group, loose, outs, s)
        return loss

    def _update_loose(self, group: dict, params: list, outs, s: float) -> None:
        """Step the parameters that are not a whole flat bucket: those with a gradient are
        updated (CPU: one list kernel call per dtype; CUDA: one call each), those without are
        only predicted (if ``outs``), as torch skips them."""
        with_grad = [p for p in params if p.grad is not None]
        if self._lists(params):
            if with_grad:
                self._update_list(group, with_grad, outs, s,
                                  self._validate_lists(group, "update", outs))
        else:
            for p in with_grad:
                self._update_param(group, p, outs, s)
        if outs is not None and len(with_grad) < len(params):
            self._predict_loose(group, [p for p in params if p.grad is None], outs, s)

    def _lists(self, params: list) -> bool:
        """Whether these parameters' kernels take lists (the C++ CPU kernels do)."""
        from pipetrain import _cpu_kernels
        p = params[0]
        return self._kernels(p.device, p.dtype) is _cpu_kernels

    @staticmethod
    def _kernels(device, dtype):
        return kernels_for(device, dtype)

    def _predict_loose(self, group: dict, params: list, outs, s: float) -> None:
        if self._lists(params):
            self._predict_list(group, params, outs, s,
                               self._validate_lists(group, "predict", outs))
        else:
            for p in params:
                self._predict_param(group, p, outs.of(p), s)

    def _validate_lists(self, group: dict, kind: str, outs) -> bool:
        """Whether this list call must run the kernels' full input checks (overlaps and
        devices too): always with outputs the caller passed, else the first time for this
        group after any change of groups or loaded state, and when state was just created.
        Every call checks dtype, size and contiguity of every tensor itself (``fits``)."""
        if outs is not None and not outs.internal:
            return True
        key = (id(group), kind)
        if key not in self._lists_checked:
            self._lists_checked.add(key)
            return True
        return False

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
            buf = b.new_buffer(state_dtype(b.dtype))
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
            out: None (the optimizer's own buffers — a flat one per bucket, one per loose
                parameter — allocated once and reused: the tensors returned are overwritten
                by the next ``predict``/``step_and_predict`` with ``out=None``; clone them or
                pass ``out`` to keep them), a flat tensor with the layout of the optimizer's
                single bucket, a dict {FlatBucket: flat tensor}, or a list of tensors, one per
                parameter in param_groups order (each of its parameter's shape and dtype).

        Returns:
            list[Tensor]: the predicted weights, one per parameter (views into flat buffers
            when flat). Zero state (before any step) gives the weights themselves.
        """
        s = _check_s(s)
        outs = self._outputs(out)
        for gi, group in enumerate(self.param_groups):
            loose = []
            for unit in self._plan(gi, group):
                flat = self._flat.get(id(unit.bucket)) if unit.bucket is not None else None
                if flat is not None and outs.flat(unit.bucket) is not None:
                    self._predict_flat(group, unit, flat, outs.flat(unit.bucket), s)
                else:
                    loose += unit.params
            if loose:
                self._predict_loose(group, loose, outs, s)
        return list(outs.per_param)

    def _outputs(self, out) -> "_Outputs":
        """The targets for ``out``; for None, one set of internal buffers reused by every
        call while the plans stand (no allocation per call)."""
        if out is not None:
            return _Outputs(self, out)
        # The plans themselves (held, so no id is reused): while they stand, so do the outputs.
        key = [self._plan(gi, g) for gi, g in enumerate(self.param_groups)]
        cached = self._default_outs
        if cached is None or len(cached.key) != len(key) or any(
                a is not b for a, b in zip(cached.key, key)):
            cached = _Outputs(self, None)
            cached.key = key
            self._default_outs = cached
        return cached

    # --- helpers for subclasses -------------------------------------------------------------
    def _master(self, group: dict, p_or_bucket_dtype: torch.dtype) -> bool:
        """Whether parameters of this dtype keep master weights: only bf16/fp16 ones with
        ``master_weights=True`` (for fp32 and fp64 parameters the flag is a no-op: the
        parameter is already the full-precision copy)."""
        return bool(group.get("master_weights", False)) and p_or_bucket_dtype in (
            torch.bfloat16, torch.float16)

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

    def _update_list(self, group, params, outs, s, validate: bool) -> None:
        raise NotImplementedError

    def _predict_list(self, group, params, outs, s, validate: bool) -> None:
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
    """Resolves a ``predict``/``step_and_predict`` ``out`` argument into per-unit targets.

    ``internal`` (out=None): the optimizer's own buffers, kept in ``opt._pred_bufs`` (a flat
    one per bucket, one per loose parameter) and reused by every later call.
    """

    def __init__(self, opt: FusedOptimizer, out):
        self.opt = opt
        self.internal = out is None
        self.key = None
        params = [p for g in opt.param_groups for p in g["params"]]
        self._params = params
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
                self._per[id(p)] = self._own(p) if self.internal else torch.empty_like(p)
        self.per_param = [self._per[id(p)] for p in params]

    def _own(self, p) -> torch.Tensor:
        """The optimizer's reusable prediction buffer for loose parameter p."""
        buf = self.opt._pred_bufs.get(id(p))
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p, memory_format=torch.contiguous_format)
            self.opt._pred_bufs[id(p)] = buf
        return buf

    def checked(self, p, numel: int) -> torch.Tensor:
        """p's target, which must have ``numel`` elements: an internal buffer is remade when
        p changed shape since it was made (``p.data = ...``); a caller's raises ValueError."""
        t = self._per[id(p)]
        if t.numel() == numel:
            return t
        if not self.internal:
            raise ValueError(f"out for a parameter of {numel} elements has {t.numel()}")
        t = self._per[id(p)] = self._own(p)
        self.per_param = [self._per[id(q)] for q in self._params]
        return t

    def flat(self, bucket) -> torch.Tensor | None:
        return self._flat.get(id(bucket))

    def of(self, p) -> torch.Tensor:
        return self._per[id(p)]
