"""What a Pipeline reports about its last step: stats, the simulator fed measured costs,
Chrome traces and timeline pictures (a mixin of :class:`~pipetrain.pipeline.Pipeline`)."""

from __future__ import annotations

from typing import Any, Optional

from pipetrain.stats import StepStats, simulate_measured

__all__ = ["Reporting"]


class Reporting:
    """Mixin: needs ``self._stats`` (the last step's :class:`StepStats`) and ``self.schedule``."""

    def stats(self) -> StepStats:
        """The last step's :class:`~pipetrain.stats.StepStats` (wall time, per-device busy /
        idle, measured bubble ratio, samples/s, per-stage action costs, peak stash)."""
        if self._stats is None:
            raise RuntimeError("no step has run yet: call step() first")
        if callable(self._stats):          # measured lazily (stats.measure_later)
            self._stats = self._stats()
        return self._stats

    def simulate(self, stats: Optional[StepStats] = None) -> Any:
        """The schedule simulator's prediction from the last step's measured per-stage costs
        (F, and B or I + W): ``schedule.simulate(...)``'s result, to compare with ``stats()``."""
        return simulate_measured(self.schedule, (stats or self.stats()).costs_s)

    def export_trace(self, path: Any) -> Any:
        """Write the last step's timeline as Chrome / Perfetto trace JSON, with the executor's
        waits (``wait 1F3``, ``wait GIL``) beside the actions; returns the path."""
        from pipetrain.trace import write_chrome_trace
        st = self.stats()
        return write_chrome_trace(st.records, path, waits=st.waits, name=f"pipetrain {st.schedule}",
                                  metadata={"schedule": st.schedule, "num_devices": st.num_devices,
                                            "num_microbatches": st.num_microbatches,
                                            "bubble_ratio": st.bubble_ratio, "wall_s": st.wall_s})

    def plot_timeline(self, path: Any, title: Optional[str] = None) -> Any:
        """Draw the last step's timeline (one row per device) to an image file."""
        from pipetrain.trace import plot_timeline
        st = self.stats()
        return plot_timeline(st.records, path, title or
                             f"{st.schedule}  p={st.num_devices} m={st.num_microbatches}  "
                             f"bubble {100 * st.bubble_ratio:.1f} %")
