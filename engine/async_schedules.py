"""Asynchronous pipeline schedules (issue 8): 1F1B without flush, over T mini-batches.

Every asynchronous schedule has the same order; they differ only in the weight version each
pass runs on and whether that version is predicted forward. Global micro-batch k = t*m + j.
Stage r of p runs w = p-r-1 warm-up forwards, then F(b+w), B(b) for b = 0 .. T*m-1 (a
forward past the last micro-batch is skipped: the drain), and its update U(t) right after
the backward that closes mini-batch t. The generator counts, walking that order, the updates
n a stage has applied when each forward is issued, and derives the version from it:

==============  ===============================================  ====================
schedule        version of F(k) and B(k) on stage r              predicted (distance)
==============  ===============================================  ====================
``pipedream``   n at F(k)  (= max(floor((k-p+r+1)/m), 0))         no
``2bw``         max(t - d, 0), d = 1 if p > 1 else 0              no
``spectrain``   n at F(k)                                         s = t - v
``xpipe``       n at F(t*m), the bellwether, for all j of t       s = t - v
``2bw-predict`` max(t - d, 0)                                     s = t - v
==============  ===============================================  ====================

The distance is never stored separately: for a predicting schedule it is ``t - version``,
read off the plan by :func:`prediction_distance`. The plan is an ordinary IR schedule
(``Schedule.from_actions`` with ``U`` actions), so the C++ validator proves it deadlock-free
and version-consistent (every version v >= 1 after its U(v-1); F/B of k on one version).
The closed forms above are asserted by tests against this counting and against
:func:`pipetrain.async_reference.versions_used`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from pipetrain import schedules

__all__ = ["ASYNC", "PREDICTING", "is_async", "build_async", "from_arguments", "prediction_distance",
           "stage_order", "delay"]

ASYNC = ("pipedream", "2bw", "spectrain", "xpipe", "2bw-predict")
PREDICTING = ("spectrain", "xpipe", "2bw-predict")


def is_async(name: object) -> bool:
    return isinstance(name, str) and name in ASYNC


def delay(p: int) -> int:
    """2BW's delay d: 1 once stages run ahead of each other (p >= 2); 0 for one stage."""
    return 1 if p > 1 else 0


def stage_order(p: int, r: int, m: int, T: int) -> List[Tuple[str, int]]:
    """Stage r's events: ("F", k), ("B", k), ("U", t) in issue order (1F1B, no flush)."""
    w, K = p - r - 1, T * m
    out = [("F", k) for k in range(min(w, K))]
    for b in range(K):
        if b + w < K:
            out.append(("F", b + w))
        out.append(("B", b))
        if (b + 1) % m == 0:
            out.append(("U", b // m))
    return out


def _versions(name: str, p: int, r: int, m: int, T: int) -> Dict[int, int]:
    """{k: version} for stage r, counting the updates issued before each forward."""
    n, table, bell = 0, {}, {}
    for kind, i in stage_order(p, r, m, T):
        if kind == "U":
            n = i + 1
        elif kind == "F":
            t, j = divmod(i, m)
            if name in ("pipedream", "spectrain"):
                table[i] = n
            elif name == "xpipe":
                if j == 0:
                    bell[t] = n
                table[i] = bell[t]
            else:   # 2bw, 2bw-predict
                v = max(t - delay(p), 0)
                assert v <= n, "2bw: a version used before it exists (m < p)"
                table[i] = v
    return table


def check(name: str, p: int, m: int, num_chunks: int = 1) -> None:
    """Raise ValueError for a combination the asynchronous schedules do not allow."""
    if name not in ASYNC:
        raise ValueError(f"unknown asynchronous schedule {name!r}; one of {', '.join(ASYNC)}")
    if num_chunks != 1:
        # Interleaving exists to shrink the fill/drain bubble of a flushed pipeline; without
        # a flush the steady-state bubble already tends to 0 (simulated: see
        # test_simulated_steady_state_bubble_tends_to_zero), so v chunks per device would only
        # multiply the transfers and the in-flight versions per device by v.
        raise ValueError(f"{name} runs one stage per device (num_chunks=1, got {num_chunks}): "
                         "interleaving shortens the fill/drain bubble of a flushed pipeline, "
                         "and an asynchronous pipeline has no flush (its bubble tends to 0), so "
                         "it would only add transfers and weight versions; use num_chunks=1, or "
                         "interleaved-1f1b for a synchronous pipeline")
    if name in ("2bw", "2bw-predict") and m < p:
        raise ValueError(f"{name} needs num_microbatches >= num_devices (gradients coalesced "
                         f"over at least p micro-batches so two versions suffice); got m={m} < p={p}")


def build_async(name: str, p: int, m: int, T: int = 1) -> "schedules.Schedule":
    """The plan of ``name`` over T mini-batches: p devices, one stage each, m micro-batches
    per mini-batch, a U per stage and mini-batch, a version on every F/B. Validated."""
    check(name, p, m)
    rows = []
    for r in range(p):
        ver = _versions(name, p, r, m, T)
        rows.append([f"{r}U{i}" if kind == "U" else f"{r}{kind}{i}@{ver[i]}"
                     for kind, i in stage_order(p, r, m, T)])
    s = schedules.Schedule.from_actions(rows, num_stages=p, num_microbatches=m,
                                        num_minibatches=T, name=name)
    s.validate()
    return s


def prediction_distance(name: str, action) -> int:
    """s for a pass of a predicting schedule: t - version (0 for non-predicting ones)."""
    if name not in PREDICTING or action.kind not in ("F", "B", "I", "W"):
        return 0
    return action.microbatch // action.num_microbatches - action.version


def from_arguments(name: str, p: Optional[int], balance: Any, m: Optional[int],
                    num_chunks: Optional[int], num_layers: int) -> Any:
    """The Pipeline's asynchronous schedule from its arguments: the one-mini-batch plan (for
    printing and stats; ``train()`` builds the plans over several mini-batches), checking the
    same shapes as a synchronous schedule. Raises ValueError saying what is allowed."""
    if p is None:
        p = len(balance) if balance is not None else None
    if p is None:
        raise ValueError("give num_devices (pipeline devices) or balance (layers per stage)")
    if balance is not None and len(balance) != p:
        raise ValueError(f"balance has {len(balance)} entries but num_devices = {p}")
    if p > num_layers:
        raise ValueError(f"num_devices = {p} stages but the model has only {num_layers} layers")
    check(name, p, 1 if m is None else m, 1 if num_chunks is None else num_chunks)
    return build_async(name, p, 1 if m is None else m, 1)
