"""parallel/topology.py (Cloud accelerator types -> deviceless TPU devices) and parallel/mesh.py (parse_mesh,
multi-slice meshes). The TPU devices come from the real libtpu, which the README installs: nothing is skipped."""

import re

import pytest

from chexfound_jax.parallel import mesh as mesh_lib
from chexfound_jax.parallel import topology as topology_lib


@pytest.mark.parametrize(
    "name, expected",
    [
        ("v5p-8", "v5p:2x2x1"),  # v5p counts TensorCores: 8 cores = 4 chips
        ("v5p-128", "v5p:4x4x4"),
        ("v4-32", "v4:2x2x4"),
        ("v5litepod-16", "v5e:4x4"),  # v5e and v6e count chips
        ("v6e-8", "v6e:2x4"),
        ("V5P-8", "v5p:2x2x1"),
        ("v5p:2x2x1", "v5p:2x2x1"),  # a JAX topology name passes through
        ("v6e:4x4", "v6e:4x4"),
    ],
)
def test_jax_topology_name(name, expected):
    assert topology_lib.jax_topology_name(name) == expected


@pytest.mark.parametrize("name", ["v5p-7", "v9-8", "foo", "v5p-6", "v6e-3", ""])
def test_jax_topology_name_rejects_what_cloud_does_not_offer(name):
    with pytest.raises(ValueError, match=re.escape(name) or "''"):
        topology_lib.jax_topology_name(name)


def test_get_topology_v5p_8_is_four_v5p_chips():
    topo = topology_lib.get_topology("v5p-8")
    assert (topo.name, topo.jax_name, topo.num_slices) == ("v5p-8", "v5p:2x2x1", 1)
    assert len(topo.devices) == 4
    assert topo.device_kind == "TPU v5"
    assert topo.platform == "tpu"
    assert {d.device_kind for d in topo.devices} == {"TPU v5"}


@pytest.mark.parametrize(
    "name, chips, kind", [("v4-32", 16, "TPU v4"), ("v5litepod-16", 16, "TPU v5 lite"), ("v6e-8", 8, "TPU v6 lite")]
)
def test_get_topology_gives_one_device_per_chip(name, chips, kind):
    """v4 and v5p chips hold 2 TensorCores that jobs run as one device (megacore), as meshes need."""
    topo = topology_lib.get_topology(name)
    assert len(topo.devices) == chips and topo.device_kind == kind
    mesh_lib.create_mesh({"fsdp": -1}, topo.devices)  # a mesh over them is valid


def test_get_topology_local_and_bad_requests():
    local = topology_lib.get_topology("local")
    assert local.jax_name == "local" and local.platform == "cpu" and len(local.devices) == 8
    with pytest.raises(ValueError, match="num_slices"):
        topology_lib.get_topology("local", num_slices=2)
    with pytest.raises(ValueError, match="v9-8"):
        topology_lib.get_topology("v9-8")


def test_multi_slice_mesh_puts_each_slice_in_one_data_row():
    topo = topology_lib.get_topology("v5p:2x2x1", num_slices=2)
    assert len(topo.devices) == 8 and topo.num_slices == 2
    assert sorted({d.slice_index for d in topo.devices}) == [0, 1]
    # Hand the devices over interleaved: the mesh must still group them by slice.
    devices = sorted(topo.devices, key=lambda d: (d.id % 100000, d.slice_index))
    mesh = mesh_lib.create_mesh({"data": 2, "fsdp": 4}, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i]} == {i}, mesh.devices
    assert {d.id for d in mesh.devices.flat} == {d.id for d in topo.devices}


def test_parse_mesh():
    assert mesh_lib.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert mesh_lib.parse_mesh("fsdp=-1") == {"fsdp": -1}
    assert mesh_lib.parse_mesh(" data = 1 , tensor=2") == {"data": 1, "tensor": 2}


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "bad or repeated item"),
        ("data", "bad or repeated item"),
        ("pipeline=2", "bad or repeated item"),
        ("data=2,data=2", "bad or repeated item"),
        ("data=2;fsdp=4", "is not an integer"),
        ("data=x", "is not an integer"),
        ("data=0", "must be positive or -1"),
        ("fsdp=-2", "must be positive or -1"),
    ],
)
def test_parse_mesh_rejects_garbage(text, why):
    with pytest.raises(ValueError, match=r"a mesh is comma-separated axis=size pairs") as info:
        mesh_lib.parse_mesh(text)
    assert why in str(info.value)
