"""Pre-update snapshots of one stage, so a failed run can leave every stage at one version.

In an asynchronous run the stages apply their updates at different times: when an action
fails, the last stage may have applied U(t) while stage 0 has not. ``train()`` then rolls the
stages that are ahead back to W(n), n the largest version every stage has reached, and the
optimizer state of version n. :class:`UpdateLog` keeps, right before each update n of its
stage, a copy of the live weights W(n) and of the optimizer state of n, for the last
``depth + 1`` updates only (``depth``: how far a stage can run ahead of the slowest,
:func:`pipetrain.async_windows.rollback_depth`). A failing U itself (an optimizer step that
raised half-way) is undone from the snapshot taken right before it.

The copies are cheap: one ``copy_`` per flat weight bucket (the stage's parameters are
flattened by its :class:`~pipetrain.versions.PlannedVersions` already) and one fused
``torch._foreach_copy_`` for the optimizer-state tensors, into buffers recycled from the
oldest snapshot. Restoring (after a failure only) copies back in place, so views held by a
fused optimizer (:mod:`pipetrain.optim`'s flat state) stay valid.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["UpdateLog"]


class _Snapshot:
    __slots__ = ("version", "weights", "state_keys", "state_tensors", "state_other")

    def __init__(self) -> None:
        self.version = -1
        self.weights: List[torch.Tensor] = []
        self.state_keys: List[tuple] = []           # (param index, key) of each tensor
        self.state_tensors: List[torch.Tensor] = []
        self.state_other: Dict[tuple, Any] = {}     # non-tensor state (an int step count)


class UpdateLog:
    """The last ``depth + 1`` pre-update snapshots of one stage.

    Args:
        params: the stage's parameters (the user's objects).
        optimizer: the stage's optimizer (``optimizer.state[param]``: torch's layout).
        depth: how many updates the stage can be ahead of the slowest stage (>= 0).
        weights: optional callable returning the tensors holding the live weights (flat
            buckets); default the parameters' ``.data``.

    Attributes:
        bytes / peak_bytes: bytes of the snapshots held now / at most.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], optimizer: Any, depth: int,
                 weights: Optional[Any] = None) -> None:
        self._params = list(params)
        self.optimizer = optimizer
        self.depth = max(0, int(depth))
        self._weights = weights or (lambda: [q.data for q in self._params])
        self._snaps: List[_Snapshot] = []
        self.bytes = self.peak_bytes = 0

    @property
    def versions(self) -> List[int]:
        """The versions a snapshot is held of, oldest first."""
        return [s.version for s in self._snaps]

    @torch.no_grad()
    def save(self, version: int) -> None:
        """Right before update ``version`` (the live weights are W(version))."""
        snap = self._snaps.pop(0) if len(self._snaps) > self.depth else _Snapshot()
        live = self._weights()
        if len(snap.weights) != len(live) or any(a.shape != b.shape or a.dtype != b.dtype
                                                 for a, b in zip(snap.weights, live)):
            snap.weights = [torch.empty_like(t) for t in live]
        torch._foreach_copy_(snap.weights, live)
        keys, srcs, other = [], [], {}
        for i, q in enumerate(self._params):
            for key, v in self.optimizer.state.get(q, {}).items():
                if torch.is_tensor(v):
                    keys.append((i, key))
                    srcs.append(v)
                else:
                    other[(i, key)] = v
        if keys != snap.state_keys or any(a.shape != b.shape or a.dtype != b.dtype
                                          for a, b in zip(snap.state_tensors, srcs)):
            snap.state_tensors = [torch.empty_like(t) for t in srcs]
        if srcs:
            torch._foreach_copy_(snap.state_tensors, srcs)
        snap.state_keys, snap.state_other, snap.version = keys, other, version
        self._snaps.append(snap)
        self.bytes = sum(t.numel() * t.element_size() for s in self._snaps
                         for t in s.weights + s.state_tensors)
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def has(self, version: int) -> bool:
        return any(s.version == version for s in self._snaps)

    @torch.no_grad()
    def restore(self, version: int) -> bool:
        """Put back W(version) and the optimizer state of ``version`` if a snapshot of it is
        held (then forget it and every later one); False if none is (nothing to undo)."""
        at = next((i for i, s in enumerate(self._snaps) if s.version == version), None)
        if at is None:
            return False
        snap = self._snaps[at]
        torch._foreach_copy_(self._weights(), snap.weights)
        opt = self.optimizer
        live = {}
        for i, q in enumerate(self._params):
            for key, v in opt.state.get(q, {}).items():
                live[(i, key)] = v
        same = set(live) == set(snap.state_keys) | set(snap.state_other) and all(
            torch.is_tensor(live[k]) and live[k].shape == t.shape
            for k, t in zip(snap.state_keys, snap.state_tensors))
        if same:
            if snap.state_tensors:
                torch._foreach_copy_([live[k] for k in snap.state_keys], snap.state_tensors)
            for (i, key), v in snap.state_other.items():
                opt.state[self._params[i]][key] = v
        else:
            # The state's layout changed since (an optimizer's first step creates it): rebuild
            # it per parameter, and let a fused optimizer re-derive its flat state.
            for q in self._params:
                opt.state.pop(q, None)
            for (i, key), t in zip(snap.state_keys, snap.state_tensors):
                opt.state[self._params[i]][key] = t.clone()
            for (i, key), v in snap.state_other.items():
                opt.state[self._params[i]][key] = v
            if hasattr(opt, "_invalidate"):
                opt.__setstate__(opt.__getstate__())
        del self._snaps[at:]
        return True

    def clear(self) -> None:
        """Forget every snapshot (the buffers go back to the allocator)."""
        self._snaps.clear()
        self.bytes = 0
