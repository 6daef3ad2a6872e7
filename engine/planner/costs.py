"""Costs the planner reads: per-layer times and bytes as affine functions of micro-batch size.

A :class:`CostTable` holds, for each layer of a sequential model, how long its forward (F),
full backward (B = I + W) and weight-gradient part (W) take on one device, and how many bytes
it keeps between forward and backward, each as an :class:`Affine` function of the micro-batch
size b (``value(b) = fixed + per_sample * b``): per-call overheads are the fixed part, the
work proportional to the samples the slope. Parameter bytes are per layer and do not depend on b.

Tables come from three places:

- :func:`measure_costs`: timed on this machine from a sample mini-batch at a few micro-batch
  sizes and fitted by least squares (the planner's default when given a model);
- :meth:`CostTable.transformer`: a GPT layer of a given shape on a device of given peak
  FLOP/s (plan for hardware you do not have);
- by hand: ``CostTable(forward=[Affine(...)...], ...)``.

:class:`Network` models transfers (point-to-point between pipeline stages) and the gradient
all-reduce across data-parallel replicas with a latency + bytes / bandwidth model.
Units everywhere: seconds, bytes, bytes per second.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch.autograd.graph import saved_tensors_hooks

from pipetrain.microbatch import detach_for_backward

__all__ = ["Affine", "CostTable", "Network", "measure_costs", "parse_bytes", "contention",
           "measure_action_overhead"]


def contention(threads: int, cores: int, load: float = 0.0) -> float:
    """Time factor of one busy thread among ``threads`` of ours and ``load`` other runnable
    threads on ``cores`` cores, relative to one thread of ours alone with the same load: a
    fair scheduler gives each runnable thread ``min(1, cores / runnable)`` of a core, so

        contention(n) = max(1, (load + n) / cores) / max(1, (load + 1) / cores)

    (1 while everything fits on the cores; n / cores on an idle machine past that; and only
    (load + n) / (load + 1) on a machine already loaded by others, whose threads were
    slowing the one-thread probe as well)."""
    if threads < 1 or cores < 1 or load < 0:
        raise ValueError(f"contention needs threads >= 1, cores >= 1, load >= 0; "
                         f"got {threads}, {cores}, {load}")
    return max(1.0, (load + threads) / cores) / max(1.0, (load + 1) / cores)


@dataclasses.dataclass(frozen=True)
class Affine:
    """``value(b) = fixed + per_sample * b`` (floored at 0), b the micro-batch size."""

    fixed: float
    per_sample: float

    def __call__(self, b: float) -> float:
        return max(0.0, self.fixed + self.per_sample * b)

    @classmethod
    def fit(cls, sizes: Sequence[float], values: Sequence[float]) -> "Affine":
        """Least-squares line through ``(sizes[i], values[i])``; one size: a line through 0.
        A negative intercept (noise on tiny work) is clamped to 0 and the slope refitted
        through the origin, so predictions never go below zero for small b."""
        n = len(sizes)
        if n == 1 or len(set(sizes)) == 1:
            return cls(0.0, statistics.fmean(values) / statistics.fmean(sizes))
        mx, my = statistics.fmean(sizes), statistics.fmean(values)
        sxx = sum((x - mx) ** 2 for x in sizes)
        slope = sum((x - mx) * (y - my) for x, y in zip(sizes, values)) / sxx
        fixed = my - slope * mx
        if fixed < 0 or slope < 0:
            if slope < 0:   # costs do not shrink with more samples: treat as constant
                return cls(max(0.0, my), 0.0)
            return cls(0.0, sum(x * y for x, y in zip(sizes, values)) / sum(x * x for x in sizes))
        return cls(fixed, slope)

    def __add__(self, other: "Affine") -> "Affine":
        return Affine(self.fixed + other.fixed, self.per_sample + other.per_sample)


ZERO = Affine(0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Network:
    """Latency + bytes / bandwidth model of a cluster's links.

    Attributes:
        p2p_bandwidth, p2p_latency: between consecutive pipeline stages (bytes/s, s); an
            activation of ``n`` bytes takes ``p2p_latency + n / p2p_bandwidth``.
        allreduce_bandwidth, allreduce_latency: per replica for the gradient all-reduce over w
            replicas; ring all-reduce of ``n`` bytes: ``2 (w-1)/w * n / bandwidth + 2 (w-1) *
            latency`` (0 when w = 1).
        action_overhead: seconds every scheduled action costs beyond its compute (the
            executor's dispatch; measured on CPU, ~0 on a GPU stream).
    """

    p2p_bandwidth: float = float("inf")
    p2p_latency: float = 0.0
    allreduce_bandwidth: float = float("inf")
    allreduce_latency: float = 0.0
    action_overhead: float = 0.0

    def transfer(self, nbytes: float) -> float:
        return self.p2p_latency + (nbytes / self.p2p_bandwidth if nbytes else 0.0)

    def allreduce(self, nbytes: float, width: int) -> float:
        if width <= 1:
            return 0.0
        return 2 * (width - 1) / width * nbytes / self.allreduce_bandwidth \
            + 2 * (width - 1) * self.allreduce_latency

    @classmethod
    def cluster(cls, intra_gbps: float, inter_gbps: float, latency_us: float = 5.0) -> "Network":
        """A GPU cluster: pipeline transfers at ``intra_gbps`` GB/s (e.g. NVLink), all-reduce
        at ``inter_gbps`` GB/s (e.g. InfiniBand), one latency for both."""
        return cls(intra_gbps * 1e9, latency_us * 1e-6, inter_gbps * 1e9, latency_us * 1e-6)


@dataclasses.dataclass
class CostTable:
    """Per-layer costs of a sequential model (see the module docstring).

    Attributes:
        forward, backward, weight: seconds per micro-batch of b samples, per layer; backward
            is the full backward (I + W), weight its weight-gradient part W (I = B - W).
        activation: bytes a layer keeps per micro-batch between F and B, beyond its input.
        input_bytes: bytes of each layer's input per micro-batch (the stage boundary: sent
            between stages, and all a re-materialized stage keeps).
        param_bytes: bytes of each layer's parameters (one weight version).
        split_factor: how much a backward split into I and W costs, in total, relative to
            the full B (measured: the runtime runs them as two autograd passes).
        slowdown: depth p -> factor on every action when p devices compute at once
            (measured); depths not measured are extrapolated with :func:`contention` from the
            nearest measured one when ``cores`` is known.
        cores, load: the CPU cores the devices' threads share and the other runnable threads
            (load average) when the costs were measured (None: not a shared CPU).
        action_overhead: seconds between consecutive actions of one device when nothing is
            waited for (the executor's dispatch; measured as the gaps of a one-stage run).
        forward_overhead, backward_overhead: seconds of engine work inside every F (and B, I,
            W) action beyond its layers' compute: a per-action constant, not per layer, so a
            stage of one layer pays it as a stage of ten does (measured once per machine by
            :func:`measure_action_overhead`).
        handoff_latency: seconds from an action's end to the start of the action on another
            device that waits for it (a thread waking up; measured on a two-stage run).
        inner_input: per layer, whether its input counts in a stage's stash (:meth:`stash`).
        grad_factor, optimizer_factor: gradient and optimizer-state bytes per parameter byte
            (SGD without momentum 1 / 0; Adam in fp32 1 / 2; mixed precision with fp32 master
            and Adam over fp16 weights 1 / 6).
        update: seconds of one optimizer update per parameter byte (0: not modelled).
        name: what was measured or described.
    """

    forward: List[Affine]
    backward: List[Affine]
    weight: List[Affine]
    activation: List[Affine]
    input_bytes: List[Affine]
    param_bytes: List[float]
    grad_factor: float = 1.0
    optimizer_factor: float = 0.0
    update: float = 0.0
    name: str = "costs"
    inner_input: Optional[List[bool]] = None
    slowdown: Optional[dict] = None
    split_factor: float = 1.0
    action_overhead: float = 0.0
    handoff_latency: float = 0.0
    forward_overhead: float = 0.0
    backward_overhead: float = 0.0
    cores: Optional[int] = None
    load: float = 0.0

    def slowdown_at(self, p: int) -> float:
        """How much slower each action runs when p devices compute at once (measured on CPU,
        where p threads share the cores and memory bandwidth with each other and whatever
        else runs; 1 on GPUs, which do not share). ``slowdown[p]`` where measured; else the
        nearest measured depth q below p times ``contention(p) / contention(q)`` (the CPU
        share model, when ``cores`` is known), else 1."""
        if not self.slowdown:
            return 1.0
        if p in self.slowdown:
            return self.slowdown[p]
        known = [q for q in self.slowdown if q <= p]
        if not known:
            return 1.0
        q = max(known)
        if self.cores is None:
            return self.slowdown[q]
        return self.slowdown[q] * contention(p, self.cores, self.load) \
            / contention(q, self.cores, self.load)

    def stash(self, first: int, last: int, b: float) -> float:
        """Bytes a stage of layers ``first..last`` keeps per micro-batch of b without
        re-materialization: its input, each layer's activations, and the input of each inner
        layer that saves it when the previous layer did not already save that tensor
        (``inner_input[l]``; None: all do, as a transformer's layer norm does)."""
        total = self.input_bytes[first](b)
        for layer in range(first, last + 1):
            total += self.activation[layer](b)
            if layer > first and (self.inner_input is None or self.inner_input[layer]):
                total += self.input_bytes[layer](b)
        return total

    def __post_init__(self) -> None:
        n = len(self.forward)
        for what in ("backward", "weight", "activation", "input_bytes", "param_bytes"):
            if len(getattr(self, what)) != n:
                raise ValueError(f"CostTable.{what} has {len(getattr(self, what))} entries, "
                                 f"forward has {n}: one per layer")
        if n == 0:
            raise ValueError("CostTable needs at least one layer")

    @property
    def num_layers(self) -> int:
        return len(self.forward)

    @classmethod
    def transformer(cls, num_layers: int, hidden: int, seq: int, heads: int, vocab: int = 50257,
                    *, device_flops: float = 125e12, efficiency: float = 0.4,
                    kernel_overhead: float = 20e-6, bytes_per_value: int = 2,
                    optimizer_factor: float = 6.0, name: Optional[str] = None) -> "CostTable":
        """A GPT: an embedding layer then ``num_layers`` transformer layers (the head is tied).

        FLOPs per sample of one layer's forward: ``24 s h^2 + 4 s^2 h`` (the four h x h
        projections, the two h x 4h MLP matrices, QK^T and AV); backward twice that, its weight
        part once that. Stashed activations per sample (Korthikanti et al., fp16, no
        recompute): ``s h (34 + 5 a s / h)`` bytes; the boundary ``2 s h``. Parameters
        ``12 h^2`` (+ biases) per layer, ``vocab h`` for the embedding. ``optimizer_factor``
        6: fp32 master weights and Adam's two moments (12 bytes) over 2-byte weights.
        Times are FLOPs / (device_flops * efficiency) + ``kernel_overhead`` per pass.
        """
        rate = device_flops * efficiency
        f_layer = (24 * seq * hidden ** 2 + 4 * seq ** 2 * hidden) / rate
        act = seq * hidden * (34 + 5 * heads * seq / hidden) * (bytes_per_value / 2)
        boundary = bytes_per_value * seq * hidden
        emb_f = 2 * seq * hidden / rate   # a gather and a position add: memory bound, tiny
        fwd = [Affine(kernel_overhead, emb_f)] + [Affine(kernel_overhead, f_layer)] * num_layers
        bwd = [Affine(2 * kernel_overhead, 2 * emb_f)] + [Affine(2 * kernel_overhead, 2 * f_layer)] * num_layers
        wgt = [Affine(kernel_overhead, emb_f)] + [Affine(kernel_overhead, f_layer)] * num_layers
        acts = [Affine(0, boundary)] + [Affine(0, act - boundary)] * num_layers
        inputs = [Affine(0, 8 * seq)] + [Affine(0, boundary)] * num_layers   # token ids: int64
        params = [bytes_per_value * (vocab + seq) * hidden] + \
            [bytes_per_value * (12 * hidden ** 2 + 13 * hidden)] * num_layers
        total = sum(params) / bytes_per_value
        return cls(fwd, bwd, wgt, acts, inputs, params, grad_factor=1.0,
                   optimizer_factor=optimizer_factor,
                   name=name or f"GPT {total / 1e9:.1f}B (L={num_layers}, h={hidden}, s={seq})")


def parse_bytes(value: Any) -> float:
    """``"80GB"`` / ``"16 GiB"`` / ``"512MB"`` / a number of bytes -> bytes (GB = 1e9, GiB = 2**30)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory_per_device must be > 0 bytes, got {value}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"memory_per_device must be bytes or a string like '80GB', got {value!r}")
    text = value.strip().replace(" ", "")
    units = {"TIB": 2 ** 40, "GIB": 2 ** 30, "MIB": 2 ** 20, "KIB": 2 ** 10, "TB": 1e12,
             "GB": 1e9, "MB": 1e6, "KB": 1e3, "B": 1}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            try:
                return float(text[: -len(unit)]) * scale
            except ValueError:
                break
    raise ValueError(f"cannot read {value!r} as a size: use bytes or e.g. '80GB', '16GiB'")


# --- measurement on this machine -----------------------------------------------------------

def _leaves(obj: Any) -> List[torch.Tensor]:
    from pipetrain.microbatch import flatten
    return [t for t in flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _slice(obj: Any, b: int) -> Any:
    from pipetrain.microbatch import tree_map
    return tree_map(lambda t: t[:b] if isinstance(t, torch.Tensor) else t, obj)


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.nbytes)


def _needs_grad(obj: Any) -> bool:
    return any(t.requires_grad for t in _leaves(obj))


def _detached(obj: Any) -> Any:
    from pipetrain.microbatch import tree_map
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, obj)


def measure_costs(model: Any, sample: Any, loss_fn: Callable, *, sizes: Optional[Sequence[int]] = None,
                  repeats: int = 5, threads: int = 1, optimizer_factor: float = 0.0,
                  calibrate: bool = True, depths: Sequence[int] = (2,),
                  statistic: str = "median") -> CostTable:
    """Time and weigh each layer of ``model`` on slices of ``sample = (inputs, targets)``.

    For each micro-batch size in ``sizes`` (default: a quarter, half and all of the sample's
    batch), each layer runs on the previous layer's output: its forward (with the loss for the
    last layer), its input-gradient backward (I) and its full backward (B), ``repeats`` times
    after one warm-up; the minimum is kept and W = B - I. Activation bytes are what a pipeline
    stage stashes (:mod:`pipetrain.stage`): the distinct tensors autograd saves, parameters
    excluded, the layer's own input counted as ``input_bytes``. Measured with ``threads`` torch
    threads (restored after); gradients produced are discarded.

    ``calibrate``: layers timed one by one miss what the executor adds (dispatch, the
    sink's loss weighting, staged gradient accumulation, a loaded machine's slowdown); so the
    whole model also runs as Pipelines, interleaved (:mod:`pipetrain.planner.calibration`):
    one stage at each size (the layers are scaled to its F and B less the engine's
    per-action overhead, :func:`measure_action_overhead`, which each action of a stage then
    pays once: :attr:`CostTable.forward_overhead`, ``backward_overhead``), p stages for each
    p in ``depths`` (:attr:`CostTable.slowdown`, the hand-off latency) and ZB-H1's split
    backward. ``statistic`` ("median" or "min") summarises their rounds: the median predicts
    a typical step at the load of the moment; the minimum the least-disturbed step, which on
    a machine shared with others is the reproducible one. The first layer is probed without
    an input gradient, as the first stage runs it. The machine's cores and other load are
    recorded for :func:`contention`.
    """
    from pipetrain.partition import layers_of
    layers = layers_of(model)
    load = _other_load()
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}; got {statistic!r}")
    inputs, targets = sample
    n = _leaves(inputs)[0].shape[0]
    sizes = sorted(set(sizes or [max(1, n // 4), max(1, n // 2), n]))
    if any(not 1 <= s <= n for s in sizes):
        raise ValueError(f"micro-batch sizes must be between 1 and the sample's batch ({n}); got {sizes}")
    params = [p for m in layers for p in m.parameters()]
    saved_grads = [p.grad for p in params]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    L = len(layers)
    rows = {k: [[0.0] * len(sizes) for _ in range(L)] for k in ("F", "B", "I", "A", "X")}
    in_saved, out_saved = [False] * L, [False] * L
    try:
        for si, b in enumerate(sizes):
            x, y = _slice(inputs, b), _slice(targets, b)
            for li, layer in enumerate(layers):
                exclude = {p.data_ptr() for p in layer.parameters()}
                last = li == L - 1
                f_t, b_t, i_t = [], [], []
                for r in range(repeats + 1):
                    # The first stage computes no gradient for the model's input (unless the
                    # caller's input requires one): its first layer is timed the same way.
                    inp = detach_for_backward(x) if li or _needs_grad(inputs) else _detached(x)
                    in_keys = {_key(t) for t in _leaves(inp)}
                    packed: dict = {}

                    def pack(t, packed=packed):
                        if t.data_ptr() not in exclude:
                            packed.setdefault(_key(t), t.nbytes)
                        return t
                    t0 = time.perf_counter()
                    with torch.enable_grad(), saved_tensors_hooks(pack, lambda t: t):
                        out = layer(inp)
                        out_keys = {_key(t) for t in _leaves(out)}
                        if last:
                            out = loss_fn(out, y)
                    t1 = time.perf_counter()
                    outs = [t for t in _leaves(out) if t.requires_grad]
                    grads = [torch.ones_like(t) for t in outs]
                    ins = [t for t in _leaves(inp) if t.requires_grad]
                    t2 = time.perf_counter()
                    if ins and outs:
                        torch.autograd.grad(outs, ins, grads, retain_graph=True, allow_unused=True)
                    t3 = time.perf_counter()
                    if outs:
                        torch.autograd.backward(outs, grads)
                    t4 = time.perf_counter()
                    if r:
                        f_t.append(t1 - t0)
                        i_t.append(t3 - t2)
                        b_t.append(t4 - t3)
                in_saved[li] = any(k in packed for k in in_keys)
                out_saved[li] = any(k in packed for k in out_keys)
                # The minimum: on a shared machine it is the stable statistic of a layer's
                # own cost; the load is put back by the calibration below.
                rows["F"][li][si] = min(f_t)
                rows["B"][li][si] = min(b_t)
                rows["I"][li][si] = min(min(i_t), rows["B"][li][si])
                rows["X"][li][si] = float(sum(t.nbytes for t in _leaves(inp)))
                rows["A"][li][si] = float(sum(v for k, v in packed.items() if k not in in_keys))
                x = detach_for_backward(out) if not last else x
    finally:
        torch.set_num_threads(old_threads)
        for p, g in zip(params, saved_grads):
            p.grad = g

    slowdown, split, gap, handoff, overhead = None, 1.0, 0.0, 0.0, {"F": 0.0, "B": 0.0}
    if calibrate:
        from pipetrain.distributed import in_process
        with in_process():   # under torchrun each rank probes its own pipelines
            from pipetrain.planner.calibration import calibrate as _calibrate
            slowdown, split, gap, handoff, overhead = _calibrate(
                model, sample, loss_fn, sizes, rows, threads, repeats,
                [q for q in depths if 1 < q <= L], STATISTICS[statistic])

    def fit(kind, li):
        return Affine.fit(sizes, rows[kind][li])
    weight = [Affine.fit(sizes, [max(0.0, bb - ii) for bb, ii in zip(rows["B"][li], rows["I"][li])])
              for li in range(L)]
    return CostTable(forward=[fit("F", li) for li in range(L)],
                     backward=[fit("B", li) for li in range(L)], weight=weight,
                     activation=[fit("A", li) for li in range(L)],
                     input_bytes=[fit("X", li) for li in range(L)],
                     param_bytes=[float(sum(p.nbytes for p in m.parameters())) for m in layers],
                     optimizer_factor=optimizer_factor,
                     slowdown=slowdown, split_factor=split,
                     action_overhead=gap, handoff_latency=handoff,
                     forward_overhead=overhead["F"], backward_overhead=overhead["B"],
                     cores=_cores() if calibrate else None, load=load,
                     inner_input=[li > 0 and in_saved[li] and not out_saved[li - 1] for li in range(L)],
                     name=f"measured ({L} layers, b in {sizes})")


def _cores() -> int:
    from pipetrain import arguments
    return arguments.cores()


def _other_load() -> float:
    """Runnable threads besides the probe's own: the 1-minute load average minus one."""
    import os
    try:
        return max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:
        return 0.0


_OVERHEAD: dict = {}
STATISTICS = {"median": statistics.median, "min": min}


def measure_action_overhead(rounds: int = 5, m: int = 32, refresh: bool = False) -> float:
    """Seconds of engine work per action on this machine, measured once per process (cached):
    a one-stage 1F1B :class:`~pipetrain.Pipeline` over ``m`` one-row micro-batches of a tiny
    model (two Linear(16, 16), one torch thread) against the plain loop doing the same
    forwards and backwards, interleaved for ``rounds`` rounds; the median over rounds of
    ``(pipeline - loop) / (2 m)``, floored at 0. Tiny compute makes the difference the
    engine's own (the dispatch, stashing, loss weighting, gradient staging of each action)."""
    if "s" in _OVERHEAD and not refresh:
        return _OVERHEAD["s"]
    from torch import nn
    from pipetrain.pipeline import Pipeline
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    x, y = torch.randn(m, 16), torch.randn(m, 16)
    fn = nn.functional.mse_loss
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = Pipeline(model, 1, schedule="1f1b", num_microbatches=m, loss_fn=fn, num_threads=1)
    per_round = []
    try:
        pipe.step(x, y)
        for _ in range(rounds):
            t0 = time.perf_counter()
            for k in range(m):
                (fn(model(x[k:k + 1]), y[k:k + 1]) / m).backward()
            t1 = time.perf_counter()
            pipe.step(x, y)
            t2 = time.perf_counter()
            per_round.append(((t2 - t1) - (t1 - t0)) / (2 * m))
    finally:
        pipe.close()
        torch.set_num_threads(old)
        for q in model.parameters():
            q.grad = None
    _OVERHEAD["s"] = max(0.0, statistics.median(per_round))
    return _OVERHEAD["s"]
