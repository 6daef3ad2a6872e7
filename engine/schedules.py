"""Pipeline schedules: build, write by hand, validate, lower and simulate (over ``_C.schedule``).

A schedule (a plan) lists, for each device, the actions it issues in order. An action is a
stage, a micro-batch and a kind, printed compactly: ``"1F3"`` is stage 1's forward of
micro-batch 3. Kinds (:class:`Kind`): ``F`` forward, ``B`` full backward, and for
zero-bubble schedules ``I`` (input-gradient backward) + ``W`` (weight-gradient backward)
instead of ``B``; ``U`` is the optimizer update of one stage after one mini-batch
(``"1U0"``: stage 1 after mini-batch 0, producing its weight version 1). A pass (F/B/I/W)
may name the weight version it runs on: ``"1F3@2"``; without ``@`` it runs on the live
weights. :meth:`Schedule.lower` adds transfers: ``"1SF3>2"`` (stage 1 sends micro-batch
3's activation to stage 2), ``"2RF3<1"`` (stage 2 receives it), ``"2SB3>1"`` / ``"1RB3<2"``
(the gradient going back). A W may cover a range of micro-batches, ``"1W3-5"`` (a *batched
W*: stage 1's weight gradients of micro-batches 3..5 as one computation, each Linear one
GEMM over their stacked rows); each micro-batch's W must appear exactly once, after its I.
``zb-h1-bw`` / ``zb-h2-bw`` batch the W's each stage defers past its last I.

A plan spans ``num_minibatches`` T mini-batches of ``num_microbatches`` m micro-batches;
micro-batches are numbered globally, ``k = t * m + j``.

Stages are addressed by id with explicit edges (:attr:`Schedule.stage_graph`, a
:class:`StageGraph` bound from C++); today's generators build chains, the IR holds any DAG.

Everything heavy (parsing, generation, validation, simulation) runs in C++ in linear time;
Python :class:`Action` objects are only created when :meth:`Schedule.actions` is called.

Example::

    from pipetrain import schedules
    s = schedules.build("1f1b", num_stages=4, num_microbatches=8)
    print(s)                                  # device x time grid
    r = s.simulate(forward=1.0, backward=2.0)
    r.bubble_ratio                            # (p-1)/(m+p-1) = 3/11
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Iterable, Sequence, Union

from pipetrain import _C

_core = _C.schedule

__all__ = ["Action", "Kind", "Schedule", "ScheduleError", "SimulationResult", "StageGraph",
           "NAMES", "build", "parse", "validate"]

#: Names accepted by :func:`build`.
NAMES: tuple[str, ...] = tuple(_core.names())

#: Action kinds, named by the C++ core; a member equals its name (``Kind.F == "F"``).
Kind = enum.StrEnum("Kind", [(name, name) for name in _core.kind_names()], module=__name__,
                    qualname="Kind")
Kind.__doc__ = ("Action kind: F, B, I, W (passes over one micro-batch), U (optimizer update), "
                "SF, RF, SB, RB (transfers, after lowering).")
_KINDS: tuple = tuple(Kind)  # by the kind index the core uses

PASS_KINDS = (Kind.F, Kind.B, Kind.I, Kind.W)  # one micro-batch each; take a version
TRANSFER_KINDS = (Kind.SF, Kind.RF, Kind.SB, Kind.RB)

#: The stage graph (C++ object): stages, edges, placement. See :attr:`Schedule.stage_graph`.
StageGraph = _core.StageGraph


class ScheduleError(ValueError):
    """A schedule breaks a rule. Raised by :func:`validate` before anything runs.

    Attributes:
        rule: the rule broken, e.g. ``"backward-after-forward"``, ``"duplicate"``,
            ``"missing-forward"``, ``"version-mismatch"``, ``"update-after-gradient"``,
            ``"deadlock"`` (full list: ``csrc/schedule/rules.h``).
        action: the first offending action, printed (``"1B3"``); for a missing action, the
            action that is missing.
        device: its device; index: its position on that device (-1 if it is missing).
    """

    def __init__(self, message: str, *, rule: str, action: str, device: int, index: int):
        super().__init__(message)
        self.rule = rule
        self.action = action
        self.device = device
        self.index = index


@dataclasses.dataclass(frozen=True)
class Action:
    """One action: ``kind`` of ``stage`` (global id) on ``microbatch``.

    ``microbatch`` is global over the plan's mini-batches (``t * m + j``); for ``U`` it holds
    the mini-batch index t. ``peer`` is the stage at the other end of a transfer (-1
    otherwise); ``version`` the weight version a pass runs on (-1: the live weights).
    ``chunk``, ``device`` and the mini-batch say where the action sits (filled in by
    :meth:`Schedule.actions`); they do not take part in ``==`` or ``hash``, so
    ``Action.parse("1F3")`` equals the schedule's. ``str()`` is the C++ label (``"1F3@2"``).

    ``count`` is the number of micro-batches covered: 1, except for a *batched W*
    (``"1W3-5"``: stage 1's weight gradients of micro-batches 3, 4, 5 as one computation),
    which covers ``microbatch .. microbatch + count - 1`` (:attr:`microbatches`).
    """

    stage: int
    kind: Kind
    microbatch: int
    peer: int = -1
    version: int = -1
    count: int = 1
    chunk: int = dataclasses.field(default=0, compare=False)
    device: int = dataclasses.field(default=0, compare=False)
    num_microbatches: int = dataclasses.field(default=0, compare=False, repr=False)

    def __post_init__(self):
        if type(self.kind) is not Kind:  # "F" given: store the named constant
            object.__setattr__(self, "kind", Kind(self.kind))

    @property
    def minibatch(self) -> int:
        """The mini-batch the action belongs to: U's index, else ``microbatch // m`` (-1
        when m is unknown: an action made outside a schedule)."""
        if self.kind == Kind.U:
            return self.microbatch
        return self.microbatch // self.num_microbatches if self.num_microbatches > 0 else -1

    @property
    def microbatches(self) -> range:
        """The micro-batches the action covers (one, or a batched W's range)."""
        return range(self.microbatch, self.microbatch + self.count)

    def __str__(self) -> str:
        # Cached outside the fields, so dataclasses.replace() never carries a stale label.
        text = self.__dict__.get("_text")
        if text is None:
            text = _core.action_label(self)
            object.__setattr__(self, "_text", text)
        return text

    @classmethod
    def parse(cls, text: str) -> "Action":
        """``"1F3"`` -> Action(stage=1, kind=Kind.F, microbatch=3); also ``"1F3@2"``,
        ``"1U0"``, ``"1SF3>2"``, ``"1W3-5"`` (a batched W). Raises ValueError naming what is
        wrong (C++ parser)."""
        kind, stage, mb, peer, version, _, count = _core.parse_action(text)
        return cls(stage, _KINDS[kind], mb, peer, version, count)


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """What :meth:`Schedule.simulate` returns (times in the units of the costs given).

    Attributes:
        makespan: time from the first action's start to the last action's end.
        busy / idle: per device, compute time and ``makespan - busy``.
        bubble_ratio: ``sum(idle) / (num_devices * makespan)``.
        peak_inflight: per device, the most (stage, micro-batch) activations held at once:
            counted from the start of F to the end of B (or of I, for a split backward: W
            needs only the stage's inputs and output gradient, far smaller). One unit is
            one stage's activations for one micro-batch.
        peak_versions: per device, the most weight versions its stages hold at once (the
            live one included) over the simulated timeline: 1 per stage without ``U``
            actions; for a plan with versions see :mod:`pipetrain.version_memory`. Computed
            on first access.
    """

    makespan: float
    bubble_ratio: float
    busy: list
    idle: list
    peak_inflight: list
    _raw: object = dataclasses.field(repr=False, compare=False, default=None)
    _schedule: object = dataclasses.field(repr=False, compare=False, default=None)

    @functools.cached_property
    def peak_versions(self) -> list:
        from pipetrain.version_memory import peak_versions_held
        return peak_versions_held(self._schedule, self.starts, self.ends)

    def starts(self, device: int) -> list:
        """Start time of each action of ``device``, in issue order."""
        return self._raw.starts(device)

    def ends(self, device: int) -> list:
        """End time of each action of ``device``, in issue order."""
        return self._raw.ends(device)


Cost = Union[float, Sequence[float]]


class Schedule:
    """A validated-on-demand schedule. Build with :func:`build`, :func:`parse` or
    :meth:`from_actions`; all three give the same object."""

    def __init__(self, core):
        self._core = core

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_actions(cls, per_device: Sequence[Iterable[Union[Action, str]]], *,
                     num_stages: int | None = None, num_microbatches: int | None = None,
                     num_minibatches: int | None = None,
                     edges: Sequence[tuple[int, int]] | None = None,
                     placement: Sequence[int] | None = None, graph: StageGraph | None = None,
                     name: str = "custom") -> "Schedule":
        """A hand-written schedule: ``per_device[d]`` lists device d's actions in issue order.

        Args:
            per_device: one list per device of :class:`Action` or strings (``"1F3@0"``).
            num_stages: default: one more than the largest stage named.
            num_microbatches: per mini-batch; default: one more than the largest micro-batch
                named, divided by num_minibatches (rounded up).
            num_minibatches: default: one more than the largest U index (1 without U's).
            edges: stage edges ``(from, to)``; default: the chain 0 -> 1 -> ... -> S-1.
            placement: device of each stage; default: the device whose list names it
                (a stage named nowhere goes to device ``stage % num_devices``).
            graph: a :class:`StageGraph` giving stages, devices, edges and placement at
                once (then leave ``edges`` / ``placement`` out).
        Raises ValueError for sizes the actions cannot fill (more stages than passes listed,
        a device holding no stage) and numbers >= 2**31, naming the field. Not validated
        here: call :func:`validate` (it raises :class:`ScheduleError`).
        """
        return cls(_core.from_actions([list(row) for row in per_device], num_stages,
                                      num_microbatches, num_minibatches,
                                      None if edges is None else list(edges),
                                      None if placement is None else list(placement),
                                      graph, name))

    # --- shape --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._core.name

    @property
    def stage_graph(self) -> StageGraph:
        """The schedule's own stage graph (C++ object): ``.num_stages .num_devices .edges
        .edge(e) .stage(k) .stages .sources() .sinks() .topological_order() .is_chain``."""
        return self._core.stage_graph

    @property
    def num_devices(self) -> int:
        return self._core.num_devices

    @property
    def num_stages(self) -> int:
        """Total (virtual) stages; interleaved: num_devices * num_chunks."""
        return self._core.num_stages

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per mini-batch (m)."""
        return self._core.num_microbatches

    @property
    def num_minibatches(self) -> int:
        """Mini-batches the plan spans (T); micro-batches are numbered 0 .. T*m - 1."""
        return self._core.num_minibatches

    @property
    def num_chunks(self) -> int:
        """Most stages held by one device (1 unless interleaved)."""
        return max(st.chunk for st in self.stage_graph.stages) + 1

    @property
    def edges(self) -> list[tuple[int, int]]:
        """Stage edges ``(src, dst)``, by edge id."""
        return [(e.src, e.dst) for e in self.stage_graph.edges]

    @property
    def lowered(self) -> bool:
        """True if the schedule contains transfer actions."""
        return self._core.lowered

    @property
    def split_backward(self) -> bool:
        """True if the backward is split into I and W (zero-bubble schedules)."""
        return self._core.split_backward

    @property
    def has_updates(self) -> bool:
        """True if the plan contains optimizer updates (U)."""
        return self._core.has_updates

    @property
    def versioned(self) -> bool:
        """True if the passes name weight versions (``"1F3@2"``)."""
        return self._core.versioned

    def device_of(self, stage: int) -> int:
        return self.stage_graph.device_of(stage)

    def chunk_of(self, stage: int) -> int:
        """Rank of ``stage`` among its device's stages (interleaved: stage // num_devices)."""
        return self.stage_graph.chunk_of(stage)

    def predecessors(self, stage: int) -> list[int]:
        return self.stage_graph.predecessors(stage)

    def successors(self, stage: int) -> list[int]:
        return self.stage_graph.successors(stage)

    # --- actions ------------------------------------------------------------------------
    def actions(self, device: int) -> list[Action]:
        """Device ``device``'s actions in issue order (compute, updates, and transfers if
        lowered), with ``chunk``, ``device`` and ``minibatch`` filled in."""
        chunk = [st.chunk for st in self.stage_graph.stages]
        m, kinds, new, out = self.num_microbatches, _KINDS, Action.__new__, []
        # Fields set directly (the core has checked them; a frozen dataclass's __init__ costs
        # several times more), the C++ label cached for str().
        for kind, stage, mb, peer, version, label, count in self._core.actions(device):
            a = new(Action)
            a.__dict__.update(stage=stage, kind=kinds[kind], microbatch=mb, peer=peer,
                              version=version, count=count, chunk=chunk[stage], device=device,
                              num_microbatches=m, _text=label)
            out.append(a)
        return out

    def dependencies(self, device: int) -> list[list[tuple[int, int]]]:
        """For each action of :meth:`actions` (device): the ``(device, index)`` of every
        action it must wait for beyond program order on its own device -- same-device
        cross-stage dependencies, U after its gradients and versions after their U
        included. Raises :class:`ScheduleError` if invalid."""
        validate(self)
        return self._core.dependencies(device)

    # --- analysis -----------------------------------------------------------------------
    def validate(self) -> "Schedule":
        """Raise :class:`ScheduleError` if the schedule breaks a rule; return self."""
        return validate(self)

    def lower(self) -> "Schedule":
        """The same schedule with send/recv transfers inserted between devices."""
        return Schedule(self._core.lower())

    def simulate(self, forward: Cost = 1.0, backward: Cost = 2.0, weight: Cost | None = None,
                 transfer: float = 0.0, *, update: Cost = 0.0, transfer_bytes: float = 0.0,
                 bandwidth: float | None = None, weight_fixed: Cost = 0.0) -> SimulationResult:
        """Discrete-event simulation with per-stage costs (scalars or lists of num_stages).

        Args:
            forward: cost of F on each stage.
            backward: cost of the full backward on each stage (B; for a split backward,
                I + W together).
            weight: cost of W on each stage (then I costs ``backward - weight``). ``None``:
                a split backward costs ``backward / 2`` for each of I and W.
            transfer: latency of every cross-device dependency (activation or gradient).
            update: cost of U (the optimizer update) on each stage.
            transfer_bytes, bandwidth: add ``transfer_bytes / bandwidth`` to that latency.
            weight_fixed: the fixed part ``a`` of a batched W: one covering ``n``
                micro-batches costs ``a + (W - a) * n`` (``W`` the cost of one W), so 0 (the
                default) prices it as ``n`` separate W's and ``a = W`` as one. Fit it from
                measured W's of several sizes; ``0 <= a <= W``.
        Each action starts when its device is free and its dependencies have ended (plus
        the transfer time if on another device). Raises :class:`ScheduleError` if the
        schedule is invalid, ``ValueError`` for bad costs.
        """
        validate(self)
        n = self.num_stages

        def per_stage(x, what):
            if isinstance(x, (int, float)):
                return [float(x)] * n
            xs = [float(v) for v in x]
            if len(xs) != n:
                raise ValueError(f"{what} needs a scalar or one cost per stage ({n}), "
                                 f"got {len(xs)}")
            return xs

        latency = float(transfer)
        if transfer_bytes:
            if not bandwidth or bandwidth <= 0:
                raise ValueError("transfer_bytes needs a bandwidth > 0 (bytes per time unit)")
            latency += float(transfer_bytes) / float(bandwidth)
        raw = self._core.simulate(per_stage(forward, "forward"), per_stage(backward, "backward"),
                                  None if weight is None else per_stage(weight, "weight"),
                                  per_stage(update, "update"), latency,
                                  per_stage(weight_fixed, "weight_fixed"))
        return SimulationResult(raw.makespan, raw.bubble_ratio, list(raw.busy), list(raw.idle),
                                list(raw.peak_inflight), raw, self)

    def peak_inflight(self) -> list[int]:
        """Per device, peak in-flight activations from the order alone (see SimulationResult)."""
        return list(self._core.peak_inflight())

    # --- text ---------------------------------------------------------------------------
    def __str__(self) -> str:
        return self._core.text()

    def __repr__(self) -> str:
        t = f", num_minibatches={self.num_minibatches}" if self.num_minibatches != 1 else ""
        return (f"Schedule({self.name!r}, num_stages={self.num_stages}, "
                f"num_devices={self.num_devices}, num_microbatches={self.num_microbatches}{t})")


def build(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1, *,
          num_minibatches: int = 1, updates: bool = False) -> Schedule:
    """Generate a named schedule.

    Args:
        name: one of :data:`NAMES`: ``gpipe``, ``1f1b``, ``interleaved-1f1b``, ``zb-h1``,
            ``zb-h2``, and ``zb-h1-bw`` / ``zb-h2-bw`` (the same with the W's deferred past
            each stage's last I run as one batched W, ``"3W4-7"``).
        num_stages: devices p (>= 1); interleaved has ``num_stages * num_chunks`` stages,
            stage k on device k % p.
        num_microbatches: m >= 1 per mini-batch (interleaved: a multiple of num_stages).
        num_chunks: v >= 1, interleaved only.
        num_minibatches: T >= 1. The plan is, per device, the T one-mini-batch orders one
            after another, mini-batch t on micro-batches ``t*m .. t*m+m-1``; no flush
            between them beyond what the dependencies imply.
        updates: add ``U(s, t)`` right after stage s's last B (or W) of mini-batch t and
            put every pass of mini-batch t on weight version t. Without, passes run on the
            live weights (version -1) and the plan has no U.
    Raises:
        ValueError: naming what is allowed.
    """
    if not isinstance(name, str):
        raise ValueError(f"schedule name must be a string, one of {', '.join(NAMES)}")
    for what, v in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                    ("num_chunks", num_chunks), ("num_minibatches", num_minibatches)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{what} must be an int >= 1, got {v!r}")
        if v >= 2**31:
            raise ValueError(f"{what} must be < 2**31, got {v}")
        if v < 1:
            raise ValueError(f"{what} must be >= 1, got {v}")
    return Schedule(_core.build(name, num_stages, num_microbatches, num_chunks,
                                num_minibatches, bool(updates)))


def validate(schedule: Schedule) -> Schedule:
    """Raise :class:`ScheduleError` naming the first offending action and the rule it breaks.

    Checks: each action names a real stage / micro-batch (U: mini-batch) / version on its
    stage's device; every (stage, micro-batch) has exactly one F and one backward (B, or I
    and W), all on one weight version; with U's, one U per (stage, mini-batch); every
    dependency holds (F after its predecessors' F, backward after its own F and its
    successors' backward, W after I, U after its mini-batch's B / W and the previous U, a
    pass on version v after U(v-1), receives after sends); sends match receives; and no
    cross-device cycle can deadlock. Returns the schedule.
    """
    v = schedule._core.violation()
    if v is not None:
        rule, device, index, action, message = v
        raise ScheduleError(message + "\n" + _excerpt(schedule, device, index),
                            rule=rule, action=action, device=device, index=index)
    return schedule


def _excerpt(schedule: Schedule, device: int, index: int, width: int = 12) -> str:
    """Device ``device``'s row around position ``index``, the offender in brackets."""
    labels = [raw[5] for raw in schedule._core.actions(device)]
    lo = max(0, index - width // 2) if index >= 0 else 0
    hi = min(len(labels), lo + width)
    cells = [f"[{labels[i]}]" if i == index else labels[i] for i in range(lo, hi)]
    return (f"  d{device}: " + ("... " if lo > 0 else "") + " ".join(cells)
            + (" ..." if hi < len(labels) else ""))


def parse(text: str) -> Schedule:
    """Read a schedule from its printed form (``str(schedule)``) or a hand-written one.

    Rows ``d<k>: <action> <action> ...`` (``.`` cells are idle and ignored; the row label
    gives the device). An optional header line ``# schedule <name> stages=S devices=D
    microbatches=M minibatches=T placement=0,1,... edges=0>1,1>2`` sets what the rows
    cannot show; other ``#`` lines are comments. Defaults as in
    :meth:`Schedule.from_actions`; sizes must follow from the actions (a device or stage
    count the actions cannot fill is a ValueError). Parsed in C++. Not validated here:
    call :func:`validate`.
    """
    return Schedule(_core.parse(text))
