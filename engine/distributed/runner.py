"""The per-rank runner: this rank's row of the lowered plan on the C++ executor.

Every rank holds the whole lowered plan (``schedule.lower()``: ``1SF3>2``, ``2RF3<1`` ...) and
runs the row of its own pipeline device on a one-device executor, in order (several stages
for interleaved schedules). Dependencies between actions of the row are the row's order;
dependencies on other ranks are the transfer actions:

    F / B / I   as in one process (:class:`~pipetrain.dispatch.Run`); a value for another
                rank is posted with ``isend`` right when it is produced
    SF / SB     take that send's works (they complete in the background; the run waits for
                them at its end)
    RF / RB     wait (bounded) for the message and put the value in the mailbox

A stream is a :class:`~pipetrain.distributed.shm_wire.ShmStream` (shared memory) when its
edge joins two CPU ranks of one host and ``wire`` allows it, else a gloo / NCCL
:class:`~pipetrain.distributed.wire.Stream`; both have one interface. On gloo / NCCL
receives are posted ahead (:class:`~pipetrain.distributed.wire.Stream`): a run's first
message on a stream has its header posted up to ``LOOKAHEAD`` receives before its action,
and each later message's buffer is posted as soon as the previous one is in — before the
compute that precedes its use; the RF / RB action waits for it on the issuing thread itself.
After a stage's last backward (B or W) of the step its gradients start their data-parallel
all-reduce (buckets, async), overlapping the rest of the cool-down. A plan over several
mini-batches with updates (the asynchronous schedules, :mod:`.training`) starts one such
all-reduce after the backward that closes each mini-batch on a stage, and its ``U`` waits
(bounded) for it before the optimizer steps, so every replica updates with the same averaged
gradient.

At the end of a run one all-reduce over all ranks carries (loss, token count, non-finite
gradient flag); then gradients are scaled (1/w, or 1/tokens), tied copies summed, committed.
A failure anywhere is posted on the board (:class:`~pipetrain.distributed.wire.Board`) and
sent as an error on the rank's outgoing streams, and raised on every rank as a PipelineError
naming its origin; the process group may then hold
unmatched operations, so the pipeline refuses further steps (restart the job).
"""

from __future__ import annotations

import bisect
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from pipetrain.dispatch import Run
from pipetrain.evaluation import EvalMixin
from pipetrain.mailbox import GRAD, VALUE
from pipetrain.transport import Handoff, Transport
from pipetrain.distributed import grads as grads_mod
from pipetrain.distributed.shm_wire import ShmStream, ShmWire
from pipetrain.distributed.wire import Board, PeerFailed, Stream, wait_all

__all__ = ["RankRunner", "RankRow", "RankEdge"]

RECEIVES = ("RF", "RB")
LOOKAHEAD = 2


class RankEdge(Transport):
    """An edge whose ends are on two ranks: ``send`` posts the message at once (isend) and
    returns its works; the value reaches the consumer's mailbox through its RF / RB action,
    so ``receive`` gets the value itself."""

    name = "rank"

    def __init__(self, streams: Dict[str, Optional[Stream]], producer_device: int) -> None:
        self.streams, self.producer_device = streams, producer_device

    def send(self, value: Any, src: int, dst: int) -> Any:
        direction = VALUE if src == self.producer_device else GRAD
        return self.streams[direction].send(value)

    def receive(self, token: Any) -> Any:
        return token


class _RankRun(Run):
    """One run on this rank: :class:`Run` plus the transfer actions and gradient reduction."""

    def __init__(self, runner: "RankRunner", plan: Any, stages: Sequence[Any],
                 batches: Sequence[Tuple[Any, Any]]) -> None:
        super().__init__(plan, stages, runner.transports, runner.devices, batches,
                         runner.num_threads)
        self.runner = runner
        self.row: RankRow = runner.row_of(plan)
        self.sends: List[Tuple[List[Any], List[torch.Tensor], str]] = []
        self.reducers: Dict[int, Any] = {}
        self.deadline_s = runner.timeout

    def dispatch(self, _local: int, index: int) -> None:
        r, row = self.runner, self.row
        d = r.device_index
        a = self.plan.actions[d][index]
        kind = str(a.kind)
        r.post_ahead(index)
        if kind in RECEIVES:
            direction = VALUE if kind == "RF" else GRAD
            stream = r.streams[(row.edge_of[index], direction)]
            value = stream.take(me=r.mesh.rank, what=f"{a} from rank {stream.peer}")
            self.mailbox.put(direction, row.edge_of[index], a.microbatch, value)
            return
        if kind in ("SF", "SB"):
            direction = VALUE if kind == "SF" else GRAD
            works, keep = self.mailbox.take(direction, row.edge_of[index], a.microbatch)
            self.sends.append((works, keep, f"delivery of {a} to rank {row.peer_of[index]}"))
            return
        stage = a.stage
        if kind == "U" and stage in self.reducers:
            # The replicas' gradients of this mini-batch, averaged, before the optimizer reads them.
            self.reducers.pop(stage).finish(self.wait)
        super().dispatch(d, index)
        if index in row.reduce_at and r.mesh.dp_group is not None:
            self.reducers[stage] = grads_mod.start_allreduce(self.stages[stage], r.mesh.dp_group)

    def wait(self, works: Sequence[Any], what: str) -> None:
        """Wait (bounded by the timeout, watching the failure board) for collective ``works``."""
        r = self.runner
        wait_all(works, deadline=time.monotonic() + r.timeout, board=r.board, peer=None,
                 me=r.mesh.rank, what=what)

    def finish_sends(self) -> None:
        """Wait (bounded) until every message this run sent was delivered."""
        r = self.runner
        works = [w for ws, _, _ in self.sends for w in ws]
        peers = sorted({self.row.peer_of[i] for i in self.row.sends_at})
        wait_all(works, deadline=time.monotonic() + r.timeout, board=r.board,
                 peer=peers[0] if len(peers) == 1 else None, me=r.mesh.rank,
                 what=f"the delivery of this step's sends to rank(s) {peers}")
        self.sends.clear()


class RankEvalRun(EvalMixin, _RankRun):
    """A forward-only run on this rank (:mod:`pipetrain.evaluation`)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.outputs: Dict[int, Any] = {}


class RankRow:
    """This rank's row of one lowered plan, indexed for the run: per transfer action its edge
    and peer rank, the messages each receiving stream expects, and where data-parallel
    all-reduces start.

    Attributes:
        edge_of, peer_of: ``{index: edge id}`` / ``{index: global rank}`` of transfer actions.
        expected: ``{(edge, direction): messages}`` this row receives per stream.
        receives, sends_at: indices of RF / RB and of SF / SB actions, in row order.
        recv_seq: ``{index of a receive: ((edge, direction), its sequence number)}``.
        reduce_at: indices of the B / W after which a stage's gradients are all-reduced
            across replicas: the backward closing each mini-batch before that stage's ``U``,
            and a stage's last backward of the run when no ``U`` follows it (``step()``).
        compiled: the row compiled for the runner's one-device executor.
    """

    def __init__(self, plan: Any, device_index: int, mesh: Any, executor: Any) -> None:
        graph = plan.graph
        dev_of = [graph.stage(k).device for k in range(graph.num_stages)]
        edge_by_pair = {(e.src, e.dst): e.id for e in graph.edges}
        row = plan.actions[device_index]
        self.edge_of: Dict[int, int] = {}
        self.peer_of: Dict[int, int] = {}
        self.expected: Dict[Tuple[int, str], int] = {}
        self.sends_at: List[int] = []
        self.receives: List[int] = []
        self.recv_seq: Dict[int, Tuple[Tuple[int, str], int]] = {}
        self.reduce_at: set = set()
        last: Dict[int, int] = {}      # stage -> its latest B / W not yet followed by a U
        for i, a in enumerate(row):
            kind = str(a.kind)
            if kind in ("SF", "RB"):
                self.edge_of[i] = edge_by_pair[(a.stage, a.peer)]
            elif kind in ("RF", "SB"):
                self.edge_of[i] = edge_by_pair[(a.peer, a.stage)]
            if kind in ("SF", "SB", "RF", "RB"):
                self.peer_of[i] = mesh.rank_of(dev_of[a.peer])
            if kind in RECEIVES:
                self.receives.append(i)
                key = (self.edge_of[i], VALUE if kind == "RF" else GRAD)
                self.recv_seq[i] = (key, self.expected.get(key, 0))
                self.expected[key] = self.expected.get(key, 0) + 1
            elif kind in ("SF", "SB"):
                self.sends_at.append(i)
            elif kind in ("B", "W"):
                last[a.stage] = i
            elif kind == "U" and a.stage in last:
                self.reduce_at.add(last.pop(a.stage))
        self.reduce_at.update(last.values())
        self.compiled = executor.compile([[(str(a), []) for a in row]])


def _messages(plan: Any) -> Dict[Tuple[int, str], int]:
    """``{(edge, direction): messages per run}`` of a lowered plan (the size of a shared-
    memory ring that never makes a sender wait for a free slot within a run)."""
    graph = plan.graph
    edge_by_pair = {(e.src, e.dst): e.id for e in graph.edges}
    out: Dict[Tuple[int, str], int] = {}
    for row in plan.actions:
        for a in row:
            kind = str(a.kind)
            if kind == "SF":
                key = (edge_by_pair[(a.stage, a.peer)], VALUE)
            elif kind == "SB":
                key = (edge_by_pair[(a.peer, a.stage)], GRAD)
            else:
                continue
            out[key] = out.get(key, 0) + 1
    return out


class RankRunner:
    """Runs this rank's row of lowered plans; see the module docstring.

    Args:
        mesh: the :class:`~pipetrain.distributed.mesh.Mesh`.
        plan: the lowered :class:`~pipetrain.plan.Plan` run by default (all devices' rows);
            ``execute(..., plan=)`` runs another plan of the same stage graph (the
            asynchronous plans over several mini-batches) on the same streams.
        device: this rank's torch device.
        timeout: seconds any single wait may last.
        num_threads: torch intra-op threads on the issuing thread (0: leave torch's).
        board: the failure :class:`Board`.
        ties: :class:`~pipetrain.distributed.grads.Ties` of the pipeline.
        group: the :class:`~pipetrain.distributed.mesh.P2PGroups` of gloo / NCCL streams.
        wire: a :class:`~pipetrain.distributed.shm_wire.ShmWire` choosing the edges whose
            streams go through shared memory (same host, CPU); None: all through ``group``.
    """

    def __init__(self, mesh: Any, plan: Any, device: torch.device, *, timeout: float,
                 num_threads: int, board: Board, ties: Any, group: Any = None,
                 wire: Optional[ShmWire] = None) -> None:
        from pipetrain.executor import Executor
        self.mesh, self.plan, self.timeout, self.num_threads = mesh, plan, timeout, num_threads
        self.board, self.ties = board, ties
        self.device_index = d = mesh.pp_rank
        self.devices = [device] * plan.num_devices
        graph = plan.graph
        dev_of = [graph.stage(k).device for k in range(graph.num_stages)]
        self.transports: Dict[int, Transport] = {}
        self.streams: Dict[Tuple[int, str], Any] = {}
        self.outgoing: List[Any] = []
        shm: List[ShmStream] = []
        counts = _messages(plan)
        handoff = Handoff()
        for e in graph.edges:
            a, b = dev_of[e.src], dev_of[e.dst]
            if a == b:
                self.transports[e.id] = handoff
                continue
            streams: Dict[str, Optional[Stream]] = {VALUE: None, GRAD: None}
            if d in (a, b):
                peer = mesh.rank_of(b if d == a else a)
                use_shm = wire is not None and device.type == "cpu" and wire.uses(mesh.rank, peer)
                for direction in (VALUE, GRAD):
                    sending = (direction == VALUE) == (d == a)
                    if use_shm:
                        st = wire.make(e.id, direction, mesh.rank, peer, e.name, sending,
                                       timeout, slots=counts.get((e.id, direction), 1))
                        shm.append(st)
                    else:
                        st = Stream(e.id, direction, peer, device, e.name, group)
                    streams[direction] = self.streams[(e.id, direction)] = st
                    if sending:
                        self.outgoing.append(st)
            self.transports[e.id] = RankEdge(streams, a)
        if wire is not None:       # every rank: its sending segments first, then the others'
            wire.connect(shm)
        self.executor = Executor(1, backend="cuda" if device.type == "cuda" else "cpu")
        self._rows: Dict[int, Tuple[Any, RankRow]] = {}
        self.row = self.row_of(plan)            # the row of the run in progress (or the last)
        self._posted = 0
        self.broken: Optional[str] = None
        self.companions: List["RankRunner"] = []

    def row_of(self, plan: Any) -> RankRow:
        """This rank's :class:`RankRow` of ``plan`` (made once per plan)."""
        entry = self._rows.get(id(plan))
        if entry is None or entry[0] is not plan:
            entry = self._rows[id(plan)] = (plan, RankRow(plan, self.device_index, self.mesh,
                                                          self.executor))
        return entry[1]

    # -- a run -------------------------------------------------------------------------------
    def execute(self, stages: Sequence[Any], batches: Sequence[Tuple[Any, Any]],
                run_cls: Any = None, plan: Any = None) -> Tuple[_RankRun, Any, float]:
        """Run our row of ``plan`` (default: the runner's); returns (run, timeline, wall
        seconds). Raises ExecutorError (an action failed: PeerFailed as its cause when another
        rank did) or PeerFailed."""
        from pipetrain.executor import ExecutorError

        if self.broken:
            raise PeerFailed(f"an earlier step failed ({self.broken}); the process group may "
                             "hold unmatched messages: restart the job (torchrun restarts it)")
        plan = self.plan if plan is None else plan
        t0 = time.perf_counter()
        self.board.step += 1
        self.row = row = self.row_of(plan)
        for key, st in self.streams.items():
            st.begin_run(row.expected.get(key, 0))
        self._posted = 0
        run = (run_cls or _RankRun)(self, plan, stages, batches)
        d = self.device_index
        local = [st for st in stages if st is not None]
        for st in local:
            st.begin_run(run.meters[d])
        old_threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            # The executor's own timeout is a backstop: every wait inside an action is bounded.
            timeline = self.executor.run(row.compiled, run.dispatch,
                                         timeout=min(2 * self.timeout + 10, 1e9))
            run.finish_sends()
        except BaseException as err:
            for st in local:
                st.end_run(commit=False)
            self.broken = str(err.__cause__ or err) if isinstance(err, ExecutorError) else str(err)
            raise
        finally:
            if self.num_threads:
                torch.set_num_threads(old_threads)
        return run, timeline, time.perf_counter() - t0

    def post_ahead(self, index: int) -> None:
        """Before action ``index``: post the headers of the receives up to ``LOOKAHEAD``
        past it (in row order, which is each stream's message order)."""
        rr = self.row
        upto = min(bisect.bisect_right(rr.receives, index) + LOOKAHEAD, len(rr.receives))
        while self._posted < upto:
            key, _ = rr.recv_seq[rr.receives[self._posted]]
            self.streams[key].post()
            self._posted += 1

    def fail(self, text: str) -> None:
        """This step failed here: publish ``text`` on the board and as an error header on
        every outgoing stream, so waiting ranks learn the origin at once."""
        self.broken = self.broken or text
        self.board.post(text)
        works = []
        for st in self.outgoing:
            try:
                works += st.send_error(text)[0]
            except Exception:  # noqa: BLE001  the peer is gone: nothing to tell it
                pass
        try:
            wait_all(works, deadline=time.monotonic() + min(self.timeout, 5.0), board=self.board,
                     peer=None, me=self.mesh.rank, what="error notices")
        except PeerFailed:
            pass

    def overlap(self, timeline: Any) -> Dict[str, float]:
        """How much of the last run's incoming transfer time was hidden under compute.

        A message's transfer time runs from its sender's post to its arrival here; the part
        of it this rank spent blocked in the RF / RB action that takes it is exposed, the
        rest overlapped other work. Returns ``transfer_s``, ``exposed_s`` and
        ``hidden_fraction`` (1.0 when nothing was received)."""
        del timeline
        total = exposed = 0
        for i, (key, seq) in self.row.recv_seq.items():
            times = self.streams[key].times.get(seq)
            if times is None:
                continue
            sent, arrived, wait_from, wait_to = times
            total += max(0, arrived - sent)
            exposed += max(0, min(arrived, wait_to) - max(sent, wait_from))
        return {"transfer_s": total * 1e-9, "exposed_s": exposed * 1e-9,
                "hidden_fraction": 1.0 - exposed / total if total else 1.0}

    def close(self) -> None:
        """Stop the executor's thread, and those of runners made for this one (evaluation)."""
        for other in self.companions:
            other.close()
        if self.executor is not None:
            self.executor.close()
        for st in self.streams.values():
            if isinstance(st, ShmStream):
                st.close()
