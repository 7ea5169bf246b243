"""Meshes and logical-axis sharding rules on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from chexfound_jax.models import HeadConfig, ModelConfig, abstract_params, vit_config
from chexfound_jax.models.model import logical_axes
from chexfound_jax.parallel import mesh as mesh_lib
from chexfound_jax.parallel import sharding

VIT_L = ModelConfig(vit_config("vit_large"), HeadConfig(), HeadConfig(bottleneck_dim=256))


def test_eight_simulated_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "axes,want",
    [
        ({"data": -1}, {"data": 8}),
        ({"data": -1, "fsdp": 4}, {"data": 2, "fsdp": 4}),
        ({"data": 1, "fsdp": -1, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2}),
    ],
)
def test_mesh_shapes(axes, want):
    mesh = mesh_lib.create_mesh(axes)
    assert dict(mesh.shape) == want
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "axes,match",
    [({"data": 3}, "needs 3 devices"), ({"data": -1, "fsdp": -1}, "only one"), ({"model": 8}, "unknown mesh axes")],
)
def test_mesh_errors(axes, match):
    with pytest.raises(ValueError, match=match):
        mesh_lib.create_mesh(axes)


def _shardings(rules, axes):
    mesh = mesh_lib.create_mesh(axes)
    return sharding.tree_shardings(logical_axes(VIT_L), abstract_params(VIT_L), rules, mesh)


def test_data_parallel_replicates_every_parameter():
    specs = [s.spec for s in jax.tree.leaves(_shardings(sharding.DATA_PARALLEL_RULES, {"data": -1}))]
    assert all(all(d is None for d in spec) for spec in specs)


def test_fsdp_shards_every_large_parameter():
    shard = _shardings(sharding.FSDP_RULES, {"fsdp": -1})
    params = abstract_params(VIT_L)
    for (path, s), x in zip(jax.tree_util.tree_leaves_with_path(shard), jax.tree.leaves(params), strict=True):
        if np.prod(x.shape) >= 1 << 16:  # everything but norms, biases, gammas and tokens
            assert "fsdp" in s.spec, jax.tree_util.keystr(path)
    block = shard["backbone"]["blocks"][5]
    assert block["attn"]["qkv"]["kernel"].spec == P("fsdp", None)
    assert block["mlp"]["w3"]["kernel"].spec == P(None, "fsdp")  # (mlp, embed): embed carries fsdp
    assert shard["dino_head"]["last_layer"]["v"].spec == P(None, "fsdp")  # prototypes
    assert shard["backbone"]["norm"]["scale"].spec == P(None)


def test_fsdp_with_tensor_axis():
    block = _shardings(sharding.FSDP_RULES, {"fsdp": 4, "tensor": 2})["backbone"]["blocks"][0]
    assert block["mlp"]["w12"]["kernel"].spec == P("fsdp", "tensor")
    assert block["attn"]["proj"]["kernel"].spec == P("tensor", "fsdp")


def test_rule_conventions():
    mesh = mesh_lib.create_mesh({"data": 2, "fsdp": 4})
    rules = [("a", "fsdp"), ("b", "fsdp"), ("batch", ("data", "fsdp")), ("t", "tensor")]
    assert sharding.logical_to_spec(("a", "b"), rules, mesh) == P("fsdp", None)  # no axis used twice
    assert sharding.logical_to_spec(("a",), rules, mesh, shape=(6,)) == P(None)  # 6 % 4: replicate
    assert sharding.logical_to_spec(("batch", None), rules, mesh, shape=(16, 3)) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("t",), rules, mesh) == P(None)  # no tensor axis in this mesh
    with pytest.raises(KeyError, match="'c' has no sharding rule"):
        sharding.logical_to_spec(("c",), rules, mesh)


def test_resolve_rules():
    assert sharding.resolve_rules("fsdp") == sharding.FSDP_RULES
    assert sharding.resolve_rules({"batch": "data"}) == (("batch", "data"),)
    with pytest.raises(ValueError, match="unknown sharding rules"):
        sharding.resolve_rules("zero2")
