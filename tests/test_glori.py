"""GLoRI and the linear probe: parity with the official code and a PyTorch reference, sizes, inits, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import GLORI_CATCLS_PTH, GLORI_PTH, TINY_HEADS, TINY_TEACHER, golden, model_from_params, torch_glori

from chexfound_jax.convert import head_checkpoints, pytorch, torch_io
from chexfound_jax.models.classifiers import (
    ClassifierConfig,
    FrozenQuery,
    abstract_classifier_state,
    build_classifier,
    classifier_from_state,
    head_inputs,
)

torch = pytest.importorskip("torch")

VARIANTS = [("glori", GLORI_PTH, False), ("glori_catcls", GLORI_CATCLS_PTH, True)]
# small sizes with every dimension distinct: B=3 images, N=10 patches, D=16 (n=4 blocks, F=64), d=32, K=7
B, N, D, K, DEC, FFN = 3, 10, 16, 7, 32, 48


@pytest.fixture(scope="module")
def gold():
    return golden("glori")


def _golden_inputs(g):
    """glori.npz stores (4 blocks, B, N, D) patch and (4, B, D) class tokens, shallow to deep."""
    return head_inputs([(g["feat_cls"][i], None, g["feat_patch"][i]) for i in range(4)])


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _blocks(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((B, D)).astype(dtype), None, rng.standard_normal((B, N, D)).astype(dtype))
        for _ in range(4)
    ]


def _random_state(cfg, seed=0):
    """Every variable random (numpy): kernels ~ 1/sqrt(fan_in), LayerNorm scales ~ 1, biases ~ 0.1.

    Far cheaper than a random init (whose RNG kernels dominate CPU test time) when only values matter.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(spec.shape).astype(np.float32)
        if "scale" in name:
            return 1 + 0.1 * x
        if "kernel" in name or "duplicate_pooling'" in name:
            return x / np.sqrt(spec.shape[-2] if "kernel" in name else spec.shape[-1])
        return x if "query" in name else 0.1 * x

    return jax.tree_util.tree_map_with_path(leaf, abstract_classifier_state(cfg))


def _randomise_torch(module, seed):
    """Non-trivial values for every bias and LayerNorm parameter (the inits make them 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias") or name.endswith("duplicate_pooling_bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
    return module


def _torch_outputs(ref, feats):
    with torch.no_grad():
        logits, attn = ref(torch.from_numpy(np.array(feats["patch"])), torch.from_numpy(np.array(feats["cls"])))
    return logits.numpy(), attn.numpy()


# --- parity with the official code (golden files) ------------------------------------------------


@pytest.mark.parametrize("prefix,path,cat_cls", VARIANTS)
def test_official_head_matches_golden_outputs(gold, prefix, path, cat_cls):
    name, sd = head_checkpoints.read_head_file(torch_io.read_checkpoint(path))
    cfg, state = head_checkpoints.import_classifier(
        sd, **{k: head_checkpoints.parse_head_name(name)[k] for k in ("n_blocks", "avgpool")}
    )
    assert (cfg.kind, cfg.num_classes, cfg.embed_dim, cfg.feature_dim, cfg.decoder_dim) == ("glori", 5, 64, 256, 32)
    assert (cfg.num_heads, cfg.ffn_dim, cfg.cat_cls, cfg.pooled_dim) == (8, 2048, cat_cls, 288 if cat_cls else 32)
    logits, attn = classifier_from_state(cfg, state)(_golden_inputs(gold), return_attention=True)
    assert logits.shape == (2, 5) and attn.shape == (2, 8, 5, 64)
    assert np.abs(np.asarray(logits) - gold[f"{prefix}_logits"]).max() <= 1e-5
    assert np.abs(np.asarray(attn) - gold[f"{prefix}_attention"]).max() <= 1e-6


@pytest.mark.parametrize("prefix,path,cat_cls", VARIANTS)
def test_torch_reference_reproduces_golden_outputs(gold, prefix, path, cat_cls):
    """The reference used below is itself checked against the official outputs (strict key match)."""
    _, sd = head_checkpoints.read_head_file(torch_io.read_checkpoint(path))
    ref = torch_glori(5, 256, 32, cat_cls=cat_cls).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    logits, attn = _torch_outputs(ref, _golden_inputs(gold))
    assert np.abs(logits - gold[f"{prefix}_logits"]).max() <= 1e-5
    assert np.abs(attn - gold[f"{prefix}_attention"]).max() <= 1e-6


def test_backbone_features_to_logits_end_to_end(gold):
    """Our tiny backbone's last_blocks -> head_inputs -> GLoRI reproduces the official logits from the image."""
    cfg, params = pytorch.import_state_dict(torch_io.read_checkpoint(TINY_TEACHER), num_heads=TINY_HEADS)
    vit = model_from_params(cfg.backbone, params["backbone"])
    feats = nnx.jit(lambda m, x: head_inputs(m.last_blocks(x, 4)))(vit, gold["input_image"].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(feats["patch"], np.concatenate(list(gold["feat_patch"]), axis=-1), atol=1e-5)
    head_cfg, state = head_checkpoints.import_classifier(
        head_checkpoints.read_head_file(torch_io.read_checkpoint(GLORI_CATCLS_PTH))[1]
    )
    logits = classifier_from_state(head_cfg, state)(feats)
    np.testing.assert_allclose(logits, gold["glori_catcls_logits"], atol=1e-4)


# --- parity with an independent PyTorch GLoRI --------------------------------------------------


@pytest.mark.parametrize("cat_cls", [False, True])
def test_torch_reference_to_jax(cat_cls):
    ref = _randomise_torch(torch_glori(K, 4 * D, DEC, ffn_dim=FFN, cat_cls=cat_cls), seed=1).eval()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    cfg, state = head_checkpoints.import_classifier(sd)
    assert cfg == ClassifierConfig("glori", K, D, decoder_dim=DEC, ffn_dim=FFN, cat_cls=cat_cls)
    feats = head_inputs(_blocks())
    logits, attn = classifier_from_state(cfg, state)(feats, return_attention=True)
    want_logits, want_attn = _torch_outputs(ref, feats)
    assert attn.shape == (B, 8, K, N)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    np.testing.assert_allclose(attn, want_attn, atol=1e-6)


@pytest.mark.parametrize("cat_cls", [False, True])
def test_jax_head_to_torch_reference(cat_cls):
    cfg = ClassifierConfig("glori", K, D, decoder_dim=DEC, ffn_dim=FFN, num_heads=4, cat_cls=cat_cls)
    state = _random_state(cfg, seed=2)
    ref = torch_glori(K, 4 * D, DEC, num_heads=4, ffn_dim=FFN, cat_cls=cat_cls).eval()
    ref.load_state_dict(
        {k: torch.from_numpy(v) for k, v in head_checkpoints.export_classifier(cfg, state).items()}, strict=True
    )
    feats = head_inputs(_blocks(seed=5))
    logits, attn = classifier_from_state(cfg, state)(feats, return_attention=True)
    want_logits, want_attn = _torch_outputs(ref, feats)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    np.testing.assert_allclose(attn, want_attn, atol=1e-6)


def test_eval_normalises_twice_the_query():
    """Eval computes LN1(q + q): with a large eps LN1(2q) and LN1(q) differ a lot, and we match 2q."""
    ref = _randomise_torch(torch_glori(K, 4 * D, DEC, ffn_dim=FFN, eps=1.0), seed=4).eval()
    cfg, state = head_checkpoints.import_classifier({k: v.numpy() for k, v in ref.state_dict().items()})
    cfg = cfg.replace(norm_eps=1.0)
    feats = head_inputs(_blocks(seed=6))
    logits = classifier_from_state(cfg, state)(feats)
    np.testing.assert_allclose(logits, _torch_outputs(ref, feats)[0], atol=1e-5)
    q = state["query_embed"]
    ln = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1.0)
    assert np.abs(ln(2 * q) - ln(q)).max() > 0.1  # so the check above tells the two apart


# --- sizes, variables, inits ------------------------------------------------------------------


def test_official_sizes_and_frozen_query():
    cfg = ClassifierConfig("glori", 40, 1024)
    model = nnx.eval_shape(lambda: build_classifier(cfg, rngs=nnx.Rngs(0)))
    assert _count(nnx.state(model, nnx.Param)) == 8_692_776
    assert _count(nnx.state(model)) == 8_723_496
    assert "query_embed" not in nnx.state(model, nnx.Param).to_pure_dict()
    assert nnx.state(model, FrozenQuery).to_pure_dict()["query_embed"].shape == (40, 768)
    cat = nnx.eval_shape(lambda: build_classifier(cfg.replace(cat_cls=True), rngs=nnx.Rngs(0)))
    assert _count(nnx.state(cat, nnx.Param)) == 8_856_616
    probe = nnx.eval_shape(lambda: build_classifier(cfg.replace(kind="linear", avgpool=True), rngs=nnx.Rngs(0)))
    assert _count(nnx.state(probe)) == 5120 * 40 + 40


def test_logical_axes_cover_every_variable():
    model = nnx.eval_shape(lambda: build_classifier(ClassifierConfig("glori", K, D), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(var.shape), path


def test_official_inits():
    cfg = ClassifierConfig("glori", 40, 1024, cat_cls=True)
    s = nnx.state(build_classifier(cfg, rngs=nnx.Rngs(0))).to_pure_dict()
    s = jax.tree.map(np.asarray, s)
    pool = s["duplicate_pooling"]
    assert pool.shape == (40, 4864)
    assert abs(pool.std() / np.sqrt(2 / (4864 + 40)) - 1) < 0.01  # Xavier-normal, 0.0202 (official glori.py)
    assert not s["duplicate_pooling_bias"].any()
    assert abs(s["query_embed"].std() - 1) < 0.01 and abs(s["query_embed"].mean()) < 0.01  # N(0, 1)
    bound = np.sqrt(6 / (768 + 3 * 768))  # Xavier-uniform on the (2304, 768) in_proj_weight
    w = s["multihead_attn"]["in_proj"]["kernel"]
    assert np.abs(w).max() <= bound and abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.01
    assert not s["multihead_attn"]["in_proj"]["bias"].any() and not s["multihead_attn"]["out_proj"]["bias"].any()
    for name, fan_in in [("embed_standart", 4096), ("linear1", 768), ("linear2", 2048)]:  # torch nn.Linear default
        for leaf in ("kernel", "bias"):
            x = s[name][leaf]
            assert np.abs(x).max() <= fan_in**-0.5 and np.abs(x).max() > 0.9 * fan_in**-0.5, (name, leaf)
    assert np.abs(s["multihead_attn"]["out_proj"]["kernel"]).max() <= 768**-0.5
    for norm in ("norm1", "norm2", "norm3"):
        assert (s[norm]["scale"] == 1).all() and not s[norm]["bias"].any()
    probe = nnx.state(build_classifier(ClassifierConfig("linear", 40, 1024), rngs=nnx.Rngs(0))).to_pure_dict()
    assert abs(np.asarray(probe["linear"]["kernel"]).std() / 0.01 - 1) < 0.02
    assert not np.asarray(probe["linear"]["bias"]).any()


def test_gradients_skip_the_frozen_query():
    """Training differentiates nnx.Param only (the split a head trainer uses); the query stays in the rest."""
    cfg = ClassifierConfig("glori", K, D, decoder_dim=DEC, ffn_dim=FFN)
    graphdef, params, rest = nnx.split(classifier_from_state(cfg, _random_state(cfg)), nnx.Param, ...)
    feats = head_inputs(_blocks())
    loss = lambda p, key: nnx.merge(graphdef, p, rest)(feats, dropout_rng=key).sum()
    grads = jax.eval_shape(jax.grad(loss), params, jax.random.key(0)).to_pure_dict()
    assert "query_embed" not in grads and "query_embed" in rest.to_pure_dict()
    assert jax.tree.structure(grads) == jax.tree.structure(params.to_pure_dict())


# --- dropout (training mode) --------------------------------------------------------------------


def test_training_dropout():
    cfg = ClassifierConfig("glori", K, D, decoder_dim=DEC, ffn_dim=FFN, dropout=0.3)
    model = classifier_from_state(cfg, _random_state(cfg))
    run = nnx.jit(lambda m, f, key: m(f, dropout_rng=key, return_attention=True))
    feats = head_inputs(_blocks())
    eval_logits, eval_attn = model(feats, return_attention=True)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, attn = run(model, feats, k1)
    np.testing.assert_array_equal(a, run(model, feats, k1)[0])  # deterministic given the key
    assert np.abs(a - eval_logits).max() > 1e-3
    assert np.abs(a - run(model, feats, k2)[0]).max() > 1e-3
    # attention weights are dropped in training (torch returns the dropped weights), never in eval
    assert abs(float((attn == 0).mean()) - 0.3) < 0.05 and not (eval_attn == 0).any()
    # rate 0 with a key is exactly eval
    zero = classifier_from_state(cfg.replace(dropout=0.0), nnx.state(model).to_pure_dict())
    np.testing.assert_allclose(zero(feats, dropout_rng=k1), eval_logits, rtol=0, atol=0)


def test_heads_trace_under_vmap():
    """One head per learning rate, each initialised from its own key and run with its own dropout key."""
    cfg = ClassifierConfig("glori", K, D, decoder_dim=DEC, ffn_dim=FFN)
    feats = head_inputs(_blocks())

    def one(key, drop):
        model = build_classifier(cfg, rngs=nnx.Rngs(key))
        return model(feats, dropout_rng=drop), nnx.state(model, FrozenQuery).to_pure_dict()["query_embed"]

    keys = jax.random.split(jax.random.key(0), 3)
    logits, queries = jax.eval_shape(jax.vmap(one), keys, keys)
    assert logits.shape == (3, B, K) and queries.shape == (3, K, DEC)


# --- inputs and the linear probe --------------------------------------------------------------


def test_head_inputs_layout():
    blocks = _blocks(dtype=jnp.bfloat16)
    feats = head_inputs(blocks)
    assert {k: (v.shape, v.dtype) for k, v in feats.items()} == {
        "cls": ((B, 4 * D), jnp.float32),
        "patch": ((B, N, 4 * D), jnp.float32),
        "avgpool": ((B, D), jnp.float32),
    }
    for layer, (cls, _, patch) in enumerate(blocks):
        np.testing.assert_array_equal(feats["cls"][:, layer * D : (layer + 1) * D], np.float32(cls))
        np.testing.assert_array_equal(feats["patch"][..., layer * D : (layer + 1) * D], np.float32(patch))
    np.testing.assert_allclose(feats["avgpool"], np.float32(blocks[-1][2]).mean(1), atol=1e-6)


@pytest.mark.parametrize("avgpool", [False, True])
def test_linear_probe_matches_torch_linear(avgpool):
    cfg = ClassifierConfig("linear", K, D, avgpool=avgpool)
    feats = head_inputs(_blocks())
    lin = torch.nn.Linear(cfg.in_features, K)
    sd = {k: v.detach().numpy() for k, v in lin.state_dict().items()}
    _, state = head_checkpoints.import_classifier({f"linear.{k}": v for k, v in sd.items()}, avgpool=avgpool)
    x = np.concatenate([feats["cls"], feats["avgpool"]], -1) if avgpool else np.asarray(feats["cls"])
    with torch.no_grad():
        want = lin(torch.from_numpy(np.array(x))).numpy()
    probe = classifier_from_state(cfg, state)
    np.testing.assert_allclose(probe(feats), want, atol=1e-5)
    assert probe(feats).shape == (B, K)
    with pytest.raises(ValueError, match="return_attention"):
        probe(feats, return_attention=True)


def test_single_class_keeps_two_dims_and_bad_inputs_are_named():
    feats = head_inputs(_blocks())
    cfg = ClassifierConfig("glori", 1, D, decoder_dim=DEC, ffn_dim=FFN)
    glori = classifier_from_state(cfg, _random_state(cfg))
    assert glori(feats).shape == (B, 1)
    probe = ClassifierConfig("linear", 1, D)
    assert classifier_from_state(probe, _random_state(probe))(feats).shape == (B, 1)
    with pytest.raises(ValueError, match="'patch' is missing"):
        glori({"cls": feats["cls"]})
    with pytest.raises(ValueError, match=r"'patch' has shape \(3, 10, 48\)"):
        glori({**feats, "patch": feats["patch"][..., :48]})


def test_config_dict_round_trip_and_validation():
    cfg = ClassifierConfig("glori", 40, 1024, cat_cls=True, decoder_dim=384)
    assert ClassifierConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.feature_dim, cfg.pooled_dim, cfg.replace(kind="linear", avgpool=True).in_features) == (
        4096,
        4096 + 384,
        5120,
    )
    with pytest.raises(ValueError, match="'lr', 'typo'"):
        ClassifierConfig.from_dict({**cfg.to_dict(), "typo": 1, "lr": 0.1})
    with pytest.raises(ValueError, match="kind 'mlp'"):
        ClassifierConfig("mlp", 2, 8)
    with pytest.raises(ValueError, match="not divisible by num_heads 7"):
        ClassifierConfig("glori", 2, 8, num_heads=7)
