"""The search: every (p, w, b, m, schedule, v, recompute), pruned by memory and bounds.

For ``devices`` devices and a global batch B: depth p divides devices, width w = devices / p,
each replica takes B / w samples as m micro-batches of b. For each shape and each row of the
schedule table (:mod:`pipetrain.planner.schedule_models`):

1. balance the layers over the p * v stages (contiguous, slowest stage as fast as possible,
   cached per (stages, b, recompute));
2. predict memory per device (:mod:`pipetrain.planner.memory`) from the table's closed-form
   in-flight counts; a shape over the limit is out (remembering by how much);
3. bound the step time from below without simulating: the busiest device's m * (F + B), and
   the critical path of the last micro-batch, ``(m - 1) F_0 + sum_k (F_k + I_k)``;
4. simulate the fitting candidates in increasing order of bound, stopping when the bound
   passes the best simulated time (branch and bound; equal times go to less memory);
   simulations are cached by shape and costs. Hand-offs: a link's transfer on every
   cross-device edge, a CPU thread's wake-up only where the device sat idle
   (:mod:`pipetrain.planner.wake`). The winner's memory is re-checked with the built schedule's exact in-flight counts.

Times are seconds; memory bytes.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from pipetrain.partition import balance_costs
from pipetrain.planner.costs import CostTable, Network
from pipetrain.planner.memory import device_memory, stage_ranges
from pipetrain.planner.result import Candidate
from pipetrain.planner.schedule_models import ScheduleModel

__all__ = ["search", "evaluate", "fast_balance", "divisors", "rank", "exact_memory",
           "handoffs_per_step", "prefer_fewer_handoffs"]


def grid(devices: int, batch_size: int, max_depth: int,
         depths: Optional[Sequence[int]] = None, widths: Optional[Sequence[int]] = None,
         micro_batch_sizes: Optional[Sequence[int]] = None) -> Iterator[Tuple[int, int, int, int]]:
    """Every shape ``(p, w, b, m)`` to try: depth p (of ``depths``, default every divisor of
    ``devices``) up to ``max_depth``, width w = devices / p (of ``widths`` if given) dividing
    ``batch_size``, micro-batch size b (of ``micro_batch_sizes``, default every divisor)
    dividing the per-replica batch, and m = batch_size / (w b)."""
    for p in depths or divisors(devices):
        if devices % p or p > max_depth:
            continue
        w = devices // p
        if batch_size % w or (widths is not None and w not in widths):
            continue
        per_replica = batch_size // w
        for b in micro_batch_sizes or divisors(per_replica):
            if per_replica % b == 0:
                yield p, w, b, per_replica // b


def divisors(n: int) -> List[int]:
    """Positive divisors of n, increasing."""
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def fast_balance(costs: Sequence[float], parts: int) -> List[int]:
    """Contiguous split into ``parts`` non-empty parts minimising the largest part (the same
    optimum as :func:`pipetrain.partition.balance_costs`, without its tie-breaks): binary
    search on the bottleneck, greedy feasibility. O(n log(sum / eps))."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} layers into {parts} stages")

    def cut(limit: float) -> Optional[List[int]]:
        out, acc, cnt = [], 0.0, 0
        for i, c in enumerate(costs):
            left_layers, left_parts = n - i, parts - len(out)
            if cnt and (acc + c > limit or left_layers < left_parts):
                out.append(cnt)
                acc, cnt = 0.0, 0
            acc += c
            cnt += 1
        out.append(cnt)
        return out if len(out) <= parts else None

    lo, hi = max(costs), sum(costs)
    for _ in range(60):
        if hi - lo <= 1e-12 * max(hi, 1e-30):
            break
        mid = (lo + hi) / 2
        if cut(mid) is None:
            lo = mid
        else:
            hi = mid
    out = cut(hi)
    while len(out) < parts:   # fewer parts than asked: split the largest part
        i = max(range(len(out)), key=lambda j: out[j])
        out[i:i + 1] = [out[i] // 2, out[i] - out[i] // 2]
    return out


class _Evaluator:
    """Stage costs, balances and simulations for one table, cached across candidates."""

    def __init__(self, table: CostTable, network: Network, exact_balance_limit: int = 20_000):
        self.table, self.network = table, network
        self.exact_limit = exact_balance_limit
        self._balances: Dict[tuple, List[int]] = {}
        self._sims: Dict[tuple, float] = {}
        self._prefix: Dict[int, tuple] = {}
        self._stage: Dict[tuple, tuple] = {}
        self._memory: Dict[tuple, list] = {}
        self.simulations = 0

    def balance(self, stages: int, b: int, recompute: bool) -> List[int]:
        key = (stages, b, recompute)
        if key not in self._balances:
            t = self.table
            costs = [t.forward[i](b) * (2 if recompute else 1) + t.backward[i](b)
                     for i in range(t.num_layers)]
            if t.num_layers ** 2 * stages <= self.exact_limit:
                self._balances[key] = balance_costs(costs, stages)
            else:
                self._balances[key] = fast_balance(costs, stages)
        return self._balances[key]

    def _prefixes(self, b: int) -> tuple:
        """Prefix sums over layers of F, B, W at micro-batch size b (stage sums in O(1))."""
        if b not in self._prefix:
            t = self.table
            out = []
            for fns in (t.forward, t.backward, t.weight):
                acc, pre = 0.0, [0.0]
                for fn in fns:
                    acc += fn(b)
                    pre.append(acc)
                out.append(pre)
            self._prefix[b] = tuple(out)
        return self._prefix[b]

    def stage_costs(self, balance, b, recompute, split, p=1):
        """Per stage F, B (I + W) and W seconds, with the per-action overhead (a split
        backward is two actions)."""
        key = (tuple(balance), b, recompute, split, p)
        if key in self._stage:
            return self._stage[key]
        t = self.table
        o = self.network.action_overhead + t.action_overhead
        k = t.slowdown_at(p)
        ks = k * (t.split_factor if split else 1.0)
        # Engine work inside each action (per action, not per layer), slowed like compute.
        of, ob = k * t.forward_overhead, k * t.backward_overhead
        pf, pb, pw = self._prefixes(b)
        F, B, W = [], [], []
        for first, last in stage_ranges(balance):
            f = pf[last + 1] - pf[first]
            F.append(k * f + of + o)
            B.append(ks * (pb[last + 1] - pb[first]) + k * (f if recompute else 0.0)
                     + (2 * (ob + o) if split else ob + o))
            W.append(ks * (pw[last + 1] - pw[first]) + ob + o)
        self._stage[key] = (F, B, W)
        return F, B, W

    def memory(self, balance, p, b, inflight, versions, recompute):
        key = (tuple(balance), p, b, tuple(inflight), tuple(versions), recompute)
        if key not in self._memory:
            self._memory[key] = device_memory(self.table, balance, p, b, inflight, versions,
                                              recompute)
        return self._memory[key]

    def simulate(self, model: ScheduleModel, p, m, v, F, B, W, latency, wake=0.0) -> float:
        key = (model.name, p, m, v, tuple(F), tuple(B), tuple(W) if model.split_backward else (),
               latency, wake)
        if key not in self._sims:
            self.simulations += 1
            self._sims[key] = model.simulate(p, m, v, F, B, W, latency, wake)
        return self._sims[key]


def search(table: CostTable, devices: int, memory_limit: float, batch_size: int,
           models: Sequence[ScheduleModel], network: Network, *,
           micro_batch_sizes: Optional[Sequence[int]] = None,
           recompute: Sequence[bool] = (False, True), depths: Optional[Sequence[int]] = None,
           widths: Optional[Sequence[int]] = None, handoff_tolerance: float = 0.0,
           evaluator: Optional[_Evaluator] = None) -> Tuple[List[Candidate], _Evaluator]:
    """Evaluate the configurations; return them best first (fitting and simulated, then the
    pruned ones, then those that do not fit, by how much they miss) and the evaluator used.

    Args:
        table: per-layer costs; devices: total devices (w * p); memory_limit: bytes per device;
        batch_size: the global mini-batch B (w * m * b); models: schedule rows to consider;
        network: transfer / all-reduce model; micro_batch_sizes: the b to try (default: every
        divisor of B / w); recompute: the re-materialization settings to try; depths: the p
        to try (default: every divisor of devices up to the layer count); widths: the w to
        try (default: all; ``[1]`` until issue 9's data-parallel Pipeline lands, to get only
        configurations one process runs); handoff_tolerance: see
        :func:`prefer_fewer_handoffs` (0: the fastest predicted wins).
    """
    ev = evaluator or _Evaluator(table, network)
    L = table.num_layers
    cands: List[Candidate] = []
    for p, w, b, m in grid(devices, batch_size, L, depths, widths, micro_batch_sizes):
        boundary = max(table.input_bytes[i](b) for i in range(L))
        # A link's transfer delays every hand-off; a CPU stage thread's wake-up only those its
        # device sat idle for (pipetrain.planner.wake): kept apart for the simulation.
        latency = network.transfer(boundary) if p > 1 else 0.0
        wake = table.handoff_latency if p > 1 else 0.0
        for model in models:
            if model.graph:     # stage DAGs: pipetrain.planner.graph
                continue
            for v in model.chunks:
                if p * v > L or (v > 1 and p == 1) or not model.valid(p, m, v):
                    continue
                inflight = [model.inflight(p, m, v, d) for d in range(p)]
                versions = [model.versions(p, d) for d in range(p)]
                for rc in recompute:
                    bal = ev.balance(p * v, b, rc)
                    mem = ev.memory(bal, p, b, inflight, versions, rc)
                    F, B, W = ev.stage_costs(bal, b, rc, model.split_backward, p)
                    params = [0.0] * p
                    for k, (first, last) in enumerate(stage_ranges(bal)):
                        params[k % p] += sum(table.param_bytes[first:last + 1])
                    extra = network.allreduce(table.grad_factor * max(params), w) \
                        + table.update * max(params)
                    busy = [0.0] * p
                    for k in range(p * v):
                        busy[k % p] += F[k] + B[k]
                    I = [bb - ww for bb, ww in zip(B, W)] if model.split_backward else B
                    crit = (m - 1) * F[0] + sum(F) + sum(I) + 2 * (p * v - 1) * latency \
                        if not model.asynchronous else 0.0
                    bound = max(m * max(busy), crit) + extra
                    cands.append(Candidate(p=p, w=w, b=b, m=m, schedule=model.name, v=v,
                                           recompute=rc, balance=bal, memory=mem,
                                           bound=bound, extra=extra, latency=latency,
                                           wake=wake,
                                           costs=(F, B, W), model=model,
                                           limit=memory_limit))
    fitting = sorted((c for c in cands if c.fits), key=lambda c: c.bound)
    best = math.inf
    for c in fitting:
        # An equal bound may still tie (ties go to less memory); within the hand-off
        # tolerance a slower candidate may still be preferred: simulate those too.
        if c.bound > best * (1 + handoff_tolerance):
            c.status = "pruned"
            continue
        F, B, W = c.costs
        c.step_time = ev.simulate(c.model, c.p, c.m, c.v, F, B, W, c.latency, c.wake) + c.extra
        c.status = "simulated"
        if c.step_time < best:
            # Confirm with the built schedule's order before trusting it.
            c.memory = exact_memory(table, c)
            if not c.fits:
                c.status = "over"
                continue
            best = c.step_time
    return prefer_fewer_handoffs(rank(cands), handoff_tolerance), ev


def exact_memory(table: CostTable, c: Candidate) -> list:
    """The candidate's memory from its built schedule's order (exact in-flight bytes per
    device), or from the row's closed form where the schedule has no builder."""
    from pipetrain import schedules
    from pipetrain.planner.memory import order_activations
    versions = [c.model.versions(c.p, d) for d in range(c.p)]
    if c.model.step_time is None and c.schedule in schedules.NAMES:
        built = schedules.build(c.schedule, num_stages=c.p, num_microbatches=c.m, num_chunks=c.v)
        # One stage per device: in-flight count x its stash is exact already (and walking the
        # order in Python would cost more than the rest of a 64-device search).
        acts = order_activations(built, table, c.balance, c.b, c.recompute) if c.v > 1 else None
        return device_memory(table, c.balance, c.p, c.b, built.peak_inflight(), versions,
                             c.recompute, activations=acts)
    return device_memory(table, c.balance, c.p, c.b, c.model.peak_inflight(c.p, c.m, c.v),
                         versions, c.recompute)


def rank(cands: Sequence[Candidate]) -> List[Candidate]:
    """Best first: the fitting simulated ones by step time (equal times: less peak memory
    first, e.g. 1F1B before GPipe at the same bubble), the fitting pruned ones by bound, then
    those that do not fit by how much they need."""
    ok = [c for c in cands if c.fits and c.status != "over"]
    sim = sorted((c for c in ok if c.status == "simulated"),
                 key=lambda c: (round(c.step_time, 12), c.peak_memory))
    rest = sorted((c for c in ok if c.status != "simulated"), key=lambda c: c.bound)
    over = sorted((c for c in cands if not c.fits or c.status == "over"),
                  key=lambda c: c.peak_memory)
    return sim + rest + over


def handoffs_per_step(c: Candidate) -> int:
    """Cross-device hand-offs in one step of a chain schedule: each of the m micro-batches
    crosses the p v - 1 stage boundaries forward and again backward."""
    return 2 * (c.p * c.v - 1) * c.m


def prefer_fewer_handoffs(ranked: List[Candidate], tolerance: float) -> List[Candidate]:
    """``ranked`` (best first, :func:`rank`) with, in front, the candidate of the fastest's
    depth and width with the fewest :func:`handoffs_per_step` among those predicted within
    ``tolerance`` (a fraction) of the fastest (then the fastest of those).

    Why: on CPU each hand-off costs a stage thread's wake-up, the least reproducible number
    the calibration measures (its mean moved 0.3 -> 1.9 ms between runs on a shared 2-core
    machine; and in 5 measurements there interleaved 1F1B, with 2 v - 1 times 1F1B's
    hand-offs, ran 4-22 % slower than ZB-H1 of the same shape, which the model had put
    from 5 % slower to 10 % faster than it). A predicted gain smaller than the model's error, bought with more hand-offs, is
    not worth the risk. The depth and width stay the fastest's: fewer devices has fewer
    hand-offs too, but the gain of a second device is no small margin to second-guess.
    ``tolerance`` 0 (the default off CPU, where a hand-off is a measured transfer) keeps
    the order."""
    if tolerance <= 0 or not ranked or ranked[0].status != "simulated":
        return ranked
    top = ranked[0]
    near = [c for c in ranked if c.status == "simulated" and c.fits and c.p == top.p
            and c.w == top.w and c.step_time <= top.step_time * (1 + tolerance)]
    pick = min(near, key=lambda c: (handoffs_per_step(c), c.step_time, c.peak_memory))
    if pick is top:
        return ranked
    return [pick] + [c for c in ranked if c is not pick]


def evaluate(table: CostTable, network: Network, *, p: int, b: int, m: int, schedule: str,
             v: int = 1, recompute: bool = False, w: int = 1, balance: Optional[Sequence[int]] = None,
             memory_limit: float = math.inf) -> Candidate:
    """Predict one given configuration (simulated, exact in-flight counts): what the search
    would say about it. ``balance`` defaults to the search's own."""
    from pipetrain.planner.schedule_models import MODELS
    model = MODELS[schedule]
    ev = _Evaluator(table, network)
    bal = list(balance) if balance is not None else ev.balance(p * v, b, recompute)
    F, B, W = ev.stage_costs(bal, b, recompute, model.split_backward, p)
    boundary = max(table.input_bytes[i](b) for i in range(table.num_layers))
    latency = network.transfer(boundary) if p > 1 else 0.0
    wake = table.handoff_latency if p > 1 else 0.0
    params = [0.0] * p
    for k, (first, last) in enumerate(stage_ranges(bal)):
        params[k % p] += sum(table.param_bytes[first:last + 1])
    extra = network.allreduce(table.grad_factor * max(params), w) + table.update * max(params)
    c = Candidate(p=p, w=w, b=b, m=m, schedule=schedule, v=v, recompute=recompute, balance=bal,
                  memory=[], bound=0.0, extra=extra, latency=latency, wake=wake, costs=(F, B, W),
                  model=model, limit=memory_limit)
    c.memory = exact_memory(table, c)
    c.step_time = ev.simulate(model, p, m, v, F, B, W, latency, wake) + extra
    c.status = "simulated"
    return c
