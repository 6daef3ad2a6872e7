"""The Pipeline's constructor arguments: each checked, with a message that says what is allowed.

Names: ``num_devices`` is the number of pipeline devices ``p`` (executor threads, GPUs or
ranks); ``num_stages`` is the number of stages the model is cut into — ``p * num_chunks`` for
the interleaved schedule, ``p`` otherwise. Earlier versions called the device count
``num_stages``; that keyword still works as a deprecated alias of ``num_devices``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch

from pipetrain import schedules

__all__ = ["resolve_num_devices", "build_schedule", "resolve_devices", "check_profile_steps",
           "check_num_threads", "check_flag", "check_wire", "cores", "check_acceleration", "Acceleration"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def resolve_num_devices(num_devices: Optional[int], num_stages: Optional[int]) -> Optional[int]:
    """``num_devices``, or the deprecated ``num_stages`` keyword meaning the same."""
    if num_stages is not None:
        warnings.warn("Pipeline(num_stages=...) is deprecated: it counts pipeline devices, "
                      "so it is now called num_devices", DeprecationWarning, stacklevel=3)
        if num_devices is not None and num_devices != num_stages:
            raise ValueError(f"num_devices={num_devices} and its deprecated alias "
                             f"num_stages={num_stages} disagree; give only num_devices")
        num_devices = num_stages
    if num_devices is not None and (not _is_int(num_devices) or num_devices < 1):
        raise ValueError(f"num_devices must be a positive int (pipeline devices); got {num_devices!r}")
    return num_devices


def build_schedule(schedule: Any, num_devices: Optional[int], balance: Optional[Sequence[int]],
                   m: Optional[int], num_chunks: Optional[int], num_layers: int) -> Any:
    """The :class:`~pipetrain.schedules.Schedule` the arguments describe (built or given)."""
    if balance is not None and (isinstance(balance, (str, bytes)) or not hasattr(balance, "__len__")):
        raise ValueError(f"balance must be a list of layer counts per stage, e.g. [3, 3, 2, 2]; "
                         f"got {balance!r}")
    if m is not None and (not _is_int(m) or m < 1):
        raise ValueError(f"num_microbatches must be a positive int; got {m!r}")
    if num_chunks is not None and (not _is_int(num_chunks) or num_chunks < 1):
        raise ValueError(f"num_chunks must be an int >= 1 (stages per device, interleaved "
                         f"schedule); got {num_chunks!r}")
    if isinstance(schedule, schedules.Schedule):
        return _given(schedule, num_devices, balance, m, num_chunks, num_layers)
    if not isinstance(schedule, str):
        raise ValueError(f"schedule must be a schedule name ({', '.join(schedules.NAMES)}) or a "
                         f"pipetrain.schedules.Schedule; got {schedule!r}")
    name = schedule
    if name not in schedules.NAMES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(schedules.NAMES)} "
                         "or pass a pipetrain.schedules.Schedule")
    interleaved = name.startswith("interleaved")
    v = num_chunks if num_chunks is not None else (2 if interleaved else 1)
    if v != 1 and not interleaved:
        raise ValueError(f"num_chunks={num_chunks} is only for the interleaved schedule; "
                         f"schedule {name!r} takes one chunk per device")
    if num_devices is None:
        if balance is None:
            raise ValueError("give num_devices (pipeline devices) or balance (layers per stage)")
        if len(balance) % v:
            raise ValueError(f"balance has {len(balance)} entries, not a multiple of num_chunks={v}")
        num_devices = len(balance) // v
    if balance is not None and len(balance) != num_devices * v:
        raise ValueError(f"balance has {len(balance)} entries but num_devices * num_chunks = "
                         f"{num_devices * v} stages")
    if num_devices * v > num_layers:
        raise ValueError(f"num_devices * num_chunks = {num_devices * v} stages but the model has "
                         f"only {num_layers} layers; use at most {num_layers // v} devices")
    m = 1 if m is None else m
    kwargs = {"num_chunks": v} if interleaved else {}
    try:
        return schedules.build(name, num_stages=num_devices, num_microbatches=m, **kwargs)
    except ValueError as err:
        raise ValueError(f"cannot build schedule {name!r} with num_devices={num_devices}, "
                         f"num_microbatches={m}{', num_chunks=%d' % v if interleaved else ''}: "
                         f"{err}") from err


def _given(s: Any, num_devices: Optional[int], balance: Optional[Sequence[int]], m: Optional[int],
           num_chunks: Optional[int], num_layers: int) -> Any:
    if num_devices is not None and num_devices != s.num_devices:
        raise ValueError(f"num_devices={num_devices} but the schedule has {s.num_devices} devices")
    if m is not None and m != s.num_microbatches:
        raise ValueError(f"num_microbatches={m} but the schedule has {s.num_microbatches}")
    if num_chunks is not None and num_chunks != s.num_chunks:
        raise ValueError(f"num_chunks={num_chunks} but the schedule has {s.num_chunks}")
    if balance is not None and len(balance) != s.num_stages:
        raise ValueError(f"balance has {len(balance)} entries; the schedule has {s.num_stages} stages")
    if s.num_stages > num_layers:
        raise ValueError(f"the schedule has {s.num_stages} stages but the model only "
                         f"{num_layers} layers (each stage needs at least one)")
    return s


def resolve_devices(devices: Optional[Sequence[Any]], p: int) -> List[torch.device]:
    """One torch device per pipeline device (default: all CPU)."""
    if devices is None:
        return [torch.device("cpu")] * p
    if isinstance(devices, (str, torch.device)) or not hasattr(devices, "__len__"):
        raise ValueError(f"devices must be a list with one device per pipeline device ({p}); "
                         f"got {devices!r}")
    try:
        devices = [torch.device(d) for d in devices]
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"devices: {err}") from None
    if len(devices) != p:
        raise ValueError(f"devices has {len(devices)} entries; give one per pipeline device ({p})")
    types = {d.type for d in devices}
    if not types <= {"cpu", "cuda"} or len(types) > 1:
        raise ValueError(f"devices must be all 'cpu' or all CUDA devices; got {devices}")
    if "cuda" in types and not torch.cuda.is_available():
        raise ValueError("CUDA devices requested but torch.cuda.is_available() is False")
    return devices


def check_profile_steps(profile_steps: Any) -> Optional[Tuple[int, int]]:
    """``(start, stop)`` with ``0 <= start < stop`` ints, or None."""
    if profile_steps is None:
        return None
    ok = (isinstance(profile_steps, (tuple, list)) and len(profile_steps) == 2
          and all(_is_int(v) for v in profile_steps) and 0 <= profile_steps[0] < profile_steps[1])
    if not ok:
        raise ValueError(f"profile_steps must be (start, stop) with 0 <= start < stop, counted in "
                         f"steps from 0; got {profile_steps!r}")
    return int(profile_steps[0]), int(profile_steps[1])


def check_num_threads(num_threads: Any, cuda: bool, cores: int, p: int) -> int:
    """The intra-op thread count during a step (default ``max(1, cores // p)`` on CPU)."""
    if num_threads is None:
        return 0 if cuda else max(1, cores // p)
    if not _is_int(num_threads) or num_threads < 0:
        raise ValueError(f"num_threads must be an int >= 0 (0: leave torch's setting); "
                         f"got {num_threads!r}")
    return num_threads


def check_flag(name: str, value: Any, allow_none: bool = False) -> Any:
    """A bool argument (or None where it means "detect")."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False{' or None' if allow_none else ''}; "
                         f"got {value!r}")
    return value


def cores() -> int:
    """CPU cores this process may run on (its affinity set where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_loss_scale(loss_scale: Any, schedule: Any, graph_model: bool) -> Any:
    """``loss_scale=`` (:mod:`pipetrain.loss_scaling`): None, ``"dynamic"``, a fixed number or
    a LossScaler. Refused with asynchronous schedules (a run commits and updates many
    mini-batches before its end, so one step cannot be skipped on every stage) and graph
    models (not wired yet). Raises ValueError."""
    from pipetrain import async_schedules, loss_scaling
    scaler = loss_scaling.resolve(loss_scale)
    if scaler is not None and async_schedules.is_async(schedule):
        raise ValueError(f"loss_scale is not supported with the asynchronous schedule {schedule!r}: "
                         "its runs update weights inside the pipeline, so a step with an inf/NaN "
                         "gradient cannot be skipped on every stage; use a synchronous schedule")
    if scaler is not None and graph_model:
        raise ValueError("loss_scale needs a sequence of layers (a graph model has no loss "
                         "scaling yet)")
    return scaler


class Acceleration:
    """``compile=`` and ``cuda_graphs=`` as checked: applied to the stages once they exist."""

    def __init__(self, compile_options: Optional[dict], graph_backend: Any) -> None:
        from pipetrain.cuda_graphs import GraphedStage
        from pipetrain.stage import Stage
        self.compile_options, self.graph_backend = compile_options, graph_backend
        self.stage_cls = Stage if graph_backend is None else GraphedStage

    def apply(self, pipe: Any) -> None:
        """Compile the stages' layers, attach the graph backend (stages and runner)."""
        from pipetrain import compiled_stage, cuda_graphs
        compiled_stage.compile_stages(pipe.stages, self.compile_options)
        pipe.graphs = None
        if self.graph_backend is not None:
            if pipe.dist is not None:
                raise ValueError("cuda_graphs=True runs in one process; across processes use "
                                 "cuda_graphs=False")
            pipe.graphs = pipe.runner.graphs = cuda_graphs.attach(pipe.stages, pipe.devices,
                                                                  self.graph_backend)


def check_acceleration(compile: Any, cuda_graphs: Any, checkpoint: str, schedule: Any,
                       model: Any) -> Acceleration:
    """Check ``compile=`` (False, True or ``torch.compile`` kwargs) and ``cuda_graphs=``
    (False, True, or a :class:`pipetrain.cuda_graphs.GraphBackend` such as the CPU fake the
    tests use) against the rest of the configuration."""
    from pipetrain import async_schedules, compiled_stage, cuda_graphs as graphs
    options = compiled_stage.check_compile(compile)
    backend = graphs.check_backend(cuda_graphs)
    if options is None and backend is None:
        return Acceleration(None, None)
    which = "compile" if backend is None else "cuda_graphs"
    if not isinstance(model, (torch.nn.Sequential, torch.nn.ModuleList, list, tuple)):
        raise ValueError(f"{which}= applies to a sequence of layers; a graph model (GraphPipe) "
                         "runs uncompiled and uncaptured")
    if backend is not None:
        if checkpoint != "never":
            raise ValueError(f"cuda_graphs=True keeps every micro-batch's activations in its "
                             f"graphs' static memory, so re-materialization cannot save memory "
                             f"there: use checkpoint='never' (got checkpoint={checkpoint!r})")
        if async_schedules.is_async(schedule):
            raise ValueError(f"cuda_graphs=True needs fixed parameter addresses; the "
                             f"asynchronous schedule {schedule!r} rebinds weight versions: use "
                             "a synchronous schedule")
        if options is not None:
            raise ValueError("compile= and cuda_graphs=True together are not supported: a "
                             "captured backward retains its autograd graph for the replays, "
                             "which compiled backwards that donate saved buffers refuse "
                             "(and mode='reduce-overhead' captures CUDA graphs itself)")
    return Acceleration(options, backend)


WIRES = ("auto", "shm", "gloo")


def check_wire(wire: Any) -> str:
    """``Pipeline(wire=)``: how the ranks of a multi-process pipeline exchange boundary
    values. ``"shm"``: shared memory (ranks on one host, CPU tensors;
    :mod:`pipetrain.distributed.shm_wire`); ``"gloo"``: torch.distributed point-to-point
    messages (:mod:`pipetrain.distributed.wire`); ``"auto"`` (default): shared memory between
    ranks on the same host when the tensors are on the CPU, else the process group."""
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {WIRES} (how the ranks of a "
                         f"multi-process pipeline exchange boundary values: 'shm' shared memory "
                         f"on one host, 'gloo' the process group, 'auto' shm where possible); "
                         f"got {wire!r}")
    return wire
