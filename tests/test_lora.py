"""LoRA on the ViT backbone and the adaptation modes' trainable parameters (frozen | full | lora | bitfit)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import model_from_params, random_params

from chexfound_jax.convert import export_state_dict, layouts
from chexfound_jax.models import ModelConfig, adapt, lora
from chexfound_jax.models.vit import VisionTransformer, ViTConfig, abstract_vit_params
from chexfound_jax.parallel.mesh import create_mesh
from chexfound_jax.parallel.sharding import FSDP_RULES, logical_to_spec

TINY = ViTConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, num_register_tokens=2)
CFG = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.1)  # scale 2, so a missing alpha / r shows


@pytest.fixture(scope="module")
def params():
    return random_params(TINY, seed=1)


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(0), (2, 32, 40, 3))


def _adapted(params, cfg=CFG, seed=0):
    return lora.lora_model(TINY, params, cfg, seed=seed)


def _randomise_adapters(model, seed=2, scale=0.3):
    """Gives every lora_a / lora_b random values (a fresh adapter's B is zero, so it changes nothing)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, values))
    return model


@nnx.jit
def _features(model, x, rng=None):
    return model.forward_features(x, rng=rng)


def test_targets_are_peft_module_names(params):
    """The official targets adapt what peft adapts: attn.qkv, attn.proj and the patch embedding's conv
    (patch_embed.proj ends in ".proj"); names agree with the converter's."""
    model = _adapted(params)
    adapted = [lora.module_name(p) for p, layer in lora.adaptable_layers(model) if isinstance(layer, lora.ADAPTED)]
    assert sorted(adapted) == sorted(
        ["patch_embed.proj"] + [f"blocks.{i}.attn.{m}" for i in range(TINY.depth) for m in ("qkv", "proj")]
    )
    for path, _ in lora.adaptable_layers(model):
        weight, _, _ = layouts.backbone_rule((*path, "kernel"))
        assert lora.module_name(path) + ".weight" == weight


def test_fresh_adapter_is_peft_init_and_changes_nothing(params, images):
    model = _adapted(params)
    plain = model_from_params(TINY, params)
    for _, layer in lora.adaptable_layers(model):
        if isinstance(layer, lora.ADAPTED):
            a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
            bound = 1 / np.sqrt(np.prod(a.shape[:-1]))  # kaiming_uniform(a=sqrt(5)) on the (r, fan_in) weight
            assert a.shape[-1] == b.shape[0] == CFG.rank
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
            assert not b.any()
    want = _features(plain, images)
    for rng in (None, jax.random.key(3)):  # B = 0: with dropout too, the update is exactly zero
        got = _features(model, images, rng)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_qkv_and_proj_match_numpy(params):
    model = _randomise_adapters(_adapted(params))
    attn = model.blocks[0].attn
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, TINY.embed_dim)), np.float64)
    for layer in (attn.qkv, attn.proj):
        w, bias = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64)
        a, b = np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...], np.float64)
        want = x @ w + bias + (CFG.alpha / CFG.rank) * (x @ a) @ b
        np.testing.assert_allclose(layer(jnp.asarray(x, jnp.float32)), want, rtol=1e-5, atol=1e-5)


def test_patch_embedding_update_is_a_strided_convolution(params, images):
    model = _randomise_adapters(_adapted(params))
    pe = model.patch_embed
    a, b = np.asarray(pe.lora_a[...], np.float64), np.asarray(pe.lora_b[...], np.float64)  # (p, p, C, r), (r, D)
    x = np.asarray(images, np.float64)
    p = TINY.patch_size
    base = np.asarray(model_from_params(TINY, params).patch_embed(images), np.float64)
    got = np.asarray(pe(images), np.float64) - base
    for i, j in ((0, 0), (1, 2), (3, 4)):  # patch (row i, column j) of a 4 x 5 grid
        patch = x[:, i * p : (i + 1) * p, j * p : (j + 1) * p, :]
        want = CFG.scale * np.einsum("bhwc,hwcr,rd->bd", patch, a, b)
        np.testing.assert_allclose(got[:, i * 5 + j], want, rtol=1e-4, atol=1e-5)


def test_merge_gives_the_adapted_function(params, images):
    model = _randomise_adapters(_adapted(params))
    merged = lora.merge(model)
    merged_params = nnx.state(merged, nnx.Param).to_pure_dict()
    assert jax.tree.structure(merged_params) == jax.tree.structure(abstract_vit_params(TINY))
    want = _features(model, images)
    got = _features(merged, images)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=2e-5)
    assert not np.allclose(
        want["x_norm_clstoken"], _features(model_from_params(TINY, params), images)["x_norm_clstoken"]
    )
    # unadapted leaves pass through untouched; the exported backbone has exactly the plain backbone's keys
    np.testing.assert_array_equal(
        merged_params["blocks"][1]["mlp"]["w12"]["kernel"], params["blocks"][1]["mlp"]["w12"]["kernel"]
    )
    cfg = ModelConfig(backbone=TINY)
    sd, plain = export_state_dict(cfg, {"backbone": merged_params}), export_state_dict(cfg, {"backbone": params})
    assert list(sd) == list(plain) and all(sd[k].shape == plain[k].shape for k in sd)


def test_dropout_needs_a_training_key(params, images):
    model = _randomise_adapters(_adapted(params))
    no_key = _features(model, images)["x_norm_clstoken"]
    first = _features(model, images, jax.random.key(5))["x_norm_clstoken"]
    again = _features(model, images, jax.random.key(5))["x_norm_clstoken"]
    other = _features(model, images, jax.random.key(6))["x_norm_clstoken"]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, no_key) and not np.allclose(first, other)
    undropped = _randomise_adapters(_adapted(params, lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0)))
    np.testing.assert_allclose(_features(undropped, images, jax.random.key(5))["x_norm_clstoken"], no_key, atol=1e-6)


def test_plain_backbone_ignores_the_training_key(params, images):
    """A key without adapters and without stochastic depth changes nothing: the adapter keys go unused."""
    plain = model_from_params(TINY, params)
    want = plain.last_blocks(images, 2)
    got = plain.last_blocks(images, 2, rng=jax.random.key(9))
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_training_gradients_reach_the_adapters(params, images, remat):
    """Through the scanned, checkpointed blocks: a fresh adapter's B gets gradients (A does not while B = 0)."""
    cfg = TINY.replace(remat=remat)
    model = lora.lora_model(cfg, params, CFG)
    graphdef, train, rest = nnx.split(model, adapt.trainable_filter("lora", CFG), ...)

    @jax.jit
    def grads(train, rest, x, key):
        def loss(t):
            m = nnx.merge(graphdef, t, rest)
            return sum(jnp.sum(c**2) for c, _, _ in m.last_blocks(x, 1, rng=key))

        return jax.grad(loss)(train)

    g = grads(train, rest, images, jax.random.key(0)).to_pure_dict()
    qkv = g["blocks"][0]["attn"]["qkv"]
    assert np.abs(qkv["lora_b"]).max() > 0 and not np.asarray(qkv["lora_a"]).any()
    assert np.abs(g["patch_embed"]["lora_b"]).max() > 0 and np.abs(qkv["bias"]).max() > 0


def test_lora_axes_shard_like_the_base():
    model = nnx.eval_shape(lambda: lora.add_lora(VisionTransformer(TINY, rngs=nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1)))
    axes = {
        tuple(path): var.get_metadata()["logical_axes"]
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    }
    assert axes[("blocks", 0, "attn", "qkv", "lora_a")] == ("embed", None)
    assert axes[("blocks", 0, "attn", "qkv", "lora_b")] == (None, "qkv")
    assert axes[("blocks", 0, "attn", "proj", "lora_a")] == ("heads", None)
    assert axes[("blocks", 0, "attn", "proj", "lora_b")] == (None, "embed")
    assert axes[("patch_embed", "lora_b")] == (None, "embed")
    mesh = create_mesh({"data": 1, "fsdp": 8})
    spec = logical_to_spec(axes[("blocks", 0, "attn", "qkv", "lora_a")], FSDP_RULES, mesh, (TINY.embed_dim, 4))
    assert spec == jax.sharding.PartitionSpec("fsdp", None)


def test_add_lora_refuses_unknown_targets_and_twice(params):
    with pytest.raises(ValueError, match=r"\['nope'\] match no"):
        _adapted(params, lora.LoRAConfig(target_modules=("qkv", "nope")))
    model = _adapted(params)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_lora(model, CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bias"):
        lora.LoRAConfig(bias="some")
    with pytest.raises(ValueError, match="list of module names"):
        lora.LoRAConfig(target_modules="qkv")
    assert lora.LoRAConfig(target_modules=["qkv", "proj", "qkv"]) == lora.LoRAConfig()


# --- which parameters train ------------------------------------------------------------------------------

# TINY by hand: embed 32, SwiGLU hidden 88 (w12 out 176); the bias vectors are the patch embedding's (32),
# per block norm1 32 + qkv 96 + proj 32 + norm2 32 + w12 176 + w3 32 = 400, and the final norm's 32.
BITFIT_LEAVES = 1 + 6 * TINY.depth + 1
BITFIT_SCALARS = 32 + 400 * TINY.depth + 32


def _selected(mask):
    return {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(mask)[0] if v}


def test_bitfit_selects_exactly_the_biases(params):
    mask = adapt.trainable_mask("bitfit", params)
    chosen = _selected(mask)
    assert len(chosen) == BITFIT_LEAVES and all(k.endswith("['bias']") for k in chosen)
    assert adapt.count_trainable("bitfit", params) == BITFIT_SCALARS
    assert any("norm1" in k for k in chosen) and "['norm']['bias']" in chosen and "['patch_embed']['bias']" in chosen
    assert not _selected(adapt.trainable_mask("frozen", params))
    full = _selected(adapt.trainable_mask("full", params))
    assert full == {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]} - {
        "['mask_token']"
    }
    model = model_from_params(TINY, params)
    by_filter = nnx.state(model, adapt.trainable_filter("bitfit")).to_pure_dict()
    assert _selected(jax.tree.map(lambda _: True, by_filter)) == chosen


def test_bitfit_step_changes_only_biases(params, images):
    """One AdamW step with weight decay through the mask, and the gradients of the nnx filter's split."""
    model = model_from_params(TINY, params)
    graphdef, state = nnx.split(model, nnx.Param)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(images) ** 2)

    g = jax.jit(jax.grad(loss))(state)
    tx = adapt.only_trainable(optax.adamw(1e-2, weight_decay=0.5), adapt.trainable_mask("bitfit", state))
    opt_state = tx.init(state)
    assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * BITFIT_SCALARS + 1  # Adam moments, count
    updates, _ = tx.update(g, opt_state, state)
    new = optax.apply_updates(state, updates).to_pure_dict()
    old = state.to_pure_dict()
    for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(new)):
        if jax.tree_util.keystr(path).endswith("['bias']"):
            assert not np.array_equal(before, after), path
        else:
            np.testing.assert_array_equal(before, after, err_msg=jax.tree_util.keystr(path))

    graphdef, train, rest = nnx.split(model, adapt.trainable_filter("bitfit"), ...)
    grads = jax.jit(jax.grad(lambda t: jnp.sum(nnx.merge(graphdef, t, rest)(images) ** 2)))(train)
    assert _selected(jax.tree.map(lambda _: True, grads.to_pure_dict())) == _selected(
        adapt.trainable_mask("bitfit", params)
    )


def test_lora_filter_selects_adapters_and_their_biases(params):
    model = _adapted(params)
    adapted = {"patch_embed"} | {f"blocks.{i}.attn.{m}" for i in range(TINY.depth) for m in ("qkv", "proj")}
    want = {f"{m}.{leaf}" for m in adapted for leaf in ("lora_a", "lora_b", "bias")}
    by_filter = nnx.state(model, adapt.trainable_filter("lora", CFG))
    got = {".".join(str(k) for k in path) for path, _ in nnx.to_flat_state(by_filter)}
    assert got == want
    mask = adapt.trainable_mask("lora", nnx.state(model, nnx.Param), CFG)
    assert {k.replace("'", "").replace("][", ".").strip("[]") for k in _selected(mask)} == want
    none = adapt.trainable_filter("lora", lora.LoRAConfig(rank=4, bias="none"))
    assert all(str(p[-1]).startswith("lora_") for p, _ in nnx.to_flat_state(nnx.state(model, none)))
    # in a model with a head, `under` keeps the filter inside the backbone
    wrapped = nnx.Dict(backbone=model, head=nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    inside = adapt.trainable_filter("lora", CFG, under=("backbone",))
    assert len(nnx.to_flat_state(nnx.state(wrapped, inside))) == len(want)
    with pytest.raises(ValueError, match="needs the LoRAConfig"):
        adapt.trainable_filter("lora")
