"""The ``peers`` section's multi-process rows: torch.distributed.pipelining (PiPPy),
pipetrain's own multi-process runner (``pipetrain-mp <schedule>``: one rank per pipeline
device, :mod:`pipetrain.distributed`) and the two-process floor, on p = 2 gloo processes
that the benchmark launches itself.

One pair of worker processes serves every multi-process row of every workload, so torch is
imported and the process group built once per run (a few seconds on 2 loaded cores), and the
parent can interleave process rows with in-process rows: while the parent measures its own
rows the workers block on their command pipe and use no CPU, and while a worker row runs the
parent only waits.

Protocol (parent -> both workers, over a ``multiprocessing`` pipe each): ``("setup", wl)``,
``("run", row, steps)`` (gradient steps), ``("train", row, n)`` (n mini-batches of training,
optimizer included: ``bench/peers_training.py``), ``("digest", row)`` (what a test compares
the trained weights by), ``("exit",)``; each worker answers ``("ok", payload)`` or
``("error", traceback)``. Every call has a timeout; on timeout or error the parent kills the
pair (``ProcPair.close`` always runs, from ``finally``), so no process outlives the bench.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Dict, List, Optional

PIPPY_SCHEDULES = {   # row name -> (torch class name, stages per process)
    "ScheduleGPipe": ("ScheduleGPipe", 1),
    "Schedule1F1B": ("Schedule1F1B", 1),
    "ScheduleInterleaved1F1B": ("ScheduleInterleaved1F1B", 2),
    "ScheduleInterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", 2),
}


#: pipetrain's schedules run by its multi-process runner in the same two workers, on its
#: default wire (``wire="auto"``: shared memory between the two processes of this host).
PIPETRAIN_MP_SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2"]
#: ... and on gloo's point-to-point messages (``wire="gloo"``, PiPPy's transport), to compare.
PIPETRAIN_MP_GLOO = ["1f1b", "interleaved-1f1b"]


def pippy_available() -> Optional[str]:
    """None if torch.distributed.pipelining with gloo can run here, else the reason why not."""
    try:
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_gloo_available():
            return "torch.distributed with gloo is not available"
        import torch.distributed.pipelining as pp
        missing = [n for n, _ in PIPPY_SCHEDULES.values() if not hasattr(pp, n)]
        if missing or not hasattr(pp, "PipelineStage"):
            return f"torch.distributed.pipelining lacks {missing or ['PipelineStage']}"
    except ImportError as err:
        return f"torch.distributed.pipelining cannot be imported ({err})"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- worker side --------------------------------------------------------------------------

class _Timed:
    """Records (start, end) of each compute action of one stage (forward, backward, weight
    backward) by wrapping the stage object's methods: PiPPy's schedules call them as
    ``stage.forward_one_chunk(...)``, so instance attributes intercept them."""

    def __init__(self, stage, log: List):
        from bench._peer_models import now_ns
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            fn = getattr(stage, name, None)
            if fn is None:
                continue

            def wrapped(*a, _fn=fn, **k):
                t0 = now_ns()
                try:
                    return _fn(*a, **k)
                finally:
                    log.append((t0, now_ns()))
            setattr(stage, name, wrapped)


class _Worker:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.rows: Dict[str, Any] = {}

    def setup(self, wl) -> Dict[str, Any]:
        import torch
        from torch.distributed import pipelining as pp
        from bench import _peer_models as pm

        for kind, obj, _, _ in self.rows.values():
            if kind == "pipetrain":
                obj.close()       # the previous workload's executors
        self.rows.clear()
        self.opts: Dict[str, Any] = {}    # row -> its torch optimizer (train rows), made lazily
        self.wl, (self.x, self.y) = wl, pm.data(wl)
        rank, world = self.rank, self.world
        for row, (cls_name, per_proc) in PIPPY_SCHEDULES.items():
            n_stages = world * per_proc
            parts = pm.split(pm.make_layers(wl), pm.balance(wl, n_stages))
            log: List = []
            stages = []
            # Stage k lives on process k % world (the loop placement PiPPy's interleaved
            # schedules expect): with 2 processes and 4 stages, process 0 holds 0 and 2.
            for k in range(rank, n_stages, world):
                st = pp.PipelineStage(parts[k], k, n_stages, torch.device("cpu"))
                _Timed(st, log)
                stages.append(st)
            cls = getattr(pp, cls_name)
            sched = cls(stages[0] if per_proc == 1 else stages, n_microbatches=wl.microbatches,
                        loss_fn=pm.mse)
            params = [p for k in range(rank, n_stages, world) for p in parts[k].parameters()]
            self.rows[row] = ("pippy", sched, params, log)
        import pipetrain
        for sched, wire in [(s, "auto") for s in PIPETRAIN_MP_SCHEDULES] + \
                [(s, "gloo") for s in PIPETRAIN_MP_GLOO]:
            # The same units and split as the PiPPy rows (interleaved: 4 stages, stage k on
            # process k % 2); the pipeline sees the process group and keeps its own stages.
            v = 2 if sched.startswith("interleaved") else 1
            pipe = pipetrain.Pipeline(pm.make_layers(wl), num_devices=world, schedule=sched,
                                      num_microbatches=wl.microbatches, loss_fn=pm.mse,
                                      balance=pm.balance(wl, world * v), timeout=120, wire=wire,
                                      optimizer=pm.optimizer)   # used by train() only
            key = f"pipetrain-mp {sched}" + (" gloo" if wire == "gloo" else "")
            self.rows[key] = ("pipetrain", pipe, pipe.parameters(), None)
        parts = pm.split(pm.make_layers(wl), pm.balance(wl, world))
        work = pm.floor_inputs(wl, parts)[rank]
        self.rows["floor"] = ("floor", parts[rank], list(parts[rank].parameters()), work)
        return {"rows": sorted(self.rows)}

    def run(self, row: str, steps: int) -> Dict[str, Any]:
        import torch.distributed as dist
        from bench import _peer_models as pm

        kind, obj, params, extra = self.rows[row]
        starts, ends, actions, overlap = [], [], [], []
        with pm.PeakRSS() as mem:
            for _ in range(steps):
                for p in params:
                    p.grad = None
                dist.barrier()   # both processes start each step together (not timed)
                if kind == "pippy":
                    extra.clear()
                t0 = pm.now_ns()
                if kind == "pipetrain":
                    obj.step(self.x, self.y)
                elif kind == "pippy":
                    # Process 0 holds the first stage, process 1 the last one.
                    if self.rank == 0:
                        obj.step(self.x, return_outputs=False)
                    else:
                        obj.step(target=self.y, losses=[], return_outputs=False)
                else:
                    pm.stage_work(obj, *extra)
                starts.append(t0)
                ends.append(pm.now_ns())
                if kind == "pipetrain":   # compute actions of this rank, same clock
                    actions.append([(r.start_ns, r.end_ns) for r in obj.stats().records[0]])
                    overlap.append(obj.dist.last_overlap)
                else:
                    actions.append(list(extra) if kind == "pippy" else [(t0, ends[-1])])
        return {"starts": starts, "ends": ends, "actions": actions, "mem": mem.delta,
                "overlap": overlap}

    def train(self, row: str, n: int) -> Dict[str, Any]:
        """``n`` mini-batches of training in a row, each as its engine's user writes it:
        PiPPy ``schedule.step`` then this process's optimizer step over its stages'
        parameters; pipetrain ``pipe.train(batches)`` (the optimizer inside the pipeline);
        the floor its stage work then the optimizer step. One span, after a barrier."""
        import torch.distributed as dist
        from bench import _peer_models as pm

        kind, obj, params, extra = self.rows[row]
        if kind != "pipetrain" and row not in self.opts:
            self.opts[row] = pm.optimizer(params)
        opt = self.opts.get(row)
        for p in params:
            p.grad = None
        batches = [(self.x, self.y)] * n
        with pm.PeakRSS() as mem:
            dist.barrier()
            t0 = pm.now_ns()
            if kind == "pipetrain":
                for _ in obj.train(batches):
                    pass
            else:
                for _ in range(n):
                    if kind == "pippy" and self.rank == 0:
                        obj.step(self.x, return_outputs=False)
                    elif kind == "pippy":
                        obj.step(target=self.y, losses=[], return_outputs=False)
                    else:
                        pm.stage_work(obj, *extra)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            t1 = pm.now_ns()
        return {"starts": [t0], "ends": [t1], "mem": mem.delta}

    def digest(self, row: str) -> Dict[str, Any]:
        """This rank's share of the row's weights, as two float64 sums (of the values and of
        their squares) over its stages' parameters: a test adds the ranks' shares and
        compares them with the unsplit model trained alike."""
        _, _, params, _ = self.rows[row]
        return {"sum": float(sum(p.detach().double().sum() for p in params)),
                "sumsq": float(sum(p.detach().double().pow(2).sum() for p in params))}


def _worker_main(rank: int, world: int, port: int, conn) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)   # one core per process: p = 2 processes on 2 cores
    # pipetrain's multi-process runner sets glibc's malloc thresholds when its first pipeline
    # is built (pipetrain.distributed.host_memory); set them before any row builds a model,
    # so every row's tensors are placed under the same settings (rows built before the
    # switch measured up to 2x slower steps, whatever their engine).
    from pipetrain.distributed.host_memory import keep_freed_memory
    keep_freed_memory()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        worker = _Worker(rank, world)
        handlers = {"setup": worker.setup, "run": worker.run, "train": worker.train,
                    "digest": worker.digest}
        conn.send(("ok", {"pid": os.getpid()}))
        while True:
            try:
                cmd = conn.recv()
            except EOFError:          # the parent went away
                break
            if cmd[0] == "exit":
                break
            try:
                payload = handlers[cmd[0]](*cmd[1:])
                conn.send(("ok", payload))
            except Exception:         # report, keep serving: the parent decides
                conn.send(("error", traceback.format_exc()))
    except Exception:
        try:
            conn.send(("error", traceback.format_exc()))
        except (OSError, EOFError):
            pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- parent side --------------------------------------------------------------------------

class WorkerError(RuntimeError):
    pass


class ProcPair:
    """The worker processes (spawned, gloo over 127.0.0.1 on a free port). Use as a context
    manager: leaving it always ends the processes, killing them if they do not exit."""

    def __init__(self, world: int = 2, start_timeout: float = 120.0):
        self.world, self.procs, self.conns = world, [], []
        ctx = mp.get_context("spawn")
        port = free_port()
        try:
            for r in range(world):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, args=(r, world, port, child), daemon=True,
                                name=f"peers-worker-{r}")
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            self._gather(start_timeout, "start")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "ProcPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _gather(self, timeout: float, what: str) -> List[Any]:
        import time
        deadline = time.monotonic() + timeout
        replies = []
        for r, c in enumerate(self.conns):
            left = deadline - time.monotonic()
            if left <= 0 or not c.poll(left):
                raise WorkerError(f"worker {r} gave no answer to {what!r} within {timeout:.0f} s")
            try:
                status, payload = c.recv()
            except EOFError:
                raise WorkerError(f"worker {r} died during {what!r} "
                                  f"(exit code {self.procs[r].exitcode})") from None
            if status != "ok":
                raise WorkerError(f"worker {r} failed in {what!r}:\n{payload}")
            replies.append(payload)
        return replies

    def call(self, cmd: tuple, timeout: float) -> List[Any]:
        """Send ``cmd`` to every worker; their answers, in rank order. On any failure the
        workers are ended (a half-done collective would leave them stuck) and it raises."""
        if not self.procs:
            raise WorkerError("the worker processes are gone")
        try:
            for c in self.conns:
                c.send(cmd)
            # A row's command is named with its row; setup's argument is a whole workload.
            return self._gather(timeout, cmd[0] if cmd[0] == "setup" or len(cmd) < 2
                                else f"{cmd[0]} {cmd[1]}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("exit",))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []
