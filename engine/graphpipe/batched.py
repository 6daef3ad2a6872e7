"""Batched DP evaluation: many small SP nodes of the same shape in one set of array ops.

Real graphs have many small parallel regions (attention heads, towers, embedding lookups),
so the partitioner's time is dominated by per-node overhead, not arithmetic. This module
evaluates, for one target T, the same recurrences as ``partitioner._Planner._eval_series``
/ ``_eval_parallel`` (see that module's docstring) for a *batch* of nodes at once:

* series nodes without parallel atoms (a branch of plain operators) with the same number
  of positions k <= MAX_K, every δ row: range ends come from comparing all (j, e) pairs
  instead of ``searchsorted`` (k is small);
* parallel nodes with the same number of branches.

The results are written back into each node (``G``, ``E``, ``Dtab`` / ``H``, ``grp``, ``D``)
exactly as the per-node code would, so reconstruction does not know the difference.
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
    """Leaf-only series nodes with the same k; T-independent arrays built once."""

    def __init__(self, planner, nodes: List):
        self.nodes = nodes
        p, c = planner, planner.cost
        self.k = k = nodes[0].k
        self.Z = np.stack([n.Z for n in nodes])  # (B, cap, k + 1)
        jj, ee = np.arange(k)[:, None], np.arange(k + 1)[None, :]
        self.later = ee > jj  # (k, k + 1): e can end a range starting at j
        self.count_base = np.arange(k)
        if c.memory_limit is None:
            self.e_mem = None
        else:
            # (1+κ) P + f B A / d <= M  <=>  d (1+κ) P + f B A <= d M, for ranges j..e-1.
            Pp = np.stack([n.Pp for n in nodes])  # (B, k + 1)
            Ap = np.stack([n.Ap for n in nodes])
            dP = Pp[:, None, :] - Pp[:, :k, None]  # (B, k, k + 1): P of j..e-1
            dA = Ap[:, None, :] - Ap[:, :k, None]
            d = planner.dvec[None, :, None, None, None]
            f = np.arange(p.N + 2, dtype=float)[None, None, :, None, None]
            ok = (d * (1 + c.optimizer_factor) * dP[:, None, None] + f * c.microbatch_size
                  * dA[:, None, None] <= d * c.memory_limit * (1 + 1e-12))
            ok &= self.later
            self.e_mem = self.count_base + ok.sum(axis=-1)  # (B, cap, N + 2, k)

    def evaluate(self, planner, T: float) -> None:
        N, k, cap = planner.N, self.k, planner.cap
        B = len(self.nodes)
        R = N + 1
        # Time: Z_d[e] - Z_d[j] <= d T, monotone in e, so the count of passing e is the end.
        dZ = self.Z[:, :, None, :] - self.Z[:, :, :k, None]  # (B, cap, k, k + 1)
        budget = (planner.dvec * T * (1 + 1e-12))[None, :, None, None]
        e_t = self.count_base + ((dZ <= budget) & self.later).sum(axis=-1)  # (B, cap, k)
        if self.e_mem is None:
            E = np.broadcast_to(e_t[:, :, None, :], (B, cap, N + 2, k)).copy()
        else:
            E = np.minimum(e_t[:, :, None, :], self.e_mem)
        jj = np.arange(k)
        E[:, :, N + 1, :] = jj
        E[:, :, 0, :] = jj
        L = min(N, k)
        G = np.full((B, R, L + 1, k + 1), INF)
        G[..., k] = 0.0
        deltas = np.arange(R)
        flat_base = (np.arange(B * R) * (k + 1)).reshape(B, R, 1, 1)
        for lvl in range(1, L + 1):
            prev = G[:, :, lvl - 1, :]  # (B, R, k + 1)
            cur = prev.copy()
            f = np.minimum(deltas + lvl, N + 1)
            ends = E[:, :, f, :].transpose(0, 2, 1, 3)  # (B, R, cap, k)
            vals = prev.ravel()[flat_base + ends]
            cand = planner.dvec[None, None, :, None] + vals
            cand[ends == jj] = INF
            np.minimum(cur[..., :k], cand.min(axis=2), out=cur[..., :k])
            cur[cur > N] = INF
            G[:, :, lvl, :] = cur
        D = G[:, :, :, 0]
        if L < N:
            D = np.concatenate([D, np.repeat(D[:, :, L:], N - L, axis=2)], axis=2)
        for b, node in enumerate(self.nodes):
            node.G, node.E, node.Dtab = G[b], E[b], D[b]


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
        Dt = np.stack([np.stack([b.Dtab for b in par.branches]) for par in self.pars])
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
