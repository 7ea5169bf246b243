"""Training FLOPs per image, the numerator of MFU."""

import pytest

from chexfound_jax.models.flops import dino_head_flops, vit_forward_flops
from chexfound_jax.train import flops, recipe
from configs.pretrain import vitl16_512


def test_paper_recipe_backbone_flops():
    got = flops.train_flops_per_image(vitl16_512.get_config())
    assert got["backbone"] / 1e12 == pytest.approx(7.09, abs=0.005)  # spec figure
    # teacher 2 x 728.0 + 3 x student (2 x 728.0 + 8 x 52.86) GFLOP
    vit = recipe.backbone_config(vitl16_512.get_config())
    assert vit_forward_flops(vit, 144) / 1e9 == pytest.approx(52.86, abs=0.01)
    assert got["total"] == got["backbone"] + got["heads"]


def test_head_flops_by_hand():
    cfg = vitl16_512.get_config()
    # 0.5 of the global crops masked, ratio U(0.1, 0.5) on 1024 tokens: 153.6 tokens per crop.
    assert flops.expected_masked_tokens_per_image(cfg) == pytest.approx(153.6)
    dino = 2 * (1024 * 2048 + 2048 * 2048 + 2048 * 384 + 384 * 131072)
    ibot = 2 * (1024 * 2048 + 2048 * 2048 + 2048 * 256 + 256 * 131072)
    assert dino_head_flops(1024, 2048, 384, 131072) == dino
    want = dino * (2 + 3 * 10) + ibot * 2 * 153.6 * 4
    assert flops.train_flops_per_image(cfg)["heads"] == pytest.approx(want)
