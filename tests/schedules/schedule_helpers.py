"""Helpers the schedule tests share: printed rows, rebuilding edited schedules, rule checks."""

import pytest
from hypothesis import strategies as st

from pipetrain import schedules
from pipetrain.schedules import Schedule, ScheduleError


def rows(s):
    """Each device's actions as printed labels."""
    return [[str(a) for a in s.actions(d)] for d in range(s.num_devices)]


def expand(spec):
    """'F0 F1 B0' on stage 2 -> ['2F0', '2F1', '2B0']."""
    return {stage: [f"{stage}{tok}" for tok in text.split()] for stage, text in spec.items()}


def rebuild(s, per_device):
    """A schedule with s's shape (graph, micro- and mini-batch counts) and these actions."""
    return Schedule.from_actions(per_device, num_microbatches=s.num_microbatches,
                                 num_minibatches=s.num_minibatches, graph=s.stage_graph)


def edited(s, device, fn):
    """s with fn applied to device's action list (fn edits the list in place)."""
    per = [s.actions(d) for d in range(s.num_devices)]
    fn(per[device])
    return rebuild(s, per)


def rule_of(s):
    """The ScheduleError validate(s) raises (the test fails if it raises none)."""
    with pytest.raises(ScheduleError) as err:
        schedules.validate(s)
    return err.value


def draw_position(s, data):
    """Each device's actions (lists to edit), and a (device, index) drawn from them."""
    per = [s.actions(d) for d in range(s.num_devices)]
    d = data.draw(st.integers(0, s.num_devices - 1))
    i = data.draw(st.integers(0, len(per[d]) - 1))
    return per, d, i
