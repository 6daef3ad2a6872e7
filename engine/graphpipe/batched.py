"""Batched DP evaluation: many small SP nodes of the same shape in one set of array ops.

Real graphs have many small parallel regions (attention heads, towers, embedding lookups),
so the partitioner's time is dominated by per-node overhead, not arithmetic. This module
evaluates, for one target T, the recurrences of ``partitioner`` (see that module's
docstring) for a *batch* of nodes at once:

* series nodes without parallel atoms (a branch of plain operators) with the same number
  of positions k <= MAX_K, every δ row, over all (j, e) pairs (k is small);
* parallel nodes with the same number of branches (every parallel node goes through
  here, alone if it must).

The results are written back into each node (``G``, ``Dtab``, ``dmin`` / ``H``, ``grp``,
``D``), which is what reconstruction reads.
"""

from __future__ import annotations

from typing import List

import numpy as np

INF = np.inf
MAX_K = 16  # (j, e) pairs per node grow as k^2; longer series are evaluated one by one


def series_batch_key(node):
    """Nodes with the same key can share a batch (None: evaluate alone)."""
    if node.pars or node.k > MAX_K or len(node.rows) == 1:
        return None
    return ("series", node.k)


class SeriesBatch:
    """Leaf-only series nodes with the same k; T-independent arrays built once.

    Instead of range ends per device count (as the per-node code), the batch tabulates
    dmin[j, e, f] = the fewest devices for positions j..e-1 as one stage with f in flight
    (cost.min_devices), and takes ``min_e dmin[j, e, f] + G_e`` -- the same minimum, since
    the best d for a given end e is the least feasible one: k + 1 candidates instead of cap.
    """

    def __init__(self, planner, nodes: List):
        self.nodes = nodes
        self.k = k = nodes[0].k
        N = planner.N
        jj, ee = np.arange(k)[:, None], np.arange(k + 1)[None, :]
        self.later = ee > jj  # (k, k + 1): e can end a range starting at j

        def ranges(prefix):  # (B, k, k + 1, 1): total of positions j..e-1
            P = np.stack(prefix)
            return (P[:, None, :] - P[:, :k, None])[..., None]

        self.W = ranges([n.Wp for n in nodes])
        self.P = ranges([n.Pp for n in nodes])
        self.A = ranges([n.Ap for n in nodes])
        self.f = np.arange(N + 2, dtype=float)[None, None, None, :]

    def evaluate(self, planner, T: float) -> None:
        N, k = planner.N, self.k
        B, R = len(self.nodes), N + 1
        dmin = planner.cost.min_devices(self.W, self.P, self.A, self.f, T, N)
        dmin = np.where(self.later[None, :, :, None], dmin, INF)  # (B, k, k + 1, N + 2)
        dmin[..., 0] = INF
        dmin[..., N + 1] = INF
        L = min(N, k)
        G = np.full((B, R, L + 1, k + 1), INF)
        G[..., k] = 0.0
        deltas = np.arange(R)
        for lvl in range(1, L + 1):
            prev = G[:, :, lvl - 1, :]  # (B, R, k + 1)
            cur = prev.copy()
            f = np.minimum(deltas + lvl, N + 1)
            dm = dmin[:, :, :, f].transpose(0, 3, 1, 2)  # (B, R, k, k + 1)
            cand = (dm + prev[:, :, None, :]).min(axis=3)  # min over e
            np.minimum(cur[..., :k], cand, out=cur[..., :k])
            cur[cur > N] = INF
            G[:, :, lvl, :] = cur
        D = G[:, :, :, 0]
        if L < N:
            D = np.concatenate([D, np.repeat(D[:, :, L:], N - L, axis=2)], axis=2)
        for b, node in enumerate(self.nodes):
            node.G, node.Dtab, node.dmin, node.E = G[b], D[b], dmin[b], None


class ParallelBatch:
    """Parallel nodes with the same number of branches r (branch tables already filled)."""

    def __init__(self, planner, pars: List):
        self.pars = pars
        self.r = r = len(pars[0].branches)
        self.pairs = [(s, t) for t in range(2, r + 1) for s in range(t - 1)]
        if self.pairs:
            s_idx = np.array([s for s, _ in self.pairs])
            t_idx = np.array([t for _, t in self.pairs])

            def runs(x):  # (B, npairs): totals of branches s..t-1
                c = np.concatenate([np.zeros((len(pars), 1)), np.cumsum(x, axis=1)], axis=1)
                return c[:, t_idx] - c[:, s_idx]

            self.w = runs(np.stack([p.w for p in pars]))
            self.p = runs(np.stack([p.p for p in pars]))
            self.a = runs(np.stack([p.a for p in pars]))

    def evaluate(self, planner, T: float) -> None:
        N, r, B = planner.N, self.r, len(self.pars)
        grp = None
        if self.pairs:
            # (B, npairs, N + 1): fewest devices of a run as one stage, in flight δ + 1.
            grp = planner.cost.min_devices(self.w[..., None], self.p[..., None],
                                           self.a[..., None],
                                           np.arange(1, N + 2)[None, None, :], T, N)
        Dt = np.stack([b.Dtab for par in self.pars for b in par.branches])
        Dt = Dt.reshape(B, r, N + 1, N + 1)
        lvl_ok = (np.arange(N + 1) >= 1)[None, None, :]
        H = [np.zeros((B, N + 1, N + 1))]
        index = {st: i for i, st in enumerate(self.pairs)}
        for t in range(1, r + 1):
            h = H[t - 1] + Dt[:, t - 1]
            for s in range(t - 1):
                g = grp[:, index[(s, t)], :, None]
                h = np.minimum(h, np.where(lvl_ok, H[s] + g, INF))
            h[h > N] = INF
            H.append(h)
        for b, par in enumerate(self.pars):
            par.H = [h[b] for h in H]
            par.D = H[r][b]
            par.grp = {st: grp[b, i] for st, i in index.items()} if grp is not None else {}
