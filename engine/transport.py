"""Transport: how a boundary value crosses one edge of the stage graph — one interface.

A transport moves a value (a tensor, or a tuple / list / dict of tensors and plain values)
from the pipeline device of an edge's producer to the device of its consumer, in two halves,
each called on the issuing thread of its own device::

    token = transport.send(value, src, dst)     # producer, right after its action
    value = transport.receive(token)            # consumer, right before its action

The token sits in the :class:`~pipetrain.mailbox.Mailbox` in between. Which transport an edge
uses is decided once per edge (:func:`for_edges`), never per action:

- :class:`Handoff`: the value itself (no copy) — both ends in one memory (CPU, or one GPU).
- :class:`Direct`: ``Tensor.to(device, non_blocking=True)`` on the consumer's thread.
- :class:`CopyStream`: the executor's copy stream of the device pair
  (:mod:`pipetrain.transfer`): ``cudaMemcpyPeerAsync`` on CUDA, a ``memcpy`` ordered by
  events on CPU; the copy overlaps the producer's next action.
- across processes (torch.distributed ``isend``/``irecv``) is another implementation of the
  same two calls; the multi-process issue adds it here.

``transfer=`` on the Pipeline chooses: ``"auto"`` (copy streams between two CUDA devices,
hand-off otherwise), ``"copy"`` (copy streams whenever the devices differ, also on CPU),
``"direct"`` (``Tensor.to``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from pipetrain import transfer as _copy
from pipetrain.microbatch import tree_map

__all__ = ["MODES", "Transport", "Handoff", "Direct", "CopyStream", "check_mode", "for_edges"]

MODES = _copy.MODES
check_mode = _copy.check_mode


class Transport:
    """The two halves of moving a boundary value along an edge (see module docstring)."""

    name = "transport"

    def send(self, value: Any, src: int, dst: int) -> Any:
        """Producer side: start moving ``value`` from pipeline device ``src`` to ``dst``;
        returns the token the consumer passes to :meth:`receive`."""
        raise NotImplementedError

    def receive(self, token: Any) -> Any:
        """Consumer side: the value, usable on the consumer's device."""
        raise NotImplementedError

    def drain(self, timeout: float) -> None:
        """Wait until nothing this transport started can still touch memory (after a failed
        run, before its tokens are dropped)."""

    def __repr__(self) -> str:
        return self.name


class Handoff(Transport):
    """Both ends share memory: the consumer gets the producer's objects."""

    name = "handoff"

    def send(self, value: Any, src: int, dst: int) -> Any:
        return value

    def receive(self, token: Any) -> Any:
        return token


class Direct(Transport):
    """``Tensor.to(device, non_blocking=True)`` on the consumer's thread."""

    name = "direct"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def send(self, value: Any, src: int, dst: int) -> Any:
        return value

    def receive(self, token: Any) -> Any:
        return to_device(token, self.device)


class CopyStream(Transport):
    """The executor's copy stream of the device pair (one :class:`~pipetrain.transfer.Transfer`
    shared by every edge of one executor)."""

    name = "copy"

    def __init__(self, transfer: _copy.Transfer) -> None:
        self.transfer = transfer

    def send(self, value: Any, src: int, dst: int) -> Any:
        return self.transfer.send(value, src, dst)

    def receive(self, token: Any) -> Any:
        return self.transfer.receive(token)

    def drain(self, timeout: float) -> None:
        self.transfer.drain(timeout)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor of ``obj`` to ``device`` (no copy for those already there)."""
    if obj is None:
        return None
    return tree_map(lambda t: t.to(device, non_blocking=True)
                    if isinstance(t, torch.Tensor) and t.device != device else t, obj)


def for_edges(mode: str, edges: Sequence[Tuple[int, int, int]], device_of_stage: Sequence[int],
              devices: Sequence[torch.device], executor: Any = None,
              timeout: float = 60.0) -> Dict[int, Transport]:
    """One transport per edge.

    Args:
        mode: ``"auto"``, ``"copy"`` or ``"direct"`` (see module docstring).
        edges: ``(edge id, producer stage, consumer stage)`` triples.
        device_of_stage: pipeline device of each stage.
        devices: torch device of each pipeline device.
        executor: the :class:`~pipetrain.executor.Executor`, needed when an edge copies.
    Returns:
        ``{edge id: Transport}``; edges of one kind share one transport object.
    """
    check_mode(mode)
    handoff = Handoff()
    copier: Optional[CopyStream] = None
    direct: Dict[torch.device, Direct] = {}
    out: Dict[int, Transport] = {}
    for e, src_stage, dst_stage in edges:
        a, b = device_of_stage[src_stage], device_of_stage[dst_stage]
        if _copy.uses_copy(mode, a, b, devices[a], devices[b]):
            if copier is None:
                copier = CopyStream(_copy.Transfer(executor, devices, timeout=timeout))
            out[e] = copier
        elif devices[a] == devices[b]:
            out[e] = handoff
        else:
            out[e] = direct.setdefault(devices[b], Direct(devices[b]))
    return out
