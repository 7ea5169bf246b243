"""scan_layers: the blocks as one lax.scan compute what the unrolled blocks compute, and the stored
parameters keep one subtree per block (the layout the converters and checkpoints read)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import equivalence_config, model_from_params, random_batches, random_params, setup_train

from chexfound_jax.models.vit import Block, VisionTransformer, ViTConfig

# depth 4: forward_features scans all 4 blocks; get_intermediate_layers(n=2) scans 2 and unrolls 2.
CFG = ViTConfig(
    embed_dim=32,
    depth=4,
    num_heads=4,
    patch_size=8,
    img_size=32,
    num_register_tokens=2,
    ffn_layer="swiglufused",
    drop_path_rate=0.4,
    drop_path_mode="subset",
)
BATCH, GROUPS = 8, 2  # drop path keeps 2 of the 4 rows of each group


def _close(got, want, rtol=1e-6, atol=1e-6):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _abstract_model(cfg=CFG):
    return nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=3)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 32, 32, 3)).astype(np.float32)
    masks = rng.random((BATCH, (32 // 8) ** 2)) < 0.4
    return x, masks


def _everything(model, x, masks, key):
    """Each way the backbone runs, and the gradient of a loss through masks and grouped drop path."""

    def loss(m):
        out = m.forward_features(x, masks, rng=key, groups=GROUPS)
        return jnp.sum(out["x_norm_clstoken"] ** 2) + jnp.mean(out["x_norm_patchtokens"] ** 2), out

    (value, dropped), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return {
        "plain": model.forward_features(x),
        "masked": model.forward_features(x, masks),
        "drop_path": dropped,
        "intermediate": model.get_intermediate_layers(x, n=2),
        "loss": value,
        "grads": nnx.state(grads).to_pure_dict(),
    }


@pytest.fixture(scope="module")
def scanned_and_unrolled(params, inputs):
    """Both variants in one compiled program (one XLA compile instead of two)."""
    x, masks = inputs
    models = [model_from_params(CFG.replace(scan_layers=scan), params) for scan in (True, False)]
    return nnx.jit(lambda ms: [_everything(m, x, masks, jax.random.key(7)) for m in ms])(models)


@pytest.mark.parametrize("name", ["plain", "masked", "drop_path", "intermediate"])
def test_scan_equals_unrolled_forward(scanned_and_unrolled, name):
    scanned, unrolled = scanned_and_unrolled
    _close(scanned[name], unrolled[name])


def test_scan_equals_unrolled_gradients(scanned_and_unrolled):
    scanned, unrolled = scanned_and_unrolled
    np.testing.assert_allclose(scanned["loss"], unrolled["loss"], rtol=1e-6)
    n_params = len(jax.tree.leaves(nnx.state(_abstract_model(), nnx.Param)))
    assert len(jax.tree.leaves(scanned["grads"])) == n_params
    _close(scanned["grads"], unrolled["grads"], rtol=1e-5, atol=1e-6)
    for depth, block in scanned["grads"]["blocks"].items():  # every block gets a gradient
        assert np.abs(np.asarray(block["mlp"]["w3"]["kernel"])).max() > 0, depth


def test_masks_and_drop_path_change_the_output(scanned_and_unrolled):
    """The comparisons above compare three different computations, not one repeated."""
    out = scanned_and_unrolled[0]
    plain, masked, dropped = (np.asarray(out[k]["x_prenorm"]) for k in ("plain", "masked", "drop_path"))
    assert np.abs(masked - plain).max() > 1e-3
    assert np.abs(dropped - masked).max() > 1e-3


@pytest.mark.parametrize(
    "scan,n,scans", [(True, 0, 1), (True, 2, 1), (True, 3, 0), (False, 0, 0)], ids=["all", "n2", "n3", "unrolled"]
)
def test_which_blocks_run_as_a_scan(params, inputs, scan, n, scans):
    """One scan over the blocks before the first collected one, when those are more than one block
    (n=0: forward_features with drop path; n>0: get_intermediate_layers(n))."""
    graphdef, state = nnx.split(model_from_params(CFG.replace(scan_layers=scan), params))

    def run(state, x):
        model = nnx.merge(graphdef, state)
        return model.get_intermediate_layers(x, n=n) if n else model.forward_features(x, rng=jax.random.key(0))

    jaxpr = jax.make_jaxpr(run)(state, inputs[0])
    assert sum(eqn.primitive.name == "scan" for eqn in jaxpr.eqns) == scans


def test_stored_parameters_keep_one_subtree_per_block(params):
    """Blocks are stacked at call time only: the state has blocks.0 .. blocks.N-1, each shaped as a
    lone Block, no leading depth axis."""
    assert ViTConfig().scan_layers and CFG.scan_layers  # the default
    block = nnx.state(nnx.eval_shape(lambda: Block(CFG, rngs=nnx.Rngs(0))), nnx.Param)
    want = jax.tree.map(lambda v: v.shape, block.to_pure_dict())
    for model in (_abstract_model(), model_from_params(CFG, params)):
        blocks = nnx.state(model, nnx.Param).to_pure_dict()["blocks"]
        assert sorted(blocks) == list(range(CFG.depth))
        for i in range(CFG.depth):
            assert jax.tree.map(lambda v: v.shape, blocks[i]) == want, i
    flat = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(_abstract_model(), nnx.Param))}
    assert {f"blocks/{i}/attn/qkv/kernel" for i in range(CFG.depth)} <= flat
    assert params["blocks"][0]["attn"]["qkv"]["kernel"].shape == (32, 96)


# --- one whole pretraining step, scanned and unrolled -------------------------------------------------


def _one_step(scan):
    cfg = equivalence_config()
    cfg.model.drop_path_rate = 0.4  # the student's subset drop path, over the batch groups
    cfg.model.scan_layers = scan
    state, step, spec, _ = setup_train(cfg, {"data": 1}, "data_parallel", devices=jax.devices()[:1])
    batch = random_batches(cfg, spec, 1)[0]
    # LLVM -O0 takes about 2/3 of the default's CPU compile time here; both variants compile alike.
    step = step.lower(state, batch).compile(compiler_options={"xla_backend_optimization_level": 0})
    state, metrics = step(state, batch)
    return jax.device_get(state.student), jax.device_get(metrics)


def test_train_step_scan_equals_unrolled():
    """Same keys, same batch: the same metrics and student update with the blocks scanned or unrolled.

    drop_path_rate 0.4 only: this step already scans with per-block keys (the student's grouped drop
    path) and without (the teacher); a second, drop_path 0 pair would double the compile time.
    """
    (got_params, got_metrics), (want_params, want_metrics) = (_one_step(scan) for scan in (True, False))
    assert set(got_metrics) == set(want_metrics)
    for key in sorted(want_metrics):
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=2e-5, err_msg=key)
    _close(got_params, want_params, rtol=1e-4, atol=1e-5)
