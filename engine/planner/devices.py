"""What ``pipetrain.plan(devices=...)`` accepts: a device count or a device mesh.

- an ``int``: the total number of devices; every (w, p) with ``w * p = devices`` is searched.
- a :class:`torch.distributed.device_mesh.DeviceMesh` (or any object with the same ``shape``
  and ``mesh_dim_names`` attributes):

  * 1-D: its size is the device count, every (w, p) is searched (the ranks are laid out as
    :mod:`pipetrain.distributed.mesh` does: replica-major, ``rank = dp_rank * p + pp_rank``);
  * 2-D with dimension names ``"dp"`` and ``"pp"`` (any order): the mesh fixes the width
    ``w = size("dp")`` and the depth ``p = size("pp")``;
  * 2-D without those names: ``(w, p)`` in that order, the layout of
    :class:`pipetrain.distributed.mesh.Mesh` (``init_device_mesh(kind, (w, p))``);
  * more dimensions: refused (tensor parallelism is not planned).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

__all__ = ["DeviceSpec", "device_spec"]


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """The devices a plan is for: ``count`` in all; ``depth`` / ``width`` fixed by a 2-D mesh
    (None: searched)."""

    count: int
    depth: Optional[int] = None
    width: Optional[int] = None


def _shape(mesh: Any) -> Tuple[int, ...]:
    shape = getattr(mesh, "shape", None)
    if callable(shape):
        shape = shape()
    try:
        return tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"devices must be an int or a DeviceMesh; got {mesh!r}") from None


def device_spec(devices: Any) -> DeviceSpec:
    """Read ``devices`` (see the module docstring). Raises ValueError on anything else."""
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"devices must be an int >= 1, got {devices!r}")
        return DeviceSpec(devices)
    if not hasattr(devices, "shape") or not hasattr(devices, "mesh_dim_names"):
        raise ValueError(f"devices must be an int (the device count) or a "
                         f"torch.distributed.device_mesh.DeviceMesh; got {devices!r}")
    shape = _shape(devices)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"the device mesh has shape {shape}: every dimension must be >= 1")
    if len(shape) == 1:
        return DeviceSpec(shape[0])
    if len(shape) > 2:
        raise ValueError(f"the device mesh has {len(shape)} dimensions {shape}: the planner "
                         "takes a 1-D mesh (the devices) or a 2-D (dp, pp) mesh")
    names = tuple(devices.mesh_dim_names or ())
    if names and set(names) == {"dp", "pp"}:
        w, p = shape[names.index("dp")], shape[names.index("pp")]
    elif names:
        raise ValueError(f"a 2-D device mesh needs dimension names ('dp', 'pp') (or none, "
                         f"meaning (dp, pp)); got {names}")
    else:
        w, p = shape
    return DeviceSpec(w * p, depth=p, width=w)
