"""Wire: boundary values between ranks as torch.distributed point-to-point messages.

One *stream* per (edge, direction) of the stage graph carries the messages of that edge in
one direction (forward values producer -> consumer, gradients back), in the order the
schedule sends them. A message is::

    header   int64[3] = (sequence number, length of the description (0: unchanged), the
             sender's monotonic clock in ns when it posted the message: for the overlap
             measurement, meaningful between ranks of one machine)
    meta     uint8[len]: pickled structure, shapes, dtypes, plain (non-tensor) leaves —
             sent only when they differ from this stream's previous message
    data     one tensor per tensor leaf

Each part has its own tag (``tag_of``), so a receiver can post the next headers early
without them matching another part (gloo matches messages per source and tag, in order).
The sequence number catches a schedule whose sends and receives disagree on the order.

Every wait is bounded (:func:`wait_all`): it polls the works, a shared failure *board* (the
process group's store: a rank that fails posts its error there, so ranks waiting on someone
else learn about it within a poll interval) and a deadline. A peer that dies makes gloo fail
the pending operation (connection closed) and the wait names that rank.
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

__all__ = ["Board", "PeerFailed", "Stream", "tag_of", "wait_all", "watch", "encode"]

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


class Stream:
    """The messages of one (edge, direction) between this rank and ``peer``.

    Both halves run on this rank's issuing thread (no helper thread, so no hand-over of the
    GIL delays a message): :meth:`send` posts the header, the description if it changed, and
    the data; :meth:`post` posts the receive of the next header ahead of its action, and
    :meth:`take` (the RF / RB action) waits for that header, receives the data and returns
    the value. Blocking waits are bounded by the pipeline's process group timeout (the
    pipeline's ``timeout``); a failing rank sends an *error header* (sequence number -1 and
    its message) on its outgoing streams, so a rank waiting on it learns the origin at once.
    """

    def __init__(self, edge: int, direction: str, peer: int, device: torch.device,
                 name: str, group: Any = None) -> None:
        self.edge, self.direction, self.peer, self.device = edge, direction, peer, device
        self.group = group
        self.name = f"{name} ({'values' if direction == VALUE else 'gradients'})"
        self.tags = [tag_of(edge, direction, part) for part in (HEADER, META, DATA, RESIZED)]
        self.meta: Any = None            # receiving: the description in force
        self.sent_meta: Optional[bytes] = None
        self.seq = 0                     # sending: next sequence number, per run
        self._next = 0                   # receiving: next sequence number, per run
        self._posted: List[Tuple[torch.Tensor, Any]] = []   # headers posted ahead
        self.sent_shapes: List[Tuple[Any, Any]] = []   # sending: the previous message's tensors
        self._expected = 0                             # receiving: messages in this run
        self._spec: Optional[Tuple[List[torch.Tensor], List[Any]]] = None   # next data, posted
        self.times: Dict[int, Tuple[int, int, int, int]] = {}  # seq -> sent, arrived, wait from, to

    def begin_run(self, expected: int = 0) -> None:
        """Start a run that receives ``expected`` messages on this stream (sending needs no
        count)."""
        self.seq, self._next, self.times = 0, 0, {}
        self._posted, self._expected, self._spec = [], expected, None

    # -- sending -------------------------------------------------------------------------
    def send(self, value: Any) -> Tuple[List[Any], List[torch.Tensor]]:
        """Post the message for ``value``; returns the works and the buffers to keep alive."""
        tensors, meta = encode(value)
        changed = meta != self.sent_meta
        first = self.seq == 0
        works, keep = self._header(self.seq, meta if changed else b"")
        self.seq += 1
        if changed:
            self.sent_meta = meta
        if not first and changed:
            # The receiver posted receives shaped like the previous message: fill them, and
            # send the real data on the resized tag.
            for shape, dtype in self.sent_shapes:
                filler = torch.zeros(shape, dtype=dtype, device=self.device)
                works.append(dist.isend(filler, dst=self.peer, tag=self.tags[DATA], group=self.group))
                keep.append(filler)
        tag = self.tags[DATA if not first and not changed else RESIZED]
        works += [dist.isend(t, dst=self.peer, tag=tag, group=self.group) for t in tensors]
        self.sent_shapes = [(t.shape, t.dtype) for t in tensors]
        return works, keep + tensors

    def _header(self, seq: int, meta: bytes) -> Tuple[List[Any], List[torch.Tensor]]:
        header = torch.tensor([seq, len(meta), time.monotonic_ns()], dtype=torch.int64)
        works = [dist.isend(header, dst=self.peer, tag=self.tags[HEADER], group=self.group)]
        keep = [header]
        if meta:
            buf = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
            works.append(dist.isend(buf, dst=self.peer, tag=self.tags[META], group=self.group))
            keep.append(buf)
        return works, keep

    def send_error(self, text: str) -> Tuple[List[Any], List[torch.Tensor]]:
        """Tell the peer, waiting (or about to wait) on this stream, that this step failed."""
        return self._header(-1, text.encode())

    # -- receiving -----------------------------------------------------------------------
    def post(self) -> None:
        """Post the receive of one more header (they are matched in order)."""
        header = torch.zeros(3, dtype=torch.int64)
        self._posted.append((header, dist.irecv(header, src=self.peer, tag=self.tags[HEADER],
                                                group=self.group)))

    def _wait(self, work: Any, me: int, what: str) -> None:
        try:
            work.wait()
        except Exception as err:  # noqa: BLE001  closed connection (dead peer) or timeout
            raise _peer_error(err, self.peer, me, what) from None

    def take(self, *, me: int, what: str) -> Any:
        """The next message's value (blocking, bounded by the group's timeout). Raises
        PeerFailed when the peer died, timed out or sent an error header."""
        seq = self._next
        self._next += 1
        if not self._posted:
            self.post()
        header, work = self._posted.pop(0)
        t0 = time.monotonic_ns()
        self._wait(work, me, what)
        got_seq, meta_len, sent_ns = (int(v) for v in header)
        if meta_len:
            buf = torch.empty(meta_len, dtype=torch.uint8)
            self._wait(dist.irecv(buf, src=self.peer, tag=self.tags[META], group=self.group),
                       me, what)
            raw = buf.numpy().tobytes()
            if got_seq == -1:
                raise PeerFailed(f"{raw.decode(errors='replace')} (rank {me} was waiting for "
                                 f"{what})")
            self.meta = pickle.loads(raw)
        if got_seq != seq:
            raise RuntimeError(f"{what}: rank {self.peer} sent message {got_seq} of "
                               f"{self.name} where {seq} was expected (the ranks' schedules "
                               "disagree)")
        if self.meta is None:
            raise RuntimeError(f"{what}: rank {self.peer} sent no description on {self.name}")
        spec, desc = self.meta
        posted, self._spec = self._spec, None
        if posted is not None and not meta_len:
            tensors, works = posted          # posted when the previous message came in
        else:
            if posted is not None:           # filled by the sender with zeros: drop them
                for w in posted[1]:
                    self._wait(w, me, what)
            tensors = [torch.empty(d[1], dtype=d[2], device=self.device)
                       for d in desc if d[0] == "t"]
            works = [dist.irecv(t, src=self.peer, tag=self.tags[RESIZED], group=self.group)
                     for t in tensors]
        for w in works:
            self._wait(w, me, what)
        t1 = time.monotonic_ns()
        self.times[seq] = (sent_ns, t1, t0, t1)
        if seq + 1 < self._expected:
            # The next message most likely has the same shapes: post its data receives now,
            # so they are in place long before it is sent (no rendezvous on the way).
            nxt = [torch.empty(d[1], dtype=d[2], device=self.device) for d in desc if d[0] == "t"]
            self._spec = (nxt, [dist.irecv(t, src=self.peer, tag=self.tags[DATA], group=self.group)
                                for t in nxt])
        it = iter(tensors)
        return unflatten([next(it) if d[0] == "t" else d[1] for d in desc], spec)
