"""Training FLOPs per image, the numerator of MFU: nominal and executed, by hand and against XLA's count."""

import dataclasses

import jax
import pytest

from chexfound_jax.models.flops import dino_head_flops, patch_embed_flops, vit_block_flops, vit_forward_flops
from chexfound_jax.models.vit import ViTConfig
from chexfound_jax.parallel import sharding
from chexfound_jax.train import flops, recipe
from chexfound_jax.train.setup import build_training
from configs.pretrain import tiny_cpu, vitl16_512


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


# --- executed FLOPs under batch-subset drop path ---------------------------------------------------

# tiny_cpu's backbone (embed 64, depth 2, SwiGLU hidden 176, patch 16, 4 registers), by hand as in
# tests/test_flops.py: global 64 px -> 16 patches, 21 tokens; local 32 px -> 4 patches, 9 tokens.
EMBED_G = 2 * 16 * (16 * 16 * 3) * 64  # 1_572_864
BLOCK_G = 2 * 21 * 64 * 192 + 4 * 21 * 21 * 64 + 2 * 21 * 64 * 64 + 2 * 21 * 64 * 352 + 2 * 21 * 176 * 64
EMBED_L = 2 * 4 * (16 * 16 * 3) * 64  # 393_216
BLOCK_L = 2 * 9 * 64 * 192 + 4 * 9 * 9 * 64 + 2 * 9 * 64 * 64 + 2 * 9 * 64 * 352 + 2 * 9 * 176 * 64


def test_tiny_block_and_patch_embed_by_hand():
    vit = recipe.backbone_config(tiny_cpu.get_config())
    assert (BLOCK_G, BLOCK_L) == (2_220_288, 923_904)
    assert patch_embed_flops(vit, 64) == EMBED_G and vit_block_flops(vit, 64) == BLOCK_G
    assert patch_embed_flops(vit, 32) == EMBED_L and vit_block_flops(vit, 32) == BLOCK_L
    assert vit_forward_flops(vit, 64) == EMBED_G + 2 * BLOCK_G


def test_executed_flops_by_hand():
    cfg = tiny_cpu.get_config()  # drop path 0.4, subset; global batch 16 in 8 groups: b = 2
    cfg.crops.local_crops_number = 3
    assert (cfg.model.drop_path_rate, cfg.model.drop_path_mode) == (0.4, "subset")
    got = flops.train_flops_per_image(cfg)
    # Global forward: rows 2b = 4, keep int(4 * 0.6) = 2; local: rows 3b = 6, keep int(6 * 0.6) = 3.
    vit = recipe.backbone_config(cfg)
    assert flops.kept_rows(vit, 4) == 2 and flops.kept_rows(vit, 6) == 3
    teacher = 2 * (EMBED_G + 2 * BLOCK_G)
    nominal_student = teacher + 3 * (EMBED_L + 2 * BLOCK_L)
    executed_student = 2 * (EMBED_G + 2 * BLOCK_G * 2 / 4) + 3 * (EMBED_L + 2 * BLOCK_L * 3 / 6)
    assert got["backbone"] == teacher + 3 * nominal_student  # nominal: unchanged accounting
    assert got["executed_backbone"] == pytest.approx(teacher + 3 * executed_student)
    assert got["executed_total"] == pytest.approx(got["executed_backbone"] + got["heads"])
    assert got["total"] == got["backbone"] + got["heads"]

    # Group of 5 images: rows 10 keep 6 (global), rows 15 keep 9 (local).
    got5 = flops.train_flops_per_image(cfg, group_size=5)
    executed_student = 2 * (EMBED_G + 2 * BLOCK_G * 6 / 10) + 3 * (EMBED_L + 2 * BLOCK_L * 9 / 15)
    assert got5["executed_backbone"] == pytest.approx(teacher + 3 * executed_student)
    assert got5["total"] == got["total"]  # the nominal count does not depend on the grouping

    # One image per group: rows 2 keep max(int(1.2), 1) = 1 (global), rows 3 keep int(1.8) = 1 (local).
    got1 = flops.train_flops_per_image(cfg, group_size=1)
    executed_student = 2 * (EMBED_G + 2 * BLOCK_G / 2) + 3 * (EMBED_L + 2 * BLOCK_L / 3)
    assert got1["executed_backbone"] == pytest.approx(teacher + 3 * executed_student)


@pytest.mark.parametrize(("rate", "mode"), [(0.0, "subset"), (0.1, "subset"), (0.4, "per_sample")])
def test_executed_equals_nominal_without_the_subset(rate, mode):
    # drop_path_residual uses the subset only for rate > 0.1; per-sample drop path computes every row.
    cfg = tiny_cpu.get_config()
    cfg.model.update(drop_path_rate=rate, drop_path_mode=mode)
    got = flops.train_flops_per_image(cfg)
    assert got["executed_backbone"] == got["backbone"] and got["executed_total"] == got["total"]


def test_group_size_needed_for_one_group_per_shard():
    cfg = tiny_cpu.get_config()
    cfg.train.batch_groups = -1
    with pytest.raises(ValueError, match=r"train\.batch_groups"):
        flops.train_flops_per_image(cfg)
    assert flops.train_flops_per_image(cfg, group_size=2) == flops.train_flops_per_image(tiny_cpu.get_config())
    with pytest.raises(ValueError, match="group_size"):
        flops.train_flops_per_image(cfg, group_size=0)


def test_paper_recipe_executed_flops():
    cfg = vitl16_512.get_config()  # 80 images in 8 groups: b = 10
    got = flops.train_flops_per_image(cfg)
    vit = recipe.backbone_config(cfg)
    assert flops.kept_rows(vit, 20) == 12 and flops.kept_rows(vit, 80) == 48  # 0.6 of the rows, exactly
    # The figures of the module docstring.
    assert got["total"] == pytest.approx(7_195_659_180_442, rel=1e-12)
    assert got["executed_total"] == pytest.approx(4_946_041_896_960, rel=1e-12)
    assert got["total"] / got["executed_total"] == pytest.approx(1.455, abs=5e-4)


def test_global_attention_flops_by_hand():
    """The paper recipe's 1029-token global crops: q k^T and p v are 2 * T * T * D each per block."""
    cfg = vitl16_512.get_config()
    got = flops.global_attention_flops_per_image(cfg, group_size=10)
    per_crop = 24 * 2 * (2 * 1029 * 1029 * 1024)
    assert got["teacher_forward"] == 2 * per_crop
    assert got["student_forward"] == 2 * per_crop * 12 / 20  # 12 of a group's 20 global rows are kept
    assert got["executed"] == got["teacher_forward"] + 3 * got["student_forward"]
    # a part of the executed total, which also counts the local crops and every linear layer
    assert got["executed"] < 0.25 * flops.train_flops_per_image(cfg, group_size=10)["executed_total"]


def test_ibot_extra_teacher_flops_by_hand():
    cfg = vitl16_512.get_config()
    # 2 global crops x 153.6 expected masked tokens, each 2 x 256 x 131072 FLOPs per pass.
    per_pass = 2 * 153.6 * 2 * 256 * 131072
    assert flops.ibot_extra_teacher_flops_per_image(cfg, 1) == pytest.approx(per_pass)
    assert flops.ibot_extra_teacher_flops_per_image(cfg, 4) == pytest.approx(4 * per_pass)
    assert flops.ibot_extra_teacher_flops_per_image(cfg, 0) == 0
    cfg.ibot.separate_head = False  # iBOT shares the DINO head: its 384-d bottleneck
    assert flops.ibot_extra_teacher_flops_per_image(cfg, 1) == pytest.approx(2 * 153.6 * 2 * 384 * 131072)
    with pytest.raises(ValueError):
        flops.ibot_extra_teacher_flops_per_image(cfg, -1)


# --- against XLA's count of the compiled step -------------------------------------------------------


def _xla_step_flops(rate: float) -> tuple[float, object]:
    """cost_analysis() FLOPs of the real tiny train step (compiled for abstract inputs, never run):
    one group of 8 images, no remat, subset drop path at `rate`."""
    cfg = tiny_cpu.get_config()
    cfg.model.update(remat="none", drop_path_rate=rate, drop_path_mode="subset")
    if "scan_layers" in {f.name for f in dataclasses.fields(ViTConfig)}:
        # XLA's cost analysis counts a while loop's body once, so the blocks must not be one lax.scan.
        cfg.model.scan_layers = False
    cfg.train.update(global_batch_size=8, batch_groups=1)
    training = build_training(cfg, {"data": 1}, "data_parallel", devices=jax.devices()[:1])

    state = sharding.with_shardings(training.abstract_state, training.state_shardings)
    batch = sharding.with_shardings(training.batch_spec, training.batch_shardings)
    # LLVM at -O0 (as tests/test_bench_train_step.py): faster, and the HLO XLA counts is the same.
    compiled = training.step.lower(state, batch).compile({"xla_backend_optimization_level": 0})
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per module
        return float(sum(c.get("flops", 0.0) for c in cost)), cfg
    return float(cost["flops"]), cfg


@pytest.mark.parametrize("rate", [0.4, 0.0])
def test_executed_flops_match_xla(rate):
    xla, cfg = _xla_step_flops(rate)
    images = cfg.train.global_batch_size
    got = flops.train_flops_per_image(cfg)
    executed = images * got["executed_total"]
    # The analytic count credits the student's patch embedding with a backward of 2x its forward, but
    # the gradient with respect to the input crops is never computed (XLA drops it): 1x the patch
    # embedding per student crop. Negligible for ViT-L (0.1%), 8% of this tiny model's executed count.
    unused_input_grad = images * (2 * EMBED_G + cfg.crops.local_crops_number * EMBED_L)
    matmuls = executed - unused_input_grad
    # XLA counts every matmul plus the elementwise work (norms, softmax, SwiGLU, Sinkhorn, AdamW, EMA,
    # the subset's gathers and scatter-adds), never fewer: measured 1.065x (rate 0.4) and 1.075x (0).
    assert matmuls <= xla <= 1.15 * matmuls, (xla, matmuls, xla / matmuls)
    # The executed total itself: measured 1.024x (0.4) and 0.991x (0) of XLA's count.
    assert 0.9 <= executed / xla <= 1.1, (executed, xla, executed / xla)
    if rate:
        # The nominal count is not what runs: 1.38x XLA's count here, far outside the band.
        assert images * got["total"] / xla > 1.25
    else:
        assert got["executed_total"] == got["total"]
