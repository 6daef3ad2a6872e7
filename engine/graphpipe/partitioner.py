"""GraphPipe's partitioner: binary search on the time per sample, DP over the SP tree.

For a target T (seconds per sample) the dynamic programme answers: can the graph be cut into
convex stages, each given d >= 1 devices, every stage meeting ``t(d) <= T`` and fitting in
memory with its in-flight count, on at most N devices -- and with what least pipeline depth?
The smallest feasible T is found by bisection (feasibility is monotone in T).

**DP value.** Instead of "least in-flight count for n devices" we tabulate the equivalent
dual: ``D_X[δ, ℓ]`` = the fewest devices that partition the SP sub-tree X, given that the
stages after X form a path of depth δ (so X's last stages hold δ + 1 micro-batches) and that
X's own stage graph has depth at most ℓ (so X's first stages hold at most δ + ℓ). A stage's
in-flight count is the number of stages on its longest path to the sink (DAG 1F1B), so it is
δ + (its depth inside X). Devices add up over parts, so no device split needs enumerating.
D is non-increasing in ℓ and non-decreasing in δ (more in flight only costs memory).

**Series** node X = c_0 ; c_1 ; ... (children: units or parallel nodes). Its *positions*
are its units in level order (longest path from a source, then topological position), a
topological order that lists a parallel child's units level by level. Suffix tables
G_j = D of positions j, j+1, ..., computed level by level in ℓ::

    G_k[δ, ℓ] = 0                                         (nothing left)
    G_j[δ, ℓ] = min( G_j[δ, ℓ-1],
                     min_{d, e}  d + G_e[δ, ℓ-1]           (positions j..e-1 one stage on
                                                            d devices, in flight δ + ℓ)
                     min_{ℓ' < ℓ} D_P[δ + ℓ', ℓ - ℓ'] + G_{end(P)}[δ, ℓ'] )
                                                           (j = the first position of a
                                                            parallel child P: cut inside P)

So a stage is either a range of positions -- contiguous in a topological order, hence
convex; inside a parallel region it is a "horizontal" slice across the branches -- or a
stage of the parallel child's own DP (branches side by side, the paper's parallel split).
The range's in-flight count is taken as 1 + the bound of everything after it (exact on
chains; inside a parallel region it can over-count, which only makes memory safer).

For each d only the longest feasible range (the largest e) matters, because work, weights
and activations only grow with e and G_e only shrinks: e is found by ``searchsorted`` on
prefix sums, ``W + 2(d-1) s P <= d T`` (time) and ``d (1+k) P + f B A <= d M`` (memory).

**Parallel** node X = b_1 | ... | b_r (branches sorted by work, largest first): branches
run side by side on disjoint devices, so their device counts add, with the same δ and ℓ.
Runs of consecutive branches may also share one stage (on few devices, two small branches
are better together)::

    H_0 = 0,  H_t = min( H_{t-1} + D_{b_t},  min_{s < t-1} H_s + dmin(b_{s+1..t}, δ + 1) )
    D_X = H_r

(dmin: the fewest devices for that group as one stage, in flight δ + 1.)

The root (δ = 0) is feasible at T if G_0[0, ℓ] <= N for some ℓ; the least such ℓ is the
depth.
Reconstruction walks the same recurrences back from the root's cell.

**Search space.** Every stage graph produced is valid (convex stages, acyclic, within
memory), but not every convex partition is reachable: e.g. a stage holding the fork
operator together with the head of one branch only. Against exhaustive search on small
graphs (tests/graphpipe) the DP alone is exact on chains and within 25 % on the hand-built
multi-branch graphs, most cases exact. :func:`partition` also tries the best chain (the
sequential baseline) and keeps it when strictly better.

**Refinement.** The DP's objective is the bottleneck, then the depth; what a step costs is
the simulated DAG 1F1B schedule (fill/drain, bubbles of unbalanced paths). For one device
per stage (what the runtime runs) and graphs of up to ``REFINE_MAX_OPS`` operators,
:func:`partition` also takes the DP's plans at a few smaller depth limits (the
time/depth frontier) and the best chain as starts of a local search on the simulated time
(refine.py: move/swap operators, split/merge stages -- fork/join absorption and branch
grouping included). On random SP graphs of 3..8 operators it reaches the exhaustive
optimum of the simulated time in every case measured (tests/graphpipe/test_refine.py).
Larger graphs keep the DP's plan (the search would cost seconds there).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

from pipetrain.graphpipe.batched import ParallelBatch, SeriesBatch, series_batch_key
from pipetrain.graphpipe.cost import CostModel
from pipetrain.graphpipe.opgraph import OpGraph
from pipetrain.graphpipe.refine import refine as refine_stage_graph
from pipetrain.graphpipe.sp_decompose import SPNode, SPTree, decompose

__all__ = ["partition", "plan_stages"]

INF = np.inf
# Refinement (refine.py) runs on graphs up to this many operators (bounded by its
# evaluation budget in any case; large graphs keep the DP's answer).
REFINE_MAX_OPS = 200


class _Series:
    """A series node of the normalised SP tree on *fine positions*: its units (operator
    groups) in level order, a topological order that lists a parallel region's units level
    by level, so a range of positions can also cut across branches. ``pars`` maps the
    position where a parallel atom starts to (the atom, the position after it)."""

    def __init__(self, fine: List[int], pars: dict, uw, up, ua, rows: np.ndarray):
        self.fine = fine
        self.pars = pars
        self.rows = rows  # the δ values tabulated (root: [0]; nested: 0..N)
        self.k = len(fine)
        self.Wp = np.concatenate([[0.0], np.cumsum([uw[u] for u in fine])])
        self.Pp = np.concatenate([[0.0], np.cumsum([up[u] for u in fine])])
        self.Ap = np.concatenate([[0.0], np.cumsum([ua[u] for u in fine])])
        self.size = self.k
        self.G = None  # (rows, levels + 1, k + 1) after evaluate
        self.e_t = None  # time-feasible range ends (per-node evaluation) ...
        self.dmin = None  # ... or least devices per range (batched evaluation)
        self.e_mem = None  # cached: memory-feasible range ends per in-flight count


class _Parallel:
    """A parallel node: its branches (series nodes) sorted by work, largest first."""

    def __init__(self, branches: List[_Series]):
        order = sorted(range(len(branches)), key=lambda i: -branches[i].Wp[-1])
        self.branches = [branches[i] for i in order]
        self.w = np.array([b.Wp[-1] for b in self.branches])
        self.p = np.array([b.Pp[-1] for b in self.branches])
        self.a = np.array([b.Ap[-1] for b in self.branches])
        self.size = sum(b.size for b in self.branches)
        self.D = None
        self.grp = None  # grp[(s, t)] = dmin vector over δ of branches s..t-1 as one stage


class _Planner:
    """The SP tree normalised (root and parallel branches are series nodes) with its DP
    tables; :meth:`feasible` fills them for one target T, :meth:`stages_of_root` reads a
    partition back out."""

    def __init__(self, tree: SPTree, num_devices: int, cost: CostModel):
        self.tree, self.N, self.cost = tree, num_devices, cost
        self.cap = min(num_devices, cost.max_replicas or num_devices)
        self.dvec = np.arange(1, self.cap + 1, dtype=float)
        ops = tree.graph.ops
        self.uw = [sum(ops[o].work for o in u) for u in tree.units]
        self.up = [sum(ops[o].params for o in u) for u in tree.units]
        self.ua = [sum(ops[o].activation for o in u) for u in tree.units]
        self.order: list = []  # post-order: children before parents
        self._levels()
        self.root = self._series(tree.root, np.array([0]))
        s = cost.sync_per_byte
        # Z_d = W + 2(d-1) s P, prefix sums per d: the time test is Z_d(range) <= d T.
        for node in self.order:
            if isinstance(node, _Series):
                node.Z = node.Wp[None, :] + 2.0 * (self.dvec[:, None] - 1) * s * node.Pp[None, :]
        self.steps = self._plan_steps()

    def _plan_steps(self) -> list:
        """Evaluation order in waves (a node once all its children are done); inside a
        wave, small same-shape nodes share one batched evaluation (batched.py)."""
        children = {id(n): ([par for par, _ in n.pars.values()] if isinstance(n, _Series)
                            else n.branches) for n in self.order}
        done, remaining, steps = set(), list(self.order), []
        # Bound a series batch's least-devices tensor, B x k x (k+1) x (N+2) floats.
        budget = 2e7 / (self.N + 2)
        while remaining:
            ready = [n for n in remaining if all(id(c) in done for c in children[id(n)])]
            groups: dict = {}
            for n in ready:
                if isinstance(n, _Series):
                    key = series_batch_key(n)
                    if key is None:
                        steps.append(("series", n))
                    else:
                        groups.setdefault(key, []).append(n)
                else:
                    groups.setdefault(("par", len(n.branches)), []).append(n)
            for key, nodes in groups.items():
                if key[0] == "par":
                    steps.append(("batch", ParallelBatch(self, nodes)))
                    continue
                size = max(1, int(budget / (key[1] * (key[1] + 1))))
                for i in range(0, len(nodes), size):
                    steps.append(("batch", SeriesBatch(self, nodes[i:i + size])))
            done.update(id(n) for n in ready)
            remaining = [n for n in remaining if id(n) not in done]
        return steps

    # --- normalised tree: root and parallel branches are series of atoms -----------------
    def _series(self, sp: SPNode, rows) -> _Series:
        kids = sp.children if sp.kind == "series" else [sp]
        fine, pars = [], {}
        for c in kids:
            if c.kind == "leaf":
                fine.append(c.unit)
            else:
                par = _Parallel([self._series(b, np.arange(self.N + 1)) for b in c.children])
                self.order.append(par)
                units = sorted({self.unit_of[o] for o in c.ops}, key=self.level_key)
                pars[len(fine)] = (par, len(fine) + len(units))
                fine.extend(units)
        node = _Series(fine, pars, self.uw, self.up, self.ua, rows)
        self.order.append(node)
        return node

    def _levels(self) -> None:
        """Longest path (in units) from a source for each unit; sort key (level, first op)."""
        g, units = self.tree.graph, self.tree.units
        self.unit_of = {o: i for i, u in enumerate(units) for o in u}
        topo = {v: i for i, v in enumerate(g.topological_order())}
        level = [0] * len(units)
        for v in sorted(range(len(g)), key=topo.__getitem__):
            for w in g.succ[v]:
                a, b = self.unit_of[v], self.unit_of[w]
                if a != b:
                    level[b] = max(level[b], level[a] + 1)
        first = [min(topo[o] for o in u) for u in units]
        self.level_key = lambda u: (level[u], first[u])

    # --- one target -----------------------------------------------------------------------
    def feasible(self, T: float) -> Optional[int]:
        """Fill every table for target T; return the least depth, or None if infeasible."""
        for kind, x in self.steps:
            if kind == "batch":
                x.evaluate(self, T)
            else:
                self._eval_series(x, T, stop_at_root=x is self.root)
        g = self.root.G[0, :, 0]
        ok = np.nonzero(g <= self.N)[0]
        return int(ok[0]) if len(ok) else None

    def _time_ends(self, node: _Series, T: float) -> np.ndarray:
        """e_t[d-1, j]: the largest e such that positions j..e-1 meet T on d devices:
        Z_d[e] <= Z_d[j] + d T (tiny relative slack: a target met exactly passes)."""
        k, Z = node.k, node.Z
        e_t = np.empty((self.cap, k), dtype=np.int64)
        for di in range(self.cap):
            e_t[di] = np.searchsorted(Z[di], Z[di, :k] + (di + 1) * T * (1 + 1e-12),
                                      side="right") - 1
        return e_t

    def _memory_ends(self, node: _Series, f: int) -> np.ndarray:
        """e_m[d-1, j] for f in flight: the largest e with d (1+k) P + f B A <= d M over
        positions j..e-1 (prefix sums, non-decreasing in e). Independent of T: cached per f
        for the whole partition call, computed only for the f the DP visits."""
        cache = node.e_mem if node.e_mem is not None else {}
        node.e_mem = cache
        if f not in cache:
            c, k = self.cost, node.k
            M = c.memory_limit * (1 + 1e-12)
            out = np.empty((self.cap, k), dtype=np.int64)
            for di in range(self.cap):
                d = di + 1
                Y = d * (1 + c.optimizer_factor) * node.Pp + f * c.microbatch_size * node.Ap
                out[di] = np.searchsorted(Y, Y[:k] + d * M, side="right") - 1
            cache[f] = out
        return cache[f]

    def _ends(self, node: _Series, fs: np.ndarray) -> np.ndarray:
        """(cap, len(fs), k) range ends for in-flight counts fs (0 or N + 1: no range)."""
        k, N = node.k, self.N
        j = np.arange(k)
        e = np.broadcast_to(node.e_t[:, None, :], (self.cap, len(fs), k)).copy()
        if self.cost.memory_limit is not None:
            for i, f in enumerate(fs):
                if 0 < f <= N:
                    np.minimum(e[:, i], self._memory_ends(node, int(f)), out=e[:, i])
        e[:, (fs == 0) | (fs > N), :] = j
        return np.maximum(e, j)

    def _eval_series(self, node: _Series, T: float, stop_at_root: bool) -> None:
        N, k, R = self.N, node.k, len(node.rows)
        L = min(N, node.size)
        node.e_t = self._time_ends(node, T)
        if R > 1:  # every in-flight count is needed: materialise once
            E = self._ends(node, np.arange(N + 2))
        G = np.full((R, L + 1, k + 1), INF)
        G[:, :, k] = 0.0
        deltas = node.rows
        flat_base = (np.arange(R) * (k + 1))[:, None, None]
        jj = np.arange(k)
        if node.pars:  # all parallel atoms at once: Dstack[p, δ, ℓ]
            pstart = np.array(list(node.pars))
            pend = np.array([end for _, end in node.pars.values()])
            Dstack = np.stack([par.D for par, _ in node.pars.values()])
        for lvl in range(1, L + 1):
            prev = G[:, lvl - 1, :]
            cur = prev.copy()
            # Ranges j..e-1 as one stage, in flight f = δ + ℓ.
            f = np.minimum(deltas + lvl, N + 1)
            ends = (E[:, f, :] if R > 1 else self._ends(node, f)).transpose(1, 0, 2)  # (R,cap,k)
            vals = prev.ravel()[flat_base + ends]
            cand = self.dvec[None, :, None] + vals
            cand[ends == jj] = INF
            np.minimum(cur[:, :k], cand.min(axis=1), out=cur[:, :k])
            if node.pars:
                # A parallel child P cut inside: D_P[δ + ℓ', ℓ - ℓ'] + G_end[δ, ℓ'], ℓ' < ℓ
                # (all levels ℓ' < ℓ are final already, so positions can go in any order).
                lp = np.arange(lvl)
                drow = deltas[:, None] + lp[None, :]  # (R, ℓ)
                dc = Dstack[:, np.minimum(drow, N), lvl - lp[None, :]]  # (npar, R, ℓ)
                dc = np.where((drow <= N)[None], dc, INF)
                rest = G[:, :lvl, :][:, :, pend].transpose(2, 0, 1)  # (npar, R, ℓ)
                tot = (dc + rest).min(axis=2)  # (npar, R)
                cur[:, pstart] = np.minimum(cur[:, pstart], tot.T)
            cur[cur > N] = INF
            G[:, lvl, :] = cur
            if stop_at_root and cur[0, 0] <= N:
                G[:, lvl + 1:, :] = cur[:, None, :]
                break
        node.G = G
        # Levels beyond this node's size add nothing: pad the table to N + 1 levels.
        if L < N:
            node.Dtab = np.concatenate([G[:, :, 0], np.repeat(G[:, L:, 0], N - L, axis=1)], 1)
        else:
            node.Dtab = G[:, :, 0]

    # --- reconstruction -----------------------------------------------------------------
    def stages_of_root(self, depth: int) -> List[Tuple[List[int], int]]:
        """(operator indices, devices) per stage of the configuration behind the root cell."""
        out: List[Tuple[List[int], int]] = []
        self._rec_series(self.root, 0, depth, out)
        return out

    def _fine_ops(self, node: _Series, j: int, e: int) -> List[int]:
        return [o for u in node.fine[j:e] for o in self.tree.units[u]]

    def _end(self, node: _Series, di: int, f: int, j: int) -> int:
        """Largest e with positions j..e-1 feasible on di + 1 devices, f in flight."""
        if node.dmin is None:
            return int(self._ends(node, np.array([f]))[di, 0, j])
        # Batched nodes keep dmin[j, e, f] instead (non-decreasing in e).
        return j + int(np.count_nonzero(node.dmin[j, j + 1:, f] <= di + 1))

    def _rec_series(self, node: _Series, delta: int, lvl: int, out) -> None:
        r = int(np.nonzero(node.rows == delta)[0][0])
        G, N, j = node.G, self.N, 0
        lvl = min(lvl, G.shape[1] - 1)
        while j < node.k:
            val = G[r, lvl, j]
            assert np.isfinite(val), "reconstruction reached an infeasible cell"
            if lvl > 0 and G[r, lvl - 1, j] == val:
                lvl -= 1
                continue
            f = min(delta + lvl, N + 1)
            done = False
            for di in range(self.cap):
                e = self._end(node, di, f, j)
                if e > j and di + 1 + G[r, lvl - 1, e] == val:
                    ops = self._fine_ops(node, j, e)
                    out.append((ops, di + 1))
                    j, lvl, done = e, lvl - 1, True
                    break
            if not done:
                par, end = node.pars[j]
                for lp in range(lvl):
                    if delta + lp <= N and \
                            par.D[delta + lp, lvl - lp] + G[r, lp, end] == val:
                        self._rec_parallel(par, delta + lp, lvl - lp, out)
                        j, lvl, done = end, lp, True
                        break
            assert done, "reconstruction found no choice matching the table"

    def _rec_parallel(self, par: _Parallel, delta: int, lvl: int, out) -> None:
        t = len(par.branches)
        while t > 0:
            val = par.H[t][delta, lvl]
            if par.H[t - 1][delta, lvl] + par.branches[t - 1].Dtab[delta, lvl] == val:
                self._rec_series(par.branches[t - 1], delta, lvl, out)
                t -= 1
                continue
            for s in range(t - 1):
                if par.H[s][delta, lvl] + par.grp[(s, t)][delta] == val:
                    ops = [o for b in par.branches[s:t] for o in self._fine_ops(b, 0, b.k)]
                    out.append((ops, int(par.grp[(s, t)][delta])))
                    t = s
                    break
            else:
                raise AssertionError("parallel reconstruction found no choice")


def plan_stages(graph: OpGraph, num_devices: int, cost: CostModel, *,
                rel_tol: float = 1e-3, tree: Optional[SPTree] = None, frontier: bool = False):
    """The search itself: (stages as (operator indices, devices), depth, SP tree); with
    ``frontier``, a fourth item: for a few depth limits below that depth (geometrically
    spaced), the (stages, depth) of the least target (to 1 %) the DP meets within each --
    the starts of the refinement.

    Raises ValueError if no configuration fits in memory, saying by how much the best misses.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    tree = tree or decompose(graph)
    planner = _Planner(tree, num_devices, cost)
    s = cost.sync_per_byte
    W = sum(op.work for op in graph.ops)
    P = sum(op.params for op in graph.ops)
    # Every stage meets T_max on any number of devices: t(d) <= W/d + 2 s P.
    hi = W + 2 * s * P + 1e-300
    if planner.feasible(hi) is None:
        raise ValueError(_memory_shortfall(graph, tree, num_devices, cost, hi))
    # Lower bound: max_s W_s / d_s >= sum W_s / sum d_s >= W / N, and no stage is faster
    # than its heaviest unit on `cap` devices.
    cap = planner.cap
    lo = max(W / num_devices, max(planner.uw) / cap) * (1 - 1e-9)
    # Bracket from below (optima sit close to the bound on balanced graphs), then bisect.
    for factor in (1.02, 1.1, 1.5, 3.0):
        probe = lo * factor
        if probe >= hi:
            break
        if planner.feasible(probe) is not None:
            hi = probe
            break
        lo = probe
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if planner.feasible(mid) is None:
            lo = mid
        else:
            hi = mid
    depth = planner.feasible(hi)
    best = planner.stages_of_root(depth)
    if not frontier:
        return best, depth, tree
    # The (time, depth) frontier: for each smaller depth limit, the least target meeting it.
    T_max, shallower = W + 2 * s * P + 1e-300, []

    def depth_within(T, limit):
        planner.feasible(T)
        g = planner.root.G[0, :, 0]
        ok = np.nonzero(g[:limit + 1] <= num_devices)[0]
        return int(ok[0]) if len(ok) else None

    # A few limits, geometrically spaced (each costs a bisection), coarse: they are starts.
    limits = sorted({depth - 1, depth - 2, (3 * depth) // 4, depth // 2, depth // 4, 1}
                    - {0, -1}, reverse=True)
    for limit in (lim for lim in limits if lim < depth):
        if depth_within(T_max, limit) is None:
            break  # no smaller limit is feasible either
        lo2, hi2 = hi, T_max
        while hi2 - lo2 > max(rel_tol, 1e-2) * hi2:
            mid = 0.5 * (lo2 + hi2)
            if depth_within(mid, limit) is None:
                lo2 = mid
            else:
                hi2 = mid
        d = depth_within(hi2, limit)
        shallower.append((planner.stages_of_root(d), d))
    return best, depth, tree, shallower


def _memory_shortfall(graph, tree, num_devices, cost: CostModel, T: float) -> str:
    """Bisect on the memory limit for the least per-device memory any configuration needs."""
    import dataclasses
    lo, hi = cost.memory_limit, None
    probe = cost.memory_limit * 2
    while hi is None:
        c = dataclasses.replace(cost, memory_limit=probe)
        if _Planner(tree, num_devices, c).feasible(T) is not None:
            hi = probe
        else:
            lo, probe = probe, probe * 2
            if probe > 1e30:
                return "no configuration fits in memory at any limit"
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        c = dataclasses.replace(cost, memory_limit=mid)
        if _Planner(tree, num_devices, c).feasible(T) is not None:
            hi = mid
        else:
            lo = mid
    return (f"no partition onto {num_devices} devices fits in {cost.memory_limit:.6g} bytes "
            f"per device: the best configuration needs {hi:.6g} bytes per device, "
            f"{hi - cost.memory_limit:.6g} bytes ({hi / cost.memory_limit - 1:.1%}) too many")


def partition(graph: OpGraph, num_devices: int, cost: Optional[CostModel] = None, *,
              rel_tol: float = 1e-3, chain_candidate: bool = True, refine: bool = True):
    """GraphPipe's partition of ``graph`` onto ``num_devices`` devices: a :class:`StageGraph`.

    Minimises the bottleneck time per sample (to ``rel_tol``), then the pipeline depth,
    over the partitions the SP decomposition can express (see the module docstring). With
    ``chain_candidate`` the best *chain* (contiguous stages of one topological order, the
    sequential baseline) is searched too and kept if strictly better -- so GraphPipe is
    never worse than the sequential partitioner, as in the paper's sequential models.
    With ``refine`` (and ``cost.max_replicas == 1``, at most ``REFINE_MAX_OPS`` operators)
    the result is then the best found by the local search of refine.py on the *simulated*
    time per sample (:attr:`StageGraph.simulated_time_per_sample`), started from those
    plans; its ``search`` attribute is ``"refined"`` when it moved.
    Raises ValueError if nothing fits in ``cost.memory_limit``.
    """
    cost = cost or CostModel()
    do_refine = refine and cost.max_replicas == 1 and len(graph) <= REFINE_MAX_OPS
    results, errors = _searches(graph, num_devices, cost, rel_tol, chain_candidate,
                                frontier=do_refine)
    if not results and do_refine and cost.memory_limit is not None:
        # Nothing the DP can express fits: start the refinement (which ranks memory
        # overflow first) from the unconstrained plans instead.
        free = dataclasses.replace(cost, memory_limit=None)
        starts, _ = _searches(graph, num_devices, free, rel_tol, chain_candidate, True)
        best = refine_stage_graph([_with_cost(sg, cost) for sg in starts],
                                  max_evals=_refine_evals(graph))
        if best.fits:
            best.search = "refined"
            return best
    if not results:
        raise errors[0]
    if do_refine:
        best = refine_stage_graph(results, max_evals=_refine_evals(graph))
        if best not in results:
            best.search = "refined"
        return best
    # Strictly better only: ties keep the SP result (listed first).
    return min(results, key=lambda sg: (sg.time_per_sample, sg.depth))


def _refine_evals(graph: OpGraph) -> int:
    """The refinement's budget of simulated candidates: 3000 on small graphs (where that is
    about every convex partition), fewer as each candidate's stage graph costs more to
    build (~40 000 operator-candidates in all: about 0.3 s of CPU)."""
    return int(min(3000, 4e4 / max(1, len(graph))))


def _with_cost(sg, cost: CostModel):
    from pipetrain.graphpipe.stage_graph import StageGraph
    out = StageGraph(sg.graph, sg.stages, sg.replicas, sg.num_devices, cost, tree=sg.tree)
    out.search = sg.search
    return out


def _searches(graph: OpGraph, num_devices: int, cost: CostModel, rel_tol: float,
              chain_candidate: bool, frontier: bool = False):
    """The SP search's stage graph (and the best chain's): (results, errors); with
    ``frontier``, each search's shallower plans follow its result in ``results``."""
    from pipetrain.graphpipe.stage_graph import StageGraph
    results, errors = [], []
    searches = [(graph, None)] + ([(graph.as_chain(), "chain")] if chain_candidate else [])
    for g, label in searches:
        try:
            found = plan_stages(g, num_devices, cost, rel_tol=rel_tol, frontier=frontier)
        except ValueError as err:
            errors.append(err)
            continue
        stages, depth, tree = found[:3]
        plans = [(stages, depth)] + (found[3] if frontier else [])
        for k, (stages, _) in enumerate(plans):
            # Chain stages name operators of the chain copy: same names, map back by name.
            ops = [[graph.index(g.ops[o].name) for o in st] for st, _ in stages]
            sg = StageGraph(graph, ops, [d for _, d in stages], num_devices, cost,
                            tree=tree if label is None else None)
            sg.search = (label or "sp") + ("" if k == 0 else f"-depth{sg.depth}")
            results.append(sg)
    return results, errors
