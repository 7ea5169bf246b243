"""ViT backbone behaviour: full-size shapes (abstractly), stochastic depth, remat, dtypes, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import model_from_params, random_params

from chexfound_jax.models.vit import VisionTransformer, ViTConfig, abstract_vit_params, drop_path_residual, vit_config

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


def test_remat_gives_the_same_values_and_gradients(tiny_params):
    x = _images()

    def loss(model):
        return jnp.sum(model.forward_features(x, rng=jax.random.key(3))["x_norm_clstoken"] ** 2)

    grads = []
    for remat in (False, True):
        model = model_from_params(TINY.replace(remat=remat, drop_path_rate=0.4), tiny_params)
        value, grad = nnx.jit(nnx.value_and_grad(loss))(model)
        grads.append((value, nnx.state(grad).to_pure_dict()))
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-6)
    for g0, g1 in zip(jax.tree.leaves(grads[0][1]), jax.tree.leaves(grads[1][1])):
        np.testing.assert_allclose(g0, g1, rtol=1e-5, atol=1e-6)


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
    ],
)
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig(**bad)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        vit_config("vit_huge")
