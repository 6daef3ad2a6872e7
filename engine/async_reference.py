"""The plain-torch reference trainer for asynchronous pipelines (issue 8).

One process, no pipetrain executor, obviously correct over fast: it replays, event by event,
what each stage of a 1F1B pipeline without flushes does, holds the weight versions (and the
optimizer-state versions) that the schedule's rule needs, and applies exactly that rule. The
runtime's asynchronous schedules are tested against it in fp64.

Notation. p stages, stage r (0-indexed), m micro-batches per mini-batch, mini-batch t
(0-indexed), global micro-batch k = t*m + j (j < m). A stage's version n counts the updates it
has applied; W(v) is the stage's weights after v updates, W(0) the initial weights.

Event order (every schedule except ``sync``): 1F1B without flushes. Stage r runs w = p-r-1
warm-up forwards F(0..w-1), then F(b+w), B(b) for b = 0, 1, ... (a forward is skipped once
there are none left: the drain), so F(k) comes right after B(k-w-1). The stage applies its
update U right after the backward of the last micro-batch of each mini-batch: the gradients
of that mini-batch's m micro-batches, summed, with micro-batch i's loss weighted by
n_i / N_t (its share of the mini-batch's samples). Counting updates in this order gives the
version current at F(k):  v_r(k) = max(floor((k - p + r + 1) / m), 0), and at B(k): floor(k/m).
``sync`` runs 1F1B *with* a flush per mini-batch (the same order restricted to one mini-batch,
then U), so every micro-batch of t sees W(t).

Which weights micro-batch k (of mini-batch t) uses on stage r, for forward F and backward B:

- ``sync``        W(t) for F and B: plain synchronous training (GPipe / 1F1B semantics).
- ``pipedream``   weight stashing: W(v), v = v_r(k) (the version current at F(k)), kept until
                  B(k), which uses it too. Only versions still needed are kept: at most
                  ceil((p-r-1)/m) + 1 <= p - r per stage.
- ``2bw``         PipeDream-2BW: W(v), v = max(t - d, 0), for F and B on every stage, so
                  W(t+1) = W(t) - lr*grad f(W(t-1)); two versions held. m < p is a ValueError.
                  d = 1 (the issue's rule) when p >= 2; d = 0 when p = 1, where no stage runs
                  ahead, so that one stage is plain training like every other schedule.
- ``spectrain``   momentum SGD. At F(k): v = v_r(k), s = t - v (updates between the version
                  read and the update that consumes this gradient), and
                      W_hat = W(v) - s * lr * buf(v),
                  buf(v) the momentum buffer after v updates (torch.optim.SGD's convention,
                  buf = mu*buf + (1-dampening)*g, buf = g at the first step; zero before the
                  first update). W_hat is stashed; B(k) uses it too.
- ``xpipe``       Adam / AdamW. The bellwether j = 0 of mini-batch t, at its F on each stage:
                  v = v_r(t*m), s = t - v (= ceil((p-r-1)/m) once t is large enough),
                      W_hat = W(v) - s * lr * m_hat / (sqrt(v_hat) + eps),
                      m_hat = exp_avg(v) / (1 - beta1^c), v_hat = exp_avg_sq(v) / (1 - beta2^c),
                  with c = v the step count of version v (as torch.optim.Adam corrects them)
                  and W_hat = W(v) when v = 0 (no state yet). All m micro-batches of t use
                  that W_hat for F and B.
- ``2bw-predict`` ours: 2BW's order and versions, v = max(t - d, 0), s = t - v (1 once t >= 1
                  when p >= 2), and every micro-batch of t uses W_hat = W(v) - s * direction(v):
                  SpecTrain's lr*buf(v) for SGD with momentum, XPipe's Adam direction above for
                  Adam/AdamW. Computed once per (stage, mini-batch).
- ``stale``       baseline, no stashing, no prediction: F(k) uses the weights current at its
                  forward, W(v_r(k)); B(k) uses the weights current at its backward,
                  W(floor(k/m)): the vector-Jacobian product of the stage at (the input F(k)
                  received, the current weights), i.e. what a re-computing runtime without a
                  stash computes. The output F(k) sent downstream is the old-weights one.

The optimizer: one per stage, ``optimizer_factory(params)``, stepped at every U with that
mini-batch's (possibly delayed) gradient and applied to the newest weights W(n), as in the
original PipeDream / 2BW code. Predictions read the hyper-parameters of the stage's param
groups (lr, momentum / betas, eps) and the state *snapshot of version v*. AdamW's decoupled
weight decay and SGD's Nesterov term are not extrapolated (the formulas above, as written).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn
from torch.func import functional_call

SCHEDULES = ("sync", "pipedream", "2bw", "spectrain", "xpipe", "2bw-predict", "stale")
PREDICTING = ("spectrain", "xpipe", "2bw-predict")


class VersionUse(NamedTuple):
    """What one (stage, micro-batch) used: the version read at its forward, the version its
    backward used, and the prediction distance s (0 when the schedule does not predict).
    A predicting schedule's forward and backward both use W_hat built from W(forward)."""
    forward: int
    backward: int
    distance: int


# ---------------------------------------------------------------- the event order


def stage_events(schedule: str, p: int, r: int, m: int, T: int) -> list[tuple[str, int]]:
    """Stage r's events in order: ("F", k), ("B", k) and ("U", n) -- the update producing W(n)."""
    if schedule == "sync":  # 1F1B with a flush: each mini-batch is its own little pipeline
        events = []
        for t in range(T):
            events += [(kind, t * m + i) for kind, i in _one_f_one_b(p - r - 1, m)]
            events.append(("U", t + 1))
        return events
    return _one_f_one_b(p - r - 1, T * m, m)


def _one_f_one_b(w: int, K: int, m: int | None = None) -> list[tuple[str, int]]:
    """w warm-up forwards, then F(b+w), B(b) for b < K (F skipped past K-1); with m given, an
    update ("U", (b+1)/m) right after every backward that closes a mini-batch."""
    events = [("F", k) for k in range(min(w, K))]
    for b in range(K):
        if b + w < K:
            events.append(("F", b + w))
        events.append(("B", b))
        if m is not None and (b + 1) % m == 0:
            events.append(("U", (b + 1) // m))
    return events


def _delay(p: int) -> int:
    """2BW's constant delay d: 1 as soon as stages run ahead of each other (p >= 2)."""
    return 1 if p > 1 else 0


def _forward_rule(schedule: str, p: int, t: int, j: int, n: int,
                  bellwether: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(version read, prediction distance s) for the forward of micro-batch j of mini-batch t
    on a stage that has applied n updates. ``bellwether`` maps t -> (v, s) for xpipe."""
    if schedule == "sync":
        if n != t:
            raise AssertionError(f"sync: forward of mini-batch {t} sees version {n}")
        return t, 0
    if schedule in ("pipedream", "stale"):
        return n, 0
    if schedule == "spectrain":
        return n, t - n
    if schedule == "xpipe":
        if j == 0:
            bellwether[t] = (n, t - n)
        return bellwether[t]
    v = max(t - _delay(p), 0)  # 2bw, 2bw-predict
    if v > n:
        raise AssertionError(f"{schedule}: version {v} needed before it exists (n = {n})")
    return v, (t - v if schedule == "2bw-predict" else 0)


def versions_used(schedule: str, p: int, m: int, T: int) -> dict[tuple[int, int], VersionUse]:
    """The table {(stage r, micro-batch k): VersionUse} that ``reference_train`` follows for T
    mini-batches: found by walking each stage's events and counting its updates (the trainer
    records the same table as it runs; tests compare both with the closed forms)."""
    _check(schedule, p, m)
    table = {}
    for r in range(p):
        n, fwd, bell = 0, {}, {}
        for kind, i in stage_events(schedule, p, r, m, T):
            if kind == "U":
                n = i
            elif kind == "F":
                fwd[i] = _forward_rule(schedule, p, i // m, i % m, n, bell)
            else:
                v, s = fwd.pop(i)
                table[(r, i)] = VersionUse(v, n if schedule == "stale" else v, s)
    return table


def _check(schedule: str, p: int, m: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; one of {SCHEDULES}")
    if p < 1 or m < 1:
        raise ValueError(f"need p >= 1 and m >= 1, got p={p}, m={m}")
    if schedule in ("2bw", "2bw-predict") and m < p:
        raise ValueError(f"{schedule} needs m >= p (gradients coalesced over at least p "
                         f"micro-batches), got m={m} < p={p}")


# ---------------------------------------------------------------- prediction


def _predict(weights: list[torch.Tensor], state: list[dict], groups: list[dict],
             group_of: list[int], s: int) -> list[torch.Tensor] | None:
    """W_hat = W(v) - s * direction, direction from the optimizer state of version v (``state``,
    one dict per parameter, empty before the first update: then W_hat is a copy of W(v)).
    None when s = 0: the forward reads W(v) itself."""
    if s == 0:
        return None
    if not state[0]:
        return [w.clone() for w in weights]
    out = []
    for w, st, gi in zip(weights, state, group_of):
        g = groups[gi]
        if "betas" in g:  # Adam / AdamW, bias-corrected as torch.optim.Adam does
            beta1, beta2 = g["betas"]
            c = int(st["step"])
            m_hat = st["exp_avg"] / (1 - beta1 ** c)
            v_hat = st["exp_avg_sq"] / (1 - beta2 ** c)
            direction = g["lr"] * m_hat / (v_hat.sqrt() + g["eps"])
        else:  # SGD with momentum: torch's buffer
            direction = g["lr"] * st["momentum_buffer"]
        out.append(w - s * direction)
    return out


def _check_optimizer(schedule: str, opt: torch.optim.Optimizer) -> None:
    for g in opt.param_groups:
        is_adam, is_sgd = "betas" in g, "momentum" in g and g["momentum"] > 0
        if g.get("amsgrad") or g.get("maximize"):
            raise ValueError("prediction does not support amsgrad or maximize")
        ok = {"spectrain": is_sgd, "xpipe": is_adam, "2bw-predict": is_sgd or is_adam}
        if schedule in ok and not ok[schedule]:
            raise ValueError(f"{schedule} needs " + {"spectrain": "SGD with momentum > 0",
                             "xpipe": "Adam or AdamW", "2bw-predict":
                             "SGD with momentum > 0, Adam or AdamW"}[schedule])


# ---------------------------------------------------------------- the trainer


@dataclasses.dataclass
class _Stage:
    """One stage: its live module (holding W(n)) and optimizer, the weight versions and
    optimizer-state versions it still holds, and the micro-batches in flight on it."""
    module: nn.Module
    opt: torch.optim.Optimizer
    group_of: list[int]                # param index -> param group index
    names: list[str]                   # parameter names, in parameters() order
    events: list[tuple[str, int]]
    next_forward: list[int | None]     # event position -> micro-batch of the next F, if any
    pos: int = 0                       # the next event to run
    n: int = 0                         # updates applied so far
    versions: dict = dataclasses.field(default_factory=dict)   # v -> [tensor]: W(v)
    states: dict = dataclasses.field(default_factory=dict)     # v -> [dict]: optimizer state
    predicted: dict = dataclasses.field(default_factory=dict)  # t -> W_hat shared by t
    stash: dict = dataclasses.field(default_factory=dict)      # k -> _InFlight
    bellwether: dict = dataclasses.field(default_factory=dict)
    grad: list | None = None           # the current mini-batch's summed weight gradient
    peak_versions: int = 0
    peak_predicted: int = 0


class _InFlight(NamedTuple):
    x: torch.Tensor | None             # the input leaf (None on stage 0: data needs no grad)
    raw_x: torch.Tensor                # the input as received (for a re-computed backward)
    out: torch.Tensor                  # output (or weighted loss on the last stage)
    leaves: list[torch.Tensor]         # the weights the forward used, as autograd leaves
    v: int
    s: int
    predicted: bool                    # leaves are a W_hat buffer, not W(v)


class _Run:
    """One reference_train call: the stages, the data split into micro-batches, the mailboxes."""

    def __init__(self, stages, data, schedule, m, loss_fn, optimizer_factory, trace):
        self.p, self.m, self.schedule, self.loss_fn = len(stages), m, schedule, loss_fn
        self.T = len(data)
        self.micro = {}                # k -> (x, y, share of the mini-batch's samples)
        for t, (x, y) in enumerate(data):
            xs, ys = torch.tensor_split(x, m), torch.tensor_split(y, m)
            if any(len(c) == 0 for c in xs):
                raise ValueError(f"mini-batch {t} has {len(x)} samples, fewer than m = {m}")
            for j in range(m):
                self.micro[t * m + j] = (xs[j], ys[j], len(xs[j]) / len(x))
        self.stages = []
        for r, module in enumerate(stages):
            opt = optimizer_factory(module.parameters())
            _check_optimizer(schedule, opt)
            params = list(module.parameters())
            group = {id(q): gi for gi, g in enumerate(opt.param_groups) for q in g["params"]}
            events = stage_events(schedule, self.p, r, m, self.T)
            nxt, upcoming = [None] * len(events), None
            for i in range(len(events) - 1, -1, -1):
                if events[i][0] == "F":
                    upcoming = events[i][1]
                nxt[i] = upcoming
            st = _Stage(module, opt, [group[id(q)] for q in params],
                        [name for name, _ in module.named_parameters()], events, nxt)
            st.versions[0] = [q.detach().clone() for q in params]
            # The state of version 0: empty for a fresh optimizer; an optimizer handed over
            # from an earlier run (training continued) predicts from the state it holds.
            st.states[0] = [{key: (val.detach().clone() if torch.is_tensor(val) else val)
                             for key, val in opt.state.get(q, {}).items()} for q in params]
            self.stages.append(st)
        self.losses = [0.0] * self.T
        self.acts, self.grads = {}, {}  # (r, k) -> activation for r+1 / input gradient for r-1
        self.table = {}
        self.trace = trace
        self.record_weights = trace is not None and "weights" in trace

    def run(self):
        progressed = True
        while progressed:  # stages round-robin; an event runs once its input has arrived
            progressed = False
            for r, st in enumerate(self.stages):
                while st.pos < len(st.events):
                    kind, i = st.events[st.pos]
                    if kind == "F" and r > 0 and (r - 1, i) not in self.acts:
                        break
                    if kind == "B" and r < self.p - 1 and (r + 1, i) not in self.grads:
                        break
                    {"F": self.forward, "B": self.backward, "U": self.update}[kind](r, st, i)
                    st.pos += 1
                    progressed = True
                    self.drop_unneeded(st)
        if any(st.pos < len(st.events) for st in self.stages):
            raise RuntimeError("reference trainer stalled: the event order is inconsistent")

    def _call(self, r, st, leaves, x, k):
        """The stage's output (the last stage: its loss, weighted by the micro-batch's share)."""
        out = functional_call(st.module, dict(zip(st.names, leaves)), (x,))
        if r == self.p - 1:
            _, y, share = self.micro[k]
            out = self.loss_fn(out, y) * share
        return out

    def forward(self, r, st, k):
        t, j = divmod(k, self.m)
        v, s = _forward_rule(self.schedule, self.p, t, j, st.n, st.bellwether)
        weights = None
        if s > 0:
            # xpipe and 2bw-predict: one W_hat per (stage, mini-batch), made at its first
            # forward; spectrain predicts per micro-batch (v and s change within a mini-batch).
            if self.schedule != "spectrain" and t in st.predicted:
                weights = st.predicted[t]
            else:
                weights = _predict(st.versions[v], st.states[v], st.opt.param_groups,
                                   st.group_of, s)
                if self.schedule != "spectrain":
                    st.predicted[t] = weights
        predicted = weights is not None
        if not predicted:
            weights = st.versions[v]
        raw = self.acts.pop((r - 1, k)) if r > 0 else self.micro[k][0]
        x = raw.detach().requires_grad_() if r > 0 else None
        leaves = [w.detach().requires_grad_() for w in weights]
        out = self._call(r, st, leaves, x if r > 0 else raw, k)
        st.stash[k] = _InFlight(x, raw, out, leaves, v, s, predicted)
        if r < self.p - 1:
            self.acts[(r, k)] = out.detach()
        else:
            self.losses[t] += out.item()
        if self.record_weights:
            self.trace["weights"][(r, k)] = [w.detach().clone() for w in weights]

    def backward(self, r, st, k):
        f = st.stash.pop(k)
        x, out, leaves, v_b = f.x, f.out, f.leaves, f.v
        if self.schedule == "stale" and st.n != f.v:
            # No stash: the backward sees the weights current now, on the input F(k) received.
            v_b = st.n
            x = f.raw_x.detach().requires_grad_() if r > 0 else None
            leaves = [w.detach().requires_grad_() for w in st.versions[st.n]]
            out = self._call(r, st, leaves, x if r > 0 else f.raw_x, k)
        upstream = self.grads.pop((r + 1, k)) if r < self.p - 1 else None
        inputs = leaves + ([x] if r > 0 else [])
        gs = torch.autograd.grad(out, inputs, grad_outputs=upstream, allow_unused=True)
        gw = [torch.zeros_like(w) if g is None else g for g, w in zip(gs, leaves)]
        st.grad = gw if st.grad is None else [a + b for a, b in zip(st.grad, gw)]
        if r > 0:
            self.grads[(r, k)] = gs[-1]
        self.table[(r, k)] = VersionUse(f.v, v_b, f.s)

    def update(self, r, st, n):
        params = list(st.module.parameters())
        with torch.no_grad():
            for q, g in zip(params, st.grad):
                q.grad = g.clone()
        st.opt.step()
        st.opt.zero_grad(set_to_none=True)
        st.grad = None
        st.n = n
        st.versions[n] = [q.detach().clone() for q in params]
        if self.schedule in PREDICTING:
            st.states[n] = [{key: (val.detach().clone() if torch.is_tensor(val) else val)
                             for key, val in st.opt.state.get(q, {}).items()} for q in params]

    def drop_unneeded(self, st):
        """Keep W(v) (and its optimizer state) only while a later event reads it: v = n (the
        live weights), a non-predicted in-flight micro-batch's version, or the base version of
        the next forward when that forward still has to read or predict from it."""
        upcoming = st.next_forward[st.pos] if st.pos < len(st.events) else None
        t_next = None if upcoming is None else upcoming // self.m
        # stale's backward reads the live weights, never the version its forward used.
        keep = {st.n} | {f.v for f in st.stash.values()
                         if not f.predicted and self.schedule != "stale"}
        keep_state = {st.n} if self.schedule in ("spectrain", "xpipe") else set()
        if t_next is not None and self.schedule in ("2bw", "2bw-predict"):
            base = max(t_next - _delay(self.p), 0)
            if not (self.schedule == "2bw-predict" and t_next in st.predicted):
                keep.add(base)
                keep_state.add(base)
        st.versions = {v: w for v, w in st.versions.items() if v in keep}
        st.states = {v: s for v, s in st.states.items() if v in keep_state or v == st.n}
        st.predicted = {t: w for t, w in st.predicted.items() if t_next is not None and t >= t_next}
        buffers = {w[0].data_ptr() for w in st.predicted.values()}
        buffers |= {f.leaves[0].data_ptr() for f in st.stash.values() if f.predicted}
        st.peak_versions = max(st.peak_versions, len(st.versions))
        st.peak_predicted = max(st.peak_predicted, len(buffers))


def reference_train(stages: list[nn.Module], batches: Iterable, *, schedule: str,
                    num_microbatches: int, loss_fn: Callable, optimizer_factory: Callable,
                    trace: dict | None = None):
    """Train ``stages`` (a model split into p stages, applied in order; each maps one tensor
    to one tensor, deterministically: no dropout) on ``batches``, an iterable of (x, y)
    mini-batches (read to its end first), with the asynchronous ``schedule`` of this module's
    docstring and m = ``num_microbatches`` micro-batches per mini-batch (``torch.tensor_split``
    on dim 0: sizes may differ by one; each needs at least one sample).

    ``loss_fn(out, y)`` is a mean over the micro-batch's samples; ``optimizer_factory(params)``
    builds one stage's optimizer (one param group per stage is typical; several work). The
    stage modules are trained in place: after the drain (every remaining backward and update
    applied) they hold W(T).

    Returns (losses, weights): each mini-batch's loss, the size-weighted mean of its
    micro-batch losses as computed by the forwards, and each stage's final state_dict (cloned).
    With a ``trace`` dict it also fills "versions" {(r, k): VersionUse} as counted at event
    time, "peak_versions" / "peak_predicted" per stage (the most weight versions W(v) /
    predicted W_hat buffers held at once, counted after each event drops what no later event
    needs), and, if ``trace`` already holds the key "weights", {(r, k): [tensors]}: the
    weights each forward used (in ``named_parameters`` order).
    """
    _check(schedule, len(stages), num_microbatches)
    run = _Run(stages, list(batches), schedule, num_microbatches, loss_fn, optimizer_factory,
               trace)
    run.run()
    if trace is not None:
        trace["versions"] = run.table
        trace["peak_versions"] = [st.peak_versions for st in run.stages]
        trace["peak_predicted"] = [st.peak_predicted for st in run.stages]
    return run.losses, [{k: v.detach().clone() for k, v in st.module.state_dict().items()}
                        for st in run.stages]
