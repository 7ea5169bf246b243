"""ViT backbone behaviour: full-size shapes (abstractly), stochastic depth, remat, dtypes, config."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import model_from_params, random_params
from jax.sharding import NamedSharding, PartitionSpec

from chexfound_jax.models.vit import (
    REMAT_POLICIES,
    VisionTransformer,
    ViTConfig,
    abstract_vit_params,
    drop_path_residual,
    remat_policy_name,
    vit_config,
)
from chexfound_jax.parallel import activations
from chexfound_jax.parallel.mesh import create_mesh
from chexfound_jax.parallel.sharding import DATA_PARALLEL_RULES

TINY = ViTConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, num_register_tokens=2)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vit_large_parameter_count_and_shapes():
    cfg = vit_config("vit_large", patch_size=16, img_size=512)
    assert cfg.hidden_dim == 2736
    params = abstract_vit_params(cfg)
    assert _count(params) == 304_630_016
    assert _count(params["blocks"][0]) == 12_616_032
    assert params["pos_embed"].shape == (1, 1025, 1024)
    assert params["blocks"][23]["mlp"]["w12"]["kernel"].shape == (1024, 5472)
    model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    for size, n in ((512, 1024), (224, 196)):
        out = nnx.eval_shape(lambda m, x: m.forward_features(x), model, jax.ShapeDtypeStruct((2, size, size, 3), "f4"))
        assert out["x_norm_clstoken"].shape == (2, 1024)
        assert out["x_norm_regtokens"].shape == (2, 4, 1024)
        assert out["x_norm_patchtokens"].shape == (2, n, 1024)
        assert out["x_prenorm"].shape == (2, 1 + 4 + n, 1024)
    x = jax.ShapeDtypeStruct((1, 512, 512, 3), "f4")
    layers = nnx.eval_shape(lambda m, x: m.get_intermediate_layers(x, 4), model, x)
    assert [(p.shape, c.shape) for p, c in layers] == [((1, 1024, 1024), (1, 1024))] * 4


def test_plain_mlp_sizes():
    cfg = vit_config("vit_base", patch_size=14, img_size=518, ffn_layer="mlp", num_register_tokens=0)
    assert cfg.hidden_dim == 3072
    assert abstract_vit_params(cfg)["pos_embed"].shape == (1, 1 + 37 * 37, 768)


def test_every_parameter_has_logical_axes():
    model = nnx.eval_shape(lambda: VisionTransformer(vit_config("vit_small", patch_size=16), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.value.ndim, path
    block = model.blocks[0]
    assert block.mlp.w12.kernel.get_metadata()["logical_axes"] == ("embed", "mlp")
    assert block.attn.qkv.kernel.get_metadata()["logical_axes"] == ("embed", "qkv")


def test_subset_drop_path_updates_exactly_int_keep_rows():
    x = jnp.zeros((10, 3, 4))
    out = drop_path_residual(x, lambda v: jnp.ones_like(v), 0.4, "subset", jax.random.key(0))
    touched = np.asarray(out).reshape(10, -1).max(axis=1)
    assert (touched > 0).sum() == 6  # int(10 * 0.6)
    np.testing.assert_allclose(touched[touched > 0], 10 / 6, rtol=1e-6)  # scaled by B / subset


@pytest.mark.parametrize("seed", range(8))
def test_subset_drop_path_keeps_int_keep_rows_in_each_group(seed):
    rate, groups, rows_per_group = 0.4, 2, 5
    keep = int(rows_per_group * (1 - rate))  # 3
    branch_rows = []

    def branch(v):
        branch_rows.append(v.shape[0])
        return jnp.ones_like(v)

    x = jnp.zeros((groups * rows_per_group, 3, 4))
    out = drop_path_residual(x, branch, rate, "subset", jax.random.key(seed), groups=groups)
    assert branch_rows == [groups * keep]  # the branch runs on the kept rows only
    touched = np.asarray(out).reshape(groups, rows_per_group, -1)
    for g in range(groups):  # group g's rows are rows g*5 .. g*5+4 of the batch
        updated = touched[g].max(axis=1) > 0
        assert updated.sum() == keep, (g, updated)
        np.testing.assert_allclose(touched[g][updated], rows_per_group / keep, rtol=1e-6)
        np.testing.assert_array_equal(touched[g][~updated], 0.0)


def test_subset_drop_path_rows_must_split_into_groups():
    with pytest.raises(ValueError, match="10 rows do not split into 3"):
        drop_path_residual(jnp.zeros((10, 2)), jnp.tanh, 0.4, "subset", jax.random.key(0), groups=3)


def _collectives(hlo: str) -> set[str]:
    return set(re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\b", hlo))


def test_subset_drop_path_keeps_each_group_on_its_device():
    """Batch-sharded over 8 devices, one group per device: drop path needs no collective at all."""
    mesh = create_mesh({"data": 8})
    weight = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)
    x = np.random.default_rng(1).standard_normal((32, 5, 8)).astype(np.float32)
    key = jax.random.key(0)
    row_sharded = NamedSharding(mesh, PartitionSpec("data"))

    def compiled(groups):
        fn = lambda x, key: drop_path_residual(x, lambda v: jnp.tanh(v @ weight), 0.4, "subset", key, groups=groups)
        jitted = jax.jit(fn, in_shardings=(row_sharded, NamedSharding(mesh, PartitionSpec())))
        with activations.activation_sharding(mesh, DATA_PARALLEL_RULES):
            return jitted.lower(x, key).compile(), fn

    per_device, fn = compiled(8)
    hlo = per_device.as_text()
    assert "all-gather" not in hlo
    assert not _collectives(hlo), _collectives(hlo)
    assert per_device.output_shardings.spec == PartitionSpec("data")
    np.testing.assert_allclose(per_device(jax.device_put(x, row_sharded), key), jax.jit(fn)(x, key), atol=1e-6)
    # The check can fail: one group over the whole batch picks rows across devices.
    assert _collectives(compiled(1)[0].as_text())


def test_per_sample_drop_path_is_unbiased():
    x = jnp.zeros((4000, 1))
    out = np.asarray(drop_path_residual(x, lambda v: jnp.ones_like(v), 0.4, "per_sample", jax.random.key(1)))
    np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.6], rtol=1e-6)
    assert abs(out.mean() - 1.0) < 0.05


def test_low_rate_uses_per_sample_like_dinov2():
    x = jnp.zeros((100, 1))
    out = np.asarray(drop_path_residual(x, lambda v: jnp.ones_like(v), 0.1, "subset", jax.random.key(2)))
    np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.9], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(TINY, seed=1)


def _images(batch=4, size=32, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


@nnx.jit
def _prenorm(model, x, rng=None):
    return model.forward_features(x, rng=rng)["x_prenorm"]


def test_stochastic_depth_only_in_training(tiny_params):
    x = _images()
    model = model_from_params(TINY.replace(drop_path_rate=0.4), tiny_params)
    plain = model_from_params(TINY, tiny_params)
    eval_out = _prenorm(model, x)
    np.testing.assert_array_equal(eval_out, _prenorm(plain, x))
    a = _prenorm(model, x, jax.random.key(0))
    b = _prenorm(model, x, jax.random.key(0))
    c = _prenorm(model, x, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(eval_out)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    # rate 0: an rng changes nothing
    np.testing.assert_array_equal(_prenorm(plain, x, jax.random.key(0)), eval_out)


def _remat_loss(model):
    x = _images()
    return jnp.sum(model.forward_features(x, rng=jax.random.key(3))["x_norm_clstoken"] ** 2)


def _remat_model(remat, params):
    return model_from_params(TINY.replace(remat=remat, drop_path_rate=0.4), params)


# "offload" moves the saved activations to the device's pinned_host memory: a backend without that memory
# space cannot run it. That is the only reason to leave it out; any other failure fails the test.
HOST_OFFLOAD = "pinned_host" in {m.kind for m in jax.devices()[0].addressable_memories()}
RUNNABLE_POLICIES = tuple(p for p in REMAT_POLICIES if p != "offload" or HOST_OFFLOAD)


@pytest.fixture(scope="module")
def remat_results(tiny_params):
    """(value, gradients) of every remat policy the backend can run, compiled as one program."""
    models = [_remat_model(p, tiny_params) for p in RUNNABLE_POLICIES]
    outs = nnx.jit(lambda ms: [nnx.value_and_grad(_remat_loss)(m) for m in ms])(models)
    return {p: (v, nnx.state(g).to_pure_dict()) for p, (v, g) in zip(RUNNABLE_POLICIES, outs, strict=True)}


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(
            p,
            marks=pytest.mark.skipif(
                p == "offload" and not HOST_OFFLOAD,
                reason=f"remat='offload' needs pinned_host memory, which {jax.default_backend()} devices lack",
            ),
        )
        for p in REMAT_POLICIES
        if p != "none"
    ],
)
def test_remat_policies_give_the_same_values_and_gradients(remat_results, policy):
    (want_value, want_grads), (value, grads) = remat_results["none"], remat_results[policy]
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(want_grads))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _grad_jaxpr(remat, params):
    graphdef, state = nnx.split(_remat_model(remat, params))
    return str(jax.make_jaxpr(jax.grad(lambda s: _remat_loss(nnx.merge(graphdef, s))))(state))


@pytest.fixture(scope="module")
def remat_jaxprs(tiny_params):
    return {p: _grad_jaxpr(p, tiny_params) for p in REMAT_POLICIES}


def test_remat_policies_reach_the_traced_program(remat_jaxprs):
    """Equal numbers above must come from different programs: each policy shows in the jaxpr."""
    jaxprs = remat_jaxprs
    assert "remat" not in jaxprs["none"]
    assert all("remat" in jaxprs[p] for p in ("full", "dots", "offload"))
    assert len(set(jaxprs.values())) == len(REMAT_POLICIES)
    assert "MemorySpace.Host" in jaxprs["offload"] and "MemorySpace.Host" not in jaxprs["dots"]


def test_remat_bools_are_full_and_none(tiny_params, remat_jaxprs):
    assert remat_policy_name(True) == "full" and remat_policy_name(False) == "none"
    assert _grad_jaxpr(True, tiny_params) == remat_jaxprs["full"]
    assert _grad_jaxpr(False, tiny_params) == remat_jaxprs["none"]


def test_bfloat16_compute_keeps_float32_params(tiny_params):
    x = _images()
    model = model_from_params(TINY.replace(dtype="bfloat16"), tiny_params)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    features = nnx.jit(lambda m, x: m.forward_features(x))
    out = features(model, x)
    assert out["x_norm_patchtokens"].dtype == jnp.bfloat16
    ref = features(model_from_params(TINY, tiny_params), x)
    err = np.abs(np.asarray(out["x_norm_patchtokens"], np.float32) - np.asarray(ref["x_norm_patchtokens"])).max()
    assert err < 0.1


def test_empty_mask_equals_no_mask(tiny_params):
    x = _images()
    model = model_from_params(TINY, tiny_params)
    masked = nnx.jit(lambda m, x, mask: m.forward_features(x, mask))(model, x, np.zeros((4, 16), bool))
    np.testing.assert_array_equal(masked["x_prenorm"], _prenorm(model, x))


def test_registers_receive_no_position_embedding(tiny_params):
    model = model_from_params(TINY, tiny_params)
    tokens = model.prepare_tokens(_images(batch=1))
    np.testing.assert_array_equal(tokens[0, 1:3], tiny_params["register_tokens"][0])
    np.testing.assert_allclose(tokens[0, 0], tiny_params["cls_token"][0, 0] + tiny_params["pos_embed"][0, 0], atol=1e-7)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(embed_dim=30, num_heads=4), "not divisible"),
        (dict(ffn_layer="swiglu"), "ffn_layer"),
        (dict(drop_path_mode="batch"), "drop_path_mode"),
        (dict(interpolate_offset=1.5), "interpolate_offset"),
        (dict(remat="bogus"), "'bogus'"),
    ],
)
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig(**bad)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        vit_config("vit_huge")
