"""Dynamic loss scaling for mixed precision: ``Pipeline(..., loss_scale="dynamic")``.

Gradients of fp16 activations underflow (small values flush to zero) unless the loss fed to
backward is multiplied by a large factor ``S``; the gradients are then ``S`` times too large
and must be divided by ``S`` before anyone reads them. This is :class:`torch.amp.GradScaler`'s
scheme, done by the pipeline so that one decision holds for every stage and every rank::

    sink stages      backpropagate  loss * weight * S        (the reported loss is unscaled)
    end of the step  per stage: one fused pass over its staged gradients
                     (torch._amp_foreach_non_finite_check_and_unscale_) multiplies them by 1/S
                     and sets a flag if any is inf / NaN
                     the flags are OR-ed over the stages (in one process) and over all ranks
                     (one all-reduce over the default group, which spans the pipeline AND the
                     data-parallel groups), so every rank decides alike
    found inf/NaN    nothing is committed (every p.grad is as before the step),
                     ``pipe.found_inf`` is True, the scale is multiplied by ``backoff_factor``
    all finite       the unscaled gradients are committed into p.grad; after
                     ``growth_interval`` consecutive clean steps the scale is multiplied by
                     ``growth_factor``

So ``p.grad`` never holds scaled gradients: ``pipe.clip_grad_norm_`` and any user code see
the true ones. The optimizer step is skipped by ``pipe.train()`` (synchronous schedules) and
by :meth:`Pipeline.optimizer_step`, for users who drive ``step()`` themselves::

    pipe = Pipeline(model, ..., loss_scale="dynamic")
    for x, y in loader:
        opt.zero_grad()
        loss = pipe.step(x, y)        # unscaled gradients, committed only if all finite
        pipe.clip_grad_norm_(1.0)
        pipe.optimizer_step(opt)      # opt.step() unless a step since the last call found inf

Differences from GradScaler: the scale is updated at the end of every ``step()`` (one
mini-batch), not at ``scaler.update()``; with gradient accumulation over several ``step()``
calls a step that found inf is dropped (its gradients never reach p.grad) and
``optimizer_step`` skips the accumulated update. A scale that is a power of two (the default
and every value it takes) changes no bit of the unscaled gradients; another float may round.

Asynchronous schedules (``train()`` with U actions) commit and update inside one run, many
mini-batches before the run ends, so one step cannot be skipped on all stages: that
combination is refused (ValueError).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Union

import torch

__all__ = ["LossScaler", "resolve", "check_and_unscale", "begin_step", "end_step", "gate",
           "optimizer_step"]


class LossScaler:
    """The scale and its update rule (``torch.amp.GradScaler``'s defaults).

    Args:
        init_scale: the first scale (default ``2**16``).
        growth_factor: multiplies the scale after ``growth_interval`` clean steps in a row.
        backoff_factor: multiplies the scale after a step that found inf / NaN.
        growth_interval: clean steps before a growth (default 2000).
        dynamic: False keeps the scale fixed (steps with inf / NaN are still skipped).

    Attributes:
        scale (float), growth_tracker (clean steps since the last growth or backoff),
        skipped (steps skipped so far).
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 dynamic: bool = True) -> None:
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name, v, ok, allowed in (("init_scale", init_scale, lambda x: x > 0, "> 0"),
                                     ("growth_factor", growth_factor, lambda x: x > 1, "> 1"),
                                     ("backoff_factor", backoff_factor, lambda x: 0 < x < 1, "in (0, 1)")):
            if not number(v) or not ok(v):
                raise ValueError(f"LossScaler: {name} must be a finite number {allowed}; got {v!r}")
        if not isinstance(growth_interval, int) or isinstance(growth_interval, bool) \
                or growth_interval < 1:
            raise ValueError(f"LossScaler: growth_interval must be an int >= 1; got {growth_interval!r}")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.dynamic = growth_interval, bool(dynamic)
        self.growth_tracker = 0
        self.skipped = 0

    def update(self, found_inf: bool) -> None:
        """After a step: back off (found inf / NaN) or count a clean step (and maybe grow).
        Every rank calls it with the same flag, so every rank keeps the same scale."""
        if found_inf:
            self.skipped += 1
            if self.dynamic:
                self.scale *= self.backoff_factor
                self.growth_tracker = 0
            return
        if not self.dynamic:
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = self.scale * self.growth_factor
            if math.isfinite(grown):
                self.scale = grown
            self.growth_tracker = 0

    def state_dict(self) -> Dict[str, float]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])

    def __repr__(self) -> str:
        kind = "dynamic" if self.dynamic else "fixed"
        return f"LossScaler({kind}, scale={self.scale:g}, growth_tracker={self.growth_tracker})"


def resolve(loss_scale: Union[None, str, float, LossScaler]) -> Optional[LossScaler]:
    """The ``loss_scale=`` argument: None (no scaling), ``"dynamic"`` (a default
    :class:`LossScaler`), a number (a fixed scale) or a :class:`LossScaler`. Raises ValueError."""
    if loss_scale is None or isinstance(loss_scale, LossScaler):
        return loss_scale
    if loss_scale == "dynamic":
        return LossScaler()
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) \
            and math.isfinite(loss_scale) and loss_scale > 0:
        return LossScaler(float(loss_scale), dynamic=False)
    raise ValueError(f"loss_scale must be None, 'dynamic', a finite number > 0 (a fixed scale) "
                     f"or a pipetrain.LossScaler; got {loss_scale!r}")


def check_and_unscale(grads: Iterable[torch.Tensor], inv_scale: float, sync: bool = True) -> Any:
    """Multiply ``grads`` by ``inv_scale`` in place and say whether any was inf / NaN.

    One fused pass per device (``torch._amp_foreach_non_finite_check_and_unscale_``, the
    kernel GradScaler uses; it takes any float dtype mixed) and one read of the flag. A
    tensor given twice is divided once. ``sync=False``: no read; returns the flag as a
    float32 tensor (> 0: found) on the first gradient's device, or None without gradients,
    so that a CUDA caller can put it into a collective without a host synchronization."""
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for g in _distinct(g for g in grads if g is not None):
        if g is not None and not g.is_sparse:
            by_device.setdefault(g.device, []).append(g)
        elif g is not None:      # sparse: rare, done one by one
            v = g.coalesce()._values()
            if not bool(torch.isfinite(v).all()):
                return True if sync else torch.ones((), dtype=torch.float32)
            g.mul_(inv_scale)
    flags = []
    for dev, ts in by_device.items():
        found = torch.zeros(1, dtype=torch.float32, device=dev)
        inv = torch.full((1,), inv_scale, dtype=torch.float32, device=dev)
        # inv_scale 1.0 (no scaler) makes it a check only: multiplying by 1 changes no value.
        torch._amp_foreach_non_finite_check_and_unscale_(ts, found, inv)
        flags.append(found)
    if not flags:
        return False if sync else None
    total = flags[0][0] if len(flags) == 1 else torch.stack([f[0].to(flags[0].device) for f in flags]).sum()
    return bool(total > 0) if sync else total


def _leaves(values: Iterable[Any]) -> List[torch.Tensor]:
    from pipetrain.microbatch import flatten
    out = []
    for v in values:
        if v is not None:
            out += [t for t in flatten(v)[0] if isinstance(t, torch.Tensor)]
    return out


def _distinct(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """Each gradient once: autograd may hand the same tensor to two parameters (``x + a + b``)
    or to a parameter and an input, and an in-place unscale must not divide it twice."""
    seen, out = set(), []
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.stride(), t.dtype) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def begin_step(pipe: Any) -> Any:
    """Before a step: the sink stages scale the loss they backpropagate by the current scale.
    Returns the one-process run's ``before_commit`` (:func:`gate`; None without a scaler)."""
    scaler = pipe.scaler
    pipe.found_inf = False
    if scaler is None:
        return None
    for st in pipe.stages:
        if st is not None and st.is_last:
            st.loss_scale = scaler.scale
    return gate(pipe)


def end_step(pipe: Any, found_inf: bool) -> None:
    """After a step's flag is known (the same on every rank): record it, update the scale."""
    pipe.found_inf = found_inf
    pipe._inf_since_update = getattr(pipe, "_inf_since_update", False) or found_inf
    if pipe.scaler is not None:
        pipe.scaler.update(found_inf)


def local_grads(stages: Iterable[Any]) -> List[torch.Tensor]:
    """This run's staged gradients of ``stages``."""
    return [g for st in stages if st is not None
            for g in (st.staged_grads() or {}).values() if g is not None]


def gate(pipe: Any):
    """``before_commit`` for a one-process run (:meth:`pipetrain.runner.Runner.execute`), None
    without a scaler: one fused check-and-unscale over every stage's staged gradients and the
    user inputs' gradients; commit only when all are finite."""
    if pipe.scaler is None:
        return None

    def before_commit(run: Any, stages: Any) -> bool:
        inv = 1.0 / pipe.scaler.scale
        grads = local_grads(stages) + _leaves(list(run.input_grads.values())
                                             + list(run.target_grads.values()))
        found = check_and_unscale(grads, inv)
        end_step(pipe, found)
        return not found
    return before_commit


def optimizer_step(pipe: Any, optimizer: Any = None) -> bool:
    """Step ``optimizer`` (default: each local stage's own, ``optimizer=``) unless a step
    since the last call found inf / NaN on any stage or rank; returns whether it stepped."""
    skip = getattr(pipe, "_inf_since_update", False)
    pipe._inf_since_update = False
    if skip:
        return False
    if optimizer is not None:
        optimizer.step()
        return True
    opts = [st.optimizer for st in pipe.stages if st is not None]
    if not opts or any(o is None for o in opts):
        raise ValueError("optimizer_step() without an optimizer needs the optimizer inside the "
                         "pipeline (Pipeline(..., optimizer=...)); else pass yours")
    for o in opts:
        o.step()
    return True
