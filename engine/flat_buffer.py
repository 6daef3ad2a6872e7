"""Flat parameter buffers: a stage's parameters (and gradients) as views of one contiguous buffer.

:func:`flatten` moves every parameter of a module (or an iterable of parameters) into one
1-D buffer per ``(device, dtype)`` — a :class:`FlatBucket` — and rebinds ``param.data`` to a
view of it. The module is unchanged for its users: ``forward``, ``state_dict()`` (same keys,
values, dtypes, shapes), ``named_parameters()``, ``load_state_dict()`` (copies in place, so
the views survive) all behave as before. Tied parameters (one ``Parameter`` object reached
from two modules) get one slot. Each gradient ``param.grad`` is a view of the bucket's flat
gradient buffer, so autograd accumulates straight into it and an optimizer (pipetrain.optim)
updates a whole bucket with one fused kernel call.

Layout: parameters in first-seen order, each starting on a multiple of ``align`` elements
(64 bytes for fp32 by default) so every view is vector-aligned; padding is zero in both
buffers and stays zero under every optimizer (zero weight, zero gradient).

Weight versions (asynchronous schedules keep 2 or more): a version is just another flat
buffer of the same layout (:meth:`FlatBucket.new_buffer`). Two ways to make the module run
on it, neither a per-parameter Python loop of tensor maths:

* ``bucket.load_(version)``: one ``copy_`` of the whole buffer (memory-bandwidth bound);
* ``bucket.bind(version)``: rebind every ``param.data`` to views of ``version``, from a
  list of views precomputed once per buffer (no copy; cost grows with the parameter count,
  about a microsecond per parameter, independent of size).

What breaks the views: ``module.to(...)``/``.half()``/``.cuda()`` and assigning a new
``param.data`` or ``param.grad`` yourself; ``module.zero_grad()`` (set_to_none) drops the
gradient views, which :meth:`FlatBucket.attach_grads` (called by pipetrain.optim on its
next step) restores.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["FlatBucket", "FlatParameters", "flatten", "bucket_of"]

#: Attribute set on each flattened parameter: (its FlatBucket, index in it). A strong
#: reference: optimizers find the bucket even if the caller dropped the FlatParameters.
_ATTR = "_pipetrain_flat"


def bucket_of(param: torch.Tensor) -> tuple["FlatBucket", int] | None:
    """The bucket a parameter lives in and its index there, or None if it is not flat (or
    no longer is: its storage was changed since)."""
    entry = getattr(param, _ATTR, None)
    if entry is None:
        return None
    bucket = entry[0]
    if not bucket.owns(param, entry[1]):
        return None
    return bucket, entry[1]


@dataclass(eq=False)
class FlatBucket:
    """The parameters of one ``(device, dtype)``, as views of ``data`` (and of ``grad``).

    Attributes:
        device, dtype: of every parameter in it.
        params: the parameters, in flattening order.
        offsets, numels, shapes: where each lives in the flat buffer.
        numel: buffer length, padding included.
        data: (numel,) the live weights; ``params[i].data`` is a view of it.
        grad: (numel,) the gradients (``params[i].grad`` a view of it), or None.
    """

    device: torch.device
    dtype: torch.dtype
    params: tuple[nn.Parameter, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    numel: int
    data: torch.Tensor
    grad: torch.Tensor | None = None
    _views: dict = field(default_factory=dict, repr=False)  # id(buffer) -> (buffer, views)
    _grad_views: list = field(default_factory=list, repr=False)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views (parameter shapes) of a flat buffer with this layout.

        Args:
            buffer: (numel,) contiguous tensor, any dtype, on any device.
        """
        self._check_layout("buffer", buffer, dtype=None)
        return [buffer[o:o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def cached_views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`views`, built once per buffer and cached (for buffers used every step)."""
        key = id(buffer)
        cached = self._views.get(key)
        if cached is None or cached[0]() is not buffer:
            cached = (weakref.ref(buffer), self.views(buffer))
            self._views[key] = cached
        return cached[1]

    def new_buffer(self, dtype: torch.dtype | None = None, *, zero: bool = True,
                   device: torch.device | None = None) -> torch.Tensor:
        """A new (numel,) buffer with this layout (zeroed unless ``zero=False``; padding is
        always zero) — for a weight version, optimizer state or predicted weights."""
        make = torch.zeros if zero else torch.empty
        buf = make(self.numel, dtype=dtype or self.dtype, device=device or self.device)
        if not zero:
            self._zero_padding(buf)
        return buf

    def owns(self, param: torch.Tensor, index: int) -> bool:
        """True if ``param`` is still a view of ``data`` at slot ``index``."""
        return (index < len(self.params) and self.params[index] is param
                and param.data_ptr() == self.data.data_ptr()
                + self.offsets[index] * self.data.element_size())

    # --- weight versions -------------------------------------------------------------------
    def load_(self, version: torch.Tensor) -> None:
        """Copy a whole weight version into the live buffer: one ``copy_``."""
        self._check_layout("version", version, dtype=self.dtype)
        self.data.copy_(version)

    def bind(self, buffer: torch.Tensor) -> None:
        """Make the parameters views of ``buffer`` (same layout and dtype), without copying.

        The views are built once per buffer and cached; rebinding is one ``.data``
        assignment per parameter, no tensor maths. ``buffer`` becomes ``self.data``.
        """
        self._check_layout("buffer", buffer, dtype=self.dtype)
        for p, v in zip(self.params, self.cached_views(buffer)):
            p.data = v
        self.data = buffer

    # --- gradients -------------------------------------------------------------------------
    def grads_attached(self) -> bool:
        """True if every ``param.grad`` is still its view of ``grad``."""
        return (self.grad is not None and len(self._grad_views) == len(self.params)
                and all(map(operator.is_, (p.grad for p in self.params), self._grad_views)))

    def attach_grads(self) -> None:
        """(Re)make every ``param.grad`` a view of the flat gradient buffer.

        A gradient that autograd or the user put elsewhere is copied in first; a missing one
        (None) becomes zeros there.
        """
        if self.grad is None:
            self.grad = self.new_buffer()
        if len(self._grad_views) != len(self.params):
            self._grad_views = self.views(self.grad)
        for p, v in zip(self.params, self._grad_views):
            if p.grad is v:
                continue
            if p.grad is None:
                v.zero_()
            else:
                v.copy_(p.grad)
            p.grad = v

    def any_grad_missing(self) -> bool:
        """True if some parameter's ``grad`` is None (its optimizer step must then skip it)."""
        return any(p.grad is None for p in self.params)

    def zero_grad(self) -> None:
        """Zero the flat gradient buffer (one op) and keep the views."""
        if self.grad is None:
            self.attach_grads()
        elif not self.grads_attached():
            self.attach_grads()
        self.grad.zero_()

    # --- helpers ---------------------------------------------------------------------------
    def _check_layout(self, name: str, t: torch.Tensor, dtype: torch.dtype | None) -> None:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.numel() != self.numel:
            raise ValueError(f"{name} must be a flat ({self.numel},) buffer, "
                             f"got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype}; this bucket holds {dtype}")

    def _zero_padding(self, buf: torch.Tensor) -> None:
        end = 0
        for o, n in zip(self.offsets, self.numels):
            if o > end:
                buf[end:o].zero_()
            end = o + n
        if end < self.numel:
            buf[end:].zero_()


class FlatParameters(Sequence[FlatBucket]):
    """The buckets :func:`flatten` made, in first-seen (device, dtype) order; a sequence of
    :class:`FlatBucket`."""

    def __init__(self, buckets: list[FlatBucket]):
        self._buckets = buckets

    def __getitem__(self, i):
        return self._buckets[i]

    def __len__(self) -> int:
        return len(self._buckets)

    def __iter__(self) -> Iterator[FlatBucket]:
        return iter(self._buckets)

    def zero_grad(self) -> None:
        """Zero every flat gradient buffer, keeping the views."""
        for b in self._buckets:
            b.zero_grad()

    def __repr__(self) -> str:
        parts = ", ".join(f"{b.device}/{str(b.dtype).replace('torch.', '')}: {len(b.params)} "
                          f"params, {b.numel} elements" for b in self._buckets)
        return f"FlatParameters({parts})"


_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def flatten(params: nn.Module | Iterable[torch.Tensor], *, grads: bool = True,
            align: int = 16) -> FlatParameters:
    """Move parameters into one flat buffer per (device, dtype); parameters become views.

    Args:
        params: a module (its ``parameters()``, tied ones once) or an iterable of parameters
            (duplicates are taken once). Already-flat parameters are re-flattened.
        grads: also create the flat gradient buffers and make each ``param.grad`` a view
            (an existing gradient is copied in).
        align: every parameter starts at a multiple of this many elements (>= 1).

    Returns:
        FlatParameters: the buckets.

    Raises:
        ValueError: a non-floating parameter, ``align < 1``, or no parameters at all.
    """
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    plist = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    seen: set[int] = set()
    unique = []
    for p in plist:
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"flatten takes parameters (tensors), got {type(p).__name__}")
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    if not unique:
        raise ValueError("flatten: no parameters given")
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in unique:
        if p.dtype not in _SUPPORTED:
            raise ValueError(f"flatten: parameter of dtype {p.dtype}; allowed: float32, bfloat16, "
                             "float16, float64")
        groups.setdefault((p.device, p.dtype), []).append(p)

    buckets = []
    for (device, dtype), ps in groups.items():
        offsets, numels, shapes = [], [], []
        end = 0
        for p in ps:
            start = -(-end // align) * align
            offsets.append(start)
            numels.append(p.numel())
            shapes.append(p.shape)
            end = start + p.numel()
        total = -(-end // align) * align
        data = torch.zeros(total, dtype=dtype, device=device)
        bucket = FlatBucket(device=device, dtype=dtype, params=tuple(ps), offsets=tuple(offsets),
                            numels=tuple(numels), shapes=tuple(shapes), numel=total, data=data)
        views = bucket.views(data)
        with torch.no_grad():
            for i, (p, v) in enumerate(zip(ps, views)):
                v.copy_(p.data)
                p.data = v
                setattr(p, _ATTR, (bucket, i))
        bucket._views[id(data)] = (weakref.ref(data), views)
        if grads:
            bucket.attach_grads()
        buckets.append(bucket)
    return FlatParameters(buckets)
