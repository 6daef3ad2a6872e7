"""Graph backends: how a stage's actions are captured and replayed (:mod:`pipetrain.cuda_graphs`).

:class:`CudaGraphBackend` captures with ``torch.cuda.CUDAGraph``: a warm-up of the body on a
side stream (lazy initialization: cuBLAS handles, workspaces), then the capture into one
memory pool per stage (its graphs replay one after another, in the order they were captured,
so they may share their temporaries), with ``capture_error_mode="relaxed"`` and one capture at
a time in the process, so other stage threads may keep computing eagerly meanwhile. Its
handles are ``cudaGraphExec_t`` values the C++ executor launches.

:class:`FakeGraphBackend` is the CPU stand-in the tests use: capture records the callables
(running the body once, for the static shapes), replay calls them again and checks that the
outputs kept their shapes.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from pipetrain.microbatch import flatten

__all__ = ["CaptureError", "Graph", "GraphBackend", "FakeGraphBackend", "CudaGraphBackend",
           "check_backend"]


def _result_sig(result: Any) -> Any:
    """(shape, dtype) of every tensor leaf of a body's result."""
    leaves = flatten(result)[0] if not isinstance(result, torch.Tensor) else [result]
    return tuple((tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor))


class CaptureError(RuntimeError):
    """An action cannot be captured (or replayed) as a static graph."""


class Graph:
    """One captured action: the backend's object and the result of the captured body."""

    __slots__ = ("native", "body", "epilogue", "result", "out_sig")

    def __init__(self, native: Any, body: Callable[[], Any], epilogue: Callable[[Any], None],
                 result: Any) -> None:
        self.native, self.body, self.epilogue, self.result = native, body, epilogue, result
        self.out_sig = _result_sig(result)


class GraphBackend:
    """How actions are captured and replayed.

    ``capture(body, prepare, epilogue, device, pool)`` records ``r = body(); prepare(r);
    epilogue(r)`` — ``body`` computes (autograd included), ``prepare`` allocates the static
    buffers (once, inside the capture), ``epilogue`` copies results into them and accumulates
    — and returns a :class:`Graph`. Values are defined only after a :meth:`replay`, which
    returns a fresh body result when the backend re-runs Python (the fake) or None (CUDA: the
    captured result's tensors were rewritten in place).
    """

    name = "base"
    #: Whether :meth:`handle` gives the C++ executor something to launch.
    native = False
    #: Whether a stage drops all its graphs (and its pool) when one forward is recaptured.
    clear_on_recapture = False

    def pool(self, device: torch.device) -> Any:
        return None

    def capture(self, body: Callable[[], Any], prepare: Callable[[Any], None],
                epilogue: Callable[[Any], None], device: torch.device, pool: Any) -> Graph:
        raise NotImplementedError

    def replay(self, graph: Graph) -> Any:
        raise NotImplementedError

    def handle(self, graph: Graph) -> int:
        return 0

    def check_devices(self, devices: Sequence[torch.device]) -> None:
        """Raise ValueError when this backend cannot serve these pipeline devices."""


class FakeGraphBackend(GraphBackend):
    """CPU stand-in with CUDA graphs' bookkeeping: "capture" records the callables (running
    the body once for the static shapes); "replay" calls body and epilogue again.
    ``captures`` / ``replays`` count per action kind."""

    name = "fake"

    def __init__(self) -> None:
        self.captures: Dict[str, int] = {}
        self.replays: Dict[str, int] = {}
        self._lock = threading.Lock()

    def capture(self, body, prepare, epilogue, device, pool):
        result = body()
        prepare(result)
        kind = getattr(body, "kind", "?")
        with self._lock:
            self.captures[kind] = self.captures.get(kind, 0) + 1
        return Graph(None, body, epilogue, result)

    def replay(self, graph):
        result = graph.body()
        if _result_sig(result) != graph.out_sig:
            raise CaptureError(f"output shapes changed between replays with the same input "
                               f"shapes ({graph.out_sig} then {_result_sig(result)}): "
                               "data-dependent shapes cannot be captured as a static graph")
        graph.epilogue(result)
        kind = getattr(graph.body, "kind", "?")
        with self._lock:
            self.replays[kind] = self.replays.get(kind, 0) + 1
        return result


class CudaGraphBackend(GraphBackend):
    """``torch.cuda.CUDAGraph``: warm-up on a side stream, capture into one memory pool per
    device, replay on the current stream; handles are ``cudaGraphExec_t`` values."""

    name = "cuda"
    native = True
    _capture_lock = threading.Lock()      # one capture at a time in the process

    #: A recaptured slot's graphs would allocate in the temporaries of graphs captured
    #: earlier and replayed in another order, which then overwrite them: a stage whose
    #: forward signature changes drops all its graphs and starts a new pool.
    clear_on_recapture = True

    def __init__(self) -> None:
        self._streams: Dict[int, Any] = {}

    def check_devices(self, devices):
        if not torch.cuda.is_available() or any(d.type != "cuda" for d in devices):
            raise ValueError("cuda_graphs=True needs CUDA devices (devices=['cuda:0', ...]); "
                             f"got {[str(d) for d in devices]}")

    def pool(self, device):
        return torch.cuda.graph_pool_handle()

    def capture(self, body, prepare, epilogue, device, pool):
        with self._capture_lock, torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                body()          # warm-up: lazy initialization (cuBLAS handles, workspaces)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # A capture stream per device (torch's default one is made on whichever device
            # was current when first used).
            stream = self._streams.setdefault(device.index, torch.cuda.Stream(device))
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="relaxed"):
                result = body()
                prepare(result)
                epilogue(result)
            return Graph(graph, body, epilogue, result)

    def replay(self, graph):
        graph.native.replay()
        return None

    def handle(self, graph):
        return int(graph.native.raw_cuda_graph_exec())


def check_backend(value: Any) -> Optional[GraphBackend]:
    """``cuda_graphs=``: False / None (off), True (CUDA), or a :class:`GraphBackend`."""
    if value is None or value is False:
        return None
    if value is True:
        return CudaGraphBackend()
    if isinstance(value, GraphBackend):
        return value
    raise ValueError(f"cuda_graphs must be True or False (or a pipetrain.cuda_graphs."
                     f"GraphBackend, e.g. FakeGraphBackend() for tests); got {value!r}")
