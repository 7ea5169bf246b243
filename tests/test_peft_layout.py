"""LoRA adapters in the Hugging Face peft layout: what peft 0.21.2 writes and computes (tests/data/peft_lora_*,
made by tests/data/make_peft_fixture.py) against this package's export, import and adapted layers."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import DATA, TINY_HEADS, TINY_HUB

from chexfound_jax.convert import ConversionError, peft_adapter
from chexfound_jax.models import adapt, lora
from chexfound_jax.models.vit import VisionTransformer, ViTConfig

LAYOUT = json.loads((DATA / "peft_lora_layout.json").read_text())
# the golden tiny backbone the fixture was made on
GOLDEN = ViTConfig(embed_dim=64, depth=4, num_heads=TINY_HEADS, patch_size=16, img_size=512)
OFFICIAL = lora.LoRAConfig()


def _random_adapter(cfg=OFFICIAL, seed=0):
    """An adapted golden-size backbone's pure dict, every leaf random (biases included)."""
    params = lora.abstract_lora_params(GOLDEN, cfg)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), params)


def _shapes(sd):
    return {k: list(v.shape) for k, v in sd.items()}


def test_official_defaults_are_the_fixture_config():
    assert peft_adapter.lora_config(LAYOUT["flat"]["adapter_config.json"]) == OFFICIAL
    written = peft_adapter.adapter_config(OFFICIAL)
    peft_written = LAYOUT["flat"]["adapter_config.json"]
    assert {k: peft_written[k] for k in written} == written


@pytest.mark.parametrize("layout, block_chunks", [("chunked", 4), ("flat", 0)])
def test_export_has_peft_keys_and_shapes(layout, block_chunks):
    sd = peft_adapter.export_adapter(_random_adapter(), OFFICIAL, block_chunks=block_chunks)
    want = {e["key"]: e["shape"] for e in LAYOUT[layout]["adapter_model.safetensors"]}
    assert _shapes(sd) == want
    assert {str(v.dtype) for v in sd.values()} == {"float32"}
    assert {e["dtype"] for e in LAYOUT[layout]["adapter_model.safetensors"]} == {"torch.float32"}


@pytest.mark.parametrize("layout", ["chunked", "flat"])
def test_lora_mode_trains_what_peft_trains(layout):
    """peft's requires_grad parameters (adapter name dropped) are the lora filter's, in torch names."""
    model = nnx.eval_shape(
        lambda: lora.add_lora(VisionTransformer(GOLDEN, rngs=nnx.Rngs(0)), OFFICIAL, rngs=nnx.Rngs(1))
    )
    trainable = nnx.state(model, adapt.trainable_filter("lora", OFFICIAL)).to_pure_dict()
    trainable = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), trainable)
    sd = peft_adapter.export_adapter(trainable, OFFICIAL, block_chunks=4 if layout == "chunked" else 0)
    peft_trainable = {name.replace(".default.", ".") for name in LAYOUT[layout]["trainable"]}
    assert set(sd) == peft_trainable


@pytest.mark.parametrize("block_chunks", [4, 0])
def test_round_trip_is_exact(tmp_path, block_chunks):
    params = _random_adapter(seed=block_chunks)
    peft_adapter.write_adapter(tmp_path, params, OFFICIAL, block_chunks=block_chunks)
    cfg, sd = peft_adapter.read_adapter(tmp_path)
    assert cfg == OFFICIAL
    back = peft_adapter.import_adapter(sd, cfg, lora.abstract_lora_params(GOLDEN, cfg))
    flat = dict(jax.tree_util.tree_flatten_with_path(back)[0])
    assert len(flat) == len(LAYOUT["flat"]["adapter_model.safetensors"])
    for path, value in flat.items():
        want = params
        for key in path:
            want = want[key.key]
        np.testing.assert_array_equal(value, want)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["proj", "qkv"]


def test_import_is_strict_and_names_the_key():
    sd = peft_adapter.export_adapter(_random_adapter(), OFFICIAL)
    abstract = lora.abstract_lora_params(GOLDEN, OFFICIAL)
    key = "base_model.model.blocks.2.2.attn.qkv.lora_A.weight"
    with pytest.raises(ConversionError, match=f"missing adapter key '{key}'"):
        peft_adapter.import_adapter({k: v for k, v in sd.items() if k != key}, OFFICIAL, abstract)
    with pytest.raises(ConversionError, match=rf"'{key}' has shape \(16, 63\), expected \(16, 64\)"):
        peft_adapter.import_adapter({**sd, key: sd[key][:, :63]}, OFFICIAL, abstract)
    extra = "base_model.model.blocks.1.1.mlp.w12.lora_A.weight"
    with pytest.raises(ConversionError, match=f"unknown adapter key '{extra}'"):
        peft_adapter.import_adapter({**sd, extra: sd[key]}, OFFICIAL, abstract)
    with pytest.raises(ConversionError, match="does not start with"):
        peft_adapter.import_adapter({k.removeprefix("base_model.model."): v for k, v in sd.items()}, OFFICIAL, abstract)
    # peft before 0.7 named the lora_only bias after the layer itself
    legacy = {k.replace(".base_layer.bias", ".bias"): v for k, v in sd.items()}
    back = peft_adapter.import_adapter(legacy, OFFICIAL, abstract)
    np.testing.assert_array_equal(
        back["blocks"][3]["attn"]["proj"]["bias"], sd["base_model.model.blocks.3.3.attn.proj.base_layer.bias"]
    )


@pytest.mark.parametrize(
    "change",
    [{"use_dora": True}, {"rank_pattern": {"qkv": 4}}, {"peft_type": "IA3"}, {"target_modules": "qkv"}, {"bias": "x"}],
)
def test_config_that_changes_the_function_is_refused(change):
    with pytest.raises(ConversionError, match="adapter_config.json"):
        peft_adapter.lora_config({**LAYOUT["flat"]["adapter_config.json"], **change})


def test_bias_all_exports_every_bias():
    cfg = lora.LoRAConfig(bias="all")
    sd = peft_adapter.export_adapter(_random_adapter(cfg), cfg, block_chunks=0)
    biases = sorted(k for k in sd if k.endswith(".bias"))
    assert len(biases) == 1 + 6 * GOLDEN.depth + 1
    assert (
        "base_model.model.blocks.0.norm1.bias" in biases
        and "base_model.model.blocks.0.attn.qkv.base_layer.bias" in biases
    )
    none = lora.LoRAConfig(bias="none")
    assert not [k for k in peft_adapter.export_adapter(_random_adapter(none), none) if k.endswith("bias")]


@pytest.mark.torch
def test_adapted_layers_compute_what_peft_computes():
    """peft's wrapped qkv, proj and patch-embedding conv (r 4, alpha 8, random A and B, eval mode) on the
    golden backbone, against this package's layers holding the imported adapter."""
    from chexfound_jax.convert import import_state_dict, torch_io

    with np.load(DATA / "peft_lora_outputs.npz") as f:
        ref = {k: f[k] for k in f.files}
    info = json.loads(str(ref["README"]))
    cfg = lora.LoRAConfig(
        rank=info["config"]["r"], alpha=info["config"]["lora_alpha"], target_modules=("qkv", "proj"), dropout=0.1
    )
    vit_cfg, params = import_state_dict(torch_io.read_checkpoint(TINY_HUB), num_heads=TINY_HEADS)
    model = lora.lora_model(vit_cfg.backbone, params["backbone"], cfg)
    sd = {k.removeprefix("adapter/"): v for k, v in ref.items() if k.startswith("adapter/")}
    abstract = nnx.state(model, nnx.Param).to_pure_dict()
    lora.load_params(model, peft_adapter.import_adapter(sd, cfg, abstract))
    attn = model.blocks[0].attn
    np.testing.assert_allclose(attn.qkv(ref["tokens"]), ref["qkv_out"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attn.proj(ref["tokens"]), ref["proj_out"], rtol=1e-5, atol=1e-5)
    patches = model.patch_embed(ref["image"].transpose(0, 2, 3, 1))  # NHWC in, (B, h*w, D) out
    want = ref["patch_out"].reshape(1, vit_cfg.backbone.embed_dim, -1).transpose(0, 2, 1)
    np.testing.assert_allclose(patches, want, rtol=1e-5, atol=1e-4)
