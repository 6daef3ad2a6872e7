"""devices= as a count or a DeviceMesh (here objects with DeviceMesh's shape and
mesh_dim_names; a real gloo mesh runs in test_build.py)."""

import pytest

import pipetrain
from pipetrain.planner import Affine, CostTable
from pipetrain.planner.devices import DeviceSpec, device_spec


class FakeMesh:
    def __init__(self, shape, names=None):
        self.shape, self.mesh_dim_names = tuple(shape), names


def _table(n=8):
    a = Affine(1e-4, 1e-4)
    return CostTable(forward=[a] * n, backward=[a + a] * n, weight=[a] * n,
                     activation=[Affine(0, 100)] * n, input_bytes=[Affine(0, 48)] * n,
                     param_bytes=[200.0] * n)


@pytest.mark.parametrize("devices,spec", [
    (8, DeviceSpec(8)),
    (FakeMesh((8,)), DeviceSpec(8)),
    (FakeMesh((2, 4), ("dp", "pp")), DeviceSpec(8, depth=4, width=2)),
    (FakeMesh((4, 2), ("pp", "dp")), DeviceSpec(8, depth=4, width=2)),
    (FakeMesh((2, 4)), DeviceSpec(8, depth=4, width=2)),     # unnamed: (dp, pp)
])
def test_device_spec(devices, spec):
    assert device_spec(devices) == spec


@pytest.mark.parametrize("devices,match", [
    (0, "int >= 1"), (True, "DeviceMesh"), ("8", "DeviceMesh"),
    (FakeMesh((2, 2, 2)), "3 dimensions"), (FakeMesh((2, 4), ("x", "y")), "'dp', 'pp'"),
])
def test_device_spec_refuses(devices, match):
    with pytest.raises(ValueError, match=match):
        device_spec(devices)


def test_a_2d_mesh_fixes_width_and_depth_a_1d_mesh_searches():
    table = _table()
    fixed = pipetrain.plan(table, devices=FakeMesh((2, 4), ("dp", "pp")),
                           memory_per_device="1GB", batch_size=16)
    assert (fixed.width, fixed.depth) == (2, 4)
    assert {(c.w, c.p) for c in fixed.candidates} == {(2, 4)}
    free = pipetrain.plan(table, devices=FakeMesh((8,)), memory_per_device="1GB", batch_size=16)
    assert {(c.w, c.p) for c in free.candidates} == {(8, 1), (4, 2), (2, 4), (1, 8)}
    assert free.step_time == pipetrain.plan(table, devices=8, memory_per_device="1GB",
                                            batch_size=16).step_time
