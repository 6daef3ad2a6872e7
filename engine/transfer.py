"""Transfer: move a stage boundary value between pipeline devices on the executor's copy streams.

A boundary value is what one stage hands the next: a tensor, or a nesting of tuples, lists
and dicts of tensors and plain values (see :mod:`pipetrain.microbatch`) — forward outputs
going to the successor, input gradients going to the predecessor. :class:`Transfer` moves it
in two halves, each on the issuing thread of its own device::

    producer (device s), right after its action       consumer (device d), before its action
    ---------------------------------------------     --------------------------------------
    parcel = transfer.send(value, s, d)               value = transfer.receive(parcel)
      per tensor: dst = empty on device d               executor.wait(d, parcel.event)
      ev = executor.copy(src, dst, ..., s, d)           (CUDA: d's stream waits; CPU: blocks)

The copies run on the executor's copy stream of the pair (s, d) — ``cudaMemcpyPeerAsync`` on
CUDA (peer access or pinned staging, chosen by the executor), a ``memcpy`` on the stream's
own thread on CPU — so they overlap the producer's next computation. The copies of one value
go on one stream in order, so the consumer waits on the last event only.

Memory safety (why each reference is kept):

- The *source* must not be freed and reused while the copy stream reads it. A parcel holds
  its source tensors. On CPU the consumer's wait blocks until the copy is done, so they are
  dropped then. On CUDA the wait is only a stream-side dependency: the sources move to a
  list of retired parcels and are dropped once their event has completed (checked on every
  later send and receive, and by :meth:`Transfer.release`). This needs no handle of the
  copy stream (the alternative, ``record_stream`` on a ``torch.cuda.ExternalStream`` of it,
  would read a private attribute of the executor).
- The *destination* is allocated by torch's caching allocator for the consumer device's
  current stream, which may hand out a block that kernels already queued there still read.
  On CUDA each send therefore first makes the copy stream wait for an event recorded on the
  consumer's compute stream (a zero-byte copy whose ``after`` is that event: copies of a
  pair are in stream order, so every copy of the value comes after it).

The destination tensors are plain (``requires_grad=False``, no graph): the consuming
:class:`~pipetrain.stage.Stage` detaches its boundary inputs and marks float ones as
requiring grad itself, exactly as for a value handed over directly. Contiguous strided
tensors are copied byte for byte (non-contiguous ones are made contiguous first);
zero-size tensors are allocated on the destination without a copy; tensors of other
layouts (sparse) are moved with ``Tensor.to``; non-tensor leaves pass through unchanged.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Deque, List, Optional, Sequence

import torch

from pipetrain.microbatch import flatten, unflatten

__all__ = ["MODES", "Parcel", "Transfer", "check_mode", "uses_copy"]

MODES = ("auto", "copy", "direct")


def check_mode(mode: Any) -> str:
    """Validate a ``transfer=`` argument; returns it. Raises ValueError naming the allowed ones."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"transfer must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
    return mode


def uses_copy(mode: str, src: int, dst: int, src_device: torch.device, dst_device: torch.device) -> bool:
    """Whether a hand-over from pipeline device ``src`` (on ``src_device``) to ``dst`` goes
    through the executor's copy stream.

    ``"direct"``: never (``Tensor.to``, a no-op on the same device). ``"copy"``: whenever the
    two pipeline devices differ (also on CPU, where it is a ``memcpy`` on the copy stream's
    thread). ``"auto"``: when they differ and sit on two different CUDA devices. A hand-over
    within one pipeline device (p = 1) never copies.
    """
    check_mode(mode)
    if src == dst or mode == "direct":
        return False
    if mode == "copy":
        return True
    return src_device.type == "cuda" and dst_device.type == "cuda" and src_device != dst_device


class Parcel:
    """One boundary value in flight from pipeline device ``src`` to ``dst``.

    Attributes:
        value: the value with every copied tensor replaced by its destination tensor (on
            the destination device; to be read through :meth:`Transfer.receive`, which
            hands it over and clears this attribute).
        event: the executor event of the last copy (``None`` if nothing was copied).
        sources: the source tensors the copy stream reads (kept alive until it is done).
        src, dst: pipeline device indices. copies, nbytes: how many copies, how many bytes.
    """

    __slots__ = ("value", "event", "sources", "src", "dst", "copies", "nbytes", "received")

    def __init__(self, value: Any, event: Any, sources: List[torch.Tensor], src: int, dst: int,
                 nbytes: int) -> None:
        self.value, self.event, self.sources = value, event, sources
        self.src, self.dst = src, dst
        self.copies, self.nbytes = len(sources), nbytes
        self.received = False

    def __repr__(self) -> str:
        return (f"Parcel({self.src} -> {self.dst}, {self.copies} copies, {self.nbytes} bytes"
                f"{', received' if self.received else ''})")


class Transfer:
    """Moves boundary values between the pipeline devices of one executor.

    Args:
        executor: the :class:`~pipetrain.executor.Executor` running the pipeline; pipeline
            device ``i`` is its device ``i``.
        devices: the torch device of each pipeline device (``executor.num_devices`` entries).
        timeout: seconds a consumer waits for a copy before ``ExecutorError`` (CPU backend).

    ``send`` runs on the producer's issuing thread, ``receive`` on the consumer's; several
    devices may call them concurrently.
    """

    def __init__(self, executor: Any, devices: Sequence[Any], timeout: float = 60.0) -> None:
        devices = [torch.device(d) for d in devices]
        if len(devices) != executor.num_devices:
            raise ValueError(f"devices has {len(devices)} entries; the executor has "
                             f"{executor.num_devices} devices")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds; got {timeout}")
        self.executor, self.devices, self.timeout = executor, devices, timeout
        self._retired: Deque[Parcel] = deque()   # received, copy maybe still running (CUDA)
        self._lock = threading.Lock()

    def send(self, value: Any, src: int, dst: int) -> Parcel:
        """Producer side: enqueue the copies of every tensor of ``value`` from pipeline device
        ``src`` to ``dst``, after the work issued so far on ``src``; returns at once.

        ``value``'s tensors must not be modified in place afterwards (the copy reads them
        later); the parcel keeps them alive.
        """
        n = self.executor.num_devices
        if not (0 <= src < n and 0 <= dst < n):
            raise ValueError(f"src and dst must be pipeline devices in [0, {n}); got {src}, {dst}")
        self.release()
        src_dev, dst_dev = self.devices[src], self.devices[dst]
        leaves, spec = flatten(value)
        out: List[Any] = []
        jobs = []          # (source, destination) pairs to copy
        for t in leaves:
            if not isinstance(t, torch.Tensor):
                out.append(t)
                continue
            if t.layout != torch.strided:
                out.append(t.detach().to(dst_dev))   # no flat byte image to copy
                continue
            t = t.detach()
            if t.device != src_dev:   # the copy reads src_dev memory: put it there first
                t = t.to(src_dev)
            t = t.contiguous()
            d = torch.empty(t.shape, dtype=t.dtype, device=dst_dev)
            out.append(d)
            if t.numel():
                jobs.append((t, d))
        event = None
        nbytes = 0
        if jobs:
            ex = self.executor
            if dst_dev.type == "cuda":
                # Order the copy stream after the destination stream's queued work: the
                # caching allocator may have handed us a block those kernels still read.
                s0, d0 = jobs[0]
                ex.copy(s0.data_ptr(), d0.data_ptr(), 0, src, dst, after=ex.record(dst))
            after = ex.record(src)   # the producer's outputs are complete at this point
            for s, d in jobs:
                event = ex.copy(s.data_ptr(), d.data_ptr(), s.numel() * s.element_size(),
                                src, dst, after=after)
                nbytes += s.numel() * s.element_size()
        return Parcel(unflatten(out, spec), event, [s for s, _ in jobs], src, dst, nbytes)

    def receive(self, parcel: Parcel) -> Any:
        """Consumer side: make pipeline device ``parcel.dst`` wait for the copies; returns the
        value on the destination device. Call once, on the consumer's issuing thread."""
        if parcel.received:
            raise RuntimeError(f"{parcel!r} was already received")
        parcel.received = True
        value, parcel.value = parcel.value, None   # a retired parcel holds only its sources
        if parcel.event is not None:
            self.executor.wait(parcel.dst, parcel.event, timeout=self.timeout)
            if parcel.event.query():
                parcel.sources = []            # the copy is done: the sources may go
            else:
                with self._lock:               # CUDA: the wait is stream-side only
                    self._retired.append(parcel)
        self.release()
        return value

    def release(self) -> int:
        """Drop the sources of received parcels whose copies have completed (non-blocking).
        Returns how many parcels still hold sources."""
        with self._lock:
            keep: Deque[Parcel] = deque()
            while self._retired:
                p = self._retired.popleft()
                if p.event is not None and not p.event.query():
                    keep.append(p)
                else:
                    p.sources = []
            self._retired = keep
            return len(keep)

    def drain(self, timeout: Optional[float] = None) -> None:
        """Wait for every copy enqueued so far (all copy and compute streams of the executor),
        then drop every retained source. For the end of a failed step, before its parcels go."""
        self.executor.synchronize(self.timeout if timeout is None else timeout)
        with self._lock:
            for p in self._retired:
                p.sources = []
            self._retired.clear()

    @property
    def pending(self) -> int:
        """Received parcels whose sources are still held (their copy may still run)."""
        with self._lock:
            return len(self._retired)
