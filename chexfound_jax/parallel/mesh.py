"""Device meshes with named axes (data, fsdp[, tensor]) for GSPMD-style sharding."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one -1 entry to the remaining devices and checks the product equals num_devices."""
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    shape = {name: int(axes[name]) for name in MESH_AXES if name in axes}
    free = [name for name, size in shape.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    known = math.prod(size for size in shape.values() if size != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not divide into mesh {dict(axes)}")
        shape[free[0]] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh {shape} needs {math.prod(shape.values())} devices, {num_devices} available")
    return shape


def create_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices, e.g. {"data": -1, "fsdp": 1} or {"data": 2, "fsdp": 4}.

    Axes are Auto (GSPMD propagation), which jit with explicit in/out shardings expects; recent
    jax.make_mesh defaults to Explicit axes, so the type is always passed.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(axes, len(devices))
    names = tuple(shape)
    types = (AxisType.Auto,) * len(names)
    slices = {getattr(d, "slice_index", 0) or 0 for d in devices}
    if len(slices) > 1:
        # Several slices joined by DCN: devices slice by slice, so the outer axis (data) crosses DCN and
        # the inner ones stay on each slice's ICI. The outer axis must therefore split into the slices.
        outer = next(iter(shape.values()))
        if outer % len(slices):
            raise ValueError(
                f"mesh {shape} on {len(slices)} slices: its first axis ({names[0]}) must be a multiple of the"
                " slice count, so only that axis crosses the data-center network"
            )
        ordered = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id))
        return Mesh(np.array(ordered).reshape(tuple(shape.values())), names, axis_types=types)
    return jax.make_mesh(tuple(shape.values()), names, axis_types=types, devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {"data": 2, "fsdp": 4}; one size may be -1 (the remaining devices)."""
    usage = f"a mesh is comma-separated axis=size pairs with axes from {MESH_AXES}, e.g. 'data=2,fsdp=4'"
    axes: dict[str, int] = {}
    for item in text.split(","):
        name, sep, size = (part.strip() for part in item.partition("="))
        if not sep or name not in MESH_AXES or name in axes:
            raise ValueError(f"{usage}; got {text!r} (bad or repeated item {item!r})")
        try:
            axes[name] = int(size)
        except ValueError:
            raise ValueError(f"{usage}; got {text!r} (size {size!r} is not an integer)") from None
        if axes[name] < 1 and axes[name] != -1:
            raise ValueError(f"{usage}; got {text!r} (size {axes[name]} must be positive or -1)")
    return axes
