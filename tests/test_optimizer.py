"""Parameter groups, per-module clipping and the torch-AdamW step of the student optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chexfound_jax.models import HeadConfig, ModelConfig, ViTConfig, abstract_params, vit_config
from chexfound_jax.ssl.schedules import Schedules, masked_schedule
from chexfound_jax.train.optimizer import clip_by_module_norm, make_optimizer, param_multipliers


def leaf(tree, path: str):
    for key in path.split("."):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


@pytest.fixture(scope="module")
def vit_large():
    cfg = ModelConfig(
        backbone=vit_config("vit_large"), dino_head=HeadConfig(), ibot_head=HeadConfig(bottleneck_dim=256)
    )
    return abstract_params(cfg)


def test_groups_on_vit_large(vit_large):
    m = param_multipliers(vit_large)
    no_decay = [
        "backbone.blocks.3.attn.qkv.bias",
        "backbone.blocks.3.attn.proj.bias",
        "backbone.blocks.23.mlp.w12.bias",
        "backbone.blocks.0.mlp.w3.bias",
        "backbone.blocks.5.norm1.scale",
        "backbone.blocks.5.norm2.bias",
        "backbone.blocks.0.ls1.gamma",
        "backbone.blocks.7.ls2.gamma",
        "backbone.norm.scale",
        "backbone.norm.bias",
        "backbone.patch_embed.bias",
        "dino_head.mlp.0.bias",
        "ibot_head.mlp.2.bias",
    ]
    decay = [
        "backbone.cls_token",
        "backbone.pos_embed",
        "backbone.register_tokens",
        "backbone.mask_token",
        "backbone.patch_embed.kernel",
        "backbone.blocks.3.attn.qkv.kernel",
        "backbone.blocks.3.mlp.w3.kernel",
        "dino_head.mlp.1.kernel",
        "dino_head.last_layer.g",
        "dino_head.last_layer.v",
        "ibot_head.last_layer.g",
        "ibot_head.last_layer.v",
    ]
    assert all(leaf(m.wd, name) == 0.0 for name in no_decay)
    assert all(leaf(m.wd, name) == 1.0 for name in decay)
    # 10 per block (4 biases, 2 LayerNorms, 2 LayerScales) + final norm + patch-embed bias + 3 biases per head.
    assert sum(w == 0.0 for w in jax.tree.leaves(m.wd)) == 10 * 24 + 2 + 1 + 6

    lr = {jax.tree_util.keystr(p, simple=True, separator="."): v for p, v in jax.tree_util.tree_leaves_with_path(m.lr)}
    assert lr.pop("backbone.patch_embed.kernel") == lr.pop("backbone.patch_embed.bias") == 0.2
    assert set(lr.values()) == {1.0}  # layerwise_decay 1.0

    last = {
        jax.tree_util.keystr(p, simple=True, separator=".")
        for p, v in jax.tree_util.tree_leaves_with_path(m.is_last_layer)
        if v
    }
    assert last == {f"{h}.last_layer.{w}" for h in ("dino_head", "ibot_head") for w in ("g", "v")}


def test_layerwise_decay():
    depth, rate = 3, 0.5
    tree = abstract_params(
        ModelConfig(
            backbone=ViTConfig(embed_dim=32, depth=depth, num_heads=2, img_size=64),
            dino_head=HeadConfig(in_dim=32, out_dim=16, hidden_dim=8, bottleneck_dim=4),
        )
    )
    m = param_multipliers(tree, patch_embed_lr_mult=0.2, layerwise_decay=rate)
    # rate ** (L + 1 - layer_id): layer_id 0 for embeddings and tokens, i + 1 for block i, L + 1 otherwise.
    expected = {
        "backbone.pos_embed": 0.5**4,
        "backbone.cls_token": 0.5**4,
        "backbone.register_tokens": 0.5**4,
        "backbone.mask_token": 0.5**4,
        "backbone.patch_embed.kernel": 0.5**4 * 0.2,
        "backbone.patch_embed.bias": 0.5**4 * 0.2,
        "backbone.blocks.0.attn.qkv.kernel": 0.5**3,
        "backbone.blocks.0.ls2.gamma": 0.5**3,
        "backbone.blocks.1.norm1.scale": 0.5**2,
        "backbone.blocks.2.mlp.w3.bias": 0.5,
        "backbone.norm.scale": 1.0,
        "dino_head.mlp.0.kernel": 1.0,  # heads are their own submodules: no layer-wise decay
        "dino_head.last_layer.v": 1.0,
    }
    assert {name: leaf(m.lr, name) for name in expected} == pytest.approx(expected, rel=1e-15)
    assert param_multipliers(tree, layerwise_decay=rate, num_layers=5).lr["backbone"]["pos_embed"] == 0.5**6


# A tiny tree with the real naming: one leaf per kind of group.
SHAPES = {
    "backbone": {
        "patch_embed": {"kernel": (2, 3), "bias": (3,)},
        "cls_token": (1, 1, 3),
        "blocks": {0: {"norm1": {"scale": (3,)}, "attn": {"qkv": {"kernel": (3, 4)}}, "ls1": {"gamma": (3,)}}},
    },
    "dino_head": {"mlp": {0: {"kernel": (3, 2), "bias": (2,)}}, "last_layer": {"g": (5,), "v": (2, 5)}},
    "ibot_head": {"mlp": {0: {"bias": (2,)}}, "last_layer": {"v": (2, 4)}},
}


def random_tree(rng, scale=1.0):
    return jax.tree.map(lambda s: scale * rng.standard_normal(s), SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def toy_schedules(frozen_steps: int = 1) -> Schedules:
    lr = lambda t: 0.01 * (jnp.asarray(t, jnp.float32) + 1.0)
    wd = lambda t: 0.1 + 0.05 * jnp.asarray(t, jnp.float32)
    const = lambda t: jnp.float32(0.0)
    return Schedules(lr, masked_schedule(lr, frozen_steps), wd, const, const, total_iters=10)


def torch_reference(params, grads_per_step, frozen_steps, clip=3.0, b1=0.9, b2=0.999, eps=1e-8):
    """float64 numpy of the official loop: clip_grad_norm_ per module, then torch AdamW per param group."""
    m = param_multipliers(params)
    flat = lambda t: jax.tree_util.tree_leaves_with_path(t)
    p = {path: np.asarray(v, np.float64) for path, v in flat(params)}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    lr_mult, wd_mult, last = (dict(flat(t)) for t in m)
    for it, grads in enumerate(grads_per_step):
        g = {path: np.asarray(v, np.float64) for path, v in flat(grads)}
        for module in SHAPES:
            keys = [k for k in g if k[0].key == module]
            norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in keys))
            coef = min(1.0, clip / (norm + 1e-6))
            for k in keys:
                g[k] = g[k] * coef
        t = it + 1
        base_lr, wd = 0.01 * (it + 1), 0.1 + 0.05 * it
        for k in p:
            lr = (0.0 if last[k] and it < frozen_steps else base_lr) * lr_mult[k]
            p[k] = p[k] * (1 - lr * wd * wd_mult[k])
            mu[k] = mu[k] + (g[k] - mu[k]) * (1 - b1)
            nu[k] = b2 * nu[k] + (1 - b2) * g[k] * g[k]
            denom = np.sqrt(nu[k]) / np.sqrt(1 - b2**t) + eps
            p[k] = p[k] - (lr / (1 - b1**t)) * mu[k] / denom
    return p, mu, nu


def run_optimizer(params, grads_per_step, frozen_steps):
    opt = make_optimizer(params, toy_schedules(frozen_steps), {"clip_grad": 3.0})
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for grads in grads_per_step:
        params, state = step(params, state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads))
    return params, state


def test_adamw_steps_match_torch():
    rng = np.random.default_rng(0)
    params = random_tree(rng)
    # Backbone gradients over the clip norm (~5x), heads under it.
    grads = [
        {
            "backbone": random_tree(rng, 4.0)["backbone"],
            "dino_head": random_tree(rng, 0.3)["dino_head"],
            "ibot_head": random_tree(rng, 0.3)["ibot_head"],
        }
        for _ in range(3)
    ]
    assert optax.tree.norm(grads[0]["backbone"]) > 10 and optax.tree.norm(grads[0]["dino_head"]) < 3
    got, state = run_optimizer(params, grads, frozen_steps=1)
    want, mu, nu = torch_reference(params, grads, frozen_steps=1)
    for path, value in jax.tree_util.tree_leaves_with_path(got):
        np.testing.assert_allclose(value, want[path], rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    for name, ref in (("mu", mu), ("nu", nu)):
        for path, value in jax.tree_util.tree_leaves_with_path(optax.tree.get(state, name)):
            np.testing.assert_allclose(value, ref[path], rtol=1e-5, atol=1e-9, err_msg=f"{name} {path}")
    assert int(state[-1].count) == 3  # the schedules' step lives in the optimiser state


def test_clip_by_module_norm():
    grads = {"a": {"x": jnp.array([3.0, 4.0]), "y": jnp.array([12.0])}, "b": {"z": jnp.array([1.0, -2.0])}}
    clipped, _ = clip_by_module_norm(3.0).update(grads, optax.EmptyState())
    coef = 3.0 / (13.0 + 1e-6)  # ||a|| = sqrt(9 + 16 + 144) = 13 > 3; ||b|| = sqrt(5) < 3
    np.testing.assert_allclose(clipped["a"]["x"], [3.0 * coef, 4.0 * coef], rtol=1e-7)
    np.testing.assert_allclose(clipped["a"]["y"], [12.0 * coef], rtol=1e-7)
    np.testing.assert_array_equal(clipped["b"]["z"], grads["b"]["z"])


def test_frozen_last_layer_keeps_params_and_updates_moments():
    rng = np.random.default_rng(1)
    params = random_tree(rng)
    grads = [random_tree(rng) for _ in range(3)]
    frozen, state = run_optimizer(params, grads[:2], frozen_steps=2)
    mu, nu = optax.tree.get(state, "mu"), optax.tree.get(state, "nu")
    for head in ("dino_head", "ibot_head"):
        for name, value in frozen[head]["last_layer"].items():
            np.testing.assert_array_equal(value, np.float32(params[head]["last_layer"][name]))  # no decay either
            assert np.all(mu[head]["last_layer"][name] != 0) and np.all(nu[head]["last_layer"][name] > 0)
    assert not np.allclose(frozen["dino_head"]["mlp"][0]["kernel"], params["dino_head"]["mlp"][0]["kernel"])
    thawed, _ = run_optimizer(params, grads, frozen_steps=2)  # the third step uses the last-layer lr
    assert not np.allclose(thawed["dino_head"]["last_layer"]["v"], params["dino_head"]["last_layer"]["v"])


def test_vit_large_state_shapes(vit_large):
    """The real tree builds, and the official schedules drive it (abstractly, no 131072-wide arrays)."""
    config = dict(
        base_lr=2e-4, global_batch_size=80, min_lr=1e-6, epochs=100, epoch_length=2500, warmup_epochs=10,
        weight_decay=0.04, weight_decay_end=0.2, momentum_teacher=0.994, final_momentum_teacher=1.0,
        warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, freeze_last_layer_epochs=1,
    )  # fmt: skip
    opt = make_optimizer(vit_large, Schedules.from_config(config))
    state = jax.eval_shape(opt.init, vit_large)
    updates, _ = jax.eval_shape(opt.update, vit_large, state, vit_large)
    assert jax.tree.structure(updates) == jax.tree.structure(vit_large)
    assert optax.tree.get(state, "mu")["ibot_head"]["last_layer"]["v"].shape == (256, 131072)
