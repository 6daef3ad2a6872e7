"""Wire: boundary values between ranks as torch.distributed point-to-point messages.

One *stream* per (edge, direction) of the stage graph carries the messages of that edge in
one direction (forward values producer -> consumer, gradients back), in the order the
schedule sends them (:class:`Stream` describes a message: a small header and a description
on the control plane — a gloo group on CPU tensors — and one packed buffer per value on the
data plane — the device's group, NCCL on GPU). Each part has its own tag (``tag_of``): gloo
matches messages per source and tag, in order, so receives of different parts can be posted
ahead independently; NCCL ignores tags, so there every edge has a data group of its own
(:class:`~pipetrain.distributed.mesh.P2PGroups`). A sequence number in every header catches
ranks whose schedules disagree.

Waits. Receives block on the issuing thread, bounded by the point-to-point group's timeout
(the pipeline's ``timeout``); a dead peer makes gloo fail them at once (connection closed)
and the error names that rank and the action. Other waits (sends at the end of a run,
collectives) go through :func:`wait_all`: gloo's works cannot be polled, so helper threads
block on them while the caller watches the futures, a shared failure *board* (the process
group's store: the first failure of a step is posted there, so a rank waiting on a
collective learns the origin within a poll) and a deadline.
"""

from __future__ import annotations

import pickle
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from pipetrain.mailbox import VALUE
from pipetrain.microbatch import flatten, unflatten

__all__ = ["Board", "PeerFailed", "Stream", "tag_of", "wait_all", "watch", "encode",
           "unpack", "check_board_and_deadline"]

HEADER, META, DATA, RESIZED = 0, 1, 2, 3


def tag_of(edge: int, direction: str, part: int) -> int:
    """The tag of one part of the messages of stream (edge, direction)."""
    return (edge * 2 + (0 if direction == VALUE else 1)) * 4 + part


class PeerFailed(RuntimeError):
    """Another rank failed or stopped answering; the message says which and where."""

    def __init__(self, message: str, rank: Optional[int] = None) -> None:
        super().__init__(message)
        self.rank = rank


class Board:
    """Where the first failure of a step is posted for every rank (the process group's store).

    Keys are per pipeline and step, so a new step never sees an old failure. Store errors
    (the rank hosting the store died) read as that rank having stopped answering.
    """

    def __init__(self, store: Any, prefix: str, host_rank: int = 0) -> None:
        self.store, self.prefix, self.host_rank = store, prefix, host_rank
        self.step = 0

    def _key(self) -> str:
        return f"{self.prefix}/failed/{self.step}"

    def post(self, text: str) -> None:
        """Publish ``text`` as this step's failure (the first post wins)."""
        if self.store is None:
            return
        try:
            # compare_set with an empty expected value only writes when the key is absent.
            self.store.compare_set(self._key(), "", text)
        except Exception:  # noqa: BLE001  the store's host is gone: nothing to tell anyone
            pass

    def read(self) -> Optional[str]:
        """This step's failure, if one was posted."""
        if self.store is None:
            return None
        try:
            if self.store.check([self._key()]):
                return self.store.get(self._key()).decode()
        except Exception as err:  # noqa: BLE001
            return (f"rank {self.host_rank} (host of the process group's store) stopped "
                    f"answering ({type(err).__name__}: {err})")
        return None


# gloo's point-to-point works cannot be polled (is_completed stays False until wait() is
# called) and a wait with a timeout breaks the pair, so blocking waits run on helper threads
# and the caller polls their futures, the board and its deadline.
_WAITERS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="pipetrain-wait")


def _peer_error(err: BaseException, peer: Optional[int], me: int, what: str) -> PeerFailed:
    who = f"rank {peer}" if peer is not None else "a rank of the group"
    first = str(err).splitlines()[0] if str(err) else ""
    return PeerFailed(f"{who} stopped answering ({type(err).__name__}: {first}): rank {me} "
                      f"was waiting for {what}", rank=peer)


def watch(done: Callable[[float], bool], *, deadline: float, board: Board,
          peer: Optional[int], me: int, what: str) -> None:
    """Call ``done(poll_seconds)`` until it is True; between calls read ``board`` and check
    ``deadline``. Raises PeerFailed (another rank's posted failure, or the deadline)."""
    while not done(0.1):
        check_board_and_deadline(board, deadline, peer=peer, me=me, what=what)


def check_board_and_deadline(board: Board, deadline: float, *, peer: Optional[int], me: int,
                             what: str) -> None:
    """Raise PeerFailed if another rank posted a failure on ``board`` or ``deadline``
    (``time.monotonic()``) has passed: the checks of every bounded wait between polls."""
    posted = board.read()
    if posted is not None:
        raise PeerFailed(f"{posted} (rank {me} was waiting for {what})")
    if time.monotonic() >= deadline:
        who = f"rank {peer}" if peer is not None else "a rank of the group"
        raise PeerFailed(f"{who} stopped answering: rank {me} waited for {what} past the "
                         f"timeout", rank=peer)


def wait_all(works: Sequence[Any], *, deadline: float, board: Board, peer: Optional[int],
             me: int, what: str) -> None:
    """Wait for torch.distributed ``works`` until ``deadline`` (``time.monotonic()``),
    watching ``board``. Raises PeerFailed naming ``peer`` (the rank the works wait on; None
    for a collective) when an operation fails (a dead peer closes the connection), when
    another rank posted a failure, or when the deadline passes."""
    futures = [_WAITERS.submit(w.wait) for w in works if w is not None]
    if not futures:
        return

    def done(poll: float) -> bool:
        return not futures_wait(futures, timeout=poll, return_when=FIRST_EXCEPTION).not_done \
            or any(f.done() and f.exception() is not None for f in futures)

    watch(done, deadline=deadline, board=board, peer=peer, me=me, what=what)
    for f in futures:
        if f.exception() is not None:
            raise _peer_error(f.exception(), peer, me, what) from None


def encode(value: Any) -> Tuple[List[torch.Tensor], bytes]:
    """The tensors of ``value`` (contiguous) and the description of everything else."""
    leaves, spec = flatten(value)
    tensors, desc = [], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach()
            tensors.append(t if t.is_contiguous() else t.contiguous())
            desc.append(("t", tuple(t.shape), t.dtype))
        else:
            desc.append(("o", leaf))
    return tensors, pickle.dumps((spec, desc), protocol=pickle.HIGHEST_PROTOCOL)


ALIGN = 16   # byte offset of every tensor in a packed message (dtype views need alignment)


def _layout(desc: Sequence[Any]) -> Tuple[List[Tuple[int, int]], int]:
    """(offset, nbytes) of each tensor leaf in a packed message, and the message's size
    (at least ``ALIGN``: a message without tensors still has a buffer to send)."""
    out, off = [], 0
    for d in desc:
        if d[0] != "t":
            continue
        n = torch.Size(d[1]).numel() * torch.empty((), dtype=d[2]).element_size()
        out.append((off, n))
        off += (n + ALIGN - 1) // ALIGN * ALIGN
    return out, max(off, ALIGN)


def unpack(buf: torch.Tensor, meta: Tuple[Any, Sequence[Any]],
           cached: Tuple[Any, List[Tuple[int, int]]]) -> Tuple[Any, Tuple[Any, List[Tuple[int, int]]]]:
    """The value of the packed message ``buf`` (uint8, the layout of :func:`_layout`) described
    by ``meta`` = (structure, leaf descriptions): tensor leaves are views into ``buf``.
    ``cached`` is the (meta, layout) pair a previous call returned; the layout is computed
    again only when ``meta`` is a different object. Returns (value, the pair to cache)."""
    spec, desc = meta
    if cached[0] is not meta:
        cached = (meta, _layout(desc)[0])
    it = iter(cached[1])
    leaves = []
    for d in desc:
        if d[0] == "t":
            off, n = next(it)
            leaves.append(buf[off:off + n].view(d[2]).view(d[1]))
        else:
            leaves.append(d[1])
    return unflatten(leaves, spec), cached


class Stream:
    """The messages of one (edge, direction) between this rank and ``peer``.

    Two planes, so that on CUDA no message costs a host synchronization:

    - control (``groups.ctrl``, gloo, CPU tensors): per message an int64[5] *header*
      ``(seq, flag, packed size, description bytes, sender clock ns)``, then the
      description (structure, shapes, dtypes, plain leaves) when it changed, or an error's
      text. The receiver reads flags and sequence numbers here, on the host, from CPU memory.
    - data (``groups.data(edge)``: NCCL on GPU, gloo on CPU): one *packed* buffer per message
      on the rank's device holding every tensor leaf. The receiver never reads it on the host:
      it waits for it with ``work.wait()`` on the current (compute) stream (NCCL makes the
      stream wait, not the host; on gloo the wait is the host's, which is the compute).

    ::

        first message of a run:  header + [description] + packed (resized tag, fresh receive)
        unchanged (seq >= 1):    header + packed (data tag), into the buffer the receiver
                                 posted as soon as the previous message was in
        changed (seq >= 1):      a filler of the previous size (data tag: fills the posted
                                 receive), header flagged RESIZE + description + packed (resized tag)
        error:                   a filler (if a receive may be posted), header seq -1 + text

    Headers are posted ahead too (the first ``LOOKAHEAD`` actions early, each later one when
    its predecessor arrives), so a message's two parts are in flight before their action.
    Both halves run on this rank's issuing thread. Blocking waits are bounded by the groups'
    timeout (the pipeline's ``timeout``); a dead peer fails them at once.
    """

    RESIZE, ERROR = 1, 2    # flags in a header

    def __init__(self, edge: int, direction: str, peer: int, device: torch.device,
                 name: str, group: Any = None) -> None:
        self.edge, self.direction, self.peer, self.device = edge, direction, peer, device
        self.ctrl_group, self.data_group = _split(group, edge)
        self.name = f"{name} ({'values' if direction == VALUE else 'gradients'})"
        self.tags = [tag_of(edge, direction, part) for part in (HEADER, META, DATA, RESIZED)]
        self.meta: Any = None            # receiving: the description in force
        self.sent_meta: Optional[bytes] = None
        self.sent_size = 0               # sending: packed size of the previous message
        self._layout: List[Tuple[int, int]] = []
        self._recv_layout: Tuple[Any, List[Tuple[int, int]]] = (None, [])
        self.seq = 0                     # sending: next sequence number, per run
        self._next = 0                   # receiving: next sequence number, per run
        self._expected = 0               # receiving: messages in this run
        self._header: Optional[Tuple[torch.Tensor, Any]] = None   # next header, posted ahead
        self._spec: Optional[Tuple[torch.Tensor, Any]] = None     # next packed message, posted
        self.times: Dict[int, Tuple[int, int, int, int]] = {}  # seq -> sent, arrived, wait from, to

    def begin_run(self, expected: int = 0) -> None:
        """Start a run that receives ``expected`` messages on this stream."""
        self.seq, self._next, self.times = 0, 0, {}
        self._expected, self._header, self._spec = expected, None, None

    def _isend(self, t: torch.Tensor, part: int) -> Any:
        group = self.data_group if part in (DATA, RESIZED) else self.ctrl_group
        return dist.isend(t, dst=self.peer, tag=self.tags[part], group=group)

    def _irecv(self, t: torch.Tensor, part: int) -> Any:
        group = self.data_group if part in (DATA, RESIZED) else self.ctrl_group
        return dist.irecv(t, src=self.peer, tag=self.tags[part], group=group)

    # -- sending -------------------------------------------------------------------------
    def send(self, value: Any) -> Tuple[List[Any], List[torch.Tensor]]:
        """Post the message for ``value``; returns the works and the buffers to keep alive."""
        tensors, meta = encode(value)
        changed = meta != self.sent_meta
        desc = pickle.loads(meta)[1] if changed else None
        layout, size = _layout(desc) if changed else (self._layout, self.sent_size)
        seq = self.seq
        self.seq += 1
        buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        for t, (off, n) in zip(tensors, layout):
            buf[off:off + n].copy_(t.reshape(-1).view(torch.uint8))
        works, keep = [], [buf]
        flag = 0
        if seq > 0 and changed:      # fill the receive the peer posted, flagged in the header
            filler = torch.zeros(self.sent_size, dtype=torch.uint8, device=self.device)
            works.append(self._isend(filler, DATA))
            keep.append(filler)
            flag = self.RESIZE
        described = meta if changed else b""   # the peer keeps the last one
        header = torch.tensor([seq, flag, size, len(described), time.monotonic_ns()],
                              dtype=torch.int64)
        works.append(self._isend(header, HEADER))
        keep.append(header)
        if described:
            mbuf = torch.frombuffer(bytearray(described), dtype=torch.uint8)
            works.append(self._isend(mbuf, META))
            keep.append(mbuf)
        works.append(self._isend(buf, RESIZED if seq == 0 or changed else DATA))
        self.sent_meta, self.sent_size, self._layout = meta, size, layout
        return works, keep

    def send_error(self, text: str) -> Tuple[List[Any], List[torch.Tensor]]:
        """Tell the peer, waiting (or about to wait) on this stream, that this step failed."""
        works, keep = [], []
        if self.seq > 0 and self.sent_size:   # the peer may have a packed receive posted
            filler = torch.zeros(self.sent_size, dtype=torch.uint8, device=self.device)
            works.append(self._isend(filler, DATA))
            keep.append(filler)
        raw = text.encode()
        header = torch.tensor([-1, self.ERROR, 0, len(raw), time.monotonic_ns()], dtype=torch.int64)
        mbuf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        works += [self._isend(header, HEADER), self._isend(mbuf, META)]
        return works, keep + [header, mbuf]

    # -- receiving -----------------------------------------------------------------------
    def _post_header(self) -> None:
        header = torch.zeros(5, dtype=torch.int64)
        self._header = (header, self._irecv(header, HEADER))

    def post(self) -> None:
        """Post the receive of the run's first header ahead of its action (later headers
        and packed messages are posted as their predecessor comes in)."""
        if self._next == 0 and self._header is None and self._expected:
            self._post_header()

    def _wait(self, work: Any, me: int, what: str) -> None:
        try:
            work.wait()
        except Exception as err:  # noqa: BLE001  closed connection (dead peer) or timeout
            raise _peer_error(err, self.peer, me, what) from None

    def _wait_data(self, work: Any, me: int, what: str) -> None:
        """The consumer's wait for a packed message: on CUDA the current stream (the stage's
        compute stream on the issuing thread) waits for the transfer, the host does not."""
        if self.device.type == "cuda":
            with torch.cuda.stream(torch.cuda.current_stream(self.device)):
                self._wait(work, me, what)
        else:
            self._wait(work, me, what)

    def take(self, *, me: int, what: str) -> Any:
        """The next message's value (blocking on its header, bounded by the group's timeout).
        Raises PeerFailed when the peer died, timed out or reported an error."""
        seq = self._next
        self._next += 1
        t0 = time.monotonic_ns()
        if self._header is None:
            self._post_header()
        header, work = self._header
        self._header = None
        self._wait(work, me, what)
        got, flag, size, meta_len, sent_ns = header.tolist()    # CPU memory: no device sync
        if meta_len:
            mbuf = torch.empty(meta_len, dtype=torch.uint8)
            self._wait(self._irecv(mbuf, META), me, what)
            raw = mbuf.numpy().tobytes()
            if got == -1:
                raise PeerFailed(f"{raw.decode(errors='replace')} (rank {me} was waiting "
                                 f"for {what})")
            self.meta = pickle.loads(raw)
        if got != seq:
            raise RuntimeError(f"{what}: rank {self.peer} sent message {got} of {self.name} "
                               f"where {seq} was expected (the ranks' schedules disagree)")
        if self.meta is None:
            raise RuntimeError(f"{what}: rank {self.peer} sent no description on {self.name}")
        posted, self._spec = self._spec, None
        if flag == 0 and posted is not None:
            buf, work = posted
            if buf.numel() != size:
                raise RuntimeError(f"{what}: rank {self.peer} sent {size} bytes unflagged where "
                                   f"{buf.numel()} were posted on {self.name}")
        elif flag in (0, self.RESIZE):
            if posted is not None:       # the filler that completes the posted receive
                self._wait(posted[1], me, what)
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            work = self._irecv(buf, RESIZED)
        else:
            raise RuntimeError(f"{what}: a malformed header from rank {self.peer}: {header.tolist()}")
        if seq + 1 < self._expected:
            # The next message most likely looks the same: post its header and packed
            # receive now, so both are in place long before they are sent.
            self._post_header()
            nxt = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._spec = (nxt, self._irecv(nxt, DATA))
        self._wait_data(work, me, what)
        t1 = time.monotonic_ns()
        self.times[seq] = (sent_ns, t1, t0, t1)
        value, self._recv_layout = unpack(buf, self.meta, self._recv_layout)
        return value


def _split(group: Any, edge: int) -> Tuple[Any, Any]:
    """(control group, data group of ``edge``) from a
    :class:`~pipetrain.distributed.mesh.P2PGroups` (or one plain group for both)."""
    if hasattr(group, "ctrl"):
        return group.ctrl, group.data(edge)
    return group, group
