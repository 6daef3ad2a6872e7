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

__all__ = ["LIVE", "WeightVersions", "VersionError"]

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

    def bind(self, version: int) -> None:
        """Make the parameters hold ``version`` (``LIVE`` or the live number: no-op)."""
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
