"""Pipeline schedules: build, write by hand, validate, lower and simulate (over ``_C.schedule``).

A schedule lists, for each device, the actions it issues in order. An action is a stage,
a micro-batch and a kind, printed compactly: ``"1F3"`` is stage 1's forward of
micro-batch 3. Kinds: ``F`` forward, ``B`` full backward, and for zero-bubble schedules
``I`` (input-gradient backward) + ``W`` (weight-gradient backward) instead of ``B``.
:meth:`Schedule.lower` adds transfers: ``"1SF3>2"`` (stage 1 sends micro-batch 3's
activation to stage 2), ``"2RF3<1"`` (stage 2 receives it), ``"2SB3>1"`` / ``"1RB3<2"``
(the gradient going back).

Stages are addressed by id with explicit edges (:meth:`Schedule.predecessors`,
:meth:`Schedule.successors`); today's generators build chains, the IR holds any DAG.

Everything heavy (generation, validation, simulation) runs in C++ in linear time; Python
:class:`Action` objects are only created when :meth:`Schedule.actions` is called.

Example::

    from pipetrain import schedules
    s = schedules.build("1f1b", num_stages=4, num_microbatches=8)
    print(s)                                  # device x time grid
    r = s.simulate(forward=1.0, backward=2.0)
    r.bubble_ratio                            # (p-1)/(m+p-1) = 3/11
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence, Union

from pipetrain import _C

_core = _C.schedule

__all__ = ["Action", "Schedule", "ScheduleError", "SimulationResult", "NAMES", "build",
           "parse", "validate"]

#: Names accepted by :func:`build`.
NAMES: tuple[str, ...] = tuple(_core.names())

COMPUTE_KINDS = ("F", "B", "I", "W")
TRANSFER_KINDS = ("SF", "RF", "SB", "RB")

_ACTION_RE = re.compile(r"^(\d+)(F|B|I|W|SF|RF|SB|RB)(\d+)(?:([<>])(\d+))?$")


class ScheduleError(ValueError):
    """A schedule breaks a rule. Raised by :func:`validate` before anything runs.

    Attributes:
        rule: the rule broken, e.g. ``"backward-after-forward"``, ``"duplicate"``,
            ``"missing-forward"``, ``"deadlock"`` (full list: ``csrc/schedule/rules.h``).
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

    ``peer`` is the stage at the other end of a transfer (-1 for compute). ``chunk`` and
    ``device`` say where the stage lives (filled in by :meth:`Schedule.actions`); they do
    not take part in ``==`` or ``hash``, so ``Action.parse("1F3")`` equals the schedule's.
    """

    stage: int
    kind: str
    microbatch: int
    peer: int = -1
    chunk: int = dataclasses.field(default=0, compare=False)
    device: int = dataclasses.field(default=0, compare=False)

    def __str__(self) -> str:
        s = f"{self.stage}{self.kind}{self.microbatch}"
        if self.kind in TRANSFER_KINDS:
            s += (">" if self.kind[0] == "S" else "<") + str(self.peer)
        return s

    @classmethod
    def parse(cls, text: str) -> "Action":
        """``"1F3"`` -> Action(stage=1, kind="F", microbatch=3); ``"1SF3>2"`` for transfers."""
        m = _ACTION_RE.match(text.strip())
        if not m:
            raise ValueError(f"cannot parse action {text!r}; expected <stage><kind><microbatch> "
                             "like '1F3' (kinds F, B, I, W) or '1SF3>2' / '2RF3<1' (transfers)")
        stage, kind, mb, arrow, peer = m.groups()
        if kind in TRANSFER_KINDS:
            want = ">" if kind[0] == "S" else "<"
            if arrow != want:
                raise ValueError(f"transfer {text!r} needs '{want}<peer stage>'")
            return cls(int(stage), kind, int(mb), int(peer))
        if arrow is not None:
            raise ValueError(f"compute action {text!r} takes no peer")
        return cls(int(stage), kind, int(mb))


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
    """

    makespan: float
    bubble_ratio: float
    busy: list
    idle: list
    peak_inflight: list
    _raw: object = dataclasses.field(repr=False, compare=False, default=None)

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
                     edges: Sequence[tuple[int, int]] | None = None,
                     placement: Sequence[int] | None = None, name: str = "custom") -> "Schedule":
        """A hand-written schedule: ``per_device[d]`` lists device d's actions in issue order.

        Args:
            per_device: one list per device of :class:`Action` or strings (``"1F3"``).
            num_stages: default: one more than the largest stage named.
            num_microbatches: default: one more than the largest micro-batch named.
            edges: stage edges ``(from, to)``; default: the chain 0 -> 1 -> ... -> S-1.
            placement: device of each stage; default: the device whose list names it
                (a stage named nowhere goes to device ``stage % num_devices``).
        Not validated here: call :func:`validate` (it raises :class:`ScheduleError`).
        """
        rows = [[a if isinstance(a, Action) else Action.parse(a) for a in row]
                for row in per_device]
        num_devices = len(rows)
        if num_devices < 1:
            raise ValueError("a schedule needs at least one device (one action list)")
        stages = [a.stage for row in rows for a in row] + [a.peer for row in rows for a in row]
        if num_stages is None:
            num_stages = max(stages, default=-1) + 1
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        if num_microbatches is None:
            num_microbatches = max((a.microbatch for row in rows for a in row), default=-1) + 1
        if placement is None:
            place = [-1] * num_stages
            for d, row in enumerate(rows):
                for a in row:
                    if 0 <= a.stage < num_stages and place[a.stage] < 0:
                        place[a.stage] = d
            placement = [d if d >= 0 else s % num_devices for s, d in enumerate(place)]
        if edges is None:
            edges = [(s, s + 1) for s in range(num_stages - 1)]
        raw = [[(a.kind, a.stage, a.microbatch, a.peer) for a in row] for row in rows]
        return cls(_core.from_actions(raw, num_stages, num_microbatches,
                                      [tuple(e) for e in edges], list(placement),
                                      num_devices, name))

    # --- shape --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._core.name

    @property
    def num_devices(self) -> int:
        return self._core.num_devices

    @property
    def num_stages(self) -> int:
        """Total (virtual) stages; interleaved: num_devices * num_chunks."""
        return self._core.num_stages

    @property
    def num_microbatches(self) -> int:
        return self._core.num_microbatches

    @property
    def num_chunks(self) -> int:
        """Most stages held by one device (1 unless interleaved)."""
        return max(self._core.chunk_of(s) for s in range(self.num_stages)) + 1

    @property
    def edges(self) -> list[tuple[int, int]]:
        return [tuple(e) for e in self._core.edges]

    @property
    def lowered(self) -> bool:
        """True if the schedule contains transfer actions."""
        return self._core.lowered

    @property
    def split_backward(self) -> bool:
        """True if the backward is split into I and W (zero-bubble schedules)."""
        return self._core.split_backward

    def device_of(self, stage: int) -> int:
        return self._core.device_of(stage)

    def chunk_of(self, stage: int) -> int:
        """Rank of ``stage`` among its device's stages (interleaved: stage // num_devices)."""
        return self._core.chunk_of(stage)

    def predecessors(self, stage: int) -> list[int]:
        return self._core.predecessors(stage)

    def successors(self, stage: int) -> list[int]:
        return self._core.successors(stage)

    # --- actions ------------------------------------------------------------------------
    def actions(self, device: int) -> list[Action]:
        """Device ``device``'s actions in issue order (compute, and transfers if lowered)."""
        chunk = self._core.chunk_of
        return [Action(stage, kind, mb, peer, chunk(stage), device)
                for kind, stage, mb, peer in self._core.actions(device)]

    def dependencies(self, device: int) -> list[list[tuple[int, int]]]:
        """For each action of :meth:`actions` (device): the ``(device, index)`` of every
        action it must wait for beyond program order on its own device -- same-device
        cross-stage dependencies included. Raises :class:`ScheduleError` if invalid."""
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
                 transfer: float = 0.0, *, transfer_bytes: float = 0.0,
                 bandwidth: float | None = None) -> SimulationResult:
        """Discrete-event simulation with per-stage costs (scalars or lists of num_stages).

        Args:
            forward: cost of F on each stage.
            backward: cost of the full backward on each stage (B; for a split backward,
                I + W together).
            weight: cost of W on each stage (then I costs ``backward - weight``). ``None``:
                a split backward costs ``backward / 2`` for each of I and W.
            transfer: latency of every cross-device dependency (activation or gradient).
            transfer_bytes, bandwidth: add ``transfer_bytes / bandwidth`` to that latency.
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
                                  latency)
        return SimulationResult(raw.makespan, raw.bubble_ratio, list(raw.busy), list(raw.idle),
                                list(raw.peak_inflight), raw)

    def peak_inflight(self) -> list[int]:
        """Per device, peak in-flight activations from the order alone (see SimulationResult)."""
        return list(self._core.peak_inflight())

    # --- text ---------------------------------------------------------------------------
    def __str__(self) -> str:
        return self._core.text()

    def __repr__(self) -> str:
        return (f"Schedule({self.name!r}, num_stages={self.num_stages}, "
                f"num_devices={self.num_devices}, num_microbatches={self.num_microbatches})")


def build(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1) -> Schedule:
    """Generate a named schedule.

    Args:
        name: one of :data:`NAMES`: ``gpipe``, ``1f1b``, ``interleaved-1f1b``, ``zb-h1``,
            ``zb-h2``.
        num_stages: devices p (>= 1); interleaved has ``num_stages * num_chunks`` stages,
            stage k on device k % p.
        num_microbatches: m >= 1 (interleaved: a multiple of num_stages).
        num_chunks: v >= 1, interleaved only.
    Raises:
        ValueError: naming what is allowed.
    """
    if not isinstance(name, str):
        raise ValueError(f"schedule name must be a string, one of {', '.join(NAMES)}")
    for what, v in (("num_stages", num_stages), ("num_microbatches", num_microbatches),
                    ("num_chunks", num_chunks)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{what} must be an int >= 1, got {v!r}")
    return Schedule(_core.build(name, num_stages, num_microbatches, num_chunks))


def validate(schedule: Schedule) -> Schedule:
    """Raise :class:`ScheduleError` naming the first offending action and the rule it breaks.

    Checks: each action names a real stage / micro-batch on its stage's device; every
    (stage, micro-batch) has exactly one F and one backward (B, or I and W); every
    dependency holds (F after its predecessors' F, backward after its own F and its
    successors' backward, W after I, receives after sends); sends match receives; and no
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
    acts = schedule._core.actions(device)
    lo = max(0, index - width // 2) if index >= 0 else 0
    hi = min(len(acts), lo + width)
    cells = []
    for i in range(lo, hi):
        kind, stage, mb, peer = acts[i]
        text = str(Action(stage, kind, mb, peer))
        cells.append(f"[{text}]" if i == index else text)
    return (f"  d{device}: " + ("... " if lo > 0 else "") + " ".join(cells)
            + (" ..." if hi < len(acts) else ""))


_HEADER_RE = re.compile(r"(\w+)=(\S+)")


def parse(text: str) -> Schedule:
    """Read a schedule from its printed form (``str(schedule)``) or a hand-written one.

    Rows ``d<k>: <action> <action> ...`` (``.`` cells are idle and ignored; row order
    gives the device). An optional header line ``# schedule <name> stages=S
    microbatches=M placement=0,1,... edges=0>1,1>2`` sets what the rows cannot show;
    other ``#`` lines are comments. Defaults as in :meth:`Schedule.from_actions`.
    Not validated here: call :func:`validate`.
    """
    rows: dict[int, list[Action]] = {}
    name, opts = "custom", {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            words = line[1:].split()
            if words[:1] == ["schedule"]:
                if len(words) > 1 and "=" not in words[1]:
                    name = words[1]
                opts.update(_HEADER_RE.findall(line))
            continue
        head, sep, body = line.partition(":")
        if not sep or not re.fullmatch(r"d\d+", head.strip()):
            raise ValueError(f"line {lineno}: expected 'd<device>: <actions>', got {line!r}")
        device = int(head.strip()[1:])
        if device in rows:
            raise ValueError(f"line {lineno}: device {device} listed twice")
        try:
            rows[device] = [Action.parse(tok) for tok in body.split() if tok != "."]
        except ValueError as err:
            raise ValueError(f"line {lineno}: {err}") from None
    if not rows:
        raise ValueError("no device rows ('d0: ...') in the schedule text")
    num_devices = int(opts.get("devices", max(rows) + 1))
    if max(rows) >= num_devices:
        raise ValueError(f"row d{max(rows)} but devices={num_devices}")
    per_device = [rows.get(d, []) for d in range(num_devices)]
    kwargs = {}
    if "stages" in opts:
        kwargs["num_stages"] = int(opts["stages"])
    if "microbatches" in opts:
        kwargs["num_microbatches"] = int(opts["microbatches"])
    if "placement" in opts:
        kwargs["placement"] = [int(x) for x in opts["placement"].split(",")]
    if "edges" in opts:
        kwargs["edges"] = [tuple(int(x) for x in e.split(">")) for e in opts["edges"].split(",")]
    if "num_stages" not in kwargs and "placement" in kwargs:
        kwargs["num_stages"] = len(kwargs["placement"])
    return Schedule.from_actions(per_device, name=name, **kwargs)
