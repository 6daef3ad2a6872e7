"""Micro-batches: split a mini-batch into m pieces along dim 0 and put them back together.

A "batch" here is any nesting of tuples, lists and dicts whose leaves are tensors or plain
values. Every tensor leaf with at least one dimension is split along dim 0 (they must all
share the same dim-0 size, the batch size); 0-dim tensors and non-tensor leaves (ints, None,
strings) are handed unchanged to every micro-batch. Splits are as even as possible: the first
``n % m`` micro-batches get one extra sample, so sizes differ by at most one.

Why not ``torch.utils._pytree``: the engine flattens a stage's inputs, outputs and gradients
several times per action, so this is on the per-action path. Measured here (torch 2.13,
CPython 3.11): flatten + unflatten of ``(tensor, {"a": tensor, "b": None}, [1, 2])`` takes
3.8 us with these functions and 12.8 us with ``_pytree.tree_flatten(..., is_leaf=...)`` /
``tree_unflatten``; of a lone tensor 0.64 us vs 1.3 us. pytree would use most of the
20 us-per-action budget on nested values, so the home-made one stays (it also keeps
``None`` as a leaf, which the gradients of non-differentiable outputs need).
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

import torch

__all__ = ["flatten", "unflatten", "batch_size", "split_sizes", "scatter", "gather", "tree_map",
           "tree_sum", "detach_for_backward"]

# A spec mirrors the nesting: ("leaf",), ("tuple", type, [specs]), ("list", [specs]),
# ("dict", keys, [specs]). Kept as plain tuples so that building one per action is cheap.
Spec = Tuple[Any, ...]
_LEAF: Spec = ("leaf",)


def flatten(obj: Any) -> Tuple[List[Any], Spec]:
    """Flatten nested tuples / lists / dicts into a list of leaves and a spec to rebuild them.

    Args:
        obj: a tensor, a plain value, or a nesting of tuple (incl. namedtuple), list and dict.

    Returns:
        ``(leaves, spec)`` with ``unflatten(leaves, spec)`` equal to ``obj`` (same containers,
        same leaf objects). Dict keys keep their insertion order.
    """
    if type(obj) is torch.Tensor:        # the common case, on the per-action path
        return [obj], _LEAF
    leaves: List[Any] = []
    return leaves, _flatten_into(obj, leaves)


def _flatten_into(obj: Any, leaves: List[Any]) -> Spec:
    if isinstance(obj, tuple):
        return ("tuple", type(obj), [_flatten_into(x, leaves) for x in obj])
    if isinstance(obj, list):
        return ("list", [_flatten_into(x, leaves) for x in obj])
    if isinstance(obj, dict):
        keys = list(obj.keys())
        return ("dict", keys, [_flatten_into(obj[k], leaves) for k in keys])
    leaves.append(obj)
    return _LEAF


def unflatten(leaves: Sequence[Any], spec: Spec) -> Any:
    """Rebuild the nesting described by ``spec`` from ``leaves`` (inverse of :func:`flatten`)."""
    if spec is _LEAF and len(leaves) == 1:   # a lone leaf (flatten's own spec object)
        return leaves[0]
    it = iter(leaves)
    out = _unflatten_from(it, spec)
    rest = sum(1 for _ in it)
    if rest:
        raise ValueError(f"unflatten: {rest} leaves left over; the spec takes fewer")
    return out


def _unflatten_from(it, spec: Spec) -> Any:
    kind = spec[0]
    if kind == "leaf":
        return next(it)
    if kind == "tuple":
        items = [_unflatten_from(it, s) for s in spec[2]]
        cls = spec[1]
        # namedtuples take positional fields; a plain tuple takes one iterable.
        return cls(*items) if cls is not tuple and hasattr(cls, "_fields") else tuple(items)
    if kind == "list":
        return [_unflatten_from(it, s) for s in spec[1]]
    return {k: _unflatten_from(it, s) for k, s in zip(spec[1], spec[2])}


def tree_map(fn: Callable[[Any], Any], obj: Any) -> Any:
    """Apply ``fn`` to every leaf of ``obj``, keeping the nesting."""
    leaves, spec = flatten(obj)
    return unflatten([fn(x) for x in leaves], spec)


def _splittable(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0


def batch_size(obj: Any) -> int:
    """The dim-0 size shared by every tensor leaf of ``obj`` that has a dimension.

    Raises:
        ValueError: no tensor with a dimension, or two tensors disagree on dim 0.
    """
    sizes = {tuple(x.shape)[0] for x in flatten(obj)[0] if _splittable(x)}
    if not sizes:
        raise ValueError("a batch needs at least one tensor with a batch dimension (dim 0)")
    if len(sizes) > 1:
        raise ValueError(f"every tensor of a batch must have the same dim-0 size; got {sorted(sizes)}")
    return sizes.pop()


def split_sizes(n: int, m: int) -> List[int]:
    """Sizes of ``m`` micro-batches of a batch of ``n``, as even as possible (larger ones first).

    Raises:
        ValueError: ``m < 1`` or ``n < m`` (a micro-batch would be empty).
    """
    if m < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {m}")
    if n < m:
        raise ValueError(
            f"batch size {n} is smaller than num_microbatches={m}; every micro-batch needs at "
            f"least one sample (use a batch of >= {m} samples or fewer micro-batches)")
    q, r = divmod(n, m)
    return [q + 1 if i < r else q for i in range(m)]


def scatter(obj: Any, m: int) -> Tuple[List[Any], List[int]]:
    """Split a batch into ``m`` micro-batches along dim 0.

    Args:
        obj: a batch (see module docstring).
        m: number of micro-batches, ``1 <= m <= batch size``.

    Returns:
        ``(micro_batches, sizes)``: ``m`` objects with ``obj``'s nesting whose tensors are views
        of ``obj``'s (no copy), and their dim-0 sizes (``sum(sizes) == batch_size(obj)``).
    """
    if type(obj) is torch.Tensor and obj.dim() > 0:     # the common case: no tree walk
        sizes = split_sizes(obj.shape[0], m)
        return list(torch.split(obj, sizes, dim=0)), sizes
    sizes = split_sizes(batch_size(obj), m)
    leaves, spec = flatten(obj)
    pieces = [torch.split(x, sizes, dim=0) if _splittable(x) else None for x in leaves]
    out = []
    for i in range(m):
        out.append(unflatten([p[i] if p is not None else x for x, p in zip(leaves, pieces)], spec))
    return out, sizes


def gather(micro_batches: Sequence[Any]) -> Any:
    """Concatenate micro-batches back along dim 0 (inverse of :func:`scatter`).

    Tensor leaves with a dimension are concatenated; other leaves are taken from the first
    micro-batch. All micro-batches must share one nesting.
    """
    if not micro_batches:
        raise ValueError("gather needs at least one micro-batch")
    flat = [flatten(mb) for mb in micro_batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise ValueError("gather: micro-batches have different structures")
    columns = zip(*(leaves for leaves, _ in flat))
    return unflatten([torch.cat(col, dim=0) if _splittable(col[0]) else col[0] for col in columns],
                     spec)


def tree_sum(values: Sequence[Any]) -> Any:
    """Leaf-wise sum of values of one nesting (``None`` leaves count as zero)."""
    if len(values) == 1:
        return values[0]
    present = [v for v in values if v is not None]
    if not present:
        return None
    flat = [flatten(v) for v in present]
    spec = flat[0][1]
    out = []
    for column in zip(*(leaves for leaves, _ in flat)):
        parts = [g for g in column if isinstance(g, torch.Tensor)]
        out.append(torch.stack(parts).sum(0) if len(parts) > 2 else
                   (parts[0] + parts[1] if len(parts) == 2 else (parts[0] if parts else None)))
    return unflatten(out, spec)


def detach_for_backward(obj: Any) -> Any:
    """``obj`` with every tensor detached and every floating one requiring grad: a stage's
    boundary input as measured alone (partitioning by time, the planner's cost probes)."""
    def leaf(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            t = t.detach()
            if t.is_floating_point():
                t.requires_grad_(True)
        return t
    return tree_map(leaf, obj)
