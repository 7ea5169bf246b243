"""The analytic FLOP counts of chexfound_jax.models.flops: spec figures, hand counts, XLA's count."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from chexfound_jax.models.flops import dino_head_flops, vit_forward_flops
from chexfound_jax.models.vit import VisionTransformer, vit_config
from chexfound_jax.parallel import hlo_stats

TINY = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32)


@pytest.mark.parametrize("resolution, gflop", [(224, 125.8), (512, 728.0)])
def test_vit_large_spec_figures(resolution, gflop):
    cfg = vit_config("vit_large", patch_size=16, num_register_tokens=4, ffn_layer="swiglufused")
    assert cfg.hidden_dim == 2736
    assert vit_forward_flops(cfg, resolution) == pytest.approx(gflop * 1e9, rel=1e-3)
    assert vit_forward_flops(cfg, resolution, resolution) == vit_forward_flops(cfg, resolution)


def test_tiny_hand_count():
    cfg = vit_config("vit_small", **TINY)
    # D = 64, p = 8, C = 3, 32 x 32 -> N = 4 * 4 = 16 patches, T = 1 + 4 + 16 = 21 tokens.
    # SwiGLU hidden: int(64 * 4 * 2 / 3) = 170, rounded up to a multiple of 8 -> 176.
    assert cfg.hidden_dim == 176
    patch_embed = 2 * 16 * (8 * 8 * 3) * 64  # 393_216
    qkv = 2 * 21 * 64 * 192  # 516_096
    scores = 2 * 21 * 21 * 64  # 56_448
    values = 2 * 21 * 21 * 64  # 56_448
    proj = 2 * 21 * 64 * 64  # 172_032
    ffn = 2 * 21 * 64 * 352 + 2 * 21 * 176 * 64  # 946_176 + 473_088 = 1_419_264
    block = qkv + scores + values + proj + ffn  # 2_220_288
    assert block == 2_220_288
    assert vit_forward_flops(cfg, 32) == patch_embed + 2 * block == 4_833_792

    # Plain MLP, hidden 4 * 64 = 256: the FFN is 2 * 21 * 64 * 256 * 2 = 1_376_256 per block.
    mlp = cfg.replace(ffn_layer="mlp")
    assert mlp.hidden_dim == 256
    assert vit_forward_flops(mlp, 32) == patch_embed + 2 * (qkv + scores + values + proj + 1_376_256)

    # 40 x 24 (a ragged 40 x 27 is cropped to it): N = 5 * 3 = 15 patches, T = 20 tokens.
    t = 20
    rect_block = 2 * t * 64 * 192 + 4 * t * t * 64 + 2 * t * 64 * 64 + 2 * t * 64 * 352 + 2 * t * 176 * 64
    rect = 2 * 15 * 192 * 64 + 2 * rect_block
    assert vit_forward_flops(cfg, 40, 24) == rect
    assert vit_forward_flops(cfg, 40, 27) == rect

    # No registers: T = 1 + 16 = 17.
    t = 17
    noreg_block = 2 * t * 64 * 192 + 4 * t * t * 64 + 2 * t * 64 * 64 + 2 * t * 64 * 352 + 2 * t * 176 * 64
    assert vit_forward_flops(cfg.replace(num_register_tokens=0), 32) == patch_embed + 2 * noreg_block


def test_dino_head_hand_count():
    # CheXFound DINO head: 1024 -> 2048 -> 2048 -> 384, then 384 -> 131072 prototypes.
    expected = 2 * (1024 * 2048 + 2048 * 2048 + 2048 * 384) + 2 * 384 * 131072
    assert expected == 114_819_072
    assert dino_head_flops(1024, 2048, 384, 131072) == expected
    assert dino_head_flops(1024, 2048, 256, 131072, nlayers=2) == 2 * (1024 * 2048 + 2048 * 256) + 2 * 256 * 131072
    assert dino_head_flops(64, 32, 16, 100, nlayers=1) == 2 * 64 * 16 + 2 * 16 * 100
    with pytest.raises(ValueError):
        dino_head_flops(64, 32, 16, 100, nlayers=0)


def _xla_flops(compiled) -> float:
    """cost_analysis() is a dict on recent jax; older versions returned a list of per-module dicts."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        return float(sum(c.get("flops", 0.0) for c in cost))
    return float(cost["flops"])


@pytest.mark.parametrize("ffn_layer", ["swiglufused", "mlp"])
def test_analytic_is_lower_bound_of_xla(ffn_layer):
    # A wider tiny model than TINY so that the matmuls dominate (64 patches, D = 128).
    # cost_analysis() counts a loop body once, so the blocks run unrolled here (scan: the next test).
    cfg = vit_config(
        "vit_small",
        embed_dim=128,
        depth=2,
        num_heads=4,
        patch_size=8,
        img_size=64,
        ffn_layer=ffn_layer,
        scan_layers=False,
    )
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state).forward_features(x))
    batch = 2
    x = jax.ShapeDtypeStruct((batch, 64, 64, 3), jnp.float32)
    xla = _xla_flops(fwd.lower(state, x).compile()) / batch
    analytic = vit_forward_flops(cfg, 64)
    # XLA also counts norms, softmax, activations and bias adds, never fewer FLOPs than the matmuls.
    assert analytic <= xla <= 1.3 * analytic, (xla, analytic, xla / analytic)


def test_analytic_equals_the_compiled_matmuls_of_the_scanned_blocks():
    """The HLO count multiplies the scanned block by its trip count: exactly the analytic matmuls."""
    cfg = vit_config("vit_small", embed_dim=128, depth=3, num_heads=4, patch_size=8, img_size=64)
    assert cfg.scan_layers
    graphdef, state = nnx.split(VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state).forward_features(x))
    compiled = fwd.lower(state, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)).compile()
    stats = hlo_stats.analyse(compiled.as_text(), num_devices=1)
    assert stats.unknown_trip_counts == 0
    assert stats.matmul_flops == pytest.approx(2 * vit_forward_flops(cfg, 64), rel=1e-9)
