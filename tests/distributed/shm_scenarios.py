"""Per-rank bodies of the shared-memory wire tests (run by the worker pool under a gloo group).

Rank 0 sends on a value stream, rank 1 takes; both regenerate the same messages from a seed,
so the receiver compares each one exactly with what was sent."""

from __future__ import annotations

import glob
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from pipetrain.distributed.shm_wire import ARENAS, MIN_CAPACITY, SHM_DIR, ShmWire, host_id
from pipetrain.distributed.wire import Board, PeerFailed
from pipetrain.mailbox import VALUE


def messages(n: int) -> List[Any]:
    """``n`` values whose shape, dtype and structure change between messages; some larger
    than a slot's first size (so slots grow), a 0-dim tensor, an empty one, plain leaves."""
    g = torch.Generator().manual_seed(0)
    big = MIN_CAPACITY // 8 * 3                    # float64 elements: 3 x a first slot
    out: List[Any] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(torch.randn(3 + i, 5, generator=g, dtype=torch.float64))
        elif kind == 1:
            out.append((torch.randn(big + i, generator=g, dtype=torch.float64),
                        torch.arange(i, dtype=torch.int64)))
        elif kind == 2:
            out.append({"h": torch.randn(2, 7, generator=g).to(torch.float32),
                        "mask": torch.rand(7, generator=g) > 0.5, "step": i, "name": f"m{i}"})
        elif kind == 3:
            out.append(torch.tensor(float(i), dtype=torch.float64))
        elif kind == 4:
            out.append((torch.empty(0, 4), [torch.randn(4, 4, generator=g).t()]))  # non-contiguous
        else:
            out.append(torch.randn(2 * big + 5 * i, generator=g, dtype=torch.float64))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def mine() -> List[str]:
    """This process's shared-memory names in /dev/shm."""
    return glob.glob(os.path.join(SHM_DIR, f"pipetrain-{os.getpid()}-*"))


def shm_fds() -> List[str]:
    """This process's open descriptors on /dev/shm/pipetrain-* files (FIFOs included)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(os.path.join(SHM_DIR, "pipetrain-")):
            out.append(target)
    return out


def _streams(slots: int, timeout: float = 20.0):
    rank = dist.get_rank()
    store = dist.distributed_c10d._get_default_store()
    board = Board(store, "shm-test")
    wire = ShmWire({0: host_id(), 1: host_id()}, "shm", store, board)
    st = wire.make(0, VALUE, rank, 1 - rank, "edge", rank == 0, timeout, slots=slots)
    wire.connect([st])
    return st, rank


def exchange(n: int, runs: int, slots: int) -> Dict[str, Any]:
    """``runs`` runs of ``n`` messages through a ring of ``slots`` (fewer than ``n``: the
    sender waits for free slots); the receiver checks each. Returns the names left in
    /dev/shm after connect (both ends opened) and after close."""
    st, rank = _streams(slots)
    fds = len(shm_fds())
    dist.barrier()                       # both ends attached: every name unlinked
    after_connect = mine()
    expected = messages(n)
    bad = []
    for r in range(runs):
        st.begin_run(0 if rank == 0 else n)
        for i in range(n):
            if rank == 0:
                assert st.send(expected[i]) == ([], [])
            else:
                got = st.take(me=rank, what=f"message {i} of run {r}")
                if not _same(expected[i], got):
                    bad.append((r, i))
    dist.barrier()
    fds_run, arenas = len(shm_fds()), st.ctl[ARENAS]
    st.close()
    return {"fds_run": fds_run, "arenas": arenas, "bad": bad, "after_connect": after_connect, "after_close": mine(), "count": st.count,
            "fds": fds, "fds_after_close": shm_fds()}


def _failing_take(st: Any, what: str) -> Tuple[Optional[str], float]:
    """Rank 1 takes a message that must not come: (the PeerFailed text or None, seconds
    the take lasted)."""
    t0 = time.monotonic()
    try:
        st.take(me=1, what=what)
    except PeerFailed as err:
        return str(err), time.monotonic() - t0
    return None, time.monotonic() - t0


def error_delivered() -> Dict[str, Any]:
    """Rank 0 sends one message, then an error; rank 1 takes the message, then the next take
    raises PeerFailed carrying the text."""
    st, rank = _streams(2)
    out: Dict[str, Any] = {"error": None}
    if rank == 0:
        st.begin_run(0)
        st.send(torch.ones(3))
        st.send_error("rank 0: 0B3 failed: ValueError: broken on purpose")
    else:
        st.begin_run(2)
        out["first"] = st.take(me=1, what="1RF0").tolist()
        out["error"], out["seconds"] = _failing_take(st, "1RF1 from rank 0")
    dist.barrier()
    st.close()
    out["after_close"] = mine()
    return out


def seq_mismatch() -> Dict[str, Any]:
    """The receiver expects message 0 of a run, the sender's run already sent one: the
    schedules disagree, which the receiver reports instead of using the wrong value."""
    st, rank = _streams(4)
    out: Dict[str, Any] = {"error": None}
    if rank == 0:
        st.begin_run(0)
        st.send(torch.ones(1))
        st.begin_run(0)
        st.seq = 5                          # a sender whose schedule is ahead
        st.send(torch.ones(1))
    else:
        st.begin_run(2)
        st.take(me=1, what="1RF0")
        st.begin_run(1)
        try:
            st.take(me=1, what="1RF0 of the next run")
        except RuntimeError as err:
            out["error"] = str(err)
    dist.barrier()
    st.close()
    return out


def silent_peer(wait_s: float) -> Dict[str, Any]:
    """Rank 0 never sends: rank 1's take fails after ``wait_s`` naming rank 0."""
    st, rank = _streams(2, timeout=wait_s)
    out: Dict[str, Any] = {"error": None}
    if rank == 1:
        st.begin_run(1)
        out["error"], out["seconds"] = _failing_take(st, "1RF0 from rank 0")
    dist.barrier()
    st.close()
    return out


def fail_and_list(p: int, bad_rank: int) -> Dict[str, Any]:
    """A stage raises on ``bad_rank`` (pipelines on the shm wire): the error every rank got,
    and this process's /dev/shm names afterwards."""
    from tests.distributed import scenarios as sc
    out = sc.fail_in_stage(p, bad_rank, wire="shm")
    out["left"] = mine()
    return out
