"""Mailbox: the values and gradients in flight between stages, keyed by (edge, micro-batch).

Every stage boundary is an edge of the stage graph (``schedule.stage_graph.edges``): the
producer of an edge posts its forward output there, and the consumer posts the gradient of
that output back on the same edge. One mailbox holds both directions for one run::

    F of stage s, micro-batch k:   value = take(VALUE, e, k)  for each input edge e of s
                                   put(VALUE, e', k, out)     for each output edge e' of s
    B (or I) of stage s:           grad  = take(GRAD, e', k)  for each output edge e' of s
                                   put(GRAD, e, k, g)         for each input edge e of s

A slot is filled once and emptied once: :meth:`put` into a full slot and :meth:`take` from an
empty one raise :class:`MailboxError` naming the edge, micro-batch and direction, so a value
delivered twice, or not at all, is an error instead of a silent overwrite or a hang. The
schedule's dependencies (validated before the run) order every put before its take.

What is stored is opaque here: a value, or a transport's token for a value still in flight
(:mod:`pipetrain.transport`). Each device's issuing thread calls put/take for its own
actions; dict operations are atomic under the GIL, so no lock is needed.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

__all__ = ["VALUE", "GRAD", "Mailbox", "MailboxError"]

#: Direction of a slot: the forward value on an edge, or the gradient coming back on it.
VALUE = "value"
GRAD = "grad"


class MailboxError(RuntimeError):
    """A value was posted twice to one slot, or taken from an empty one."""


class Mailbox:
    """Slots keyed by ``(direction, edge, micro-batch)``; see the module docstring.

    Args:
        edge_names: optional ``{edge id: "0->1"}`` used in error messages.
    """

    def __init__(self, edge_names: Dict[int, str] | None = None) -> None:
        self._slots: Dict[Tuple[str, int, int], Any] = {}
        self._names = edge_names or {}
        self.puts = 0
        self.takes = 0

    def _where(self, direction: str, edge: int, mb: int) -> str:
        name = self._names.get(edge)
        return f"{direction} of edge {edge}{f' ({name})' if name else ''}, micro-batch {mb}"

    def put(self, direction: str, edge: int, mb: int, item: Any) -> None:
        """Post ``item`` into slot (direction, edge, mb). Raises MailboxError if it is full."""
        key = (direction, edge, mb)
        if key in self._slots:
            raise MailboxError(f"the {self._where(direction, edge, mb)} was delivered twice")
        self._slots[key] = item
        self.puts += 1

    def take(self, direction: str, edge: int, mb: int) -> Any:
        """Remove and return the item of slot (direction, edge, mb). Raises MailboxError if
        nothing was posted there."""
        try:
            item = self._slots.pop((direction, edge, mb))
        except KeyError:
            raise MailboxError(f"the {self._where(direction, edge, mb)} was never delivered "
                               "(or was taken already)") from None
        self.takes += 1
        return item

    def __contains__(self, key: Tuple[str, int, int]) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        """Items posted and not yet taken."""
        return len(self._slots)

    def pending(self) -> list:
        """The keys still full, sorted (for messages and tests)."""
        return sorted(self._slots)

    def clear(self) -> None:
        """Drop every item (after a failed run)."""
        self._slots.clear()
