"""Shared-memory wire: boundary values between two ranks on one host, without sockets.

The gloo :class:`~pipetrain.distributed.wire.Stream` costs per message two or three socket
messages (header, description, packed buffer), a fresh packed buffer and helper threads of
gloo's that wake up and take the GIL; on one host the same bytes can go through memory.
:class:`ShmStream` has the same interface (``begin_run`` / ``send`` / ``post`` / ``take`` /
``send_error`` / ``times``), so the runner does not care which one an edge uses.

Per stream (edge, direction) the sending rank creates, in ``/dev/shm``, one segment and
one FIFO (two file descriptors per stream, whatever the ring's size):

- the segment's first pages are *control*: int64 words ``published`` (messages written, by
  the sender), ``released`` (messages taken, by the receiver), both pids, the segment's
  end, an error text, and one header per slot ``(seq, flag, size, description bytes,
  sender clock ns, capacity, offset)``, the arenas' ``(offset, size)``;
- then the regions of a ring of ``slots`` slots, each holding one message: its
  description (pickled structure, shapes, dtypes: only when it changed) then every tensor
  leaf at a 16-byte aligned offset. A slot gets its region when first used and a larger one
  when a message outgrows it (only while the sender owns it: free), so any value goes
  through. Regions are carved from a few *arenas* appended to the segment (``ftruncate``;
  each at least twice the last, with room for a ring of the region's size), one mapping
  each: Python's mmap holds a file descriptor per mapping. Pages never touched use no
  memory;
- the FIFO: the sender writes one byte per message, and a waiting receiver blocks on it
  (``poll``) instead of spinning on a core its peer computes on.

The receiver opens them by the name the sender put in the process group's store, then
unlinks both names: from then on the memory lives only as long as the two mappings, so no
file is left in ``/dev/shm`` when either process ends, even by SIGKILL (the sender unlinks
its names at ``close`` in case the receiver never opened them).

Ordering: the sender writes a message's bytes and its slot header, then ``published``; the
receiver reads ``published``, then the slot; it copies the message out and only then writes
``released``. Each word is written by one side only, as one aligned 8-byte store (x86-64
TSO keeps stores in order and loads in order, which is all this needs; the Python-level
stores sit between C calls the compiler cannot move them across).

Copy out, not zero-copy: a received activation is usually saved by autograd until its
backward, so a slot used in place could not be released for most of the step; the copy
(one memcpy into a fresh tensor, the same allocation gloo's receive makes) frees the slot
at once and keeps the ring small.

Waits are bounded: a receiver (or a sender finding the ring full) checks the peer's error
text, the failure :class:`~pipetrain.distributed.wire.Board`, whether the peer's process
still exists (``/proc/<pid>/stat``: a zombie counts as dead) and the deadline (the
pipeline's ``timeout``) every ``POLL_S``; a dead peer raises PeerFailed naming its rank.
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import socket
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from pipetrain.mailbox import VALUE
from pipetrain.microbatch import _LEAF
from pipetrain.arguments import check_wire
from pipetrain.distributed.wire import (ALIGN, Board, PeerFailed, _layout, check_board_and_deadline,
                                        encode, unpack)

__all__ = ["ShmStream", "ShmWire", "SHM_DIR", "alive", "host_id"]

SHM_DIR = "/dev/shm"
PUBLISHED, RELEASED, SENDER_PID, RECEIVER_PID, ERROR_LEN, NSLOTS, END, ARENAS = range(8)
HEAD = 8                    # words before the slot headers
SLOT_WORDS = 8              # seq, flag, size, meta_len, sent_ns, capacity, offset, -
ERROR_BYTES = 4096          # room for an error text (longer ones are cut)
MAX_ARENAS = 40             # (offset, size) pairs after the slot headers; each at least doubles
MIN_CAPACITY = 1 << 16      # a slot's first region; a new one (at least twice) when outgrown
SPIN = 200                  # reads of ``published`` before blocking (a few microseconds)
POLL_S = 0.05               # between checks of the peer, the board and the deadline
def host_id() -> str:
    """This machine's identity for choosing shared memory: host name and boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def ARENA_TABLE(slots: int) -> int:  # noqa: N802  a layout constant, per ring size
    """Word index of the arena table (after the slot headers)."""
    return HEAD + SLOT_WORDS * slots


def _pages(n: int) -> int:
    return (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def _map(fd: int, size: int, offset: int) -> Tuple[mmap.mmap, torch.Tensor]:
    mm = mmap.mmap(fd, size, offset=offset)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


class ShmStream:
    """The messages of one (edge, direction) between this rank and ``peer`` through shared
    memory (see the module docstring). ``sending``: this rank writes the stream, else reads.

    Made in two phases so no rank waits on another's construction: every rank first
    :meth:`create` s its sending streams (names into ``store``), then :meth:`attach` es to
    its receiving ones (names from ``store``, blocking up to the store's timeout).
    """

    RESIZE, ERROR = 1, 2

    def __init__(self, edge: int, direction: str, peer: int, name: str, *, sending: bool,
                 key: str, store: Any, slots: int, timeout: float, board: Board,
                 me: int) -> None:
        self.edge, self.direction, self.peer, self.sending = edge, direction, peer, sending
        self.device = torch.device("cpu")
        self.name = f"{name} ({'values' if direction == VALUE else 'gradients'})"
        self.key, self.store, self.slots = key, store, max(1, int(slots))
        self.timeout, self.board, self.me = timeout, board, me
        self.paths: List[str] = []
        self.fd = -1
        self.poller: Any = None
        self.slot_at: List[int] = [-1] * self.slots   # offset of each slot's mapped region
        self.ctl_mm: Optional[mmap.mmap] = None
        self.ctl: Any = None                       # memoryview of the control words (int64)
        self.slot_mm: List[Any] = [None] * self.slots   # (arena mapping, offset in it)
        self.arenas: List[Tuple[int, mmap.mmap, torch.Tensor]] = []   # mapped: offset, map, bytes
        self.slot_t: List[Optional[torch.Tensor]] = [None] * self.slots
        self.fifo = -1
        self.count = 0                             # messages written / taken, all runs
        self.peer_pid = 0
        self.sent_meta: Optional[bytes] = None
        self._send_layout: Tuple[List[Tuple[int, int]], int] = ([], 0)
        self._fast_key: Any = None               # sending: (shape, dtype) of a lone tensor
        self.meta: Any = None
        self._single: Any = None                 # receiving: (shape, dtype) of a lone tensor
        self._recv_layout: Tuple[Any, List[Tuple[int, int]]] = (None, [])
        self.seq = self._next = self._expected = 0
        self.times: Dict[int, Tuple[int, int, int, int]] = {}
        self.closed = False

    # -- setup ---------------------------------------------------------------------------
    def _ctl_bytes(self) -> int:
        raw = (ARENA_TABLE(self.slots) + 2 * MAX_ARENAS) * 8 + ERROR_BYTES
        return _pages(raw)              # slot regions start page-aligned after it

    def create(self) -> None:
        """Sender: make the segment and the FIFO, publish their base name."""
        base = os.path.join(SHM_DIR, f"pipetrain-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        try:
            self.fd = os.open(base, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            self.paths.append(base)
            os.ftruncate(self.fd, self._ctl_bytes())
            os.mkfifo(base + "-fifo", 0o600)
            self.paths.append(base + "-fifo")
            # O_RDWR: opening never blocks, and the write end exists before the reader.
            self.fifo = os.open(base + "-fifo", os.O_RDWR | os.O_NONBLOCK)
            self._map_ctl()
            self.ctl[SENDER_PID] = os.getpid()
            self.ctl[NSLOTS] = self.slots
            self.ctl[END] = self._ctl_bytes()
            self.store.set(self.key, base)
        except BaseException:
            self.close()
            raise

    def attach(self) -> None:
        """Receiver: open the sender's segment and FIFO by the name in the store, then
        unlink both names."""
        base = self.store.get(self.key).decode()
        try:
            try:
                self.fd = os.open(base, os.O_RDWR)
            except FileNotFoundError:
                raise RuntimeError(
                    f"{self.name}: rank {self.peer}'s shared-memory segment {base} is not "
                    f"visible here (not the same host or /dev/shm?): use wire='gloo'") from None
            self.fifo = os.open(base + "-fifo", os.O_RDWR | os.O_NONBLOCK)
            self._map_ctl()
            if self.ctl[NSLOTS] != self.slots:
                raise RuntimeError(f"{self.name}: rank {self.peer} made {self.ctl[NSLOTS]} slots "
                                   f"where {self.slots} were expected")
            self.ctl[RECEIVER_PID] = os.getpid()
            self.peer_pid = self.ctl[SENDER_PID]
        except BaseException:
            self.close()
            raise
        finally:
            for path in (base, base + "-fifo"):   # both ends hold them now: the names can go
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _map_ctl(self) -> None:
        self.ctl_mm = mmap.mmap(self.fd, self._ctl_bytes())
        self.ctl = memoryview(self.ctl_mm).cast("q")
        self.poller = select.poll()       # no FD_SETSIZE limit, unlike select.select
        self.poller.register(self.fifo, select.POLLIN)

    def _slot(self, s: int, need: int) -> torch.Tensor:
        """Slot ``s``'s bytes: its region (``capacity`` bytes at ``offset`` in the segment,
        from its header). The sender gives a slot a message outgrows a new region, at least
        twice the old one (abandoned regions add up to less than the live ones); either side
        looks the region up again when its offset changed."""
        h = HEAD + SLOT_WORDS * s
        cap, off = self.ctl[h + 5], self.ctl[h + 6]
        if self.sending and cap < need:
            cap = _pages(max(need, 2 * cap, MIN_CAPACITY))
            off = self._carve(cap)
            self.ctl[h + 5], self.ctl[h + 6] = cap, off
        if self.slot_at[s] != off:
            a_off, a_mm, a_t = self._arena_of(off)
            base = off - a_off
            self.slot_t[s] = a_t[base:base + cap]
            self.slot_mm[s] = (a_mm, base)
            self.slot_at[s] = off
        return self.slot_t[s]

    def _carve(self, cap: int) -> int:
        """Sender: ``cap`` bytes of the newest arena, or of a new one (at least twice the
        last, room for a whole ring of such regions) appended to the segment. Arenas, not
        a mapping per slot: Python's mmap holds a file descriptor per mapping."""
        ctl, n = self.ctl, self.ctl[ARENAS]
        t = ARENA_TABLE(self.slots)
        if n:
            a_off, a_size = ctl[t + 2 * (n - 1)], ctl[t + 2 * (n - 1) + 1]
            if ctl[END] + cap <= a_off + a_size:
                off = ctl[END]
                ctl[END] = off + cap
                return off
            last_end, last_size = a_off + a_size, a_size
        else:
            last_end, last_size = self._ctl_bytes(), 0
        if n == MAX_ARENAS:
            raise RuntimeError(f"{self.name}: more than {MAX_ARENAS} shared-memory arenas")
        size = _pages(max(cap * self.slots, 2 * last_size))
        os.ftruncate(self.fd, last_end + size)
        ctl[t + 2 * n], ctl[t + 2 * n + 1] = last_end, size
        ctl[ARENAS] = n + 1
        ctl[END] = last_end + cap
        return last_end

    def _arena_of(self, off: int) -> Tuple[int, mmap.mmap, torch.Tensor]:
        """(offset, mapping, bytes) of the arena holding segment offset ``off`` (mapping the
        arenas the sender added since the last look)."""
        t = ARENA_TABLE(self.slots)
        for a in self.arenas:
            if a[0] <= off < a[0] + len(a[1]):
                return a
        for i in range(len(self.arenas), self.ctl[ARENAS]):
            a_off, a_size = self.ctl[t + 2 * i], self.ctl[t + 2 * i + 1]
            mm, ten = _map(self.fd, a_size, a_off)
            self.arenas.append((a_off, mm, ten))
            if a_off <= off < a_off + a_size:
                return self.arenas[-1]
        raise RuntimeError(f"{self.name}: offset {off} is in no arena of rank {self.peer}'s segment")

    def close(self) -> None:
        """Unmap, close, unlink whatever name is left (the receiver never came)."""
        if self.closed:
            return
        self.closed = True
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.ctl = None
        self.slot_t = [None] * self.slots
        self.slot_mm = [None] * self.slots
        mms = [self.ctl_mm] + [a[1] for a in self.arenas]
        self.arenas = []
        for mm in mms:
            if mm is not None:
                try:
                    mm.close()
                except BufferError:    # a view is still alive: unmapped when it goes
                    pass
        self.ctl_mm = None
        self.slot_at = [-1] * self.slots
        for fd in (self.fd, self.fifo):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd, self.fifo, self.poller = -1, -1, None

    # -- runs ----------------------------------------------------------------------------
    def begin_run(self, expected: int = 0) -> None:
        """Start a run that receives ``expected`` messages on this stream."""
        self.seq, self._next, self._expected, self.times = 0, 0, expected, {}

    def post(self) -> None:
        """Nothing to post ahead: the slots are always there."""

    def _check(self, deadline: float, what: str) -> None:
        """Raise PeerFailed if the peer reported an error, died, posted on the board or the
        deadline passed."""
        if self.ctl is None:
            raise PeerFailed(f"{self.name} is closed (rank {self.me} was waiting for {what})",
                             rank=self.peer)
        n = self.ctl[ERROR_LEN]
        if n and not self.sending:
            text = bytes(self.ctl_mm[self._ctl_bytes() - ERROR_BYTES:][:n]).decode(errors="replace")
            raise PeerFailed(f"{text} (rank {self.me} was waiting for {what})", rank=self.peer)
        pid = self.peer_pid or self.ctl[RECEIVER_PID if self.sending else SENDER_PID]
        if pid and not alive(pid):
            raise PeerFailed(f"rank {self.peer} stopped answering (its process {pid} is gone): "
                             f"rank {self.me} was waiting for {what}", rank=self.peer)
        check_board_and_deadline(self.board, deadline, peer=self.peer, me=self.me, what=what)

    # -- sending -------------------------------------------------------------------------
    def send(self, value: Any) -> Tuple[List[Any], List[torch.Tensor]]:
        """Write the message for ``value`` into the next slot (waiting, bounded, while the
        ring is full); returns no works: the message is delivered when this returns."""
        ctl = self.ctl
        if ctl is None:
            raise PeerFailed(f"{self.name} is closed", rank=self.peer)
        if type(value) is torch.Tensor and self._fast_key == (value.shape, value.dtype):
            # The common case: one tensor shaped like the previous message (no description
            # to build, compare or send).
            t = value.detach()
            tensors, meta, changed = [t if t.is_contiguous() else t.contiguous()], \
                self.sent_meta, False
        else:
            tensors, meta = encode(value)
            changed = meta != self.sent_meta
            if changed:
                self._send_layout = _layout(pickle.loads(meta)[1])
            self._fast_key = (value.shape, value.dtype) if type(value) is torch.Tensor else None
        layout, size = self._send_layout
        if self.count - ctl[RELEASED] >= self.slots:
            self._wait_free()
        s = self.count % self.slots
        described = meta if changed else b""
        start = (len(described) + ALIGN - 1) // ALIGN * ALIGN
        buf = self._slot(s, start + size)
        if described:
            mm, base = self.slot_mm[s]
            mm[base:base + len(described)] = described
        for t, (off, n) in zip(tensors, layout):
            buf[start + off:start + off + n].copy_(t.reshape(-1).view(torch.uint8))
        h = HEAD + SLOT_WORDS * s
        ctl[h], ctl[h + 1], ctl[h + 2], ctl[h + 3] = self.seq, self.RESIZE if changed else 0, \
            size, len(described)
        ctl[h + 4] = time.monotonic_ns()
        self.count += 1
        self.seq += 1
        ctl[PUBLISHED] = self.count          # after the data: the receiver may read it now
        self.sent_meta = meta
        try:
            os.write(self.fifo, b"\1")
        except BlockingIOError:              # full FIFO: the receiver has wake-ups queued
            pass
        return [], []

    def _wait_free(self) -> None:
        what = f"a free slot on {self.name} (rank {self.peer} has not taken its messages)"
        start = time.monotonic()
        deadline, check_at = start + self.timeout, start + POLL_S
        nap = 1e-5
        while self.count - self.ctl[RELEASED] >= self.slots:
            now = time.monotonic()
            if now >= check_at:
                self._check(deadline, what)
                check_at = now + POLL_S
            # Rare (a ring holds a run's messages): a backing-off sleep, no wake-up channel.
            time.sleep(nap)
            nap = min(2 * nap, 1e-3)

    def send_error(self, text: str) -> Tuple[List[Any], List[torch.Tensor]]:
        """Tell the peer, waiting (or about to wait) on this stream, that this step failed."""
        if self.ctl is None:
            return [], []
        raw = text.encode()[:ERROR_BYTES]
        off = self._ctl_bytes() - ERROR_BYTES
        self.ctl_mm[off:off + len(raw)] = raw
        self.ctl[ERROR_LEN] = max(1, len(raw))
        try:
            os.write(self.fifo, b"\1")
        except BlockingIOError:
            pass
        return [], []

    # -- receiving -----------------------------------------------------------------------
    def _wait_published(self, target: int, me: int, what: str) -> None:
        ctl = self.ctl
        for _ in range(SPIN):
            if ctl[PUBLISHED] >= target:
                return
        start = time.monotonic()
        deadline = start + self.timeout
        # The first check after one poll: a message usually comes sooner, and the board is
        # a round trip to the store.
        check_at = start + POLL_S
        while ctl[PUBLISHED] < target:
            now = time.monotonic()
            if now >= check_at or ctl[ERROR_LEN]:    # an error text wakes us up at once
                self._check(deadline, what)
                check_at = now + POLL_S
            # Blocks (the GIL released, no core used) until the sender's next byte.
            if self.poller.poll(POLL_S * 1000):
                try:
                    os.read(self.fifo, 4096)
                except BlockingIOError:
                    pass

    def take(self, *, me: int, what: str) -> Any:
        """The next message's value. Raises PeerFailed when the peer died, timed out or
        reported an error; RuntimeError when the ranks' schedules disagree."""
        seq = self._next
        self._next += 1
        t0 = time.monotonic_ns()
        ctl = self.ctl
        if ctl is None:
            raise PeerFailed(f"{self.name} is closed (rank {me} was waiting for {what})",
                             rank=self.peer)
        if ctl[PUBLISHED] <= self.count:
            self._wait_published(self.count + 1, me, what)
        s = self.count % self.slots
        h = HEAD + SLOT_WORDS * s
        # Word h + 1 (the RESIZE flag) is not read: meta_len > 0 says the same.
        got, size, meta_len, sent_ns = ctl[h], ctl[h + 2], ctl[h + 3], ctl[h + 4]
        start = (meta_len + ALIGN - 1) // ALIGN * ALIGN
        buf = self._slot(s, start + size)
        if meta_len:
            mm, base = self.slot_mm[s]
            self.meta = spec, desc = pickle.loads(mm[base:base + meta_len])
            # A lone tensor (flatten's leaf spec): received straight into a tensor of its shape.
            self._single = (desc[0][1], desc[0][2]) \
                if spec == _LEAF and len(desc) == 1 and desc[0][0] == "t" else None
        if got != seq:
            raise RuntimeError(f"{what}: rank {self.peer} sent message {got} of {self.name} "
                               f"where {seq} was expected (the ranks' schedules disagree)")
        if self.meta is None:
            raise RuntimeError(f"{what}: rank {self.peer} sent no description on {self.name}")
        single = self._single
        if single is not None:
            value = torch.empty(single[0], dtype=single[1])
            dst = value.view(-1).view(torch.uint8)      # ``size`` is rounded up to ALIGN
            dst.copy_(buf[start:start + dst.numel()])
        else:
            out = torch.empty(max(size, ALIGN), dtype=torch.uint8)
            out[:size].copy_(buf[start:start + size])
        self.count += 1
        ctl[RELEASED] = self.count           # after the copy: the sender may reuse the slot
        t1 = time.monotonic_ns()
        self.times[seq] = (sent_ns, t1, t0, t1)
        if single is not None:
            return value
        value, self._recv_layout = unpack(out, self.meta, self._recv_layout)
        return value


class ShmWire:
    """Which of a runner's streams go through shared memory, and their setup.

    Args:
        hosts: ``{global rank: host id}`` of every rank (an edge uses shared memory when
            both its ranks report the same host).
        wire: ``"shm"`` (every cross-rank edge; ValueError when an edge spans hosts),
            ``"auto"`` (edges within a host), ``"gloo"`` (none).
        store: the process group's store (segment names).
        board: the failure :class:`Board` (its prefix makes the store keys unique).
    """

    MAX_SLOTS = 64

    def __init__(self, hosts: Dict[int, str], wire: str, store: Any, board: Board) -> None:
        self.hosts, self.wire = hosts, check_wire(wire)
        self.store, self.board = store, board
        self.generation = 0       # runners connected so far (the same order on every rank)

    def uses(self, me: int, peer: int) -> bool:
        """Whether the edge between ranks ``me`` and ``peer`` goes through shared memory."""
        if self.wire == "gloo":
            return False
        same = self.hosts.get(me) == self.hosts.get(peer) and self.hosts.get(me) is not None
        if self.wire == "shm" and not same:
            raise ValueError(f"wire='shm' needs ranks {me} and {peer} on one host; they "
                             f"are on {self.hosts.get(me)!r} and {self.hosts.get(peer)!r} "
                             f"(use wire='auto' or 'gloo')")
        return same

    def make(self, edge: int, direction: str, me: int, peer: int, name: str, sending: bool,
             timeout: float, slots: int) -> ShmStream:
        """The stream of (``edge``, ``direction``) between ``me`` and ``peer``, with a ring
        of ``slots`` (the stream's messages per run, within [2, MAX_SLOTS]: slots are
        mapped lazily and grow only to the size of the messages they carried)."""
        src, dst = (me, peer) if sending else (peer, me)
        key = f"{self.board.prefix}/shm/{self.generation}/{edge}/{direction}/{src}->{dst}"
        return ShmStream(edge, direction, peer, name, sending=sending, key=key,
                         store=self.store, slots=min(max(slots, 2), self.MAX_SLOTS),
                         timeout=timeout,
                         board=self.board, me=me)

    def connect(self, streams: Sequence[ShmStream]) -> None:
        """Create every sending stream, then attach every receiving one (see ShmStream);
        the next runner's streams get keys of their own."""
        self.generation += 1
        done: List[ShmStream] = []
        try:
            for st in streams:
                if st.sending:
                    st.create()
                    done.append(st)
            for st in streams:
                if not st.sending:
                    st.attach()
                    done.append(st)
        except BaseException:
            for st in done:
                st.close()
            raise
