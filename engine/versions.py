"""Weight versions of one stage: which weights an action runs on, bound as flat-buffer views.

The plan (:mod:`pipetrain.plan`) says which version each F / B / I / W uses; the stage binds
it right before the action and releases it right after. Version numbers count the updates
(U actions) the stage has applied since the run started: version 0 is the weights the run
started with, the live weights after ``n`` updates are version ``n``. ``-1`` means "the live
weights, whatever their number" (plans without versions).

Binding the live version is free (nothing happens), so the synchronous path costs nothing.
An older version is another flat buffer of the same layout as the stage's
:class:`~pipetrain.flat_buffer.FlatBucket` (``keep`` copies the live weights into one before
an update overwrites them); binding it rebinds every parameter's ``.data`` to views of that
buffer (no copy; :meth:`FlatBucket.bind`) and ``release`` rebinds the live buffer.
Asynchronous schedules (weight stashing, 2BW) keep and drop versions through this class; the
flat buffers are made on first use, so a stage that never keeps a version is never flattened.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["LIVE", "WeightVersions", "PlannedVersions", "VersionError"]

#: The version number of an action that runs on the live weights.
LIVE = -1


class VersionError(RuntimeError):
    """An action asked for a weight version the stage does not hold."""


class WeightVersions:
    """The weight versions one stage holds.

    Args:
        params: the stage's parameters (the user's objects).
        name: for messages, e.g. ``"stage 2"``.

    Attributes:
        current: the number of the live version (updates applied since :meth:`reset`).
        bound: the version bound now (``current`` when nothing is bound).
    """

    #: Whether passes of one run may see the parameters rebound to other buffers while an
    #: update runs in between (asynchronous plans): the stage then keeps saved tensors
    #: through hooks (see Stage.forward).
    rebinds = False

    def __init__(self, params: Sequence[torch.nn.Parameter], name: str = "stage") -> None:
        self._params = list(params)
        self.name = name
        self.current = 0
        self.bound = 0
        self._buckets = None            # FlatParameters, made on first keep()
        self._live: List[torch.Tensor] = []
        self._kept: Dict[int, List[torch.Tensor]] = {}

    def reset(self) -> None:
        """A new run: the live weights are version 0 and no older version is held."""
        self.release()
        self.current = self.bound = 0
        self._kept.clear()

    @property
    def held(self) -> List[int]:
        """Versions that can be bound: the kept ones and the live one."""
        return sorted(set(self._kept) | {self.current})

    def keep(self) -> None:
        """Copy the live weights (version ``current``) so it can still be bound after the next
        update. One ``copy_`` per flat bucket."""
        if self._buckets is None:
            self._buckets = _buckets_of(self._params)
            self._live = [b.data for b in self._buckets]
        bufs = []
        for bucket, live in zip(self._buckets, self._live):
            buf = bucket.new_buffer(zero=False)
            buf.copy_(live)
            bufs.append(buf)
        self._kept[self.current] = bufs

    def drop(self, version: int) -> None:
        """Forget a kept version (its buffers go back to the allocator)."""
        self._kept.pop(version, None)

    def advance(self) -> None:
        """The live weights were just updated: they are now version ``current + 1``."""
        if self.bound != self.current:
            raise VersionError(f"{self.name}: an update ran while version {self.bound} was "
                               f"bound (live is {self.current})")
        self.current += 1
        self.bound = self.current

    def bind(self, version: int, action=None) -> None:
        """Make the parameters hold ``version`` (``LIVE`` or the live number: no-op).
        ``action`` (the plan action about to run) matters to :class:`PlannedVersions` only."""
        if version == LIVE or version == self.bound:
            return
        if version == self.current:
            self.release()
            return
        bufs = self._kept.get(version)
        if bufs is None:
            raise VersionError(f"{self.name}: weight version {version} is not held "
                               f"(held: {self.held})")
        for bucket, buf in zip(self._buckets, bufs):
            bucket.bind(buf)
        self.bound = version

    def before_update(self, optimizer) -> None:
        """Called by ``Stage.update`` right before the optimizer step (no-op here)."""

    def release(self) -> None:
        """Rebind the live weights (after an action that ran on an older version)."""
        if self.bound == self.current:
            return
        for bucket, live in zip(self._buckets, self._live):
            bucket.bind(live)
        self.bound = self.current

    def tensors(self, version: int) -> Optional[List[torch.Tensor]]:
        """The flat buffers of a kept version (None for the live one or one not held)."""
        return self._kept.get(version)


def _buckets_of(params: Sequence[torch.nn.Parameter]) -> list:
    """The flat buckets holding exactly ``params``: the existing ones when the user (or an
    optimizer) flattened them already, so their views stay valid; else new ones."""
    from pipetrain import flat_buffer
    found = {}
    for p in params:
        entry = flat_buffer.bucket_of(p)
        if entry is None:
            break
        found[id(entry[0])] = entry[0]
    else:
        ids = {id(p) for p in params}
        if all({id(q) for q in b.params} <= ids for b in found.values()):
            return list(found.values())
    return list(flat_buffer.flatten(params, grads=False))


class PlannedVersions(WeightVersions):
    """The versions an asynchronous plan needs on one stage, kept and dropped by counting.

    Args:
        params: the stage's parameters; name: for messages.
        optimizer: the stage's optimizer (its state is what prediction reads).
        schedule: the schedule name (:mod:`pipetrain.async_schedules`).
        actions: this stage's plan actions (F/B/I/W with versions, U), in the order of the
            plan; only the passes are counted. None: passes are counted by :meth:`register`
            as a streamed run learns of them (``train()``, window by window).
        log_depth: keep pre-update snapshots of the last ``log_depth + 1`` updates
            (:class:`~pipetrain.rollback.UpdateLog`, attribute ``log``) so :meth:`rollback`
            can undo them after a failure; None: none kept.

    Each pass names a version v and, for a predicting schedule, a distance s = t - v
    (:func:`~pipetrain.async_schedules.prediction_distance`). Key (v, 0) binds W(v) itself;
    key (v, s > 0) binds a predicted buffer W_hat = W(v) - s * direction(state(v)), built at
    the key's first pass (a copy of W(v) into a pooled flat buffer, then one in-place update
    on its views) and reused by every later pass with that key, returned to the pool after
    the last. Before each update (:meth:`before_update`) the live weights W(n) are kept only
    if a later pass still reads them (or predicts from them), and the optimizer state of
    version n is snapshotted only if a prediction from W(n) has not been built yet. So
    pipedream holds ceil((p-r-1)/m) + 1 versions at most, 2bw exactly two.

    Attributes:
        peak_versions: most weight versions held at once (live included).
        peak_predicted: most predicted buffers held at once.
        peak_bytes: most bytes of kept + predicted buffers (the live weights excluded).
        peak_buffers: most weight buffers held at once, live + kept + predicted: what the
            simulator reports as ``peak_versions`` (:mod:`pipetrain.version_memory`).
    """

    rebinds = True

    def __init__(self, params: Sequence[torch.nn.Parameter], name: str, optimizer, schedule: str,
                 actions: Optional[Sequence] = None, log_depth: Optional[int] = None) -> None:
        super().__init__(params, name)
        from pipetrain import async_schedules, prediction
        self.optimizer = optimizer
        self.schedule = schedule
        self._groups = prediction.group_of(optimizer, self._params) \
            if schedule in async_schedules.PREDICTING else None
        self._pool: List[List[torch.Tensor]] = []      # free predicted buffers
        self._wpool: List[List[torch.Tensor]] = []     # free version buffers
        self.peak_versions = self.peak_predicted = self.peak_bytes = self.peak_buffers = 0
        self._pass: Optional[tuple] = None
        #: Pre-update snapshots for a rollback after a failure (None: none kept).
        self.log = None
        if log_depth is not None:
            from pipetrain.rollback import UpdateLog
            self.log = UpdateLog(self._params, optimizer, log_depth, weights=self._live_buffers)
        # A whole plan given up front (one run, e.g. across processes): its passes are
        # registered again at every reset(), i.e. at the start of each run of that plan.
        self._plan_uses = None if actions is None else [
            (a.version, async_schedules.prediction_distance(schedule, a))
            for a in actions if a.kind in ("F", "B", "I", "W")]
        self.reset()

    def reset(self) -> None:
        super().reset()
        from collections import Counter
        self._need_w, self._need_state, self._need_pred = Counter(), Counter(), Counter()
        self._seen: set = set()
        self._pred: Dict[tuple, List[torch.Tensor]] = {}
        self._states: Dict[int, list] = {}
        self._pass: Optional[tuple] = None
        if self.log is not None:
            self.log.clear()
        if getattr(self, "_plan_uses", None):
            self.register(self._plan_uses)

    def register(self, uses) -> None:
        """Count passes still to run: ``(version, distance)`` each. A streamed run registers,
        window by window, the F and B of every forward whose data is known, before any of them
        runs; a version is then kept at its update iff a registered pass still reads it (the
        forwards registered later all run on newer versions: see
        :mod:`pipetrain.async_windows`)."""
        for v, s in uses:
            if s == 0:
                self._need_w[v] += 1
                continue
            self._need_pred[(v, s)] += 1
            if (v, s) not in self._seen:   # the base and its state are read once, at the build
                self._seen.add((v, s))
                self._need_w[v] += 1
                self._need_state[v] += 1

    def _live_buffers(self) -> List[torch.Tensor]:
        self._ensure_buckets()
        return self._live

    def rollback(self, version: int) -> bool:
        """After a failed run: put back W(version) and its optimizer state if this stage went
        past it (or failed inside its update); True if anything was undone."""
        self.release()
        if self.log is None:
            return False
        return self.log.restore(version)

    def _ensure_buckets(self) -> None:
        if self._buckets is None:
            self._buckets = _buckets_of(self._params)
            self._live = [b.data for b in self._buckets]

    def _measure(self) -> None:
        # Measured right before the update: the live buffer becomes W(n+1), so count it apart.
        self.peak_versions = max(self.peak_versions, len(self._kept) + 1)
        self.peak_predicted = max(self.peak_predicted, len(self._pred))
        self.peak_buffers = max(self.peak_buffers, len(self._kept) + len(self._pred) + 1)
        per = sum(t.numel() * t.element_size() for t in self._live)
        self.peak_bytes = max(self.peak_bytes, per * (len(self._kept) + len(self._pred)))

    def before_update(self, optimizer) -> None:
        """Keep W(n) and snapshot state(n) if a later pass needs them (n = current)."""
        from pipetrain import prediction
        n = self.current
        if self.log is not None:
            self.log.save(n)
        if self._need_w[n] > 0:
            # The in-flight forwards' autograd graphs hold views of the live buffer, so W(n)
            # keeps *that* buffer and the live weights move to a copy the update then
            # overwrites (one copy, like keep(); a dropped version's buffer is reused).
            self._ensure_buckets()
            fresh = self._wpool.pop() if self._wpool else \
                [b.new_buffer(zero=False) for b in self._buckets]
            for buf, live in zip(fresh, self._live):
                buf.copy_(live)
            self._kept[n] = self._live
            for bucket, buf in zip(self._buckets, fresh):
                bucket.bind(buf)
            self._live = fresh
        if self._need_state[n] > 0:
            self._states[n] = prediction.snapshot_state(self.optimizer, self._params)
        self._measure()
        self._prune(n)

    def _prune(self, n: int) -> None:
        """Forget the counts of versions before n that no pass reads any more, so a stream of
        any length keeps a few entries (registrations only ever add versions >= current)."""
        for counter in (self._need_w, self._need_state):
            for v in [v for v, c in counter.items() if v < n and c <= 0]:
                del counter[v]
        for key in [k for k, c in self._need_pred.items() if k[0] < n and c <= 0]:
            del self._need_pred[key]
            self._seen.discard(key)

    def _read_w(self, v: int) -> None:
        self._need_w[v] -= 1
        if self._need_w[v] <= 0 and v != self.current and v in self._kept:
            self._wpool.append(self._kept.pop(v))

    def bind(self, version: int, action=None) -> None:
        if action is None or self._groups is None:
            self._pass = (version, 0) if action is not None else None
            super().bind(version)
            return
        from pipetrain import prediction
        s = action.microbatch // action.num_microbatches - version
        self._pass = (version, s)
        if s == 0:
            super().bind(version)
            return
        key = (version, s)
        bufs = self._pred.get(key)
        self._ensure_buckets()
        if bufs is None:
            base = self._live if version == self.current else self._kept.get(version)
            if base is None:
                raise VersionError(f"{self.name}: prediction from version {version}, not held "
                                   f"(held: {self.held})")
            state = prediction.live_state(self.optimizer, self._params) \
                if version == self.current else self._states.pop(version)
            bufs = self._pool.pop() if self._pool else \
                [b.new_buffer(zero=False) for b in self._buckets]
            fused = version == self.current and _is_pipetrain_optim(self.optimizer)
            for bucket, buf in zip(self._buckets, bufs):
                bucket.bind(buf)
            if fused:
                # pipetrain.optim's fused predict: one pass reading the live weights and state,
                # writing the views of this (pooled) buffer.
                views = [q.data for g in self.optimizer.param_groups for q in g["params"]]
                for bucket, live in zip(self._buckets, self._live):
                    bucket.bind(live)
                self.optimizer.predict(s, out=views)
                for bucket, buf in zip(self._buckets, bufs):
                    bucket.bind(buf)
            else:   # an older version's (snapshotted) state, or a torch.optim optimizer
                for buf, src in zip(bufs, base):
                    buf.copy_(src)
                prediction.apply_prediction([p.data for p in self._params], state,
                                            self._groups, s)
            self._pred[key] = bufs
            self._need_state[version] -= 1
            self._read_w(version)
            self._measure()
        else:
            for bucket, buf in zip(self._buckets, bufs):
                bucket.bind(buf)
        self.bound = ("predicted",) + key

    def release(self) -> None:
        super().release()
        done, self._pass = self._pass, None
        if done is None:
            return
        v, s = done
        if s == 0:
            self._read_w(v)
            return
        self._need_pred[done] -= 1
        if self._need_pred[done] <= 0:
            self._pool.append(self._pred.pop(done))


def _is_pipetrain_optim(opt) -> bool:
    return type(opt).__module__.startswith("pipetrain.optim") and hasattr(opt, "predict")
