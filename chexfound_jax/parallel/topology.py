"""Devices of a TPU slice that is not there, for compiling against it (MaxText's train_compile idea).

With libtpu installed, `jax.experimental.topologies.get_topology_desc` returns compile-only devices
of any slice shape; `jit(...).lower(abstract inputs).compile()` on them runs the real XLA:TPU
compiler, whose memory and cost analyses are what the chips would use. Users know slices by their
Cloud accelerator type (`v5p-128`, `v4-32`, `v5litepod-16`, `v6e-8`), which counts TensorCores for
v4 and v5p (2 per chip) and chips for v5e and v6e; JAX wants `generation:AxBxC` chip shapes.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

# generation -> (JAX topology prefix, TensorCores counted per chip in the accelerator type, torus dims)
GENERATIONS: dict[str, tuple[str, int, int]] = {
    "v4": ("v4", 2, 3),
    "v5p": ("v5p", 2, 3),
    "v5litepod": ("v5e", 1, 2),
    "v5e": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}

# Chip counts -> slice shapes Cloud TPU offers (3D tori for v4/v5p, 2D for v5e/v6e).
_SHAPES_3D = {
    4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
    256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
}  # fmt: skip
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # what the user asked for
    jax_name: str  # "v5p:4x4x4", or "local"
    num_slices: int
    devices: tuple[jax.Device, ...]

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def platform(self) -> str:
        return self.devices[0].platform


def jax_topology_name(name: str) -> str:
    """'v5p-128' -> 'v5p:4x4x4'; a JAX name ('v5p:2x2x1') is returned as it is."""
    if ":" in name:
        return name
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip().lower())
    if not match:
        raise ValueError(
            f"unknown TPU topology {name!r}: give a Cloud accelerator type (v4-8, v5p-128, v5litepod-16, v6e-8),"
            " a JAX topology (v5p:2x2x1) or 'local'"
        )
    prefix, cores_per_chip, dims = GENERATIONS[match[1]]
    count = int(match[2])
    if count % cores_per_chip:
        raise ValueError(f"{name}: {match[1]} counts {cores_per_chip} TensorCores per chip; {count} is not a slice")
    chips = count // cores_per_chip
    shapes = _SHAPES_3D if dims == 3 else _SHAPES_2D
    if chips not in shapes:
        raise ValueError(f"{name}: no {match[1]} slice of {chips} chips; known chip counts: {sorted(shapes)}")
    return f"{prefix}:{'x'.join(map(str, shapes[chips]))}"


def _has_tpu_chips() -> bool:
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # a private helper: if it moves, assume a machine without TPUs
        return False


def quiet_libtpu(accelerator_type: str = "v5p-8") -> None:
    """Environment that keeps libtpu from probing for TPU hosts (and warning) on a machine without TPUs.

    It also lets several processes load libtpu at once (deviceless compiles hold no chip; otherwise the
    second one fails on /tmp/libtpu_lockfile). Nothing is changed on a TPU VM, whose libtpu must find
    its real hosts and keep its lock. Call it before jax first initialises the TPU plugin.
    """
    if _has_tpu_chips():
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def get_topology(name: str, num_slices: int = 1) -> Topology:
    """Compile-only devices of a TPU slice (or `num_slices` slices over DCN), or 'local' for jax.devices()."""
    if name == "local":
        if num_slices != 1:
            raise ValueError("--num_slices applies to TPU topologies, not 'local'")
        return Topology(name, "local", 1, tuple(jax.devices()))
    jax_name = jax_topology_name(name)
    quiet_libtpu()
    from jax.experimental import topologies

    try:
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        if jax_name.startswith(("v4:", "v5p:")):
            kwargs["chip_config_name"] = "megacore"  # one device per chip (both TensorCores), as jobs run
        desc = topologies.get_topology_desc(jax_name, "tpu", **kwargs)
    except Exception as e:  # libtpu missing, or a shape it does not know
        raise RuntimeError(
            f"cannot describe TPU topology {jax_name!r} ({e}); deviceless TPU compilation needs libtpu:"
            " pip install -e '.[tpu]'"
        ) from e
    return Topology(name, jax_name, num_slices, tuple(desc.devices))
